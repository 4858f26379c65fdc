"""`lm-eval-spade sweep thresholds`: SPADE-EXIT's accuracy-compute trade-off (figure 5).

SPADE-EXIT at each threshold, and on the same axes (accuracy against mean exit layer
and compute fraction) the baselines:

- static exit: every request exits at layer l (SPADE, and logit lens), for every l;
- entropy exit on logit lens: the classic early exit, deciding and decoding with the
  model's own head on `h^l`;
- top-2 margin exit: SPADE-EXIT's rule with `-log(p1 - p2)` instead of entropy, from the
  same lens (the paper's "probability difference" baseline);
- answer-level rules (`--answer-decoders`): the entropy and the top-2 margin of the softmax
  over a question's choices, from each named confidence decoder (`spade`, `logit_lens`,
  `lens`), over the same thresholds, and with `--patience K...` the patience rule (the
  answer held over K + 1 checks), all decoded with SPADE. These need no lens unless
  `lens` is named; the L-SPADE series need `--lens`.

Nothing is rerun per threshold: one layer-wise pass gives every request's answer at
every layer and its uncertainties at every check layer, and each threshold picks, per
question, the first check where the uncertainty is at most the threshold (`views.py`).
Each results file equals the spade-exit run its `config.model_args` names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lm_eval_spade.confidence import Confidence
from lm_eval_spade.decoders import DecoderKind
from lm_eval_spade.sweeps.layers import DECODER_NAMES, name_lenses, oracle_decoders
from lm_eval_spade.sweeps.model import LayerwiseLM
from lm_eval_spade.sweeps.oracle import Decoder, Family, OraclePlan
from lm_eval_spade.sweeps.results import Setting, SweepOutcome, run_sweep, sweep_output
from lm_eval_spade.sweeps.settings import SweepSettings, load_tasks
from lm_eval_spade.sweeps.spec import Decoding, Layout, Signal, SweepError, check_schedule
from lm_eval_spade.sweeps.views import FixedExit, ThresholdExit


@dataclass
class ThresholdSweepConfig:
    """Thresholds (nats), SPADE-EXIT's check schedule, and its confidence lens."""

    thresholds: list[float]
    lens: str | None = None
    interval: int = 1
    min_layer: int | None = None
    baselines: bool = True
    #: Confidence decoders of the answer-level series: spade, logit_lens, lens (--lens's).
    answer_decoders: list[str] = field(default_factory=list)
    #: Patience values of the patience series (one per answer decoder); none: no series.
    patience: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Series:
    """An exit rule family swept over the thresholds."""

    label: str
    signal: Signal
    decoding: Decoding
    #: The series's own thresholds (the patience series: -patience each); None: the sweep's.
    values: tuple[float, ...] | None = None

    def thresholds(self, default: Sequence[float]) -> list[float]:
        return list(default if self.values is None else self.values)


def point_name(series: Series, threshold: float) -> str:
    """A setting's name: `SPADE-EXIT_T0.5`, or `patience (SPADE)_P2` (threshold -2)."""
    if series.signal.measure is Confidence.PATIENCE:
        return f"{series.label}_P{int(-threshold)}"
    return f"{series.label}_T{threshold:g}"


def threshold_settings(
    layout: Layout,
    series: Series,
    thresholds: Sequence[float],
    checks: tuple[int, ...],
    config: ThresholdSweepConfig,
    lens_path: str | None,
    kind: str,
    **sweep: object,
) -> list[Setting]:
    """One setting per threshold of `series` (`series.values` where it has its own)."""
    min_layer = checks[0] if checks else config.interval
    patience = series.signal.measure is Confidence.PATIENCE
    return [
        Setting(
            point_name(series, threshold),
            ThresholdExit(
                layout,
                series.signal,
                threshold,
                series.decoding,
                checks,
                config.interval,
                min_layer,
                lens_path,
            ),
            {
                "kind": kind,
                "series": series.label,
                "threshold": threshold,
                **({"patience": int(-threshold)} if patience else {}),
                "confidence": series.signal.measure.value,
                "confidence_decoder": series.signal.source.kind.value,
                "decoder": series.decoding.kind.value,
                "num_layers": layout.num_layers,
                **sweep,
            },
        )
        for threshold in series.thresholds(thresholds)
    ]


def static_settings(layout: Layout, decoding: Decoding, kind: str) -> list[Setting]:
    """Static exit at every layer with `decoding`."""
    label = f"static exit ({DECODER_NAMES[decoding.kind]})"
    return [
        Setting(
            f"{label}_L{layer}",
            FixedExit(layout, decoding, layer),
            {
                "kind": kind,
                "series": label,
                "layer": layer,
                "decoder": decoding.kind.value,
                "num_layers": layout.num_layers,
            },
        )
        for layer in layout.layers(decoding)
    ]


def series_for(
    lens_name: str | None,
    lens_kind: DecoderKind | None,
    baselines: bool,
    answer_sources: Sequence[Decoding] = (),
    patience: Sequence[int] = (),
) -> list[Series]:
    """The L-SPADE series (with a lens), the baselines, and the answer-level series of
    each of `answer_sources` (with a patience series when `patience` is given)."""
    spade = Decoding(DecoderKind.SPADE)
    out = []
    if lens_name is not None and lens_kind is not None:
        source = Decoding(lens_kind, lens_name)
        short = DECODER_NAMES[lens_kind]
        out.append(Series("SPADE-EXIT", Signal(source, Confidence.ENTROPY), spade))
        if baselines:
            out.append(Series(f"top-2 margin ({short})", Signal(source, Confidence.MARGIN), spade))
    if baselines:
        out.append(
            Series(
                "entropy (logit lens)",
                Signal(Decoding(DecoderKind.LOGIT_LENS), Confidence.ENTROPY),
                Decoding(DecoderKind.LOGIT_LENS),
            )
        )
    for source in answer_sources:
        short = DECODER_NAMES[source.kind]
        out += [
            Series(f"answer entropy ({short})", Signal(source, Confidence.ANSWER_ENTROPY), spade),
            Series(f"answer margin ({short})", Signal(source, Confidence.ANSWER_MARGIN), spade),
        ]
        if patience:
            values = tuple(sorted(float(-k) for k in patience))
            out.append(
                Series(f"patience ({short})", Signal(source, Confidence.PATIENCE), spade, values)
            )
    return out


ANSWER_DECODERS = ("spade", "logit_lens", "lens")


def answer_sources(names: Sequence[str], lens_name: str | None, lens_kind) -> list[Decoding]:
    """The confidence decoders `--answer-decoders` names, checked."""
    unknown = [n for n in names if n not in ANSWER_DECODERS]
    if unknown:
        raise SweepError(
            f"--answer-decoders {', '.join(unknown)}: choose from {', '.join(ANSWER_DECODERS)}."
        )
    out = []
    for name in dict.fromkeys(names):
        if name != "lens":
            out.append(Decoding(DecoderKind(name)))
        elif lens_name is None:
            raise SweepError("--answer-decoders lens decodes with --lens DIR: add it.")
        else:
            out.append(Decoding(lens_kind, lens_name))
    return out


def oracle_plan(
    kind: str,
    decoders: tuple[Decoder, ...],
    checks: tuple[int, ...],
    series: Sequence[Series],
    thresholds: Sequence[float],
) -> OraclePlan:
    """What a threshold sweep's oracle file covers: the oracle of each decoder at the
    sweep's checks, and each series's cheapest threshold against it."""
    families = tuple(
        Family(s.label, s.signal, s.decoding, tuple(s.thresholds(thresholds))) for s in series
    )
    return OraclePlan(kind, decoders, checks, families)


def check_lens_covers(lm: LayerwiseLM, lens_name: str, lens_path: str, checks: tuple[int, ...]):
    """Every check layer needs a translator of the confidence lens."""
    missing = sorted(set(checks) - set(lm.lenses[lens_name].layers))
    if missing:
        raise SweepError(
            f"the lens at {lens_path} has no translators for check layers {missing}; train "
            "one that covers them, or change --interval / --min-layer."
        )


def run_threshold_sweep(settings: SweepSettings, config: ThresholdSweepConfig) -> SweepOutcome:
    if config.lens is None and not config.answer_decoders:
        raise SweepError(
            "sweep thresholds needs --lens DIR (SPADE-EXIT's confidence comes from an L-SPADE "
            "lens: `lm-eval-spade train-lens --kind lspade ...`) or --answer-decoders spade "
            "logit_lens (answer-level rules, which need no lens)."
        )
    if config.patience and not config.answer_decoders:
        raise SweepError("--patience needs --answer-decoders (whose answers it watches).")
    with sweep_output(settings) as work:  # bad settings and --out fail before anything loads
        return _threshold_sweep(settings, config, config.lens, work)


def _threshold_sweep(
    settings: SweepSettings, config: ThresholdSweepConfig, lens: str | None, work: Path
) -> SweepOutcome:
    lenses = name_lenses([lens]) if lens is not None else {}
    lens_name = lens_path = lens_kind = None
    if lenses:
        (lens_name, (lens_path, lens_kind)), *_ = lenses.items()
        if not lens_kind.needs_lens:  # pragma: no cover - read_lens only knows lens kinds
            raise SweepError(f"--lens {lens_path} is not a lens.")
    sources = answer_sources(config.answer_decoders, lens_name, lens_kind)
    series = series_for(lens_name, lens_kind, config.baselines, sources, config.patience)
    statics = [Decoding(DecoderKind.SPADE)]
    if config.baselines:
        statics.append(Decoding(DecoderKind.LOGIT_LENS))
    task_dict = load_tasks(settings.tasks, settings.include_path)
    lm = LayerwiseLM(
        settings.model,
        [*statics, *(s.decoding for s in series), *sources],
        [s.signal for s in series],
        lenses={lens_name: lens_path} if lens_name and lens_path else {},
        spade_positions=settings.spade_positions,
        spade_start=settings.spade_start,
        **settings.hf_args(),
    )
    checks = check_schedule(lm.layout.num_layers, config.interval, config.min_layer)
    if lens_name and lens_path:
        check_lens_covers(lm, lens_name, lens_path, checks)
    points = []
    for s in series:
        path = lens_path if s.signal.source.kind.needs_lens else None
        points += threshold_settings(
            lm.layout, s, config.thresholds, checks, config, path, "thresholds"
        )
    for decoding in statics:
        points += static_settings(lm.layout, decoding, "thresholds")
    decodings = list(dict.fromkeys([*statics, *(s.decoding for s in series)]))
    return run_sweep(
        lm,
        points,
        task_dict,
        settings,
        "thresholds",
        work,
        oracle=oracle_plan(
            "thresholds", oracle_decoders(decodings, lenses), checks, series, config.thresholds
        ),
        thresholds=config.thresholds,
        **({"patience": config.patience} if config.patience else {}),
        lens=lens_path,
        checks=list(checks),
        series=[s.label for s in series],
    )
