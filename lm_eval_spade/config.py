"""The spade-exit settings, parsed and checked from lm-eval `model_args`.

lm-eval turns `key=value` strings into Python values loosely ("3" becomes 3, "true"
becomes True), so every field is checked here and a bad value is refused with one line
that names the key, what was given and what is accepted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from lm_eval_spade.decoders import DecoderKind, SpadePositions
from lm_eval_spade.errors import UserInputError


class SpadeArgumentError(UserInputError):
    """A spade-exit model_arg is missing, misspelt, or out of range."""


def _enum_value(enum: type[Enum], key: str, value: Any) -> Enum:
    choices = [member.value for member in enum]
    if isinstance(value, str) and value in choices:
        return enum(value)
    raise SpadeArgumentError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}.")


def _int_value(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise SpadeArgumentError(f"{key}={value!r} must be an integer, not a boolean.")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise SpadeArgumentError(f"{key}={value!r} must be an integer (a layer index).")


@dataclass(frozen=True)
class SpadeConfig:
    """How spade-exit decodes. With no field set it is the plain HF model.

    - `exit_layer`: decode every scored position from `h^exit_layer` (0..L; L is the
      full model, 0 the embeddings).
    - `decoder`: which decoder maps `h^exit_layer` to logits (default `spade`).
    - `spade_positions`: position ids of the SPADE pair, `original` `(0, i)` or
      `compact` `(0, 1)`.
    - `lens`: directory of a trained lens (`lm-eval-spade train-lens`, or a tuned-lens
      checkpoint), for `decoder=lspade` and `decoder=tuned_lens`.
    """

    decoder: DecoderKind | None = None
    exit_layer: int | None = None
    spade_positions: SpadePositions = SpadePositions.ORIGINAL
    lens: str | None = None

    @classmethod
    def from_model_args(
        cls,
        decoder: Any = None,
        exit_layer: Any = None,
        spade_positions: Any = SpadePositions.ORIGINAL.value,
        lens: Any = None,
    ) -> SpadeConfig:
        kind = None if decoder is None else _enum_value(DecoderKind, "decoder", decoder)
        layer = None if exit_layer is None else _int_value("exit_layer", exit_layer)
        if kind is not None and layer is None:
            raise SpadeArgumentError(
                f"decoder={kind.value} needs a layer to decode from: add exit_layer=K "
                "(0 <= K <= number of blocks)."
            )
        if layer is not None and kind is None:
            kind = DecoderKind.SPADE
        positions = _enum_value(SpadePositions, "spade_positions", spade_positions)
        lens = None if lens is None else str(lens)
        lens_decoders = [k.value for k in DecoderKind if k.needs_lens]
        if kind is not None and kind.needs_lens and lens is None:
            raise SpadeArgumentError(
                f"decoder={kind.value} decodes through a trained lens: add lens=DIR (made by "
                f"`lm-eval-spade train-lens --kind {kind.value}`)."
            )
        if lens is not None and (kind is None or not kind.needs_lens):
            raise SpadeArgumentError(
                f"lens={lens} is only used by decoder={' or decoder='.join(lens_decoders)}; "
                "set one of those (with exit_layer=K) or drop lens."
            )
        return cls(decoder=kind, exit_layer=layer, spade_positions=positions, lens=lens)

    @property
    def active(self) -> bool:
        """Whether decoding differs from the plain model (else spade-exit is `hf`)."""
        return self.exit_layer is not None

    def check_layers(self, num_layers: int) -> None:
        if self.exit_layer is not None and not 0 <= self.exit_layer <= num_layers:
            raise SpadeArgumentError(
                f"exit_layer={self.exit_layer} is out of range: this model has {num_layers} "
                f"blocks, so exit_layer must be between 0 (embeddings) and {num_layers} "
                "(full model)."
            )

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()}


SPADE_MODEL_ARGS: tuple[str, ...] = tuple(SpadeConfig.__dataclass_fields__)
