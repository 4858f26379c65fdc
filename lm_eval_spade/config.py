"""The spade-exit settings, parsed and checked from lm-eval `model_args`.

lm-eval turns `key=value` strings into Python values loosely ("3" becomes 3, "true"
becomes True, and its CLI makes "-1" the float -1.0), so every field is checked here and
a bad value is refused with one line that names the key, what was given and what is
accepted. A whole-number float counts as that integer, so `exit_layer=-1` is refused for
its range, not its type. A key given without a value (`exit_log=`) or as `None` is
refused rather than read as "not set": `exit_layer=None` would otherwise run plain `hf`.

Values that cannot be meant are refused too: a negative `threshold` (every uncertainty
is at least 0 nats, so it never passes; `-inf` says "never exit" on purpose).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from lm_eval_spade.confidence import Confidence
from lm_eval_spade.decoders import DecoderKind, SpadePositions, SpadeStart
from lm_eval_spade.errors import UserInputError
from lm_eval_spade.kv_cache import KVStrategy, default_kv_strategy


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
    if isinstance(value, float) and value.is_integer():
        return int(value)  # lm-eval's CLI reads "-1" as -1.0
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise SpadeArgumentError(f"{key}={value!r} must be an integer (a layer index or count).")


def _float_value(key: str, value: Any) -> float:
    if not isinstance(value, bool) and isinstance(value, int | float | str):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isnan(number):
            return number
    raise SpadeArgumentError(
        f"{key}={value!r} must be a number in nats (inf and -inf are allowed)."
    )


_LENS_DECODERS = [k.value for k in DecoderKind if k.needs_lens]


@dataclass(frozen=True)
class SpadeConfig:
    """How spade-exit decodes. With no field set it is the plain HF model.

    Fixed layer:
    - `exit_layer`: decode every scored position from `h^exit_layer` (0..L).

    Adaptive (SPADE-EXIT):
    - `threshold`: exit a request at the first check where its uncertainty at the answer
      position is at most this many nats (`-inf`: never; `inf`: at the first check);
    - `interval`, `min_layer`: checks at layers `min_layer, min_layer + interval, ...`
      below L (`min_layer` defaults to `interval`);
    - `confidence`: `entropy` (the paper's), `margin` or `maxprob` over the vocabulary, or
      over a multiple-choice question's choices `answer_entropy`, `answer_margin` or
      `patience` (see `confidence.py`);
    - `patience`: with `confidence=patience` (implied), exit once the question's answer has
      held over `patience + 1` checks in a row (instead of `threshold`);
    - `confidence_decoder`: what the uncertainty is computed from: `lspade` (default,
      needs `lens`), `tuned_lens` (needs `lens`) or `logit_lens`; for answer-level
      measures also `spade`;
    - `exit_log`: a file that gets one JSON line per request (task, doc, exit, confidence).

    Both modes:
    - `decoder`: decodes the scored positions at the exit layer (default `spade`);
    - `spade_positions`: the SPADE pair's position ids, `original` `(0, i)` or `compact`;
    - `spade_start`: `pair` (default: the start token climbs with every decoded position,
      as `docs/method.md` counts it) or `shared` (it climbs once per batch and layer, and each
      position attends to its keys/values: the same logits at about half the passes);
    - `lens`: directory of a trained lens (`lm-eval-spade train-lens`, or a tuned-lens
      checkpoint), for the `lspade` / `tuned_lens` decoders; `spade-calibration` names the
      translators shipped for the calibration model (`pretrained=spade-calibration`).

    Generation (`generate_until`):
    - `kv_strategy`: what the blocks above a token's exit hold for it (`kv_cache.py`):
      `fill` (default for SPADE decoders at original positions; needs a SPADE decoder),
      `copy` or `recompute` (default otherwise).
    """

    decoder: DecoderKind | None = None
    exit_layer: int | None = None
    spade_positions: SpadePositions = SpadePositions.ORIGINAL
    spade_start: SpadeStart = SpadeStart.PAIR
    lens: str | None = None
    threshold: float | None = None
    interval: int = 1
    min_layer: int | None = None
    confidence: Confidence = Confidence.ENTROPY
    confidence_decoder: DecoderKind | None = None
    patience: int | None = None
    exit_log: str | None = None
    kv_strategy: KVStrategy | None = None

    @classmethod
    def from_model_args(cls, **args: Any) -> SpadeConfig:
        unknown = set(args) - set(SPADE_MODEL_ARGS)
        if unknown:
            raise SpadeArgumentError(f"unknown spade-exit settings: {sorted(unknown)}.")
        for key, value in args.items():
            if value is None or (isinstance(value, str) and not value.strip()):
                shown = "None" if value is None else ""
                raise SpadeArgumentError(
                    f"{key}={shown} gives no value: set one, or leave {key} out of --model_args."
                )
        given = set(args)
        fields: dict[str, Any] = {}
        if "decoder" in given:
            fields["decoder"] = _enum_value(DecoderKind, "decoder", args["decoder"])
        if "exit_layer" in given:
            fields["exit_layer"] = _int_value("exit_layer", args["exit_layer"])
        if "spade_positions" in given:
            fields["spade_positions"] = _enum_value(
                SpadePositions, "spade_positions", args["spade_positions"]
            )
        if "spade_start" in given:
            fields["spade_start"] = _enum_value(SpadeStart, "spade_start", args["spade_start"])
        for key in ("lens", "exit_log"):
            if key in given:
                fields[key] = str(args[key])
        if "threshold" in given:
            fields["threshold"] = _float_value("threshold", args["threshold"])
        for key in ("interval", "min_layer", "patience"):
            if key in given:
                fields[key] = _int_value(key, args[key])
        if "confidence" in given:
            fields["confidence"] = _enum_value(Confidence, "confidence", args["confidence"])
        elif "patience" in given:
            fields["confidence"] = Confidence.PATIENCE
        if "confidence_decoder" in given:
            fields["confidence_decoder"] = _enum_value(
                DecoderKind, "confidence_decoder", args["confidence_decoder"]
            )
        if "kv_strategy" in given:
            fields["kv_strategy"] = _enum_value(KVStrategy, "kv_strategy", args["kv_strategy"])
        config = cls(**fields)
        config._check(given)
        return config._with_defaults()

    def _check(self, given: set[str]) -> None:
        if self.threshold is not None and self.threshold < 0 and not self.never_exits:
            raise SpadeArgumentError(
                f"threshold={self.threshold:g} can never pass: uncertainties are at least 0 "
                "nats, so no request would exit. Give a threshold >= 0, or threshold=-inf to "
                "never exit on purpose."
            )
        self._check_patience()
        adaptive_only = sorted(
            given & {"interval", "min_layer", "confidence", "confidence_decoder", "exit_log"}
        )
        if not self.adaptive and adaptive_only:
            raise SpadeArgumentError(
                f"{', '.join(adaptive_only)} only apply to adaptive exits: add threshold=NATS "
                "(or drop them)."
            )
        if self.exit_layer is not None and self.adaptive:
            raise SpadeArgumentError(
                "exit_layer fixes the exit layer and threshold makes it adaptive; give one of "
                "them, not both."
            )
        if self.decoder is not None and not self.active:
            raise SpadeArgumentError(
                f"decoder={self.decoder.value} needs a layer to decode from: add exit_layer=K "
                "(0 <= K <= number of blocks) or threshold=NATS for adaptive exits."
            )
        if self.interval < 1:
            raise SpadeArgumentError(
                f"interval={self.interval} must be at least 1 (check every N blocks)."
            )
        confidence = self.confidence_decoder
        answer_level = self.confidence.answer_level
        allowed = [DecoderKind.LSPADE, DecoderKind.TUNED_LENS, DecoderKind.LOGIT_LENS]
        if answer_level:
            allowed.append(DecoderKind.SPADE)
        if confidence is not None and confidence not in allowed:
            raise SpadeArgumentError(
                f"confidence_decoder={confidence.value} is not valid with confidence="
                f"{self.confidence.value}; choose one of: {', '.join(k.value for k in allowed)}"
                + (
                    ""
                    if answer_level
                    else " (SPADE itself is what exiting saves; it serves only the answer-level "
                    "measures answer_entropy, answer_margin, patience)"
                )
                + "."
            )
        if self.adaptive and self.lens is None and confidence is None:
            raise SpadeArgumentError(
                f"{'patience' if self.patience is not None else 'threshold'} needs a confidence "
                "source: add lens=DIR (an L-SPADE lens from `lm-eval-spade train-lens --kind "
                "lspade`, the paper's choice) or confidence_decoder=logit_lens"
                + (" (or spade)." if answer_level else ".")
            )
        users = [k for k in (self.decoder, confidence) if k is not None and k.needs_lens]
        if users and self.lens is None:
            raise SpadeArgumentError(
                f"decoder={users[0].value} decodes through a trained lens: add lens=DIR (made "
                f"by `lm-eval-spade train-lens --kind {users[0].value}`)."
            )
        if len({k.value for k in users}) > 1:
            raise SpadeArgumentError(
                "decoder and confidence_decoder ask for lenses of two kinds "
                f"({users[0].value}, {users[1].value}), but there is one lens=; use one kind."
            )
        self._check_kv_strategy()
        if "spade_start" in given and (self.decoder or DecoderKind.SPADE) is not DecoderKind.SPADE:
            raise SpadeArgumentError(
                f"spade_start sets how SPADE's start token climbs, and decoder="
                f"{self.decoder.value if self.decoder else ''} has none: drop spade_start or "
                "use decoder=spade."
            )
        if "spade_start" in given and not self.active:
            raise SpadeArgumentError(
                "spade_start only applies to early exits: add exit_layer=K or threshold=NATS "
                "(or drop it)."
            )
        if self.lens is not None and not users and not self.adaptive:
            raise SpadeArgumentError(
                f"lens={self.lens} is only used by decoder={' or decoder='.join(_LENS_DECODERS)}"
                " or by adaptive exits (threshold=...); set one of those or drop lens."
            )

    def _check_patience(self) -> None:
        if self.confidence is Confidence.PATIENCE and self.patience is None:
            raise SpadeArgumentError(
                "confidence=patience exits once the answer holds for k checks: add patience=K "
                "(an integer >= 0) instead of threshold."
            )
        if self.patience is None:
            return
        if self.confidence is not Confidence.PATIENCE:
            raise SpadeArgumentError(
                f"patience={self.patience} is the patience rule's setting, and confidence="
                f"{self.confidence.value} is another rule: drop confidence or set "
                "confidence=patience."
            )
        if self.patience < 0:
            raise SpadeArgumentError(
                f"patience={self.patience} must be at least 0 (checks the answer must hold "
                "after the first at which it appears)."
            )
        if self.threshold is not None:
            raise SpadeArgumentError(
                "patience=K is the patience rule's threshold; give patience or threshold, not both."
            )

    def _check_kv_strategy(self) -> None:
        strategy = self.kv_strategy
        if strategy is None:
            return
        if not self.active:
            raise SpadeArgumentError(
                f"kv_strategy={strategy.value} only applies to early exits in generation: add "
                "exit_layer=K or threshold=NATS (or drop it)."
            )
        decoder = self.decoder or DecoderKind.SPADE
        climbs = decoder in (DecoderKind.SPADE, DecoderKind.SPADE_NOS)
        if strategy is KVStrategy.FILL and not climbs:
            raise SpadeArgumentError(
                f"kv_strategy=fill takes keys/values from SPADE's pass through the upper blocks, "
                f"which decoder={decoder.value} does not make: use kv_strategy=copy or "
                "recompute, or decoder=spade."
            )

    def _with_defaults(self) -> SpadeConfig:
        fields = asdict(self)
        if self.active and self.decoder is None:
            fields["decoder"] = DecoderKind.SPADE
        if self.active and self.kv_strategy is None:
            decoder = fields["decoder"]
            climbs = decoder in (DecoderKind.SPADE, DecoderKind.SPADE_NOS)
            fields["kv_strategy"] = default_kv_strategy(
                climbs and self.spade_positions is SpadePositions.ORIGINAL
            )
        if self.adaptive:
            if self.confidence_decoder is None:  # the lens's kind: one lens serves both
                decoder = self.decoder
                fields["confidence_decoder"] = (
                    decoder if decoder is not None and decoder.needs_lens else DecoderKind.LSPADE
                )
            if self.min_layer is None:
                fields["min_layer"] = self.interval
        return SpadeConfig(**fields)

    @property
    def active(self) -> bool:
        """Whether any exit setting is given (else spade-exit is `hf`)."""
        return self.exit_layer is not None or self.adaptive

    @property
    def adaptive(self) -> bool:
        """Whether requests exit by a rule (`threshold`, or `patience`)."""
        return self.threshold is not None or self.patience is not None

    @property
    def exit_threshold(self) -> float | None:
        """The threshold `exiting.py` compares uncertainties with: `-patience` for the
        patience rule (whose uncertainty is minus the checks the answer has held)."""
        return -float(self.patience) if self.patience is not None else self.threshold

    @property
    def never_exits(self) -> bool:
        """`threshold=-inf`: no uncertainty passes, so every request is plain HFLM's."""
        return self.threshold == -math.inf

    @property
    def lens_kind(self) -> DecoderKind | None:
        """The decoder kind the lens must be trained for, if a lens is used."""
        for kind in (self.decoder, self.confidence_decoder):
            if kind is not None and kind.needs_lens:
                return kind
        return None

    def check_layers(self, num_layers: int) -> None:
        if self.exit_layer is not None and not 0 <= self.exit_layer <= num_layers:
            raise SpadeArgumentError(
                f"exit_layer={self.exit_layer} is out of range: this model has {num_layers} "
                f"blocks, so exit_layer must be between 0 (embeddings) and {num_layers} "
                "(full model)."
            )
        if self.threshold is not None and self.min_layer == self.interval >= num_layers:
            # min_layer defaults to interval: name what was given
            where = "above" if self.interval > num_layers else "equal to"
            raise SpadeArgumentError(
                f"interval={self.interval} is {where} the model's L={num_layers} blocks: the "
                f"first check is at layer interval (unless min_layer is given) and checks "
                f"happen below L, so no request could exit; give interval <= {num_layers - 1}"
                " (or min_layer=K to start the checks earlier)."
            )
        if self.min_layer is not None and not 0 <= self.min_layer < num_layers:
            raise SpadeArgumentError(
                f"min_layer={self.min_layer} is out of range: checks happen below the last "
                f"of this model's {num_layers} blocks, so 0 <= min_layer <= {num_layers - 1}."
            )

    def check_schedule(self, num_layers: int) -> tuple[int, ...]:
        """The layers where the exit rule is applied, ascending, all below L."""
        if self.exit_layer is not None:
            return (self.exit_layer,) if self.exit_layer < num_layers else ()
        if not self.adaptive:
            return ()
        assert self.min_layer is not None
        return tuple(range(self.min_layer, num_layers, self.interval))

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, Enum):
                return value.value
            if isinstance(value, float) and math.isinf(value):
                return str(value)  # JSON has no infinity
            return value

        return {k: plain(v) for k, v in asdict(self).items()}


SPADE_MODEL_ARGS: tuple[str, ...] = tuple(SpadeConfig.__dataclass_fields__)
