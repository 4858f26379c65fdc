"""Where lens training text comes from: an lm-eval task, or a local file.

- An lm-eval task by name (`arc_easy`, a task of `task_configs/`, or one under
  `include_path`): prompts are the task's zero-shot contexts, rendered by lm-eval itself
  (`fewshot_context`), so L-SPADE learns at exactly the answer positions spade-exit
  will score. Documents (for tuned lens) are the context followed by the gold answer.
- A `.jsonl` file: one JSON object per line with a `prompt` or `text` field.
- A `.txt` file: documents (or prompts) separated by blank lines.
- The model's own samples (`sample_texts`): text in the model's own distribution, for a
  tuned lens when no corpus is at hand.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lm_eval_spade.errors import UserInputError

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_FIELDS = ("prompt", "text", "context")


class LensDataError(UserInputError):
    """Training data that cannot be found or read."""


def load_texts(
    source: str,
    *,
    documents: bool,
    split: str = "train",
    include_path: str | None = None,
    limit: int | None = None,
) -> list[str]:
    """Prompts (`documents=False`) or whole documents (`documents=True`) from `source`;
    the first `limit` of them when it is given."""
    if limit is not None and limit < 1:
        raise LensDataError(f"limit={limit} must be at least 1 (or left out for all examples).")
    path = Path(source)
    if path.suffix in {".jsonl", ".txt"} or path.exists():
        texts = _from_file(path)
    else:
        texts = _from_task(
            source, documents=documents, split=split, include_path=include_path, limit=limit
        )
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LensDataError(f"{source} ({split}) holds no non-empty text to train on.")
    return texts[:limit]


def _read_text(path: Path) -> str:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise LensDataError(f"{path} {what}; give a .jsonl or .txt file or a task name.")
    try:
        return path.read_text()
    except UnicodeDecodeError as err:
        raise LensDataError(f"{path} is not UTF-8 text ({err.reason}); give a text file.") from err


def _from_file(path: Path) -> list[str]:
    text = _read_text(path)
    if path.suffix == ".txt":
        return [block.strip() for block in text.split("\n\n")]
    if path.suffix != ".jsonl":
        raise LensDataError(f"{path}: unsupported file type; use .jsonl (prompt/text) or .txt.")
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LensDataError(f"{path}:{number} is not JSON ({err}).") from err
        field = next((f for f in _FIELDS if isinstance(record, dict) and f in record), None)
        if field is None:
            raise LensDataError(
                f"{path}:{number} has no {' / '.join(_FIELDS)} field; each line must be an "
                'object like {"prompt": "Question: ...\\nAnswer:"}.'
            )
        if not isinstance(record[field], str):
            raise LensDataError(
                f"{path}:{number}: {field} is {type(record[field]).__name__}, not text."
            )
        texts.append(record[field])
    return texts


def _tasks(source: str, include_path: str | None) -> list[Any]:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    if source not in manager.all_tasks:
        hint = " (add --include-path DIR for a local task)" if include_path is None else ""
        raise LensDataError(
            f"{source!r} is neither a file nor an lm-eval task{hint}. Give a task name such "
            "as arc_easy, or a .jsonl/.txt file."
        )
    return list(manager.load([source])["tasks"].values())


def _split_docs(task: Any, split: str) -> Iterable[dict]:
    available = {
        "train": task.has_training_docs(),
        "validation": task.has_validation_docs(),
        "test": task.has_test_docs(),
    }
    if split not in available:
        raise LensDataError(f"split={split!r} is not one of {', '.join(SPLITS)}.")
    if not available[split]:
        have = [s for s, ok in available.items() if ok]
        raise LensDataError(
            f"task {task.config.task} has no {split} split (it has: {', '.join(have)}). Pass "
            "--split with one of those, and keep what you train on out of reported scores."
        )
    return {
        "train": task.training_docs,
        "validation": task.validation_docs,
        "test": task.test_docs,
    }[split]()


def task_examples(
    source: str, split: str = "train", include_path: str | None = None, limit: int | None = None
) -> list[tuple[str, str]]:
    """`(context, gold continuation)` for each document of a task's split, both rendered
    by lm-eval itself (zero-shot context; the continuation starts with the task's target
    delimiter), as lm-eval scores them. With `limit`, the first `limit` only: rendering
    a whole training split takes seconds that a short run should not wait for."""
    examples: list[tuple[str, str]] = []
    for task in _tasks(source, include_path):
        for doc in _split_docs(task, split):
            if limit is not None and len(examples) >= limit:
                break
            context = task.fewshot_context(doc, num_fewshot=0)
            gold = _gold_continuation(task, doc)
            contexts = context if isinstance(context, list) else [context]
            examples.extend((c, gold) for c in contexts)
    examples = examples[:limit]
    logger.info("%s (%s): %d examples", source, split, len(examples))
    return examples


def _from_task(
    source: str, *, documents: bool, split: str, include_path: str | None, limit: int | None
) -> list[str]:
    examples = task_examples(source, split, include_path, limit)
    return [c + g if documents else c for c, g in examples]


def _gold_continuation(task: Any, doc: dict) -> str:
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice" and isinstance(target, int):
        target = task.doc_to_choice(doc)[target]
    if isinstance(target, list):
        target = target[0]
    return f"{task.config.target_delimiter}{target}"


def sample_texts(model: Any, tokenizer: Any, n: int, tokens: int, seed: int = 0) -> list[str]:
    """`n` seeded samples of `tokens` tokens from the model, starting at its BOS token."""
    import torch

    start_id = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    torch.manual_seed(seed)
    start = torch.full((n, 1), start_id, device=model.device)
    out = model.generate(
        start,
        do_sample=True,
        max_new_tokens=tokens,
        top_k=0,
        top_p=1.0,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out]
