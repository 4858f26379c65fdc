"""SPADE on the real stories260K model, against a reference written from docs/method.md.

The reference uses none of the package's code: it takes `h^l` from transformers'
`output_hidden_states`, and runs the upper blocks with transformers' own `LlamaModel`
forward on a truncated copy of the model, fed through `inputs_embeds`.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from lm_eval.api.instance import Instance
from lmutil import STORIES, STORY, make_lm

from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.decoders import DecoderKind, LayerStates, decode, decode_layers
from lm_eval_spade.perplexity import rolling_perplexity

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)

CONTEXT = "Once upon a time, there was a little girl named Lily. She loved to"
CONTINUATION = " play with her toys in the garden."
STORY_SENTENCES = [  # the story sentences of models/SOURCES.md
    "Once upon a time, there was a little girl named Lily. She loved to play with her toys "
    "in the garden.",
    "One day, a big dog came to the park. The dog was very happy and wanted to play with the kids.",
    "Tom was sad because he lost his red ball. His mom helped him look for it under the bed.",
]


@pytest.fixture(scope="module")
def stories():
    model = T.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    return model, T.AutoTokenizer.from_pretrained(STORIES)


def reference_logits(model, ids, layer, positions, variant):
    """Logits at `positions` decoded from layer `layer`, straight from docs/method.md."""
    L = model.config.num_hidden_layers
    with torch.no_grad():
        hidden = model(ids[None], output_hidden_states=True, use_cache=False).hidden_states[layer][
            0
        ]
        upper = copy.deepcopy(model)
        upper.model.layers = upper.model.layers[layer:]
        upper.config.num_hidden_layers = L - layer
        out = []
        for i in positions:
            if variant == "spade_nos":
                seq, pos = hidden[i][None], [[i]]
            else:
                seq, pos = (
                    torch.stack([hidden[0], hidden[i]]),
                    [[0, i if variant == "spade" else 1]],
                )
            logits = upper(
                inputs_embeds=seq[None],
                position_ids=torch.tensor(pos),
                attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                use_cache=False,
            ).logits
            out.append(logits[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("layer", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "variant,model_args",
    [
        ("spade", {}),
        ("spade_compact", {"spade_positions": "compact"}),
        ("spade_nos", {"decoder": "spade_nos"}),
    ],
)
def test_spade_matches_reference(stories, layer, variant, model_args):
    model, tok = stories
    ctx = tok.encode(CONTEXT)
    whole = tok.encode(CONTEXT + CONTINUATION)
    cont = whole[len(ctx) :]
    assert whole[0] == tok.bos_token_id and len(cont) > 3
    ids = torch.tensor(whole[:-1])
    positions = list(range(len(ctx) - 1, len(whole) - 1))
    ref = torch.log_softmax(reference_logits(model, ids, layer, positions, variant), dim=-1)
    want = float(ref[torch.arange(len(cont)), torch.tensor(cont)].sum())

    lm = make_lm("spade-exit", STORIES, exit_layer=layer, **model_args)
    request = Instance("loglikelihood", {}, (CONTEXT, CONTINUATION), 0, metadata=("t", 0, 1))
    ((got, _),) = lm.loglikelihood([request], disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-4)


def _perplexity(lm) -> float:
    return rolling_perplexity(lm, STORY_SENTENCES)


def test_layerwise_perplexity_spade_beats_logit_lens():
    ppl = {
        (decoder, layer): _perplexity(
            make_lm("spade-exit", STORIES, decoder=decoder, exit_layer=layer)
        )
        for decoder in ("logit_lens", "spade")
        for layer in range(1, 6)
    }
    for layer in range(1, 5):
        assert ppl["spade", layer] < ppl["logit_lens", layer]
    assert ppl["spade", 5] == pytest.approx(ppl["logit_lens", 5], rel=1e-6)
    # Full depth: the mean per-token perplexity of SOURCES.md is 2.4 over these sentences.
    assert 1.5 < ppl["spade", 5] < 3.5


@pytest.mark.parametrize("kind", [DecoderKind.SPADE, DecoderKind.SPADE_NOS])
def test_decoding_all_layers_together_equals_one_at_a_time(kind):
    """`decode_layers` sends every layer's sequences up together (a staircase)."""
    model = T.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    arch = architecture_for(model)
    tokenizer = T.AutoTokenizer.from_pretrained(STORIES)
    ids = torch.tensor([tokenizer(STORY)["input_ids"]])
    positions = torch.arange(ids.shape[1])
    with torch.no_grad():
        hidden = arch.embed(ids, positions[None])
        inputs = {}
        for layer in range(arch.num_layers + 1):
            inputs[layer] = LayerStates(hidden[0, [0] * len(positions)], hidden[0], positions)
            if layer < arch.num_layers:
                hidden = arch.run_blocks(hidden, layer, layer + 1, positions[None])
        together = decode_layers(arch, kind, inputs, max_sequences=16)
        for layer, x in inputs.items():
            alone = decode(arch, kind, layer, x.start_states, x.states, x.positions)
            assert torch.allclose(together[layer].logits, alone.logits, atol=1e-5, rtol=0)
            assert together[layer].block_token_passes == alone.block_token_passes
