"""`LM_EVAL_SPADE_DATA_DIR`: ARC, BoolQ and HeadQA from local release files.

Set it to a directory laid out like the datasets' original releases (ARC's jsonl files,
BoolQ's SuperGLUE jsonl, HEAD-QA's JSON; see `LAYOUT`), and every lm-eval task that
loads one of the hub datasets of `HUB_DATASETS` (lm-eval's `arc_easy`, `arc_challenge`,
`boolq`, `headqa_en`, `headqa_es` and this package's `*_spade` tasks) reads the local
files instead, converted to the hub's schema, so the task configs are unchanged. Unset,
tasks load from the hub as usual.

BoolQ has no public local training split. Offline, its labelled dev file is split once,
seeded: 30% becomes `train` (for fitting translators or LoRA) and 70% `validation`, so
what is trained on never counts in the reported numbers. Offline BoolQ scores are
therefore on that 70% (2289 questions), not on the full dev set.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lm_eval_spade.errors import UserInputError

ENV = "LM_EVAL_SPADE_DATA_DIR"
BOOLQ_TRAIN_FRACTION, BOOLQ_SEED = 0.3, 1234

LAYOUT = {
    "ARC-Easy": {s: f"arc/ARC-Easy/ARC-Easy-{f}.jsonl" for s, f in
                 [("train", "Train"), ("validation", "Dev"), ("test", "Test")]},
    "ARC-Challenge": {s: f"arc/ARC-Challenge/ARC-Challenge-{f}.jsonl" for s, f in
                      [("train", "Train"), ("validation", "Dev"), ("test", "Test")]},
    "boolq": {"validation": "boolq/val.jsonl", "test": "boolq/test.jsonl"},
    "headqa_en": {s: f"headqa/HEAD_EN/{f}_HEAD_EN.json" for s, f in
                  [("train", "train"), ("validation", "dev"), ("test", "test")]},
    "headqa_es": {s: f"headqa/HEAD/{f}_HEAD.json" for s, f in
                  [("train", "train"), ("validation", "dev"), ("test", "test")]},
}  # fmt: skip

#: What to say when one dataset's files are missing, beyond the layout.
MISSING_HINT = {
    # lm-eval's `headqa` tag is headqa_en plus headqa_es: the Spanish files are often absent.
    "headqa_es": "lm-eval's `headqa` tag includes the Spanish headqa_es; for English only, "
    "use --tasks headqa_en (or headqa_en_spade).",
}


class OfflineDataError(UserInputError):
    """The local data directory or one of its files is missing or malformed."""


def _fix() -> str:
    return (
        f"Point {ENV} at a directory laid out like the original releases "
        "(arc/ARC-Easy/ARC-Easy-Train.jsonl, boolq/val.jsonl, "
        "headqa/HEAD_EN/train_HEAD_EN.json, ...), or unset it to load from the hub."
    )


def _file(root: Path, relative: str, dataset: str = "") -> Path:
    path = root / relative
    if not path.is_file():
        hint = f" {MISSING_HINT[dataset]}" if dataset in MISSING_HINT else ""
        raise OfflineDataError(f"{path} is missing.{hint} {_fix()}")
    return path


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise OfflineDataError(
                    f"{path}:{number} is not JSON ({err}); expected one JSON object per line."
                ) from err
    return rows


def _require(path: Path, row: Any, keys: tuple[str, ...], what: str) -> None:
    if not isinstance(row, dict) or any(k not in row for k in keys):
        raise OfflineDataError(f"{path}: a record lacks {list(keys)}; this is not {what}. {_fix()}")


# --- one converter per dataset: release files -> the hub's rows ---------------------------
def _arc(root: Path, config: str) -> dict[str, list[dict]]:
    splits = {}
    for split, relative in LAYOUT[config].items():
        path = _file(root, relative)
        rows = []
        for row in _jsonl(path):
            _require(path, row, ("id", "question", "answerKey"), "ARC's release format")
            _require(path, row["question"], ("stem", "choices"), "ARC's release format")
            choices = row["question"]["choices"]
            rows.append(
                {
                    "id": row["id"],
                    "question": row["question"]["stem"],
                    "choices": {
                        "text": [c["text"] for c in choices],
                        "label": [c["label"] for c in choices],
                    },
                    "answerKey": row["answerKey"],
                }
            )
        splits[split] = rows
    return splits


def _boolq_label(path: Path, value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if value in ("true", "false"):
        return int(value == "true")
    raise OfflineDataError(f"{path}: label {value!r} is not true/false (SuperGLUE BoolQ).")


def _boolq(root: Path, config: str) -> dict[str, list[dict]]:
    path = _file(root, LAYOUT["boolq"]["validation"])
    labelled = []
    for row in _jsonl(path):
        _require(path, row, ("question", "passage", "idx", "label"), "SuperGLUE BoolQ")
        labelled.append({**row, "label": _boolq_label(path, row["label"])})
    order = list(range(len(labelled)))
    random.Random(BOOLQ_SEED).shuffle(order)
    n_train = round(len(order) * BOOLQ_TRAIN_FRACTION)
    train = sorted(order[:n_train])
    validation = sorted(order[n_train:])
    test_path = root / LAYOUT["boolq"]["test"]
    test = [{**row, "label": -1} for row in _jsonl(test_path)] if test_path.is_file() else []
    fields = ("question", "passage", "idx", "label")
    return {
        "train": [{k: labelled[i][k] for k in fields} for i in train],
        "validation": [{k: labelled[i][k] for k in fields} for i in validation],
        **({"test": [{k: row[k] for k in fields} for row in test]} if test else {}),
    }


def _headqa(root: Path, config: str) -> dict[str, list[dict]]:
    splits = {}
    for split, relative in LAYOUT[config].items():
        path = _file(root, relative, config)
        try:
            exams = json.loads(path.read_text())["exams"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise OfflineDataError(
                f"{path} is not HEAD-QA's release JSON ({err!r}); expected "
                '{"exams": {name: {"name", "category", "year", "data": [...]}}}.'
            ) from err
        rows = []
        for exam in exams.values():
            _require(path, exam, ("name", "category", "year", "data"), "HEAD-QA's format")
            for q in exam["data"]:
                _require(path, q, ("qid", "qtext", "ra", "answers"), "HEAD-QA's format")
                rows.append(
                    {
                        "name": exam["name"],
                        "year": str(exam["year"]),
                        "category": exam["category"],
                        "qid": int(q["qid"]),
                        "qtext": q["qtext"],
                        "ra": int(q["ra"]),
                        "image": q.get("image") or None,
                        "answers": [
                            {"aid": int(a["aid"]), "atext": a["atext"]} for a in q["answers"]
                        ],
                    }
                )
        splits[split] = rows
    return splits


#: (hub dataset path, config name) -> converter; lm-eval's names and their aliases.
HUB_DATASETS: dict[tuple[str, str | None], tuple[Callable, str]] = {
    **{(p, n): (_arc, n) for p in ("allenai/ai2_arc", "ai2_arc")
       for n in ("ARC-Easy", "ARC-Challenge")},
    **{(p, "boolq"): (_boolq, "boolq") for p in ("aps/super_glue", "super_glue")},
    **{(p, n): (_headqa, f"headqa_{n}") for p in ("EleutherAI/headqa", "head_qa",
                                                  "dvilares/head_qa") for n in ("en", "es")},
}  # fmt: skip


def data_dir() -> Path | None:
    """The directory of `LM_EVAL_SPADE_DATA_DIR`, checked; None when it is unset."""
    value = os.environ.get(ENV)
    if not value:
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        raise OfflineDataError(f"{ENV}={value} is not a directory. {_fix()}")
    return root


def local_dataset(path: str | None, name: str | None):
    """The hub dataset `path`/`name` built from local files, or None if not ours to serve."""
    key = (path, name)
    if key not in HUB_DATASETS:
        return None
    root = data_dir()
    if root is None:
        return None
    import datasets

    convert, config = HUB_DATASETS[key]
    splits = convert(root, config)
    return datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in splits.items()})


def install(task_module: Any) -> None:
    """Serve `HUB_DATASETS` from `LM_EVAL_SPADE_DATA_DIR` in lm-eval's ConfigurableTask."""
    cls = task_module.ConfigurableTask
    if getattr(cls.download, "_spade_offline", False):
        return
    original = cls.download

    def download(self, dataset_kwargs=None, **kwargs):
        local = None
        if not callable(self.config.custom_dataset):
            local = local_dataset(self.DATASET_PATH, self.DATASET_NAME)
        if local is None:
            return original(self, dataset_kwargs, **kwargs)
        self.dataset = local

    download._spade_offline = True  # type: ignore[attr-defined]
    cls.download = download
