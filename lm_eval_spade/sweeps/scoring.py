"""One prefix run per batch, decoded at every layer: the tensor work behind every sweep.

A batch of lm-eval's rows runs through the blocks once. After each block the hidden
states at the scored positions (and each row's start token) are kept; then every
decoding decodes all layers from them at once (`decode_layers_states`: SPADE's pairs of
all layers climb the blocks together), and the head runs once over the states of many
columns (`_heads`): on a 49K vocabulary the head costs as much as eight blocks per
position, and one product per column left it bound by reading its weights. Per row this
gives the loglikelihood and greedy flag of each of its continuations in every column,
the block-token passes a fixed exit at each column would have cost (`l * n` for the
prefix plus the decoder's passes above `l`, as `docs/method.md` counts them), and each
signal's uncertainty at every layer below L at the row's decision position(s) (the
answer position; for rolling rows, the mean over all scored positions, as `exiting.py`
decides). Answer-level signals need no work here: their choices' loglikelihoods are the
columns of their confidence decoder (`views.check_uncertainties`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lm_eval_spade.architectures import Architecture
from lm_eval_spade.confidence import uncertainty
from lm_eval_spade.decoders import LayerStates, SpadePositions, SpadeStart, decode_layers_states
from lm_eval_spade.lens import Lens
from lm_eval_spade.sweeps.spec import Decoding, Layout

#: Logits one head product may hold (float32: 128 MiB, and as much for its log-softmax).
HEAD_CHUNK_LOGITS = 2**25


@dataclass
class RowScores:
    """What one row (one forward of lm-eval's scoring) gives in every column."""

    loglik: torch.Tensor  # [hits, columns] float64: summed log-probs of each continuation
    greedy: torch.Tensor  # [hits, columns] bool: each continuation is the greedy one
    passes: torch.Tensor  # [columns] float64: block-token passes of a fixed exit there
    uncertainty: torch.Tensor  # [signals, L] float32 nats; NaN where a lens has no layer
    positions: int  # decision positions one check computes an uncertainty for


@dataclass
class _Batch:
    """Where the scored positions of right-padded rows are, flattened."""

    rows: torch.Tensor  # [k]: the row of each scored position
    cols: torch.Tensor  # [k]: its position in the row
    decision: torch.Tensor  # indices into the k positions that decide exits

    @classmethod
    def of(
        cls, input_lens: Sequence[int], cont_lens: Sequence[int], rolling: bool, device
    ) -> _Batch:
        spans = [range(n - c, n) for n, c in zip(input_lens, cont_lens, strict=True)]
        rows = torch.tensor([r for r, s in enumerate(spans) for _ in s], device=device)
        cols = torch.tensor([i for s in spans for i in s], device=device)
        if rolling:
            decision = torch.arange(len(cols), device=device)
        else:  # the answer position: each row's first scored position
            starts = torch.tensor([0, *cont_lens[:-1]], device=device).cumsum(0)
            decision = starts
        return cls(rows, cols, decision)


def layer_states(
    arch: Architecture, ids: torch.Tensor, batch: _Batch, timer: Counter
) -> dict[int, LayerStates]:
    """`h^l` at the scored positions (with each row's `h_0^l`) for l = 0..L, one run."""
    start = time.perf_counter()
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    hidden = arch.embed(ids, positions)
    states = {}
    for layer in range(arch.num_layers + 1):
        if layer:
            hidden = arch.run_blocks(hidden, layer - 1, layer, positions)
        states[layer] = LayerStates(
            hidden[batch.rows, 0], hidden[batch.rows, batch.cols], batch.cols
        )
    timer["prefix"] += time.perf_counter() - start
    return states


def score_layers(
    arch: Architecture,
    layout: Layout,
    lenses: dict[str, Lens],
    ids: torch.Tensor,
    input_lens: Sequence[int],
    cont_lens: Sequence[int],
    targets: Sequence[Sequence[Sequence[int]]],
    rolling: bool,
    spade_positions: SpadePositions = SpadePositions.ORIGINAL,
    softmax_dtype: torch.dtype | None = None,
    timer: Counter | None = None,
    spade_start: SpadeStart = SpadeStart.PAIR,
) -> list[RowScores]:
    """Score right-padded rows `ids` `[B, T]` in every column of `layout`.

    `targets[r]` holds the continuation tokens of every request row `r` serves (several
    when lm-eval groups one-token answers of one context into one forward).
    """
    timer = Counter() if timer is None else timer
    device = ids.device
    batch = _Batch.of(input_lens, cont_lens, rolling, device)
    states = layer_states(arch, ids, batch, timer)
    n_rows = len(input_lens)
    pos_index, tokens, hit_of = _hit_positions(cont_lens, targets, device)
    n_hits = sum(len(hits) for hits in targets)
    loglik = torch.empty(n_hits, len(layout.columns), dtype=torch.float64, device=device)
    greedy = torch.empty(n_hits, len(layout.columns), dtype=torch.bool, device=device)
    passes = torch.empty(n_rows, len(layout.columns), dtype=torch.float64, device=device)
    row_lens = torch.tensor(input_lens, dtype=torch.float64, device=device)

    columns: list[int] = []
    column_states: list[torch.Tensor] = []
    for decoding in layout.decodings():
        start = time.perf_counter()
        layers = layout.layers(decoding)
        decoded = decode_layers_states(
            arch,
            decoding.kind,
            {layer: states[layer] for layer in layers},
            spade_positions,
            lens=lenses.get(decoding.lens) if decoding.lens else None,
            spade_start=spade_start,
        )
        for layer in layers:
            c = layout.column(decoding, layer)
            columns.append(c)
            column_states.append(decoded[layer].states)
            decoded_passes = torch.zeros(n_rows, dtype=torch.float64, device=device).index_add_(
                0, batch.rows, decoded[layer].passes.double()
            )
            passes[:, c] = layer * row_lens + decoded_passes
        timer[decoding.label] += time.perf_counter() - start

    start = time.perf_counter()
    for group, logits in _heads(arch, column_states):
        cols = columns[group]
        log_probs = F.log_softmax(logits, dim=-1, dtype=softmax_dtype)
        picked = log_probs[:, pos_index, tokens].double().T  # [tokens, group]
        miss = (log_probs.argmax(dim=-1)[:, pos_index] != tokens).long().T
        loglik[:, cols] = torch.zeros(
            n_hits, len(cols), dtype=torch.float64, device=device
        ).index_add_(0, hit_of, picked)
        greedy[:, cols] = (
            torch.zeros(n_hits, len(cols), dtype=torch.long, device=device).index_add_(
                0, hit_of, miss
            )
            == 0
        )
    timer["head"] += time.perf_counter() - start

    u = _uncertainties(arch, layout, lenses, states, batch, n_rows, timer)
    positions = torch.bincount(batch.rows[batch.decision], minlength=n_rows).tolist()
    out = []
    first = 0
    for r, hits in enumerate(targets):
        out.append(
            RowScores(
                loglik[first : first + len(hits)],
                greedy[first : first + len(hits)],
                passes[r],
                u[:, r],
                positions[r],
            )
        )
        first += len(hits)
    return out


def _hit_positions(
    cont_lens: Sequence[int], targets: Sequence[Sequence[Sequence[int]]], device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every token of every served continuation: its scored position (among the
    batch's flattened ones), the token, and which continuation it belongs to."""
    positions: list[int] = []
    tokens: list[int] = []
    hit_of: list[int] = []
    end, hit_index = 0, 0
    for row, hits in enumerate(targets):
        end += cont_lens[row]
        for hit in hits:  # right-aligned: a continuation ends at its row's last position
            positions += range(end - len(hit), end)
            tokens += hit
            hit_of += [hit_index] * len(hit)
            hit_index += 1
    return (
        torch.tensor(positions, device=device),
        torch.tensor(tokens, device=device),
        torch.tensor(hit_of, device=device),
    )


def _uncertainties(
    arch: Architecture,
    layout: Layout,
    lenses: dict[str, Lens],
    states: dict[int, LayerStates],
    batch: _Batch,
    n_rows: int,
    timer: Counter,
) -> torch.Tensor:
    """`[signals, rows, L]`: each signal's mean uncertainty over a row's decision positions."""
    num_layers = arch.num_layers
    out = torch.full((len(layout.signals), n_rows, num_layers), torch.nan)
    rows = batch.rows[batch.decision]
    counts = torch.bincount(rows, minlength=n_rows).clamp(min=1).float()
    sources: dict[Decoding, list[int]] = {}
    for i, signal in enumerate(layout.signals):
        if not signal.measure.answer_level:  # those come from the columns (`views.py`)
            sources.setdefault(signal.source, []).append(i)
    for source, indices in sources.items():
        start = time.perf_counter()
        lens = lenses.get(source.lens) if source.lens else None
        layers = [layer for layer in range(num_layers) if lens is None or layer in lens.layers]
        inputs = {
            layer: LayerStates(
                states[layer].start_states[batch.decision],
                states[layer].states[batch.decision],
                states[layer].positions[batch.decision],
            )
            for layer in layers
        }
        decoded = decode_layers_states(arch, source.kind, inputs, lens=lens)
        for group, logits in _heads(arch, [decoded[layer].states for layer in layers]):
            for layer, layer_logits in zip(layers[group], logits, strict=True):
                for i in indices:
                    u = uncertainty(layer_logits, layout.signals[i].measure).cpu()
                    out[i, :, layer] = torch.zeros(n_rows).index_add_(0, rows.cpu(), u) / counts
        timer[f"confidence: {source.label}"] += time.perf_counter() - start
    return out


def _heads(arch: Architecture, states: list[torch.Tensor]) -> Iterator[tuple[slice, torch.Tensor]]:
    """`arch.head` over equally long `[k, d]` states, as few wide products as
    `HEAD_CHUNK_LOGITS` allows: yields which states each covers and their logits
    `[g, k, vocab]`."""
    if not states:
        return
    k = states[0].shape[0]
    per_product = max(1, HEAD_CHUNK_LOGITS // max(1, k * arch.lm_head.out_features))
    for first in range(0, len(states), per_product):
        group = slice(first, min(first + per_product, len(states)))
        logits = arch.head(torch.cat(states[group]))
        yield group, logits.view(group.stop - group.start, k, -1)
