"""`spade-exit`: lm-eval's HF model, scoring through the decoders of `SPADE.md`.

With no spade setting it *is* `HFLM`: every request goes through HFLM's own code, so
results equal `--model hf` exactly. With `exit_layer=K`, `_loglikelihood_tokens` (which
both `loglikelihood` and `loglikelihood_rolling` go through) runs the blocks up to K once
per batch and decodes only the scored positions from `h^K`. HFLM's batching, sorting,
truncation and one-forward-per-context grouping for one-token continuations are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from lm_eval.models.utils_hf import pad_and_concat
from tqdm import tqdm

from lm_eval_spade import __version__
from lm_eval_spade.architectures import Architecture, architecture_for
from lm_eval_spade.config import SpadeArgumentError, SpadeConfig
from lm_eval_spade.decoders import decode
from lm_eval_spade.lens import Lens, LensCheckpointError, LensKind, load_lens
from lm_eval_spade.model_args import check_model_args
from lm_eval_spade.stats import ExitStats

logger = logging.getLogger(__name__)

TokenRequest = tuple[tuple[str, str], list[int], list[int]]


def _sort_key(req: TokenRequest) -> tuple[int, tuple[int, ...]]:
    """HFLM's order: longest first, so each batch's first row sets its padded length."""
    toks = req[1] + req[2]
    return -len(toks), tuple(toks)


def _group_key(req: TokenRequest) -> list[int]:
    """HFLM's grouping: one forward serves every continuation sharing ctx + cont[:-1]."""
    return req[-2] + req[-1][:-1]


@register_model("spade-exit")
class SpadeExitLM(HFLM):
    """HFLM whose scored positions are decoded from an intermediate layer.

    Accepts every HFLM model_arg, plus `decoder`, `exit_layer`, `spade_positions` and
    `lens` (see `SpadeConfig`).
    """

    def __init__(self, pretrained: Any, **kwargs: Any) -> None:
        check_model_args(pretrained, kwargs)
        spade_args = {
            k: kwargs.pop(k) for k in list(kwargs) if k in SpadeConfig.__dataclass_fields__
        }
        self.spade = SpadeConfig.from_model_args(**spade_args)
        super().__init__(pretrained=pretrained, **kwargs)
        self.arch: Architecture | None = None
        if self.spade.active:
            if self.backend != "causal":
                raise SpadeArgumentError(
                    "spade-exit decodes decoder-only (causal) models; this model loaded as "
                    f"{self.backend}. Drop backend=seq2seq or the exit settings."
                )
            self.arch = architecture_for(self.model)
            self.spade.check_layers(self.arch.num_layers)
        self.lens: Lens | None = None
        if self.spade.lens is not None:
            self.lens = self._load_lens()
        self.exit_stats: dict[str, ExitStats] = {}
        self._task: str = "unknown"

    def _load_lens(self) -> Lens:
        """The lens of `lens=`, checked against this model and the exit layer."""
        assert self.arch is not None and self.spade.decoder is not None
        try:
            lens = load_lens(self.spade.lens, self.arch, LensKind(self.spade.decoder.value))
        except LensCheckpointError as err:
            raise SpadeArgumentError(str(err)) from err
        layer = self.spade.exit_layer
        if layer is not None and layer < self.arch.num_layers and layer not in lens.layers:
            raise SpadeArgumentError(
                f"exit_layer={layer}: the lens at {self.spade.lens} has translators for layers "
                f"{lens.layers} only. Pick one of those, or train one that covers {layer} "
                f"(`lm-eval-spade train-lens --layers {layer} ...`)."
            )
        return lens

    # --- request entry points: track which task is being scored ------------------------
    def loglikelihood(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        return self._per_task(super().loglikelihood, requests, disable_tqdm)

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        return self._per_task(super().loglikelihood_rolling, requests, disable_tqdm)

    def _per_task(
        self, score: Callable[..., list[Any]], requests: list[Instance], disable_tqdm: bool
    ) -> list[Any]:
        """Score each task's requests on their own, so exit statistics are per task.

        A request's score does not depend on what it is batched with, so splitting by
        task changes no number.
        """
        by_task: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_task.setdefault(req.task_name or "unknown", []).append(i)
        results: list[Any] = [None] * len(requests)
        for task, indices in by_task.items():
            self._task = task
            scored = score([requests[i] for i in indices], disable_tqdm=disable_tqdm)
            for i, value in zip(indices, scored, strict=True):
                results[i] = value
            if not self.spade.active:
                self._stats().add_requests(self._full_depth(), len(indices))
        return results

    def _stats(self) -> ExitStats:
        if self._task not in self.exit_stats:
            self.exit_stats[self._task] = ExitStats(num_layers=self._full_depth())
        return self.exit_stats[self._task]

    def _full_depth(self) -> int:
        if self.arch is not None:
            return self.arch.num_layers
        return int(self.config.get_text_config().num_hidden_layers)

    # --- scoring ----------------------------------------------------------------------
    def _loglikelihood_tokens(
        self,
        requests: list[TokenRequest],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if not self.spade.active:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        re_ord = Collator(
            requests,
            sort_fn=_sort_key,
            group_by="contexts" if self.logits_cache else None,
            group_fn=_group_key,
        )
        batch_size = self.batch_size
        if batch_size == "auto":
            batch_size = override_bs or self._detect_batch_size(requests)
        res: list[tuple[float, bool]] = []
        pbar = tqdm(
            total=len(requests),
            disable=disable_tqdm or self.rank != 0,
            desc=f"Scoring at layer {self.spade.exit_layer} ({self.spade.decoder.value})",
        )
        for chunk in re_ord.get_batched(n=batch_size):
            for answer in self._score_chunk(chunk, re_ord):
                res.append(answer)
                pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)

    def _score_chunk(self, chunk: Sequence[TokenRequest], re_ord: Collator):
        """Yield `(logprob, is_greedy)` for every request the chunk's forwards serve."""
        inputs, cont_lens = [], []
        for _, context_enc, continuation_enc in chunk:
            tokens = (context_enc + continuation_enc)[-(self.max_length + 1) :][:-1]
            if len(context_enc) + len(continuation_enc) > self.max_length + 1:
                logger.warning(
                    "context + continuation (%d tokens) exceed max_length %d; truncating "
                    "from the left as HFLM does.",
                    len(context_enc) + len(continuation_enc),
                    self.max_length,
                )
            inputs.append(torch.tensor(tokens, dtype=torch.long, device=self.device))
            cont_lens.append(len(continuation_enc))
        input_lens = [len(t) for t in inputs]
        log_probs = self._decode_scored(inputs, input_lens, cont_lens)
        for (request_str, context_enc, cont_toks), logits in zip(chunk, log_probs, strict=True):
            logits = logits.unsqueeze(0)  # [1, cont_len, vocab]
            greedy = logits.argmax(dim=-1)
            hits = re_ord.get_cache(
                req_str=request_str, cxt_toks=context_enc, cont_toks=cont_toks, logits=logits
            )
            for hit_str, hit_cont, hit_logits in hits:
                cont = torch.tensor(hit_cont, dtype=torch.long, device=self.device)[None]
                is_greedy = bool((greedy[:, -cont.shape[1] :] == cont).all())
                picked = torch.gather(hit_logits, 2, cont.unsqueeze(-1)).squeeze(-1)
                answer = (float(picked.sum()), is_greedy)
                self._stats().add_requests(self.spade.exit_layer)
                if hit_str is not None:
                    self.cache_hook.add_partial("loglikelihood", hit_str, answer)
                yield answer

    def _decode_scored(
        self, inputs: list[torch.Tensor], input_lens: list[int], cont_lens: list[int]
    ) -> list[torch.Tensor]:
        """Log-probs `[cont_len, vocab]` per row, decoded at `exit_layer`."""
        arch, layer = self.arch, self.spade.exit_layer
        assert arch is not None and layer is not None
        ids = pad_and_concat(max(input_lens), inputs, padding_side="right")
        self._check_start_tokens(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        rows = torch.cat([torch.full((c,), r) for r, c in enumerate(cont_lens)]).to(ids.device)
        scored = torch.cat(
            [torch.arange(n - c, n) for n, c in zip(input_lens, cont_lens, strict=True)]
        ).to(ids.device)
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            hidden = arch.run_blocks(arch.embed(ids, positions), 0, layer, positions)
            decoded = decode(
                arch,
                self.spade.decoder,
                layer,
                start_states=hidden[rows, 0],
                states=hidden[rows, scored],
                positions=scored,
                spade_positions=self.spade.spade_positions,
                lens=self.lens,
            )
        log_probs = F.log_softmax(decoded.logits, dim=-1, dtype=self.softmax_dtype)
        self._stats().add_forward(sum(input_lens), layer, decoded.block_token_passes)
        return list(log_probs.split(cont_lens))

    def _check_start_tokens(self, ids: torch.Tensor) -> None:
        """SPADE pairs every position with position 0, which must be a start token."""
        if not self.spade.decoder.needs_start_token:
            return
        starts = {t for t in (self.tokenizer.bos_token_id, self.prefix_token_id) if t is not None}
        first = ids[:, 0].tolist()
        bad = [t for t in first if t not in starts]
        if bad:
            raise SpadeArgumentError(
                f"decoder={self.spade.decoder.value} needs a start token at position 0, but a "
                f"request starts with token {bad[0]} ({self.tokenizer.decode([bad[0]])!r}) "
                f"instead of {sorted(starts)}. Add add_bos_token=True to --model_args so the "
                "tokenizer prepends one (documents longer than max_length are split into "
                f"windows without one: raise max_length above {self.max_length}), or use "
                "decoder=spade_nos, which needs no start token."
            )

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
