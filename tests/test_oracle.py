"""The oracle exit on hand-made answers whose earliest stable layers are known.

Five two-choice questions, L = 4, checks at layers 1..3, SPADE decoding every layer 0..4.
Each request costs what SPADE's fixed exit at layer l costs for 10 tokens and one scored
position, `10 l + 2 (4 - l)`, so a question (two requests) costs `16 (l + 1)` passes at
layer l and 80 at full depth. Every number below is worked out by hand from the table.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance

from lm_eval_spade.confidence import Confidence
from lm_eval_spade.decoders import DecoderKind
from lm_eval_spade.sweeps.answers import MultipleChoice
from lm_eval_spade.sweeps.model import RequestScores
from lm_eval_spade.sweeps.oracle import (
    Decoder,
    Family,
    OraclePlan,
    allowed_disagreements,
    decoder_oracle,
    share_of_saving,
    stable_exit,
    sweep_oracle,
)
from lm_eval_spade.sweeps.outcomes import Outcomes, fixed_exits, tally
from lm_eval_spade.sweeps.spec import Decoding, Layout, Signal

L, TOKENS, CHECKS = 4, 10, (1, 2, 3)
SPADE = Decoding(DecoderKind.SPADE)
SIGNAL = Signal(Decoding(DecoderKind.LOGIT_LENS), Confidence.ENTROPY)
LAYOUT = Layout.build([SPADE], [SIGNAL], L, {})
#: The answer (choice 0 or 1) of each question at layers 0..4; layer 4 is full depth.
ANSWERS = np.array(
    [
        [0, 1, 0, 0, 0],  # disagrees at check 1: stable from layer 2
        [1, 0, 1, 0, 0],  # agrees at 1, not at 2: stable from 3
        [1, 1, 1, 1, 0],  # only full depth: 4
        [0, 0, 1, 1, 1],  # stable from 2
        [1, 1, 0, 1, 1],  # agrees at 1, not at 2: stable from 3
    ]
)
GOLD = np.array([0, 0, 1, 1, 1])  # full depth is right on 4 of 5 (0.8)
ORACLE_LAYERS = np.array([2, 3, 4, 2, 3])
#: Uncertainty of each question's deciding request at layers 0..3 (layer 0 is no check).
UNCERTAINTY = np.array(
    [
        [9, 0.8, 0.1, 0.1],  # T=0.5: exits at 2; T=1: at 1
        [9, 2.0, 0.9, 0.3],  # 3; 2
        [9, 2.0, 2.0, 2.0],  # never: 4
        [9, 2.0, 0.4, 0.1],  # 2; 2
        [9, 2.0, 2.0, 0.7],  # never; 3
    ]
)
THRESHOLDS = (0.5, 1.0, math.inf)


def question_cost(layer: int) -> int:
    return 2 * (TOKENS * layer + 2 * (L - layer))


class FakeTask:
    """What `MultipleChoice` reads of an lm-eval task: the choices and `acc`."""

    OUTPUT_TYPE = "multiple_choice"

    def doc_to_choice(self, doc):
        return ["a", "b"]

    def process_results(self, doc, results):
        picked = int(np.argmax([ll for ll, _ in results]))
        return {"acc": float(picked == doc["gold"])}


class RollingTask:
    OUTPUT_TYPE = "loglikelihood_rolling"


def records() -> list[tuple[Instance, RequestScores]]:
    out = []
    for q in range(len(ANSWERS)):
        for j in range(2):
            loglik = torch.tensor(
                [0.0 if ANSWERS[q, c] == j else -1.0 for c in range(L + 1)], dtype=torch.float64
            )
            passes = torch.tensor([TOKENS * c + 2.0 * (L - c) for c in range(L + 1)])
            u = torch.tensor(UNCERTAINTY[q] if j == 0 else np.zeros(L), dtype=torch.float32)
            scores = RequestScores(
                loglik, torch.zeros(L + 1, dtype=torch.bool), passes, float(TOKENS * L),
                u[None], 1.0, (q,), 2 * q + j,
            )  # fmt: skip
            doc = {"gold": int(GOLD[q])}
            out.append((Instance("loglikelihood", doc, ("ctx", f" {j}"), j, ("mc", q, 1)), scores))
    return out


def static_outcomes() -> Outcomes:
    """Every question under a static SPADE exit at each layer 0..4."""
    recs = records()
    layers = np.arange(L + 1)
    predict, score = MultipleChoice({"mc": FakeTask()}).rules()
    exits = fixed_exits(len(recs), layers)
    return tally(recs, LAYOUT, SPADE, layers, exits, layers * 1.0, predict, score)


def test_the_earliest_stable_check_is_found_per_question():
    found = static_outcomes()
    candidates = [1, 2, 3, 4]
    assert list(np.array(candidates)[stable_exit(found.disagree[:, candidates])]) == list(
        ORACLE_LAYERS
    )
    with pytest.raises(ValueError, match="full depth"):
        stable_exit(np.array([[False, True]]))


def test_oracle_one_point_oracle_and_static_frontier():
    found = static_outcomes()
    entry = decoder_oracle(found, list(range(L + 1)), CHECKS)
    assert entry["checks"] == [1, 2, 3, 4]
    cost = sum(question_cost(layer) for layer in ORACLE_LAYERS) / (5 * 80)
    assert cost == 0.76
    assert entry["oracle"] == {
        "mean_exit_layer": pytest.approx(2.8),
        "compute_fraction": pytest.approx(0.76),
        "accuracy": pytest.approx(0.8),  # full depth's, by construction
        "disagreements": 0,
    }
    # 1% of 5 questions is none: the 1-point oracle is the oracle
    assert entry["oracle_1pt"]["allowed_disagreements"] == 0
    assert entry["oracle_1pt"]["compute_fraction"] == pytest.approx(0.76)
    # static exits: accuracy 0.6, 0.6, 0.6, 1.0, 0.8 at layers 0..4; layer 3 is the
    # cheapest within 1 point of 0.8, at 16 * 4 / 80 = 0.8 of the compute
    frontier = entry["static_frontier"]
    assert frontier["layer"] == 3 and frontier["accuracy"] == pytest.approx(1.0)
    assert frontier["compute_fraction"] == pytest.approx(0.8)
    assert frontier["share_of_oracle_saving"] == pytest.approx(0.2 / 0.24)


def test_the_one_point_oracle_moves_the_costliest_questions_to_the_first_check():
    found = static_outcomes()
    # within 40 points: 2 of 5 questions may disagree. Exiting at check 1 instead saves
    # 16 (l - 1) passes: q2 48, then q1 and q4 32 each (the earlier, q1, goes)
    entry = decoder_oracle(found, list(range(L + 1)), CHECKS, point=0.4)
    one = entry["oracle_1pt"]
    assert one["allowed_disagreements"] == 2 and one["moved_to_first_check"] == 2
    # exits 2, 1, 1, 2, 3: q2 now disagrees (answers 1 at layer 1) but is right; q1 agrees
    assert one == {
        "mean_exit_layer": pytest.approx(1.8),
        "compute_fraction": pytest.approx(16 * (9 + 5) / 400),
        "accuracy": pytest.approx(1.0),
        "disagreements": 1,
        "allowed_disagreements": 2,
        "moved_to_first_check": 2,
    }
    # and every static layer is within 40 points of 0.8: layer 0 is the cheapest
    assert entry["static_frontier"]["layer"] == 0
    assert entry["static_frontier"]["compute_fraction"] == pytest.approx(0.2)


def test_allowed_disagreements_is_one_percent_rounded_down():
    assert [allowed_disagreements(n) for n in (5, 99, 100, 300, 1199)] == [0, 0, 1, 3, 11]


def test_sweep_oracle_file_with_a_threshold_family_and_a_skipped_task():
    family = Family("entropy (logit lens)", SIGNAL, SPADE, THRESHOLDS)
    plan = OraclePlan("thresholds", (Decoder("spade", "SPADE", SPADE),), CHECKS, (family,))
    found = sweep_oracle(records(), LAYOUT, plan, {"mc": FakeTask(), "text": RollingTask()})
    assert found["kind"] == "thresholds" and found["within_point"] == 0.01
    assert found["tasks"]["text"] == {
        "skipped": "a loglikelihood_rolling task: the oracle needs multiple-choice answers to "
        "agree on"
    }
    task = found["tasks"]["mc"]
    assert task["questions"] == 5
    assert task["full_depth"] == {"accuracy": 0.8, "compute_fraction": 1.0, "mean_exit_layer": 4.0}
    (decoder,) = task["decoders"]
    assert decoder["decoder"] == "spade" and decoder["oracle"]["compute_fraction"] == 0.76
    # T=0.5 exits at 2, 3, 4, 2, 4: right on 4 of 5 (0.8), at 16 * 20 / 400 = 0.8 of the
    # compute; T=1 (exits 1, 2, 4, 2, 3) is right on 2, T=inf (all at 1) on 3
    (rule,) = task["rules"]
    assert rule["family"] == "entropy (logit lens)" and rule["decoder"] == "spade"
    assert rule["cheapest_within_point"] == {
        "threshold": 0.5,
        "mean_exit_layer": pytest.approx(3.0),
        "compute_fraction": pytest.approx(0.8),
        "accuracy": pytest.approx(0.8),
        "disagreements": 0,
        "share_of_oracle_saving": pytest.approx(0.2 / 0.24),
    }


def test_no_saving_and_no_point_within_give_null_with_a_reason():
    assert share_of_saving(0.9, 1.0) == {
        "share_of_oracle_saving": None,
        "why_null": "the oracle saves nothing here (it needs full depth's compute)",
    }
    family = Family("entropy (logit lens)", SIGNAL, SPADE, (1.0, math.inf))
    plan = OraclePlan("thresholds", (Decoder("spade", "SPADE", SPADE),), CHECKS, (family,))
    (rule,) = sweep_oracle(records(), LAYOUT, plan, {"mc": FakeTask()})["tasks"]["mc"]["rules"]
    assert rule["cheapest_within_point"] is None and rule["why_null"]
