"""Per-layer affine translators: the trained part of tuned lens and L-SPADE.

A translator maps `h^l` to `h^l + A_l h^l + b_l` before the model's own final norm and
head. `A_l` and `b_l` start at zero, so an untrained translator is exactly logit lens, and
weight decay pulls towards logit lens rather than towards the zero map (tuned-lens's
parametrisation). The two kinds differ only in what they were trained to match:

- `tuned_lens`: the final layer's distribution, at every position of text;
- `lspade`: SPADE's distribution at the same layer, at answer positions.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from lm_eval_spade.errors import UserInputError


class LensKind(str, Enum):
    LSPADE = "lspade"
    TUNED_LENS = "tuned_lens"


class LensLayerError(UserInputError):
    """A lens was asked for a layer it has no translator for."""


class Translators(nn.Module):
    """One zero-initialised `d x d` affine map per layer, kept in float32.

    Parameters stay float32 whatever the model's dtype (optimiser state and small
    updates need the precision); they are cast to the hidden states' dtype when applied.
    """

    def __init__(self, hidden_size: int, layers: list[int], bias: bool = True) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.maps = nn.ModuleDict()
        for layer in sorted(set(layers)):
            linear = nn.Linear(hidden_size, hidden_size, bias=bias, dtype=torch.float32)
            nn.init.zeros_(linear.weight)
            if bias:
                nn.init.zeros_(linear.bias)
            self.maps[str(layer)] = linear

    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.maps)

    @property
    def bias(self) -> bool:
        return all(m.bias is not None for m in self.maps.values())

    def translate(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """`h + A_l h + b_l`, in the dtype of `hidden`."""
        key = str(layer)
        if key not in self.maps:
            raise LensLayerError(
                f"this lens has translators for layers {self.layers}, not layer {layer}; "
                f"train one that covers it (`lm-eval-spade train-lens --layers {layer} ...`) "
                "or pick one of those layers."
            )
        linear = self.maps[key]
        weight = linear.weight.to(hidden.dtype)
        bias = None if linear.bias is None else linear.bias.to(hidden.dtype)
        return hidden + F.linear(hidden, weight, bias)
