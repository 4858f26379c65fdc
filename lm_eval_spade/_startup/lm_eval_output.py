"""Exit statistics in lm-eval's own output, with or without `--output_path`.

lm-eval has no hook for what its command prints, so two of its functions get a thin
addition:

- `lm_eval.evaluator.evaluate`, which `simple_evaluate` calls and which builds the logged
  samples: once it returns, each sample of a spade-exit run gets its requests' exits
  (`exit_output.annotate_samples`) and the log gets one summary line. Installed when a
  spade-exit model is created, so a run of another model (`--model hf`) runs lm-eval's
  function itself, and its tracebacks hold no frame of ours.
- `lm_eval.utils.make_table`, which the command prints after the run: for a results dict
  of spade-exit (`config.spade`) the results table is followed by the exit table. The
  command (and many scripts) import it before any model exists, so it is wrapped as soon
  as `lm_eval.utils` loads; for other results it returns lm-eval's table unchanged.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

from lm_eval_spade import exit_output

_MARK = "_spade_output"


def _with_exit_table(original: Any) -> Any:
    @functools.wraps(original)
    def make_table(result_dict: dict, column: str = "results", *args: Any, **kwargs: Any) -> str:
        table = original(result_dict, column, *args, **kwargs)
        spade = result_dict.get("config", {}).get("spade")
        if column != "results" or not spade:
            return table
        return f"{table}\n{exit_output.exit_table(spade)}"

    setattr(make_table, _MARK, True)
    return make_table


def _with_exits_in_samples(original: Any) -> Any:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def evaluate(*args: Any, **kwargs: Any) -> Any:
        from lm_eval_spade.model import SpadeExitLM

        results = original(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs).arguments
        lm = arguments.get("lm")
        lm = getattr(lm, "lm", lm)  # the model inside lm-eval's CachingLM (--use_cache)
        if results is None or not isinstance(lm, SpadeExitLM):  # another rank or model
            return results
        tasks = {task: stats.to_dict() for task, stats in sorted(lm.exit_stats.items())}
        exit_output.log_summary(tasks)
        if results.get("samples"):
            exit_output.annotate_samples(results["samples"], lm.exits, arguments.get("samples"))
        return results

    setattr(evaluate, _MARK, True)
    return evaluate


def _wrap_once(module: ModuleType, name: str, wrap: Callable[[Any], Any]) -> None:
    if not getattr(getattr(module, name), _MARK, False):
        setattr(module, name, wrap(getattr(module, name)))


def install_exit_table(utils: ModuleType) -> None:
    """The exit table after lm-eval's results table (run once `lm_eval.utils` loads)."""
    _wrap_once(utils, "make_table", _with_exit_table)


def install_sample_exits() -> None:
    """Exits in the logged samples and the log; a spade-exit model calls it when created."""
    import lm_eval.evaluator

    _wrap_once(lm_eval.evaluator, "evaluate", _with_exits_in_samples)
