"""The README's main job: `lm_eval --model spade-exit` with SPADE-EXIT, on any machine.

It needs nothing from the hub. On the shipped calibration model and task it runs the real
`lm_eval` command twice: `hf` at full depth, then spade-exit with L-SPADE confidence and a
threshold, and lm-eval prints its results table each time. Given a directory of the
ARC/BoolQ/HeadQA release files and a model that reads English, it also runs that model
on real prompts (`arc_easy_spade`, `boolq_spade` and `headqa_en_spade` by default, or
`--real-tasks`): `hf` at full depth, then SPADE-EXIT with an L-SPADE lens (`--lens`, or
one trained now on a slice of ARC-Easy's training prompts) and, with `--peft`, a LoRA
adapter. Where spade-exit's start token makes its input differ from `hf`'s (a tokenizer
that adds none), a full-depth spade-exit run on the same tokens is the accuracy
reference. Every run's wall clock is timed, loading included, as a user would see it.

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
import time
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
    real_tasks: tuple[str, ...] = tuple(REAL_TASKS)
    #: A LoRA adapter for the real model (`finetune`), and a ready L-SPADE lens for it.
    peft: str | None = None
    lens: str | None = None
    #: spade-exit's start token (its `prefix_token_id` model_arg), where not the default.
    prefix_token_id: int | None = None

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
    #: Wall clock of the whole `lm_eval` command (loading included), once it has run.
    seconds: float | None = None


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
    start = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, **(env or {})}, cwd=work)
    if done.returncode != 0:
        raise UserInputError(
            f"the {run.name} run of lm_eval failed (status {done.returncode}); its error is "
            "printed above."
        )
    run.seconds = time.perf_counter() - start
    (path,) = (work / target).rglob("results_*.json")
    return json.loads(path.read_text())


def _first_lens_layer(lens: Path) -> int | None:
    """The lowest layer a ready lens has a translator for (None: not readable here; the
    lens is then checked by spade-exit itself)."""
    try:
        layers = json.loads((lens / "config.json").read_text()).get("layers")
    except (OSError, ValueError, AttributeError):
        return None
    ints = [x for x in layers or [] if isinstance(x, int)]
    return min(ints) if ints else None


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


def _absolute(path: str) -> str:
    """lm_eval runs inside the working folder: a local path must not depend on it."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def _same_tokens_as_hf(model: str, prefix_token_id: int | None) -> bool:
    """Whether `hf` scores the tokens spade-exit scores: its tokenizer puts spade-exit's
    start token first by itself."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    first = tokenizer("Question:")["input_ids"][:1]
    start = prefix_token_id if prefix_token_id is not None else tokenizer.bos_token_id
    return first == [start]


def _real_runs(config: DemoConfig, work: Path, env: dict[str, str]) -> list[Run]:
    assert config.model is not None
    model = _absolute(config.model)
    base = f"pretrained={model}" + (f",peft={_absolute(config.peft)}" if config.peft else "")
    spade = base + (
        f",prefix_token_id={config.prefix_token_id}" if config.prefix_token_id is not None else ""
    )
    if config.lens is not None:
        lens = _absolute(config.lens)
    else:
        with _environment(env):  # the lens reads ARC-Easy's training prompts in-process
            lens = _real_task_lens(model, work)
    tasks, limit = list(config.real_tasks), config.limit
    runs = [Run("real-hf", "hf", base, tasks, limit)]
    if not _same_tokens_as_hf(model, config.prefix_token_id):
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(model).get_text_config().num_hidden_layers
        runs.append(
            Run("real-full-depth", "spade-exit", f"{spade},exit_layer={layers}", tasks, limit)
        )
    exits = f"lens={lens},threshold={config.real_threshold}"
    first = _first_lens_layer(Path(lens) if Path(lens).is_absolute() else work / lens)
    if first is not None and first > 1:  # no translators below it: check from there on
        exits += f",min_layer={first}"
    return [*runs, Run("real-spade-exit", "spade-exit", f"{spade},{exits}", tasks, limit)]


def _run(config: DemoConfig, work: Path) -> list[tuple[Run, dict]]:
    exits = f"threshold={config.threshold}"
    runs = [
        Run("calibration-hf", "hf", f"pretrained={calibration.model_dir()}", [calibration.TASK]),
        Run("calibration-spade-exit", "spade-exit",
            f"pretrained={calibration.NAME},lens={calibration.NAME},{exits}", [calibration.TASK]),
    ]  # fmt: skip
    env = {}
    if config.data_dir is not None:
        env[offline.ENV] = str(config.data_dir.resolve())
        runs += _real_runs(config, work, env)
    return [(r, lm_eval(r, work, env)) for r in runs]


def _full_depth(spade: dict | None) -> bool:
    """`hf`, spade-exit with no exit setting, or a fixed exit at the last layer."""
    if spade is None:
        return True
    config = spade["config"]
    return config.get("threshold") is None and config.get("exit_layer") in (
        None,
        spade["num_layers"],
    )


def summary(results: list[tuple[Run, dict]]) -> str:
    """Accuracy with the exit statistics spade-exit adds to lm-eval's results JSON, and
    each run's wall clock against the `hf` run of the same model."""
    lines = [
        "| run | task | acc | mean exit layer | of layers | compute fraction "
        "| wall clock (s) | vs hf |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    hf_seconds = {}
    for run, _ in results:
        if run.model == "hf" and run.seconds:
            hf_seconds[run.name.split("-")[0]] = run.seconds
    for run, result in results:
        spade = result["config"].get("spade")
        hf = hf_seconds.get(run.name.split("-")[0])
        clock = f"{run.seconds:.1f} | {hf / run.seconds:.2f}x" if hf and run.seconds else " | "
        for task in run.tasks:
            acc = result["results"][task]["acc,none"]
            if _full_depth(spade):
                lines.append(f"| {run.name} | {task} | {acc:.3f} | full | | 1.000 | {clock} |")
                continue
            stats = spade["tasks"][task]
            lines.append(
                f"| {run.name} | {task} | {acc:.3f} | {stats['mean_exit_layer']:.2f} | "
                f"{stats['num_layers']} | {stats['compute_fraction']:.3f} | {clock} |"
            )
    return "\n".join(lines)
