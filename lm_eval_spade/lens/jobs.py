"""The lens jobs behind `lm-eval-spade train-lens` and `export-lens`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lm_eval_spade.files import LENS, TUNED_LENS_EXPORT, check_output
from lm_eval_spade.lens.checkpoint import is_lens_dir, save_lens
from lm_eval_spade.lens.data import load_texts
from lm_eval_spade.lens.io import read_lens
from lm_eval_spade.lens.training import LensTrainConfig, TrainedLens, train_lens
from lm_eval_spade.lens.translators import LensKind
from lm_eval_spade.lens.tuned_lens_format import export_tuned_lens
from lm_eval_spade.loading import load_causal_lm

logger = logging.getLogger(__name__)


@dataclass
class DataSpec:
    """Where training (and optionally held-out) text comes from; see `lens.data`."""

    source: str
    split: str = "train"
    include_path: str | None = None
    limit: int | None = None
    eval_source: str | None = None
    eval_split: str = "validation"


def train_and_save(
    pretrained: str,
    data: DataSpec,
    config: LensTrainConfig,
    out: str | Path,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    peft: str | None = None,
    overwrite: bool = False,
) -> TrainedLens:
    """Train a lens and write it to `out`; `out` is checked before any work starts."""
    check_output(Path(out), LENS, overwrite, is_lens_dir)
    documents = config.kind is LensKind.TUNED_LENS  # tuned lens reads whole documents

    def texts(source: str, split: str) -> list[str]:
        return load_texts(
            source, documents=documents, split=split, include_path=data.include_path,
            limit=data.limit,
        )  # fmt: skip

    train_texts = texts(data.source, data.split)
    eval_texts = None if data.eval_source is None else texts(data.eval_source, data.eval_split)
    model, tokenizer = load_causal_lm(pretrained, revision, dtype, device, peft)
    info = {
        "data": data.source,
        "split": data.split,
        "eval_data": data.eval_source,
        "eval_split": data.eval_split if data.eval_source else None,
        "dtype": dtype,
        "peft": peft,
    }
    trained = train_lens(model, tokenizer, train_texts, config, eval_texts, info, revision)
    path = save_lens(trained.lens, out, overwrite)
    logger.info("saved %s lens to %s", config.kind.value, path)
    return trained


def export_to_tuned_lens(source: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    check_output(Path(out), TUNED_LENS_EXPORT, overwrite)
    return export_tuned_lens(read_lens(source), out, overwrite)
