"""Distribution-free risk control for the exit threshold (Learn-then-Test, fixed sequence).

A threshold T is safe when its disagreement rate R(T) (how often the exit's answer
differs from the full model's, over prompts drawn like the calibration set) is at most
δ. Each candidate gets the null hypothesis "R(T) > δ" and a p-value from its `k`
disagreements among `n` calibration questions: the exact binomial lower tail
`P(Binomial(n, δ) <= k)`, valid because the questions are drawn independently and the
disagreement of one question is 0 or 1 (Angelopoulos et al. 2021, "Learn then Test").

Fixed-sequence testing orders the candidates from the most cautious to the most
aggressive before looking at the data, tests each at level ε and stops at the first
that fails. That controls the family-wise error at ε without any multiplicity
correction, so with probability at least 1 − ε over the draw of the calibration set
every certified threshold, the most aggressive one included, has R(T) <= δ.

The tail is computed in closed form in log space (no scipy needed); the tests compare
it with scipy's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lm_eval_spade.errors import UserInputError


class RiskSettingError(UserInputError):
    """A δ or ε outside (0, 1)."""


def check_levels(max_drop: float, risk: float) -> None:
    """δ and ε must be probabilities strictly between 0 and 1."""
    for name, value in (("--max-drop", max_drop), ("--risk", risk)):
        if not 0.0 < value < 1.0:
            raise RiskSettingError(
                f"{name} {value} must lie strictly between 0 and 1 (a rate, e.g. {name} 0.05)."
            )


def binomial_cdf_table(n: int, p: float, upto: int | None = None) -> np.ndarray:
    """`P(Binomial(n, p) <= k)` for k = 0..upto (default n), exact up to float rounding.

    Summed in log space: `log C(n, k)` is the running sum of `log((n - i + 1) / i)`.
    """
    upto = n if upto is None else min(upto, n)
    k = np.arange(1, upto + 1, dtype=np.float64)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log(n - k + 1) - np.log(k))])
    k = np.arange(upto + 1, dtype=np.float64)
    log_pmf = log_choose + k * math.log(p) + (n - k) * math.log1p(-p)
    return np.minimum(np.exp(np.logaddexp.accumulate(log_pmf)), 1.0)


def binomial_p_value(disagreements: int, n: int, max_drop: float) -> float:
    """p-value of "the disagreement rate exceeds `max_drop`" after `disagreements` of `n`."""
    if n <= 0:
        return 1.0
    if disagreements >= n:
        return 1.0
    return float(binomial_cdf_table(n, max_drop, disagreements)[-1])


def p_values(disagreements: Sequence[int] | np.ndarray, n: int, max_drop: float) -> np.ndarray:
    """`binomial_p_value` of every candidate (one table for all of them)."""
    counts = np.asarray(disagreements, dtype=np.int64)
    if n <= 0:
        return np.ones(len(counts))
    return binomial_cdf_table(n, max_drop)[np.minimum(counts, n)]


def certified_count(p: Sequence[float] | np.ndarray, risk: float) -> int:
    """Fixed-sequence testing: how many candidates, from the first, pass at level `risk`
    before the first that fails (the last of them is the one to use)."""
    failed = np.flatnonzero(np.asarray(p, dtype=np.float64) > risk)
    return int(failed[0]) if len(failed) else len(p)


def questions_needed(max_drop: float, risk: float, rate: float = 0.0) -> int | None:
    """The fewest calibration questions with which a candidate whose disagreement rate is
    `rate` would pass (about: counts are whole); None when no number would (`rate` is
    not below `max_drop`)."""
    if rate >= max_drop:
        return None
    fewest = math.ceil(math.log(risk) / math.log1p(-max_drop))  # no disagreement at all

    def passes(n: int) -> bool:
        return binomial_p_value(math.floor(rate * n), n, max_drop) <= risk

    low, high = fewest, fewest
    while not passes(high):
        low, high = high, high * 2
    while low < high:  # the p-value falls with n, up to the steps of floor(rate * n)
        middle = (low + high) // 2
        low, high = (low, middle) if passes(middle) else (middle + 1, high)
    return high
