"""`lm-eval-spade sweep layers`: every decoder at every layer, from one prefix run.

The paper's figures 3 and 4: accuracy (multiple-choice tasks) or perplexity (rolling
text tasks) at each layer for logit lens, SPADE, SPADE-NoS, and the lens decoders
(tuned lens, L-SPADE) for which a lens is given. Each request runs through the blocks
once; all layers are decoded from that run (`scoring.py`), and lm-eval's own `evaluate`
computes the metrics of each (decoder, layer) from the stored scores (`views.py`), so
each results file equals a `lm_eval --model spade-exit --model_args
exit_layer=K,decoder=D` run, at a fraction of the cost of running those one by one.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lm_eval_spade.decoders import DecoderKind
from lm_eval_spade.lens import LensCheckpointError, read_lens
from lm_eval_spade.sweeps.model import LayerwiseLM
from lm_eval_spade.sweeps.oracle import Decoder, OraclePlan
from lm_eval_spade.sweeps.results import Setting, SweepOutcome, run_sweep, sweep_output
from lm_eval_spade.sweeps.settings import SweepSettings, load_tasks
from lm_eval_spade.sweeps.spec import Decoding, SweepError
from lm_eval_spade.sweeps.views import FixedExit, ScoringCost

logger = logging.getLogger(__name__)

DECODER_NAMES = {
    DecoderKind.LOGIT_LENS: "logit lens",
    DecoderKind.SPADE: "SPADE",
    DecoderKind.SPADE_NOS: "SPADE-NoS",
    DecoderKind.TUNED_LENS: "tuned lens",
    DecoderKind.LSPADE: "L-SPADE",
}
#: Decoders a layer sweep runs by default (the lens ones only when a lens is given).
DEFAULT_DECODERS = tuple(DECODER_NAMES)


@dataclass
class LayerSweepConfig:
    """`decoders`: which to sweep; `lenses`: lens directories (each serves the decoder of
    its own kind; several of one kind are told apart by directory name)."""

    decoders: list[DecoderKind] = field(default_factory=lambda: list(DEFAULT_DECODERS))
    lenses: list[str] = field(default_factory=list)
    explicit_decoders: bool = False


def name_lenses(paths: list[str]) -> dict[str, tuple[str, DecoderKind]]:
    """Lens name -> (directory, decoder kind): the kind's own name when it has one lens
    of that kind, else the directory's name."""
    kinds = {}
    for path in paths:
        try:
            kinds[path] = DecoderKind(read_lens(path).config.kind)
        except LensCheckpointError as err:
            raise SweepError(f"--lens {path}: {err}") from err
    count = Counter(kinds.values())
    names: dict[str, tuple[str, DecoderKind]] = {}
    for path, kind in kinds.items():
        name = kind.value if count[kind] == 1 else Path(path).name
        if name in names:
            raise SweepError(f"two lenses are both called {name!r}; give them distinct folders.")
        names[name] = (path, kind)
    return names


def decoder_label(decoding: Decoding, lenses: dict[str, tuple[str, DecoderKind]]) -> str:
    """How figures and tables name a decoding: `SPADE`, `L-SPADE`, `L-SPADE (arc)`."""
    label = DECODER_NAMES[decoding.kind]
    same_kind = [n for n, (_, k) in lenses.items() if k is decoding.kind]
    return f"{label} ({decoding.lens})" if len(same_kind) > 1 else label


def setting_name(decoding: Decoding) -> str:
    """`spade`, `lspade`, or `lspade-NAME` where a lens has its folder's name."""
    kind = decoding.kind.value
    return kind if decoding.lens in (None, kind) else f"{kind}-{decoding.lens}"


def oracle_decoders(
    decodings: list[Decoding], lenses: dict[str, tuple[str, DecoderKind]]
) -> tuple[Decoder, ...]:
    """The decoders a sweep's oracle file covers, named as its settings and tables name them."""
    return tuple(Decoder(setting_name(d), decoder_label(d, lenses), d) for d in decodings)


def lens_path(decoding: Decoding, lenses: dict[str, tuple[str, DecoderKind]]) -> str | None:
    return lenses[decoding.lens][0] if decoding.lens else None


def decodings_for(config: LayerSweepConfig, lenses: dict[str, tuple[str, DecoderKind]]) -> list:
    out = []
    for kind in config.decoders:
        if not kind.needs_lens:
            out.append(Decoding(kind))
            continue
        names = [n for n, (_, k) in lenses.items() if k is kind]
        if not names and config.explicit_decoders:
            raise SweepError(
                f"decoder {kind.value} needs a lens of that kind: pass --lens DIR (made by "
                f"`lm-eval-spade train-lens --kind {kind.value}`), or drop it from --decoders."
            )
        out += [Decoding(kind, name) for name in names]
    return out


def run_layer_sweep(settings: SweepSettings, config: LayerSweepConfig) -> SweepOutcome:
    with sweep_output(settings) as work:  # bad settings and --out fail before anything loads
        return _layer_sweep(settings, config, work)


def _layer_sweep(settings: SweepSettings, config: LayerSweepConfig, work: Path) -> SweepOutcome:
    lenses = name_lenses(config.lenses)
    decodings = decodings_for(config, lenses)
    task_dict = load_tasks(settings.tasks, settings.include_path)
    lm = LayerwiseLM(
        settings.model,
        decodings,
        lenses={name: path for name, (path, _) in lenses.items()},
        spade_positions=settings.spade_positions,
        spade_start=settings.spade_start,
        **settings.hf_args(),
    )
    points = [
        Setting(
            f"{setting_name(decoding)}_L{layer}",
            FixedExit(
                lm.layout, decoding, layer, lenses[decoding.lens][0] if decoding.lens else None
            ),
            {
                "kind": "layers",
                "decoder": decoding.kind.value,
                "decoder_label": decoder_label(decoding, lenses),
                "layer": layer,
                "num_layers": lm.layout.num_layers,
            },
        )
        for decoding in lm.layout.decodings()
        for layer in lm.layout.layers(decoding)
    ]
    return run_sweep(
        lm,
        points,
        task_dict,
        settings,
        "layers",
        work,
        oracle=OraclePlan("layers", oracle_decoders(lm.layout.decodings(), lenses)),
        decoders=[d.label for d in decodings],
        lenses={n: p for n, (p, _) in lenses.items()},
    )


def _extra_time(seconds: float) -> str:
    """The wall clock per position beyond the full-depth run: a sweep that decodes few
    columns can beat a separately timed full-depth run, and then says so."""
    if not math.isfinite(seconds):
        return ""
    if seconds < 0:
        return f" (and {-seconds * 1e3:.2f} ms less wall clock)"
    return f" and {seconds * 1e3:.2f} ms"


def cost_summary(cost: ScoringCost, columns: int) -> str:
    """The cost line a sweep prints: against one full-depth run, against separate runs, and
    per scored position (cloze continuations are many tokens, each decoded in every column)."""
    timed = (
        f"one full-depth run of the same requests took {cost.full_depth_seconds:.2f} s: cost "
        f"ratio {cost.time_ratio:.2f}x wall clock, "
        if cost.full_depth_seconds
        else "(full-depth run not timed) "
    )
    passes, seconds = cost.per_scored_position()
    per_position = (
        f" Each of the {cost.scored_positions:.0f} scored positions cost {passes:.1f} "
        f"block-token passes{_extra_time(seconds)} beyond the full-depth run."
        if cost.scored_positions
        else ""
    )
    return (
        f"Scored {cost.requests} requests for {columns} settings in {cost.seconds:.2f} s; "
        f"{timed}{cost.pass_ratio:.2f}x block-token passes (one fixed-exit run per "
        f"(decoder, layer) column would take {cost.separate_ratio:.2f}x).{per_position}"
    )
