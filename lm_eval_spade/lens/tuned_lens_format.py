"""tuned-lens's on-disk format: `config.json` + `params.pt`, read and written.

tuned-lens (`tuned_lens.nn.lenses.TunedLens.save`) writes the state dict of its
`layer_translators` ModuleList with `torch.save`: keys `{l}.weight` and `{l}.bias` for
every layer `l` in `0..L-1` (translator `l` maps the hidden states after `l` blocks, our
`h^l`), and a config with `d_model`, `num_hidden_layers`, `bias`, `unembed_hash`,
`base_model_name_or_path`, `base_model_revision` and `lens_type`.

`params.pt` is a pickle; it is read with `torch.load(weights_only=True)`, which accepts
tensors and plain containers only and refuses anything that would run code. The config's
fields are checked for type and range, and `unembed_hash` (tuned-lens's only integrity
field, which its own `save` always writes) is required: without it nothing would tie the
lens to a head.
"""

from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch

from lm_eval_spade.files import TUNED_LENS_EXPORT, write_atomically
from lm_eval_spade.lens.checkpoint import (
    CONFIG_FILE,
    Lens,
    LensCheckpointError,
    LensConfig,
    read_json,
    translators_from_tensors,
)
from lm_eval_spade.lens.translators import LensKind
from lm_eval_spade.paths import portable

PARAMS_FILE = "params.pt"
LENS_TYPE = "linear_tuned_lens"


def is_tuned_lens_dir(path: Path) -> bool:
    return (path / PARAMS_FILE).is_file()


def _read_params(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise LensCheckpointError(
            f"{path} holds more than tensors (refused: loading it could run code from the "
            f"file). Only plain tensor state dicts are read. Detail: {str(err)[:200]}"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise LensCheckpointError(f"{path} cannot be read ({err}); the file is damaged.") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LensCheckpointError(f"{path} is not a state dict of tensors.")
    return state


def _check_config(data: dict, source: Path) -> None:
    """Refuse tuned-lens config fields that are missing or of the wrong type."""
    damaged = "the config was edited or damaged: copy the lens again or retrain it."

    def positive_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    checks = {
        "d_model": (positive_int, "an integer >= 1"),
        "num_hidden_layers": (positive_int, "an integer >= 1"),
        "unembed_hash": (
            lambda v: isinstance(v, str) and len(v) == 64 and set(v) <= set("0123456789abcdef"),
            "the SHA-256 hex of the LM head that tuned-lens writes",
        ),
    }
    optional = {
        "bias": (lambda v: isinstance(v, bool), "true or false"),
        "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string"),
        "base_model_revision": (lambda v: v is None or isinstance(v, str), "null or a string"),
    }
    missing = [k for k in checks if data.get(k) is None]
    if missing:
        raise LensCheckpointError(f"{source} lacks {missing}: not a complete tuned-lens config.")
    for name, (ok, expected) in {**checks, **optional}.items():
        if name in data and not ok(data[name]):
            raise LensCheckpointError(
                f"{source}: {name} is {data[name]!r:.60}, but must be {expected}; {damaged}"
            )


def read_tuned_lens(path: Path) -> Lens:
    """A tuned-lens checkpoint as a `tuned_lens` Lens (checked against a model later)."""
    data = read_json(path / CONFIG_FILE)
    lens_type = data.get("lens_type", LENS_TYPE)
    if lens_type != LENS_TYPE:
        raise LensCheckpointError(
            f"{path}: lens_type {lens_type!r} is not supported; only {LENS_TYPE!r} is."
        )
    _check_config(data, path / CONFIG_FILE)
    d_model, num_layers = data["d_model"], data["num_hidden_layers"]
    bias = data.get("bias", True)
    layers = list(range(num_layers))
    translators = translators_from_tensors(
        _read_params(path / PARAMS_FILE), d_model, layers, bias, path / PARAMS_FILE
    )
    config = LensConfig(
        kind=LensKind.TUNED_LENS.value,
        base_model_name_or_path=str(data.get("base_model_name_or_path") or ""),
        model_type="",
        num_layers=num_layers,
        hidden_size=d_model,
        vocab_size=None,
        layers=layers,
        tuned_lens_unembed_hash=data.get("unembed_hash"),
        bias=bias,
        base_model_revision=data.get("base_model_revision"),
        training={"source": "tuned-lens checkpoint", "path": str(path)},
    )
    return Lens(config, translators)


def export_tuned_lens(lens: Lens, path: str | Path, overwrite: bool = False) -> Path:
    """Write `lens` in tuned-lens's format, loadable by `TunedLens.from_model_and_pretrained`
    (atomically; an earlier export at `path` is replaced only with `overwrite`).

    tuned-lens has a translator for every layer `0..L-1`; layers this lens lacks are
    written as zeros, which is logit lens there.
    """
    if lens.kind is not LensKind.TUNED_LENS:
        raise LensCheckpointError(
            f"only tuned_lens lenses export to tuned-lens's format; this one is {lens.kind.value} "
            "(trained on SPADE's distributions, which that format cannot say)."
        )
    config = lens.config
    full = Lens(replace(config, layers=list(range(config.num_layers))))
    full.translators.maps.load_state_dict(lens.translators.maps.state_dict(), strict=False)
    state = OrderedDict(
        (name, tensor.detach().cpu().contiguous())
        for name, tensor in full.translators.maps.state_dict().items()
    )
    tuned_config = {
        "base_model_name_or_path": config.base_model_name_or_path,
        "d_model": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "bias": config.bias,
        "base_model_revision": config.base_model_revision,
        "unembed_hash": config.tuned_lens_unembed_hash,
        "lens_type": LENS_TYPE,
    }

    def write(tmp: Path) -> None:
        torch.save(state, tmp / PARAMS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(portable(tuned_config), indent=2) + "\n")

    return write_atomically(Path(path), write, TUNED_LENS_EXPORT, overwrite)
