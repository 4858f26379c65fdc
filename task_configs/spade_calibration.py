"""`spade_calibration`'s documents and prompt, from the package's generator."""

from __future__ import annotations

from typing import Any

from lm_eval_spade.calibration import task


def load(**kwargs: Any):
    return task.dataset(**kwargs)


def prompt(doc: dict[str, Any]) -> str:
    return task.prompt(doc)
