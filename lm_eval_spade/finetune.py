"""LoRA fine-tuning (peft) of the base model on a task, as the paper does before
evaluating.

Training examples are the task's training documents in exactly the form lm-eval scores
them: the zero-shot context rendered by lm-eval, then the gold continuation. They are
tokenized as HFLM splits a request (trailing whitespace of the context moves to the
continuation; a start token first, as spade-exit puts one there), and the loss
is the cross-entropy of the continuation tokens only. The adapter directory is what
`--model_args pretrained=MODEL,peft=DIR` loads.

Training stops at the first non-finite loss or adapter weight and writes nothing; the
output folder is checked before any work and written atomically (`files`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lm_eval_spade import __version__
from lm_eval_spade.errors import UserInputError
from lm_eval_spade.files import ADAPTER, check_output, write_atomically
from lm_eval_spade.finite import check_finite, check_training_step, is_rate, optimiser_step
from lm_eval_spade.lens.data import task_examples
from lm_eval_spade.lens.targets import start_token_id
from lm_eval_spade.loading import load_causal_lm
from lm_eval_spade.paths import make_file_portable, portable

logger = logging.getLogger(__name__)

REPORT_FILE = "finetune.json"


class FinetuneError(UserInputError):
    """Fine-tuning settings that cannot work."""


@dataclass
class FinetuneConfig:
    """LoRA and optimisation settings. `target_modules=None` is peft's default for the
    model family (e.g. q_proj and v_proj for Llama)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-4
    seed: int = 0
    max_length: int = 512
    #: The start token examples begin with (spade-exit's `prefix_token_id`); None: BOS,
    #: else EOS. Fine-tune with the one the model will be evaluated with.
    prefix_token_id: int | None = None

    def check(self) -> None:
        for name in ("rank", "alpha", "steps", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"{name}={getattr(self, name)} must be at least 1.")
        if not is_rate(self.lr):
            raise FinetuneError(f"lr={self.lr} must be a positive finite number (at most 3.4e38).")
        if not 0 <= self.dropout < 1:
            raise FinetuneError(f"dropout={self.dropout} must be in [0, 1).")


def loss_windows(losses: list[float]) -> dict[str, float | int]:
    """Mean loss over the first and the last steps: windows of up to 10 steps that never
    overlap, so "first" and "last" are different steps whenever there are two or more."""
    window = max(1, min(10, len(losses) // 2))
    return {
        "loss_window_steps": window,
        "loss_first_steps": sum(losses[:window]) / window,
        "loss_last_steps": sum(losses[-window:]) / window,
    }


def loss_summary(losses: list[float]) -> str:
    """One line for the command's output."""
    if len(losses) == 1:
        return f"loss at the only step {losses[0]:.4f}"
    w = loss_windows(losses)
    n = w["loss_window_steps"]
    steps = "step" if n == 1 else f"{n} steps"
    return (
        f"loss over the first {steps} {w['loss_first_steps']:.4f}, "
        f"over the last {steps} {w['loss_last_steps']:.4f} ({len(losses)} steps)"
    )


def is_adapter_dir(path: Path) -> bool:
    """An adapter folder written by an earlier version (before output markers)."""
    try:
        return "package_version" in json.loads((path / REPORT_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False


def encode_example(
    tokenizer: Any, context: str, continuation: str, prefix_token_id: int | None = None
) -> tuple[list[int], int]:
    """Token ids of `[start] + context + continuation`, and where the continuation starts."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return [start_token_id(tokenizer, prefix_token_id), *ctx, *whole[len(ctx) :]], 1 + len(ctx)


def _batch(
    encoded: list[tuple[list[int], int]], max_length: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, and labels (-100 except continuation tokens).
    Examples longer than `max_length` lose tokens from the left, as HFLM truncates."""
    rows = []
    for ids, start in encoded:
        cut = max(0, len(ids) - max_length)
        rows.append((ids[cut:], max(start - cut, 1)))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for r, (ids, start) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        mask[r, : len(ids)] = 1
        labels[r, start : len(ids)] = torch.tensor(ids[start:])
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal LM loss of the labelled (answer) tokens, as `model(**batch).loss`, with the
    LM head run only at the positions that predict them.

    A 49K-token head over every position of a long passage costs as much as several
    blocks and holds a `[batch, length, vocab]` tensor, for one answer token per row.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = (targets != -100).any(dim=0).nonzero().squeeze(1)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep
    ).logits
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets[:, keep].flatten(), ignore_index=-100
    )


def finetune(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list[tuple[str, str]],
    config: FinetuneConfig,
    progress: bool = True,
) -> tuple[torch.nn.Module, list[float]]:
    """Wrap `model` with LoRA adapters and train them on `examples`; returns the peft model
    and the loss of every step."""
    from peft import LoraConfig, get_peft_model

    config.check()
    if not examples:
        raise FinetuneError("there are no training examples.")
    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as err:
        raise FinetuneError(f"LoRA cannot wrap this model: {err}") from err
    peft_model.train()
    optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=config.lr
    )
    encoded = [encode_example(tokenizer, c, g, config.prefix_token_id) for c, g in examples]
    generator = torch.Generator().manual_seed(config.seed)
    device = next(peft_model.parameters()).device
    order: list[int] = []
    losses: list[float] = []
    trained = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    bar = tqdm(range(config.steps), desc="LoRA fine-tuning", disable=not progress)
    for step in bar:
        if len(order) < config.batch_size:
            order += torch.randperm(len(encoded), generator=generator).tolist()
        batch, order = order[: config.batch_size], order[config.batch_size :]
        loss = answer_loss(
            peft_model, _batch([encoded[i] for i in batch], config.max_length, device)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with optimiser_step(step + 1, config.steps, config.lr):
            optimizer.step()
        losses.append(float(loss.detach()))
        check_training_step(step + 1, config.steps, losses[-1], trained, config.lr)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    peft_model.eval()
    return peft_model, losses


def finetune_task(
    pretrained: str,
    task: str,
    out: str | Path,
    config: FinetuneConfig,
    split: str = "train",
    include_path: str | None = None,
    limit: int | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    overwrite: bool = False,
) -> list[float]:
    """Fine-tune on a task's split and write the adapter (and a report) to `out`; an
    earlier adapter there is replaced only with `overwrite`."""
    config.check()
    if limit is not None and limit < 1:
        raise FinetuneError(f"limit={limit} must be at least 1 (or left out for all documents).")
    check_output(Path(out), ADAPTER, overwrite, is_adapter_dir)
    examples = task_examples(task, split, include_path, limit)
    model, tokenizer = load_causal_lm(pretrained, revision, dtype, device)
    peft_model, losses = finetune(model, tokenizer, examples, config)
    report = {
        "task": task,
        "split": split,
        "examples": len(examples),
        "base_model": pretrained,
        "revision": revision,
        "dtype": dtype,
        "settings": asdict(config),
        **loss_windows(losses),
        "package_version": __version__,
    }

    adapter = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    check_finite(adapter, f"the LoRA adapter for {out}", "it was not saved.")

    def write(tmp: Path) -> None:
        peft_model.save_pretrained(tmp)
        for name in ("adapter_config.json", "README.md"):  # peft records the base model's path
            if (tmp / name).is_file():
                make_file_portable(tmp / name)
        (tmp / REPORT_FILE).write_text(json.dumps(portable(report), indent=2) + "\n")

    path = write_atomically(Path(out), write, ADAPTER, overwrite, is_adapter_dir)
    logger.info("saved the LoRA adapter to %s", path)
    return losses
