"""What every sweep is given: the model, tasks, output folder and lm-eval settings."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lm_eval_spade.decoders import SpadePositions, SpadeStart
from lm_eval_spade.sweeps.spec import SweepError

logger = logging.getLogger(__name__)

#: HFLM settings sweeps use unless --model-args says otherwise. The start token SPADE
#: pairs every position with is spade-exit's own (HFLM's prefix token where the
#: tokenizer adds none; `start_token.py`).
DEFAULT_MODEL_ARGS = {"device": "cpu", "dtype": "float32"}


@dataclass
class SweepSettings:
    """Model, tasks and lm-eval settings shared by the three sweeps.

    `model_args` are extra HFLM model_args as lm-eval's `--model_args` takes them
    (`max_length=1024,dtype=bfloat16`); `limit` is lm-eval's `--limit` (documents per
    task, or a fraction below 1). `out` is written whole at the end of the sweep; an
    earlier sweep there is replaced only with `overwrite` (`files.staged_output`).
    """

    model: str
    tasks: list[str]
    out: Path
    limit: float | None = None
    batch_size: int = 16
    model_args: str = ""
    include_path: str | None = None
    spade_positions: SpadePositions = SpadePositions.ORIGINAL
    spade_start: SpadeStart = SpadeStart.PAIR
    bootstrap_iters: int = 1000
    time_full_depth: bool = True
    overwrite: bool = False

    def check(self) -> None:
        """Refuse settings lm-eval would misread (a zero or negative limit means all
        documents, or all but some, to it)."""
        limit = self.limit
        if limit is not None and not (0 < limit < 1 or (limit >= 1 and limit == int(limit))):
            raise SweepError(
                f"--limit {limit:g} is not valid: give a number of documents (1, 2, ...) or a "
                "fraction between 0 and 1."
            )
        if self.batch_size < 1:
            raise SweepError(f"--batch-size {self.batch_size} must be at least 1.")
        if self.bootstrap_iters < 0:
            raise SweepError(f"--bootstrap-iters {self.bootstrap_iters} must be >= 0.")
        self.tasks = unique_tasks(self.tasks, "--tasks")
        self.hf_args()

    def hf_args(self) -> dict[str, Any]:
        """HFLM model_args: the defaults, overridden by `model_args`."""
        from lm_eval.utils import simple_parse_args_string

        try:
            given = simple_parse_args_string(self.model_args)
        except (ValueError, IndexError) as err:
            raise SweepError(
                f"--model-args {self.model_args!r} is not KEY=VALUE[,KEY=VALUE...] ({err})."
            ) from err
        for key in ("pretrained", "exit_layer", "threshold", "decoder", "lens"):
            if key in given:
                raise SweepError(
                    f"--model-args sets {key}, which the sweep chooses itself; use --model "
                    "for the model and the sweep's own options for the rest."
                )
        return {**DEFAULT_MODEL_ARGS, "batch_size": self.batch_size, **given}

    def model_args_string(self, spade: dict[str, Any]) -> str:
        """The `--model_args` of an equivalent `lm_eval --model spade-exit` run."""
        args = {"pretrained": self.model, **self.hf_args(), **spade}
        args.pop("batch_size", None)
        if self.spade_positions is not SpadePositions.ORIGINAL:
            args["spade_positions"] = self.spade_positions.value
        if self.spade_start is not SpadeStart.PAIR:
            args["spade_start"] = self.spade_start.value
        return ",".join(f"{k}={v}" for k, v in args.items())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"], data["spade_positions"] = str(self.out), self.spade_positions.value
        data["spade_start"] = self.spade_start.value
        data.pop("overwrite")
        return data


def unique_tasks(names: list[str], option: str) -> list[str]:
    """`names` with each task once, in order; one warning line names the repeats (a task
    listed twice is run and recorded once: its results could only repeat)."""
    unique = list(dict.fromkeys(names))
    if len(unique) < len(names):
        repeated = [n for n in unique if names.count(n) > 1]
        logger.warning(
            "%s lists %s more than once; each task is run once", option,
            ", ".join(repeated),
        )  # fmt: skip
    return unique


def load_tasks(names: list[str], include_path: str | None, manager: Any = None) -> dict:
    """lm-eval's task dict for `names` (tasks, groups or tags), with a clear error for
    names lm-eval does not know. Pass a `TaskManager` to reuse its index (building one
    reads every task file lm-eval has)."""
    from lm_eval.tasks import TaskManager

    if not names:
        raise SweepError("no tasks given: --tasks NAME [NAME ...] (lm-eval task names).")
    manager = manager or TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise SweepError(
            f"lm-eval knows no task {', '.join(map(repr, unknown))}; see `lm_eval ls tasks` "
            "(or give --include-path for a local task folder)."
        )
    return manager.load(names)
