"""The calibration model and task: a small Llama trained by this package, shipped with it.

`pretrained=spade-calibration` and `lens=spade-calibration` name the committed model and
its L-SPADE translators (spade-exit's default model), and `spade_calibration` is the lm-eval
task they were trained on. `lm-eval-spade calibrate` remakes both from scratch.
"""

from __future__ import annotations

from pathlib import Path

NAME = "spade-calibration"
ASSETS = Path(__file__).with_name("assets")
TASK = "spade_calibration"


def model_dir() -> Path:
    return ASSETS / "model"


def lens_dir() -> Path:
    return ASSETS / "lspade"


def resolve_model(pretrained: str) -> str:
    """The committed model's directory for its name; any other model path as given."""
    return str(model_dir()) if pretrained == NAME else pretrained


def resolve_lens(lens: str) -> str:
    return str(lens_dir()) if lens == NAME else lens
