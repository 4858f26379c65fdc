"""SPADE on the real stories260K model, against a reference written from SPADE.md.

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
from lmutil import STORIES, make_lm

from lm_eval_spade.perplexity import rolling_perplexity

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
    """Logits at `positions` decoded from layer `layer`, straight from SPADE.md."""
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
