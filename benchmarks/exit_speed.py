"""SPADE-EXIT wall clock against `hf`, on one machine in one run: ratios only.

A random-weight Llama (24 blocks, hidden 512; weights do not matter when exits are
forced) with the stories260K tokenizer scores real ARC-Easy questions (letter answers,
one forward per question) in batches of 16. Every setting runs once per round, rounds
interleaved, medians kept: the machine is shared and noisy. The ideal speedup of a
setting is 1 / its compute fraction (docs/method.md: blocks run plus SPADE's pairs).

    python benchmarks/exit_speed.py [--questions 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import transformers as T
from common import ARC_EASY, STORIES, arc_questions, random_llama, write_result
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.lens import Lens, LensKind, save_lens
from lm_eval_spade.sweeps.report import markdown_table

BLOCKS, HIDDEN, BATCH = 24, 512, 16


def build_model(root: Path) -> Path:
    model = random_llama(BLOCKS, HIDDEN)
    model.save_pretrained(root / "model")
    T.AutoTokenizer.from_pretrained(STORIES).save_pretrained(root / "model")
    lens = Lens.untrained(architecture_for(model), LensKind.LSPADE)  # costs what a real one does
    save_lens(lens, root / "lens")
    return root


def arc_requests(n: int, offset: int = 0) -> list[Instance]:
    """One loglikelihood request per option letter of each question."""
    questions = arc_questions(ARC_EASY / "ARC-Easy-Dev.jsonl", n, offset)
    return [
        Instance("loglikelihood", {}, (prompt, " " + label), idx, ("arc", doc_id, 1))
        for doc_id, (prompt, labels) in enumerate(questions)
        for idx, label in enumerate(labels)
    ]


def make(name: str, root: Path, **args):
    base = dict(pretrained=str(root / "model"), device="cpu", dtype="float32", batch_size=BATCH)
    return get_model(name).create_from_arg_obj({**base, **args})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = build_model(Path(tmp))
        lens = str(root / "lens")
        requests = arc_requests(args.questions)
        mixed = arc_requests(BATCH, offset=args.questions)  # one batch of 16 questions
        quarter, half = BLOCKS // 4, BLOCKS // 2
        # A threshold between the 8th and 9th entropy at L/4 splits the batch in halves.
        probe = make("spade-exit", root, threshold="inf", min_layer=quarter, lens=lens)
        probe.loglikelihood(mixed, disable_tqdm=True)
        entropies = sorted(
            {(e["doc_id"], e["confidence"]) for e in probe.exits}, key=lambda x: x[1]
        )
        split = (entropies[BATCH // 2 - 1][1] + entropies[BATCH // 2][1]) / 2

        settings = {
            "hf": ("hf", {}, requests),
            "spade-exit, no exit setting": ("spade-exit", {}, requests),
            "checks every block, never passing": (
                "spade-exit", {"threshold": -1.0, "lens": lens}, requests,
            ),
            "forced exit at L/2": (
                "spade-exit", {"threshold": "inf", "min_layer": half, "lens": lens}, requests,
            ),
            "forced exit at L/4": (
                "spade-exit", {"threshold": "inf", "min_layer": quarter, "lens": lens}, requests,
            ),
            "hf (mixed batch)": ("hf", {}, mixed),
            "half exit at L/4, half run to L": (
                "spade-exit",
                {"threshold": split, "min_layer": quarter, "interval": BLOCKS, "lens": lens},
                mixed,
            ),
        }  # fmt: skip
        models = {name: make(kind, root, **extra) for name, (kind, extra, _) in settings.items()}
        times: dict[str, list[float]] = {name: [] for name in settings}
        for _ in range(args.rounds):
            for name, (_, _, reqs) in settings.items():
                start = time.perf_counter()
                models[name].loglikelihood(reqs, disable_tqdm=True)
                times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(t) for name, t in times.items()}

    def fraction(name: str) -> float:
        stats = models[name].exit_stats["arc"]
        return stats.compute_fraction

    rows = []

    def row(name, base, goal, ideal=None, note=""):
        ratio = median[name] / median[base]
        speedup = median[base] / median[name]
        entry = {"setting": name, "time / hf": ratio, "speedup": speedup}
        if ideal is not None:
            entry["ideal speedup"] = ideal
            entry["of ideal"] = speedup / ideal
        entry["goal"], entry["note"] = goal, note
        rows.append(entry)

    row("spade-exit, no exit setting", "hf", "time <= 1.03x")
    row("checks every block, never passing", "hf", "time <= 1.10x")
    for name in ("forced exit at L/2", "forced exit at L/4"):
        row(name, "hf", ">= 0.9 of ideal", 1 / fraction(name))
    mixed_name = "half exit at L/4, half run to L"
    exits = {e["doc_id"]: e["exit_layer"] for e in models[mixed_name].exits}
    early = sum(layer == BLOCKS // 4 for layer in exits.values())
    row(
        mixed_name, "hf (mixed batch)", ">= 0.85 of ideal", 1 / fraction(mixed_name),
        f"{early} of {len(exits)} questions exit at L/4. Waiting for the slowest row: 1.00x. "
        "Above 1 of ideal: rows that leave also drop their padding, which the formula "
        "(real tokens only) does not count",
    )  # fmt: skip
    table = pd.DataFrame(rows)
    write_result(
        "exit_speed_cpu.md",
        "SPADE-EXIT wall clock vs hf (CPU)",
        f"Random Llama, {BLOCKS} blocks, hidden {HIDDEN}, stories260K tokenizer; "
        f"{args.questions} real ARC-Easy dev questions (letter answers, mean context about 160 "
        f"tokens) in batches of {BATCH}; the mixed batch is 16 other questions. float32, "
        f"2 CPU threads, median of {args.rounds} interleaved rounds. Confidence: entropy of an "
        "L-SPADE lens (untrained, same cost as a trained one). Ideal speedup = 1 / compute "
        "fraction (blocks run plus SPADE's pairs, docs/method.md). A batch that waited for its "
        "slowest row would run every row to L: no speedup. Written by "
        "`benchmarks/exit_speed.py`.",
        markdown_table(table, index=False, floatfmt=".3f"),
        "Times (s, median): " + ", ".join(f"{name} {t:.2f}" for name, t in median.items()),
    )


if __name__ == "__main__":
    main()
