"""`lm-eval-spade`: the command line over the library.

Evaluation itself goes through lm-eval's own command (`lm_eval --model spade-exit ...`);
this command holds the jobs around it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from lm_eval_spade import __version__, logs
from lm_eval_spade import cli_values as values
from lm_eval_spade._startup.cli_errors import close_progress_bars
from lm_eval_spade.errors import UserInputError


def _demo(args: argparse.Namespace) -> None:
    from lm_eval_spade import demo

    config = demo.DemoConfig(
        out=Path(args.out),
        threshold=args.threshold,
        data_dir=args.data_dir and Path(args.data_dir),
        model=args.model,
        limit=args.limit,
        real_threshold=args.real_threshold,
        overwrite=args.overwrite,
        real_tasks=tuple(args.real_tasks),
        peft=args.peft,
        lens=args.lens,
        prefix_token_id=args.prefix_token_id,
    )
    print(demo.summary(demo.run(config)))


def _calibrate(args: argparse.Namespace) -> None:
    from lm_eval_spade.calibration.jobs import calibrate, lens_config
    from lm_eval_spade.calibration.training import CalibrationConfig

    config = _from_args(CalibrationConfig, args)
    lens = lens_config(args.seed)
    lens.steps = args.lens_steps
    info, trained = calibrate(config, Path(args.out), lens, args.overwrite)
    print("held-out accuracy at full depth:", info["heldout_accuracy"])
    print("L-SPADE: KL to SPADE on the validation prompts, per layer (nats):")
    print(trained.kl_table())
    print(f"saved to {args.out}/model and {args.out}/lspade")


def _from_args(config_class: type, args: argparse.Namespace, **converted: Any) -> Any:
    """A settings dataclass from the parsed options of the same names."""
    names = {f.name for f in fields(config_class)}
    given = {k: v for k, v in vars(args).items() if k in names and k != "overwrite"}
    return config_class(**{**given, **converted})


def _train_lens(args: argparse.Namespace) -> None:
    from lm_eval_spade.decoders import SpadePositions
    from lm_eval_spade.lens.jobs import DataSpec, train_and_save
    from lm_eval_spade.lens.training import LensTrainConfig
    from lm_eval_spade.lens.translators import LensKind

    config = _from_args(
        LensTrainConfig,
        args,
        kind=LensKind(args.kind),
        spade_positions=SpadePositions(args.spade_positions),
    )
    data = DataSpec(
        args.data, args.split, args.include_path, args.limit, args.eval_data, args.eval_split
    )
    trained = train_and_save(
        args.model, data, config, args.out, args.revision, args.dtype, args.device, args.peft,
        args.overwrite,
    )  # fmt: skip
    print(f"KL to the {args.kind} target on held-out examples, per layer (nats/position):")
    print(trained.kl_table())
    print(f"saved to {args.out}")


def _export_lens(args: argparse.Namespace) -> None:
    from lm_eval_spade.lens.jobs import export_to_tuned_lens

    out = export_to_tuned_lens(args.lens, args.out, args.overwrite)
    print(f"wrote {out} (tuned-lens format)")


def _finetune(args: argparse.Namespace) -> None:
    from lm_eval_spade.finetune import FinetuneConfig, finetune_task, loss_summary

    config = _from_args(FinetuneConfig, args)
    losses = finetune_task(
        args.model, args.task, args.out, config, args.split, args.include_path, args.limit,
        args.revision, args.dtype, args.device, args.overwrite,
    )  # fmt: skip
    print(loss_summary(losses))
    print(f"adapter saved to {args.out}; evaluate with --model_args pretrained=...,peft={args.out}")


def _sweep_settings(args: argparse.Namespace):
    from lm_eval_spade.decoders import SpadePositions, SpadeStart
    from lm_eval_spade.sweeps.settings import SweepSettings

    return SweepSettings(
        model=args.model, tasks=args.tasks, out=Path(args.out), limit=args.limit,
        batch_size=args.batch_size, model_args=args.model_args,
        include_path=args.include_path, spade_positions=SpadePositions(args.spade_positions),
        spade_start=SpadeStart(args.spade_start), bootstrap_iters=args.bootstrap_iters,
        time_full_depth=not args.no_full_depth_timing,
        overwrite=args.overwrite,
    )  # fmt: skip


def _threshold_config(args: argparse.Namespace, lens: str | None):
    from lm_eval_spade.sweeps.spec import parse_patience, parse_thresholds
    from lm_eval_spade.sweeps.thresholds import ThresholdSweepConfig

    return ThresholdSweepConfig(
        parse_thresholds(args.thresholds), lens, args.interval, args.min_layer,
        baselines=not getattr(args, "no_baselines", False),
        answer_decoders=getattr(args, "answer_decoders", None) or [],
        patience=parse_patience(getattr(args, "patience", None) or []),
    )  # fmt: skip


def _print_sweep(outcome: Any, columns: int) -> None:
    from lm_eval_spade.sweeps.layers import cost_summary
    from lm_eval_spade.sweeps.report import load_oracles, load_results, oracle_markdown, tables

    for text in tables(load_results([outcome.out])).values():
        print(text + "\n")
    oracles = load_oracles([outcome.out])
    if not oracles.empty:
        print(oracle_markdown(oracles) + "\n")
    print(cost_summary(outcome.cost, columns))
    print(
        f"results in {outcome.out}/results; tables and figures: lm-eval-spade report {outcome.out}"
    )


def _sweep_layers(args: argparse.Namespace) -> None:
    from lm_eval_spade.sweeps.layers import DEFAULT_DECODERS, LayerSweepConfig, run_layer_sweep
    from lm_eval_spade.sweeps.spec import parse_decoders

    explicit = args.decoders is not None
    decoders = parse_decoders(args.decoders) if explicit else list(DEFAULT_DECODERS)
    outcome = run_layer_sweep(
        _sweep_settings(args), LayerSweepConfig(decoders, args.lens or [], explicit)
    )
    _print_sweep(outcome, len(outcome.results))


def _sweep_thresholds(args: argparse.Namespace) -> None:
    from lm_eval_spade.sweeps.thresholds import run_threshold_sweep

    outcome = run_threshold_sweep(_sweep_settings(args), _threshold_config(args, args.lens))
    _print_sweep(outcome, len(outcome.results))


def _sweep_transfer(args: argparse.Namespace) -> None:
    from lm_eval_spade.lens.training import LensTrainConfig
    from lm_eval_spade.lens.translators import LensKind
    from lm_eval_spade.sweeps.transfer import (
        TransferConfig,
        parse_lens_assignments,
        run_transfer_sweep,
    )

    training = LensTrainConfig(
        LensKind.LSPADE, steps=args.lens_steps, batch_size=args.lens_batch_size,
        lr=args.lens_lr, seed=args.seed,
    )  # fmt: skip
    config = TransferConfig(
        _threshold_config(args, None), args.train_tasks or [],
        parse_lens_assignments(args.lens or []), training, args.train_limit,
    )  # fmt: skip
    outcome = run_transfer_sweep(_sweep_settings(args), config)
    _print_sweep(outcome, len(outcome.results))


def _report(args: argparse.Namespace) -> None:
    from lm_eval_spade.sweeps.report import make_report

    out = Path(args.out) if args.out else None
    report = make_report([Path(d) for d in args.dirs], out, args.overwrite, args.allow_gaps)
    for text in report.markdown.values():
        print(text + "\n")
    print("wrote " + ", ".join(str(f) for f in report.files))


def _add_sweep_options(parser: argparse.ArgumentParser, spade_start: str) -> None:
    """What every sweep takes: model, tasks, output, and lm-eval's settings.

    `spade_start` is the sweep's default climb of SPADE's start token: `shared` for the
    layer sweep, whose only cost figure is its own (the shared climb halves it, same
    scores), `pair` where the sweep reports compute fractions that spade-exit's default
    run must reproduce."""
    add = parser.add_argument
    add("--model", required=True, help="model directory or hub id")
    add("--tasks", required=True, nargs="+",
        help="lm-eval task names (loglikelihood or loglikelihood_rolling tasks)")  # fmt: skip
    add("--out", required=True, help="output folder (results/ per setting, sweep.json)")
    add("--limit", type=values.limit,
        help="documents per task (lm-eval's --limit; < 1: a fraction)")  # fmt: skip
    add("--batch-size", type=values.count, default=16,
        help="rows per forward (default: %(default)s)")  # fmt: skip
    add("--model-args", default="",
        help="extra HFLM model_args, e.g. max_length=1024,dtype=bfloat16 (defaults: "
        "device=cpu,dtype=float32)")  # fmt: skip
    add("--include-path", help="extra lm-eval task folder")
    add("--spade-positions", default="original", choices=["original", "compact"],
        help="position ids of SPADE's pair (default: %(default)s)")  # fmt: skip
    add("--spade-start", default=spade_start, choices=["pair", "shared"],
        help="SPADE's start token climbs with each position (pair) or once per batch and "
        "layer, each position attending to its keys/values (shared: same scores, about "
        "half the passes) (default: %(default)s)")  # fmt: skip
    add("--bootstrap-iters", type=values.index, default=1000,
        help="lm-eval's bootstrap iterations for stderr (default: %(default)s)")  # fmt: skip
    add("--no-full-depth-timing", action="store_true",
        help="skip timing a full-depth run of the same requests (cost ratio's base)")  # fmt: skip
    _add_overwrite(parser, "sweep folder")


def _add_threshold_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--thresholds", required=True, nargs="+",
        help="uncertainty thresholds in nats (numbers, inf, -inf; commas allowed)")  # fmt: skip
    add("--interval", type=values.count, default=1,
        help="check every N blocks (default: %(default)s)")  # fmt: skip
    add("--min-layer", type=values.index, help="first check layer (default: --interval)")


def _sweep_parser(
    kinds, name: str, run, thresholds: bool, help: str, description: str
) -> argparse.ArgumentParser:
    """A `sweep NAME` parser with the options every sweep (and every threshold sweep) has."""
    parser = kinds.add_parser(name, help=help, description=description)
    _add_sweep_options(parser, "pair" if thresholds else "shared")
    if thresholds:
        _add_threshold_options(parser)
    parser.set_defaults(run=run)
    return parser


def _add_sweeps(commands) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="the paper's experiments: layer, threshold and transfer sweeps",
        description=(
            "Each sweep runs every request through the model once, decodes it at every "
            "layer, and lets lm-eval's own evaluate compute the metrics of every setting "
            "from those scores. Output: OUT/results/<setting>.json (lm-eval results JSON, "
            "equal to the spade-exit run its config.model_args names) and OUT/sweep.json "
            "(settings and cost). Render with `lm-eval-spade report OUT`."
        ),
    )
    kinds = sweep.add_subparsers(dest="sweep", required=True, metavar="SWEEP")
    layers = _sweep_parser(
        kinds, "layers", _sweep_layers, False,
        "accuracy / perplexity at every layer for every decoder (figures 3, 4)",
        (
            "Every decoder at every layer 0..L: logit lens, SPADE, SPADE-NoS, and tuned lens "
            "/ L-SPADE for each --lens given. The prefix runs once per request; the printed "
            "cost ratio compares the whole sweep with one full-depth run of the same requests."
        ),
    )  # fmt: skip
    layers.add_argument("--decoders", nargs="+", metavar="NAME",
        help="logit_lens spade spade_nos tuned_lens lspade (default: all; lens decoders "
        "when a lens of their kind is given)")  # fmt: skip
    layers.add_argument("--lens", nargs="+", metavar="DIR",
        help="lens folders (train-lens output); each serves the decoder of its kind")  # fmt: skip

    thresholds = _sweep_parser(
        kinds, "thresholds", _sweep_thresholds, True,
        "SPADE-EXIT over thresholds against static, logit-lens entropy and margin exits "
        "(figure 5)",
        (
            "SPADE-EXIT (entropy of the L-SPADE lens, SPADE decoding) at each threshold, and "
            "the baselines on the same axes: static exit at every layer (SPADE, logit lens), "
            "entropy exit on logit lens (decoded by logit lens), top-2 margin exit from the "
            "lens. Accuracy against mean exit layer and compute fraction."
        ),
    )  # fmt: skip
    thresholds.add_argument("--lens", metavar="DIR",
        help="L-SPADE lens (train-lens --kind lspade): SPADE-EXIT's confidence (needed unless "
        "--answer-decoders is given)")  # fmt: skip
    thresholds.add_argument("--answer-decoders", nargs="+", metavar="NAME",
        help="answer-level rules (entropy and top-2 margin over the choices) from each of: "
        "spade logit_lens lens")  # fmt: skip
    thresholds.add_argument("--patience", nargs="+", metavar="K",
        help="also the patience rule from each --answer-decoders decoder: exit once the "
        "answer has held over K + 1 checks (e.g. 0 1 2 3)")  # fmt: skip
    thresholds.add_argument("--no-baselines", action="store_true",
        help="SPADE-EXIT and static SPADE exits only")  # fmt: skip

    transfer = _sweep_parser(
        kinds, "transfer", _sweep_transfer, True,
        "L-SPADE trained on each task, SPADE-EXIT on every task (figure 6)",
        (
            "Trains an L-SPADE lens on the training split of each --train-tasks task (default: "
            "--tasks) into OUT/lenses/, or takes --lens TASK=DIR, then runs SPADE-EXIT over the "
            "thresholds on every --tasks task with each lens."
        ),
    )  # fmt: skip
    add = transfer.add_argument
    add("--train-tasks", nargs="+", help="tasks to train lenses on (default: --tasks)")
    add("--lens", nargs="+", metavar="TASK=DIR", help="ready lenses instead of training")
    add("--train-limit", type=values.count, help="training documents per task (default: all)")
    add("--lens-steps", type=values.count, default=300,
        help="lens training steps (default: %(default)s)")  # fmt: skip
    add("--lens-batch-size", type=values.count, default=16, help="(default: %(default)s)")
    add("--lens-lr", type=values.rate, default=1e-3, help="(default: %(default)s)")
    add("--seed", type=values.seed, default=0, help="lens training seed (default: %(default)s)")

    report = commands.add_parser(
        "report",
        help="tables (markdown, CSV) and figures (PNG) from sweep or lm-eval result folders",
        description=(
            "Reads every lm-eval results JSON under DIR... (sweep output, or lm_eval "
            "--output_path folders of spade-exit runs) and writes, per sweep kind, "
            "<kind>.csv, <kind>.md and PNG figures into --out (default: DIR/report). A sweep "
            "folder is checked against its sweep.json: a missing, cut short or non-numeric "
            "result is an error naming the file (with --allow-gaps, a warning and a gap)."
        ),
    )
    report.add_argument("dirs", nargs="+", metavar="DIR", help="result folders")
    report.add_argument("--out", help="where to write (default: first DIR/report)")
    report.add_argument("--allow-gaps", action="store_true",
        help="report a sweep with missing or unusable results files (a warning each, the "
        "gaps marked 'gap' in the tables) instead of refusing it")  # fmt: skip
    _add_overwrite(report, "report folder")
    report.set_defaults(run=_report)


def _add_training_options(
    parser: argparse.ArgumentParser, unit: str, steps: int, batch_size: int, lr: float
) -> None:
    """The options every training command has: loop, model precision and place."""
    add = parser.add_argument
    add("--steps", type=values.count, default=steps,
        help="optimiser steps (default: %(default)s)")  # fmt: skip
    add("--batch-size", type=values.count, default=batch_size,
        help=f"{unit} per step (default: %(default)s)")  # fmt: skip
    add("--lr", type=values.rate, default=lr, help="learning rate (default: %(default)s)")
    add("--seed", type=values.seed, default=0,
        help="initialisation, data order and held-out split (default: %(default)s)")  # fmt: skip
    add("--max-length", type=values.count, default=512,
        help=f"tokens kept per {unit[:-1]}, from the end (default: %(default)s)")  # fmt: skip
    add("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="model dtype (default: %(default)s)")  # fmt: skip
    add("--device", default="cpu", help="torch device (default: %(default)s)")
    add("--revision", help="model revision (recorded with the output)")
    add("--prefix-token-id", type=values.index,
        help=f"start token each {unit[:-1]} begins with, as spade-exit's prefix_token_id "
        "model_arg (default: the tokenizer's BOS, else EOS)")  # fmt: skip


def _add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--overwrite", action="store_true",
        help=f"replace an existing {what} from an earlier run (kept until the new one is "
        "complete); without it an existing output is refused. Folders lm-eval-spade did "
        "not write are never replaced.",
    )  # fmt: skip


def _add_finetune(commands) -> None:
    tune = commands.add_parser(
        "finetune",
        help="LoRA fine-tune a model on a task's training split (peft)",
        description=(
            "Train LoRA adapters on a task's training documents in the form lm-eval "
            "scores them (zero-shot context, then the gold answer; loss on the answer "
            "tokens only). Load the result with `lm_eval --model spade-exit --model_args "
            "pretrained=MODEL,peft=OUT`."
        ),
    )
    add = tune.add_argument
    add("--model", required=True, help="model directory or hub id")
    add("--task", required=True, help="lm-eval task name, e.g. arc_easy_spade")
    add("--out", required=True, help="adapter output directory (written atomically)")
    add("--split", default="train", choices=["train", "validation", "test"],
        help="split to train on (default: %(default)s)")  # fmt: skip
    add("--include-path", help="extra lm-eval task directory")
    add("--limit", type=values.count, help="use at most this many training documents")
    add("--rank", type=values.count, default=8, help="LoRA rank (default: %(default)s)")
    add("--alpha", type=values.count, default=16, help="LoRA alpha (default: %(default)s)")
    add("--dropout", type=values.fraction, default=0.0,
        help="LoRA dropout (default: %(default)s)")  # fmt: skip
    add("--target-modules", nargs="+",
        help="modules to adapt (default: peft's choice for the family)")  # fmt: skip
    _add_training_options(tune, "documents", steps=100, batch_size=8, lr=1e-4)
    _add_overwrite(tune, "adapter folder")
    tune.set_defaults(run=_finetune)


def _add_calibrate(commands) -> None:
    cal = commands.add_parser(
        "calibrate",
        help="train the calibration model from scratch, then its L-SPADE translators",
        description=(
            "Trains a Llama from scratch on the spade_calibration task family (the sum of "
            "1-3 digits, a letter to pick) and then L-SPADE translators for every layer, "
            "writing OUT/model and OUT/lspade. The defaults made the shipped model "
            "(pretrained=spade-calibration) in about 7 minutes on 2 CPU cores."
        ),
    )
    add = cal.add_argument
    add("--out", required=True, help="output directory")
    add("--layers", type=values.count, default=12, help="blocks (default: %(default)s)")
    add("--hidden-size", type=values.count, default=64, help="(default: %(default)s)")
    add("--heads", type=values.count, default=4, help="(default: %(default)s)")
    add("--steps", type=values.count, default=4000,
        help="optimiser steps (default: %(default)s)")  # fmt: skip
    add("--batch-size", type=values.count, default=64,
        help="items per step (default: %(default)s)")  # fmt: skip
    add("--lr", type=values.rate, default=3e-3,
        help="peak learning rate (default: %(default)s)")  # fmt: skip
    add("--sum-weight", type=values.weight, default=1.0,
        help="weight of the sum loss at `=` (default: %(default)s)")  # fmt: skip
    add("--seed", type=values.seed, default=0, help="(default: %(default)s)")
    add("--lens-steps", type=values.count, default=1000,
        help="L-SPADE steps (default: %(default)s)")  # fmt: skip
    _add_overwrite(cal, "calibrate output")
    cal.set_defaults(run=_calibrate)


def _add_train_lens(commands) -> None:
    train = commands.add_parser(
        "train-lens",
        help="train L-SPADE or tuned-lens translators for a model",
        description=(
            "Train one affine translator per layer (zero-initialised: untrained it is "
            "logit lens). --kind lspade matches SPADE's distribution at the answer position "
            "(last token) of each prompt; --kind tuned_lens matches the final layer at every "
            "position of each document. Use the result with `lm_eval --model spade-exit "
            "--model_args pretrained=MODEL,exit_layer=K,decoder=KIND,lens=OUT`."
        ),
    )
    add = train.add_argument
    add("--model", required=True, help="model directory or hub id")
    add("--kind", required=True, choices=["lspade", "tuned_lens"], help="what to train")
    add(
        "--data", required=True,
        help="an lm-eval task name (prompts rendered by lm-eval), or a .jsonl (prompt/text "
        "field) or .txt (blank-line separated) file",
    )  # fmt: skip
    add("--out", required=True, help="output directory (written atomically)")
    add("--split", default="train", choices=["train", "validation", "test"],
        help="task split to train on (default: %(default)s)")  # fmt: skip
    add("--include-path", help="extra lm-eval task directory (like lm_eval --include_path)")
    add("--limit", type=values.count, help="use at most this many examples")
    add("--eval-data", help="held-out data (default: a seeded --eval-fraction of --data)")
    add("--eval-split", default="validation", help="split of --eval-data (default: %(default)s)")
    add("--eval-fraction", type=values.fraction, default=0.1,
        help="fraction held out when --eval-data is not given (default: %(default)s)")  # fmt: skip
    add("--layers", type=values.index, nargs="+", help="layers to train (default: 0..L-1)")
    add("--optimizer", default="adam", choices=["adam", "sgd"], help="(default: %(default)s)")
    add("--weight-decay", type=values.weight, default=0.0, help="(default: %(default)s)")
    add("--spade-positions", default="original", choices=["original", "compact"],
        help="position ids of SPADE's pair for lspade targets (default: %(default)s)")  # fmt: skip
    add("--cache-mb", type=values.index, default=2048,
        help="keep targets in memory up to this size, else remake them each step")  # fmt: skip
    add("--peft", help="LoRA adapter directory to apply to the model first")
    _add_training_options(train, "examples", steps=300, batch_size=16, lr=1e-3)
    _add_overwrite(train, "lens folder")
    train.set_defaults(run=_train_lens)

    export = commands.add_parser(
        "export-lens",
        help="write a tuned_lens lens in tuned-lens's own format (params.pt + config.json)",
        description=(
            "Convert a tuned_lens lens made by train-lens into the format of the tuned-lens "
            "package, so `TunedLens.from_model_and_pretrained(model, OUT)` loads it."
        ),
    )
    export.add_argument("lens", help="lens directory made by train-lens")
    export.add_argument("out", help="output directory")
    _add_overwrite(export, "export folder")
    export.set_defaults(run=_export_lens)


def _choose_threshold(args: argparse.Namespace) -> None:
    from lm_eval_spade.confidence import Confidence
    from lm_eval_spade.decoders import DecoderKind, SpadePositions, SpadeStart
    from lm_eval_spade.sweeps.choose import (
        DEFAULT_THRESHOLDS,
        ChooseConfig,
        describe,
        run_choose_threshold,
    )
    from lm_eval_spade.sweeps.settings import SweepSettings
    from lm_eval_spade.sweeps.spec import parse_thresholds

    settings = SweepSettings(
        model=args.model, tasks=[args.task] if args.task else [], out=Path(args.out),
        limit=args.limit, batch_size=args.batch_size, model_args=args.model_args,
        include_path=args.include_path, spade_positions=SpadePositions(args.spade_positions),
        spade_start=SpadeStart(args.spade_start), bootstrap_iters=args.bootstrap_iters,
        time_full_depth=False, overwrite=args.overwrite,
    )  # fmt: skip
    config = _from_args(
        ChooseConfig,
        args,
        confidence=Confidence(args.confidence),
        confidence_decoder=args.confidence_decoder and DecoderKind(args.confidence_decoder),
        thresholds=parse_thresholds(args.thresholds) if args.thresholds else DEFAULT_THRESHOLDS,
        eval_tasks=args.eval_tasks or [],
    )
    choice = run_choose_threshold(settings, config)
    print(describe(choice, settings, config))
    print("wrote " + ", ".join(str(f) for f in choice.files))


def _add_choose_threshold(commands) -> None:
    choose = commands.add_parser(
        "choose-threshold",
        help="the most aggressive SPADE-EXIT threshold with a guarantee on the accuracy drop",
        description=(
            "Scores the calibration questions once at every layer, then tests the candidate "
            "thresholds from the most cautious to the most aggressive, each with an exact "
            "binomial p-value for 'the exit's answer differs from the full model's on more "
            "than --max-drop of questions', and stops at the first that fails (fixed-sequence "
            "testing, as Learn-then-Test). The last to pass is chosen: with probability at "
            "least 1 - --risk over the draw of the calibration questions, its disagreement "
            "rate (which bounds the accuracy drop) is at most --max-drop on questions drawn "
            "like them. It holds for that distribution only: another task voids it. Prints "
            "the threshold, the --model_args that use it and a table over the candidates; "
            "writes OUT/choose_threshold.json and OUT/results/chosen.json (lm-eval results of "
            "the chosen setting, marked by `lm-eval-spade report`)."
        ),
    )
    add = choose.add_argument
    add("--model", required=True, help="model directory or hub id")
    add("--task", help="lm-eval multiple_choice task whose --split is the calibration set")
    add("--split", default="validation", choices=["train", "validation", "test"],
        help="the task's split to calibrate on (default: %(default)s)")  # fmt: skip
    add("--prompts", help="calibrate on a file of prompts instead (.jsonl with a prompt/text "
        "field, or .txt of blank-line separated prompts): agreement on the next token")  # fmt: skip
    add("--out", required=True, help="output folder")
    add("--max-drop", type=float, default=0.01,
        help="δ: the largest disagreement rate to allow (default: %(default)s)")  # fmt: skip
    add("--risk", type=float, default=0.1,
        help="ε: the chance, over the calibration draw, that the guarantee fails "
        "(default: %(default)s)")  # fmt: skip
    add("--lens", metavar="DIR", help="confidence lens (train-lens --kind lspade or tuned_lens)")
    add("--confidence", default="entropy",
        choices=["entropy", "margin", "maxprob", "answer_entropy", "answer_margin"],
        help="uncertainty measure; answer_* are over a --task's choices (default: "
        "%(default)s)")  # fmt: skip
    add("--confidence-decoder", choices=["lspade", "tuned_lens", "logit_lens", "spade"],
        help="what the uncertainty is computed from (default: the --lens's kind)")  # fmt: skip
    add("--interval", type=int, default=1, help="check every N blocks (default: %(default)s)")
    add("--min-layer", type=int, help="first check layer (default: --interval)")
    add("--thresholds", nargs="+",
        help="candidate thresholds in nats, fixed before seeing the data (default: 20 per "
        "decade from 1e-4 to 100, and inf)")  # fmt: skip
    add("--metric", default="acc", choices=["acc", "acc_norm"],
        help="whose answer counts: acc's largest loglikelihood or acc_norm's per character "
        "(default: %(default)s)")  # fmt: skip
    add("--limit", type=float,
        help="calibration questions: lm-eval's --limit, the first N documents of the "
        "split (a random sample only if the split is in random order), or N prompts")  # fmt: skip
    add("--eval-tasks", nargs="+", metavar="TASK",
        help="also report every candidate on these tasks' evaluation splits (as lm_eval "
        "evaluates them)")  # fmt: skip
    add("--eval-limit", type=float, help="documents per --eval-tasks task")
    add("--batch-size", type=int, default=16, help="rows per forward (default: %(default)s)")
    add("--model-args", default="",
        help="extra HFLM model_args, e.g. peft=ADAPTER_DIR,max_length=1024")  # fmt: skip
    add("--include-path", help="extra lm-eval task folder")
    add("--spade-positions", default="original", choices=["original", "compact"],
        help="position ids of SPADE's pair (default: %(default)s)")  # fmt: skip
    add("--spade-start", default="pair", choices=["pair", "shared"],
        help="SPADE's start token climbs with each position (pair) or once per batch and "
        "layer, each position attending to its keys/values (shared: same scores, about "
        "half the passes) (default: %(default)s)")  # fmt: skip
    add("--bootstrap-iters", type=int, default=0,
        help="lm-eval's bootstrap iterations for the chosen setting's stderr "
        "(default: %(default)s)")  # fmt: skip
    _add_overwrite(choose, "choose-threshold output")
    choose.set_defaults(run=_choose_threshold)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lm-eval-spade",
        description=(
            "Early-exit evaluation with SPADE for lm-evaluation-harness. Evaluate with "
            "lm-eval's own command: `lm_eval --model spade-exit --model_args "
            "pretrained=MODEL,exit_layer=K[,decoder=spade|spade_nos|logit_lens|lspade|tuned_lens]"
            "[,lens=DIR][,spade_positions=original|compact] --tasks ...`, or adaptive exits "
            "(SPADE-EXIT) with `threshold=NATS,lens=LSPADE_DIR[,interval=N,min_layer=K,"
            "confidence=entropy|margin|maxprob,exit_log=FILE]`. Without exit settings "
            "spade-exit returns exactly what `--model hf` returns."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="the main job: lm_eval --model spade-exit with SPADE-EXIT, no hub needed",
        description=(
            "Runs the real `lm_eval` command on the shipped calibration model and task "
            "(spade_calibration): `hf` at full depth, then spade-exit with SPADE-EXIT "
            "(L-SPADE entropy below --threshold). With --data-dir (ARC/BoolQ/HeadQA release "
            "files) and --model, it also runs that model (with --peft, its LoRA adapter) on "
            "real prompts: hf at full depth, then SPADE-EXIT with --lens (or L-SPADE "
            "translators trained now on ARC-Easy training prompts); where spade-exit's start "
            "token makes its input differ from hf's, also a full-depth run on the same tokens. "
            "Prints lm-eval's tables, then accuracy with exit statistics and each run's wall "
            "clock (loading included) against hf's."
        ),
    )
    add = demo.add_argument
    add("--out", default="runs/demo", help="working directory (default: %(default)s)")
    add("--threshold", type=values.nats, default=0.05,
        help="SPADE-EXIT threshold, nats of L-SPADE entropy (default: %(default)s)")  # fmt: skip
    add("--data-dir", help="directory of the datasets' release files (as LM_EVAL_SPADE_DATA_DIR)")
    add("--model", help="model for the real tasks (needed with --data-dir)")
    add("--limit", type=values.count, default=40,
        help="documents per real task (default: %(default)s)")  # fmt: skip
    add("--real-threshold", type=values.nats, default=2.0,
        help="SPADE-EXIT threshold on the real tasks, nats (default: %(default)s)")  # fmt: skip
    add("--real-tasks", nargs="+", default=["arc_easy_spade", "boolq_spade", "headqa_en_spade"],
        help="tasks for the real model (default: %(default)s)")  # fmt: skip
    add("--peft", help="LoRA adapter for the real model (lm-eval-spade finetune output)")
    add("--lens", help="L-SPADE lens for the real model (default: train one now)")
    add(
        "--prefix-token-id",
        type=values.index,
        help="spade-exit's start token for the real model (its prefix_token_id model_arg)",
    )
    _add_overwrite(demo, "demo folder")
    demo.set_defaults(run=_demo)
    _add_calibrate(commands)
    _add_train_lens(commands)
    _add_finetune(commands)
    _add_sweeps(commands)
    _add_choose_threshold(commands)
    return parser


#: The exit status of a command stopped by Ctrl-C (128 + SIGINT, as the shell reports it).
INTERRUPTED = 130


def _interrupted(command: str, written: list[Path]) -> str:
    """The one line for Ctrl-C: outputs are written whole or not at all (`files`), so
    it says which, if any, were put in place before the interrupt."""
    if not written:
        return f"lm-eval-spade {command}: interrupted; no output was written"
    done = ", ".join(str(p) for p in written)
    return f"lm-eval-spade {command}: interrupted after writing {done} (complete)"


def main(argv: list[str] | None = None) -> None:
    from lm_eval_spade import files

    args = build_parser().parse_args(argv)
    logs.setup(logging.DEBUG if args.verbose else logging.INFO)
    command = " ".join(filter(None, [args.command, getattr(args, "sweep", None)]))
    committed = len(files.COMMITTED)
    try:
        args.run(args)
    except UserInputError as err:
        # Bad input is the user's to fix: one line naming it, no traceback.
        close_progress_bars()
        raise SystemExit(f"lm-eval-spade {command}: error: {err}") from None
    except KeyboardInterrupt:
        close_progress_bars()
        print(_interrupted(command, files.COMMITTED[committed:]), file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None


if __name__ == "__main__":
    main()
