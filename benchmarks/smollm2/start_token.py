"""SmolLM2's start token, chosen by measurement: accuracy at every layer with each
candidate, from two layer sweeps of ARC-Easy Dev (`experiments.sh start`).

    python benchmarks/smollm2/start_token.py SWEEP_BOS SWEEP_ENDOFTEXT

Writes results/smollm2/start_token.md. The rule: the candidate with the higher mean
SPADE accuracy over layers 15-29 (L/2 to L-1) wins.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_result

from lm_eval_spade.sweeps.report import load_results, main_metrics

DECODERS = {"logit_lens": "logit lens", "spade": "SPADE", "spade_nos": "SPADE-NoS"}
INNER = range(15, 30)


def accuracies(folder: Path) -> pd.DataFrame:
    table = main_metrics(load_results([folder]))
    return table.pivot_table(index="layer", columns="decoder", values="value").rename(
        columns=DECODERS
    )


def main(bos: Path, endoftext: Path) -> None:
    runs = {
        "im_start (BOS, id 1)": accuracies(bos),
        "endoftext (id 0)": accuracies(endoftext),
    }
    layers = pd.concat(
        {f"{d}, {start}": acc[d] for start, acc in runs.items() for d in DECODERS.values()},
        axis=1,
    )
    layers.index = layers.index.astype(int)
    means = pd.DataFrame(
        {start: acc.loc[list(INNER)].mean() for start, acc in runs.items()}
    ).rename_axis("decoder")
    full = {start: float(acc.loc[30, "SPADE"]) for start, acc in runs.items()}
    wins = {
        d: int(
            (runs["endoftext (id 0)"][d] > runs["im_start (BOS, id 1)"][d]).loc[list(INNER)].sum()
        )
        for d in DECODERS.values()
    }
    best = means.loc["SPADE"].idxmax()
    intro = (
        "SmolLM2-135M-Instruct's tokenizer adds no start token. The candidates are its BOS "
        "`<|im_start|>` and `<|endoftext|>`, the document separator of its pretraining data. "
        "Both were tried on the first 200 questions of ARC-Easy **Dev** (cloze, lm-eval's "
        "`arc_easy` prompt on the validation split, so the choice never sees the test split), "
        "un-fine-tuned, with every decoder at every layer (`experiments.sh start`). The rule, "
        "fixed after the BOS run and before the `<|endoftext|>` run: the higher mean SPADE "
        "accuracy over layers 15-29 (L/2 to L-1) wins.\n\n"
        f"Full depth: {', '.join(f'{k} {v:.3f}' for k, v in full.items())} (the start token "
        "changes the whole sequence, so the full model's accuracy moves too). Layers 15-29 "
        "where `<|endoftext|>` is ahead: "
        + ", ".join(f"{d} {n} of 15" for d, n in wins.items())
        + f". **Chosen: {best}.** One question is 0.5 points; a single layer's standard "
        "error is about 3.5 points, so the choice rests on the consistent lead over layers, "
        "not on any one of them."
    )
    write_result(
        "smollm2/start_token.md",
        "SmolLM2: which start token SPADE pairs with",
        intro,
        "### Mean accuracy over layers 15-29\n\n" + means.to_markdown(floatfmt=".3f"),
        "### Accuracy by layer (200 ARC-Easy Dev questions)\n\n"
        + layers.to_markdown(floatfmt=".3f"),
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
