"""Keys and values of every block for early-exit generation, and what fills them.

A token that exits at layer `l` runs no trunk blocks above `l`, yet a later token that
runs deeper attends to every earlier position at every block it runs. The strategies of
`docs/method.md` ("SPADE-EXIT in generation") for the blocks above an exit:

- `fill`: the keys/values the exiting token computed in SPADE's own pass through the
  upper blocks (the pair `[h_0^l, h_t^l]`, whose second token is this position). Free,
  since SPADE runs that pass anyway to decode; approximate, since that pass attends to the
  start token only. Prompt positions before the decoded one have no such pass and are
  recomputed lazily, as `recompute` does.
- `copy`: CALM's state propagation: the exit state `h^l` is taken as the input of every
  upper block and projected to keys/values there (norm and K/V maps only). Cheap,
  approximate.
- `recompute`: lazily (EE-LLM, LayerSkip): the exit state is kept, and when a later token
  runs block `b`, every earlier position that lacks block `b` runs it along with that
  token. Exact: the cache equals the full model's for every block a position has.

`KVStore` records, per slot, how many blocks hold its keys/values (`depth`); a block call
refuses, with an error, to attend to any slot that lacks them. So a strategy that forgot a
slot fails loudly instead of attending to zeros or to another token's leftovers.
"""

from __future__ import annotations

from enum import Enum

import torch


class KVStrategy(str, Enum):
    FILL = "fill"
    COPY = "copy"
    RECOMPUTE = "recompute"

    @property
    def keeps_exit_states(self) -> bool:
        """Whether exit states are kept for lazy recomputation."""
        return self in (KVStrategy.FILL, KVStrategy.RECOMPUTE)


def default_kv_strategy(climbs: bool) -> KVStrategy:
    """Chosen by measurement (`benchmarks/generation_speed.py`, README): `fill` where the
    decoder runs SPADE's pass at the token's own position (`climbs`), since it matched
    `recompute`'s perplexity within 1% at less compute and time; else `recompute`, exact
    and free above a fixed exit, where no later token goes deeper."""
    return KVStrategy.FILL if climbs else KVStrategy.RECOMPUTE


class MissingKeyValuesError(RuntimeError):
    """A query would attend to a slot whose keys/values at that block were never made.

    Always a bug in a strategy: the check exists so that it cannot pass silently."""


class KVStore:
    """Per block, keys and values `[batch, kv_heads, slots, head_dim]` of a left-padded
    batch, plus per slot: whether it is a real token, its position id, how many blocks
    hold its keys/values, and (for lazy recomputation) its hidden state after them."""

    def __init__(self, num_layers: int, real: torch.Tensor, positions: torch.Tensor) -> None:
        self.num_layers = num_layers
        self.real = real  # [B, S] bool
        self.positions = positions  # [B, S] long
        self.depth = torch.zeros_like(positions)  # [B, S]: blocks 0..depth-1 hold this slot
        self.first_real = real.long().argmax(dim=1)  # [B]: the start token's slot
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.saved: torch.Tensor | None = None  # [B, S, d]: hidden state after `depth` blocks
        self._all_rows = torch.arange(real.shape[0], device=real.device)

    @property
    def batch_size(self) -> int:
        return int(self.real.shape[0])

    def write(
        self,
        block: int,
        rows: torch.Tensor,
        slots: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        span: slice | None = None,
    ) -> None:
        """Store `keys`/`values` `[r, heads, q, head_dim]` of `slots` `[r, q]` at `block`.

        `span`: the same slots as a slice, given when `rows` are all rows and every row's
        `slots` are that one contiguous range (`contiguous_span`), the case of every
        generation step: slicing is cheaper than the general scatter."""
        if self.keys[block] is None:
            shape = (self.batch_size, keys.shape[1], self.real.shape[1], keys.shape[3])
            self.keys[block] = keys.new_zeros(shape)
            self.values[block] = values.new_zeros(shape)
        if span is not None:
            self.keys[block][:, :, span] = keys  # type: ignore[index]
            self.values[block][:, :, span] = values  # type: ignore[index]
            self.depth[:, span].clamp_(min=block + 1)
            return
        index = (rows[:, None], slice(None), slots)
        self.keys[block][index] = keys.transpose(1, 2)  # type: ignore[index]
        self.values[block][index] = values.transpose(1, 2)  # type: ignore[index]
        self.raise_depth(rows, slots, block + 1)

    def contiguous_span(self, rows: torch.Tensor, slots: torch.Tensor) -> slice | None:
        """`slots` `[r, q]` as one slice if `rows` are all rows, in order, and every row's
        slots are the same consecutive range; else None."""
        if len(rows) != self.batch_size or not bool((rows == self._all_rows).all()):
            return None
        first = int(slots[0, 0])
        span = torch.arange(first, first + slots.shape[1], device=slots.device)
        return slice(first, first + slots.shape[1]) if bool((slots == span).all()) else None

    def read(self, block: int, rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[block], self.values[block]
        assert keys is not None and values is not None
        if len(rows) == self.batch_size:  # rows are sorted and distinct: all of them
            return keys[:, :, :width], values[:, :, :width]
        return keys[rows, :, :width], values[rows, :, :width]

    def raise_depth(self, rows: torch.Tensor, slots: torch.Tensor, depth: int) -> None:
        index = (rows[:, None], slots)
        self.depth[index] = self.depth[index].clamp(min=depth)

    def set_depth(self, rows: torch.Tensor, slots: torch.Tensor, depth: int) -> None:
        self.depth[rows[:, None], slots] = depth

    def save(self, rows: torch.Tensor, slots: torch.Tensor, hidden: torch.Tensor) -> None:
        """Keep `hidden` `[r, q, d]` as the state of `slots` for lazy recomputation."""
        if self.saved is None:
            shape = (self.batch_size, self.real.shape[1], hidden.shape[-1])
            self.saved = hidden.new_zeros(shape)
        self.saved[rows[:, None], slots] = hidden

    def check(self, block: int, rows: torch.Tensor, slots: torch.Tensor, allowed: torch.Tensor):
        """Raise unless every slot `allowed` lets a query see holds keys/values at `block`
        (or is one of the queries, which write theirs before attending)."""
        width = allowed.shape[-1]
        have = self.depth[rows, :width] > block
        have[torch.arange(len(rows), device=rows.device)[:, None], slots] = True
        missing = allowed & ~have[:, None, :]
        if bool(missing.any()):
            row, query, slot = (int(i) for i in missing.nonzero()[0])
            raise MissingKeyValuesError(
                f"block {block}: row {int(rows[row])}, query slot {int(slots[row, query])} "
                f"would attend to slot {slot}, which has keys/values for "
                f"{int(self.depth[rows[row], slot])} blocks only"
            )


class BlockCache:
    """The cache one call of `Architecture.run_blocks` sees: `slots` `[r, q]` of batch
    rows `rows` are the queries; they attend to the slots `allowed` `[r, q, width]`
    lets them, at whichever block calls `update`."""

    def __init__(
        self, store: KVStore, rows: torch.Tensor, slots: torch.Tensor, allowed: torch.Tensor
    ) -> None:
        self.store, self.rows, self.slots, self.allowed = store, rows, slots, allowed
        # Earlier slots gain no blocks during the call (only the queries write), so every
        # block below the shallowest slot the queries may see passes the check; it runs
        # from that block up, instead of at every block of every step.
        width = allowed.shape[-1]
        seen = allowed.any(dim=1)
        seen[torch.arange(len(rows), device=rows.device)[:, None], slots] = False
        depth = store.depth[rows, :width]
        self.checked_from = int(depth[seen].min()) if bool(seen.any()) else store.num_layers
        self.span = store.contiguous_span(rows, slots)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx >= self.checked_from:
            self.store.check(layer_idx, self.rows, self.slots, self.allowed)
        self.store.write(layer_idx, self.rows, self.slots, key_states, value_states, self.span)
        return self.store.read(layer_idx, self.rows, self.allowed.shape[-1])


def causal_allowed(
    store: KVStore, rows: torch.Tensor, slots: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """Who each query may see: real slots up to its own (within `window` if given), as
    transformers' causal and sliding-window masks with left padding do. A padding query
    sees only itself, so its (ignored) output stays finite."""
    width = int(slots.max()) + 1
    keys = torch.arange(width, device=slots.device)
    query = slots[:, :, None]
    allowed = store.real[rows, :width][:, None, :] & (keys <= query)
    if window is not None:
        allowed &= query - keys < window
    return allowed | (keys == query)


def pair_allowed(
    store: KVStore, rows: torch.Tensor, slots: torch.Tensor, with_start: bool
) -> torch.Tensor:
    """SPADE's pair: each query sees its own slot and, `with_start`, its row's start
    token (SPADE-NoS: itself only), however far apart they are."""
    width = int(slots.max()) + 1
    keys = torch.arange(width, device=slots.device)
    allowed = keys == slots[:, :, None]
    if with_start:
        allowed |= keys == store.first_real[rows][:, None, None]
    return allowed
