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

The release files have known SHA-256s (`RELEASE`, from the data's SOURCES.md). A file
that differs, such as one cut at a line boundary, is still read (an edited copy may be
meant), but one warning line per file names it, with its record count against the
release's. A record that lacks a field, or whose answer is not among its choices, is
refused with one line. When the hub cannot be reached and `LM_EVAL_SPADE_DATA_DIR` is
unset, loading one of these datasets ends with one line that names the setting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lm_eval_spade.errors import UserInputError

logger = logging.getLogger(__name__)

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

#: SHA-256 and record count (questions for HEAD-QA) of each release file.
RELEASE = {
    "arc/ARC-Easy/ARC-Easy-Train.jsonl":
        ("c62e5482d8c01f2d5a7f24239ac9db3b12f9e47267c4e3f088c6ffe41d5545ef", 2251),
    "arc/ARC-Easy/ARC-Easy-Dev.jsonl":
        ("f4364b808a68df6bf500ce1070fb0105d40cacd2391c210deb00ff83ba75d1f4", 570),
    "arc/ARC-Easy/ARC-Easy-Test.jsonl":
        ("ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be", 2376),
    "arc/ARC-Challenge/ARC-Challenge-Train.jsonl":
        ("e02837c53ee86f6d73c259f91c77725c5062ef4531130b7f473a9d9b01118a77", 1119),
    "arc/ARC-Challenge/ARC-Challenge-Dev.jsonl":
        ("55224364abd2477f66a9a57c5cbef109fb71d83019aa5e37aec0e7ab757746ca", 299),
    "arc/ARC-Challenge/ARC-Challenge-Test.jsonl":
        ("9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c", 1172),
    "boolq/val.jsonl": ("21acbfbd1e7908fddd9e626bc2a6101c5a5430bda3fbf74985b979af7a63b989", 3270),
    "boolq/test.jsonl": ("7e898b2585500df403d3551542b26134d71a1630944d97660fa7ca872527dcfe", 3245),
    "headqa/HEAD_EN/train_HEAD_EN.json":
        ("0b9f0e708d6d0dc7a85db19dcb72ece76f61253229eb7bad218ec34f7a215fd1", 2657),
    "headqa/HEAD_EN/dev_HEAD_EN.json":
        ("4c1b0588d1e1c4c769accdb6cfa6b4fe85cb032baffa9bc6520a454e7cc9f7f8", 1366),
    "headqa/HEAD_EN/test_HEAD_EN.json":
        ("41f9f178b5d363ecd665f56ecca42deff7834c66f491617cc2687bbcfccd03b7", 2742),
    "headqa/HEAD/train_HEAD.json":
        ("edf4d2570454d9db7e8d33d4e66e620818996714e589b6cf78f261e9b8b78652", 2657),
    "headqa/HEAD/dev_HEAD.json":
        ("6b9a6f5d4f301f1a13eeb1bc2f22cfc2f567a280d577409e0ca3e2d67e2fc365", 1366),
    "headqa/HEAD/test_HEAD.json":
        ("5d6e0779bf7456b9c686d5830947bd17cdad9476ee8c7d555ce2a31f38ca51ea", 2742),
}  # fmt: skip
_compared: set[tuple[str, int, int]] = set()  # (path, size, mtime) already compared

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
        "headqa/HEAD_EN/train_HEAD_EN.json, headqa/HEAD/train_HEAD.json, ...), or unset it "
        "to load from the hub."
    )


def _file(root: Path, relative: str, dataset: str = "") -> Path:
    path = root / relative
    if not path.is_file():
        hint = f" {MISSING_HINT[dataset]}" if dataset in MISSING_HINT else ""
        raise OfflineDataError(f"{path} is missing.{hint} {_fix()}")
    return path


def compare_with_release(root: Path, relative: str, records: int) -> None:
    """Warn, once per file, when a file differs from its release (see the module doc)."""
    path = root / relative
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if relative not in RELEASE or key in _compared:
        return
    _compared.add(key)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    expected, count = RELEASE[relative]
    if digest != expected:
        logger.warning(
            "%s differs from its release file (SHA-256 %s..., not %s...): it holds %d "
            "records where the release has %d; results are on this file as it is",
            path, digest[:12], expected[:12], records, count,
        )  # fmt: skip


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError as err:
        raise OfflineDataError(f"{path} is not UTF-8 text ({err.reason}). {_fix()}") from err


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(_text(path).splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise OfflineDataError(
                    f"{path}:{number} is not JSON ({err}); expected one JSON object per line."
                ) from err
    return rows


def _require(path: Path, row: Any, keys: tuple[str, ...], what: str, where: str = "") -> None:
    if not isinstance(row, dict):
        raise OfflineDataError(f"{path}: {where or 'a record'} is not a JSON object ({what}).")
    missing = [k for k in keys if k not in row]
    if missing:
        raise OfflineDataError(
            f"{path}: {where or 'a record'} lacks {missing}; this is not {what}. {_fix()}"
        )


# --- one converter per dataset: release files -> the hub's rows ---------------------------
def _arc_choices(path: Path, row: dict, where: str) -> list[dict]:
    """The question's choices, checked: each has a text and a label, and the answer key
    is one of the labels."""
    fmt = "ARC's release format"
    _require(path, row["question"], ("stem", "choices"), fmt, f"{where}'s question")
    choices = row["question"]["choices"]
    if not isinstance(choices, list) or not choices:
        raise OfflineDataError(f"{path}: {where} has no list of choices ({fmt}).")
    for choice in choices:
        _require(path, choice, ("text", "label"), fmt, f"a choice of {where}")
    labels = [c["label"] for c in choices]
    if row["answerKey"] not in labels:
        raise OfflineDataError(
            f"{path}: {where} has answerKey {row['answerKey']!r}, which is not among its "
            f"choice labels {labels}; the file is damaged."
        )
    return choices


def _arc(root: Path, config: str) -> dict[str, list[dict]]:
    splits = {}
    for split, relative in LAYOUT[config].items():
        path = _file(root, relative)
        rows = []
        records = _jsonl(path)
        compare_with_release(root, relative, len(records))
        for number, row in enumerate(records, start=1):
            where = f"record {number}"
            _require(path, row, ("id", "question", "answerKey"), "ARC's release format", where)
            choices = _arc_choices(path, row, where)
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
    records = _jsonl(path)
    compare_with_release(root, LAYOUT["boolq"]["validation"], len(records))
    for number, row in enumerate(records, start=1):
        fields = ("question", "passage", "idx", "label")
        _require(path, row, fields, "SuperGLUE BoolQ", f"record {number}")
        labelled.append({**row, "label": _boolq_label(path, row["label"])})
    order = list(range(len(labelled)))
    random.Random(BOOLQ_SEED).shuffle(order)
    n_train = round(len(order) * BOOLQ_TRAIN_FRACTION)
    train = sorted(order[:n_train])
    validation = sorted(order[n_train:])
    test_path = root / LAYOUT["boolq"]["test"]
    test = [{**row, "label": -1} for row in _jsonl(test_path)] if test_path.is_file() else []
    for number, row in enumerate(test, start=1):
        _require(
            test_path, row, ("question", "passage", "idx"), "SuperGLUE BoolQ", f"record {number}"
        )
    if test:
        compare_with_release(root, LAYOUT["boolq"]["test"], len(test))
    fields = ("question", "passage", "idx", "label")
    return {
        "train": [{k: labelled[i][k] for k in fields} for i in train],
        "validation": [{k: labelled[i][k] for k in fields} for i in validation],
        **({"test": [{k: row[k] for k in fields} for row in test]} if test else {}),
    }


def _headqa_row(path: Path, exam: dict, q: Any) -> dict[str, Any]:
    """One question in the hub's schema, checked: whole-number ids, and a right answer
    (`ra`) that is one of its answers' `aid`."""
    fmt = "HEAD-QA's format"
    where = f"a question of exam {exam['name']!r}"
    _require(path, q, ("qid", "qtext", "ra", "answers"), fmt, where)
    where = f"question {q['qid']!r} of exam {exam['name']!r}"
    if not isinstance(q["answers"], list):
        raise OfflineDataError(f"{path}: {where} has no list of answers ({fmt}).")
    for a in q["answers"]:
        _require(path, a, ("aid", "atext"), fmt, f"an answer of {where}")
    try:
        qid, ra = int(q["qid"]), int(q["ra"])
        answers = [{"aid": int(a["aid"]), "atext": a["atext"]} for a in q["answers"]]
    except (TypeError, ValueError) as err:
        raise OfflineDataError(f"{path}: {where} has an id that is not a number ({err}).") from err
    if ra not in [a["aid"] for a in answers]:
        raise OfflineDataError(
            f"{path}: {where} has right answer ra={q['ra']!r}, which is not among its "
            f"answers' aid {[a['aid'] for a in answers]}; the file is damaged."
        )
    return {
        "name": exam["name"],
        "year": str(exam["year"]),
        "category": exam["category"],
        "qid": qid,
        "qtext": q["qtext"],
        "ra": ra,
        "image": q.get("image") or None,
        "answers": answers,
    }


def _headqa(root: Path, config: str) -> dict[str, list[dict]]:
    splits = {}
    for split, relative in LAYOUT[config].items():
        path = _file(root, relative, config)
        try:
            exams = json.loads(_text(path))["exams"]
            exams = list(exams.values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise OfflineDataError(
                f"{path} is not HEAD-QA's release JSON ({err!r}); expected "
                '{"exams": {name: {"name", "category", "year", "data": [...]}}}.'
            ) from err
        rows = []
        for exam in exams:
            _require(path, exam, ("name", "category", "year", "data"), "HEAD-QA's format")
            for q in exam["data"]:
                rows.append(_headqa_row(path, exam, q))
        compare_with_release(root, relative, len(rows))
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


def hub_error(path: str, name: str | None, err: Exception) -> OfflineDataError:
    """One line for a dataset this module could serve offline that the hub did not give."""
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return OfflineDataError(
        f"{path} ({name}) could not be loaded from the hub ({type(err).__name__}: {first}). "
        f"Without network, set {ENV} to a folder of the release files "
        "(arc/ARC-Easy/ARC-Easy-Train.jsonl, boolq/val.jsonl, headqa/HEAD_EN/..., see "
        "lm_eval_spade/tasks/offline.py)."
    )


def install(task_module: Any) -> None:
    """Serve `HUB_DATASETS` from `LM_EVAL_SPADE_DATA_DIR` in lm-eval's ConfigurableTask."""
    cls = task_module.ConfigurableTask
    if getattr(cls.download, "_spade_offline", False):
        return
    original = cls.download

    def download(self, dataset_kwargs=None, **kwargs):
        local = None
        ours = (self.DATASET_PATH, self.DATASET_NAME) in HUB_DATASETS
        if not callable(self.config.custom_dataset):
            local = local_dataset(self.DATASET_PATH, self.DATASET_NAME)
        if local is not None:
            self.dataset = local
            return None
        try:
            return original(self, dataset_kwargs, **kwargs)
        except Exception as err:
            if not ours or callable(self.config.custom_dataset):
                raise
            raise hub_error(self.DATASET_PATH, self.DATASET_NAME, err) from err

    download._spade_offline = True  # type: ignore[attr-defined]
    cls.download = download
