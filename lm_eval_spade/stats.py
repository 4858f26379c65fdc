"""Per-task exit statistics and the compute fraction of `SPADE.md`.

The compute fraction counts block-token passes: a full pass over `n` tokens costs
`L * n`; exiting at layer `l` and decoding `k` positions with SPADE costs
`l * n + (L - l) * 2 * k`. A task's fraction is its total passes run over the total a
full-depth run of the same forwards would take, so long requests weigh more, as they do
in wall-clock time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ExitStats:
    """What one task's requests cost, accumulated as they are scored."""

    num_layers: int
    requests: int = 0
    exit_layers: Counter[int] = field(default_factory=Counter)
    passes_run: int = 0
    passes_full: int = 0

    def add_forward(self, n_tokens: int, exit_layer: int, upper_passes: int) -> None:
        """Forwards over `n_tokens` in all, stopped at `exit_layer`, plus decoding cost.

        `upper_passes` is what decoding spent in blocks above `exit_layer` (SPADE's
        `(L - l) * 2` per decoded position); padding is not counted, as SPADE.md counts
        a request's own tokens.
        """
        self.passes_run += exit_layer * n_tokens + upper_passes
        self.passes_full += self.num_layers * n_tokens

    def add_requests(self, exit_layer: int, count: int = 1) -> None:
        self.requests += count
        self.exit_layers[exit_layer] += count

    @property
    def compute_fraction(self) -> float:
        return self.passes_run / self.passes_full if self.passes_full else 1.0

    @property
    def mean_exit_layer(self) -> float:
        total = sum(layer * n for layer, n in self.exit_layers.items())
        return total / self.requests if self.requests else float(self.num_layers)

    def to_dict(self) -> dict[str, Any]:
        layers = sorted(self.exit_layers)
        return {
            "requests": self.requests,
            "num_layers": self.num_layers,
            "exit_layer": layers[0] if len(layers) == 1 else None,
            "mean_exit_layer": self.mean_exit_layer,
            "exit_layer_histogram": {str(k): self.exit_layers[k] for k in layers},
            "compute_fraction": self.compute_fraction,
            "block_token_passes": self.passes_run,
            "block_token_passes_full": self.passes_full,
        }
