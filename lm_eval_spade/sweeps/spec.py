"""What a sweep computes per request: decodings at layers (columns) and uncertainties.

A layer-wise pass over a request gives, for every *column* (a decoding at a layer), the
request's loglikelihood and greedy flag as spade-exit with `exit_layer=layer,
decoder=...` would return them, and for every *signal* (a confidence decoder and
measure) the uncertainty at each layer below L where SPADE-EXIT would check. Every sweep
is a choice among these columns per request.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lm_eval_spade.confidence import Confidence
from lm_eval_spade.decoders import DecoderKind
from lm_eval_spade.errors import UserInputError


class SweepError(UserInputError):
    """Sweep settings or result files that cannot work; the message names the fix."""


@dataclass(frozen=True)
class Decoding:
    """A decoder, and for the trained kinds the name of the lens it uses."""

    kind: DecoderKind
    lens: str | None = None

    @property
    def label(self) -> str:
        return self.kind.value if self.lens is None else f"{self.kind.value}[{self.lens}]"


@dataclass(frozen=True)
class Signal:
    """An uncertainty SPADE-EXIT can exit on: a measure of a confidence decoder's output
    (over the vocabulary at the answer position, or over a question's choices, whose
    loglikelihoods are that decoder's columns)."""

    source: Decoding
    measure: Confidence

    @property
    def label(self) -> str:
        return f"{self.measure.value} of {self.source.label}"

    @property
    def answer_level(self) -> bool:
        return self.measure.answer_level


@dataclass(frozen=True)
class Layout:
    """Which columns and signals a pass computes, and where each sits in the tensors."""

    columns: tuple[tuple[Decoding, int], ...]
    signals: tuple[Signal, ...]
    num_layers: int

    @classmethod
    def build(
        cls,
        decodings: Iterable[Decoding],
        signals: Iterable[Signal],
        num_layers: int,
        lens_layers: dict[str, Sequence[int]],
    ) -> Layout:
        """Every decoding at every layer 0..L (lens decodings at their lens's layers and L)."""
        columns = []
        for decoding in dict.fromkeys(decodings):
            layers = range(num_layers + 1)
            if decoding.lens is not None:
                layers = sorted({*lens_layers[decoding.lens], num_layers})
            columns += [(decoding, layer) for layer in layers]
        return cls(tuple(columns), tuple(dict.fromkeys(signals)), num_layers)

    def column(self, decoding: Decoding, layer: int) -> int:
        try:
            return self.columns.index((decoding, layer))
        except ValueError:
            raise SweepError(
                f"{decoding.label} was not decoded at layer {layer} (its lens has no "
                "translator there)."
            ) from None

    def decodings(self) -> list[Decoding]:
        return list(dict.fromkeys(d for d, _ in self.columns))

    def layers(self, decoding: Decoding) -> list[int]:
        return [layer for d, layer in self.columns if d == decoding]


def parse_decoders(names: Sequence[str]) -> list[DecoderKind]:
    """Decoder names as the command line gives them, checked."""
    valid = [k.value for k in DecoderKind]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise SweepError(
            f"unknown decoder name(s) {', '.join(map(repr, unknown))}; choose from: "
            f"{', '.join(valid)}."
        )
    if not names:
        raise SweepError(f"no decoders given; choose from: {', '.join(valid)}.")
    return [DecoderKind(n) for n in dict.fromkeys(names)]


def parse_thresholds(values: Sequence[str]) -> list[float]:
    """Thresholds in nats, from strings (commas allowed), ascending; `inf`, `-inf` allowed."""
    parts = [p.strip() for v in values for p in str(v).split(",") if p.strip()]
    out = []
    for part in parts:
        try:
            number = float(part)
        except ValueError:
            number = math.nan
        if math.isnan(number):
            raise SweepError(
                f"threshold {part!r} is not a number; give uncertainties in nats, e.g. "
                "--thresholds 0.1 0.5 1 2 inf."
            )
        if number < 0 and number != -math.inf:
            raise SweepError(
                f"threshold {part} can never pass: uncertainties are at least 0 nats. Give "
                "thresholds >= 0 (or -inf for a setting that never exits)."
            )
        out.append(number)
    if not out:
        raise SweepError("no thresholds given, e.g. --thresholds 0.1 0.5 1 2 inf.")
    return sorted(set(out))


def parse_patience(values: Sequence[str]) -> list[int]:
    """Patience values (checks the answer must hold after the first), from strings
    (commas allowed), ascending."""
    parts = [p.strip() for v in values for p in str(v).split(",") if p.strip()]
    out = []
    for part in parts:
        if not part.isdigit():
            raise SweepError(
                f"patience {part!r} is not a whole number >= 0; give checks the answer must "
                "hold, e.g. --patience 0 1 2 3."
            )
        out.append(int(part))
    return sorted(set(out))


def check_schedule(num_layers: int, interval: int, min_layer: int | None) -> tuple[int, ...]:
    """SPADE-EXIT's check layers (as `SpadeConfig.check_schedule`), with clear errors."""
    from lm_eval_spade.config import SpadeArgumentError, SpadeConfig

    try:
        schedule = {"interval": interval} | ({} if min_layer is None else {"min_layer": min_layer})
        config = SpadeConfig.from_model_args(
            threshold=0.0, confidence_decoder=DecoderKind.LOGIT_LENS.value, **schedule
        )
        config.check_layers(num_layers)
    except SpadeArgumentError as err:
        raise SweepError(str(err)) from err
    return config.check_schedule(num_layers)
