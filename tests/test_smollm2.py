"""spade-exit on a real pretrained 30-block Llama: SmolLM2-135M-Instruct.

Its tokenizer adds no start token, so these tests also show how spade-exit supplies one:
with an exit setting, every request gets HFLM's prefix token (`<|im_start|>`, its BOS)
in front. `hf` gets the same tokens when the text itself starts with `<|im_start|>`
(the tokenizer maps that string to the special token), which is how parity is checked.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from lm_eval.api.instance import Instance
from lmutil import DATA, make_lm
from realmodels import IM_START, smollm2_dir

from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.lens import Lens, LensKind, save_lens

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)

BOS_TEXT = "<|im_start|>"
L = 30


def _arc_requests(limit: int, prefix: str = "") -> list[Instance]:
    """ARC-Easy Dev questions as lm-eval's arc_easy scores them (cloze)."""
    import json

    rows = (DATA / "arc" / "ARC-Easy" / "ARC-Easy-Dev.jsonl").read_text().splitlines()[:limit]
    requests = []
    for doc_id, line in enumerate(rows):
        question = json.loads(line)["question"]
        context = f"{prefix}Question: {question['stem']}\nAnswer:"
        for idx, choice in enumerate(question["choices"]):
            requests.append(
                Instance(
                    "loglikelihood",
                    {},
                    (context, " " + choice["text"]),
                    idx,
                    metadata=("arc_easy", doc_id, 1),
                )
            )
    return requests


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_dir()


@pytest.fixture(scope="module")
def requests():
    return _arc_requests(3)


@pytest.fixture(scope="module")
def hf_with_start(smollm2):
    """`hf` on the same tokens spade-exit scores: the start token, then the request."""
    lm = make_lm("hf", smollm2, batch_size=8)
    return [ll for ll, _ in lm.loglikelihood(_arc_requests(3, BOS_TEXT), disable_tqdm=True)]


def _scores(lm, reqs) -> list[float]:
    return [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]


def test_tokenizer_adds_no_start_token_and_spade_exit_puts_one_first(smollm2, requests):
    tokenizer = T.AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer("Question:")["input_ids"][0] != IM_START
    lm = make_lm("spade-exit", smollm2, exit_layer=20)
    context, continuation = requests[0].args
    context_enc, _ = lm._encode_pair(context, continuation)
    assert context_enc[0] == IM_START == lm.prefix_token_id
    assert context_enc[1:] == tokenizer(context)["input_ids"]
    # Text that already starts with the start token gets no second one.
    context_enc, _ = lm._encode_pair(BOS_TEXT + context, continuation)
    assert context_enc[0] == IM_START and context_enc[1] != IM_START


def test_no_exit_setting_is_hf_bit_for_bit(smollm2, requests):
    hf = _scores(make_lm("hf", smollm2, batch_size=8), requests)
    assert _scores(make_lm("spade-exit", smollm2, batch_size=8), requests) == hf


@pytest.mark.parametrize("decoder", ["spade", "spade_nos", "logit_lens", "lspade", "tuned_lens"])
def test_every_decoder_at_the_last_layer_is_the_full_model(
    decoder, smollm2, requests, hf_with_start, tmp_path_factory
):
    args = {"exit_layer": L, "decoder": decoder, "batch_size": 8}
    if decoder in ("lspade", "tuned_lens"):
        lm = make_lm("spade-exit", smollm2)
        lens = Lens.untrained(architecture_for(lm.model), LensKind(decoder), layers=[29])
        args["lens"] = str(save_lens(lens, tmp_path_factory.mktemp("lens") / decoder))
    got = _scores(make_lm("spade-exit", smollm2, **args), requests)
    assert got == pytest.approx(hf_with_start, abs=1e-4)


def test_inner_layers_decode_something_else(smollm2, requests, hf_with_start):
    got = _scores(make_lm("spade-exit", smollm2, exit_layer=20, batch_size=8), requests)
    assert max(abs(a - b) for a, b in zip(got, hf_with_start, strict=True)) > 0.1


def _reference_spade(model, ids: list[int], layer: int, positions: list[int]) -> torch.Tensor:
    """SPADE from docs/method.md with transformers alone: `h^l` from output_hidden_states, the
    pair `[h_0, h_i]` at positions (0, i) through a truncated copy of the model."""
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
        upper = copy.deepcopy(model)
        upper.model.layers = upper.model.layers[layer:]
        upper.config.num_hidden_layers = L - layer
        out = []
        for i in positions:
            logits = upper(
                inputs_embeds=torch.stack([hidden[0], hidden[i]])[None],
                position_ids=torch.tensor([[0, i]]),
                attention_mask=torch.ones(1, 2, dtype=torch.long),
                use_cache=False,
            ).logits
            out.append(logits[0, -1])
    return torch.log_softmax(torch.stack(out), dim=-1)


@pytest.mark.parametrize("layer", [10, 24])
def test_spade_matches_an_independent_reference(layer, smollm2, requests):
    model = T.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    lm = make_lm("spade-exit", smollm2, exit_layer=layer, batch_size=8)
    got = _scores(lm, requests[:4])
    for req, score in zip(requests[:4], got, strict=True):
        context_enc, continuation_enc = lm._encode_pair(*req.args)
        ids = context_enc + continuation_enc
        positions = list(range(len(context_enc) - 1, len(ids) - 1))
        ref = _reference_spade(model, ids[:-1], layer, positions)
        want = float(ref[torch.arange(len(positions)), torch.tensor(continuation_enc)].sum())
        assert score == pytest.approx(want, abs=1e-4)


def test_batch_size_does_not_change_scores(smollm2, requests):
    one = _scores(make_lm("spade-exit", smollm2, exit_layer=18, batch_size=1), requests)
    eight = _scores(make_lm("spade-exit", smollm2, exit_layer=18, batch_size=8), requests)
    # Two float32 ulps of each total, the floor measured for HF itself (test_batching.py).
    for a, b in zip(one, eight, strict=True):
        assert abs(a - b) <= max(1e-5, 2 * abs(b) * torch.finfo(torch.float32).eps)


def test_bfloat16_last_layer_is_the_full_model(smollm2):
    reqs = _arc_requests(2)
    with_start = _arc_requests(2, BOS_TEXT)
    hf = _scores(make_lm("hf", smollm2, dtype="bfloat16"), with_start)
    got = _scores(make_lm("spade-exit", smollm2, dtype="bfloat16", exit_layer=L), reqs)
    assert got == hf
    inner = _scores(make_lm("spade-exit", smollm2, dtype="bfloat16", exit_layer=24), reqs)
    full32 = _scores(make_lm("spade-exit", smollm2, exit_layer=24), reqs)
    # bfloat16 keeps 8 bits of mantissa: summed log-probs within a few percent.
    assert inner == pytest.approx(full32, rel=0.05, abs=0.3)


@pytest.mark.parametrize("add_bos_token", [None, True])
def test_prefix_token_id_chooses_the_start_token(smollm2, requests, add_bos_token):
    """`<|endoftext|>` instead of the BOS: the given prefix token goes first, even where
    add_bos_token=True made the tokenizer add its BOS."""
    from realmodels import ENDOFTEXT

    args = {"exit_layer": 20, "prefix_token_id": ENDOFTEXT}
    if add_bos_token is not None:
        args["add_bos_token"] = add_bos_token
    lm = make_lm("spade-exit", smollm2, **args)
    context_enc, _ = lm._encode_pair(*requests[0].args)
    assert context_enc[0] == ENDOFTEXT
    assert context_enc[1] != ENDOFTEXT


def test_finetune_and_lens_examples_begin_with_the_chosen_start_token(smollm2):
    from realmodels import ENDOFTEXT

    from lm_eval_spade.finetune import encode_example
    from lm_eval_spade.lens.targets import encode

    tokenizer = T.AutoTokenizer.from_pretrained(smollm2)
    ids, start = encode_example(tokenizer, "Question: x\nAnswer:", " y", ENDOFTEXT)
    assert ids[0] == ENDOFTEXT and ids[1:start] == tokenizer("Question: x\nAnswer:")["input_ids"]
    assert encode_example(tokenizer, "Question: x\nAnswer:", " y")[0][0] == IM_START
    assert encode(tokenizer, ["Question: x"], 64, ENDOFTEXT)[0][0] == ENDOFTEXT
