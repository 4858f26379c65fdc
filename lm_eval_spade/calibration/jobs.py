"""`lm-eval-spade calibrate`: train the calibration model, then its L-SPADE translators."""

from __future__ import annotations

import logging
from pathlib import Path

from lm_eval_spade.calibration.task import prompt, split_items
from lm_eval_spade.calibration.training import (
    CalibrationConfig,
    save_calibration_model,
    train_calibration_model,
)
from lm_eval_spade.files import CALIBRATION, staged_output
from lm_eval_spade.lens.checkpoint import is_lens_dir, save_lens
from lm_eval_spade.lens.training import LensTrainConfig, TrainedLens, train_lens
from lm_eval_spade.lens.translators import LensKind
from lm_eval_spade.loading import load_causal_lm

logger = logging.getLogger(__name__)


def lens_config(seed: int = 0) -> LensTrainConfig:
    """L-SPADE on the calibration prompts: every layer, a few hundred steps."""
    return LensTrainConfig(kind=LensKind.LSPADE, steps=1000, batch_size=64, lr=3e-3, seed=seed)


def is_calibration_dir(path: Path) -> bool:
    """A calibrate output of an earlier version (before output markers)."""
    return (path / "model" / "training.json").is_file() and is_lens_dir(path / "lspade")


def calibrate(
    config: CalibrationConfig,
    out: Path,
    lens: LensTrainConfig | None = None,
    overwrite: bool = False,
) -> tuple[dict, TrainedLens]:
    """Train and save under `out/model` and `out/lspade` (one folder, written whole; an
    earlier one is replaced only with `overwrite`); return the model's training record
    and the lens (with its held-out KL per layer)."""
    config.check()
    with staged_output(out, CALIBRATION, overwrite, is_calibration_dir) as work:
        return _calibrate(config, out, work, lens)


def _calibrate(
    config: CalibrationConfig, out: Path, work: Path, lens: LensTrainConfig | None
) -> tuple[dict, TrainedLens]:
    model, tokenizer, info = train_calibration_model(config)
    save_calibration_model(model, tokenizer, info, work / "model")
    logger.info("held-out accuracy %s", info["heldout_accuracy"])
    # The lens records the model it was trained for: load the saved copy, named by the
    # place it will have once the output is complete.
    model, tokenizer = load_causal_lm(str(work / "model"))
    model.config.name_or_path = str(out / "model")
    lens = lens or lens_config(config.seed)
    texts = [prompt(d) for d in split_items(config.task, "train")]
    eval_texts = [prompt(d) for d in split_items(config.task, "validation")]
    data = {"data": "spade_calibration", "split": "train", "eval_data": "spade_calibration",
            "eval_split": "validation", "dtype": "float32", "peft": None}  # fmt: skip
    trained = train_lens(model, tokenizer, texts, lens, eval_texts, data)
    save_lens(trained.lens, work / "lspade")
    return info, trained
