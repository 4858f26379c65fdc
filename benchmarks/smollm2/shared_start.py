"""SPADE with the start token shared (`spade_start=shared`) against the pair, on
SmolLM2-135M-Instruct (30 blocks), in one run: scores, passes and wall clock.

Forced SPADE exits at L/2 and L/4 on real ARC-Easy Dev questions as cloze continuations
(lm-eval's `arc_easy` form: every token of every option is decoded, so SPADE's climb
above the exit is most of the work) and as letter prompts (one decoded position). Each
setting's scores are compared with the pair's (largest absolute difference of a summed
log-probability), its block-token passes are read from spade-exit's own counts, and its
wall clock is a ratio against `hf` (median of interleaved rounds, order alternating).
Then a layer sweep of SPADE alone over as many questions of lm-eval's `arc_easy` (cloze,
test split), pair against shared: the cost ratios the sweep reports.

    python benchmarks/smollm2/shared_start.py [--questions 24] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from lm_eval.api.registry import get_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from common import SHARED, sweep_cost, write_result
from realmodels import smollm2_dir
from speed import cloze_requests, letter_requests, questions

from lm_eval_spade.sweeps.report import markdown_table

L, BATCH = 30, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("LM_EVAL_SPADE_DATA_DIR", str(SHARED / "data"))  # the sweep's data
    torch.set_num_threads(args.threads)
    model_dir = smollm2_dir()
    base = dict(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=BATCH)
    qs = questions(args.questions)
    kinds = {"cloze": cloze_requests(qs), "letters": letter_requests(qs)}
    settings = {"hf": ("hf", {})}
    for name, layer in (("L/2", L // 2), ("L/4", L // 4)):
        for start in ("pair", "shared"):
            extra = {"exit_layer": layer, "prefix_token_id": 0, "spade_start": start}
            settings[f"exit {name}, {start}"] = ("spade-exit", extra)
    models = {n: get_model(m).create_from_arg_obj({**base, **x}) for n, (m, x) in settings.items()}

    times: dict[tuple[str, str], list[float]] = {}
    scores: dict[tuple[str, str], list[float]] = {}
    passes: dict[tuple[str, str], tuple[float, float]] = {}
    runs = [(kind, name) for kind in kinds for name in settings]
    for round_ in range(args.rounds):
        for kind, name in runs if round_ % 2 == 0 else runs[::-1]:
            lm = models[name]
            if hasattr(lm, "exits"):
                lm.exits.clear()  # statistics of this run only
            start = time.perf_counter()
            out = lm.loglikelihood(kinds[kind], disable_tqdm=True)
            times.setdefault((kind, name), []).append(time.perf_counter() - start)
            scores[kind, name] = [s for s, _ in out]
            if name != "hf":
                stats = lm.get_model_info()["spade"]["tasks"]["arc"]
                passes[kind, name] = (stats["block_token_passes"], stats["block_token_passes_full"])

    median = {key: statistics.median(t) for key, t in times.items()}
    rows = []
    for kind, name in runs:
        if name == "hf":
            continue
        pair_name = name.replace("shared", "pair")
        run, full = passes[kind, name]
        diff = max(
            abs(a - b) for a, b in zip(scores[kind, name], scores[kind, pair_name], strict=True)
        )
        rows.append(
            {
                "prompts": kind,
                "setting": name,
                "max |score - pair's|": diff,
                "compute fraction": run / full,
                "passes vs pair": run / passes[kind, pair_name][0],
                "time / hf": median[kind, name] / median[kind, "hf"],
                "time vs pair": median[kind, name] / median[kind, pair_name],
            }
        )
    table = pd.DataFrame(rows)
    sweeps = sweep_costs(model_dir, args.questions, args.threads)
    write_result(
        "smollm2/shared_start_cpu.md",
        "SPADE's start token shared vs the pair, SmolLM2-135M-Instruct (CPU)",
        f"{args.questions} ARC-Easy Dev questions as cloze continuations (every option token "
        "decoded) and as letter prompts (one decoded position), each prompt beginning with "
        "`<|endoftext|>` (`prefix_token_id=0`). Forced SPADE exits; float32, batches of "
        f"{BATCH}, {args.threads} CPU threads, median of {args.rounds} interleaved rounds "
        "(order alternating). Compute fraction from spade-exit's own block-token counts "
        "(trunk plus SPADE's climb, as run). Written by `benchmarks/smollm2/shared_start.py`.",
        markdown_table(table, index=False, floatfmt=".3g"),
        "Times (s, median): "
        + ", ".join(f"{kind} / {name} {t:.2f}" for (kind, name), t in median.items()),
        "### Layer sweep of SPADE alone (lm-eval's arc_easy, first questions of the test "
        "split)\n\n" + markdown_table(sweeps, index=False, floatfmt=".3f"),
    )


def sweep_costs(model_dir: Path, n: int, threads: int) -> pd.DataFrame:
    """`sweep layers --decoders spade` with each `--spade-start`: the cost it reports
    (lm-eval's `arc_easy` test split, served from the shared release files)."""
    rows = []
    for start in ("pair", "shared"):
        cost = sweep_cost(
            str(model_dir), ["arc_easy"], n, "--decoders", "spade", "--spade-start", start,
            "--batch-size", str(BATCH), "--model-args", "prefix_token_id=0",
        )  # fmt: skip
        rows.append(
            {
                "spade_start": start,
                "passes vs one full-depth run": cost["pass_ratio"],
                "wall clock vs one full-depth run": cost["time_ratio"],
                "SPADE's part (s)": cost["seconds_by_part"]["spade"],
                "threads": threads,
            }
        )
    return pd.DataFrame(rows)


if __name__ == "__main__":
    main()
