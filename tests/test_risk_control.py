"""Choosing a threshold with a guarantee, on synthetic per-question scores.

The p-values are checked against scipy's binomial, the fixed-sequence rule against a
plain loop, and every candidate's outcome (exits, answers, cost) against a direct
computation per question and against the sweep's own `ThresholdExit` rule.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from lm_eval.api.instance import Instance
from scipy.stats import binom

from lm_eval_spade.confidence import Confidence
from lm_eval_spade.decoders import DecoderKind
from lm_eval_spade.risk_control import (
    RiskSettingError,
    binomial_cdf_table,
    binomial_p_value,
    certified_count,
    check_levels,
    p_values,
    questions_needed,
)
from lm_eval_spade.stats import ExitStats
from lm_eval_spade.sweeps.choose import ChooseConfig, certify, shortfall
from lm_eval_spade.sweeps.model import RequestScores
from lm_eval_spade.sweeps.outcomes import ExitRule, outcomes
from lm_eval_spade.sweeps.spec import Decoding, Layout, Signal
from lm_eval_spade.sweeps.views import ThresholdExit


@pytest.mark.parametrize(("n", "p"), [(1, 0.5), (10, 0.1), (300, 0.01), (2000, 0.05), (5000, 0.3)])
def test_binomial_tail_matches_scipy(n, p):
    table = binomial_cdf_table(n, p)
    expected = binom.cdf(np.arange(n + 1), n, p)
    np.testing.assert_allclose(table, expected, rtol=1e-9, atol=1e-300)
    for k in (0, 1, n // 3, n):
        assert binomial_p_value(k, n, p) == pytest.approx(binom.cdf(k, n, p), rel=1e-9)
    np.testing.assert_allclose(p_values([0, n, n + 5], n, p), binom.cdf([0, n, n], n, p))


def test_no_questions_certify_nothing():
    assert binomial_p_value(0, 0, 0.1) == 1.0
    assert list(p_values([0, 0], 0, 0.1)) == [1.0, 1.0]


def test_fixed_sequence_stops_at_the_first_failure():
    assert certified_count([0.01, 0.05, 0.2, 0.01], 0.1) == 2  # the last would pass: untested
    assert certified_count([0.5, 0.01], 0.1) == 0
    assert certified_count([0.01, 0.1], 0.1) == 2  # p <= ε passes
    assert certified_count([], 0.1) == 0


def test_questions_needed():
    # with no disagreement, (1 - δ)^n <= ε: n >= log ε / log(1 - δ) = 229.1 for δ=0.01, ε=0.1
    assert questions_needed(0.01, 0.1) == 230
    assert binom.cdf(0, 230, 0.01) <= 0.1 < binom.cdf(0, 229, 0.01)
    needed = questions_needed(0.05, 0.1, 0.02)
    assert binom.cdf(math.floor(0.02 * needed), needed, 0.05) <= 0.1
    assert binom.cdf(math.floor(0.02 * (needed - 1)), needed - 1, 0.05) > 0.1
    assert questions_needed(0.05, 0.1, 0.05) is None  # a rate at δ is never certified


@pytest.mark.parametrize(("delta", "eps"), [(0.0, 0.1), (1.0, 0.1), (0.01, 0.0), (0.01, 1.5)])
def test_levels_outside_zero_one_are_refused(delta, eps):
    with pytest.raises(RiskSettingError, match="strictly between 0 and 1"):
        check_levels(delta, eps)


def test_certify_stops_where_the_fixed_sequence_says():
    summary = pd.DataFrame(
        {
            "threshold": [0.1, 0.2, 0.5, 1.0, 2.0],
            "questions": 300,
            "disagreements": [0, 1, 9, 1, 0],  # not monotone: the dip is never tested
            "mean_exit_layer": [4.0, 3.5, 3.0, 2.5, 2.0],
            "compute_fraction": [1.0, 0.9, 0.8, 0.7, 0.6],
        }
    )
    certified, chosen = certify(summary, 0.02, 0.1)
    assert chosen == 1
    assert list(certified["certified"]) == [True, True, False, False, False]
    assert list(certified["tested"]) == [True, True, True, False, False]
    np.testing.assert_allclose(certified["p_value"], binom.cdf([0, 1, 9, 1, 0], 300, 0.02))
    assert shortfall(certified, chosen, ChooseConfig(max_drop=0.02), 4) is None


def test_shortfall_names_how_many_questions_would_do():
    summary = pd.DataFrame(
        {
            "threshold": [0.1, 0.2, 0.5],
            "questions": 50,
            "disagreements": [0, 0, 20],
            "mean_exit_layer": [4.0, 3.0, 1.0],
            "compute_fraction": [1.0, 0.8, 0.3],
        }
    )
    certified, chosen = certify(summary, 0.01, 0.1)
    assert chosen is None
    text = shortfall(certified, chosen, ChooseConfig(), 4)
    assert "no threshold could be certified with 50 calibration questions" in text
    assert "threshold 0.2" in text and "about 230 questions" in text
    summary["disagreements"] = [0, 5, 20]
    text = shortfall(certify(summary, 0.01, 0.1)[0], None, ChooseConfig(), 4)
    assert "no number of calibration questions certifies it" in text


# --- every candidate from one pass, on synthetic scores --------------------------------------
L, CHOICES, N = 4, 3, 600
CHECKS = (1, 2, 3)
SIGNAL = Signal(Decoding(DecoderKind.LSPADE, "lspade"), Confidence.ENTROPY)
SPADE = Decoding(DecoderKind.SPADE)
LAYOUT = Layout.build([SPADE], [SIGNAL], L, {"lspade": list(range(L))})
GRID = np.array([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 2.0, math.inf])


@pytest.fixture(scope="module")
def synthetic():
    """N questions of three choices. A question's answer at layer l agrees with the full
    model's with a probability that grows with l; its first choice's row decides the
    exit (the other rows carry uncertainties that would exit at once if they decided)."""
    rng = np.random.default_rng(0)
    full = rng.integers(0, CHOICES, N)
    agree_p = [0.3, 0.6, 0.85, 0.97, 1.0]
    answers = np.array(
        [
            [
                full[q] if rng.random() < agree_p[layer] else rng.integers(0, CHOICES)
                for layer in range(L + 1)
            ]
            for q in range(N)
        ]
    )
    gold = np.where(rng.random(N) < 0.7, full, rng.integers(0, CHOICES, N))
    uncertainty = rng.exponential(0.6, (N, L)).astype(np.float32)
    records = []
    for q in range(N):
        tokens = 10 + q % 7
        for j in range(CHOICES):
            loglik = torch.tensor(
                [0.0 if answers[q, c] == j else -1.0 - j for c in range(L + 1)], dtype=torch.float64
            )
            u = torch.tensor(uncertainty[q] if j == 0 else np.zeros(L, np.float32))[None]
            passes = torch.tensor([layer * tokens + (L - layer) * 2.0 for layer in range(L + 1)])
            scores = RequestScores(
                loglik, torch.tensor(rng.random(L + 1) < 0.5), passes / CHOICES,
                L * tokens / CHOICES, u, 1 / CHOICES, (q,), CHOICES * q + j,
            )  # fmt: skip
            request = Instance("loglikelihood", {}, ("ctx", f" {j}"), j, ("synthetic", q, 1))
            records.append((request, scores))
    records.reverse()  # order in the list must not matter: `order` decides
    return records, answers, gold, uncertainty


def predict(instances, loglik, greedy):
    return loglik.argmax(axis=0)


def test_every_candidate_matches_a_direct_computation(synthetic):
    records, answers, gold, uncertainty = synthetic
    rule = ExitRule(LAYOUT, SIGNAL, CHECKS, SPADE)
    found = outcomes(
        records,
        rule,
        GRID,
        predict,
        lambda inst: (np.arange(CHOICES) == gold[inst[0].doc_id]) * 1.0,
    )
    summary = found.summary()
    for c, threshold in enumerate(GRID):
        exits = [next((k for k in CHECKS if uncertainty[q, k] <= threshold), L) for q in range(N)]
        picked = answers[np.arange(N), exits]
        row = summary.loc[c]
        assert row["disagreements"] == int((picked != answers[:, L]).sum())
        assert row["accuracy"] == pytest.approx((picked == gold).mean())
        assert row["accuracy_drop"] == pytest.approx(
            (answers[:, L] == gold).mean() - row["accuracy"]
        )
        assert row["mean_exit_layer"] == pytest.approx(np.mean(exits))
        assert found.histogram(c) == {
            str(k): CHOICES * n for k, n in zip(*np.unique(exits, return_counts=True), strict=True)
        }
    assert found.keys[:2] == [("synthetic", 0), ("synthetic", 1)]
    # the disagreement curve is what the chosen threshold is read from
    _, chosen = certify(summary, 0.2, 0.1)
    p = binom.cdf(summary["disagreements"], N, 0.2)
    direct = next((i for i, value in enumerate(p) if value > 0.1), len(p)) - 1
    assert chosen == direct and 0 < chosen < len(GRID) - 1
    # a random half is summarised by its rows alone
    rows = np.arange(0, N, 2)
    half = found.summary(rows)
    exits = [next((k for k in CHECKS if uncertainty[q, k] <= 0.3), L) for q in rows]
    picked = answers[rows, exits]
    assert half.loc[4, "disagreements"] == int((picked != answers[rows, L]).sum())
    assert half.loc[4, "questions"] == len(rows)


@pytest.mark.parametrize("threshold_index", [1, 4, 7, 9])
def test_exits_and_cost_equal_the_sweeps_threshold_rule(synthetic, threshold_index):
    records, *_ = synthetic
    rule = ExitRule(LAYOUT, SIGNAL, CHECKS, SPADE)
    found = outcomes(records, rule, GRID, predict, lambda instances: None)
    threshold = float(GRID[threshold_index])
    sweep_rule = ThresholdExit(LAYOUT, SIGNAL, threshold, SPADE, CHECKS, 1, 1)
    chosen = sweep_rule.choose([s for _, s in records])
    stats = ExitStats(L)
    for _, exit in chosen:
        stats.add(exit)
    assert [e.exit_layer for _, e in chosen] == list(found.request_layers[:, threshold_index])
    row = found.summary().loc[threshold_index]
    assert row["compute_fraction"] == pytest.approx(stats.compute_fraction)
    assert row["mean_exit_layer"] == pytest.approx(stats.mean_exit_layer)
    assert "accuracy" not in row  # no labels: disagreement only
