"""Wall clock of chosen spade-exit settings against `hf`, for the SmolLM2 leaderboard.

The sweeps score every setting in one pass, so they give accuracy and compute fraction but
no wall clock of a setting run on its own. This benchmark runs lm-eval's evaluator on the
same task slice for `hf` and for each `--setting` (spade-exit model_args), in interleaved
rounds with the order alternating (the machine is shared and noisy), and keeps the median
seconds of each. Each setting's lm-eval results JSON is written under `--out` with a
top-level `timing` block (`seconds`, `hf_seconds`), which `lm-eval-spade report` turns into
the leaderboard's speedup column. Models are loaded before the clock starts; task loading
is done once.

    python benchmarks/smollm2/timed_points.py --out DIR --tasks arc_easy --limit 300 \\
        --common pretrained=MODEL,peft=ADAPTER --spade-common prefix_token_id=0 \\
        --setting full=exit_layer=30 --setting exit=lens=LENS,threshold=0.5 [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from lm_eval.api.registry import get_model
from lm_eval.evaluator import evaluate
from lm_eval.tasks import TaskManager, get_task_dict

import lm_eval_spade  # noqa: F401  (registers spade-exit)

logger = logging.getLogger("timed_points")


def run_once(model: str, args: str, tasks: list[str], limit: int | None, batch: int):
    """Results of one evaluation and its seconds (the model loads before the clock)."""
    lm = get_model(model).create_from_arg_string(args, {"batch_size": batch, "device": "cpu"})
    task_dict = get_task_dict(tasks, TaskManager())
    start = time.perf_counter()
    results = evaluate(lm, task_dict, limit=limit, bootstrap_iters=1000, verbosity="WARNING")
    seconds = time.perf_counter() - start
    results.pop("samples", None)
    results["config"] = {"model": model, "model_args": args, "limit": limit}
    results["config"].update(lm.get_model_info())
    del lm
    return results, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--common", required=True, help="model_args of every run")
    parser.add_argument("--spade-common", default="", help="model_args of spade-exit runs")
    parser.add_argument("--setting", action="append", required=True, help="NAME=MODEL_ARGS")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; choose a new --out")
    runs = {"hf": ("hf", args.common)}
    for setting in args.setting:
        name, _, extra = setting.partition("=")
        spade = ",".join(x for x in (args.common, args.spade_common, extra) if x)
        runs[name] = ("spade-exit", spade)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, dict] = {}
    for round_ in range(args.rounds):
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for name in order:
            result, took = run_once(*runs[name], args.tasks, args.limit, args.batch_size)
            logger.info("round %d %s: %.1f s", round_, name, took)
            seconds[name].append(took)
            results[name] = result
    hf = statistics.median(seconds["hf"])
    args.out.mkdir(parents=True)
    for name, result in results.items():
        took = statistics.median(seconds[name])
        result["timing"] = {"seconds": took, "hf_seconds": hf, "rounds": seconds[name]}
        path = args.out / f"{name}.json"
        path.write_text(json.dumps(result, indent=1, default=str))
        accs = {t: round(r.get("acc,none", float("nan")), 4) for t, r in result["results"].items()}
        print(f"{name}: {took:.1f} s, {hf / took:.2f}x hf, acc {accs}")


if __name__ == "__main__":
    main()
