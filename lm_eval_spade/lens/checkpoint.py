"""Lens checkpoints: a directory with `config.json` and `translators.safetensors`.

Writing is atomic (`files.staged_output`: a folder beside the target, renamed into
place), so a crash never leaves a half-written lens behind, and an existing folder is
replaced only when it is a lens and `overwrite` is given. Non-finite weights are never
written. Reading refuses, before any weight is used: a config with any field missing or
of the wrong type or range (`validate_config`: the integrity fields `weights_sha256` and
`head_hash` included), a weights file that differs from its recorded SHA-256, tensor
names or shapes that differ from the config, non-finite weights, and a checkpoint made
for another model (layer count, hidden size, vocabulary, and the final norm + head, see
`head_identity`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lm_eval_spade import __version__
from lm_eval_spade.architectures import Architecture
from lm_eval_spade.errors import UserInputError
from lm_eval_spade.files import LENS, write_atomically
from lm_eval_spade.finite import NonFiniteError, check_finite
from lm_eval_spade.lens.head_identity import (
    fingerprints_match,
    head_fingerprint,
    head_hash,
    tuned_lens_unembed_hash,
)
from lm_eval_spade.lens.translators import LensKind, Translators
from lm_eval_spade.paths import portable

logger = logging.getLogger(__name__)

FORMAT = "lm-eval-spade-lens"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "translators.safetensors"


class LensCheckpointError(UserInputError):
    """A lens checkpoint is missing, damaged, or made for another model."""


@dataclass
class LensConfig:
    """What a lens is, what it was trained for, and how (saved as `config.json`)."""

    kind: str
    base_model_name_or_path: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int | None  # None: not recorded (tuned-lens checkpoints)
    layers: list[int]
    head_hash: str = ""
    head_fingerprint: list[float] = field(default_factory=list)
    #: tuned-lens's own head hash (`Unembed.unembedding_hash`), written on export.
    tuned_lens_unembed_hash: str | None = None
    bias: bool = True
    base_model_revision: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    package_version: str = __version__
    weights_sha256: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @classmethod
    def for_model(
        cls,
        arch: Architecture,
        kind: LensKind,
        layers: list[int],
        revision: str | None = None,
        training: dict[str, Any] | None = None,
    ) -> LensConfig:
        return cls(
            kind=kind.value,
            base_model_name_or_path=str(arch.config.name_or_path),
            model_type=str(arch.config.model_type),
            num_layers=arch.num_layers,
            hidden_size=arch.hidden_size,
            vocab_size=int(arch.lm_head.weight.shape[0]),
            layers=sorted(layers),
            head_hash=head_hash(arch),
            head_fingerprint=head_fingerprint(arch),
            tuned_lens_unembed_hash=tuned_lens_unembed_hash(arch),
            base_model_revision=revision,
            training=dict(training or {}),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path) -> LensConfig:
        """The config of one of our checkpoints, every field checked (`validate_config`)."""
        validate_config(data, source)
        return cls(**data)


_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: Fields a config may lack (older files, optional records); every other one is required.
_OPTIONAL = {"tuned_lens_unembed_hash", "base_model_revision", "training", "package_version"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _field_problems(data: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """`(field, what it must be)` for each field whose value is wrong."""
    kinds = [k.value for k in LensKind]
    num_layers = data.get("num_layers")
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "kind": (lambda v: v in kinds, f"one of {', '.join(kinds)}"),
        "base_model_name_or_path": (lambda v: isinstance(v, str), "a string"),
        "model_type": (lambda v: isinstance(v, str), "a string"),
        "num_layers": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "hidden_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "vocab_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "layers": (
            lambda v: (
                isinstance(v, list)
                and bool(v)
                and all(_is_int(x) for x in v)
                and v == sorted(set(v))
                and v[0] >= 0
                and (not _is_int(num_layers) or v[-1] < num_layers)
            ),
            "a non-empty ascending list of distinct layers in 0..num_layers-1",
        ),
        "head_hash": (lambda v: isinstance(v, str) and bool(_HEX64.match(v)), "a SHA-256 hex"),
        "head_fingerprint": (
            lambda v: isinstance(v, list) and bool(v) and all(_is_number(x) for x in v),
            "a non-empty list of finite numbers",
        ),
        "tuned_lens_unembed_hash": (
            lambda v: v is None or (isinstance(v, str) and bool(_HEX64.match(v))),
            "null or a SHA-256 hex",
        ),
        "bias": (lambda v: isinstance(v, bool), "true or false"),
        "base_model_revision": (lambda v: v is None or isinstance(v, str), "null or a string"),
        "training": (lambda v: isinstance(v, dict), "a JSON object"),
        "package_version": (lambda v: isinstance(v, str), "a string"),
        "weights_sha256": (lambda v: isinstance(v, str) and bool(_HEX64.match(v)), "a SHA-256 hex"),
    }
    for name, (ok, expected) in checks.items():
        if name in data and not ok(data[name]):
            yield name, expected


def validate_config(data: dict[str, Any], source: Path) -> None:
    """Refuse a lens config with any field missing, unknown, or of the wrong type or range.

    Integrity fields are required: a config without `weights_sha256` or `head_hash` is
    refused, not loaded on trust, so that editing the config cannot turn the checks off.
    """
    damaged = "the config was edited or damaged: copy the lens again or retrain it."
    fmt, version = data.get("format"), data.get("format_version")
    if fmt != FORMAT or not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        newer = fmt == FORMAT and _is_int(version) and version > FORMAT_VERSION
        raise LensCheckpointError(
            f"{source}: format {fmt!r} version {version!r} is not one this version "
            f"({__version__}) reads ({FORMAT}, versions 1..{FORMAT_VERSION}); "
            + ("upgrade lm-eval-spade." if newer else damaged)
        )
    names = {f.name for f in fields(LensConfig)}
    missing = sorted(names - _OPTIONAL - data.keys())
    if missing:
        raise LensCheckpointError(
            f"{source} lacks {missing}: not a complete lens config; {damaged}"
        )
    unknown = sorted(data.keys() - names)
    if unknown:
        raise LensCheckpointError(
            f"{source} has fields {unknown} that format version {version} does not have; {damaged}"
        )
    for name, expected in _field_problems(data):
        shown = repr(data[name])
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise LensCheckpointError(f"{source}: {name} is {shown}, but must be {expected}; {damaged}")


class Lens(nn.Module):
    """A trained (or untrained) set of translators and the config that says what for."""

    def __init__(self, config: LensConfig, translators: Translators | None = None) -> None:
        super().__init__()
        self.config = config
        self.translators = translators or Translators(
            config.hidden_size, config.layers, bias=config.bias
        )

    @classmethod
    def untrained(
        cls, arch: Architecture, kind: LensKind, layers: list[int] | None = None, **config: Any
    ) -> Lens:
        """Zero translators for `layers` (default: every layer below the last)."""
        layers = list(range(arch.num_layers)) if layers is None else layers
        return cls(LensConfig.for_model(arch, kind, layers, **config))

    @property
    def kind(self) -> LensKind:
        return LensKind(self.config.kind)

    @property
    def layers(self) -> list[int]:
        return self.translators.layers

    def translate(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        return self.translators.translate(hidden, layer)

    def head_input(self, arch: Architecture, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """What the head reads for `h^layer`; at the last layer no translator applies (it
        is the model)."""
        return hidden if layer == arch.num_layers else self.translate(hidden, layer)

    def logits(self, arch: Architecture, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Decode `h^layer`."""
        return arch.head(self.head_input(arch, hidden, layer))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Weights named `layers.{l}.weight` / `layers.{l}.bias`, on CPU, contiguous."""
        return {
            f"layers.{name}": tensor.detach().to("cpu").contiguous()
            for name, tensor in self.translators.maps.state_dict().items()
        }


# --- writing -----------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_lens_dir(path: Path) -> bool:
    """A lens folder written by an earlier version (before output markers)."""
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_lens(lens: Lens, path: str | Path, overwrite: bool = False) -> Path:
    """Write `lens` to the folder `path`, atomically; an existing lens there is replaced
    only with `overwrite`, and anything else is refused (`files.check_output`)."""
    tensors = lens.state_tensors()
    check_finite(tensors, f"the {lens.kind.value} lens for {path}", "it was not saved.")

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": FORMAT})
        lens.config.weights_sha256 = _sha256(tmp / WEIGHTS_FILE)
        lens.config.layers = lens.layers
        (tmp / CONFIG_FILE).write_text(json.dumps(portable(asdict(lens.config)), indent=2) + "\n")

    return write_atomically(Path(path), write, LENS, overwrite, is_lens_dir)


# --- reading -----------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LensCheckpointError(
            f"no {path.name} in {path.parent}: a lens directory holds {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} (ours) or {CONFIG_FILE} and params.pt (tuned-lens)."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LensCheckpointError(f"{path} is not valid JSON ({err}): damaged file.") from err
    if not isinstance(data, dict):
        raise LensCheckpointError(f"{path} holds {type(data).__name__}, not a JSON object.")
    return data


def _read_weights(path: Path, config: LensConfig) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise LensCheckpointError(f"{weights} is missing; the lens directory is incomplete.")
    if _sha256(weights) != config.weights_sha256:
        raise LensCheckpointError(
            f"{weights} does not match the SHA-256 recorded in {CONFIG_FILE}: the file is "
            "truncated or corrupt. Copy it again or retrain the lens."
        )
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError) as err:
        raise LensCheckpointError(f"{weights} cannot be read ({err}): damaged.") from err


def translators_from_tensors(
    tensors: dict[str, torch.Tensor], hidden_size: int, layers: list[int], bias: bool, source: Path
) -> Translators:
    """Build translators, refusing any missing, extra or misshapen tensor."""
    translators = Translators(hidden_size, layers, bias=bias)
    expected = {name: tuple(t.shape) for name, t in translators.maps.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if expected != found:
        missing = sorted(expected.keys() - found.keys())
        extra = sorted(found.keys() - expected.keys())
        shapes = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
        raise LensCheckpointError(
            f"{source}: the weights do not match the config (layers {layers}, hidden size "
            f"{hidden_size}): missing {missing[:4]}, unexpected {extra[:4]}, wrong shape "
            f"{[(k, found[k]) for k in shapes[:4]]}."
        )
    try:
        check_finite(tensors, f"{source}", "the lens is damaged: copy it again or retrain it.")
    except NonFiniteError as err:
        raise LensCheckpointError(str(err)) from err
    translators.maps.load_state_dict({k: v.float() for k, v in tensors.items()})
    return translators


def check_lens_fits(config: LensConfig, arch: Architecture, source: Path) -> None:
    """Refuse a lens trained for another model; say which property differs."""
    model = f"the model {arch.config.name_or_path!s}"
    checks = [
        ("blocks", config.num_layers, arch.num_layers),
        ("hidden size", config.hidden_size, arch.hidden_size),
        ("vocabulary size", config.vocab_size, int(arch.lm_head.weight.shape[0])),
    ]
    for what, theirs, ours in checks:
        if theirs is not None and theirs != ours:
            raise LensCheckpointError(
                f"the lens at {source} was trained for a model with {theirs} {what} "
                f"({config.base_model_name_or_path}), but {model} has {ours}. Train a lens "
                "for this model with `lm-eval-spade train-lens`."
            )
    if config.head_hash:
        _check_head(config, arch, source, model)
    elif config.tuned_lens_unembed_hash != tuned_lens_unembed_hash(arch):
        # Reading refused configs without either hash, so this is a tuned-lens checkpoint.
        raise LensCheckpointError(
            f"the tuned lens at {source} was trained on another LM head than {model}'s "
            "(its unembed_hash differs). Load the lens made for this model, or train "
            "one with `lm-eval-spade train-lens --kind tuned_lens`."
        )


def _check_head(config: LensConfig, arch: Architecture, source: Path, model: str) -> None:
    if config.head_hash == head_hash(arch):
        return
    if not fingerprints_match(config.head_fingerprint, head_fingerprint(arch)):
        raise LensCheckpointError(
            f"the lens at {source} was trained on another final norm + LM head than "
            f"{model}'s (same shapes, different weights: was it trained for "
            f"{config.base_model_name_or_path} or another fine-tune?). Train a lens for "
            "this model with `lm-eval-spade train-lens`."
        )
    logger.info("lens %s: the head matches at reduced precision (dtype differs)", source)


def read_native(path: Path) -> Lens:
    """Read and verify one of our checkpoints (not yet checked against a model)."""
    data = read_json(path / CONFIG_FILE)
    config = LensConfig.from_dict(data, path / CONFIG_FILE)
    tensors = _read_weights(path, config)
    stripped = {k.removeprefix("layers."): v for k, v in tensors.items()}
    translators = translators_from_tensors(
        stripped, config.hidden_size, config.layers, config.bias, path / WEIGHTS_FILE
    )
    return Lens(config, translators)
