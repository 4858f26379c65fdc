"""Log lines in lm-eval's own format, so a run's log reads as one log.

lm-eval (0.4.13) prints `2025-01-31:12:00:00 INFO     [evaluator:214] message`: the
logger's name without its `lm_eval.` prefix, and the line. Its `setup_logging` gives only
lm-eval's loggers a handler, so this package's lines would reach Python's last-resort
handler (bare text, warnings only); `follow_lm_eval_logging` makes it configure ours the
same way. `lm-eval-spade` commands use the format for everything they log (`setup`).
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Any

FORMAT = "%(asctime)s %(levelname)-8s [%(short_name)s:%(lineno)d] %(message)s"
DATE_FORMAT = "%Y-%m-%d:%H:%M:%S"
PACKAGE_LOGGER = "lm_eval_spade"


class LmEvalFormatter(logging.Formatter):
    """lm-eval's format: logger names lose their `lm_eval.` prefix (ours keep theirs)."""

    def __init__(self) -> None:
        super().__init__(FORMAT, datefmt=DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.short_name = record.name.removeprefix("lm_eval.")
        return super().format(record)


def _stderr_handler() -> logging.Handler:
    handler = logging.StreamHandler()
    handler.setFormatter(LmEvalFormatter())
    return handler


def setup(level: int) -> None:
    """For `lm-eval-spade` commands: every logger (ours, lm-eval's, libraries') through one
    handler in lm-eval's format, unless logging is configured already."""
    logging.basicConfig(level=level, handlers=[_stderr_handler()])


def _configure_like_lm_eval() -> None:
    """This package's logger as lm-eval has just configured its own: same level, a
    handler in its format (added once, as lm-eval adds its own), no propagation."""
    ours, theirs = logging.getLogger(PACKAGE_LOGGER), logging.getLogger("lm_eval")
    ours.setLevel(theirs.level)
    if not any(isinstance(h.formatter, LmEvalFormatter) for h in ours.handlers):
        ours.addHandler(_stderr_handler())
    ours.propagate = theirs.propagate


def follow_lm_eval_logging(utils: ModuleType) -> None:
    """Run once `lm_eval.utils` loads: whenever lm-eval configures its logging
    (`setup_logging`: the `lm_eval` command at start, `--verbosity`), ours follows."""
    original = utils.setup_logging
    if getattr(original, "_spade_logs", False):
        return

    @functools.wraps(original)
    def setup_logging(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        _configure_like_lm_eval()

    setup_logging._spade_logs = True  # type: ignore[attr-defined]
    utils.setup_logging = setup_logging
