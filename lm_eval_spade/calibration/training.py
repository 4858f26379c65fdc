"""Training the calibration model from scratch on its task family.

The letter at `Answer:` alone is a poor signal (two bits per sequence) and a model
trained from scratch on it alone stays near chance for the whole 15-minute budget (measured:
about 0.85/0.76/0.63 by level after 2500 steps). So each item also teaches the sum itself:
a second loss reads the logits at the `=` token and asks for the sum. Prompts are causal,
so the `=` position of the multiple-choice prompt then holds the sum by construction, and
what is left to learn is matching it against the options and copying a letter (measured:
0.97 in the same number of steps). The shipped model is a plain LlamaForCausalLM; only
its training knows about the second position.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers as T
from tqdm import tqdm

from lm_eval_spade.calibration.task import (
    LETTERS,
    WORDS,
    TaskSpec,
    prompt,
    split_items,
    training_stream,
)
from lm_eval_spade.calibration.tokenizer import word_level_tokenizer
from lm_eval_spade.errors import UserInputError
from lm_eval_spade.finite import check_training_step, is_rate, optimiser_step

logger = logging.getLogger(__name__)


@dataclass
class CalibrationConfig:
    """The model and its training. The defaults train in about 7 minutes on 2 CPU cores."""

    layers: int = 12
    hidden_size: int = 64
    heads: int = 4
    steps: int = 4000
    batch_size: int = 64
    lr: float = 3e-3
    #: Weight of the sum loss (at `=`) next to the answer loss (at `Answer:`).
    sum_weight: float = 1.0
    seed: int = 0
    task: TaskSpec = field(default_factory=TaskSpec)

    def check(self) -> None:
        for name in ("layers", "hidden_size", "heads", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.hidden_size % self.heads:
            raise UserInputError(
                f"hidden_size={self.hidden_size} is not a multiple of heads={self.heads}."
            )
        if not is_rate(self.lr):
            raise UserInputError(f"lr={self.lr} must be a positive finite number (at most 3.4e38).")
        if not (self.sum_weight >= 0 and math.isfinite(self.sum_weight)):
            raise UserInputError(f"sum_weight={self.sum_weight} must be a finite number >= 0.")

    def model_config(self, tokenizer: T.PreTrainedTokenizerFast) -> T.LlamaConfig:
        return T.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden_size,
            intermediate_size=4 * self.hidden_size, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.heads,
            max_position_embeddings=64, tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip


@dataclass
class _Batch:
    """Right-padded prompts with the positions and targets of both losses."""

    ids: torch.Tensor
    mask: torch.Tensor
    answer_at: torch.Tensor  # index of the last real token (`Answer:`)
    answer: torch.Tensor  # the gold letter's token id
    sum_at: torch.Tensor  # index of the `=` token
    total: torch.Tensor  # the sum's token id


def _batch(docs: list[dict[str, Any]], tokenizer: T.PreTrainedTokenizerFast) -> _Batch:
    enc = tokenizer([prompt(d) for d in docs], padding=True, return_tensors="pt")
    ids = enc["input_ids"]
    to_id = tokenizer.convert_tokens_to_ids
    return _Batch(
        ids, enc["attention_mask"], enc["attention_mask"].sum(1) - 1,
        torch.tensor([to_id(LETTERS[d["label"]]) for d in docs]),
        (ids == to_id("=")).long().argmax(1),
        torch.tensor([to_id(str(d["sum"])) for d in docs]),
    )  # fmt: skip


def _losses(model: torch.nn.Module, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the answer and at `=`, for the letter and the sum."""
    logits = model(input_ids=batch.ids, attention_mask=batch.mask).logits
    rows = torch.arange(len(batch.ids))
    return logits[rows, batch.answer_at], logits[rows, batch.sum_at]


@torch.no_grad()
def heldout_accuracy(
    model: torch.nn.Module, tokenizer: T.PreTrainedTokenizerFast, spec: TaskSpec
) -> dict[str, float]:
    """Full-depth accuracy on the test split, overall and per level."""
    docs = split_items(spec, "test")
    right = []
    for start in range(0, len(docs), 256):
        batch = _batch(docs[start : start + 256], tokenizer)
        logits, _ = _losses(model, batch)
        right += (logits.argmax(-1) == batch.answer).tolist()
    acc = {"all": sum(right) / len(right)}
    for level in spec.levels:
        hits = [r for r, d in zip(right, docs, strict=True) if d["level"] == level]
        acc[f"level_{level}"] = sum(hits) / len(hits)
    return acc


def train_calibration_model(
    config: CalibrationConfig, progress: bool = True
) -> tuple[T.LlamaForCausalLM, T.PreTrainedTokenizerFast, dict[str, Any]]:
    config.check()
    torch.manual_seed(config.seed)
    tokenizer = word_level_tokenizer(WORDS)
    model = T.LlamaForCausalLM(config.model_config(tokenizer))
    stream = training_stream(config.task, config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.1
    )
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(config.steps), desc="train calibration model", disable=not progress)
    for step in bar:
        batch = _batch(list(itertools.islice(stream, config.batch_size)), tokenizer)
        answer_logits, sum_logits = _losses(model, batch)
        loss = F.cross_entropy(answer_logits, batch.answer)
        loss = loss + config.sum_weight * F.cross_entropy(sum_logits, batch.total)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with optimiser_step(step + 1, config.steps, config.lr):
            optimizer.step()
        schedule.step()
        check_training_step(
            step + 1, config.steps, loss.item(), model.named_parameters(), config.lr
        )
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    info = {
        "settings": asdict(config),
        "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "heldout_accuracy": heldout_accuracy(model, tokenizer, config.task),
    }
    return model, tokenizer, info


def save_calibration_model(
    model: T.LlamaForCausalLM, tokenizer: T.PreTrainedTokenizerFast, info: dict, out: Path
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
