"""`LayerwiseLM`: spade-exit scoring every request at every layer in one pass.

It is `SpadeExitLM` (so HFLM's tokenization, sorting, grouping of one-token answers,
batching, left truncation and rolling windows are the same code), but each batch goes
through `scoring.score_layers` and every request's answer is a `RequestScores`: its
loglikelihood and greedy flag in every column, what a fixed exit at each column would
cost, and its uncertainties at every layer. Sweeps read single columns, or columns
chosen per request by an exit rule, out of these (`views.py`).

`reference=True` makes it plain HFLM (full depth), for timing one full-depth run of the
same requests in the same process.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.utils import Collator
from lm_eval.models.utils_hf import pad_and_concat

from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.decoders import DecoderKind, SpadePositions, SpadeStart
from lm_eval_spade.finite import NonFiniteError
from lm_eval_spade.lens import Lens, LensCheckpointError, LensKind, load_lens
from lm_eval_spade.model import SpadeExitLM, TokenRequest
from lm_eval_spade.sweeps.scoring import score_layers
from lm_eval_spade.sweeps.spec import Decoding, Layout, Signal, SweepError


@dataclass
class RequestScores:
    """One request in every column (a loglikelihood request, or a rolling document).

    `passes` is this request's share of what its forward(s) cost for a fixed exit at
    each column; `passes_full` of a full-depth run. `uncertainty` is `[signals, L]` at
    the decision position(s); `positions` how many positions one check computes (its
    share). `context` keys SPADE-EXIT's per-context decision (None for rolling
    documents, which decide alone) and `order` says which row was scored first, as
    `exiting.py` lets the first decide.
    """

    loglik: torch.Tensor
    greedy: torch.Tensor
    passes: torch.Tensor
    passes_full: float
    uncertainty: torch.Tensor
    positions: float
    context: tuple[int, ...] | None
    order: int
    windows: int = 1
    scored: float = 0.0  # positions scored (continuation tokens), this request's share

    def __add__(self, other: RequestScores) -> RequestScores:
        """Windows of one rolling document: scores and costs add up; the first window's
        uncertainty stands for the document (as spade-exit reports it)."""
        return RequestScores(
            self.loglik + other.loglik,
            self.greedy & other.greedy,
            self.passes + other.passes,
            self.passes_full + other.passes_full,
            self.uncertainty,
            self.positions + other.positions,
            self.context,
            self.order,
            self.windows + other.windows,
            self.scored + other.scored,
        )

    def __radd__(self, other: Any) -> RequestScores:
        if isinstance(other, int) and other == 0:  # `sum()` starts from 0
            return self
        return NotImplemented


class LayerwiseLM(SpadeExitLM):
    """Scores requests in every column of a `Layout`; see the module doc."""

    def __init__(
        self,
        pretrained: Any,
        decodings: Sequence[Decoding],
        signals: Sequence[Signal] = (),
        lenses: dict[str, str] | None = None,
        spade_positions: SpadePositions = SpadePositions.ORIGINAL,
        spade_start: SpadeStart = SpadeStart.PAIR,
        **hf_args: Any,
    ) -> None:
        super().__init__(pretrained=pretrained, **hf_args)
        self.arch = architecture_for(self.model)
        self.lenses = {name: self._load(name, path) for name, path in (lenses or {}).items()}
        for decoding in [*decodings, *(s.source for s in signals)]:
            self._check_decoding(decoding)
        self.layout = Layout.build(
            decodings,
            signals,
            self.arch.num_layers,
            {name: lens.layers for name, lens in self.lenses.items()},
        )
        self.spade_positions = spade_positions
        self.spade_start = spade_start
        #: Seconds spent per part of scoring (prefix, each decoding, each confidence source).
        self.timer: Counter[str] = Counter()
        self.reference = False
        self._rows_scored = 0

    def _load(self, name: str, path: str) -> Lens:
        assert self.arch is not None
        try:
            return load_lens(path, self.arch)
        except LensCheckpointError as err:
            raise SweepError(f"lens {name} ({path}): {err}") from err

    def scores(self, reqtype: str, requests: list[Instance]) -> list[RequestScores]:
        """`RequestScores` of `loglikelihood` or `loglikelihood_rolling` requests."""
        answers = getattr(self, reqtype)(requests)
        return [a[0] if isinstance(a, tuple) else a for a in answers]

    def _check_decoding(self, decoding: Decoding) -> None:
        if not decoding.kind.needs_lens:
            return
        lens = self.lenses.get(decoding.lens or "")
        if lens is None:
            raise SweepError(
                f"decoder {decoding.kind.value} needs a trained lens of that kind: pass one "
                f"with --lens DIR (`lm-eval-spade train-lens --kind {decoding.kind.value}`)."
            )
        if LensKind(lens.config.kind) is not LensKind(decoding.kind.value):
            raise SweepError(
                f"lens {decoding.lens} is a {lens.config.kind} lens, not {decoding.kind.value}."
            )

    @property
    def _delegates(self) -> bool:
        return self.reference

    @property
    def _keeps_start(self) -> bool:
        """Always (unless add_bos_token=False): the reference run scores the same tokens."""
        return self.add_bos_token is not False

    def _desc(self) -> str:
        return f"Scoring {len(self.layout.columns)} layer x decoder columns"

    def _request_exits(self, requests: list[Instance], rolling: bool) -> list[Any]:
        return []  # a sweep's costs are per column, inside each RequestScores

    def _record(self, requests: list[Instance], exits: list[Any]) -> None:
        return None

    def _check_finite(self, requests: list[Instance], results: list[Any]) -> None:
        """A NaN or infinite score in any column is an error, never a metric."""
        for req, answer in zip(requests, results, strict=True):
            scores = answer[0] if isinstance(answer, tuple) else answer
            if isinstance(scores, RequestScores) and not bool(scores.loglik.isfinite().all()):
                bad = [
                    f"{d.label} at layer {layer}"
                    for (d, layer), v in zip(
                        self.layout.columns, scores.loglik.tolist(), strict=True
                    )
                    if not math.isfinite(v)
                ]
                raise NonFiniteError(
                    f"doc {req.doc_id} of task {req.task_name} scored a non-finite value with "
                    f"{', '.join(bad[:3])}; no metric is computed from it. Likely cause: the "
                    "model or a lens overflows (try dtype=float32) or holds non-finite weights."
                )

    def _loglikelihood_tokens(
        self,
        requests: list[TokenRequest],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[Any]:
        if self.reference:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        return [answer for answer, _ in self._score_in_order(requests, disable_tqdm, override_bs)]

    def _score_chunk(
        self, chunk: Sequence[TokenRequest], re_ord: Collator, decided: dict
    ) -> Iterator[tuple[tuple[RequestScores, bool], None]]:
        """Yield `(RequestScores, False)` for every request the chunk's forwards serve
        (lm-eval's loglikelihood shape; the greedy flags are inside, per column)."""
        assert self.arch is not None
        inputs, cont_lens = self._chunk_inputs(chunk)
        input_lens = [len(t) for t in inputs]
        placeholder = torch.zeros(1, 1, 1)
        hits = [
            list(re_ord.get_cache(req_str=s, cxt_toks=c, cont_toks=k, logits=placeholder))
            for s, c, k in chunk
        ]
        ids = pad_and_concat(max(input_lens), list(inputs), padding_side="right")
        if any(d.kind is DecoderKind.SPADE for d in self.layout.decodings()):
            self._check_start_tokens(ids[:, 0].tolist(), DecoderKind.SPADE)
        with self._inference():
            rows = score_layers(
                self.arch,
                self.layout,
                self.lenses,
                ids,
                input_lens,
                cont_lens,
                [[hit_cont for _, hit_cont, _ in row_hits] for row_hits in hits],
                self._rolling,
                self.spade_positions,
                self.softmax_dtype,
                self.timer,
                self.spade_start,
            )
        for r, (row, row_hits) in enumerate(zip(rows, hits, strict=True)):
            share = 1.0 / len(row_hits)
            answer = int(input_lens[r] - cont_lens[r])
            context = None if self._rolling else tuple(ids[r, : answer + 1].tolist())
            for h in range(len(row_hits)):
                scores = RequestScores(
                    row.loglik[h],
                    row.greedy[h],
                    row.passes * share,
                    self.arch.num_layers * input_lens[r] * share,
                    row.uncertainty,
                    row.positions * share,
                    context,
                    self._rows_scored,
                    scored=cont_lens[r] * share,
                )
                yield (scores, False), None
            self._rows_scored += 1
