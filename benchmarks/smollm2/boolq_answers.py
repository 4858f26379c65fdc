"""Which way BoolQ's answers lean, and whether they depend on the passage at all: from
lm-eval's per-question samples (`experiments.sh boolq_answers`).

    python benchmarks/smollm2/boolq_answers.py RUN_DIR ...

Writes results/smollm2/boolq_answers.md. On BoolQ (62% "yes") accuracy alone cannot tell a
decoder that reads the passage from one that leans "yes": the gap between how often it
says "yes" when the answer is "yes" and when it is "no" can.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_result


def answers(run: Path) -> pd.DataFrame:
    """One row per question: the gold label and whether " yes" outscored " no" (lm-eval's
    `boolq` lists its choices as no, yes; a tie is "no", as lm-eval's argmax has it)."""
    found = sorted(run.rglob("samples_boolq_*.jsonl"))
    if len(found) != 1:
        sys.exit(
            f"error: {run} holds {len(found)} boolq sample files, not 1; give the folder of "
            "one `lm_eval --log_samples` run (experiments.sh boolq_answers makes them)"
        )
    rows = []
    for line in found[0].read_text().splitlines():
        sample = json.loads(line)
        no, yes = (float(resp[0]) for resp in sample["filtered_resps"])
        if not math.isfinite(no) or not math.isfinite(yes):
            sys.exit(
                f"error: {found[0]} scores question {sample['doc_id']} as no={no}, yes={yes}; "
                "rerun that lm_eval run (a non-finite log-likelihood is not counted)"
            )
        rows.append({"gold_yes": int(sample["target"]) == 1, "says_yes": yes > no})
    return pd.DataFrame(rows)


def summary(run: Path) -> dict:
    table = answers(run)
    on_yes = table.says_yes[table.gold_yes].mean()
    on_no = table.says_yes[~table.gold_yes].mean()
    return {
        "run": run.name.removeprefix("answers-boolq-"),
        "questions": len(table),
        "accuracy": (table.says_yes == table.gold_yes).mean(),
        'says "yes"': table.says_yes.mean(),
        '"yes" when gold is yes': on_yes,
        '"yes" when gold is no': on_no,
        "gap": on_yes - on_no,
    }


def main(runs: list[Path]) -> None:
    table = pd.DataFrame([summary(run) for run in runs]).set_index("run")
    write_result(
        "smollm2/boolq_answers.md",
        "SmolLM2 fine-tuned on BoolQ: which way its answers lean",
        "lm-eval's `boolq` (300 validation questions, 62% of all BoolQ answers are "
        '"yes"), through `spade-exit` with the BoolQ adapter, per-question samples kept '
        "(`experiments.sh boolq_answers`). A run is named by decoder and exit layer; `full` "
        "is the full model. A gap near 0 means the answer does not depend on the passage: "
        'the run says "yes" as often when the answer is "no".',
        table.to_markdown(floatfmt=("", ".0f") + (".3f",) * 5),
    )


if __name__ == "__main__":
    main([Path(arg) for arg in sys.argv[1:]])
