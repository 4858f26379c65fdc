"""Per-request exits and per-task statistics, with the compute fraction of `docs/method.md`.

The compute fraction counts block-token passes: a full pass over `n` tokens costs
`L * n`; exiting at layer `l` and decoding `k` positions with SPADE costs
`l * n + (L - l) * 2 * k`. A task's fraction is its total passes run over the total a
full-depth run of the same forwards would take, so long requests weigh more, as they do
in wall-clock time. Where one forward serves several requests (lm-eval scores all
one-token answers of a context in one row), its cost is shared among them equally.
Confidence checks (a translator and a head at one position each) are counted apart.

Generation (`generate_until`) exits once per generated token: a task's histogram and mean
exit layer then count generated tokens, not requests, and a full pass is what the full
model runs for the same tokens (the prompt, then every generated token but the last).
The `copy` KV strategy's projections (a norm and the K/V maps of one block at one
position) are counted apart, like confidence checks.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestExit:
    """Where one request exited, how sure it was, and its share of what it cost."""

    exit_layer: int
    confidence: float | None = None  # uncertainty (nats) at the last check, if any
    passes_run: float = 0.0
    passes_full: float = 0.0
    checks: float = 0.0
    #: Generation: the exit layer of each generated token, in order.
    token_exit_layers: list[int] | None = None
    kv_projections: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExitStats:
    """What one task's requests cost, accumulated from their exits."""

    num_layers: int
    requests: int = 0
    exit_layers: Counter[int] = field(default_factory=Counter)
    passes_run: float = 0.0
    passes_full: float = 0.0
    checks: float = 0.0
    generated_tokens: int | None = None  # set once a generation request is added
    kv_projections: float = 0.0

    def add(self, exit: RequestExit) -> None:
        self.requests += 1
        if exit.token_exit_layers is None:
            self.exit_layers[exit.exit_layer] += 1
        else:
            self.exit_layers.update(exit.token_exit_layers)
            self.generated_tokens = (self.generated_tokens or 0) + len(exit.token_exit_layers)
        self.passes_run += exit.passes_run
        self.passes_full += exit.passes_full
        self.checks += exit.checks
        self.kv_projections += exit.kv_projections

    @property
    def compute_fraction(self) -> float:
        return self.passes_run / self.passes_full if self.passes_full else 1.0

    @property
    def mean_exit_layer(self) -> float:
        """Per request, or per generated token for generation."""
        total = sum(layer * n for layer, n in self.exit_layers.items())
        count = sum(self.exit_layers.values())
        return total / count if count else float(self.num_layers)

    def to_dict(self) -> dict[str, Any]:
        layers = sorted(self.exit_layers)
        generation = {}
        if self.generated_tokens is not None:
            generation = {
                "generated_tokens": self.generated_tokens,
                "kv_projections": round(self.kv_projections),
            }
        return {
            "requests": self.requests,
            "exits_per": "request" if self.generated_tokens is None else "generated token",
            "num_layers": self.num_layers,
            "exit_layer": layers[0] if len(layers) == 1 else None,
            "mean_exit_layer": self.mean_exit_layer,
            "exit_layer_histogram": {str(k): self.exit_layers[k] for k in layers},
            "compute_fraction": self.compute_fraction,
            "block_token_passes": round(self.passes_run),
            "block_token_passes_full": round(self.passes_full),
            "confidence_checks": round(self.checks),
            **generation,
        }
