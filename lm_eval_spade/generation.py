"""SPADE-EXIT in generation: every new token runs block by block and exits on its own.

One batch of left-padded prompts. Step 0 runs the prompts; each later step runs the
token chosen at the step before. In every step the running rows climb the trunk with a
key/value cache (`kv_cache.KVStore`); at each check the confidence decoder gives the
uncertainty at the newest position, and rows at or below the threshold leave the batch
there (a fixed `exit_layer` is one check that always passes). A leaving row's next-token
logits come from the exit layer's decoder, and the KV strategy decides what the blocks
above the exit hold for its positions. Rows that never pass run to L and use the head.

SPADE in generation: the pair `[h_0^l, h_t^l]` runs the upper blocks as a causal
sequence, and its first token, the start token, attends only to itself, so its states
and keys/values at every block are the trunk's own for position 0. They are made once
per row (`_run_start_tokens`), and each step's pair is then one token per upper block
that attends to the cached start token and to itself: the same logits as `decoders.py`'s
pair, at half the passes.

Greedy and sampled choices (`sampling.py`), stop sequences and the length limit follow
`model.generate`: finished rows get the pad token and are not run any more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteriaList

from lm_eval_spade.architectures import Architecture
from lm_eval_spade.confidence import uncertainty
from lm_eval_spade.decoders import DecoderKind, LayerStates, SpadePositions, decode_layers
from lm_eval_spade.exiting import ExitPlan
from lm_eval_spade.kv_cache import (
    BlockCache,
    KVStore,
    KVStrategy,
    causal_allowed,
    pair_allowed,
)
from lm_eval_spade.sampling import Sampling

_CLIMBING = (DecoderKind.SPADE, DecoderKind.SPADE_NOS)


@dataclass
class RowRecord:
    """What one row's generation did and cost (block-token passes, as `stats.py`)."""

    exit_layers: list[int] = field(default_factory=list)  # one per generated token
    confidence: float | None = None  # uncertainty at the first token's last check
    passes_run: int = 0
    passes_full: int = 0  # a full-depth run of the same tokens
    checks: int = 0
    kv_projections: int = 0  # `copy`: a norm and K/V maps at one position and block each


@dataclass
class Generated:
    tokens: torch.Tensor  # [B, T + steps]: prompts (left padded), then the generated ids
    rows: list[RowRecord]
    kv: KVStore  # the cache as the last step left it


@dataclass(frozen=True)
class GenerationPlan:
    """Where tokens exit and how they are decoded, what the cache keeps above an exit,
    and how the next token is chosen."""

    exits: ExitPlan
    kv_strategy: KVStrategy
    sampling: Sampling


def generate(
    arch: Architecture,
    plan: GenerationPlan,
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_length: int,
    stopping: StoppingCriteriaList,
    pad_token_id: int,
) -> Generated:
    """Generate from left-padded `ids` `[B, T]` until `stopping` says every row is done
    (it should hold the length limit `max_length`, the EOS ids and the stop sequences)."""
    return _Generator(arch, plan, ids, attention_mask, max_length).run(stopping, pad_token_id)


class _Generator:
    def __init__(
        self,
        arch: Architecture,
        plan: GenerationPlan,
        ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_length: int,
    ) -> None:
        self.arch, self.plan = arch, plan.exits
        self.strategy, self.sampling = plan.kv_strategy, plan.sampling
        self.num_layers = arch.num_layers
        self.ids = ids
        batch, prompt = ids.shape
        slots = max(max_length, prompt + 1)
        real = torch.ones((batch, slots), dtype=torch.bool, device=ids.device)
        real[:, :prompt] = attention_mask.bool()
        positions = real.long().cumsum(dim=1) - 1
        positions.masked_fill_(~real, 1)  # padding, as `generate` numbers it
        self.kv = KVStore(self.num_layers, real, positions)
        self.rows = [RowRecord() for _ in range(batch)]
        self.step = 0
        self.step_slot = prompt - 1  # the newest position

    # --- the loop --------------------------------------------------------------------
    def run(self, stopping: StoppingCriteriaList, pad_token_id: int) -> Generated:
        ids = self.ids
        batch, prompt = ids.shape
        unfinished = torch.ones(batch, dtype=torch.bool, device=ids.device)
        if self.plan.decoder is DecoderKind.SPADE and self.plan.checks:
            self._run_start_tokens()
        everyone = torch.arange(batch, device=ids.device)
        slots = torch.arange(prompt, device=ids.device).expand(batch, prompt)
        hidden = self.arch.embed(ids, self.kv.positions[:, :prompt])
        for row in range(batch):
            real = int(self.kv.real[row, :prompt].sum())
            self.rows[row].passes_full += self.num_layers * real
        logits = self._climb(everyone, slots, hidden)
        while True:
            running = unfinished.nonzero().squeeze(1)
            chosen = torch.full((batch,), pad_token_id, dtype=ids.dtype, device=ids.device)
            chosen[running] = self.sampling.choose(ids[running], logits).to(ids.dtype)
            ids = torch.cat([ids, chosen[:, None]], dim=1)
            unfinished &= ~stopping(ids, None)
            if not bool(unfinished.any()):
                break
            running = unfinished.nonzero().squeeze(1)
            slot = ids.shape[1] - 1
            self.step, self.step_slot = self.step + 1, slot
            slots = torch.full((len(running), 1), slot, device=ids.device)
            hidden = self.arch.embed(
                ids[running, slot:], self.kv.positions[running, slot : slot + 1]
            )
            for row in running.tolist():
                self.rows[row].passes_full += self.num_layers
            logits = self._climb(running, slots, hidden)
        return Generated(ids, self.rows, self.kv)

    def _climb(self, rows: torch.Tensor, slots: torch.Tensor, hidden: torch.Tensor):
        """One step: `hidden` `[r, q, d]` of query `slots` climbs with exits; returns the
        next-token logits `[r, vocab]` of each row, decided at its last query."""
        logits: torch.Tensor | None = None
        local = torch.arange(len(rows), device=rows.device)
        layer = 0
        for check in (*self.plan.checks, self.num_layers):
            hidden = self._trunk(rows[local], slots[local], hidden, layer, check)
            layer = check
            go = self._passes(rows[local], slots[local, -1], hidden[:, -1], check)
            if bool(go.any()):
                out = self._exit(rows[local[go]], slots[local[go]], hidden[go], check)
                if logits is None:
                    logits = out.new_empty((len(rows), out.shape[-1]))
                logits[local[go]] = out
                local, hidden = local[~go], hidden[~go]
                if len(local) == 0:
                    break
        assert logits is not None
        return logits

    # --- the trunk -----------------------------------------------------------------------
    def _trunk(
        self, rows: torch.Tensor, slots: torch.Tensor, hidden: torch.Tensor, start: int, end: int
    ) -> torch.Tensor:
        """Blocks `start+1..end` for the step's queries; under lazy recomputation, earlier
        positions that lack a block run it with them first."""
        for record, n in zip(self._records(rows), self._real_counts(rows, slots), strict=True):
            record.passes_run += n * (end - start)
        if start == end:
            return hidden
        if not self.strategy.keeps_exit_states or self.step == 0 or self._complete(rows, end):
            return self._run(rows, slots, hidden, start, end, causal=True)
        for block in range(start, end):
            hidden = self._block_with_missing(rows, slots, hidden, block)
        return hidden

    def _complete(self, rows: torch.Tensor, end: int) -> bool:
        """Whether every earlier position of these rows has keys/values up to `end`."""
        kv, slot = self.kv, self.step_slot
        return bool(((kv.depth[rows, :slot] >= end) | ~kv.real[rows, :slot]).all())

    def _block_with_missing(
        self, rows: torch.Tensor, slots: torch.Tensor, hidden: torch.Tensor, block: int
    ) -> torch.Tensor:
        """Block `block` for this step's token, and for every earlier position of its row
        that has keys/values below `block` only (lazy recomputation)."""
        kv = self.kv
        slot = int(slots[0, -1])
        missing = (kv.depth[rows, :slot] == block) & kv.real[rows, :slot]
        if not bool(missing.any()):
            return self._run(rows, slots, hidden, block, block + 1, causal=True)
        assert kv.saved is not None
        counts = missing.sum(dim=1)
        which, where = missing.nonzero(as_tuple=True)
        rank = torch.arange(len(which), device=rows.device) - (counts.cumsum(0) - counts)[which]
        width = int(counts.max())
        # Queries: the missing slots, padded with copies of the step's own slot (which
        # compute exactly what the real one does), then the step's own slot.
        extra = slots[:, -1:].repeat(1, width)
        extra[which, rank] = where
        extra_hidden = hidden[:, -1:].repeat(1, width, 1)
        extra_hidden[which, rank] = kv.saved[rows[which], where]
        out = self._run(
            rows,
            torch.cat([extra, slots], dim=1),
            torch.cat([extra_hidden, hidden], dim=1),
            block,
            block + 1,
            causal=True,
        )
        kv.save(rows[which], where[:, None], out[which, rank][:, None])
        for record, n in zip(self._records(rows), counts.tolist(), strict=True):
            record.passes_run += n
        return out[:, width:]

    def _run(
        self,
        rows: torch.Tensor,
        slots: torch.Tensor,
        hidden: torch.Tensor,
        start: int,
        end: int,
        causal: bool,
    ) -> torch.Tensor:
        """Blocks `start+1..end` for query `slots` against the cache: causal attention
        (with the model's sliding window where a block has one), or SPADE's pair."""
        arch, kv = self.arch, self.kv
        if causal:
            allowed = {
                kind: causal_allowed(
                    kv, rows, slots, arch.sliding_window if kind == "sliding_attention" else None
                )
                for kind in arch.mask_kinds(range(start, end))
            }
        else:
            pair = pair_allowed(kv, rows, slots, self.plan.decoder is DecoderKind.SPADE)
            allowed = dict.fromkeys(arch.mask_kinds(range(start, end)), pair)
        masks = {kind: arch.attention_mask(a, hidden.dtype) for kind, a in allowed.items()}
        union = torch.stack(list(allowed.values())).any(dim=0)
        cache = BlockCache(kv, rows, slots, union)
        positions = kv.positions[rows[:, None], slots]
        if not causal and self.plan.spade_positions is SpadePositions.COMPACT:
            at_start = slots == kv.first_real[rows][:, None]
            compact = 1 if self.plan.decoder is DecoderKind.SPADE else 0
            positions = torch.where(at_start, 0, torch.full_like(positions, compact))
        return arch.run_blocks(hidden, start, end, positions, masks, cache)

    # --- exits -----------------------------------------------------------------------------
    def _passes(
        self, rows: torch.Tensor, slots: torch.Tensor, hidden: torch.Tensor, layer: int
    ) -> torch.Tensor:
        """Which rows exit at `layer`, from the uncertainty at their newest position."""
        go = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
        plan = self.plan
        if layer == self.num_layers or plan.threshold is None:
            return go
        positions = self.kv.positions[rows, slots]
        x = LayerStates(hidden, hidden, positions)
        logits = decode_layers(self.arch, plan.confidence_decoder, {layer: x}, lens=plan.lens)
        u = uncertainty(logits[layer].logits, plan.confidence)
        for record, value in zip(self._records(rows), u.tolist(), strict=True):
            record.checks += 1
            if self.step == 0:
                record.confidence = value
        return u <= plan.threshold

    def _exit(
        self, rows: torch.Tensor, slots: torch.Tensor, hidden: torch.Tensor, layer: int
    ) -> torch.Tensor:
        """Next-token logits of rows leaving at `layer`, and the cache above it."""
        for record in self._records(rows):
            record.exit_layers.append(layer)
        last = hidden[:, -1]
        if layer == self.num_layers:
            return self.arch.head(last)
        decoder = self.plan.decoder
        if decoder in _CLIMBING:
            top = self._run(rows, slots[:, -1:], last[:, None], layer, self.num_layers, False)
            for record in self._records(rows):
                record.passes_run += self.num_layers - layer
            logits = self.arch.head(top[:, -1])
        else:
            positions = self.kv.positions[rows, slots[:, -1]]
            x = LayerStates(last, last, positions)
            decoded = decode_layers(self.arch, decoder, {layer: x}, lens=self.plan.lens)
            logits = decoded[layer].logits
        self._keep_above(rows, slots, hidden, layer)
        return logits

    def _keep_above(
        self, rows: torch.Tensor, slots: torch.Tensor, hidden: torch.Tensor, layer: int
    ) -> None:
        """What the blocks above `layer` hold for the step's positions (module doc)."""
        kv = self.kv
        if self.strategy is KVStrategy.COPY:
            positions = kv.positions[rows[:, None], slots]
            for block in range(layer, self.num_layers):
                keys, values = self.arch.key_values(block, hidden, positions)
                kv.write(block, rows, slots, keys, values)
            counts = self._real_counts(rows, slots)
            for record, n in zip(self._records(rows), counts, strict=True):
                record.kv_projections += n * (self.num_layers - layer)
            return
        kv.save(rows, slots, hidden)
        if self.strategy is KVStrategy.RECOMPUTE and self.plan.decoder in _CLIMBING:
            # The pair's keys/values are SPADE's, not the trunk's: drop them, except at
            # the start token, which attends to itself alone either way.
            own = slots[:, -1:]
            not_start = own[:, 0] != kv.first_real[rows]
            kv.set_depth(rows[not_start], own[not_start], layer)

    def _run_start_tokens(self) -> None:
        """Each row's start token through all blocks, alone: SPADE's pairs attend to it."""
        kv = self.kv
        rows = torch.arange(kv.batch_size, device=self.ids.device)
        slots = kv.first_real[:, None]
        hidden = self.arch.embed(self.ids[rows[:, None], slots], kv.positions[rows[:, None], slots])
        self._run(rows, slots, hidden, 0, self.num_layers, causal=False)
        for record in self.rows:
            record.passes_run += self.num_layers

    # --- bookkeeping ---------------------------------------------------------------------
    def _records(self, rows: torch.Tensor) -> list[RowRecord]:
        return [self.rows[row] for row in rows.tolist()]

    def _real_counts(self, rows: torch.Tensor, slots: torch.Tensor) -> list[int]:
        return self.kv.real[rows[:, None], slots].sum(dim=1).tolist()
