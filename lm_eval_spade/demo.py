"""The README's main job: `lm_eval --model spade-exit` with SPADE-EXIT, on any machine.

It needs nothing from the hub. On the shipped calibration model and task it runs the real
`lm_eval` command twice: `hf` at full depth, then spade-exit with L-SPADE confidence and a
threshold, and lm-eval prints its results table each time. Given a directory of the
ARC/BoolQ/HeadQA release files and a model that reads English, it also trains that model's
L-SPADE translators on a slice of ARC-Easy's training prompts and runs SPADE-EXIT on the
real prompts of `arc_easy_spade`, `boolq_spade` and `headqa_en_spade`.

The working folder is written whole (`files.staged_output`); `lm_eval` runs inside it with
paths relative to it, so the results it records name the lens as `lspade-real`, which
stays true once the folder is in place. A rerun replaces an earlier demo folder only
with `overwrite`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lm_eval_spade import calibration
from lm_eval_spade.errors import UserInputError
from lm_eval_spade.files import DEMO, staged_output
from lm_eval_spade.tasks import offline

logger = logging.getLogger(__name__)

REAL_TASKS = ["arc_easy_spade", "boolq_spade", "headqa_en_spade"]


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    #: SPADE-EXIT's threshold on L-SPADE's entropy (nats), checked at every block.
    threshold: float = 0.05
    data_dir: Path | None = None
    #: The model for the real tasks (the calibration model only reads its own task).
    model: str | None = None
    #: Documents per real task.
    limit: int = 40
    #: The real tasks' threshold: a small English model is far less sure of its answers.
    real_threshold: float = 2.0
    overwrite: bool = False

    def check(self) -> None:
        if self.limit < 1:
            raise UserInputError(f"--limit {self.limit} must be at least 1.")
        if self.data_dir is None:
            return
        if self.model is None:
            raise UserInputError(
                "--data-dir runs the real ARC/BoolQ/HeadQA prompts, which the calibration "
                "model cannot read: add --model DIR (an English causal LM, e.g. stories260K)."
            )
        if not self.data_dir.is_dir():
            raise UserInputError(f"--data-dir {self.data_dir} is not a directory.")


@dataclass
class Run:
    name: str
    model: str
    model_args: str
    tasks: list[str]
    limit: int | None = None


def lm_eval(run: Run, work: Path, env: dict[str, str] | None = None) -> dict:
    """Run the real `lm_eval` command in `work` (its table goes to stdout) and return
    its results."""
    target = Path("results") / run.name
    command = [
        str(Path(sys.executable).parent / "lm_eval"), "--model", run.model,
        "--model_args", run.model_args, "--tasks", ",".join(run.tasks),
        "--device", "cpu", "--batch_size", "16", "--output_path", str(target),
    ]  # fmt: skip
    if run.limit is not None:
        command += ["--limit", str(run.limit)]
    logger.info("running: %s", " ".join(command))
    subprocess.run(command, check=True, env={**os.environ, **(env or {})}, cwd=work)
    (path,) = (work / target).rglob("results_*.json")
    return json.loads(path.read_text())


def _real_task_lens(model: str, work: Path) -> str:
    """Train the real tasks' L-SPADE lens into `work`; its path relative to `work`."""
    from lm_eval_spade.lens.jobs import DataSpec, train_and_save
    from lm_eval_spade.lens.training import LensTrainConfig
    from lm_eval_spade.lens.translators import LensKind

    settings = LensTrainConfig(kind=LensKind.LSPADE, steps=60, batch_size=16, lr=3e-3)
    train_and_save(model, DataSpec("arc_easy_spade", limit=320), settings, work / "lspade-real")
    return "lspade-real"


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def run(config: DemoConfig) -> list[tuple[Run, dict]]:
    config.check()
    with staged_output(config.out, DEMO, config.overwrite) as work:
        return _run(config, work)


def _run(config: DemoConfig, work: Path) -> list[tuple[Run, dict]]:
    exits = f"threshold={config.threshold}"
    runs = [
        Run("calibration-hf", "hf", f"pretrained={calibration.model_dir()}", [calibration.TASK]),
        Run("calibration-spade-exit", "spade-exit",
            f"pretrained={calibration.NAME},lens={calibration.NAME},{exits}", [calibration.TASK]),
    ]  # fmt: skip
    env = {}
    if config.data_dir is not None:
        assert config.model is not None
        env[offline.ENV] = str(config.data_dir.resolve())
        # lm_eval runs inside the working folder: a local model path must not depend on it.
        model = str(Path(config.model).resolve()) if Path(config.model).exists() else config.model
        with _environment(env):  # the lens reads ARC-Easy's training prompts in-process
            lens = _real_task_lens(model, work)
        runs.append(
            # BoolQ passages outgrow a small model's context; HFLM would cut the start token
            # off, which SPADE refuses, so the whole prompt is kept (as the sweeps do).
            Run("real-spade-exit", "spade-exit",
                f"pretrained={model},lens={lens},threshold={config.real_threshold},"
                "max_length=2048", REAL_TASKS, config.limit)
        )  # fmt: skip
    return [(r, lm_eval(r, work, env)) for r in runs]


def summary(results: list[tuple[Run, dict]]) -> str:
    """Accuracy with the exit statistics spade-exit adds to lm-eval's results JSON."""
    lines = [
        "| run | task | acc | mean exit layer | of layers | compute fraction |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for run, result in results:
        spade = result["config"].get("spade")
        for task in run.tasks:
            acc = result["results"][task]["acc,none"]
            if spade is None:
                lines.append(f"| {run.name} | {task} | {acc:.3f} | full | | 1.000 |")
                continue
            stats = spade["tasks"][task]
            lines.append(
                f"| {run.name} | {task} | {acc:.3f} | {stats['mean_exit_layer']:.2f} | "
                f"{stats['num_layers']} | {stats['compute_fraction']:.3f} |"
            )
    return "\n".join(lines)
