"""spade-exit's wall clock against `hf` on SmolLM2-135M-Instruct (30 blocks, a 49K head),
in one run: ratios only.

Real ARC-Easy Dev questions, as letter prompts (options listed, a one-letter answer: one
scored position per question) and as cloze continuations (lm-eval's `arc_easy`: every
token of every option scored). Every prompt begins with the literal `<|endoftext|>`, the
start token chosen for this model, so `hf` and spade-exit (`prefix_token_id=0`) score the
same tokens. Settings run once per round, rounds interleaved with the order alternating,
medians kept: the machine is shared and noisy.

The ideal speedup counts the LM head: `hf` applies it at every position, spade-exit only
at scored positions and at each confidence check. Costs are in multiply-adds per token,
read from the model's own weight shapes:

    hf:         n * (L * block + head)
    spade-exit: passes * block + k * head + checks * (lens + head)

with `passes` the block-token passes spade-exit reports (trunk and SPADE's pairs), `k`
scored positions and `checks` confidence checks. Attention over the context is left out
(short prompts). A blocks-only ideal is printed beside it.

    python benchmarks/smollm2/speed.py [--questions 48] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from common import ARC_EASY, write_result
from realmodels import smollm2_dir

from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.lens import Lens, LensKind, save_lens
from lm_eval_spade.sweeps.report import markdown_table

START = "<|endoftext|>"
BATCH = 16


def questions(n: int, offset: int = 0) -> list[dict]:
    lines = (ARC_EASY / "ARC-Easy-Dev.jsonl").read_text().splitlines()[offset : offset + n]
    return [json.loads(line)["question"] for line in lines]


def letter_requests(qs: list[dict], first_doc: int = 0) -> list[Instance]:
    out = []
    for doc, q in enumerate(qs, start=first_doc):
        letters = "ABCDE"[: len(q["choices"])]
        texts = [c["text"] for c in q["choices"]]
        options = "".join(f"{x}. {t}\n" for x, t in zip(letters, texts, strict=True))
        prompt = f"{START}Question: {q['stem']}\n{options}Answer:"
        out += [
            Instance("loglikelihood", {}, (prompt, f" {x}"), i, ("arc", doc, 1))
            for i, x in enumerate(letters)
        ]
    return out


def cloze_requests(qs: list[dict], first_doc: int = 0) -> list[Instance]:
    out = []
    for doc, q in enumerate(qs, start=first_doc):
        prompt = f"{START}Question: {q['stem']}\nAnswer:"
        out += [
            Instance("loglikelihood", {}, (prompt, " " + c["text"]), i, ("arc", doc, 1))
            for i, c in enumerate(q["choices"])
        ]
    return out


def macs(model) -> tuple[float, float, float]:
    """Multiply-adds per token of one block, of the head, and of a lens translator."""
    arch = architecture_for(model)
    block = sum(p.numel() for p in arch.layers[0].parameters() if p.dim() == 2)
    head = arch.lm_head.weight.numel()
    return float(block), float(head), float(arch.hidden_size**2)


def scored_positions(requests: list[Instance], tokenizer) -> tuple[int, int]:
    """Tokens HFLM runs and positions it scores, one forward per distinct context for
    one-token answers (as HFLM groups them)."""
    tokens = scored = 0
    seen: set[str] = set()
    for req in requests:
        context, continuation = req.args
        cont = tokenizer(context + continuation)["input_ids"][
            len(tokenizer(context)["input_ids"]) :
        ]
        if len(cont) == 1 and context in seen:
            continue
        seen.add(context)
        whole = len(tokenizer(context + continuation)["input_ids"])
        tokens += whole - 1
        scored += len(cont)
    return tokens, scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = smollm2_dir()
    L, half, quarter = 30, 15, 7
    base = dict(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=BATCH)

    def make(name: str, **extra):
        return get_model(name).create_from_arg_obj({**base, **extra})

    with tempfile.TemporaryDirectory() as tmp:
        probe_model = make("hf")
        block, head, translator = macs(probe_model.model)
        lens = str(
            save_lens(
                Lens.untrained(architecture_for(probe_model.model), LensKind.LSPADE),
                Path(tmp) / "lens",
            )
        )  # an untrained lens costs what a trained one does
        spade = dict(prefix_token_id=0, lens=lens)
        qs = questions(args.questions)
        mixed_qs = questions(BATCH, offset=args.questions)
        kinds = {
            "letters": (letter_requests(qs), letter_requests(mixed_qs, args.questions)),
            "cloze": (cloze_requests(qs[: args.questions // 2]), None),
        }
        # A threshold between the 8th and 9th entropy at L/4 splits the mixed batch in halves.
        probe = make("spade-exit", threshold="inf", min_layer=quarter, **spade)
        probe.loglikelihood(kinds["letters"][1], disable_tqdm=True)
        entropies = sorted(
            {(e["doc_id"], e["confidence"]) for e in probe.exits}, key=lambda x: x[1]
        )
        split = (entropies[BATCH // 2 - 1][1] + entropies[BATCH // 2][1]) / 2
        settings = {
            "hf": ("hf", {}),
            "spade-exit, no exit setting": ("spade-exit", {}),
            "checks every block, never passing": ("spade-exit", {"threshold": 0.0, **spade}),
            "forced exit at L/2": ("spade-exit", {"threshold": "inf", "min_layer": half, **spade}),
            "forced exit at L/4": (
                "spade-exit",
                {"threshold": "inf", "min_layer": quarter, **spade},
            ),
        }
        mixed = {"threshold": split, "min_layer": quarter, "interval": L, **spade}
        mixed_setting = ("spade-exit", mixed)
        runs = []  # (kind, setting name, model, requests)
        for kind, (reqs, mixed_reqs) in kinds.items():
            for name, (model_name, extra) in settings.items():
                runs.append((kind, name, make(model_name, **extra), reqs))
            if mixed_reqs is not None:
                runs.append((kind, "hf (mixed batch)", make("hf"), mixed_reqs))
                runs.append(
                    (
                        kind,
                        "half exit at L/4, half run to L",
                        make(mixed_setting[0], **mixed_setting[1]),
                        mixed_reqs,
                    )
                )
        times: dict[tuple[str, str], list[float]] = {(k, n): [] for k, n, _, _ in runs}
        for round_ in range(args.rounds):
            for kind, name, lm, reqs in runs if round_ % 2 == 0 else runs[::-1]:
                if hasattr(lm, "exits"):
                    lm.exits.clear()  # exit statistics of the last run only
                start = time.perf_counter()
                lm.loglikelihood(reqs, disable_tqdm=True)
                times[kind, name].append(time.perf_counter() - start)

        median = {key: statistics.median(t) for key, t in times.items()}
        tokenizer = probe_model.tokenizer
        rows = []
        for kind, name, lm, reqs in runs:
            if name.startswith("hf"):
                continue
            baseline = "hf (mixed batch)" if "mixed" in name or "half" in name else "hf"
            n, k = scored_positions(reqs, tokenizer)
            hf_cost = n * (L * block + head)
            speedup = median[kind, baseline] / median[kind, name]
            row = {"prompts": kind, "setting": name, "time / hf": 1 / speedup, "speedup": speedup}
            stats = lm.exit_stats.get("arc") if getattr(lm, "_delegates", True) is False else None
            if stats is not None:
                passes, checks = stats.passes_run, stats.checks
                cost = passes * block + k * head + checks * (translator + head)
                row["ideal (with head)"] = hf_cost / cost
                row["of ideal"] = speedup / row["ideal (with head)"]
                row["ideal (blocks only)"] = n * L / passes
                row["mean exit layer"] = stats.mean_exit_layer
            rows.append(row)
    table = pd.DataFrame(rows)
    share = head / (L * block + head)
    write_result(
        "smollm2/speed_cpu.md",
        "spade-exit wall clock vs hf on SmolLM2-135M-Instruct (CPU)",
        f"{args.questions} ARC-Easy Dev questions as letter prompts (one scored position per "
        f"question) and {args.questions // 2} as cloze continuations (every option token "
        f"scored); the mixed batch is {BATCH} other questions. Batches of {BATCH}, float32, "
        f"{args.threads} CPU threads, median of {args.rounds} interleaved rounds (order "
        "alternating). Confidence: entropy of an L-SPADE lens (untrained: it costs what a "
        f"trained one does). The head is {share:.0%} of `hf`'s work per token here "
        f"({head / block:.1f} blocks' worth). Ideal speedups from multiply-adds per token, "
        "with and without the head (module doc). Written by `benchmarks/smollm2/speed.py`.",
        markdown_table(table, index=False, floatfmt=".3f"),
        "Times (s, median): "
        + ", ".join(f"{kind} / {name} {t:.2f}" for (kind, name), t in median.items()),
    )


if __name__ == "__main__":
    main()
