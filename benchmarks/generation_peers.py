"""Generation against what a user would pick instead, in one run: tokens per second and
agreement with greedy full-depth output.

Peers, all through lm-eval's `generate_until` so that every row pays the same harness:
- `hf` generate, the full model (the reference for agreement and speed);
- transformers' own early exit, `hf` with `assistant_early_exit=k` in the generation
  kwargs: LayerSkip-style self-speculation, the first k blocks draft, the full model
  verifies. Lossless by construction; fast only where the draft is accepted. transformers
  runs assisted generation at batch size 1 only;
- spade-exit with forced exits (SPADE and the logit lens as decoders) and adaptive exits
  (logit-lens entropy checks, SPADE decoding), at batch sizes 1 and 8.

Two models: SmolLM2-135M-Instruct (real, 30 blocks, built by `tests/realmodels.py` from
../shared) and a seeded random Llama (24 blocks, hidden 512, EOS never chosen), whose
intermediate layers know nothing about the next token: its rows show cost alone. Prompts
are ARC-Easy Dev questions in the letter format. On SmolLM2, an instruct model, each is a
user turn of its chat template asking to explain the answer, so that most outputs run to
the token limit instead of stopping after a letter, and each begins with the literal
`<|endoftext|>` (the start token chosen for this model, `prefix_token_id=0`), so `hf` and
spade-exit see the same tokens. Greedy decoding, rounds interleaved with the order
alternating, medians kept: the machine is shared and noisy.

    python benchmarks/generation_peers.py [--rounds 2] [--prompts 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from common import ARC_EASY, arc_prompts, write_result
from generation_speed import agreement, build_model, make, requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from realmodels import smollm2_dir

TASK = "gen"  # generation_speed.requests' task name: spade-exit's exit_stats key


@dataclass
class Setting:
    """One row: which lm-eval model, its model_args, extra generation kwargs, and whether
    it runs at batch size 1 only."""

    model: str
    args: dict[str, Any] = field(default_factory=dict)
    gen: dict[str, Any] = field(default_factory=dict)
    batch_one_only: bool = False


def settings(blocks: int, adaptive: bool) -> dict[str, Setting]:
    half, three_quarters = blocks // 2, 3 * blocks // 4
    rows = {"hf generate": Setting("hf")}
    for k in (half, three_quarters):
        rows[f"hf, assistant_early_exit={k}"] = Setting(
            "hf", gen={"assistant_early_exit": k}, batch_one_only=True
        )
    for k in (half, three_quarters):
        rows[f"spade-exit, exit {k}, SPADE"] = Setting("spade-exit", {"exit_layer": k})
    rows[f"spade-exit, exit {three_quarters}, logit lens"] = Setting(
        "spade-exit", {"exit_layer": three_quarters, "decoder": "logit_lens"}
    )
    if adaptive:
        for threshold in (0.5, 2.0):
            rows[f"spade-exit, logit-lens H <= {threshold} from {half}, SPADE"] = Setting(
                "spade-exit",
                {"threshold": threshold, "min_layer": half, "confidence_decoder": "logit_lens"},
            )
    return rows


def chat(prompt: str) -> str:
    """A letter prompt as a SmolLM2 chat turn that asks for an explanation."""
    question = prompt.removesuffix("Answer:") + "Explain your answer."
    return f"<|endoftext|><|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def generated_tokens(lm, texts: list[str]) -> int:
    return sum(len(lm.tok_encode(text)) for text in texts)


def peer_table(
    name: str, pretrained: Path, blocks: int, prompts: list[str], new_tokens: int, rounds: int,
    adaptive: bool, spade_args: dict[str, Any],
) -> pd.DataFrame:  # fmt: skip
    greedy = {"until": [], "max_gen_toks": new_tokens, "do_sample": False}
    rows = []
    for batch in (1, len(prompts)):
        chosen = {
            k: s
            for k, s in settings(blocks, adaptive).items()
            if batch == 1 or not s.batch_one_only
        }
        models = {
            k: make(s.model, pretrained, batch, **(spade_args if s.model == "spade-exit" else {}),
                    **s.args)
            for k, s in chosen.items()
        }  # fmt: skip
        reqs = {k: requests(prompts, {**greedy, **s.gen}) for k, s in chosen.items()}
        times: dict[str, list[float]] = {k: [] for k in chosen}
        texts: dict[str, list[str]] = {}
        order = list(chosen)
        for r in range(rounds):
            for k in order if r % 2 == 0 else reversed(order):
                start = time.perf_counter()
                texts[k] = models[k].generate_until(reqs[k], disable_tqdm=True)
                times[k].append(time.perf_counter() - start)
        hf = models["hf generate"]
        reference = texts["hf generate"]
        hf_rate = generated_tokens(hf, reference) / statistics.median(times["hf generate"])
        for k, s in chosen.items():
            rate = generated_tokens(hf, texts[k]) / statistics.median(times[k])
            token_agree, equal = agreement(hf, texts[k], reference)
            stats = models[k].exit_stats.get(TASK) if s.model == "spade-exit" else None
            rows.append({
                "model": name, "batch": batch, "setting": k,
                "tokens/s": rate, "vs hf": rate / hf_rate,
                "token agreement": token_agree, "equal outputs": equal,
                "mean exit layer": stats.mean_exit_layer if stats else float(blocks),
                "compute fraction": stats.compute_fraction if stats else 1.0,
            })  # fmt: skip
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="generation_peers_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = arc_prompts(ARC_EASY / "ARC-Easy-Dev.jsonl", args.prompts)
    run = dict(prompts=prompts, new_tokens=args.new_tokens, rounds=args.rounds)
    smollm2 = peer_table(
        "SmolLM2-135M", smollm2_dir(), 30, adaptive=True, spade_args={"prefix_token_id": 0},
        **{**run, "prompts": [chat(p) for p in prompts]},
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        random = peer_table(
            "random Llama 24x512", build_model(Path(tmp)) / "model", 24, adaptive=False,
            spade_args={}, **run,
        )  # fmt: skip
    table = pd.concat([smollm2, random]).to_markdown(index=False, floatfmt=".3f")
    write_result(
        args.out,
        "Generation: spade-exit against hf generate and transformers' assistant_early_exit (CPU)",
        f"Written by `benchmarks/generation_peers.py`, one run: {args.prompts} ARC-Easy Dev "
        f"prompts (letter format; on SmolLM2 as a chat turn asking to explain the answer), "
        f"{args.new_tokens} greedy tokens each, float32, "
        f"{args.threads} CPU threads, median of {args.rounds} interleaved rounds. tokens/s "
        "counts the generated text's tokens; vs hf = its rate over `hf generate`'s at the "
        "same batch size. Agreement is with `hf generate`'s greedy output, position by "
        "position and whole outputs. assistant_early_exit is lossless: where its agreement "
        "is below 1 the difference is float noise between the draft-verify and plain paths. "
        "Mean exit layer and compute fraction: spade-exit's own statistics (hf rows: full "
        "depth).",
        table,
    )


if __name__ == "__main__":
    main()
