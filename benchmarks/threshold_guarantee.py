"""Does choose-threshold's guarantee hold? Random calibration/test splits of one pass.

Every question of each task (the splits named, pooled) is scored once at every layer
(`choose-threshold`'s own pass), which gives every candidate threshold's exits and
answers per question. Then, for each of `--draws` random splits into a calibration part
(`--calibration-fraction`) and a test part, two rules pick a threshold on calibration:

- guaranteed: choose-threshold's rule (fixed-sequence binomial tests at δ, ε);
- naive: the most aggressive candidate whose calibration disagreement is at most δ.

Each choice is measured on the test part. The guarantee is about the disagreement rate
on questions drawn like the calibration set, so two violation rates are reported: the
test part's rate above δ (a finite test set adds its own noise, so this runs above ε
even for a rule that holds), and the rate of the whole pool above δ (the pool is the
population the calibration part is drawn from). A rule that holds has the pool
violation rate at most about ε.

    python benchmarks/threshold_guarantee.py --model spade-calibration \
        --lens spade-calibration --tasks spade_calibration --splits validation test \
        --name calibration
    python benchmarks/threshold_guarantee.py --model MODEL --model-args peft=ADAPTER \
        --lens LENS --tasks arc_easy_spade --splits validation test --name smollm2
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from common import write_result

from lm_eval_spade.sweeps.choose import ChooseConfig, build_scorer, certify, score_tasks
from lm_eval_spade.sweeps.outcomes import Outcomes, concatenate
from lm_eval_spade.sweeps.settings import SweepSettings


@dataclass
class Picked:
    """One rule's choice on one draw, measured on the test part and on the pool."""

    test_disagreement: float
    pool_disagreement: float
    compute_fraction: float
    accuracy_drop: float
    exits_early: bool


def measure(found: Outcomes, index: int | None, test: np.ndarray, pool: pd.DataFrame) -> Picked:
    """The candidate `index` (None: full depth, nothing certified) on the test rows."""
    if index is None:
        return Picked(0.0, 0.0, 1.0, 0.0, False)
    row = found.summary(test).loc[index]
    drop = float(row["accuracy_drop"]) if "accuracy_drop" in row else float("nan")
    early = bool(pool.loc[index, "compute_fraction"] < 1.0)
    return Picked(
        float(row["disagreement"]), float(pool.loc[index, "disagreement"]),
        float(row["compute_fraction"]), drop, early,
    )  # fmt: skip


def draw(found: Outcomes, delta: float, risk: float, fraction: float, rng) -> dict[str, Picked]:
    """One random calibration/test split; both rules' picks."""
    order = rng.permutation(found.questions)
    cut = round(fraction * found.questions)
    calibration, test = np.sort(order[:cut]), np.sort(order[cut:])
    summary = found.summary(calibration)
    _, guaranteed = certify(summary, delta, risk)
    within = np.flatnonzero(summary["disagreement"].to_numpy() <= delta)
    naive = int(within[-1]) if len(within) else None
    pool = found.summary()
    return {
        "guaranteed (fixed sequence)": measure(found, guaranteed, test, pool),
        "naive (last with calibration disagreement <= δ)": measure(found, naive, test, pool),
    }


def table(found: Outcomes, deltas: list[float], risk: float, args) -> pd.DataFrame:
    rng = np.random.default_rng(args.seed)
    rows = []
    for delta in deltas:
        picks: dict[str, list[Picked]] = {}
        for _ in range(args.draws):
            for rule, picked in draw(found, delta, risk, args.calibration_fraction, rng).items():
                picks.setdefault(rule, []).append(picked)
        for rule, chosen in picks.items():
            frame = pd.DataFrame([vars(p) for p in chosen])
            rows.append(
                {
                    "δ": delta,
                    "rule": rule,
                    "pool disagreement > δ": (frame["pool_disagreement"] > delta).mean(),
                    "test disagreement > δ": (frame["test_disagreement"] > delta).mean(),
                    "mean test disagreement": frame["test_disagreement"].mean(),
                    "mean test compute fraction": frame["compute_fraction"].mean(),
                    "mean test accuracy drop": frame["accuracy_drop"].mean(),
                    "draws exiting early": frame["exits_early"].mean(),
                }
            )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", required=True)
    add("--model-args", default="", help="extra HFLM model_args, e.g. peft=ADAPTER_DIR")
    add("--lens", required=True, help="confidence lens (L-SPADE)")
    add("--tasks", nargs="+", required=True)
    add("--splits", nargs="+", default=["test"], help="splits pooled into one set per task")
    add("--limit", type=float, help="documents per task and split")
    add("--include-path")
    add("--batch-size", type=int, default=16)
    add("--draws", type=int, default=1000)
    add("--calibration-fraction", type=float, default=0.5)
    add("--max-drop", type=float, nargs="+", default=[0.01, 0.02, 0.05])
    add("--risk", type=float, default=0.1)
    add("--seed", type=int, default=0)
    add("--name", required=True, help="results/threshold_guarantee_NAME.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        settings = SweepSettings(
            args.model, args.tasks, Path(tmp), args.limit, args.batch_size, args.model_args,
            args.include_path, bootstrap_iters=0, time_full_depth=False,
        )  # fmt: skip
        config = ChooseConfig(task=args.tasks[0], lens=args.lens, risk=args.risk)
        scorer = build_scorer(settings, config)
        pools = {}
        for task in args.tasks:
            parts = [
                next(iter(score_tasks(scorer, [task], split, args.limit, "acc").values())).outcomes
                for split in args.splits
            ]
            pools[task] = concatenate(parts, args.splits)
    sections = []
    for task, found in pools.items():
        full = found.summary().iloc[0]
        accuracy = (
            f", full-depth accuracy {float(full['accuracy'] + full['accuracy_drop']):.4f}"
            if "accuracy" in full
            else ""
        )
        result = table(found, args.max_drop, args.risk, args)
        sections.append(
            f"## {task} ({' + '.join(args.splits)}: {found.questions} questions{accuracy})\n\n"
            + result.to_markdown(index=False, floatfmt=".4f")
        )
    intro = (
        f"Model `{args.model}`{f' (`{args.model_args}`)' if args.model_args else ''}, "
        f"lens `{args.lens}`, SPADE-EXIT on L-SPADE entropy at every layer; "
        f"{len(config.thresholds)} candidate thresholds (choose-threshold's default grid). "
        f"{args.draws} random splits per task and δ: {args.calibration_fraction:g} of the "
        f"questions calibrate, the rest test; ε = {args.risk:g}.\n\n"
        "Columns: how often the chosen threshold's disagreement with the full model "
        "exceeds δ on the whole pool (the population the calibration part is drawn from: "
        "the guarantee says at most about ε) and on the test part (finite-sample noise "
        "included); the test part's mean disagreement, compute fraction and accuracy drop; "
        "and how often the choice exits any question before full depth (nothing certified "
        "counts as full depth: disagreement 0, compute 1).\n\n"
        "    python benchmarks/threshold_guarantee.py " + " ".join(sys.argv[1:])
    )
    write_result(f"threshold_guarantee_{args.name}.md", "Threshold guarantee", intro, *sections)


if __name__ == "__main__":
    main()
