"""Truncation that keeps SPADE's start token (`start_token.py`), on the real stories260K.

HFLM cuts a context longer than max_length from the left, and the start token goes with
the cut. spade-exit, when it exits early, cuts right after the start token instead, and
windows long rolling documents so each window begins with it. Nothing that fits changes.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from lm_eval.api.instance import Instance
from lmutil import STORIES, STORY, make_lm

from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.decoders import DecoderKind, LayerStates, decode
from lm_eval_spade.start_token import cut_after_start, rolling_windows, with_start

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)

BOS = 1
CONTEXT = STORY  # about 60 tokens
CONTINUATION = " His mom helped him."
MAX_LENGTH = 24


def test_with_start_puts_one_start_token_first():
    assert with_start([5, 6], 1, {1}) == [1, 5, 6]
    assert with_start([1, 5, 6], 1, {1}) == [1, 5, 6]
    assert with_start([0, 5], 1, {0, 1}) == [0, 5]  # any start token counts
    assert with_start([], 1, {1}) == [1]


def test_cut_after_start_keeps_position_zero():
    tokens = [1, 10, 11, 12, 13, 14]
    assert cut_after_start(tokens, 4, {1}) == [1, 12, 13, 14]
    assert cut_after_start(tokens, 6, {1}) == tokens  # fits: unchanged
    assert cut_after_start(tokens, 4, ()) == [11, 12, 13, 14]  # no start token: HFLM's cut
    assert cut_after_start([9, *tokens[1:]], 4, {1}) == [11, 12, 13, 14]


def test_rolling_windows_begin_with_the_start_token():
    tokens = list(range(10, 30))  # 20 tokens
    windows = rolling_windows(tokens, BOS, max_length=8)
    assert [ctx[0] for ctx, _ in windows] == [BOS] * len(windows)
    predicted = [t for _, cont in windows for t in cont]
    assert predicted == tokens  # every token predicted once, in order
    for ctx, cont in windows:
        assert len(ctx) + len(cont) - 1 <= 8  # the model input fits max_length
    # A document that fits is lm-eval's one window.
    assert rolling_windows(tokens[:8], BOS, max_length=8) == [([BOS], tokens[:8])]


def _request(context: str = CONTEXT, continuation: str = CONTINUATION) -> Instance:
    return Instance("loglikelihood", {}, (context, continuation), 0, metadata=("story", 0, 1))


def _direct_spade(layer: int, ids: list[int], cont_len: int, decoder: DecoderKind) -> float:
    """The summed log-prob of the last `cont_len` tokens of `ids` decoded at `layer`,
    computed on the model's blocks directly."""
    model = T.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    arch = architecture_for(model)
    x = torch.tensor([ids[:-1]])
    positions = torch.arange(x.shape[1])[None]
    with torch.no_grad():
        hidden = arch.run_blocks(arch.embed(x, positions), 0, layer, positions)[0]
        scored = torch.arange(len(ids) - 1 - cont_len, len(ids) - 1)
        states = LayerStates(hidden[0].expand(len(scored), -1), hidden[scored], scored)
        logits = decode(arch, decoder, layer, states.start_states, states.states, scored).logits
    log_probs = F.log_softmax(logits, dim=-1)
    return float(log_probs[torch.arange(cont_len), torch.tensor(ids[-cont_len:])].sum())


def test_left_truncated_scoring_keeps_the_start_token():
    lm = make_lm("spade-exit", STORIES, exit_layer=3, max_length=MAX_LENGTH)
    context_enc, continuation_enc = lm._encode_pair(CONTEXT, CONTINUATION)
    whole = context_enc + continuation_enc
    assert whole[0] == BOS and len(whole) > MAX_LENGTH + 1
    ((got, _),) = lm.loglikelihood([_request()], disable_tqdm=True)
    kept = [BOS, *whole[-MAX_LENGTH:]]  # the start token, then the last tokens that fit
    want = _direct_spade(3, kept, len(continuation_enc), DecoderKind.SPADE)
    assert got == pytest.approx(want, abs=1e-5)


def test_nothing_cut_is_hflm_exactly_at_full_depth():
    """A request that fits gets HFLM's tokens, so the last layer is `hf`'s score."""
    hf = make_lm("hf", STORIES)
    lm = make_lm("spade-exit", STORIES, exit_layer=5)
    ((want, _),) = hf.loglikelihood([_request()], disable_tqdm=True)
    ((got, _),) = lm.loglikelihood([_request()], disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-5)


def test_without_a_start_token_truncation_is_hflms():
    """add_bos_token=False turns the start token off: decoders that need none then see
    exactly what HFLM's left truncation gives `hf`."""
    args = {"max_length": MAX_LENGTH, "add_bos_token": False}
    hf = make_lm("hf", STORIES, **args)
    lm = make_lm("spade-exit", STORIES, exit_layer=5, decoder="logit_lens", **args)
    ((want, _),) = hf.loglikelihood([_request()], disable_tqdm=True)
    ((got, _),) = lm.loglikelihood([_request()], disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-5)
    # With the start token kept, the same request is scored on other tokens.
    kept = make_lm("spade-exit", STORIES, exit_layer=5, max_length=MAX_LENGTH)
    ((other, _),) = kept.loglikelihood([_request()], disable_tqdm=True)
    assert abs(other - want) > 1e-3


def test_truncation_is_one_log_line_per_task(caplog):
    lm = make_lm("spade-exit", STORIES, exit_layer=3, max_length=MAX_LENGTH)
    requests = [
        Instance("loglikelihood", {}, (CONTEXT, k), i, metadata=("story", i, 1))
        for i, k in enumerate([" a", " b", " c"])
    ] + [Instance("loglikelihood", {}, ("Once upon a", " time"), 0, metadata=("short", 0, 1))]
    with caplog.at_level(logging.WARNING, logger="lm_eval_spade.model"):
        lm.loglikelihood(requests, disable_tqdm=True)
    lines = [r.getMessage() for r in caplog.records if "max_length" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("story: 3 of 3 requests exceed max_length=24")
    assert "after the start token" in lines[0]


def test_rolling_documents_longer_than_max_length_keep_the_start_token():
    lm = make_lm("spade-exit", STORIES, exit_layer=5, decoder="logit_lens", max_length=MAX_LENGTH)
    tokens = lm.tok_encode(STORY)
    windows = rolling_windows(tokens, BOS, MAX_LENGTH)
    assert len(windows) >= 3
    request = Instance("loglikelihood_rolling", {}, (STORY,), 0, metadata=("story", 0, 1))
    (got,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    want = sum(
        _direct_spade(5, ctx + cont, len(cont), DecoderKind.LOGIT_LENS) for ctx, cont in windows
    )
    assert got == pytest.approx(want, abs=1e-4)
    # Every window starts with the start token, so SPADE decodes all of them.
    spade = make_lm("spade-exit", STORIES, exit_layer=3, max_length=MAX_LENGTH)
    (score,) = spade.loglikelihood_rolling([request], disable_tqdm=True)
    assert score < 0 and lm.exits[-1]["exit_layer"] == 5


def test_generation_contexts_keep_the_start_token_when_cut():
    lm = make_lm("spade-exit", STORIES, exit_layer=3)
    ids, mask = lm.tok_batch_encode([STORY, "Once upon a"], left_truncate_len=MAX_LENGTH)
    assert ids.shape == (2, MAX_LENGTH)
    full = lm.tok_encode(STORY)
    assert ids[0].tolist() == [BOS, *full[-(MAX_LENGTH - 1) :]]
    short = lm.tok_encode("Once upon a")
    assert ids[1, -len(short) :].tolist() == short and short[0] == BOS
    assert mask[1].tolist() == [0] * (MAX_LENGTH - len(short)) + [1] * len(short)


# The mission's command on stories260K (BoolQ passages cut after the start token) runs
# through the real lm_eval in test_lm_eval_output.py.
