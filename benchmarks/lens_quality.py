"""What trained lenses buy on stories260K: L-SPADE on ARC prompts, tuned lens on stories.

1. L-SPADE trained on ARC-Easy train prompts (letter answers), KL to SPADE on held-out
   ARC-Easy dev prompts, per layer, against logit lens (the untrained translator).
2. Tuned lens trained on story text sampled from stories260K itself (seeded), rolling
   perplexity of the three held-out TinyStories sentences per layer, through spade-exit,
   next to logit lens and SPADE.

    python benchmarks/lens_quality.py
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd
import torch
import transformers as T
from common import ARC_EASY, SENTENCES, STORIES, arc_prompts, write_result
from lm_eval.api.registry import get_model

from lm_eval_spade.lens import LensKind, save_lens
from lm_eval_spade.lens.data import sample_texts
from lm_eval_spade.lens.training import LensTrainConfig, train_lens
from lm_eval_spade.perplexity import rolling_perplexity

logger = logging.getLogger("lens_quality")


def perplexity(layer: int, **args) -> float:
    base = dict(pretrained=str(STORIES), device="cpu", dtype="float32", exit_layer=layer)
    return rolling_perplexity(
        get_model("spade-exit").create_from_arg_obj({**base, **args}), SENTENCES
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = T.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    tokenizer = T.AutoTokenizer.from_pretrained(STORIES)

    lspade = LensTrainConfig(kind=LensKind.LSPADE, steps=300, batch_size=32, lr=3e-3)
    train = arc_prompts(ARC_EASY / "ARC-Easy-Train.jsonl")
    dev = arc_prompts(ARC_EASY / "ARC-Easy-Dev.jsonl")
    kl = train_lens(model, tokenizer, train, lspade, eval_texts=dev).report.set_index("layer")
    kl["ratio"] = kl["kl_trained"] / kl["kl_logit_lens"]

    tuned = LensTrainConfig(kind=LensKind.TUNED_LENS, steps=300, batch_size=8, lr=3e-3)
    texts = sample_texts(model, tokenizer, n=128, tokens=192, seed=0)
    lens = train_lens(model, tokenizer, texts, tuned).lens
    with tempfile.TemporaryDirectory() as tmp:
        path = save_lens(lens, Path(tmp) / "tuned")
        ppl = pd.DataFrame(
            {
                "logit lens": [perplexity(layer, decoder="logit_lens") for layer in range(6)],
                "tuned lens": [
                    perplexity(layer, decoder="tuned_lens", lens=str(path)) for layer in range(6)
                ],
                "SPADE": [perplexity(layer, decoder="spade") for layer in range(6)],
            }
        ).rename_axis("layer")

    write_result(
        "stories260K_lenses.md",
        "stories260K: what trained lenses buy",
        "Written by `benchmarks/lens_quality.py` (float32, CPU).",
        "## L-SPADE: KL to SPADE at the answer position (nats)\n\nTrained on all "
        f"{len(train)} ARC-Easy train prompts (letter answers; 300 steps of 32, Adam, lr "
        f"3e-3), measured on the {len(dev)} ARC-Easy dev prompts. Logit lens is the "
        "untrained translator.\n\n" + kl.to_markdown(floatfmt=".4f"),
        "## Tuned lens: rolling perplexity of three held-out TinyStories sentences\n\n"
        "Trained on 128 stories of 192 tokens sampled from stories260K itself (seed 0; "
        "300 steps of 8, Adam, lr 3e-3).\n\n" + ppl.to_markdown(floatfmt=".2f"),
    )


if __name__ == "__main__":
    main()
