"""SPADE-EXIT over a batch: rows run block by block and leave the batch as they exit.

Every row is one forward of lm-eval's scoring (a context plus continuation, right
padded). At each check layer the rows still running get an uncertainty at their
decision position(s) (`confidence.py`); rows at or below the threshold stop there, their
scored positions are decoded from that layer (SPADE by default), and the batch shrinks,
including its padded width, so later blocks cost only what is left. Rows that never exit
run to layer L and are decoded by the model's own head.

A fixed `exit_layer` is the same machinery with one check that always passes.

Which position decides:
- loglikelihood: the answer position (the last context token). Every choice of a
  question has the same hidden state there (causal attention); a decision is also
  remembered per context, so choices scored in other rows or batches exit at the same
  layer even where float noise would put them either side of the threshold;
- loglikelihood_rolling (`rolling=True`): the context is only the start token, so the
  row's uncertainty is the mean over all its scored positions.

Answer-level measures (`answer_entropy`, `answer_margin`, `patience`) decide per question:
the rows sharing a context (its choices) must be in one batch (`model.py` batches whole
questions). At each check the confidence decoder decodes every scored position of those
rows, each choice's loglikelihood is summed from them, and the measure of the softmax over
the choices (`confidence.choice_uncertainties`) decides for all of them. A SPADE confidence
decoder's passes above the check count as block-token passes; where it is also the
exit's decoder, the exit check's decoding is reused, not run twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lm_eval_spade.architectures import Architecture
from lm_eval_spade.confidence import Confidence, choice_uncertainties, uncertainty
from lm_eval_spade.decoders import (
    DecoderKind,
    LayerStates,
    SpadePositions,
    SpadeStart,
    decode_layers,
)
from lm_eval_spade.lens import Lens


@dataclass(frozen=True)
class ExitPlan:
    """When rows may exit and how they are decoded (built from `SpadeConfig`)."""

    checks: tuple[int, ...]  # layers < L where the exit rule is applied, ascending
    decoder: DecoderKind  # decodes the scored positions at the exit layer
    spade_positions: SpadePositions = SpadePositions.ORIGINAL
    spade_start: SpadeStart = SpadeStart.PAIR
    threshold: float | None = None  # None: exit at the first check unconditionally
    # (the patience rule: -patience, as its uncertainty is minus the checks held)
    confidence: Confidence = Confidence.ENTROPY
    confidence_decoder: DecoderKind = DecoderKind.LOGIT_LENS
    lens: Lens | None = None


@dataclass
class RowExit:
    """What one row's scoring gave and cost."""

    log_probs: torch.Tensor  # [cont_len, vocab]
    exit_layer: int
    confidence: float | None  # uncertainty (nats) at the last check made, if any
    block_token_passes: float  # blocks run over the row's tokens + decoding above the exit
    checks: int  # positions whose confidence was computed


def score_rows(
    arch: Architecture,
    plan: ExitPlan,
    ids: torch.Tensor,
    input_lens: list[int],
    cont_lens: list[int],
    decided: dict[tuple[int, ...], int],
    rolling: bool = False,
    softmax_dtype: torch.dtype | None = None,
    targets: list[list[list[int]]] | None = None,
) -> list[RowExit]:
    """Score right-padded rows `ids` `[B, T]` with early exits; see the module doc.

    `decided` maps a context's tokens to the layer it exited at; it is read and updated,
    so pass the same dict for every batch of one lm-eval call. `targets[r]` holds the
    continuations row `r` serves (answer-level measures need them).
    """
    num_layers = arch.num_layers
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    lengths = torch.tensor(input_lens, device=ids.device)
    answer = lengths - torch.tensor(cont_lens, device=ids.device)
    keys = [tuple(ids[r, : int(answer[r]) + 1].tolist()) for r in range(len(input_lens))]
    results: list[RowExit | None] = [None] * len(input_lens)
    checks = [0] * len(input_lens)
    last_u: list[float | None] = [None] * len(input_lens)
    answer_level = plan.threshold is not None and plan.confidence.answer_level
    if answer_level and (rolling or targets is None):
        raise ValueError("answer-level confidence needs the continuations of each row")
    reuse = answer_level and plan.confidence_decoder is plan.decoder
    history: dict[tuple[int, ...], list[torch.Tensor]] = {}
    extra = [0.0] * len(input_lens)  # the confidence decoder's block-token passes

    active = torch.arange(len(input_lens), device=ids.device)
    hidden = arch.embed(ids, positions)
    layer = 0
    for check in plan.checks:
        hidden = arch.run_blocks(hidden, layer, check, positions[:, : hidden.shape[1]])
        layer = check
        go = torch.ones(len(active), dtype=torch.bool, device=ids.device)
        decoded: list[tuple[torch.Tensor, float]] | None = None
        if answer_level:
            assert targets is not None
            u, counts, decoded = _answer_uncertainty(
                arch, plan, hidden, active, answer, lengths, check, targets, keys, history,
                softmax_dtype,
            )  # fmt: skip
        elif plan.threshold is not None:
            u, counts = _uncertainty(arch, plan, hidden, active, answer, lengths, check, rolling)
        if plan.threshold is not None:
            go = u <= plan.threshold
            for i, row in enumerate(active.tolist()):
                checks[row] += counts[i]
                last_u[row] = float(u[i])
                if keys[row] in decided:
                    go[i] = decided[keys[row]] == check
        if decoded is not None:
            for i, row in enumerate(active.tolist()):
                if not (reuse and bool(go[i])):
                    extra[row] += decoded[i][1]
        if bool(go.any()):
            _finish(
                arch, plan, hidden, active, go, check, lengths, answer, results, softmax_dtype,
                decoded if reuse else None,
            )  # fmt: skip
            keep = ~go
            hidden, active = hidden[keep], active[keep]
            if len(active) == 0:
                break
            hidden = hidden[:, : int(lengths[active].max())]  # drop padding no row needs
    if len(active):
        hidden = arch.run_blocks(hidden, layer, num_layers, positions[:, : hidden.shape[1]])
        go = torch.ones(len(active), dtype=torch.bool, device=ids.device)
        _finish(arch, plan, hidden, active, go, num_layers, lengths, answer, results, softmax_dtype)

    out = []
    for row, result in enumerate(results):
        assert result is not None
        decided.setdefault(keys[row], result.exit_layer)
        result.block_token_passes += result.exit_layer * input_lens[row] + extra[row]
        result.checks, result.confidence = checks[row], last_u[row]
        out.append(result)
    return out


def _uncertainty(
    arch: Architecture,
    plan: ExitPlan,
    hidden: torch.Tensor,
    active: torch.Tensor,
    answer: torch.Tensor,
    lengths: torch.Tensor,
    layer: int,
    rolling: bool,
) -> tuple[torch.Tensor, list[int]]:
    """Per running row: uncertainty at its decision position(s), and how many were used."""
    local = torch.arange(len(active), device=hidden.device)
    if rolling:  # every scored position, averaged per row
        spans = [torch.arange(int(answer[r]), int(lengths[r])) for r in active.tolist()]
        rows = torch.cat([torch.full((len(s),), i) for i, s in enumerate(spans)])
        cols = torch.cat(spans)
        rows, cols = rows.to(hidden.device), cols.to(hidden.device)
    else:
        rows, cols = local, answer[active]
    states = hidden[rows, cols]
    x = LayerStates(hidden[rows, 0], states, cols)
    logits = decode_layers(arch, plan.confidence_decoder, {layer: x}, lens=plan.lens)[layer].logits
    u = uncertainty(logits, plan.confidence)
    counts = torch.bincount(rows, minlength=len(active))
    per_row = torch.zeros(len(active), device=hidden.device).index_add_(0, rows, u) / counts
    return per_row, counts.tolist()


def _decode_scored(
    arch: Architecture,
    plan: ExitPlan,
    decoder: DecoderKind,
    hidden: torch.Tensor,
    positions: list[int],
    rows: list[int],
    layer: int,
    answer: torch.Tensor,
    lengths: torch.Tensor,
    softmax_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Log-probs and block-token passes of every scored position (answer to end) of the
    running batch's `positions` (requests `rows`), decoded at `layer` with `decoder`; and
    how many positions each row has. One place for the exit's decoding and for an
    answer-level check's, so both decode the same positions the same way."""
    spans = [torch.arange(int(answer[r]), int(lengths[r])) for r in rows]
    which = torch.cat([torch.full((len(s),), i) for i, s in zip(positions, spans, strict=True)])
    cols = torch.cat(spans)
    which, cols = which.to(hidden.device), cols.to(hidden.device)
    x = LayerStates(hidden[which, 0], hidden[which, cols], cols)
    out = decode_layers(
        arch, decoder, {layer: x}, plan.spade_positions, lens=plan.lens,
        spade_start=plan.spade_start,
    )[layer]  # fmt: skip
    log_probs = F.log_softmax(out.logits, dim=-1, dtype=softmax_dtype)
    return log_probs, out.passes, [len(s) for s in spans]


def _answer_uncertainty(
    arch: Architecture,
    plan: ExitPlan,
    hidden: torch.Tensor,
    active: torch.Tensor,
    answer: torch.Tensor,
    lengths: torch.Tensor,
    layer: int,
    targets: list[list[list[int]]],
    keys: list[tuple[int, ...]],
    history: dict[tuple[int, ...], list[torch.Tensor]],
    softmax_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, list[int], list[tuple[torch.Tensor, float]]]:
    """Per running row: its question's answer-level uncertainty at `layer`, the positions
    decoded for it, and their log-probs and block-token passes (for reuse at the exit).

    `history` keeps each question's choice loglikelihoods at its earlier checks (patience
    counts over them)."""
    rows = active.tolist()
    log_probs, passes, sizes = _decode_scored(
        arch, plan, plan.confidence_decoder, hidden, list(range(len(rows))), rows,
        layer, answer, lengths, softmax_dtype,
    )  # fmt: skip
    per_row = list(zip(log_probs.split(sizes), passes.split(sizes), strict=True))
    choices: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for (lp, _), r, n in zip(per_row, rows, sizes, strict=True):
        for hit in targets[r]:
            at = torch.arange(n - len(hit), n, device=lp.device)
            tokens = torch.tensor(hit, device=lp.device)
            choices.setdefault(keys[r], []).append(lp[at, tokens].double().sum().cpu())
    u_of = {}
    for key, values in choices.items():
        history.setdefault(key, []).append(torch.stack(values))
        u_of[key] = float(choice_uncertainties(torch.stack(history[key]), plan.confidence)[-1])
    u = torch.tensor([u_of[keys[r]] for r in rows], device=hidden.device, dtype=torch.float64)
    return u, sizes, [(lp, float(passes.sum())) for lp, passes in per_row]


def _finish(
    arch: Architecture,
    plan: ExitPlan,
    hidden: torch.Tensor,
    active: torch.Tensor,
    go: torch.Tensor,
    layer: int,
    lengths: torch.Tensor,
    answer: torch.Tensor,
    results: list[RowExit | None],
    softmax_dtype: torch.dtype | None,
    decoded_rows: list[tuple[torch.Tensor, float]] | None = None,
) -> None:
    """Decode the scored positions of the rows leaving at `layer` (or take each running
    row's `decoded_rows`: log-probs and passes already decoded there by the same decoder)."""
    local = go.nonzero().squeeze(1)
    rows = active[local].tolist()
    if decoded_rows is not None:
        for i, row in zip(local.tolist(), rows, strict=True):
            lp, passes = decoded_rows[i]
            results[row] = RowExit(lp, layer, None, passes, 0)
        return
    log_probs, passes, sizes = _decode_scored(
        arch, plan, plan.decoder, hidden, local.tolist(), rows, layer, answer, lengths,
        softmax_dtype,
    )  # fmt: skip
    for row, lp, row_passes in zip(rows, log_probs.split(sizes), passes.split(sizes), strict=True):
        results[row] = RowExit(lp, layer, None, float(row_passes.sum()), 0)
