"""Decoders at layer l: logits for chosen positions from the hidden states `h^l`.

Definitions follow `docs/method.md` ("The decoders at layer l"):

- logit lens: `head(h_i^l)`;
- SPADE: run the 2-token sequence `[h_0^l, h_i^l]` through blocks `l+1..L` as a causal
  sequence and take `head` of its second token;
- SPADE-NoS: the same with the 1-token sequence `[h_i^l]`;
- tuned lens and L-SPADE: `head(h_i^l + A_l h_i^l + b_l)` with a trained translator
  (`lm_eval_spade.lens`); they differ only in what the translator was trained to match.

Many positions are decoded as a batch of independent short sequences, so the cost grows
with `(L - l) * 2` block-token passes per position and never with the context length.
Position 0 has no earlier start token to pair with; SPADE decodes it as the 1-token
sequence `[h_0^l]`, which is what the full model computes there.

`spade_start=shared` computes the same thing at half the cost: under causal attention
the pair's first token never sees the second, so its states above `l` are the same for
every position that shares `h_0^l` (in a batch, every row with the same start token).
It climbs once per distinct `h_0^l`, and each position climbs alone, attending at every
block to the keys and values the start token left there: `L - l` passes per position.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch

from lm_eval_spade.architectures import Architecture

if TYPE_CHECKING:
    from lm_eval_spade.lens import Lens


class DecoderKind(str, Enum):
    LOGIT_LENS = "logit_lens"
    SPADE = "spade"
    SPADE_NOS = "spade_nos"
    TUNED_LENS = "tuned_lens"
    LSPADE = "lspade"

    @property
    def needs_start_token(self) -> bool:
        return self is DecoderKind.SPADE

    @property
    def needs_lens(self) -> bool:
        return self in (DecoderKind.TUNED_LENS, DecoderKind.LSPADE)


class SpadeStart(str, Enum):
    """How SPADE's start token climbs the blocks above the decoded layer."""

    PAIR = "pair"  # with every position, as a 2-token sequence (docs/method.md's count)
    SHARED = "shared"  # once per distinct `h_0^l`; positions attend to its keys/values


class SpadePositions(str, Enum):
    """Position ids the SPADE pair runs with (rotary families; learned positions are
    already inside `h^l`)."""

    ORIGINAL = "original"  # (0, i): the pair keeps the positions it had in the sequence
    COMPACT = "compact"  # (0, 1)


@dataclass
class Decoded:
    """Logits for the requested positions, and the block-token passes spent on them."""

    logits: torch.Tensor  # [k, vocab]
    passes: torch.Tensor  # [k] float64: block-token passes spent above the layer, per position

    @property
    def block_token_passes(self) -> float:
        return float(self.passes.sum())


@dataclass
class DecodedStates:
    """What the head reads for the requested positions (`arch.head(states)` are their
    logits), and the block-token passes spent on them. Callers that decode many layers
    run the head over all of them at once: one wide product instead of one per layer."""

    states: torch.Tensor  # [k, d]
    passes: torch.Tensor  # [k] float64

    def decoded(self, arch: Architecture) -> Decoded:
        return Decoded(arch.head(self.states), self.passes)


@dataclass
class LayerStates:
    """What decoding at layer `l` needs: `h_i^l` at the positions to decode, their
    positions `i`, and `h_0^l` of each one's own sequence (SPADE's start token)."""

    start_states: torch.Tensor  # [k, d]
    states: torch.Tensor  # [k, d]
    positions: torch.Tensor  # [k]


@dataclass
class _Climb:
    """Short sequences that enter the blocks above `layer` together."""

    layer: int
    rows: torch.Tensor  # which of the layer's k positions these are
    seqs: torch.Tensor  # [n, s, d]
    position_ids: torch.Tensor  # [n, s]
    #: Shared start tokens: `starts` `[u, 1, d]` are the distinct `h_0^l`, `start_of`
    #: `[n]` says which one each sequence attends to (None: no shared start).
    starts: torch.Tensor | None = None
    start_of: torch.Tensor | None = None

    def passes(self, num_layers: int) -> float:
        """Block-token passes per sequence above the layer, shared starts split evenly."""
        shared = 0.0 if self.starts is None else len(self.starts) / len(self.rows)
        return (num_layers - self.layer) * (self.seqs.shape[1] + shared)


def decode(
    arch: Architecture,
    kind: DecoderKind,
    layer: int,
    start_states: torch.Tensor,
    states: torch.Tensor,
    positions: torch.Tensor,
    spade_positions: SpadePositions = SpadePositions.ORIGINAL,
    max_sequences: int = 1024,
    lens: Lens | None = None,
    spade_start: SpadeStart = SpadeStart.PAIR,
) -> Decoded:
    """Decode `k` positions from layer `layer`.

    `states[j]` is `h_i^l` for position `positions[j]` of some sequence, and
    `start_states[j]` is `h_0^l` of that same sequence (used by SPADE only). `lens` holds
    the translators of the tuned-lens and L-SPADE decoders.
    """
    inputs = {layer: LayerStates(start_states, states, positions)}
    return decode_layers(arch, kind, inputs, spade_positions, max_sequences, lens, spade_start)[
        layer
    ]


def decode_layers(
    arch: Architecture, kind: DecoderKind, inputs: dict[int, LayerStates], *args: Any, **kw: Any
) -> dict[int, Decoded]:
    """Decode at several layers at once, through the head; the other arguments are
    `decode_layers_states`'s."""
    states = decode_layers_states(arch, kind, inputs, *args, **kw)
    return {layer: x.decoded(arch) for layer, x in states.items()}


def decode_layers_states(
    arch: Architecture,
    kind: DecoderKind,
    inputs: dict[int, LayerStates],
    spade_positions: SpadePositions = SpadePositions.ORIGINAL,
    max_sequences: int = 1024,
    lens: Lens | None = None,
    spade_start: SpadeStart = SpadeStart.PAIR,
) -> dict[int, DecodedStates]:
    """Decode at several layers at once, up to the head.

    SPADE's short sequences from every layer climb the blocks together, each joining at
    the block above its own layer, so decoding L layers costs L block calls rather than
    L(L+1)/2 (the passes, counted per sequence, are the same).
    """
    out: dict[int, DecodedStates] = {}
    climbs: list[_Climb] = []
    for layer, x in inputs.items():
        free = torch.zeros(x.states.shape[0], dtype=torch.float64, device=x.states.device)
        if kind is DecoderKind.LOGIT_LENS or layer == arch.num_layers:
            out[layer] = DecodedStates(x.states, free)
        elif kind.needs_lens:
            if lens is None:
                raise ValueError(f"decoder {kind.value} needs a trained lens")
            out[layer] = DecodedStates(lens.head_input(arch, x.states, layer), free)
        else:
            climbs += _climbs(kind, layer, x, spade_positions, max_sequences, spade_start)
    climbed = {
        layer: DecodedStates(
            torch.empty_like(x.states),
            torch.zeros(x.states.shape[0], dtype=torch.float64, device=x.states.device),
        )
        for layer, x in inputs.items()
        if layer not in out
    }
    for wave in _waves(climbs):
        for climb, top in zip(wave, _climb_together(arch, wave), strict=True):
            climbed[climb.layer].states[climb.rows] = top.to(climbed[climb.layer].states.dtype)
            climbed[climb.layer].passes[climb.rows] = climb.passes(arch.num_layers)
    return {**out, **climbed}


def _climbs(
    kind: DecoderKind,
    layer: int,
    x: LayerStates,
    spade_positions: SpadePositions,
    max_sequences: int,
    spade_start: SpadeStart = SpadeStart.PAIR,
) -> list[_Climb]:
    """The sequences decoding `x` needs, in chunks of at most `max_sequences`."""
    compact = spade_positions is SpadePositions.COMPACT
    positions = x.positions
    shared = kind is DecoderKind.SPADE and spade_start is SpadeStart.SHARED
    if kind is DecoderKind.SPADE_NOS:
        pos = torch.zeros_like(positions) if compact else positions
        seqs, pos_ids = x.states[:, None], pos[:, None]
    elif shared:  # each position alone, at the second position of its pair
        pos = torch.ones_like(positions) if compact else positions
        seqs, pos_ids = x.states[:, None], pos[:, None]
    else:
        seqs = torch.stack([x.start_states, x.states], dim=1)
        second = torch.ones_like(positions) if compact else positions
        pos_ids = torch.stack([torch.zeros_like(positions), second], dim=1)
    at_start = (positions == 0) & (kind is DecoderKind.SPADE)
    climbs = [
        _Climb(layer, chunk, seqs[chunk], pos_ids[chunk])
        for chunk in (~at_start).nonzero().squeeze(1).split(max_sequences)
        if len(chunk)
    ]
    if shared:
        for climb in climbs:
            starts, climb.start_of = torch.unique(
                x.start_states[climb.rows], dim=0, return_inverse=True
            )
            climb.starts = starts[:, None]
    # Position 0 has no earlier start token: `[h_0]` alone.
    return climbs + [
        _Climb(layer, chunk, x.states[chunk, None], torch.zeros_like(positions)[chunk, None])
        for chunk in at_start.nonzero().squeeze(1).split(max_sequences)
        if len(chunk)
    ]


def _waves(climbs: list[_Climb]) -> list[list[_Climb]]:
    """Climbs that can run as one batch: same sequence length and start sharing, one
    chunk per layer."""
    waves: dict[tuple[int, bool, int], list[_Climb]] = {}
    seen: dict[tuple[int, int, bool], int] = {}
    for climb in climbs:
        shape = (climb.seqs.shape[1], climb.starts is not None)
        key = (climb.layer, *shape)
        chunk = seen.get(key, 0)
        seen[key] = chunk + 1
        waves.setdefault((*shape, chunk), []).append(climb)
    return list(waves.values())


def _climb_together(arch: Architecture, wave: list[_Climb]) -> list[torch.Tensor]:
    """Last-token hidden state after block L for each climb, in the order given."""
    order = sorted(range(len(wave)), key=lambda i: wave[i].layer)
    shared = wave[0].starts is not None
    hidden: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    starts: torch.Tensor | None = None  # [u, 1, d]: the joined climbs' start tokens
    start_of: torch.Tensor | None = None  # [n]: each sequence's start token
    joined = 0
    for block in range(wave[order[0]].layer, arch.num_layers):
        while joined < len(order) and wave[order[joined]].layer == block:
            climb = wave[order[joined]]
            if shared:
                assert climb.starts is not None and climb.start_of is not None
                offset = 0 if starts is None else len(starts)
                starts = _join(starts, climb.starts)
                start_of = _join(start_of, climb.start_of + offset)
            hidden = _join(hidden, climb.seqs)
            position_ids = _join(position_ids, climb.position_ids)
            joined += 1
        assert hidden is not None and position_ids is not None
        if shared:
            assert starts is not None and start_of is not None
            starts, cache = _start_block(arch, block, starts, start_of)
            allowed = torch.ones((len(hidden), 1, 2), dtype=torch.bool, device=hidden.device)
            mask = arch.attention_mask(allowed, hidden.dtype)
            masks = dict.fromkeys(arch.mask_kinds(range(block, block + 1)), mask)
            hidden = arch.run_blocks(hidden, block, block + 1, position_ids, masks, cache)
        else:
            hidden = arch.run_blocks(hidden, block, block + 1, position_ids)
    assert hidden is not None
    tops = hidden[:, -1].split([len(wave[i].rows) for i in order])
    result: list[torch.Tensor] = [torch.empty(0)] * len(wave)
    for i, top in zip(order, tops, strict=True):
        result[i] = top
    return result


def _join(head: torch.Tensor | None, tail: torch.Tensor) -> torch.Tensor:
    return tail if head is None else torch.cat([head, tail])


class _SharedStart:
    """A cache that puts a start token's keys/values before each query's own: block `b`
    of the pair `[h_0, h_i]` at `h_i`, with `h_0`'s part computed once."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.start_of: torch.Tensor | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.start_of is None:  # the start tokens' own pass: keep what they wrote
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        assert self.keys is not None and self.values is not None
        keys = torch.cat([self.keys[self.start_of], key_states], dim=2)
        values = torch.cat([self.values[self.start_of], value_states], dim=2)
        return keys, values


def _start_block(
    arch: Architecture, block: int, starts: torch.Tensor, start_of: torch.Tensor
) -> tuple[torch.Tensor, _SharedStart]:
    """Run the start tokens (each alone, at position 0) through `block`; return their
    states above it and the cache that lets each sequence attend to its start there."""
    cache = _SharedStart()
    zeros = torch.zeros(starts.shape[:2], dtype=torch.long, device=starts.device)
    starts = arch.run_blocks(starts, block, block + 1, zeros, cache=cache)
    cache.start_of = start_of
    return starts, cache
