"""lm-eval models that answer from layer-wise scores under one exit rule.

`ScoreTable` scores each request once in every column (`LayerwiseLM`), timing it and,
for comparison, one full-depth run of the same requests. A `ScoresView` is an lm-eval
`LM` that answers every request from that table under a `Rule`: a fixed exit
(`FixedExit`: a column, as `exit_layer=K,decoder=D`) or SPADE-EXIT's threshold rule
(`ThresholdExit`, as `threshold=T,confidence=...`). lm-eval's own `evaluate` runs the
tasks against a view, so the metrics are lm-eval's, computed by its task code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

from lm_eval_spade.confidence import Confidence, choice_uncertainties
from lm_eval_spade.config import SpadeConfig
from lm_eval_spade.decoders import DecoderKind
from lm_eval_spade.stats import ExitStats, RequestExit
from lm_eval_spade.sweeps.model import LayerwiseLM, RequestScores
from lm_eval_spade.sweeps.spec import Decoding, Layout, Signal, SweepError


@dataclass
class ScoringCost:
    """What scoring a sweep's requests took, against one full-depth run of them."""

    seconds: float = 0.0
    full_depth_seconds: float = 0.0
    block_token_passes: float = 0.0
    full_depth_passes: float = 0.0
    separate_run_passes: float = 0.0  # what one spade-exit run per setting would take
    requests: int = 0
    scored_positions: float = 0.0  # continuation tokens (every position, rolling)
    parts: dict[str, float] = field(default_factory=dict)  # seconds per part of scoring

    @property
    def time_ratio(self) -> float:
        return self.seconds / self.full_depth_seconds if self.full_depth_seconds else math.nan

    @property
    def pass_ratio(self) -> float:
        return self.block_token_passes / self.full_depth_passes if self.full_depth_passes else 0.0

    @property
    def separate_ratio(self) -> float:
        """Fixed-exit runs of every column, one by one, over one full-depth run."""
        if not self.full_depth_passes:
            return 0.0
        return self.separate_run_passes / self.full_depth_passes

    def per_scored_position(self) -> tuple[float, float]:
        """Block-token passes and seconds the sweep spent beyond the full-depth run, per
        scored position: what decoding one continuation token in every column costs (the
        unit that matters for cloze tasks, whose continuations are many tokens long)."""
        n = self.scored_positions or math.nan
        seconds = self.seconds - self.full_depth_seconds if self.full_depth_seconds else math.nan
        return (self.block_token_passes - self.full_depth_passes) / n, seconds / n

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; a ratio without its base (no full-depth timing) is None, not NaN."""
        passes, seconds = self.per_scored_position()
        data = {
            "requests": self.requests,
            "scored_positions": self.scored_positions,
            "extra_passes_per_scored_position": passes,
            "extra_seconds_per_scored_position": seconds,
            "seconds": self.seconds,
            "full_depth_seconds": self.full_depth_seconds,
            "time_ratio": self.time_ratio,
            "block_token_passes": self.block_token_passes,
            "full_depth_block_token_passes": self.full_depth_passes,
            "pass_ratio": self.pass_ratio,
            "separate_runs_pass_ratio": self.separate_ratio,
        }
        data = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in data.items()
        }
        return {**data, "seconds_by_part": dict(self.parts)}


def sweep_passes(layout: Layout, scores: RequestScores) -> float:
    """Block-token passes scoring one request in every column took: the prefix through
    all L blocks once, plus each column's decoding above its layer."""
    prefix = scores.passes_full  # L * n, the request's share
    per_token = prefix / layout.num_layers
    decoding = sum(
        float(scores.passes[c]) - layer * per_token for c, (_, layer) in enumerate(layout.columns)
    )
    return prefix + decoding


class ScoreTable:
    """Every request's `RequestScores`, computed once; keyed by request type and args."""

    def __init__(self, lm: LayerwiseLM, time_full_depth: bool = True) -> None:
        self.lm = lm
        self.time_full_depth = time_full_depth
        self.cost = ScoringCost()
        self._scores: dict[tuple[str, tuple], RequestScores] = {}

    def scores(self, reqtype: str, requests: Sequence[Instance]) -> list[RequestScores]:
        new = {r.args: r for r in requests if (reqtype, r.args) not in self._scores}
        missing = list(new.values())
        if missing:
            self._compute(reqtype, missing)
        return [self._scores[(reqtype, r.args)] for r in requests]

    def _compute(self, reqtype: str, requests: list[Instance]) -> None:
        lm = self.lm
        start = time.perf_counter()
        fresh = lm.scores(reqtype, requests)
        self.cost.seconds += time.perf_counter() - start
        if self.time_full_depth:
            lm.reference = True
            try:
                start = time.perf_counter()
                getattr(lm, reqtype)(requests, disable_tqdm=True)
                self.cost.full_depth_seconds += time.perf_counter() - start
            finally:
                lm.reference = False
        for request, scores in zip(requests, fresh, strict=True):
            self._scores[(reqtype, request.args)] = scores
            self.cost.block_token_passes += sweep_passes(lm.layout, scores)
            self.cost.full_depth_passes += scores.passes_full
            self.cost.scored_positions += scores.scored
            self.cost.separate_run_passes += float(scores.passes.sum())
        self.cost.requests += len(requests)
        self.cost.parts = dict(lm.timer)


def deciders(scores: Sequence[RequestScores]) -> list[RequestScores]:
    """The request whose uncertainty decides each request's exit: the first-scored row of
    its context (so every choice of a question exits together, as in `exiting.py`);
    rolling documents (no context) decide alone."""
    first: dict[tuple[int, ...], RequestScores] = {}
    for s in scores:
        if s.context is not None and (s.context not in first or s.order < first[s.context].order):
            first[s.context] = s
    return [s if s.context is None else first[s.context] for s in scores]


def check_uncertainties(
    layout: Layout, signal: Signal, checks: Sequence[int], scores: Sequence[RequestScores]
) -> np.ndarray:
    """`[requests, checks]` float64: the uncertainty that decides each request's exit at
    each check, as `exiting.py` computes it.

    A vocabulary signal is its context's first-scored row's (`deciders`). An answer-level
    signal is its question's: the requests sharing its context (the choices) have their
    loglikelihoods in the signal's decoder's columns at the checks, and
    `confidence.choice_uncertainties` measures the softmax over them (patience counts
    from the first check)."""
    checks = list(checks)
    if not signal.answer_level:
        index = layout.signals.index(signal)
        rows = [d.uncertainty[index][checks].double().numpy() for d in deciders(scores)]
        return np.array(rows).reshape(len(scores), len(checks))
    columns = [layout.column(signal.source, k) for k in checks]
    questions: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(scores):
        if s.context is None:
            raise SweepError(
                f"{signal.measure.value} is over a question's choices, and perplexity "
                "(loglikelihood_rolling) documents have none; sweep it on multiple-choice tasks."
            )
        questions.setdefault(s.context, []).append(i)
    out = np.zeros((len(scores), len(checks)))
    if not checks:
        return out
    for members in questions.values():
        logliks = torch.stack([scores[i].loglik[columns] for i in members], dim=1)
        out[members] = choice_uncertainties(logliks, signal.measure).numpy()
    return out


def confidence_passes(
    layout: Layout,
    signal: Signal,
    checks: Sequence[int],
    decoding: Decoding,
    scores: Sequence[RequestScores],
    exits: np.ndarray,
) -> np.ndarray:
    """`[requests, candidates]`: the block-token passes the confidence decoder of an
    answer-level signal spends on each request at the checks made before its exit index
    `exits[r, c]` (as `exiting.py` counts them: decoding the request's scored positions at
    a check costs what its column there costs above the check; at the exit check too,
    unless that decoder is also the exit's, whose decoding is then reused). Zero for
    vocabulary signals (their checks are counted apart) and for decoders without blocks."""
    out = np.zeros(exits.shape)
    if not signal.answer_level or not checks:
        return out
    columns = [layout.column(signal.source, k) for k in checks]
    layers = np.array(checks, dtype=np.float64)
    per_check = np.array(
        [s.passes[columns].double().numpy() - layers * s.passes_full / layout.num_layers
         for s in scores]
    ).reshape(len(scores), len(checks))  # fmt: skip
    before = np.concatenate([np.zeros((len(scores), 1)), per_check.cumsum(axis=1)], axis=1)
    out = np.take_along_axis(before, exits, axis=1)
    if signal.source != decoding:
        at_exit = np.concatenate([per_check, np.zeros((len(scores), 1))], axis=1)
        out = out + np.take_along_axis(at_exit, exits, axis=1)
    return out


class Rule(Protocol):
    """Which column answers each request, and what that exit cost."""

    def choose(self, scores: Sequence[RequestScores]) -> list[tuple[int, RequestExit]]: ...

    def settings(self) -> dict[str, Any]:
        """The spade-exit model_args that give the same results in one lm-eval run."""
        ...


@dataclass(frozen=True)
class FixedExit:
    """Every request exits at `layer` and is decoded by `decoding` (`exit_layer=layer`)."""

    layout: Layout
    decoding: Decoding
    layer: int
    lens_path: str | None = None

    def choose(self, scores: Sequence[RequestScores]) -> list[tuple[int, RequestExit]]:
        c = self.layout.column(self.decoding, self.layer)
        return [
            (c, RequestExit(self.layer, None, float(s.passes[c]), s.passes_full)) for s in scores
        ]

    def settings(self) -> dict[str, Any]:
        args = {"exit_layer": self.layer, "decoder": self.decoding.kind.value}
        return {**args, **({"lens": self.lens_path} if self.lens_path else {})}


@dataclass(frozen=True)
class ThresholdExit:
    """SPADE-EXIT: exit at the first check where `signal` is at most `threshold` nats,
    decode there with `decoding`; a context's first-scored row decides for all of its
    requests (so every choice of a question exits together, as in `exiting.py`), or for
    an answer-level signal, all of its choices together. The patience rule's threshold is
    `-patience` (`confidence.py`)."""

    layout: Layout
    signal: Signal
    threshold: float
    decoding: Decoding
    checks: tuple[int, ...]
    interval: int
    min_layer: int
    lens_path: str | None = None

    def choose(self, scores: Sequence[RequestScores]) -> list[tuple[int, RequestExit]]:
        if any(s.windows > 1 for s in scores):
            raise SweepError(
                "threshold sweeps decide per window, and a document here spans several "
                "windows; raise max_length in --model-args above the longest document."
            )
        answer_level = self.signal.answer_level
        s_index = None if answer_level else self.layout.signals.index(self.signal)
        u = check_uncertainties(self.layout, self.signal, self.checks, scores)
        passed = u <= self.threshold
        exits = np.where(passed.any(axis=1), passed.argmax(axis=1), len(self.checks))
        extra = confidence_passes(
            self.layout, self.signal, self.checks, self.decoding, scores, exits[:, None]
        )[:, 0]
        out = []
        for r, s in enumerate(scores):
            e = int(exits[r])
            made = self.checks[: e + 1]
            layer = self.layout.num_layers if e == len(self.checks) else self.checks[e]
            c = self.layout.column(self.decoding, layer)
            confidence = None
            if made:  # the request's own uncertainty (its question's, answer-level)
                own = u[r] if s_index is None else s.uncertainty[s_index][list(made)]
                confidence = float(own[len(made) - 1])
            checks = len(made) * (s.scored if answer_level else s.positions)
            passes = float(s.passes[c]) + float(extra[r])
            out.append((c, RequestExit(layer, confidence, passes, s.passes_full, checks)))
        return out

    def settings(self) -> dict[str, Any]:
        source = self.signal.source
        args: dict[str, Any] = {"threshold": self.threshold}
        if self.signal.measure is Confidence.PATIENCE:  # its threshold is -patience
            args = {"patience": int(-self.threshold)}
        args |= {
            "interval": self.interval,
            "min_layer": self.min_layer,
            "confidence": self.signal.measure.value,
            "confidence_decoder": source.kind.value,
            "decoder": self.decoding.kind.value,
        }
        return {**args, **({"lens": self.lens_path} if self.lens_path else {})}


class ScoresView(LM):
    """An lm-eval model answering from a `ScoreTable` under a `Rule`."""

    def __init__(self, table: ScoreTable, rule: Rule) -> None:
        super().__init__()
        self.table = table
        self.rule = rule
        self.exits: list[tuple[str, RequestExit]] = []

    def _answer(self, reqtype: str, requests: list[Instance]) -> list[tuple[float, bool]]:
        scores = self.table.scores(reqtype, requests)
        chosen = self.rule.choose(scores)
        answers = []
        for request, s, (c, exit) in zip(requests, scores, chosen, strict=True):
            self.exits.append((request.task_name or "unknown", exit))
            answers.append((float(s.loglik[c]), bool(s.greedy[c])))
        return answers

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list:
        return self._answer("loglikelihood", requests)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list:
        return [ll for ll, _ in self._answer("loglikelihood_rolling", requests)]

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list:
        tasks = sorted({r.task_name or "?" for r in requests})
        raise SweepError(
            f"task(s) {', '.join(tasks)} generate text (generate_until); sweeps score "
            "loglikelihood tasks (multiple choice) and loglikelihood_rolling tasks (perplexity)."
        )

    def exit_stats(self) -> dict[str, ExitStats]:
        stats: dict[str, ExitStats] = {}
        for task, exit in self.exits:
            stats.setdefault(task, ExitStats(self.table.lm.layout.num_layers)).add(exit)
        return stats

    def spade_info(self) -> dict[str, Any]:
        """`config.spade` as `lm_eval --model spade-exit` with `rule.settings()` writes it."""
        from lm_eval_spade import __version__

        lm = self.table.lm
        config = SpadeConfig.from_model_args(
            **self.rule.settings(), spade_positions=lm.spade_positions.value
        )
        if config.decoder is DecoderKind.SPADE:
            config = replace(config, spade_start=lm.spade_start)
        return {
            "package_version": __version__,
            "config": config.to_dict(),
            "num_layers": self.table.lm.layout.num_layers,
            "tasks": {task: s.to_dict() for task, s in sorted(self.exit_stats().items())},
        }
