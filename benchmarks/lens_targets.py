"""Cost of making L-SPADE targets vs tuned-lens targets for the same prompts.

L-SPADE's targets need the prompt run once up to layer L-1, then, per prompt and layer
l, a 2-token pair through blocks l+1..L. Tuned lens's need one full forward. Both over
the same real ARC-Easy train prompts (letter-answer format), for stories260K and for a
deeper random-weight Llama where block compute dominates. Rounds are interleaved and the
median is kept, since this machine is shared and noisy.

    python benchmarks/lens_targets.py
"""

from __future__ import annotations

import logging
import statistics
import time

import pandas as pd
import torch
import transformers as T
from common import ARC_EASY, STORIES, arc_prompts, write_result

from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.lens.targets import _pad as pad
from lm_eval_spade.lens.targets import _states, encode, final_layer_targets, lspade_targets

PROMPTS, BATCH, ROUNDS = 128, 16, 3
logger = logging.getLogger("lens_targets")


def deep_llama() -> T.PreTrainedModel:
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=24,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
    )  # fmt: skip
    return T.LlamaForCausalLM(config).eval()


def measure(model: T.PreTrainedModel, ids: list[list[int]]) -> dict[str, float]:
    arch = architecture_for(model)
    layers = list(range(arch.num_layers))
    batches = [ids[i : i + BATCH] for i in range(0, len(ids), BATCH)]
    jobs = {
        "tuned lens targets": lambda b: final_layer_targets(arch, b, layers),
        "L-SPADE targets": lambda b: lspade_targets(arch, b, layers),
        "prompt forward to L-1 only": lambda b: _states(arch, _pad(arch, b), layers),
    }
    times: dict[str, list[float]] = {name: [] for name in jobs}
    passes: dict[str, int] = {}
    with torch.no_grad():
        for _ in range(ROUNDS):
            for name, job in jobs.items():
                start, total = time.perf_counter(), 0
                for batch in batches:
                    out = job(batch)
                    total += getattr(out, "block_token_passes", 0)
                times[name].append(time.perf_counter() - start)
                passes[name] = total
    tuned = statistics.median(times["tuned lens targets"])
    row = {f"{name} (s)": statistics.median(t) for name, t in times.items()}
    row["L-SPADE / tuned lens (time)"] = row["L-SPADE targets (s)"] / tuned
    row["L-SPADE / tuned lens (block-token passes)"] = (
        passes["L-SPADE targets"] / passes["tuned lens targets"]
    )
    return row


def _pad(arch, batch):
    return pad(arch, batch)[0]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    tokenizer = T.AutoTokenizer.from_pretrained(STORIES)
    ids = encode(tokenizer, arc_prompts(ARC_EASY / "ARC-Easy-Train.jsonl", PROMPTS), 512)
    mean_len = sum(map(len, ids)) / len(ids)
    models = {
        "stories260K (5 blocks, d=64)": T.AutoModelForCausalLM.from_pretrained(STORIES),
        "random Llama (24 blocks, d=256)": deep_llama(),
    }
    rows = {}
    for name, model in models.items():
        logger.info("measuring %s", name)
        rows[name] = measure(model, ids)
    table = pd.DataFrame(rows).T
    write_result(
        "lens_target_cost.md",
        "Cost of lens targets: L-SPADE vs tuned lens",
        f"{PROMPTS} ARC-Easy train prompts (letter answers, stories260K tokenizer, mean "
        f"{mean_len:.0f} tokens), batches of {BATCH}, float32, CPU (2 threads); median of "
        f"{ROUNDS} interleaved rounds. Targets for every layer 0..L-1. Written by "
        "`benchmarks/lens_targets.py`.\n\n"
        "- tuned lens: one full forward, final-layer distribution at every position;\n"
        "- L-SPADE: the prompt up to layer L-1 once, then per layer l the 2-token SPADE "
        "pair through blocks l+1..L at the answer position only;\n"
        "- block-token passes: L·n for tuned lens; (L-1)·n + Σ_l 2(L-l) = (L-1)·n + L(L+1) "
        "for L-SPADE, so the pairs are cheap when the prompt is long next to the depth "
        "(n >> L) and cost about one more forward when n ≈ L.",
        table.to_markdown(floatfmt=".3f"),
    )


if __name__ == "__main__":
    main()
