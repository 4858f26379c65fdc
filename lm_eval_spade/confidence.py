"""How sure a distribution is, as an uncertainty in nats: lower is more confident.

SPADE-EXIT exits when the uncertainty at the answer position is at most `threshold`.
All three measures are in nats so one threshold axis serves them all:

- `entropy`: `H = -sum p log p` (the paper's measure);
- `maxprob`: `-log p_max`, the surprisal of the most likely token;
- `margin`: `-log(p_1 - p_2)`, with `p_1 >= p_2` the two largest probabilities
  (infinite, so never confident, when they tie).
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F


class Confidence(str, Enum):
    ENTROPY = "entropy"
    MARGIN = "margin"
    MAXPROB = "maxprob"


def uncertainty(logits: torch.Tensor, measure: Confidence) -> torch.Tensor:
    """`[n, vocab]` logits to `[n]` uncertainties in nats, computed in float32."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    if measure is Confidence.ENTROPY:
        return -(log_p.exp() * log_p).sum(dim=-1)
    if measure is Confidence.MAXPROB:
        return -log_p.max(dim=-1).values
    top = log_p.topk(2, dim=-1).values.exp()
    return -torch.log(top[:, 0] - top[:, 1])
