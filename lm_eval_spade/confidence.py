"""How sure a distribution is, as an uncertainty in nats: lower is more confident.

SPADE-EXIT exits when the uncertainty at the answer position is at most `threshold`.
All three measures are in nats so one threshold axis serves them all:

- `entropy`: `H = -sum p log p` (the paper's measure);
- `maxprob`: `-log p_max`, the surprisal of the most likely token;
- `margin`: `-log(p_1 - p_2)`, with `p_1 >= p_2` the two largest probabilities
  (infinite, so never confident, when they tie).

A NaN uncertainty (from non-finite logits) is an error: compared with a threshold it is
never confident, so it would silently keep every request from exiting.

Answer-level measures (multiple choice) are over a question's choices, not the vocabulary:
at a check, the confidence decoder gives each choice's loglikelihood (the sum of its
continuation tokens' log-probabilities, as lm-eval scores it), and with `q` the softmax
over the question's choices:

- `answer_entropy`: `-sum q log q`;
- `answer_margin`: `-log(q_1 - q_2)` (0 for a single choice, infinite on a tie);
- `patience`: minus the number of consecutive checks, ending at this one, at which the
  answer (the likeliest choice, lm-eval's `acc` pick) equalled the previous check's. The
  count starts at 0 at the first check (`min_layer`), so `patience=k` (threshold `-k`)
  exits once the same answer has held over `k + 1` checks in a row.
"""

from __future__ import annotations

from enum import Enum
from itertools import pairwise

import torch
import torch.nn.functional as F

from lm_eval_spade.finite import NonFiniteError


class Confidence(str, Enum):
    ENTROPY = "entropy"
    MARGIN = "margin"
    MAXPROB = "maxprob"
    ANSWER_ENTROPY = "answer_entropy"
    ANSWER_MARGIN = "answer_margin"
    PATIENCE = "patience"

    @property
    def answer_level(self) -> bool:
        """Whether the measure is over a question's choices (needs all of them at a check)."""
        return self in ANSWER_LEVEL


ANSWER_LEVEL = frozenset({Confidence.ANSWER_ENTROPY, Confidence.ANSWER_MARGIN, Confidence.PATIENCE})


def uncertainty(logits: torch.Tensor, measure: Confidence) -> torch.Tensor:
    """`[n, vocab]` logits to `[n]` uncertainties in nats, computed in float32."""
    if measure.answer_level:
        raise ValueError(f"{measure.value} is over a question's choices, not a vocabulary")
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


def choice_uncertainties(logliks: torch.Tensor, measure: Confidence) -> torch.Tensor:
    """`[checks, choices]` float64 loglikelihoods of one question's choices at successive
    checks to `[checks]` uncertainties under an answer-level `measure` (see the module
    doc). Patience counts from the first row."""
    logliks = logliks.double()
    if bool(logliks.isnan().any()):
        raise NonFiniteError(
            f"a choice's loglikelihood came out NaN at a check ({measure.value}): the "
            "confidence decoder gives non-finite logits (try dtype=float32)."
        )
    if measure is Confidence.PATIENCE:
        answers = logliks.argmax(dim=-1).tolist()
        held = [0]
        for before, now in pairwise(answers):
            held.append(held[-1] + 1 if now == before else 0)
        return -torch.tensor(held, dtype=torch.float64)
    log_q = torch.log_softmax(logliks, dim=-1)
    if measure is Confidence.ANSWER_ENTROPY:
        return -(log_q.exp() * log_q).nan_to_num().sum(dim=-1)
    if measure is Confidence.ANSWER_MARGIN:
        if logliks.shape[-1] < 2:
            return torch.zeros(logliks.shape[0], dtype=torch.float64)
        top = log_q.topk(2, dim=-1).values.exp()
        return -torch.log(top[:, 0] - top[:, 1])
    raise ValueError(f"{measure.value} is not an answer-level measure")
