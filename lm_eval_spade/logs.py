"""Log lines in lm-eval's own format, so a run's log reads as one log.

lm-eval (0.4.13) prints `2025-01-31:12:00:00 INFO     [evaluator:214] message`: the
logger's name without its `lm_eval.` prefix, and the line. The `lm_eval` command gives only
lm-eval's loggers a handler, so without `attach_to_lm_eval` this package's lines would
reach Python's last-resort handler (bare text, warnings only). `lm-eval-spade` commands
use the same format for everything they log (`setup`).
"""

from __future__ import annotations

import logging
from types import ModuleType

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


class _AtLmEvalLevel(logging.Filter):
    """Pass what lm-eval's own logger would print now: its level follows `--verbosity`
    and `LMEVAL_LOG_LEVEL`, which lm-eval may set after this handler exists."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.getLogger("lm_eval").getEffectiveLevel()


def setup(level: int) -> None:
    """For `lm-eval-spade` commands: every logger (ours, lm-eval's, libraries') through one
    handler in lm-eval's format."""
    handler = logging.StreamHandler()
    handler.setFormatter(LmEvalFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def attach_to_lm_eval(_harness: ModuleType) -> None:
    """For the `lm_eval` command (run once its CLI module loads): this package's lines
    print as lm-eval's do, at lm-eval's level."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    if any(isinstance(h.formatter, LmEvalFormatter) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(LmEvalFormatter())
    handler.addFilter(_AtLmEvalLevel())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # the filter decides
    logger.propagate = False
