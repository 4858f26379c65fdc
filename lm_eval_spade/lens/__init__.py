"""Lenses: trained per-layer translators (tuned lens, L-SPADE), their training and files.

- `translators`: the affine maps and the lens kinds;
- `checkpoint`: our on-disk format, atomic writes, integrity and model checks;
- `tuned_lens_format`: reading and writing tuned-lens's `params.pt` format;
- `io`: load either format for a model;
- `head_identity`: which final norm + head a lens belongs to;
- `data`, `targets`, `training`: what to train on, what to match, and the loop.
"""

from lm_eval_spade.lens.checkpoint import Lens, LensCheckpointError, LensConfig, save_lens
from lm_eval_spade.lens.io import load_lens, read_lens
from lm_eval_spade.lens.translators import LensKind, LensLayerError, Translators
from lm_eval_spade.lens.tuned_lens_format import export_tuned_lens

__all__ = [
    "Lens",
    "LensCheckpointError",
    "LensConfig",
    "LensKind",
    "LensLayerError",
    "Translators",
    "export_tuned_lens",
    "load_lens",
    "read_lens",
    "save_lens",
]
