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
    block_token_passes: int


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
    if kind is DecoderKind.LOGIT_LENS or layer == arch.num_layers:
        return Decoded(arch.head(states), 0)
    if kind.needs_lens:
        if lens is None:
            raise ValueError(f"decoder {kind.value} needs a trained lens")
        return Decoded(lens.logits(arch, states, layer), 0)
    compact = spade_positions is SpadePositions.COMPACT
    if kind is DecoderKind.SPADE_NOS:
        pos = torch.zeros_like(positions) if compact else positions
        seqs, pos_ids = states[:, None], pos[:, None]
    else:
        seqs = torch.stack([start_states, states], dim=1)
        second = torch.ones_like(positions) if compact else positions
        pos_ids = torch.stack([torch.zeros_like(positions), second], dim=1)
    logits = torch.empty(
        (states.shape[0], arch.lm_head.out_features), dtype=states.dtype, device=states.device
    )
    passes = 0
    at_start = (positions == 0) & (kind is DecoderKind.SPADE)
    groups = [(~at_start, seqs, pos_ids)]
    if bool(at_start.any()):
        groups.append((at_start, states[:, None], torch.zeros_like(positions)[:, None]))
    for select, group_seqs, group_pos in groups:
        index = select.nonzero().squeeze(1)
        for chunk in index.split(max_sequences):
            upper = arch.run_blocks(group_seqs[chunk], layer, arch.num_layers, group_pos[chunk])
            logits[chunk] = arch.head(upper[:, -1]).to(logits.dtype)
            passes += (arch.num_layers - layer) * upper.shape[0] * upper.shape[1]
    return Decoded(logits, passes)
