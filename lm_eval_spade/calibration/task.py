"""The calibration task family: sums to work out, then a letter to point at.

Each item asks for the sum of one to three digits and lists four numbers near it;
the answer is the letter of the right one, one token, as in the ARC prompts. Working
out the answer takes several steps that a transformer spreads over its blocks: read the
terms, add them, compare the sum with each option, and copy that option's letter. The
harder levels (more terms) need more of that work, so a model trained on the family has
answers that form at different depths, which is what early exit needs to be calibrated on.

Everything is generated from a seed; the test split never shares an item with train.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

LETTERS = "ABCD"
MAX_TERMS = 3
MAX_SUM = 9 * MAX_TERMS
NUMBERS = [str(n) for n in range(MAX_SUM + 1)]
#: Every word the calibration prompts use; the word-level tokenizer is built from it.
WORDS = ["Question:", "Answer:", "+", "=", "?", *(f"{c}." for c in LETTERS), *LETTERS, *NUMBERS]
SPLITS = {"train": 0, "validation": 1, "test": 2}


@dataclass(frozen=True)
class TaskSpec:
    """How the family is drawn. Levels are numbers of terms; options sit within
    `spread` of the sum so that a rough estimate is not enough."""

    levels: tuple[int, ...] = (1, 2, 3)
    spread: int = 4
    sizes: tuple[int, int, int] = (4000, 300, 600)  # train, validation, test
    seed: int = 1234


def question(terms: list[int]) -> str:
    return " + ".join(map(str, terms)) + " = ?"


def draw_item(rng: random.Random, level: int, spread: int) -> dict[str, Any]:
    """One item: `question`, four `choices` (numbers as text), gold `label`, `level`."""
    terms = [rng.randrange(10) for _ in range(level)]
    total = sum(terms)
    near = [n for n in range(max(0, total - spread), min(MAX_SUM, total + spread) + 1)]
    options = [*rng.sample([n for n in near if n != total], len(LETTERS) - 1), total]
    rng.shuffle(options)
    return {
        "question": question(terms),
        "choices": [str(n) for n in options],
        "label": options.index(total),
        "level": level,
        "sum": total,
    }


def prompt(doc: dict[str, Any]) -> str:
    """The multiple-choice prompt, laid out as `arc_easy_spade` lays out ARC."""
    lines = [f"Question: {doc['question']}"]
    lines += [f"{letter}. {text}" for letter, text in zip(LETTERS, doc["choices"], strict=True)]
    return "\n".join(lines) + "\nAnswer:"


def _key(doc: dict[str, Any]) -> tuple:
    return doc["question"], tuple(doc["choices"])


def split_items(spec: TaskSpec, split: str) -> list[dict[str, Any]]:
    """The seeded items of one split; train and validation skip every test item."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    held_out = set() if split == "test" else {_key(d) for d in split_items(spec, "test")}
    rng = random.Random(f"{spec.seed}-{split}")
    size = spec.sizes[SPLITS[split]]
    items: list[dict[str, Any]] = []
    while len(items) < size:
        doc = draw_item(rng, spec.levels[len(items) % len(spec.levels)], spec.spread)
        if _key(doc) not in held_out:
            items.append(doc)
    return items


def training_stream(spec: TaskSpec, seed: int):
    """An endless seeded stream of training items that never repeats a test item."""
    held_out = {_key(d) for d in split_items(spec, "test")}
    rng = random.Random(f"{spec.seed}-stream-{seed}")
    while True:
        doc = draw_item(rng, rng.choice(spec.levels), spec.spread)
        if _key(doc) not in held_out:
            yield doc


def dataset(**kwargs: Any):
    """lm-eval's `custom_dataset`: a DatasetDict of the three splits.

    `levels` (task metadata, or `--metadata '{"levels": [3]}'`) keeps only the items of those
    levels, so each split stays held out from the others; `seed` and `spread` draw another
    member of the family (which the shipped model was not trained on).
    """
    import datasets

    spec = TaskSpec(**{k: kwargs[k] for k in ("spread", "seed") if k in kwargs})
    levels = {int(n) for n in kwargs.get("levels", spec.levels)}
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_list(
                [d for d in split_items(spec, name) if d["level"] in levels]
            )
            for name in SPLITS
        }
    )
