"""argparse types for `lm-eval-spade`'s numbers: each refuses, with one line, values no
one can mean (a zero or negative count, a NaN or infinite rate, a negative weight decay),
before any work starts."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from lm_eval_spade.finite import is_rate


def _number(text: str, kind: type) -> float:
    try:
        return kind(text)
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None


def _checked(kind: type, ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = _number(text, kind)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not valid: it must be {expected}")
        return value

    parse.__name__ = expected  # argparse names the type by it in some messages
    return parse


#: At least 1: counts of steps, examples, documents, layers, ...
count = _checked(int, lambda v: v >= 1, "a whole number >= 1")
#: 0 or more: layer indices, MiB, iterations.
index = _checked(int, lambda v: v >= 0, "a whole number >= 0")
#: Random seeds, as torch and numpy both take them.
seed = _checked(int, lambda v: 0 <= v < 2**32, "a whole number in 0..4294967295")
#: Learning rates: positive, and finite in float32 (the weights' precision).
rate = _checked(float, is_rate, "a positive finite number (at most 3.4e38)")
#: Weights (weight decay, loss weights): 0 or more, finite.
weight = _checked(float, lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0")
#: A fraction held out or dropped: in [0, 1).
fraction = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
#: An uncertainty threshold in nats: 0 or more, or inf (a negative one never passes).
nats = _checked(float, lambda v: v >= 0, "a number of nats >= 0 (or inf)")
#: lm-eval's --limit: documents (1, 2, ...) or a fraction in (0, 1).
limit = _checked(
    float,
    lambda v: 0 < v < 1 or (v >= 1 and math.isfinite(v) and v == int(v)),
    "a number of documents (1, 2, ...) or a fraction in (0, 1)",
)
