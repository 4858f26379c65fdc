"""`spade-exit`: lm-eval's HF model, scoring through the decoders and exits of `docs/method.md`.

With no spade setting (or `threshold=-inf`, which no request can pass) it *is* `HFLM`:
every request goes through HFLM's own code, so results equal `--model hf` exactly.
Otherwise `_loglikelihood_tokens` (which both `loglikelihood` and
`loglikelihood_rolling` go through) runs each batch block by block (`exiting.py`): rows
leave the batch at a fixed `exit_layer`, or where their confidence passes `threshold`,
and only their scored positions are decoded. HFLM's batching, sorting, truncation and
one-forward-per-context grouping for one-token continuations are kept.

`generate_until` keeps HFLM's batching, truncation, stop sequences and post-processing;
`_model_generate`, where HFLM calls `model.generate`, runs `generation.py` instead: every
new token exits on its own, with the KV strategy of `kv_cache.py` above its exit.

Every request's exit is recorded (and gathered across processes under `accelerate
launch`), for the per-task statistics in the results JSON and for `exit_log`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from lm_eval.models.utils_hf import pad_and_concat, stop_sequences_criteria
from tqdm import tqdm
from transformers import EosTokenCriteria, MaxLengthCriteria

from lm_eval_spade import __version__, answer_cache, calibration
from lm_eval_spade._startup import lm_eval_output
from lm_eval_spade.architectures import Architecture, architecture_for
from lm_eval_spade.config import SPADE_MODEL_ARGS, SpadeArgumentError, SpadeConfig
from lm_eval_spade.decoders import DecoderKind, SpadePositions
from lm_eval_spade.exiting import ExitPlan, RowExit, score_rows
from lm_eval_spade.files import check_output_file
from lm_eval_spade.finite import NonFiniteError
from lm_eval_spade.generation import GenerationPlan, RowRecord, generate
from lm_eval_spade.kv_cache import KVStrategy
from lm_eval_spade.lens import Lens, LensCheckpointError, LensKind, load_lens
from lm_eval_spade.lens.targets import start_token_id
from lm_eval_spade.loading import (
    check_adapter_path,
    check_adapter_weights,
    check_model_path,
    hub_load_error,
)
from lm_eval_spade.model_args import check_model_args
from lm_eval_spade.sampling import Sampling
from lm_eval_spade.start_token import cut_after_start, rolling_windows, with_start
from lm_eval_spade.stats import ExitStats, RequestExit

logger = logging.getLogger(__name__)

TokenRequest = tuple[tuple[str, str], list[int], list[int]]


def _sort_key(req: TokenRequest) -> tuple[int, tuple[int, ...]]:
    """HFLM's order: longest first, so each batch's first row sets its padded length."""
    toks = req[1] + req[2]
    return -len(toks), tuple(toks)


def _group_key(req: TokenRequest) -> list[int]:
    """HFLM's grouping: one forward serves every continuation sharing ctx + cont[:-1]."""
    return req[-2] + req[-1][:-1]


def _question_sort_key(req: TokenRequest) -> tuple[int, tuple[int, ...], int, tuple[int, ...]]:
    """Answer-level exits: a question's choices (requests sharing a context) next to each
    other, longest contexts first, then HFLM's order within the question."""
    toks = req[1] + req[2]
    return -len(req[1]), tuple(req[1]), -len(toks), tuple(toks)


def _whole_questions(
    items: Iterator[Sequence[TokenRequest]], batch_size: int
) -> Iterator[list[TokenRequest]]:
    """Batches of at most `batch_size` forwards that never split a question (one larger
    than `batch_size` is a batch of its own): its choices decide together."""
    batch: list[TokenRequest] = []
    question: list[TokenRequest] = []
    for item in (x for chunk in items for x in chunk):
        if question and item[1] != question[0][1]:
            if batch and len(batch) + len(question) > batch_size:
                yield batch
                batch = []
            batch += question
            question = []
        question.append(item)
    if batch and len(batch) + len(question) > batch_size:
        yield batch
        batch = []
    if batch or question:
        yield batch + question


def _first_occurrences(requests: list[Instance]) -> tuple[list[Instance], list[int]]:
    """Distinct Instances, and for each request the index of its distinct one.

    lm-eval evens out the ranks of a multi-process run by repeating an Instance object;
    scoring it once keeps it out of the exit statistics and saves the work.
    """
    first: dict[int, int] = {}
    unique: list[Instance] = []
    index = []
    for req in requests:
        if id(req) not in first:
            first[id(req)] = len(unique)
            unique.append(req)
        index.append(first[id(req)])
    return unique, index


def _by_gen_kwargs(requests: list[Instance]) -> list[list[int]]:
    """Indices of the requests, grouped by their generation kwargs (in first-seen order)."""
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
        key = json.dumps(req.args[1], sort_keys=True, default=str)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _is_exit_log(path: Path) -> bool:
    """Whether `path` is an exit log spade-exit wrote (a JSON line per request)."""
    with path.open(errors="replace") as f:
        line = f.readline()
    try:
        return "exit_layer" in json.loads(line)
    except (ValueError, TypeError):
        return False


def _generation_exit(row: RowRecord) -> RequestExit:
    first = row.exit_layers[0] if row.exit_layers else 0
    return RequestExit(
        first,
        row.confidence,
        row.passes_run,
        row.passes_full,
        row.checks,
        list(row.exit_layers),
        row.kv_projections,
    )


@register_model("spade-exit")
class SpadeExitLM(HFLM):
    """HFLM whose scored positions are decoded from an intermediate layer, fixed or
    chosen per request by SPADE-EXIT.

    Accepts every HFLM model_arg, plus the settings of `SpadeConfig`.
    """

    def __init__(self, pretrained: Any = calibration.NAME, **kwargs: Any) -> None:
        if isinstance(pretrained, str):
            pretrained = calibration.resolve_model(pretrained)
            check_model_path(pretrained, "pretrained=")
        if kwargs.get("peft"):
            check_adapter_path(str(kwargs["peft"]), "peft=")
        check_model_args(pretrained, kwargs)
        spade_args = {k: kwargs.pop(k) for k in list(kwargs) if k in SPADE_MODEL_ARGS}
        self.spade = SpadeConfig.from_model_args(**spade_args)
        #: kv_strategy as given (not defaulted): said once to have no effect on scoring.
        self._kv_given = self.spade.kv_strategy if "kv_strategy" in spade_args else None
        self._model_args = {"pretrained": pretrained, **kwargs}  # for `answer_cache`
        try:
            super().__init__(pretrained=pretrained, **kwargs)
        except OSError as err:
            if not isinstance(pretrained, str) or Path(pretrained).is_dir():
                raise
            raise hub_load_error(pretrained, err) from err
        if kwargs.get("peft"):
            check_adapter_weights(self.model, str(kwargs["peft"]))
        self._shard_cpu_processes()
        self.arch: Architecture | None = None
        self.lens: Lens | None = None
        self.plan: ExitPlan | None = None
        if self.spade.active:
            if self.backend != "causal":
                raise SpadeArgumentError(
                    "spade-exit decodes decoder-only (causal) models; this model loaded as "
                    f"{self.backend}. Drop backend=seq2seq or the exit settings."
                )
            self.arch = architecture_for(self.model)
            self.spade.check_layers(self.arch.num_layers)
            self._check_fill_positions()
            if self.spade.lens is not None:
                self.lens = self._load_lens()
            self.plan = self._exit_plan()
        lm_eval_output.install_sample_exits()  # exits in --log_samples and in the log
        #: Every request scored so far (all processes), with its task, doc and exit.
        self.exits: list[dict[str, Any]] = []
        self._row_exits: list[RequestExit] = []
        self._rolling = False
        self._exit_log = self._start_exit_log()
        #: generate_until: per context string, the exits of the rows generated for it.
        self._generated: dict[str, deque[RequestExit]] = {}
        self._batch_contexts: list[str] = []
        #: Contexts cut to max_length in the current call.
        self._truncated: set[str] = set()

    def _check_fill_positions(self) -> None:
        """`fill` writes the pair's keys at the token's own slot: with rotary positions
        the pair must run at the token's original position."""
        assert self.arch is not None
        spade = self.spade
        if (
            spade.kv_strategy is KVStrategy.FILL
            and spade.spade_positions is SpadePositions.COMPACT
            and self.arch.rotary
        ):
            raise SpadeArgumentError(
                "kv_strategy=fill keeps the keys of SPADE's pair, which spade_positions=compact "
                "rotates to position 1 instead of the token's own: use spade_positions=original "
                "or kv_strategy=copy or recompute."
            )

    def _shard_cpu_processes(self) -> None:
        """Data parallelism over CPU processes started by `accelerate launch`.

        HFLM splits requests over processes only when each has a GPU; on CPU every
        process would evaluate everything. HFLM keeps its `Accelerator` whenever there is
        more than one process, so take rank and world size from it.
        """
        accelerator = getattr(self, "accelerator", None)
        if accelerator is None or self.world_size > 1 or self.device.type != "cpu":
            return
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        logger.info("data parallel on CPU: process %d of %d", self._rank, self._world_size)

    @property
    def _delegates(self) -> bool:
        """Whether requests go through HFLM unchanged."""
        return not self.spade.active or self.spade.never_exits

    # --- the start token (start_token.py) -------------------------------------------
    @property
    def _keeps_start(self) -> bool:
        """Whether every input gets a start token at position 0 and keeps it when cut:
        whenever requests exit early, unless the user turned it off with
        add_bos_token=False."""
        return not self._delegates and self.add_bos_token is not False

    @property
    def start_tokens(self) -> set[int]:
        """Tokens that count as a start token at position 0: a `prefix_token_id` given in
        model_args alone (a request that begins otherwise gets it in front, even before a
        BOS the tokenizer added), else BOS and HFLM's fallback prefix token (EOS)."""
        if self.custom_prefix_token_id is not None:
            return {self.custom_prefix_token_id}
        return {t for t in (self.tokenizer.bos_token_id, self.prefix_token_id) if t is not None}

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context_enc, continuation_enc = super()._encode_pair(context, continuation)
        if self._keeps_start:
            context_enc = with_start(context_enc, self.prefix_token_id, self.start_tokens)
        return context_enc, continuation_enc

    def _full_depth(self) -> int:
        if self.arch is not None:
            return self.arch.num_layers
        return int(self.config.get_text_config().num_hidden_layers)

    def _exit_plan(self) -> ExitPlan:
        spade = self.spade
        assert self.arch is not None and spade.decoder is not None
        return ExitPlan(
            checks=spade.check_schedule(self.arch.num_layers),
            decoder=spade.decoder,
            spade_positions=spade.spade_positions,
            spade_start=spade.spade_start,
            threshold=spade.exit_threshold,
            confidence=spade.confidence,
            confidence_decoder=spade.confidence_decoder or DecoderKind.LOGIT_LENS,
            lens=self.lens,
        )

    def _load_lens(self) -> Lens:
        """The lens of `lens=`, checked against this model and the layers it must serve."""
        assert self.arch is not None and self.spade.lens is not None
        kind = self.spade.lens_kind
        try:
            lens = load_lens(self.spade.lens, self.arch, LensKind(kind.value) if kind else None)
        except LensCheckpointError as err:
            raise SpadeArgumentError(str(err)) from err
        needed = sorted(set(self.spade.check_schedule(self.arch.num_layers)) - set(lens.layers))
        if needed:
            what = "exit_layer" if self.spade.exit_layer is not None else "the checks"
            raise SpadeArgumentError(
                f"the lens at {self.spade.lens} has translators for layers {lens.layers} only, "
                f"but {what} need{'s' if what == 'exit_layer' else ''} layers {needed}. Train "
                f"one that covers them (`lm-eval-spade train-lens --layers ...`), or change "
                "exit_layer / min_layer / interval."
            )
        self._check_lens_start_token(lens)
        return lens

    def _check_lens_start_token(self, lens: Lens) -> None:
        """A lens trained on examples that began with another start token still loads,
        but its translators saw other states; say so."""
        settings = lens.config.training.get("settings")
        if not settings:  # not trained here (an untrained lens, or tuned-lens's format)
            return
        trained = start_token_id(self.tokenizer, settings.get("prefix_token_id"))
        if self._keeps_start and trained != self.prefix_token_id:
            logger.warning(
                "the lens at %s was trained with start token %d, but this model starts requests "
                "with %d; pass prefix_token_id=%d (or train the lens with --prefix-token-id %d).",
                self.spade.lens, trained, self.prefix_token_id, trained, self.prefix_token_id,
            )  # fmt: skip

    def _start_exit_log(self) -> Path | None:
        if self.spade.exit_log is None:
            return None
        path = Path(self.spade.exit_log)
        if self.rank == 0:
            check_output_file(path, _is_exit_log, "exit_log=")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
        return path

    # --- request entry points -------------------------------------------------------
    def loglikelihood(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        return self._score(super().loglikelihood, requests, disable_tqdm, rolling=False)

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        score = self._rolling_with_start if self._keeps_start else super().loglikelihood_rolling
        return self._score(score, requests, disable_tqdm, rolling=True)

    def _rolling_with_start(self, requests: list[Instance], disable_tqdm: bool) -> list[float]:
        """HFLM's loglikelihood_rolling, with windows that each begin with the start token
        (`start_token.rolling_windows`; a document that fits gets lm-eval's window)."""
        windows, counts = [], []
        for req in requests:
            own = self._rolling_windows(req.args[0])
            windows += [(None, ctx, cont) for ctx, cont in own]
            counts.append(len(own))
        scores = iter(self._loglikelihood_tokens(windows, disable_tqdm))
        totals = []
        for req, count in zip(requests, counts, strict=True):
            total = sum(next(scores)[0] for _ in range(count))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            totals.append(total)
        return totals

    def _rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        tokens = self.tok_encode(text)
        if self._keeps_start:
            return rolling_windows(tokens, self.prefix_token_id, self.max_length)
        return [
            lm_utils.make_disjoint_window(w)
            for w in lm_utils.get_rolling_token_windows(
                tokens, self.prefix_token_id, self.max_length, 1
            )
        ]

    def _score(
        self,
        score: Callable[..., list[Any]],
        requests: list[Instance],
        disable_tqdm: bool,
        rolling: bool,
    ) -> list[Any]:
        unique, index = _first_occurrences(requests)
        self._rolling, self._row_exits, self._truncated = rolling, [], set()
        if self._kv_given is not None and self.rank == 0:
            logger.warning(
                "kv_strategy=%s has no effect on these %d %s requests: it sets what the "
                "blocks above an exit hold in generation (generate_until) only",
                self._kv_given.value, len(unique),
                "loglikelihood_rolling" if rolling else "loglikelihood",
            )  # fmt: skip
            self._kv_given = None  # once
        results = score(unique, disable_tqdm=disable_tqdm)
        self._check_finite(unique, results)
        self._record(unique, self._request_exits(unique, rolling))
        self._log_truncation(unique)
        return [results[i] for i in index]

    def _log_truncation(self, requests: list[Instance]) -> None:
        """One line per task for the requests cut to max_length (not one per request)."""
        cut: dict[str, int] = {}
        for req in requests:
            if req.args[0] in self._truncated:
                cut[req.task_name or "unknown"] = cut.get(req.task_name or "unknown", 0) + 1
        for task, count in sorted(cut.items()):
            total = sum(1 for req in requests if (req.task_name or "unknown") == task)
            logger.warning(
                "%s: %d of %d requests exceed max_length=%d; their oldest context tokens were "
                "cut%s. Raise max_length (if the model takes longer inputs) to keep them.",
                task,
                count,
                total,
                self.max_length,
                ", after the start token" if self._keeps_start else "",
            )

    def _check_finite(self, requests: list[Instance], results: list[Any]) -> None:
        """A NaN or infinite score is an error, never a metric."""
        for req, answer in zip(requests, results, strict=True):
            value = answer[0] if isinstance(answer, tuple) else answer
            if isinstance(value, float) and not math.isfinite(value):
                raise NonFiniteError(
                    f"spade-exit scored doc {req.doc_id} of task {req.task_name} as {value}, "
                    "not a finite number, so no metric is computed from it. Likely cause: "
                    "the model or lens overflows (try dtype=float32) or holds non-finite "
                    "weights."
                )

    def _request_exits(self, requests: list[Instance], rolling: bool) -> list[RequestExit]:
        """One exit per request, from the exits of the forwards that served it."""
        if self._delegates:
            return [RequestExit(self._full_depth()) for _ in requests]
        if not rolling:
            assert len(self._row_exits) == len(requests)
            return self._row_exits
        # HFLM splits a rolling request into windows (one forward each) and scores all
        # windows of all requests together, in order; extra windows at the end are the
        # padding of multi-process runs. A request takes its first window's exit.
        windows = iter(self._row_exits)
        merged = []
        for req in requests:
            parts = [next(windows) for _ in range(self._window_count(req.args[0]))]
            merged.append(
                RequestExit(
                    parts[0].exit_layer,
                    parts[0].confidence,
                    sum(p.passes_run for p in parts),
                    sum(p.passes_full for p in parts),
                    sum(p.checks for p in parts),
                )
            )
        return merged

    def _window_count(self, text: str) -> int:
        """How many windows `loglikelihood_rolling` makes of `text`."""
        return len(self._rolling_windows(text))

    def _record(self, requests: list[Instance], exits: list[RequestExit]) -> None:
        local = [
            {"task": req.task_name, "doc_id": req.doc_id, "idx": req.idx, **exit.to_dict()}
            for req, exit in zip(requests, exits, strict=True)
        ]
        answer_cache.store_exits(self.cache_hook.dbdict, requests, [e.to_dict() for e in exits])
        if self.world_size > 1 and torch.distributed.is_initialized():
            parts: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(parts, local)
            local = [record for part in parts for record in part]
        self.exits.extend(local)
        if self._exit_log is not None and self.rank == 0:
            keys = ("task", "doc_id", "idx", "exit_layer", "confidence")
            with self._exit_log.open("a") as f:
                for record in local:
                    line = {k: record[k] for k in keys}
                    if record["token_exit_layers"] is not None:  # generation
                        line["token_exit_layers"] = record["token_exit_layers"]
                    f.write(json.dumps(line) + "\n")

    @property
    def exit_stats(self) -> dict[str, ExitStats]:
        """Per task: exit layers, compute and checks of every request scored so far."""
        stats: dict[str, ExitStats] = {}
        fields = RequestExit.__dataclass_fields__
        for record in self.exits:
            task = record["task"] or "unknown"
            stats.setdefault(task, ExitStats(num_layers=self._full_depth()))
            stats[task].add(RequestExit(**{k: record[k] for k in fields}))
        return stats

    # --- scoring ----------------------------------------------------------------------
    def _loglikelihood_tokens(
        self,
        requests: list[TokenRequest],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if self._delegates:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        ordered = self._score_in_order(requests, disable_tqdm, override_bs)
        self._row_exits.extend(exit for _, exit in ordered)
        return [answer for answer, _ in ordered]

    def _score_in_order(
        self,
        requests: list[TokenRequest],
        disable_tqdm: bool,
        override_bs: int | None,
    ) -> list[tuple[Any, Any]]:
        """HFLM's sorting, grouping and batching around `_score_chunk`: what it yields
        for every request, back in the order of `requests`."""
        re_ord = Collator(
            requests,
            sort_fn=_question_sort_key if self._answer_level else _sort_key,
            group_by="contexts" if self.logits_cache else None,
            group_fn=_group_key,
        )
        batch_size = self.batch_size
        if batch_size == "auto":
            batch_size = override_bs or self._detect_batch_size(requests)
        decided: dict[tuple[int, ...], int] = {}
        res: list[tuple[Any, Any]] = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc=self._desc())
        chunks: Iterator[Sequence[TokenRequest]] = (
            _whole_questions(re_ord.get_batched(n=0), int(batch_size))
            if self._answer_level
            else re_ord.get_batched(n=batch_size)
        )
        for chunk in chunks:
            for answer in self._score_chunk(chunk, re_ord, decided):
                res.append(answer)
                pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)

    @property
    def _answer_level(self) -> bool:
        """Whether exits are decided per question from its choices (`exiting.py`)."""
        plan = self.plan
        return plan is not None and plan.threshold is not None and plan.confidence.answer_level

    def _desc(self) -> str:
        spade = self.spade
        if spade.exit_layer is not None:
            return f"Scoring at layer {spade.exit_layer} ({spade.decoder.value})"
        if spade.patience is not None:
            return f"SPADE-EXIT (answer held over {spade.patience + 1} checks)"
        return f"SPADE-EXIT ({spade.confidence.value} <= {spade.threshold} nats)"

    def _score_chunk(
        self, chunk: Sequence[TokenRequest], re_ord: Collator, decided: dict
    ) -> Iterator[tuple[tuple[float, bool], RequestExit]]:
        """Yield the answer and exit of every request the chunk's forwards serve."""
        inputs, cont_lens = self._chunk_inputs(chunk)
        input_lens = [len(t) for t in inputs]
        placeholder = torch.zeros(1, 1, 1)
        chunk_hits = [  # the requests each forward serves (one-token answers share one)
            [(hit_str, hit_cont) for hit_str, hit_cont, _ in re_ord.get_cache(s, c, k, placeholder)]
            for s, c, k in chunk
        ]
        targets = [[list(cont) for _, cont in hits] for hits in chunk_hits]
        rows = self._score_rows(inputs, input_lens, cont_lens, decided, targets)
        for row, n, row_hits in zip(rows, input_lens, chunk_hits, strict=True):
            logits = row.log_probs.unsqueeze(0)  # [1, cont_len, vocab]
            greedy = logits.argmax(dim=-1)
            hits = [(hit_str, hit_cont, logits) for hit_str, hit_cont in row_hits]
            share = 1.0 / len(hits)
            exit = RequestExit(
                row.exit_layer,
                row.confidence,
                row.block_token_passes * share,
                self._full_depth() * n * share,
                row.checks * share,
            )
            for hit_str, hit_cont, hit_logits in hits:
                cont = torch.tensor(hit_cont, dtype=torch.long, device=self.device)[None]
                is_greedy = bool((greedy[:, -cont.shape[1] :] == cont).all())
                picked = torch.gather(hit_logits, 2, cont.unsqueeze(-1)).squeeze(-1)
                answer = (float(picked.sum()), is_greedy)
                if hit_str is not None:
                    self.cache_hook.add_partial("loglikelihood", hit_str, answer)
                yield answer, exit

    def _chunk_inputs(self, chunk: Sequence[TokenRequest]) -> tuple[list[torch.Tensor], list[int]]:
        """Each request's model input (context + continuation, minus the last token, cut
        to max_length from the left as HFLM does, but after the start token when exiting
        early) and its continuation length."""
        inputs, cont_lens = [], []
        starts = self.start_tokens if self._keeps_start else ()
        for request_str, context_enc, continuation_enc in chunk:
            whole = context_enc + continuation_enc
            if len(whole) > self.max_length + 1 and request_str is not None:
                self._truncated.add(request_str[0])  # the context: grouped requests share it
            tokens = cut_after_start(whole, self.max_length + 1, starts)[:-1]
            inputs.append(torch.tensor(tokens, dtype=torch.long, device=self.device))
            cont_lens.append(len(continuation_enc))
        return inputs, cont_lens

    def _score_rows(
        self,
        inputs: list[torch.Tensor],
        input_lens: list[int],
        cont_lens: list[int],
        decided: dict,
        targets: list[list[list[int]]] | None = None,
    ) -> list[RowExit]:
        assert self.arch is not None and self.plan is not None
        if self._answer_level and self._rolling:
            raise SpadeArgumentError(
                f"confidence={self.plan.confidence.value} is over a question's choices, and "
                "loglikelihood_rolling (perplexity) requests have none: use confidence=entropy, "
                "margin or maxprob for them."
            )
        ids = pad_and_concat(max(input_lens), list(inputs), padding_side="right")
        if self.plan.checks:
            assert self.spade.decoder is not None
            self._check_start_tokens(ids[:, 0].tolist(), self.spade.decoder)
        with self._inference():
            return score_rows(
                self.arch,
                self.plan,
                ids,
                input_lens,
                cont_lens,
                decided,
                rolling=self._rolling,
                softmax_dtype=self.softmax_dtype,
                targets=targets,
            )

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """No gradients, and HFLM's mixed precision when it has one."""
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            yield

    def _check_start_tokens(self, first: list[int], decoder: DecoderKind) -> None:
        """SPADE pairs every position with position 0, which must be a start token:
        `first` is each row's first real token."""
        if not decoder.needs_start_token:
            return
        starts = self.start_tokens
        bad = [t for t in first if t not in starts]
        if bad:
            # spade-exit puts a start token first unless add_bos_token=False.
            raise SpadeArgumentError(
                f"decoder={decoder.value} needs a start token at position 0, but a request "
                f"starts with token {bad[0]} ({self.tokenizer.decode([bad[0]])!r}) instead of "
                f"{sorted(starts)}, because add_bos_token=False keeps spade-exit from putting "
                "one there. Drop add_bos_token=False, or use decoder=spade_nos, which needs no "
                "start token."
            )

    # --- generation ----------------------------------------------------------------------
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """HFLM's generate_until, one call per set of generation kwargs, so that each row
        `_model_generate` runs can be matched to its request by its context."""
        if self._delegates:
            return super().generate_until(requests, disable_tqdm)
        unique, index = _first_occurrences(requests)
        self._truncated = set()
        texts: list[str] = [""] * len(unique)
        exits: list[RequestExit] = [RequestExit(0)] * len(unique)
        for group in _by_gen_kwargs(unique):
            self._generated = {}
            outputs = super().generate_until([unique[i] for i in group], disable_tqdm)
            for i, text in zip(group, outputs, strict=True):
                texts[i] = text
                exits[i] = self._generated[unique[i].args[0]].popleft()
        self._record(unique, exits)
        self._log_truncation(unique)
        return [texts[i] for i in index]

    def tok_batch_encode(
        self,
        strings: list[str],
        padding_side: str = "left",
        left_truncate_len: int | None = None,
        truncation: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HFLM's batch encoding for generation; when exiting early, every row starts with
        the start token and keeps it when cut to `left_truncate_len`."""
        self._batch_contexts = list(strings)  # the rows of the next `_model_generate`
        if not self._keeps_start:
            return super().tok_batch_encode(strings, padding_side, left_truncate_len, truncation)
        ids, mask = super().tok_batch_encode(strings, padding_side, None, truncation)
        rows = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
        rows = [with_start(row, self.prefix_token_id, self.start_tokens) for row in rows]
        if left_truncate_len:
            cut = [cut_after_start(row, left_truncate_len, self.start_tokens) for row in rows]
            self._truncated.update(s for s, a, b in zip(strings, rows, cut, strict=True) if a != b)
            rows = cut
        pad = self.tokenizer.pad_token_id
        width = max(len(row) for row in rows)
        out = torch.full((len(rows), width), pad if pad is not None else 0, dtype=ids.dtype)
        out_mask = torch.zeros((len(rows), width), dtype=mask.dtype)
        for r, row in enumerate(rows):
            span = slice(width - len(row), width) if padding_side == "left" else slice(len(row))
            out[r, span] = torch.tensor(row, dtype=ids.dtype)
            out_mask[r, span] = 1
        return out, out_mask

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
    ) -> torch.Tensor:
        if self._delegates:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        assert self.arch is not None and self.plan is not None and self.spade.kv_strategy
        if self._answer_level:
            raise SpadeArgumentError(
                f"confidence={self.plan.confidence.value} is over a question's choices, and "
                "generate_until requests have none: use confidence=entropy, margin or maxprob "
                "for generation."
            )
        attention_mask = generation_kwargs.pop("attention_mask")
        sampling = Sampling.from_request(generation_kwargs, self.model.generation_config)
        if self.plan.checks:
            assert self.spade.decoder is not None
            first = context[torch.arange(len(context)), attention_mask.long().argmax(dim=1)]
            self._check_start_tokens(first.tolist(), self.spade.decoder)
        eos = self.model.generation_config.eos_token_id
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = self.tokenizer.pad_token_id
        stopping = stop_sequences_criteria(self.tokenizer, stop, context.shape[1], len(context))
        stopping.append(MaxLengthCriteria(max_length))
        if eos_ids:
            stopping.append(EosTokenCriteria(eos_ids))
        with self._inference():
            plan = GenerationPlan(self.plan, self.spade.kv_strategy, sampling)
            result = generate(
                self.arch,
                plan,
                context,
                attention_mask,
                max_length,
                stopping,
                pad if pad is not None else eos_ids[0],
            )
        for text, row in zip(self._batch_contexts, result.rows, strict=True):
            self._generated.setdefault(text, deque()).append(_generation_exit(row))
        return result.tokens

    # --- lm_eval --use_cache (answer_cache) ---------------------------------------------
    def answer_cache_identity(self) -> str:
        """What `--use_cache` keys this LM's cache file by (`answer_cache.identity`)."""
        return answer_cache.identity(self, self._model_args)

    def restore_cached_exits(self, requests: list[Instance], dbdict: Any) -> None:
        """Record the exits of requests answered from the cache, as stored with them."""
        unique, _ = _first_occurrences(requests)
        found = [
            (req, RequestExit(**record))
            for req, record in zip(unique, answer_cache.stored_exits(dbdict, unique), strict=True)
            if record is not None
        ]
        if len(found) < len(unique):
            logger.warning(
                "%d answers from the cache have no exit record; config.spade.tasks counts the "
                "other %d requests only",
                len(unique) - len(found),
                len(found),
            )
        self._record([req for req, _ in found], [exit for _, exit in found])

    # --- what ran, for the results JSON ------------------------------------------------
    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["spade"] = {
            "package_version": __version__,
            "config": self.spade.to_dict(),
            "num_layers": self._full_depth(),
            "tasks": {task: stats.to_dict() for task, stats in sorted(self.exit_stats.items())},
        }
        if self.lens is not None:
            lens = self.lens.config
            info["spade"]["lens"] = {
                "path": self.spade.lens,
                "kind": lens.kind,
                "layers": lens.layers,
                "base_model_name_or_path": lens.base_model_name_or_path,
                "head_hash": lens.head_hash,
                "training": {k: v for k, v in lens.training.items() if k != "heldout_kl"},
            }
        return info
