"""What a layer sweep costs against one full-depth run of the same requests, as each sweep
prints it (both timed in one process): the calibration model on its four tasks, and
SmolLM2-135M-Instruct (30 blocks, a 49K vocabulary) on ARC-Easy letter prompts (one
decoded position, about 54 tokens), BoolQ (long passages) and lm-eval's cloze `arc_easy`
(every token of every answer text decoded in every column, so its cost is also given per
scored position), with SPADE's start token as a pair and shared. Every decoder without a
lens (logit lens, SPADE, SPADE-NoS; the calibration model adds its shipped L-SPADE) at
every layer.

The calibration model's sweeps take seconds, so they are repeated (`--rounds`, order
alternating between pair and shared) and each ratio is the median; SmolLM2's run once.

    python benchmarks/sweep_cost.py [--arc 300] [--boolq 100] [--cloze 48] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import SHARED, sweep_cost, write_result
from realmodels import smollm2_dir

from lm_eval_spade.sweeps.report import markdown_table

CALIBRATION_TASKS = [
    "spade_calibration", "spade_calibration_terms1", "spade_calibration_terms2",
    "spade_calibration_terms3",
]  # fmt: skip


def _summary(tasks: list[str], start: str, runs: list[dict]) -> dict:
    """One table row: the medians over `runs` (each a sweep's reported cost)."""

    def median(get) -> float:
        return statistics.median(get(cost) for cost in runs)

    def decoders(cost: dict) -> float:
        parts = cost["seconds_by_part"]
        return sum(v for k, v in parts.items() if k not in ("prefix", "head"))

    return {
        "tasks": "four calibration tasks" if len(tasks) > 1 else tasks[0],
        "requests": runs[0]["requests"],
        "spade_start": start,
        "runs": len(runs),
        "passes ratio": median(lambda c: c["pass_ratio"]),
        "wall-clock ratio": median(lambda c: c["time_ratio"]),
        "wall / passes": median(lambda c: c["time_ratio"] / c["pass_ratio"]),
        "full-depth run (s)": median(lambda c: c["full_depth_seconds"]),
        "scored positions": runs[0]["scored_positions"],
        "extra passes / position": f"{median(lambda c: c['extra_passes_per_scored_position']):.0f}",
        "extra ms / position": median(lambda c: 1e3 * c["extra_seconds_per_scored_position"]),
        "prefix (s)": median(lambda c: c["seconds_by_part"]["prefix"]),
        "head (s)": median(lambda c: c["seconds_by_part"]["head"]),
        "decoders (s)": median(decoders),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arc", type=int, default=300, help="ARC-Easy letter questions")
    parser.add_argument("--boolq", type=int, default=100, help="BoolQ questions")
    parser.add_argument("--cloze", type=int, default=48, help="ARC-Easy cloze questions")
    parser.add_argument("--rounds", type=int, default=5, help="calibration-model repeats")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("LM_EVAL_SPADE_DATA_DIR", str(SHARED / "data"))
    torch.set_num_threads(args.threads)
    smollm2 = str(smollm2_dir())
    calibration = ["--lens", "spade-calibration"]
    start_token = ["--model-args", "prefix_token_id=0"]
    sweeps = [
        ("calibration", "spade-calibration", CALIBRATION_TASKS, None, calibration),
        ("SmolLM2", smollm2, ["arc_easy_spade"], args.arc, start_token),
        ("SmolLM2", smollm2, ["boolq_spade"], args.boolq, start_token),
        ("SmolLM2", smollm2, ["arc_easy"], args.cloze, start_token),
    ]
    rows = []
    for model, path, tasks, limit, extra in sweeps:
        rounds = args.rounds if model == "calibration" else 1
        costs: dict[str, list[dict]] = {"pair": [], "shared": []}
        for round_ in range(rounds):
            for start in ("pair", "shared") if round_ % 2 == 0 else ("shared", "pair"):
                costs[start].append(sweep_cost(path, tasks, limit, "--spade-start", start, *extra))
        for start, runs in costs.items():
            rows.append({"model": model, **_summary(tasks, start, runs)})
    write_result(
        "sweep_cost_cpu.md",
        "Layer sweeps against one full-depth run (CPU)",
        f"Batches of 16 (the sweep default), float32, {args.threads} CPU threads; each row "
        "is one sweep and the full-depth run it timed in the same process (medians where "
        "`runs` > 1). `passes ratio` counts block-token passes (the head is not a block); "
        "`wall / passes` is how far the wall clock is from the passes. `extra passes / position` "
        "and `extra ms / position` are what the sweep spent beyond the full-depth run per "
        "scored position (answer token), the unit for cloze tasks. `decoders` is every "
        "decoder's climb or translator and the confidence signals; `head` the vocabulary "
        "products of every column. Written by `benchmarks/sweep_cost.py`.",
        markdown_table(pd.DataFrame(rows), index=False, floatfmt=".3g"),
    )


if __name__ == "__main__":
    main()
