"""spade-exit against `hf` on tiny random models of every supported family."""

from __future__ import annotations

import pytest
from lmutil import TINY_CONFIGS, loglikelihood_requests, make_lm, rolling_requests

DECODERS = ["logit_lens", "spade", "spade_nos"]


def _score(lm):
    ll = lm.loglikelihood(loglikelihood_requests(), disable_tqdm=True)
    rolling = lm.loglikelihood_rolling(rolling_requests(), disable_tqdm=True)
    return ll, rolling


def _assert_close(got, want, atol):
    (ll, rolling), (ll_ref, rolling_ref) = got, want
    assert len(ll) == len(ll_ref) and len(rolling) == len(rolling_ref)
    for (lp, greedy), (lp_ref, greedy_ref) in zip(ll, ll_ref, strict=True):
        assert abs(lp - lp_ref) <= atol
        assert greedy == greedy_ref
    for lp, lp_ref in zip(rolling, rolling_ref, strict=True):
        assert abs(lp - lp_ref) <= atol


@pytest.fixture(scope="module")
def hf_scores(tiny_models):
    return {family: _score(make_lm("hf", path)) for family, path in tiny_models.items()}


def test_requests_cover_one_and_multi_token_continuations(tiny_models):
    lm = make_lm("hf", tiny_models["llama"])
    lengths = {len(lm._encode_pair(r.args[0], r.args[1])[1]) for r in loglikelihood_requests()}
    assert 1 in lengths and max(lengths) > 3


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_no_exit_setting_is_hf(family, tiny_models, hf_scores):
    got = _score(make_lm("spade-exit", tiny_models[family]))
    assert got == hf_scores[family]  # the same code path: bit for bit


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_at_last_layer_is_full_model(family, decoder, tiny_models, hf_scores):
    lm = make_lm("spade-exit", tiny_models[family], decoder=decoder, exit_layer=3)
    _assert_close(_score(lm), hf_scores[family], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox"])
def test_inner_layer_differs_from_full_model(family, tiny_models, hf_scores):
    """The exit really takes effect: decoding layer 1 gives other numbers."""
    (ll, _), (ll_ref, _) = (
        _score(make_lm("spade-exit", tiny_models[family], exit_layer=1)),
        (hf_scores[family]),
    )
    assert max(abs(a[0] - b[0]) for a, b in zip(ll, ll_ref, strict=True)) > 1e-2


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_last_layer_is_full_model(family, dtype, tiny_models):
    """In half precision, exit_layer=L agrees with `hf` in the same dtype."""
    want = _score(make_lm("hf", tiny_models[family], dtype=dtype))
    got = _score(make_lm("spade-exit", tiny_models[family], dtype=dtype, exit_layer=3))
    _assert_close(got, want, atol=1e-5)  # measured: identical (0.0) on CPU
