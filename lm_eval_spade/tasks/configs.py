"""This package's task configs, found by lm-eval's TaskManager next to its own.

The YAMLs live in `task_configs/` at the top of the source tree; the wheel carries them
as `lm_eval_spade/task_configs`. lm-eval has no plugin hook for task folders, so every
TaskManager gets this folder appended to its `include_path`.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parents[1]


def task_dir() -> Path:
    """`task_configs/`: inside the installed package, or at the top of a source tree."""
    for candidate in (PACKAGE / "task_configs", PACKAGE.parent / "task_configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("lm_eval_spade's task_configs folder is missing from the install")


def install(manager_module: Any) -> None:
    cls = manager_module.TaskManager
    if getattr(cls.__init__, "_spade_tasks", False):
        return
    original = cls.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        include = bound.arguments.get("include_path")
        paths = (
            []
            if include is None
            else list(include)
            if isinstance(include, list | tuple)
            else [include]
        )
        if str(task_dir()) not in map(str, paths):
            paths.append(task_dir())
        bound.arguments["include_path"] = paths
        original(*bound.args, **bound.kwargs)

    __init__._spade_tasks = True  # type: ignore[attr-defined]
    cls.__init__ = __init__
