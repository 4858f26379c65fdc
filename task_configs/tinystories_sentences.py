"""The documents of `tinystories_sentences_spade`, read from the jsonl file beside this."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).with_name("tinystories_sentences.jsonl")


def load(**_: Any):
    """A DatasetDict with one `test` split of `{"text": ...}` rows."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
