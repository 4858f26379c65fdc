"""Our input errors end the `lm_eval` command with one line, as `lm-eval-spade` does.

lm-eval's CLI lets every exception out with its traceback. For this package's
`UserInputError` (bad spade-exit model_args, a damaged lens, missing local data, ...) the
message already names the problem and the fix, so it is printed as argparse prints a
usage error (`lm_eval: error: ...`, exit status 2). Ctrl-C ends it with one line too
(`lm_eval: interrupted ...`, exit status 130), not a `KeyboardInterrupt` traceback.

This is an exception hook (`sys.excepthook`), not a wrapper around lm-eval's code: an
exception that is not ours reaches the previous hook untouched, and its traceback holds no
frame of this package, so a bug report about lm-eval (say, under `--model hf`) does not
point here. `guarded` does the same for code that runs part of the command in-process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, NoReturn

from lm_eval_spade.errors import UserInputError


def _program() -> str:
    """The command as the user typed it: `lm_eval`, `lm-eval`, or `python -m lm_eval`."""
    name = Path(sys.argv[0]).name
    return "python -m lm_eval" if name == "__main__.py" else name


def close_progress_bars() -> None:
    """End any progress bar an error interrupted, so the error starts its own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        started = hasattr(bar, "last_print_t")  # set once the bar is fully made
        bar.close()
        if not started and getattr(bar, "sp", None) is not None:  # shown, then interrupted
            bar.fp.write("\n")


def _exit_with(error: UserInputError) -> NoReturn:
    close_progress_bars()
    print(f"{_program()}: error: {error}", file=sys.stderr)
    raise SystemExit(2)


#: The exit status of a command stopped by Ctrl-C (128 + SIGINT, as the shell reports it).
INTERRUPTED = 130


def _interrupted() -> NoReturn:
    close_progress_bars()
    print(
        f"{_program()}: interrupted (Ctrl-C) before the run completed; lm-eval saves results "
        "only at the end, so none were written",
        file=sys.stderr,
    )
    raise SystemExit(INTERRUPTED)


def guarded(run: Callable[[], Any]) -> Any:
    """`run()`, with this package's input errors turned into one line and status 2, and
    Ctrl-C into one line and status 130."""
    try:
        return run()
    except UserInputError as err:
        _exit_with(err)
    except KeyboardInterrupt:
        _interrupted()


def install(_harness: ModuleType) -> None:
    """Run once lm-eval's CLI module loads, i.e. in the `lm_eval` command."""
    if getattr(sys.excepthook, "_spade_errors", False):
        return
    previous = sys.excepthook

    def excepthook(
        kind: type[BaseException], error: BaseException, traceback: TracebackType | None
    ) -> None:
        if isinstance(error, UserInputError):
            _exit_with(error)
        if isinstance(error, KeyboardInterrupt):
            _interrupted()
        previous(kind, error, traceback)

    excepthook._spade_errors = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
