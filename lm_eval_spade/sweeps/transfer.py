"""`lm-eval-spade sweep transfer`: L-SPADE trained on one task, SPADE-EXIT on every task.

The paper's figure 6 asks whether the confidence lens carries over between tasks. For
each training task an L-SPADE lens is trained on its training split (`lens.jobs`, as
`lm-eval-spade train-lens --kind lspade --data TASK` does), or taken from `--lens
TASK=DIR`; then SPADE-EXIT runs over the thresholds on every evaluation task with each
lens. One layer-wise pass serves all lenses: they differ only in the uncertainty that
decides the exit, and every lens's uncertainties come from the same hidden states.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from lm_eval_spade.confidence import Confidence
from lm_eval_spade.decoders import DecoderKind
from lm_eval_spade.lens.jobs import DataSpec, train_and_save
from lm_eval_spade.lens.training import LensTrainConfig
from lm_eval_spade.lens.translators import LensKind
from lm_eval_spade.sweeps.layers import oracle_decoders
from lm_eval_spade.sweeps.model import LayerwiseLM
from lm_eval_spade.sweeps.results import SweepOutcome, run_sweep, slug, sweep_output
from lm_eval_spade.sweeps.settings import SweepSettings, load_tasks, unique_tasks
from lm_eval_spade.sweeps.spec import Decoding, Signal, SweepError, check_schedule
from lm_eval_spade.sweeps.thresholds import (
    Series,
    ThresholdSweepConfig,
    oracle_plan,
    threshold_settings,
)

logger = logging.getLogger(__name__)


@dataclass
class TransferConfig:
    """Thresholds and check schedule (as `sweep thresholds`), which tasks lenses are
    trained on (default: the evaluation tasks), lenses given ready (task -> folder), and
    the lens training settings."""

    thresholds: ThresholdSweepConfig
    train_tasks: list[str] = field(default_factory=list)
    lenses: dict[str, str] = field(default_factory=dict)
    training: LensTrainConfig = field(default_factory=lambda: LensTrainConfig(LensKind.LSPADE))
    train_limit: int | None = None


def parse_lens_assignments(values: list[str]) -> dict[str, str]:
    """`TASK=DIR` pairs from the command line."""
    out = {}
    for value in values:
        task, sep, path = value.partition("=")
        if not sep or not task or not path:
            raise SweepError(
                f"--lens {value!r} must be TASK=DIR (the task the lens was trained on)."
            )
        out[task] = path
    return out


def train_lenses(
    settings: SweepSettings, config: TransferConfig, work: Path
) -> dict[str, tuple[str, str]]:
    """Per training task, where its lens will be (recorded in the results) and where it
    is now: given folders, or lenses trained now into `work/lenses/` (OUT/lenses/ once
    the sweep completes)."""
    tasks = config.train_tasks or settings.tasks
    lenses = {task: (path, path) for task, path in config.lenses.items()}
    hf = settings.hf_args()
    for task in tasks:
        if task in lenses:
            continue
        staged = work / "lenses" / slug(task)
        logger.info("training L-SPADE on %s (train split)", task)
        train_and_save(
            settings.model,
            DataSpec(task, "train", settings.include_path, config.train_limit),
            config.training,
            staged,
            dtype=str(hf.get("dtype", "float32")),
            device=str(hf.get("device", "cpu")),
        )
        lenses[task] = (str(settings.out / "lenses" / slug(task)), str(staged))
    return lenses


def run_transfer_sweep(settings: SweepSettings, config: TransferConfig) -> SweepOutcome:
    if config.train_limit is not None and config.train_limit < 1:
        raise SweepError(f"--train-limit {config.train_limit} must be at least 1.")
    config.train_tasks = unique_tasks(config.train_tasks, "--train-tasks")
    with sweep_output(settings) as work:  # bad settings and --out fail before anything loads
        return _transfer_sweep(settings, config, work)


def _transfer_sweep(settings: SweepSettings, config: TransferConfig, work: Path) -> SweepOutcome:
    task_dict = load_tasks(settings.tasks, settings.include_path)
    places = train_lenses(settings, config, work)
    lenses = {task: final for task, (final, _) in places.items()}
    spade = Decoding(DecoderKind.SPADE)
    series = {
        task: Series(
            f"L-SPADE trained on {task}",
            Signal(Decoding(DecoderKind.LSPADE, task), Confidence.ENTROPY),
            spade,
        )
        for task in lenses
    }
    lm = LayerwiseLM(
        settings.model,
        [spade],
        [s.signal for s in series.values()],
        lenses={task: now for task, (_, now) in places.items()},
        spade_positions=settings.spade_positions,
        spade_start=settings.spade_start,
        **settings.hf_args(),
    )
    thresholds = config.thresholds
    checks = check_schedule(lm.layout.num_layers, thresholds.interval, thresholds.min_layer)
    points = []
    for task, s in series.items():
        missing = sorted(set(checks) - set(lm.lenses[task].layers))
        if missing:
            raise SweepError(
                f"the lens trained on {task} has no translators for check layers {missing}."
            )
        points += threshold_settings(
            lm.layout, s, thresholds.thresholds, checks, thresholds, lenses[task],
            "transfer", lens_task=task,
        )  # fmt: skip
    return run_sweep(
        lm,
        points,
        task_dict,
        settings,
        "transfer",
        work,
        oracle=oracle_plan(
            "transfer",
            oracle_decoders([spade], {}),
            checks,
            list(series.values()),
            thresholds.thresholds,
        ),
        thresholds=thresholds.thresholds,
        lenses=lenses,
        checks=list(checks),
        lens_training=config.training.to_dict(),
        train_limit=config.train_limit,
    )
