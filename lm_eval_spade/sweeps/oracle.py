"""The oracle exit: the least compute any exit rule could spend and keep full depth's answers.

Definitions in [method.md](../../docs/method.md#the-oracle-exit). Per question (a document
of a task; all its choices exit together, as SPADE-EXIT exits them) and decoder D:

- the **oracle** exits at the earliest check layer from which D's answer equals the full
  model's at that check and every later one, so it never disagrees with full depth and
  its accuracy is full depth's: the floor of what an exit rule that must agree with full
  depth could reach with these checks;
- the **1-point oracle** may disagree on floor(1% of N) questions: those whose oracle exit
  costs the most above the first check exit there instead, whatever they answer there;
- the **static frontier** is the cheapest static exit layer within 1 point of full depth;
- a threshold rule family's **share of the oracle's saving** is (1 - c_rule) / (1 - c_oracle)
  for its cheapest threshold within 1 point.

Nothing here runs the model or counts compute anew: a sweep's `QuestionTable` keeps the
requests it scored, and `outcomes.tally` gives every question's answer, metric, exit layer
and block-token passes under a static exit at each layer (the columns `views.FixedExit`
answers from) and under each threshold (as `views.ThresholdExit`). An oracle is a choice
of one of those static exits per question, summed by `Outcomes.summary` like any other.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from lm_eval.api.instance import Instance

from lm_eval_spade.confidence import Confidence
from lm_eval_spade.finite import json_number
from lm_eval_spade.sweeps.answers import MultipleChoice
from lm_eval_spade.sweeps.model import LayerwiseLM, RequestScores
from lm_eval_spade.sweeps.outcomes import ExitRule, Outcomes, fixed_exits, tally
from lm_eval_spade.sweeps.spec import Decoding, Layout, Signal, SweepError
from lm_eval_spade.sweeps.views import ScoreTable

logger = logging.getLogger(__name__)

ORACLE = "oracle.json"
DEFINITION = "docs/method.md#the-oracle-exit"
#: "Within 1 point": accuracy at least full depth's minus this; also the 1-point oracle's
#: disagreement budget, as a share of the questions.
POINT = 0.01
#: Accuracies are counts over N: this absorbs float rounding in `full - POINT` (and in
#: `POINT * N`), so that exactly 1 point below full depth counts as within it.
TOLERANCE = 1e-9
#: The metric whose answer and value count (lm-eval's `acc`: the most likely choice).
METRIC = "acc"

Record = tuple[Instance, RequestScores]


@dataclass(frozen=True)
class Decoder:
    """A decoding the oracle is found for: its setting name (`spade`, `lspade-arc`),
    how tables name it (`SPADE`), and the decoding."""

    name: str
    label: str
    decoding: Decoding


@dataclass(frozen=True)
class Family:
    """A threshold rule family of the sweep (e.g. SPADE-EXIT), swept over `thresholds`."""

    label: str
    signal: Signal
    decoding: Decoding
    thresholds: tuple[float, ...]


@dataclass(frozen=True)
class OraclePlan:
    """What a sweep's oracle file covers: its kind, the decoders, the check layers the
    oracle may exit at (None: every layer the sweep decodes the decoder at), and the
    threshold families to compare with the oracle."""

    kind: str
    decoders: tuple[Decoder, ...]
    checks: tuple[int, ...] | None = None
    families: tuple[Family, ...] = ()
    point: float = POINT


class QuestionTable(ScoreTable):
    """A `ScoreTable` that keeps every request it answers (the first time it is asked),
    with its scores: the oracle is then computed from the sweep's own pass."""

    def __init__(self, lm: LayerwiseLM, time_full_depth: bool = True) -> None:
        super().__init__(lm, time_full_depth)
        self._records: dict[tuple, Record] = {}

    def scores(self, reqtype: str, requests: Sequence[Instance]) -> list[RequestScores]:
        out = super().scores(reqtype, requests)
        for request, scores in zip(requests, out, strict=True):
            key = (reqtype, request.task_name, request.doc_id, request.idx)
            self._records.setdefault(key, (request, scores))
        return out

    def records(self) -> list[Record]:
        return list(self._records.values())


# --- the oracle on one decoder's static exits ------------------------------------------------
def stable_exit(disagree: np.ndarray) -> np.ndarray:
    """Per question (row of `[questions, candidates]`), the earliest candidate from which
    every candidate agrees with full depth. The last candidate must be full depth."""
    agree_from = np.flip(np.logical_and.accumulate(np.flip(~disagree, axis=1), axis=1), axis=1)
    if not agree_from[:, -1].all():
        raise ValueError("the oracle's last candidate must be full depth, which always agrees")
    return agree_from.argmax(axis=1)


def allowed_disagreements(questions: int, point: float = POINT) -> int:
    """floor(point * N): how many questions may disagree and stay within `point`."""
    return math.floor(point * questions + TOLERANCE)


def one_point_exit(found: Outcomes, oracle: np.ndarray, first: int, budget: int) -> np.ndarray:
    """The oracle's exits with the `budget` questions whose oracle exit costs the most
    block-token passes above the candidate `first` (the first check) moved there (ties:
    the earlier question; questions it would not save anything on stay)."""
    rows = np.arange(found.questions)
    saving = found.passes[rows, oracle] - found.passes[rows, first]
    order = np.argsort(-saving, kind="stable")[:budget]
    choice = oracle.copy()
    choice[order[saving[order] > 0]] = first
    return choice


def measures(row: pd.Series) -> dict[str, Any]:
    """A summary row's numbers as JSON (no NaN: `json_number`; a count as an int, though
    a row of a mixed table reads it back as a float)."""
    keys = ("mean_exit_layer", "compute_fraction", "accuracy")
    out = {key: json_number(row[key]) for key in keys if key in row}
    return {**out, "disagreements": int(row["disagreements"])}


def cheapest_within(summary: pd.DataFrame, full_accuracy: float, point: float) -> int | None:
    """The row of `summary` with the least compute among those whose accuracy is at least
    full depth's minus `point` (ties: the earlier row); None when there is none."""
    within = summary[summary["accuracy"] >= full_accuracy - point - TOLERANCE]
    if within.empty:
        return None
    return int(within.sort_values("compute_fraction", kind="stable").index[0])


def share_of_saving(compute: float, oracle_compute: float) -> dict[str, Any]:
    """(1 - c) / (1 - c_oracle): how much of what the oracle saves a rule saves; null with
    the reason where the oracle saves nothing."""
    if oracle_compute >= 1 - TOLERANCE:
        return {
            "share_of_oracle_saving": None,
            "why_null": "the oracle saves nothing here (it needs full depth's compute)",
        }
    return {"share_of_oracle_saving": (1 - compute) / (1 - oracle_compute)}


def decoder_oracle(
    found: Outcomes, layers: Sequence[int], checks: Sequence[int] | None, point: float = POINT
) -> dict[str, Any]:
    """Oracle, 1-point oracle and static frontier of one decoder, from `found`: every
    question under a static exit at each of `layers` (ascending, the last L)."""
    num_layers = layers[-1]
    candidates = [
        i
        for i, layer in enumerate(layers)
        if checks is None or layer in checks or i == len(layers) - 1
    ]
    oracle = np.array(candidates)[stable_exit(found.disagree[:, candidates])]
    budget = allowed_disagreements(found.questions, point)
    one_point = one_point_exit(found, oracle, candidates[0], budget)
    oracle_row = found.select(oracle).summary().iloc[0]
    one_point_row = found.select(one_point).summary().iloc[0]
    summary = found.summary()
    assert found.full_correct is not None  # multiple choice: always labelled
    frontier = cheapest_within(summary, float(found.full_correct.mean()), point)
    assert frontier is not None  # layer L is full depth, which is within any point of itself
    frontier_row = summary.loc[frontier]
    return {
        "checks": [int(layers[i]) for i in candidates],
        "num_layers": int(num_layers),
        "oracle": measures(oracle_row),
        "oracle_1pt": {
            **measures(one_point_row),
            "allowed_disagreements": budget,
            "moved_to_first_check": int((one_point != oracle).sum()),
        },
        "static_frontier": {
            "layer": int(layers[frontier]),
            **measures(frontier_row),
            **share_of_saving(
                float(frontier_row["compute_fraction"]), oracle_row["compute_fraction"]
            ),
        },
    }


def family_point(
    found: Outcomes, family: Family, decoder: str, oracle: dict[str, Any] | None, point: float
) -> dict[str, Any]:
    """A threshold family's cheapest threshold within `point` of full depth, and the share
    of its decoder's oracle saving it captures (`decoder`: the name it has in the file)."""
    assert found.full_correct is not None
    summary = found.summary()
    best = cheapest_within(summary, float(found.full_correct.mean()), point)
    head = {"family": family.label, "decoder": decoder}
    if best is None:
        why = f"no threshold is within {100 * point:g} point(s) of full depth"
        return {**head, "cheapest_within_point": None, "why_null": why}
    row = summary.loc[best]
    chosen = {"threshold": json_number(family.thresholds[best]), **measures(row)}
    if family.signal.measure is Confidence.PATIENCE:  # its threshold is -patience
        chosen = {"patience": int(-family.thresholds[best]), **chosen}
    if oracle is None:
        chosen |= {"share_of_oracle_saving": None, "why_null": "no oracle for its decoder"}
    else:
        chosen |= share_of_saving(float(row["compute_fraction"]), oracle["compute_fraction"])
    return {**head, "cheapest_within_point": chosen}


# --- a sweep's oracle file -------------------------------------------------------------------
def _full_depth(found: Outcomes, num_layers: int) -> dict[str, Any]:
    assert found.full_correct is not None
    return {
        "accuracy": float(found.full_correct.mean()),
        "compute_fraction": 1.0,
        "mean_exit_layer": float(num_layers),
    }


def task_oracle(
    records: list[Record],
    layout: Layout,
    plan: OraclePlan,
    answers: MultipleChoice,
    family_exits: dict[Family, np.ndarray],
    family_extra: dict[Family, np.ndarray] | None = None,
) -> dict[str, Any]:
    """One task's oracle entry: per decoder, then per threshold family (`family_exits`:
    each family's exit indices for these records; `family_extra`: its confidence
    decoder's block-token passes, `ExitRule.extra_passes`)."""
    predict, per_question = answers.rules()
    values: dict[tuple, np.ndarray | None] = {}

    def score(instances: list[Instance]) -> np.ndarray | None:
        """The metric of each choice, once per question (lm-eval's `process_results`)."""
        key = (instances[0].task_name, instances[0].doc_id)
        if key not in values:
            values[key] = per_question(instances)
        return values[key]

    decoders = []
    found = None
    by_decoding: dict[Decoding, tuple[str, dict[str, Any]]] = {}
    for decoder in plan.decoders:
        layers = np.array(layout.layers(decoder.decoding))
        exits = fixed_exits(len(records), layers)
        found = tally(
            records, layout, decoder.decoding, layers, exits, layers.astype(float), predict, score
        )
        entry = decoder_oracle(found, list(layers), plan.checks, plan.point)
        by_decoding.setdefault(decoder.decoding, (decoder.name, entry["oracle"]))
        decoders.append({"decoder": decoder.name, "label": decoder.label, **entry})
        logger.info(
            "oracle (%s) on %s: compute %.4f at mean exit layer %.2f; static frontier layer %d "
            "(compute %.4f)", decoder.label, records[0][0].task_name,
            entry["oracle"]["compute_fraction"], entry["oracle"]["mean_exit_layer"],
            entry["static_frontier"]["layer"], entry["static_frontier"]["compute_fraction"],
        )  # fmt: skip
    rules = []
    for family in plan.families:
        grid = np.asarray(family.thresholds, dtype=np.float64)
        checks = plan.checks or ()
        rule = ExitRule(layout, family.signal, checks, family.decoding)
        found_rule = tally(
            records,
            layout,
            family.decoding,
            rule.layers,
            family_exits[family],
            grid,
            predict,
            score,
            None if family_extra is None else family_extra[family],
        )
        name, oracle = by_decoding.get(family.decoding, (family.decoding.label, None))
        rules.append(family_point(found_rule, family, name, oracle, plan.point))
    assert found is not None  # a plan has at least one decoder
    return {
        "questions": found.questions,
        "full_depth": _full_depth(found, layout.num_layers),
        "decoders": decoders,
        "rules": rules,
    }


def _skip_reason(task: Any, records: list[Record]) -> str | None:
    if task.OUTPUT_TYPE != "multiple_choice":
        return f"a {task.OUTPUT_TYPE} task: the oracle needs multiple-choice answers to agree on"
    if not records:
        return "no questions were scored"
    return None


def sweep_oracle(
    records: Sequence[Record], layout: Layout, plan: OraclePlan, tasks: dict[str, Any]
) -> dict[str, Any]:
    """The oracle file's content for a sweep: `records` are the requests it scored (its
    `QuestionTable`), `tasks` lm-eval's tasks by name."""
    if not plan.decoders:
        raise ValueError("an oracle plan needs at least one decoder")
    if plan.families and not plan.checks:
        raise ValueError("threshold families need the sweep's check layers")
    scored = [r for r in records if r[0].request_type == "loglikelihood"]
    # every task's requests reach the threshold rules in one call, as lm-eval batches them
    scores = [s for _, s in scored]
    rules = {f: ExitRule(layout, f.signal, plan.checks or (), f.decoding) for f in plan.families}
    family_exits = {
        f: rule.exit_index(scores, np.asarray(f.thresholds, dtype=np.float64))
        for f, rule in rules.items()
    }
    family_extra = {f: rules[f].extra_passes(scores, family_exits[f]) for f in plan.families}
    out: dict[str, Any] = {}
    for name in sorted(tasks):
        mine = [i for i, (request, _) in enumerate(scored) if request.task_name == name]
        reason = _skip_reason(tasks[name], mine)
        if reason is None:
            try:
                out[name] = task_oracle(
                    [scored[i] for i in mine], layout, plan, MultipleChoice({name: tasks[name]}),
                    {f: exits[mine] for f, exits in family_exits.items()},
                    {f: extra[mine] for f, extra in family_extra.items()},
                )  # fmt: skip
                continue
            except SweepError as err:  # e.g. a task scoring more requests than choices
                reason = str(err)
        logger.info("no oracle for %s: %s", name, reason)
        out[name] = {"skipped": reason}
    return {
        "definition": DEFINITION,
        "kind": plan.kind,
        "metric": METRIC,
        "within_point": plan.point,
        "tasks": out,
    }
