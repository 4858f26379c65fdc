"""Our input errors end the `lm_eval` command with one line, as `lm-eval-spade` does.

lm-eval's CLI lets every exception out with its traceback. For this package's
`UserInputError` (bad spade-exit model_args, a damaged lens, missing local data, ...) the
message already names the problem and the fix, so `HarnessCLI.execute` prints it as
argparse prints a usage error (`lm_eval: error: ...`, exit status 2). Every other
exception is left to lm-eval.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lm_eval_spade.errors import UserInputError


def _program() -> str:
    """The command as the user typed it: `lm_eval`, `lm-eval`, or `python -m lm_eval`."""
    name = Path(sys.argv[0]).name
    return "python -m lm_eval" if name == "__main__.py" else name


def close_progress_bars() -> None:
    """End any progress bar an error interrupted, so the error starts its own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def guarded(run: Callable[[], Any]) -> Any:
    """`run()`, with this package's input errors turned into one line and status 2."""
    try:
        return run()
    except UserInputError as err:
        close_progress_bars()
        print(f"{_program()}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def install(harness_module: Any) -> None:
    cls = harness_module.HarnessCLI
    if getattr(cls.execute, "_spade_errors", False):
        return
    original = cls.execute

    @functools.wraps(original)
    def execute(self: Any, args: Any) -> None:
        guarded(lambda: original(self, args))

    execute._spade_errors = True  # type: ignore[attr-defined]
    cls.execute = execute
