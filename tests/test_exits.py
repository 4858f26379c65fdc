"""SPADE-EXIT in scoring: where requests exit, what they score, and what it costs."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from lmutil import (
    STORIES,
    arc_requests,
    loglikelihood_requests,
    make_lm,
    rolling_requests,
    save_tiny_model,
)

from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.confidence import Confidence, uncertainty
from lm_eval_spade.config import SpadeArgumentError
from lm_eval_spade.lens import Lens, LensKind, save_lens

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)

L = 5  # stories260K's blocks
LOGIT = {"confidence_decoder": "logit_lens"}


def _scores(results) -> list[float]:
    return [r[0] if isinstance(r, tuple) else r for r in results]


def _exit_layers(lm) -> list[int]:
    return [e["exit_layer"] for e in lm.exits]


@pytest.fixture(scope="module")
def reference():
    return make_lm("spade-exit", STORIES, exit_layer=L)


def _answer_uncertainties(lm, requests, measure: Confidence, lens=None) -> torch.Tensor:
    """`[questions, L]`: uncertainty at each question's answer position at layers 0..L-1,
    computed here one question at a time, apart from spade-exit's batched path."""
    arch = architecture_for(lm.model)
    contexts = list(dict.fromkeys(r.args[0] for r in requests))
    out = []
    with torch.no_grad():
        for context in contexts:
            ids = torch.tensor([lm.tok_encode(context)])
            positions = torch.arange(ids.shape[1])[None]
            hidden = arch.embed(ids, positions)
            row = []
            for layer in range(L):
                h = hidden[:, -1]
                logits = arch.head(h) if lens is None else lens.logits(arch, h, layer)
                row.append(float(uncertainty(logits, measure)[0]))
                hidden = arch.run_blocks(hidden, layer, layer + 1, positions)
            out.append(row)
    return torch.tensor(out)


# --- the two ends of the threshold -------------------------------------------------------
def test_threshold_minus_inf_never_exits_and_is_hf(reference):
    hf = make_lm("hf", STORIES)
    lm = make_lm("spade-exit", STORIES, threshold="-inf", **LOGIT)
    requests, rolling = arc_requests(8), rolling_requests()
    assert lm.loglikelihood(requests, disable_tqdm=True) == hf.loglikelihood(requests)
    assert lm.loglikelihood_rolling(rolling, disable_tqdm=True) == hf.loglikelihood_rolling(rolling)
    assert set(_exit_layers(lm)) == {L}


def test_threshold_inf_exits_everything_at_the_first_check():
    requests = loglikelihood_requests()
    lm = make_lm("spade-exit", STORIES, threshold="inf", min_layer=2, **LOGIT)
    fixed = make_lm("spade-exit", STORIES, exit_layer=2)
    assert lm.loglikelihood(requests, disable_tqdm=True) == fixed.loglikelihood(
        requests, disable_tqdm=True
    )
    assert lm.loglikelihood_rolling(rolling_requests(), disable_tqdm=True) == (
        fixed.loglikelihood_rolling(rolling_requests(), disable_tqdm=True)
    )
    assert set(_exit_layers(lm)) == {2}
    ours, theirs = lm.exit_stats["story"], fixed.exit_stats["story"]
    assert ours.compute_fraction == pytest.approx(theirs.compute_fraction)
    assert ours.checks > 0 and theirs.checks == 0


# --- hand-set thresholds exit where they should --------------------------------------------
@pytest.mark.parametrize("min_layer", [1, 3])
@pytest.mark.parametrize("measure", [m for m in Confidence if not m.answer_level])
def test_hand_set_threshold_exits_where_computed(reference, measure, min_layer):
    requests = arc_requests(12)
    u = _answer_uncertainties(reference, requests, measure)
    threshold, expected = _spread_threshold(u, checks=list(range(min_layer, L)))
    assert len(set(expected)) >= 2, expected

    lm = make_lm(
        "spade-exit", STORIES, threshold=threshold, confidence=measure.value,
        min_layer=min_layer, **LOGIT,
    )  # fmt: skip
    scores = lm.loglikelihood(requests, disable_tqdm=True)
    question = [r.doc_id for r in requests]
    assert _exit_layers(lm) == [expected[q] for q in question]
    for layer in set(expected):
        fixed = make_lm("spade-exit", STORIES, exit_layer=layer)
        want = fixed.loglikelihood(requests, disable_tqdm=True)
        for i, q in enumerate(question):
            if expected[q] == layer:
                assert scores[i][0] == pytest.approx(want[i][0], abs=1e-5)
                assert scores[i][1] == want[i][1]


def _expected_exits(u: torch.Tensor, checks: list[int], threshold: float) -> list[int]:
    return [next((c for c in checks if row[c] <= threshold), L) for row in u]


def _spread_threshold(u: torch.Tensor, checks: list[int]) -> tuple[float, list[int]]:
    """The threshold, halfway between two observed uncertainties (clear of float noise),
    that spreads the questions over the most exit layers; and those exits."""
    values = u[:, checks].flatten().sort().values
    gaps = [float(a + b) / 2 for a, b in itertools.pairwise(values) if b - a > 1e-3]
    best = max(gaps, key=lambda t: len(set(_expected_exits(u, checks, t))))
    return best, _expected_exits(u, checks, best)


def test_lspade_lens_as_confidence_source(reference, tmp_path):
    """The paper's setup: entropy of L-SPADE (here a lens with hand-set weights)."""
    arch = architecture_for(reference.model)
    lens = Lens.untrained(arch, LensKind.LSPADE)
    torch.manual_seed(0)
    with torch.no_grad():
        for linear in lens.translators.maps.values():
            linear.weight.normal_(0, 0.05)
    path = save_lens(lens, tmp_path / "lspade")
    requests = arc_requests(12)
    u = _answer_uncertainties(reference, requests, Confidence.ENTROPY, lens=lens)
    threshold, expected = _spread_threshold(u, checks=[1, 2, 3, 4])
    assert len(set(expected)) >= 2, expected
    lm = make_lm("spade-exit", STORIES, threshold=threshold, lens=path)
    lm.loglikelihood(requests, disable_tqdm=True)
    assert _exit_layers(lm) == [expected[r.doc_id] for r in requests]
    assert lm.get_model_info()["spade"]["config"]["confidence_decoder"] == "lspade"


# --- batches -------------------------------------------------------------------------------
def test_batch_size_changes_nothing():
    requests, rolling = arc_requests(12) + loglikelihood_requests("story"), rolling_requests()
    probe = make_lm("spade-exit", STORIES, threshold="inf", min_layer=3, **LOGIT)
    probe.loglikelihood(requests, disable_tqdm=True)
    threshold = sorted(e["confidence"] for e in probe.exits)[len(probe.exits) // 2] + 1e-3
    runs = {}
    for batch_size in (1, 3, 8):
        lm = make_lm(
            "spade-exit", STORIES, batch_size=batch_size, threshold=threshold, interval=2, **LOGIT
        )
        runs[batch_size] = (
            _scores(lm.loglikelihood(requests, disable_tqdm=True)),
            lm.loglikelihood_rolling(rolling, disable_tqdm=True),
            _exit_layers(lm),
        )
    (s1, r1, e1) = runs[1]
    assert len(set(e1)) > 1  # some exit, some do not
    n_arc = len(arc_requests(12))
    for batch_size in (3, 8):
        s, r, e = runs[batch_size]
        assert e == e1
        diff = [abs(a - b) for a, b in zip(s, s1, strict=True)]
        assert max(diff[:n_arc]) <= 1e-5  # letter answers
        # Long multi-token continuations scored near -70 sit at float32's floor: hf
        # itself moves by 1.5e-5 between batch sizes there (see test_batching.py).
        assert max(diff[n_arc:]) <= 1e-4
        assert max(abs(a - b) for a, b in zip(r, r1, strict=True)) <= 1e-5


def test_choices_of_a_question_exit_together():
    """Multi-token continuations are separate forwards; they share the context's exit."""
    requests = loglikelihood_requests("story")
    probe = make_lm("spade-exit", STORIES, threshold="inf", min_layer=1, **LOGIT)
    probe.loglikelihood(requests, disable_tqdm=True)
    threshold = float(torch.tensor([e["confidence"] for e in probe.exits]).median())
    lm = make_lm("spade-exit", STORIES, batch_size=3, threshold=threshold, **LOGIT)
    lm.loglikelihood(requests, disable_tqdm=True)
    by_context: dict[str, set[int]] = {}
    for req, exit in zip(requests, lm.exits, strict=True):
        by_context.setdefault(req.args[0], set()).add(exit["exit_layer"])
    assert all(len(layers) == 1 for layers in by_context.values()), by_context


# --- accounting ----------------------------------------------------------------------------
def test_exit_log_and_statistics(tmp_path):
    log = tmp_path / "logs" / "exits.jsonl"
    requests = arc_requests(6, task="arc")
    lm = make_lm("spade-exit", STORIES, threshold=1.5, exit_log=log, **LOGIT)
    lm.loglikelihood(requests, disable_tqdm=True)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == len(requests)
    assert set(lines[0]) == {"task", "doc_id", "idx", "exit_layer", "confidence"}
    assert [(x["doc_id"], x["idx"]) for x in lines] == [(r.doc_id, r.idx) for r in requests]
    for line in lines:
        assert line["task"] == "arc" and 1 <= line["exit_layer"] <= L
        if line["exit_layer"] < L:
            assert line["confidence"] <= 1.5
    stats = lm.get_model_info()["spade"]["tasks"]["arc"]
    histogram = {str(k): v for k, v in sorted(
        {x["exit_layer"]: sum(y["exit_layer"] == x["exit_layer"] for y in lines) for x in lines}
        .items()
    )}  # fmt: skip
    assert stats["exit_layer_histogram"] == histogram
    assert stats["mean_exit_layer"] == pytest.approx(
        sum(x["exit_layer"] for x in lines) / len(lines)
    )
    assert 0 < stats["compute_fraction"] <= 1 and stats["confidence_checks"] > 0


# --- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"threshold": 1.0}, "threshold needs a confidence source"),
        ({"threshold": "abc", **LOGIT}, "must be a number in nats"),
        ({"threshold": 1.0, "interval": 0, **LOGIT}, "interval=0 must be at least 1"),
        ({"threshold": 1.0, "min_layer": 5, **LOGIT}, "min_layer=5 is out of range"),
        ({"threshold": 1.0, "min_layer": -1, **LOGIT}, "min_layer=-1 is out of range"),
        ({"threshold": 1.0, "confidence": "variance", **LOGIT}, "confidence='variance'"),
        ({"threshold": 1.0, "confidence_decoder": "spade"}, "confidence_decoder=spade"),
        ({"threshold": 1.0, "confidence_decoder": "foo"}, "confidence_decoder='foo'"),
        ({"threshold": 1.0, "exit_layer": 2, **LOGIT}, "give one of them, not both"),
        ({"interval": 2}, "only apply to adaptive exits"),
        ({"threshold": 1.0, "confidence_decoder": "tuned_lens"}, "add lens=DIR"),
    ],
)
def test_bad_exit_settings(args, words):
    with pytest.raises(SpadeArgumentError, match=words):
        make_lm("spade-exit", STORIES, **args)


def test_confidence_lens_for_another_model_is_refused(tmp_path):
    import transformers as T

    config = T.LlamaConfig.from_pretrained(STORIES)
    other = save_tiny_model(config, tmp_path / "other")
    arch = architecture_for(T.AutoModelForCausalLM.from_pretrained(other))
    path = save_lens(Lens.untrained(arch, LensKind.LSPADE), tmp_path / "lens")
    with pytest.raises(SpadeArgumentError, match="another final norm"):
        make_lm("spade-exit", STORIES, threshold=1.0, lens=path)


def test_confidence_lens_must_cover_the_checks(tmp_path):
    arch = architecture_for(make_lm("spade-exit", STORIES, exit_layer=L).model)
    path = save_lens(Lens.untrained(arch, LensKind.LSPADE, layers=[2, 4]), tmp_path / "l")
    with pytest.raises(SpadeArgumentError, match=r"the checks need layers \[1, 3\]"):
        make_lm("spade-exit", STORIES, threshold=1.0, lens=path)
    lm = make_lm("spade-exit", STORIES, threshold=1.0, lens=path, interval=2, min_layer=2)
    assert lm.plan.checks == (2, 4)
    assert not math.isnan(lm.loglikelihood(arc_requests(2), disable_tqdm=True)[0][0])
