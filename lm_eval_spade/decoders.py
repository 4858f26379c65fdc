"""Decoders at layer l: logits for chosen positions from the hidden states `h^l`.

Definitions follow `SPADE.md`:

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
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

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


class SpadePositions(str, Enum):
    """Position ids the SPADE pair runs with (rotary families; learned positions are
    already inside `h^l`)."""

    ORIGINAL = "original"  # (0, i): the pair keeps the positions it had in the sequence
    COMPACT = "compact"  # (0, 1)


@dataclass
class Decoded:
    """Logits for the requested positions, and the block-token passes spent on them."""

    logits: torch.Tensor  # [k, vocab]
    passes: torch.Tensor  # [k]: block-token passes spent above the layer, per position

    @property
    def block_token_passes(self) -> int:
        return int(self.passes.sum())


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
) -> Decoded:
    """Decode `k` positions from layer `layer`.

    `states[j]` is `h_i^l` for position `positions[j]` of some sequence, and
    `start_states[j]` is `h_0^l` of that same sequence (used by SPADE only). `lens` holds
    the translators of the tuned-lens and L-SPADE decoders.
    """
    inputs = {layer: LayerStates(start_states, states, positions)}
    return decode_layers(arch, kind, inputs, spade_positions, max_sequences, lens)[layer]


def decode_layers(
    arch: Architecture,
    kind: DecoderKind,
    inputs: dict[int, LayerStates],
    spade_positions: SpadePositions = SpadePositions.ORIGINAL,
    max_sequences: int = 1024,
    lens: Lens | None = None,
) -> dict[int, Decoded]:
    """Decode at several layers at once.

    SPADE's short sequences from every layer climb the blocks together, each joining at
    the block above its own layer, so decoding L layers costs L block calls rather than
    L(L+1)/2 (the passes, counted per sequence, are the same).
    """
    out: dict[int, Decoded] = {}
    climbs: list[_Climb] = []
    for layer, x in inputs.items():
        free = torch.zeros(x.states.shape[0], dtype=torch.long, device=x.states.device)
        if kind is DecoderKind.LOGIT_LENS or layer == arch.num_layers:
            out[layer] = Decoded(arch.head(x.states), free)
        elif kind.needs_lens:
            if lens is None:
                raise ValueError(f"decoder {kind.value} needs a trained lens")
            out[layer] = Decoded(lens.logits(arch, x.states, layer), free)
        else:
            climbs += _climbs(kind, layer, x, spade_positions, max_sequences)
    if not climbs:
        return out
    logits = {
        layer: torch.empty(
            (x.states.shape[0], arch.lm_head.out_features),
            dtype=x.states.dtype,
            device=x.states.device,
        )
        for layer, x in inputs.items()
        if layer not in out
    }
    passes = {
        layer: torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for layer, x in logits.items()
    }
    for wave in _waves(climbs):
        for climb, top in zip(wave, _climb_together(arch, wave), strict=True):
            logits[climb.layer][climb.rows] = arch.head(top).to(logits[climb.layer].dtype)
            passes[climb.layer][climb.rows] = (arch.num_layers - climb.layer) * climb.seqs.shape[1]
    out.update({layer: Decoded(logits[layer], passes[layer]) for layer in logits})
    return out


def _climbs(
    kind: DecoderKind,
    layer: int,
    x: LayerStates,
    spade_positions: SpadePositions,
    max_sequences: int,
) -> list[_Climb]:
    """The sequences decoding `x` needs, in chunks of at most `max_sequences`."""
    compact = spade_positions is SpadePositions.COMPACT
    positions = x.positions
    if kind is DecoderKind.SPADE_NOS:
        pos = torch.zeros_like(positions) if compact else positions
        seqs, pos_ids = x.states[:, None], pos[:, None]
    else:
        seqs = torch.stack([x.start_states, x.states], dim=1)
        second = torch.ones_like(positions) if compact else positions
        pos_ids = torch.stack([torch.zeros_like(positions), second], dim=1)
    at_start = (positions == 0) & (kind is DecoderKind.SPADE)
    groups = [(~at_start, seqs, pos_ids)]
    if bool(at_start.any()):  # position 0 has no earlier start token: `[h_0]` alone
        groups.append((at_start, x.states[:, None], torch.zeros_like(positions)[:, None]))
    return [
        _Climb(layer, chunk, group_seqs[chunk], group_pos[chunk])
        for select, group_seqs, group_pos in groups
        for chunk in select.nonzero().squeeze(1).split(max_sequences)
    ]


def _waves(climbs: list[_Climb]) -> list[list[_Climb]]:
    """Climbs that can run as one batch: same sequence length, one chunk per layer."""
    waves: dict[tuple[int, int], list[_Climb]] = {}
    seen: dict[tuple[int, int], int] = {}
    for climb in climbs:
        key = (climb.layer, climb.seqs.shape[1])
        chunk = seen.get(key, 0)
        seen[key] = chunk + 1
        waves.setdefault((climb.seqs.shape[1], chunk), []).append(climb)
    return list(waves.values())


def _climb_together(arch: Architecture, wave: list[_Climb]) -> list[torch.Tensor]:
    """Last-token hidden state after block L for each climb, in the order given."""
    order = sorted(range(len(wave)), key=lambda i: wave[i].layer)
    hidden: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    joined = 0
    for block in range(wave[order[0]].layer, arch.num_layers):
        while joined < len(order) and wave[order[joined]].layer == block:
            climb = wave[order[joined]]
            hidden = climb.seqs if hidden is None else torch.cat([hidden, climb.seqs])
            position_ids = (
                climb.position_ids
                if position_ids is None
                else torch.cat([position_ids, climb.position_ids])
            )
            joined += 1
        assert hidden is not None and position_ids is not None
        hidden = arch.run_blocks(hidden, block, block + 1, position_ids)
    assert hidden is not None
    tops = hidden[:, -1].split([len(wave[i].rows) for i in order])
    result: list[torch.Tensor] = [torch.empty(0)] * len(wave)
    for i, top in zip(order, tops, strict=True):
        result[i] = top
    return result
