"""Loading a causal LM and its tokenizer for the package's own commands.

Evaluation loads models through lm-eval's HFLM; training commands (lenses, LoRA) load
them here, with the same hub-or-directory paths and dtype names.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import transformers as T

from lm_eval_spade import calibration

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(
    pretrained: str,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    peft: str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Model (in eval mode) and tokenizer; a LoRA adapter directory is applied if given."""
    pretrained = calibration.resolve_model(pretrained)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    model = T.AutoModelForCausalLM.from_pretrained(
        pretrained, revision=revision, dtype=DTYPES[dtype]
    )
    if peft is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, peft)
    tokenizer = T.AutoTokenizer.from_pretrained(pretrained, revision=revision)
    return model.to(device).eval(), tokenizer
