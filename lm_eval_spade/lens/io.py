"""Load any lens directory (ours or tuned-lens's) and check it against a model."""

from __future__ import annotations

from pathlib import Path

from lm_eval_spade import calibration
from lm_eval_spade.architectures import Architecture
from lm_eval_spade.lens.checkpoint import Lens, LensCheckpointError, check_lens_fits, read_native
from lm_eval_spade.lens.translators import LensKind
from lm_eval_spade.lens.tuned_lens_format import is_tuned_lens_dir, read_tuned_lens


def read_lens(path: str | Path) -> Lens:
    """Read and verify a lens directory without a model (for export and inspection)."""
    path = Path(calibration.resolve_lens(str(path)))
    if not path.is_dir():
        raise LensCheckpointError(
            f"lens={path} is not a directory. Point it at the output directory of "
            "`lm-eval-spade train-lens` (or a tuned-lens directory with params.pt)."
        )
    return read_tuned_lens(path) if is_tuned_lens_dir(path) else read_native(path)


def load_lens(path: str | Path, arch: Architecture, expected_kind: LensKind | None = None) -> Lens:
    """The lens at `path`, verified for `arch`'s model and placed on its device."""
    lens = read_lens(path)
    if expected_kind is not None and lens.kind is not expected_kind:
        raise LensCheckpointError(
            f"the lens at {path} is a {lens.kind.value} lens, but decoder={expected_kind.value} "
            f"was asked for. Use decoder={lens.kind.value}, or a {expected_kind.value} lens."
        )
    check_lens_fits(lens.config, arch, Path(path))
    return lens.requires_grad_(False).to(arch.lm_head.weight.device)
