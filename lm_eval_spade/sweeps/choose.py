"""`lm-eval-spade choose-threshold`: the most aggressive threshold with a guarantee.

A threshold read off a validation curve overfits that curve. This picks one with
distribution-free risk control instead (Learn-then-Test, as CALM does for its exits):

1. One layer-wise pass over the calibration questions (a task's split, or a file of
   prompts) gives every candidate threshold's exits and answers (`outcomes.py`).
2. A question disagrees under a threshold when the exit's answer differs from the full
   model's. That needs no labels, and it bounds the accuracy drop: a question can only
   lose accuracy where its answer changes.
3. The candidates, fixed before the data is seen and ordered from the most cautious
   (lowest threshold) to the most aggressive, are tested in that order with an exact
   binomial p-value for "disagreement rate > δ", stopping at the first that fails
   (`risk_control.py`). The last one to pass is chosen: with probability at least 1 − ε
   over the draw of the calibration set, its disagreement rate on questions drawn like
   them is at most δ.

Output: the chosen threshold, the spade-exit `--model_args` that use it, a table over
the candidates, `OUT/choose_threshold.json`, and `OUT/results/chosen.json` (lm-eval
results of the chosen setting, which `report` marks in its threshold figure). `OUT` is
an output folder like every command's (`files.staged_output`): checked before the model
loads, written whole at the end, replaced only with `--overwrite`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lm_eval_spade import __version__
from lm_eval_spade.confidence import Confidence
from lm_eval_spade.decoders import DecoderKind
from lm_eval_spade.files import CHOICE, LAYOUTS, check_output, staged_output
from lm_eval_spade.finite import json_number
from lm_eval_spade.risk_control import (
    certified_count,
    check_levels,
    p_values,
    questions_needed,
)
from lm_eval_spade.sweeps.answers import MultipleChoice, next_token_rules
from lm_eval_spade.sweeps.layers import name_lenses
from lm_eval_spade.sweeps.model import LayerwiseLM
from lm_eval_spade.sweeps.outcomes import ExitRule, Outcomes, outcomes
from lm_eval_spade.sweeps.prompts import prompt_requests
from lm_eval_spade.sweeps.results import Setting, evaluate_setting, write_json
from lm_eval_spade.sweeps.settings import SweepSettings, load_tasks, unique_tasks
from lm_eval_spade.sweeps.spec import Decoding, Signal, SweepError, check_schedule
from lm_eval_spade.sweeps.thresholds import check_lens_covers
from lm_eval_spade.sweeps.views import FixedExit, ScoreTable, ThresholdExit

logger = logging.getLogger(__name__)

#: The candidates unless --thresholds says otherwise: fixed before any data is seen (as
#: fixed-sequence testing needs), 20 per decade from 1e-4 to 100 nats, then `inf` (exit
#: at the first check).
DEFAULT_THRESHOLDS = (
    *sorted({float(f"{t:.3g}") for t in np.geomspace(1e-4, 100, 121)}),
    math.inf,
)
OUTPUT = "choose_threshold.json"
SPLITS = ("train", "validation", "test")


@dataclass
class ChooseConfig:
    """What to calibrate on and how: `task` and its `split`, or a `prompts` file; the
    exit settings (as `sweep thresholds`); δ (`max_drop`) and ε (`risk`); the candidate
    thresholds; the metric whose answer counts; tasks to report the candidates on."""

    task: str | None = None
    split: str = "validation"
    prompts: str | None = None
    lens: str | None = None
    confidence: Confidence = Confidence.ENTROPY
    confidence_decoder: DecoderKind | None = None
    interval: int = 1
    min_layer: int | None = None
    max_drop: float = 0.01
    risk: float = 0.1
    thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    metric: str = "acc"
    eval_tasks: list[str] = field(default_factory=list)
    eval_limit: float | None = None

    def source(self) -> str:
        return f"prompts of {self.prompts}" if self.prompts else f"{self.task} ({self.split})"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["confidence"] = self.confidence.value
        data["confidence_decoder"] = self.confidence_decoder and self.confidence_decoder.value
        data["thresholds"] = [json_number(t) for t in self.thresholds]
        return data


class RecordingTable(ScoreTable):
    """A `ScoreTable` that also keeps each request it answers, with its scores."""

    def __init__(self, lm: LayerwiseLM) -> None:
        super().__init__(lm, time_full_depth=False)
        self.recorded: list[tuple[Any, Any]] = []

    def scores(self, reqtype, requests):
        out = super().scores(reqtype, requests)
        self.recorded += zip(requests, out, strict=True)
        return out

    def take(self) -> list[tuple[Any, Any]]:
        out, self.recorded = self.recorded, []
        return out


@dataclass
class Scorer:
    """The model scoring every layer, the exit rule being calibrated, and its settings."""

    table: RecordingTable
    rule: ExitRule
    settings: SweepSettings
    config: ChooseConfig
    lens_path: str | None
    task_manager: Any = None

    def load_tasks(self, names: list[str], split: str | None) -> dict:
        """lm-eval's task dict for `names`, evaluated on `split` (None: lm-eval's own)."""
        from lm_eval.tasks import TaskManager

        if self.task_manager is None:
            self.task_manager = TaskManager(include_path=self.settings.include_path)
        task_dict = load_tasks(names, self.settings.include_path, self.task_manager)
        if split is not None:
            for task in task_dict["tasks"].values():
                task_on_split(task, split)
        return task_dict

    def threshold_exit(self, threshold: float) -> ThresholdExit:
        checks = self.rule.checks
        return ThresholdExit(
            self.rule.layout, self.rule.signal, threshold, self.rule.decoding, checks,
            self.config.interval, checks[0], self.lens_path,
        )  # fmt: skip

    def full_depth(self) -> Setting:
        layers = self.rule.layout.num_layers
        return Setting("full depth", FixedExit(self.rule.layout, self.rule.decoding, layers))


def confidence_signal(config: ChooseConfig) -> tuple[Signal, dict[str, str]]:
    """The signal the exit decides on, and the lens it needs (name -> folder)."""
    lenses = name_lenses([config.lens]) if config.lens else {}
    lens_kinds = {kind for _, kind in lenses.values()}
    kind = config.confidence_decoder or next(iter(lens_kinds), None)
    if kind is None:
        raise SweepError(
            "choose-threshold needs a confidence source: --lens DIR (an L-SPADE lens, the "
            "paper's choice) or --confidence-decoder logit_lens."
        )
    if kind.needs_lens and kind not in lens_kinds:
        have = f"a {next(iter(lens_kinds)).value} lens" if lens_kinds else "no --lens"
        raise SweepError(
            f"--confidence-decoder {kind.value} needs a {kind.value} lens, and there is {have}; "
            f"give one made by `lm-eval-spade train-lens --kind {kind.value}`."
        )
    if not kind.needs_lens and lenses:
        raise SweepError(
            f"--confidence-decoder {kind.value} uses no lens; drop --lens {config.lens}."
        )
    name = next(iter(lenses)) if kind.needs_lens else None
    signal = Signal(Decoding(kind, name), config.confidence)
    return signal, {n: path for n, (path, _) in lenses.items()}


def build_scorer(settings: SweepSettings, config: ChooseConfig) -> Scorer:
    """Check the inputs, then load the model and lens."""
    check_levels(config.max_drop, config.risk)
    settings.hf_args()  # bad --model-args fail before anything loads
    if config.task is not None and config.prompts is not None:
        raise SweepError(
            f"both --task {config.task} and --prompts {config.prompts} were given; the "
            "calibration questions come from one of them: drop the other."
        )
    if config.task is None and config.prompts is None:
        raise SweepError("give the calibration questions: --task NAME or --prompts FILE.")
    config.eval_tasks = unique_tasks(config.eval_tasks, "--eval-tasks")
    if config.split not in SPLITS:
        raise SweepError(f"--split {config.split} is not one of {', '.join(SPLITS)}.")
    if not config.thresholds:
        raise SweepError("no candidate thresholds, e.g. --thresholds 0.01 0.1 1 inf.")
    signal, lenses = confidence_signal(config)
    if signal.answer_level and config.task is None:
        raise SweepError(
            f"--confidence {signal.measure.value} is over a question's choices: calibrate on "
            "a multiple-choice --task (prompts have no choices)."
        )
    if signal.source.kind is DecoderKind.SPADE and not signal.answer_level:
        raise SweepError(
            "--confidence-decoder spade serves answer-level measures only (answer_entropy, "
            "answer_margin)."
        )
    spade = Decoding(DecoderKind.SPADE)
    lm = LayerwiseLM(
        settings.model,
        [spade, *([signal.source] if signal.answer_level else [])],
        [signal],
        lenses=lenses,
        spade_positions=settings.spade_positions,
        spade_start=settings.spade_start,
        **settings.hf_args(),
    )
    checks = check_schedule(lm.layout.num_layers, config.interval, config.min_layer)
    lens_path = next(iter(lenses.values()), None)
    if signal.source.lens is not None and lens_path is not None:
        check_lens_covers(lm, signal.source.lens, lens_path, checks)
    rule = ExitRule(lm.layout, signal, checks, spade)
    return Scorer(RecordingTable(lm), rule, settings, config, lens_path)


def task_on_split(task: Any, split: str) -> Any:
    """Make lm-eval evaluate `task` on `split` (it evaluates its test split, else its
    validation split): the split becomes its test split."""
    splits = {
        "train": task.config.training_split,
        "validation": task.config.validation_split,
        "test": task.config.test_split,
    }
    if splits.get(split) is None:
        have = [s for s, name in splits.items() if name is not None]
        raise SweepError(
            f"task {task.config.task} has no {split} split (it has: {', '.join(have)}); "
            "pass --split with one of those."
        )
    task.config.test_split = splits[split]
    return task


@dataclass
class Scored:
    """One pass over a set of questions: every candidate's outcome, and lm-eval's own
    results at full depth (a check on the answers counted here)."""

    outcomes: Outcomes
    full_depth: dict[str, Any] | None


def score_tasks(
    scorer: Scorer, names: list[str], split: str | None, limit: float | None, metric: str
) -> dict[str, Scored]:
    """Each task's questions (its `split`, or lm-eval's evaluation split) scored once."""
    task_dict = scorer.load_tasks(names, None)
    tasks = task_dict["tasks"]
    answers = MultipleChoice(tasks, metric)  # multiple-choice tasks only
    if split is not None:
        for task in tasks.values():
            task_on_split(task, split)
    settings = replace(scorer.settings, tasks=names, limit=limit)
    results = evaluate_setting(scorer.table, scorer.full_depth(), task_dict, settings)
    records = scorer.table.take()
    predict, score = answers.rules()
    out = {}
    for name in tasks:
        mine = [r for r in records if r[0].task_name == name]
        found = outcomes(mine, scorer.rule, scorer.config.thresholds, predict, score)
        out[name] = Scored(found, results["results"].get(name))
    return out


def score_prompts(scorer: Scorer) -> Scored:
    lm = scorer.table.lm
    limit = scorer.settings.limit
    requests = prompt_requests(
        lm, str(scorer.config.prompts), int(limit) if limit else None,
        scorer.settings.include_path,
    )  # fmt: skip
    scorer.table.scores("loglikelihood", requests)
    predict, score = next_token_rules()
    found = outcomes(scorer.table.take(), scorer.rule, scorer.config.thresholds, predict, score)
    return Scored(found, None)


def certify(summary: pd.DataFrame, max_drop: float, risk: float) -> tuple[pd.DataFrame, int | None]:
    """p-values and the fixed-sequence verdict for each candidate, and the chosen one's
    index (None when the first candidate already fails)."""
    n = int(summary["questions"].iloc[0])
    p = p_values(summary["disagreements"].to_numpy(), n, max_drop)
    count = certified_count(p, risk)
    position = np.arange(len(summary))
    summary = summary.assign(p_value=p, tested=position <= count, certified=position < count)
    return summary, (count - 1 if count else None)


def shortfall(
    summary: pd.DataFrame, chosen: int | None, config: ChooseConfig, num_layers: int
) -> str | None:
    """Why no certified threshold exits early, and how many calibration questions would
    certify the first candidate that does; None when the chosen one exits early."""
    early = summary.index[summary["mean_exit_layer"] < num_layers]
    if chosen is not None and chosen in early:
        return None
    head = (
        "no threshold could be certified"
        if chosen is None
        else "the certified thresholds exit no calibration question before full depth"
    )
    if not len(early):
        return f"{head}: no candidate exits any calibration question early; add larger ones."
    first = summary.loc[early[0]]
    n, count = int(first["questions"]), int(first["disagreements"])
    needed = questions_needed(config.max_drop, config.risk, count / n)
    where = (
        f"the first candidate that exits early (threshold {first['threshold']:g}) disagrees "
        f"with the full model on {count} of {n} questions"
    )
    if needed is None:
        return (
            f"{head}: {where}, a rate of at least --max-drop {config.max_drop:g}, so no number "
            "of calibration questions certifies it; allow a larger --max-drop or use a "
            "better confidence lens."
        )
    return (
        f"{head} with {n} calibration questions: {where}; at that rate about {needed} "
        "questions would certify it (at least "
        f"{questions_needed(config.max_drop, config.risk)} even with no disagreement at all, "
        f"for --max-drop {config.max_drop:g} and --risk {config.risk:g})."
    )


def records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: json_number(v) for k, v in row.items()} for row in table.to_dict("records")]


@dataclass
class Choice:
    """What choose-threshold found and wrote."""

    calibration: pd.DataFrame
    chosen: int | None
    threshold: float | None
    model_args: str | None
    fragment: str | None
    shortfall: str | None
    evaluation: dict[str, pd.DataFrame]
    histograms: dict[str, dict[str, int]]  # the chosen threshold's exits: calibration, tasks
    full_depth: dict[str, Any]
    num_layers: int
    files: list[Path]

    @property
    def chosen_row(self) -> pd.Series | None:
        return None if self.chosen is None else self.calibration.loc[self.chosen]


def lm_eval_model_args(settings: SweepSettings, spade: dict[str, Any]) -> str:
    """spade-exit's `--model_args` for the `lm_eval` command: the device goes to its own
    `--device` flag (the command's default, cuda:0, would clash with a device here)."""
    args = settings.model_args_string(spade).split(",")
    return ",".join(a for a in args if not a.startswith("device="))


def lm_eval_command(settings: SweepSettings, config: ChooseConfig, model_args: str) -> str:
    device = settings.hf_args().get("device", "cpu")
    tasks = " ".join(config.eval_tasks or [config.task or "TASK"])
    include = f" --include_path {settings.include_path}" if settings.include_path else ""
    return (
        f"lm_eval --model spade-exit --model_args {model_args} --device {device} "
        f"--tasks {tasks}{include}"
    )


def run_choose_threshold(settings: SweepSettings, config: ChooseConfig) -> Choice:
    check_output(settings.out, CHOICE, settings.overwrite, LAYOUTS[CHOICE])  # before any work
    scorer = build_scorer(settings, config)
    config.thresholds = sorted(set(config.thresholds))  # most cautious first
    if config.prompts:
        calibration = score_prompts(scorer)
        full_depth = {}
    else:
        assert config.task is not None
        scored = score_tasks(scorer, [config.task], config.split, settings.limit, config.metric)
        if len(scored) != 1:
            raise SweepError(
                f"--task {config.task} names {len(scored)} tasks (a group or tag); give one task."
            )
        (calibration,) = scored.values()
        full_depth = {config.task: calibration.full_depth}
    summary, chosen = certify(calibration.outcomes.summary(), config.max_drop, config.risk)
    threshold = None if chosen is None else float(summary.loc[chosen, "threshold"])
    model_args = fragment = None
    if threshold is not None:
        rule = scorer.threshold_exit(threshold)
        fragment = ",".join(f"{k}={v}" for k, v in rule.settings().items())
        model_args = lm_eval_model_args(settings, rule.settings())
    evaluation = {}
    histograms = {}
    if chosen is not None:
        histograms["calibration"] = calibration.outcomes.histogram(chosen)
    if config.eval_tasks:
        for name, found in score_tasks(
            scorer, config.eval_tasks, None, config.eval_limit, config.metric
        ).items():
            evaluation[name] = found.outcomes.summary()
            full_depth[f"{name} (evaluation)"] = found.full_depth
            if chosen is not None:
                histograms[name] = found.outcomes.histogram(chosen)
    choice = Choice(
        summary, chosen, threshold, model_args, fragment,
        shortfall(summary, chosen, config, scorer.rule.layout.num_layers), evaluation,
        histograms, full_depth, scorer.rule.layout.num_layers, [],
    )  # fmt: skip
    results = chosen_results(scorer, choice)
    with staged_output(settings.out, CHOICE, settings.overwrite, LAYOUTS[CHOICE]) as work:
        names = write_outputs(scorer, choice, results, work)
    choice.files = [settings.out / name for name in names]
    return choice


def chosen_results(scorer: Scorer, choice: Choice) -> dict[str, Any] | None:
    """lm-eval results of the chosen setting on the evaluation tasks (else on the
    calibration task's split), placed for `report` as a marked threshold point."""
    config = scorer.config
    if choice.threshold is None or not (config.eval_tasks or config.task):
        return None
    names, split, limit = config.eval_tasks, None, config.eval_limit
    if not names:
        names, split, limit = [str(config.task)], config.split, scorer.settings.limit
    task_dict = scorer.load_tasks(names, split)
    rule = scorer.threshold_exit(choice.threshold)
    setting = Setting(
        "chosen",
        rule,
        {
            "kind": "thresholds",
            "series": f"chosen (δ={config.max_drop:g}, ε={config.risk:g}, on {config.source()})",
            "chosen": True,
            "threshold": choice.threshold,
            "confidence": rule.signal.measure.value,
            "confidence_decoder": rule.signal.source.kind.value,
            "decoder": rule.decoding.kind.value,
            "num_layers": rule.layout.num_layers,
            "max_drop": config.max_drop,
            "risk": config.risk,
            "evaluated_on": "lm-eval's evaluation split" if split is None else split,
        },
    )
    settings = replace(scorer.settings, tasks=names, limit=limit)
    results = evaluate_setting(scorer.table, setting, task_dict, settings)
    scorer.table.take()
    return results


def write_outputs(
    scorer: Scorer, choice: Choice, results: dict[str, Any] | None, folder: Path
) -> list[Path]:
    """`choose_threshold.json`, and `results/chosen.json` (`results`) when one was chosen,
    written into `folder`; their paths inside it."""
    config, settings = scorer.config, scorer.settings
    files = []
    if results is not None:
        write_json(folder / "results" / "chosen.json", results)
        files.append(Path("results") / "chosen.json")
    row = choice.chosen_row
    data = {
        "command": "choose-threshold",
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings.to_dict(),
        "config": config.to_dict(),
        "guarantee": (
            f"with probability at least {1 - config.risk:g} over the draw of the calibration "
            f"questions, the chosen threshold's disagreement rate with the full model is at "
            f"most {config.max_drop:g} on questions drawn like them ({config.source()})"
        ),
        "calibration": {
            "source": config.source(),
            "questions": int(choice.calibration["questions"].iloc[0]),
            "num_layers": scorer.rule.layout.num_layers,
            "checks": list(scorer.rule.checks),
            "signal": scorer.rule.signal.label,
        },
        "chosen": None
        if row is None
        else {
            "threshold": json_number(choice.threshold),
            "model_args": choice.model_args,
            "model_args_fragment": choice.fragment,
            "lm_eval_command": lm_eval_command(settings, config, str(choice.model_args)),
            **{k: json_number(v) for k, v in row.items() if k != "threshold"},
            "exit_layer_histogram": choice.histograms["calibration"],
        },
        "shortfall": choice.shortfall,
        "lm_eval_full_depth": choice.full_depth,
        "candidates": records(choice.calibration),
        "evaluation": {
            name: {
                "chosen": None
                if choice.chosen is None
                else {
                    **records(table.loc[[choice.chosen]])[0],
                    "exit_layer_histogram": choice.histograms[name],
                },
                "candidates": records(table),
            }
            for name, table in choice.evaluation.items()
        },
    }
    write_json(folder / OUTPUT, data)
    files.insert(0, Path(OUTPUT))
    return files


# --- what the command prints -------------------------------------------------------------
VERDICTS = {"certified": "certified", "stop": "fails: stop", "untested": "not tested"}


def _runs(summary: pd.DataFrame) -> pd.DataFrame:
    """Consecutive candidates with the same outcome, one row each (`from`, `to`)."""
    same = ["disagreements", "mean_exit_layer", "compute_fraction"]
    run = summary[same].ne(summary[same].shift()).any(axis=1).cumsum()
    rows = []
    for _, group in summary.groupby(run, sort=True):
        first = group.iloc[0]
        verdict = (
            "certified"
            if group["certified"].all()
            else "stop"
            if group["tested"].any()
            else "untested"
        )
        rows.append({**first.to_dict(), "from": first["threshold"],
                     "to": group["threshold"].iloc[-1], "verdict": verdict})  # fmt: skip
    return pd.DataFrame(rows)


def candidate_table(summary: pd.DataFrame, after_stop: int = 5) -> str:
    """Markdown of the candidates, runs of equal outcome merged, up to `after_stop` runs
    past the first that fails."""
    runs = _runs(summary)
    stops = runs.index[runs["verdict"] == "stop"]
    shown = runs if not len(stops) else runs.loc[: stops[0] + after_stop]
    n = int(summary["questions"].iloc[0])
    table = pd.DataFrame(
        {
            "thresholds (nats)": [
                f"{a:g}" if a == b else f"{a:g} .. {b:g}"
                for a, b in zip(shown["from"], shown["to"], strict=True)
            ],
            "disagreement": [f"{int(k)}/{n} = {k / n:.4f}" for k in shown["disagreements"]],
            "p-value": shown["p_value"].map(lambda p: f"{p:.3g}"),
            "test": shown["verdict"].map(VERDICTS),
        }
    )
    if "accuracy" in shown:
        table["accuracy"] = shown["accuracy"].map(lambda a: f"{a:.4f}")
        table["accuracy drop"] = shown["accuracy_drop"].map(lambda a: f"{a:+.4f}")
    table["mean exit layer"] = shown["mean_exit_layer"].map(lambda a: f"{a:.3f}")
    table["compute fraction"] = shown["compute_fraction"].map(lambda a: f"{a:.4f}")
    text = table.to_markdown(index=False, disable_numparse=True)
    hidden = len(runs) - len(shown)
    if hidden:
        text += f"\n\n({hidden} more runs of candidates, not tested, in {OUTPUT})"
    return text


def _point(row: pd.Series) -> str:
    parts = [f"disagreement {int(row['disagreements'])}/{int(row['questions'])}"]
    if "accuracy" in row:
        parts.append(f"accuracy {row['accuracy']:.4f} (drop {row['accuracy_drop']:+.4f})")
    parts += [
        f"mean exit layer {row['mean_exit_layer']:.3f}",
        f"compute fraction {row['compute_fraction']:.4f}",
    ]
    return ", ".join(parts)


def describe(choice: Choice, settings: SweepSettings, config: ChooseConfig) -> str:
    """The command's output: the choice, how to use it, the candidates, the evaluation."""
    n = int(choice.calibration["questions"].iloc[0])
    lines = [
        f"calibration: {config.source()}, {n} questions, model of {choice.num_layers} blocks; "
        f"--max-drop {config.max_drop:g}, --risk {config.risk:g}",
        "",
        candidate_table(choice.calibration),
        "",
    ]
    row = choice.chosen_row
    if row is not None:
        lines += [
            f"chosen threshold: {choice.threshold:g} nats. With probability at least "
            f"{1 - config.risk:g} over the calibration draw, its answers differ from the full "
            f"model's on at most {config.max_drop:g} of questions drawn like these.",
            f"on the calibration questions: {_point(row)}",
            f"--model_args fragment: {choice.fragment}",
            lm_eval_command(settings, config, str(choice.model_args)),
        ]
    if choice.shortfall:
        lines.append(choice.shortfall[0].upper() + choice.shortfall[1:])
    for name, table in choice.evaluation.items():
        where = f"{name} (lm-eval's evaluation split, {int(table['questions'].iloc[0])} questions)"
        if choice.chosen is None:
            lines.append(f"{where}: nothing chosen to evaluate")
        else:
            lines.append(
                f"{where}, threshold {choice.threshold:g}: {_point(table.loc[choice.chosen])}"
            )
    return "\n".join(lines)
