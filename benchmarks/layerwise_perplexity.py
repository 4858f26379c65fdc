"""Layer-wise perplexity of stories260K on TinyStories sentences, per decoder.

Runs spade-exit through lm-eval's model API (rolling loglikelihood, as perplexity tasks
do) at every layer with each decoder, and writes a markdown table to `results/`.
Needs the shared model at ../shared/models/stories260K.

    python benchmarks/layerwise_perplexity.py
"""

from __future__ import annotations

import pandas as pd
from common import SENTENCES, STORIES, write_result
from lm_eval.api.registry import get_model

from lm_eval_spade.perplexity import rolling_perplexity

SETTINGS = {
    "logit lens": {"decoder": "logit_lens"},
    "SPADE": {"decoder": "spade"},
    "SPADE (compact)": {"decoder": "spade", "spade_positions": "compact"},
    "SPADE-NoS": {"decoder": "spade_nos"},
}


def perplexity(layer: int, model_args: dict) -> float:
    args = dict(pretrained=str(STORIES), device="cpu", dtype="float32", exit_layer=layer)
    return rolling_perplexity(
        get_model("spade-exit").create_from_arg_obj({**args, **model_args}), SENTENCES
    )


def main() -> None:
    table = pd.DataFrame(
        {name: [perplexity(layer, args) for layer in range(6)] for name, args in SETTINGS.items()}
    ).rename_axis("layer")
    write_result(
        "stories260K_layerwise_perplexity.md",
        "stories260K: layer-wise perplexity per decoder",
        "Three TinyStories sentences, scored as rolling loglikelihood (all tokens, BOS "
        "prefix), float32, CPU. Written by `benchmarks/layerwise_perplexity.py`.",
        table.to_markdown(floatfmt=".2f"),
    )


if __name__ == "__main__":
    main()
