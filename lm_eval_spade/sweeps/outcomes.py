"""Every candidate threshold's outcome per question, from one layer-wise pass.

A sweep's `ScoreTable` holds each request's scores in every column and its uncertainty
at every check layer. For a threshold T, SPADE-EXIT's request exits at the first check
where its decider's uncertainty is at most T (as `views.ThresholdExit`), and answers from
the SPADE column there. This module does that for all candidates at once and keeps, per
question (a document of a task, or a prompt) and candidate:

- whether the exit's answer differs from the full model's (the disagreement);
- the task's metric for the exit's answer (lm-eval's own `process_results`), when the
  question has a label;
- the exit layers and block-token passes of its requests.

Rows (questions) add up, so any subset of questions (a calibration split, a random
half for the benchmark) is summarised by sums over its rows, with no rescoring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from lm_eval.api.instance import Instance

from lm_eval_spade.sweeps.model import RequestScores
from lm_eval_spade.sweeps.spec import Decoding, Layout, Signal
from lm_eval_spade.sweeps.views import check_uncertainties, confidence_passes

#: A question's requests (in `idx` order) and their loglikelihoods and greedy flags at
#: each candidate's exit, `[requests, candidates]` -> the answer under each candidate.
Predict = Callable[[list[Instance], np.ndarray, np.ndarray], np.ndarray]
#: A question's requests -> the metric's value for each possible answer (None: no label).
Score = Callable[[list[Instance]], np.ndarray | None]


@dataclass
class ExitRule:
    """What decides and what decodes: the signal, its check layers, the decoding."""

    layout: Layout
    signal: Signal
    checks: tuple[int, ...]
    decoding: Decoding

    @property
    def layers(self) -> np.ndarray:
        """Exit layer of each exit index: the checks, then L (no check passed)."""
        return np.array([*self.checks, self.layout.num_layers])

    def exit_index(self, scores: Sequence[RequestScores], thresholds: np.ndarray) -> np.ndarray:
        """`[requests, candidates]`: index into `layers` where each request exits."""
        u = check_uncertainties(self.layout, self.signal, self.checks, scores)
        passed = u[:, None, :] <= thresholds[None, :, None]
        return np.where(passed.any(-1), passed.argmax(-1), len(self.checks))

    def extra_passes(self, scores: Sequence[RequestScores], exits: np.ndarray) -> np.ndarray:
        """`[requests, candidates]`: the confidence decoder's block-token passes up to each
        exit (answer-level signals decoded with SPADE; else 0), `views.confidence_passes`."""
        return confidence_passes(
            self.layout, self.signal, self.checks, self.decoding, scores, exits
        )


@dataclass
class Outcomes:
    """Per question and candidate threshold (`[questions, candidates]` arrays)."""

    thresholds: np.ndarray
    disagree: np.ndarray  # bool
    correct: np.ndarray | None  # float: the metric of the exit's answer
    full_correct: np.ndarray | None  # [questions]: the metric at full depth
    exit_layers: np.ndarray  # float: summed over the question's requests
    passes: np.ndarray  # float: block-token passes run, summed over its requests
    requests: np.ndarray  # [questions]
    passes_full: np.ndarray  # [questions]
    request_layers: np.ndarray  # [requests, candidates]: each request's exit layer
    request_question: np.ndarray  # [requests]: the question (row) it belongs to
    keys: list[tuple]  # each row's question: (task, doc_id), sorted

    def histogram(self, candidate: int, rows: np.ndarray | None = None) -> dict[str, int]:
        """Requests per exit layer under one candidate (as spade-exit's results count)."""
        layers = self.request_layers[:, candidate]
        if rows is not None:
            layers = layers[np.isin(self.request_question, rows)]
        values, counts = np.unique(layers, return_counts=True)
        return {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}

    @property
    def questions(self) -> int:
        return len(self.requests)

    def select(self, choice: np.ndarray) -> Outcomes:
        """One candidate per question (`choice[q]`, e.g. an oracle's exit) as a single
        candidate, so `summary` counts it as it counts any threshold (its value: NaN)."""
        q = np.arange(self.questions)
        per_request = choice[self.request_question]
        return Outcomes(
            np.array([np.nan]),
            self.disagree[q, choice][:, None],
            None if self.correct is None else self.correct[q, choice][:, None],
            self.full_correct,
            self.exit_layers[q, choice][:, None],
            self.passes[q, choice][:, None],
            self.requests,
            self.passes_full,
            self.request_layers[np.arange(len(per_request)), per_request][:, None],
            self.request_question,
            self.keys,
        )

    def summary(self, rows: np.ndarray | None = None) -> pd.DataFrame:
        """One row per candidate over the questions `rows` (default all): disagreement,
        accuracy (and its drop from full depth), mean exit layer, compute fraction."""
        take = slice(None) if rows is None else rows
        n = len(self.requests[take])
        disagreements = self.disagree[take].sum(axis=0)
        table = pd.DataFrame(
            {
                "threshold": self.thresholds,
                "questions": n,
                "disagreements": disagreements.astype(int),
                "disagreement": disagreements / n,
                "mean_exit_layer": self.exit_layers[take].sum(axis=0) / self.requests[take].sum(),
                "compute_fraction": self.passes[take].sum(axis=0) / self.passes_full[take].sum(),
            }
        )
        if self.correct is not None and self.full_correct is not None:
            accuracy = self.correct[take].mean(axis=0)
            table.insert(4, "accuracy", accuracy)
            table.insert(5, "accuracy_drop", self.full_correct[take].mean() - accuracy)
        return table


def outcomes(
    records: Sequence[tuple[Instance, RequestScores]],
    rule: ExitRule,
    thresholds: Sequence[float],
    predict: Predict,
    score: Score,
) -> Outcomes:
    """Every candidate's outcome for every question among `records` (each request with
    its scores; a question is a (task, document) and holds all its requests)."""
    grid = np.asarray(thresholds, dtype=np.float64)
    scores = [s for _, s in records]
    exits = rule.exit_index(scores, grid)
    extra = rule.extra_passes(scores, exits)
    return tally(
        records, rule.layout, rule.decoding, rule.layers, exits, grid, predict, score, extra
    )


def fixed_exits(requests: int, layers: Sequence[int]) -> np.ndarray:
    """`[requests, candidates]` exit indices of static exits: candidate k exits every
    request at `layers[k]` (what `views.FixedExit` at that layer does), for `tally`."""
    return np.tile(np.arange(len(layers)), (requests, 1))


def tally(
    records: Sequence[tuple[Instance, RequestScores]],
    layout: Layout,
    decoding: Decoding,
    layers: np.ndarray,
    exits: np.ndarray,
    candidates: np.ndarray,
    predict: Predict,
    score: Score,
    extra_passes: np.ndarray | None = None,
) -> Outcomes:
    """Per question, the outcome of exiting each request at `layers[exits[r, c]]` and
    decoding it with `decoding` there, for every candidate c (`candidates` are their
    values: thresholds, or layers for static exits). Answers are compared with the same
    decoding at layer L, the full model; passes are the column's, as the sweep's views
    count a fixed or threshold exit there, plus `extra_passes[r, c]` (a SPADE confidence
    decoder's, `ExitRule.extra_passes`)."""
    scores = [s for _, s in records]
    columns = np.array([layout.column(decoding, int(layer)) for layer in layers])
    full = layout.column(decoding, layout.num_layers)
    loglik = np.array([s.loglik.double().numpy() for s in scores]).reshape(len(scores), -1)
    greedy = np.array([s.greedy.numpy() for s in scores]).reshape(len(scores), -1)
    passes = np.array([s.passes.double().numpy() for s in scores]).reshape(len(scores), -1)
    rows = np.arange(len(scores))[:, None]
    # the candidates' exits, then full depth as one more column
    at = np.concatenate([columns[exits], np.full((len(scores), 1), full)], axis=1)

    groups: dict[tuple, list[int]] = {}
    for i, (request, _) in enumerate(records):
        groups.setdefault((request.task_name, request.doc_id), []).append(i)
    groups = dict(sorted(groups.items(), key=lambda item: (str(item[0][0]), item[0][1])))
    n_q, n_c = len(groups), len(candidates)
    disagree = np.zeros((n_q, n_c), dtype=bool)
    correct = np.zeros((n_q, n_c))
    full_correct = np.zeros(n_q)
    labelled = True
    exit_layers = np.zeros((n_q, n_c))
    passes_run = np.zeros((n_q, n_c))
    requests = np.zeros(n_q)
    passes_full = np.zeros(n_q)
    question = np.zeros(len(scores), dtype=np.int64)
    for q, members in enumerate(groups.values()):
        question[members] = q
        members.sort(key=lambda i: records[i][0].idx)
        instances = [records[i][0] for i in members]
        answers = predict(
            instances, loglik[rows[members], at[members]], greedy[rows[members], at[members]]
        )
        disagree[q] = answers[:-1] != answers[-1]
        values = score(instances)
        if values is None:
            labelled = False
        else:
            correct[q], full_correct[q] = values[answers[:-1]], values[answers[-1]]
        exit_layers[q] = layers[exits[members]].sum(axis=0)
        passes_run[q] = passes[rows[members], columns[exits[members]]].sum(axis=0)
        if extra_passes is not None:
            passes_run[q] += extra_passes[members].sum(axis=0)
        requests[q] = len(members)
        passes_full[q] = sum(scores[i].passes_full for i in members)
    return Outcomes(
        candidates,
        disagree,
        correct if labelled else None,
        full_correct if labelled else None,
        exit_layers,
        passes_run,
        requests,
        passes_full,
        layers[exits],
        question,
        list(groups),
    )


def concatenate(parts: Sequence[Outcomes], labels: Sequence[str]) -> Outcomes:
    """The questions of several passes (e.g. two splits of a task) as one set; each
    question's key gets its part's label first, since document ids repeat across splits."""
    first = parts[0]
    for part in parts[1:]:
        if not np.array_equal(part.thresholds, first.thresholds):
            raise ValueError("outcomes of different candidate thresholds cannot be joined")
    labelled = all(p.correct is not None for p in parts)
    offsets = np.cumsum([0, *(p.questions for p in parts[:-1])])
    return Outcomes(
        first.thresholds,
        np.concatenate([p.disagree for p in parts]),
        np.concatenate([p.correct for p in parts]) if labelled else None,
        np.concatenate([p.full_correct for p in parts]) if labelled else None,
        np.concatenate([p.exit_layers for p in parts]),
        np.concatenate([p.passes for p in parts]),
        np.concatenate([p.requests for p in parts]),
        np.concatenate([p.passes_full for p in parts]),
        np.concatenate([p.request_layers for p in parts]),
        np.concatenate([p.request_question + o for p, o in zip(parts, offsets, strict=True)]),
        [(label, *key) for p, label in zip(parts, labels, strict=True) for key in p.keys],
    )
