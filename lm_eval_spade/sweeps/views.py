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

from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

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
    requests (so every choice of a question exits together, as in `exiting.py`)."""

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
        s_index = self.layout.signals.index(self.signal)
        out = []
        for s, decider in zip(scores, deciders(scores), strict=True):
            u = decider.uncertainty[s_index]
            exit = next((k for k in self.checks if float(u[k]) <= self.threshold), None)
            made = [k for k in self.checks if exit is None or k <= exit]
            layer = self.layout.num_layers if exit is None else exit
            c = self.layout.column(self.decoding, layer)
            confidence = float(s.uncertainty[s_index][made[-1]]) if made else None
            checks = len(made) * s.positions
            exit_record = RequestExit(layer, confidence, float(s.passes[c]), s.passes_full, checks)
            out.append((c, exit_record))
        return out

    def settings(self) -> dict[str, Any]:
        source = self.signal.source
        args = {
            "threshold": self.threshold,
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
