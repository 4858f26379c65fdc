"""What lenses are trained to match, computed from the frozen model.

- L-SPADE: at the answer position `a` (the prompt's last token), SPADE's distribution
  at each layer `l`: the pair `[h_0^l, h_a^l]` through blocks `l+1..L`. The prompt runs
  once, up to the deepest layer asked for; only the 2-token pairs go further up.
- Tuned lens: at every position, the final layer's distribution (one full forward).

Both return, per layer, the hidden states the translator sees and the target log-probs,
plus the block-token passes spent, so their costs can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lm_eval_spade.architectures import Architecture
from lm_eval_spade.decoders import DecoderKind, LayerStates, SpadePositions, decode_layers


@dataclass
class Targets:
    states: dict[int, torch.Tensor]  # layer -> [n, d], what the translator is applied to
    log_probs: dict[int, torch.Tensor]  # layer -> [n, vocab], float32 (may be shared)
    block_token_passes: int
    sizes: list[int]  # positions contributed by each example, in order

    @property
    def positions(self) -> int:
        return sum(self.sizes)

    def nbytes(self) -> int:
        tensors = {id(t): t for t in (*self.states.values(), *self.log_probs.values())}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def per_example(self) -> list[Targets]:
        """One `Targets` per example (views, no copies)."""
        return [
            Targets(
                {k: v.narrow(0, start, n) for k, v in self.states.items()},
                _narrow_shared(self.log_probs, start, n),
                0,
                [n],
            )
            for start, n in zip(_offsets(self.sizes), self.sizes, strict=True)
        ]

    @staticmethod
    def cat(parts: list[Targets]) -> Targets:
        return Targets(
            {k: torch.cat([p.states[k] for p in parts]) for k in parts[0].states},
            _cat_shared([p.log_probs for p in parts]),
            sum(p.block_token_passes for p in parts),
            [n for p in parts for n in p.sizes],
        )


def _offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for n in sizes:
        out.append(total)
        total += n
    return out


def _narrow_shared(tensors: dict[int, torch.Tensor], start: int, n: int) -> dict:
    """Narrow each distinct tensor once, so layers sharing one target keep sharing it."""
    done: dict[int, torch.Tensor] = {}
    return {k: done.setdefault(id(v), v.narrow(0, start, n)) for k, v in tensors.items()}


def _cat_shared(parts: list[dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    by_source: dict[tuple[int, ...], torch.Tensor] = {}
    for layer in parts[0]:
        key = tuple(id(p[layer]) for p in parts)
        if key not in by_source:
            by_source[key] = torch.cat([p[layer] for p in parts])
        out[layer] = by_source[key]
    return out


def start_token_id(tokenizer, prefix_token_id: int | None = None) -> int:
    """The start token spade-exit puts first: `prefix_token_id` where given (as the
    model_arg of that name), else BOS, else EOS (GPT-2's `<|endoftext|>`), as HFLM's
    prefix token."""
    if prefix_token_id is not None:
        return prefix_token_id
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sequences.")
    return start


def encode(
    tokenizer, texts: list[str], max_length: int, prefix_token_id: int | None = None
) -> list[list[int]]:
    """Token ids with a start token at position 0 (as spade-exit puts one there).

    Long texts keep their last `max_length` tokens (the answer end), as HFLM truncates.
    """
    start = start_token_id(tokenizer, prefix_token_id)
    out = []
    for text in texts:
        ids = tokenizer(text.rstrip(), add_special_tokens=False)["input_ids"]
        out.append([start, *ids[-(max_length - 1) :]])
    return out


def _pad(arch: Architecture, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    device = arch.lm_head.weight.device
    width = max(len(row) for row in ids)
    padded = torch.zeros((len(ids), width), dtype=torch.long, device=device)
    for r, row in enumerate(ids):
        padded[r, : len(row)] = torch.tensor(row, device=device)
    lengths = torch.tensor([len(row) for row in ids], device=device)
    return padded, lengths


def _states(
    arch: Architecture, ids: torch.Tensor, layers: list[int]
) -> tuple[dict[int, torch.Tensor], int]:
    """`h^l` of the whole (right-padded) batch for each asked layer; blocks run once."""
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    hidden = arch.embed(ids, positions)
    states, done = {}, 0
    for layer in sorted(layers):
        hidden = arch.run_blocks(hidden, done, layer, positions)
        done = layer
        states[layer] = hidden
    return states, done


@torch.no_grad()
def lspade_targets(
    arch: Architecture,
    ids: list[list[int]],
    layers: list[int],
    spade_positions: SpadePositions = SpadePositions.ORIGINAL,
) -> Targets:
    padded, lengths = _pad(arch, ids)
    rows = torch.arange(len(ids), device=padded.device)
    answer = lengths - 1
    states, ran = _states(arch, padded, layers)
    inputs = {
        layer: LayerStates(states[layer][rows, 0], states[layer][rows, answer], answer)
        for layer in layers
    }
    decoded = decode_layers(arch, DecoderKind.SPADE, inputs, spade_positions)
    out_states = {layer: inputs[layer].states for layer in layers}
    log_probs = {layer: F.log_softmax(decoded[layer].logits.float(), dim=-1) for layer in layers}
    decoding = round(sum(d.block_token_passes for d in decoded.values()))  # whole pairs
    passes = ran * int(lengths.sum()) + decoding
    return Targets(out_states, log_probs, passes, [1] * len(ids))


@torch.no_grad()
def final_layer_targets(arch: Architecture, ids: list[list[int]], layers: list[int]) -> Targets:
    padded, lengths = _pad(arch, ids)
    real = torch.arange(padded.shape[1], device=padded.device)[None] < lengths[:, None]
    states, _ = _states(arch, padded, sorted({*layers, arch.num_layers}))
    target = F.log_softmax(arch.head(states[arch.num_layers][real]).float(), dim=-1)
    return Targets(
        {layer: states[layer][real] for layer in layers},
        {layer: target for layer in layers},
        arch.num_layers * int(lengths.sum()),
        lengths.tolist(),
    )
