"""How sure a distribution is, as an uncertainty in nats: lower is more confident.

SPADE-EXIT exits when the uncertainty at the answer position is at most `threshold`.
All three measures are in nats so one threshold axis serves them all:

- `entropy`: `H = -sum p log p` (the paper's measure);
- `maxprob`: `-log p_max`, the surprisal of the most likely token;
- `margin`: `-log(p_1 - p_2)`, with `p_1 >= p_2` the two largest probabilities
  (infinite, so never confident, when they tie).

A NaN uncertainty (from non-finite logits) is an error: compared with a threshold it is
never confident, so it would silently keep every request from exiting.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F

from lm_eval_spade.finite import NonFiniteError


class Confidence(str, Enum):
    ENTROPY = "entropy"
    MARGIN = "margin"
    MAXPROB = "maxprob"


def uncertainty(logits: torch.Tensor, measure: Confidence) -> torch.Tensor:
    """`[n, vocab]` logits to `[n]` uncertainties in nats, computed in float32."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    if measure is Confidence.ENTROPY:
        u = -(log_p.exp() * log_p).sum(dim=-1)
    elif measure is Confidence.MAXPROB:
        u = -log_p.max(dim=-1).values
    else:
        top = log_p.topk(2, dim=-1).values.exp()
        u = -torch.log(top[:, 0] - top[:, 1])
    if bool(u.isnan().any()):
        raise NonFiniteError(
            f"a confidence ({measure.value}) came out NaN: the confidence lens or the model "
            "gives non-finite logits (an overflow: try dtype=float32, or weights that are "
            "not finite). A NaN never passes a threshold, so nothing would exit."
        )
    return u
