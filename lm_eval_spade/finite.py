"""Non-finite numbers (NaN, inf) stop the work that met them; they are never saved or
reported.

Training stops at the first non-finite loss or weight and saves nothing; lenses and
adapters are checked before they are written and when they are loaded; spade-exit
checks every score and confidence it computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from lm_eval_spade.errors import UserInputError

#: The largest float32: weights and their updates live in float32, so a learning rate
#: above it overflows inside the optimiser.
FLOAT32_MAX = 3.4028234663852886e38


def json_number(value: Any) -> Any:
    """JSON has no infinity or NaN: infinities as strings, NaN as null."""
    if isinstance(value, float | np.floating):
        value = float(value)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return str(value)
        return value
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    return value


def is_rate(value: float) -> bool:
    """Whether `value` can be a learning rate: positive, and finite in float32."""
    return 0 < value <= FLOAT32_MAX


class NonFiniteError(UserInputError):
    """A NaN or infinity where a number was needed; the message names where and why."""


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> tuple[str, float] | None:
    """The name and one bad value of the first tensor holding NaN or inf, if any."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = tensor.detach()[~torch.isfinite(tensor.detach())].flatten()[0]
            return name, float(bad)
    return None


def check_finite(tensors: Mapping[str, torch.Tensor], what: str, fix: str) -> None:
    """Raise `NonFiniteError` naming `what` and the tensor if any value is not finite."""
    found = first_non_finite(tensors)
    if found is not None:
        name, value = found
        raise NonFiniteError(f"{what}: {name} holds {value} (not a finite number); {fix}")


def _stopped(step: int, steps: int, what: str, cause: str) -> NonFiniteError:
    return NonFiniteError(
        f"training stopped at step {step} of {steps}: {what}, and nothing was saved. "
        f"Likely cause: {cause}"
    )


def _high_rate(lr: float) -> str:
    return (
        f"the learning rate ({lr:g}) is too high for this model (try one 10x smaller); "
        "with --dtype float16 also try float32 or bfloat16."
    )


def check_training_step(
    step: int,
    steps: int,
    loss: float,
    parameters: Iterable[tuple[str, torch.Tensor]],
    lr: float,
) -> None:
    """Stop training at the first non-finite loss or weight, naming the step and cause.

    `step` counts from 1; `loss` is this step's loss, `parameters` the trained weights
    after its update.
    """
    if math.isfinite(loss):
        found = first_non_finite(dict(parameters))
        if found is None:
            return
        raise _stopped(
            step, steps, f"the weight {found[0]} became {found[1]} after the update", _high_rate(lr)
        )
    if step == 1:  # no update has happened yet: the model itself
        cause = (
            "the model's own outputs are not finite before any update: check its weights, "
            "and with --dtype float16 try float32 or bfloat16."
        )
    else:
        cause = _high_rate(lr)
    raise _stopped(step, steps, f"the loss is {loss}", cause)


@contextmanager
def optimiser_step(step: int, steps: int, lr: float) -> Iterator[None]:
    """Around `optimizer.step()`: an update too large for float32 stops training the same
    way (torch raises "value cannot be converted to type float without overflow")."""
    try:
        yield
    except RuntimeError as err:
        if "overflow" not in str(err):
            raise
        raise _stopped(step, steps, "the update overflowed float32", _high_rate(lr)) from err
