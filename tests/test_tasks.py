"""The package's task configs and the offline data setting, against the real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lmutil import DATA, STORIES, real_tokenizers

from lm_eval_spade.tasks import offline

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)

ENV = {offline.ENV: str(DATA)}
ARC_FILES = {"train": "Train", "validation": "Dev", "test": "Test"}


@pytest.fixture(scope="module")
def tasks():
    """Our four tasks and lm-eval's four, loaded through lm-eval with the local data."""
    from lm_eval.tasks import TaskManager

    old = os.environ.get(offline.ENV)
    os.environ[offline.ENV] = str(DATA)
    try:
        names = [
            "arc_easy_spade", "arc_challenge_spade", "boolq_spade", "headqa_en_spade",
            "headqa_es_spade", "arc_easy", "arc_challenge", "boolq", "headqa_en", "headqa_es",
        ]  # fmt: skip
        yield TaskManager().load(names)["tasks"]
    finally:
        if old is None:
            os.environ.pop(offline.ENV)
        else:
            os.environ[offline.ENV] = old


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("config", ["ARC-Easy", "ARC-Challenge"])
@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_arc_tasks_render_the_files(tasks, config, split):
    raw = _jsonl(DATA / "arc" / config / f"{config}-{ARC_FILES[split]}.jsonl")
    name = "arc_easy" if config == "ARC-Easy" else "arc_challenge"
    ours, theirs = tasks[f"{name}_spade"], tasks[name]
    docs = {"train": ours.training_docs, "validation": ours.validation_docs,
            "test": ours.test_docs}[split]()  # fmt: skip
    assert len(docs) == len(raw)
    for doc, row in list(zip(docs, raw, strict=True))[::97]:
        question = row["question"]
        labels = [c["label"] for c in question["choices"]]
        letters = "ABCDE"[: len(labels)]
        options = "".join(
            f"{x}. {c['text']}\n" for x, c in zip(letters, question["choices"], strict=True)
        )
        assert ours.fewshot_context(doc, 0) == f"Question: {question['stem']}\n{options}Answer:"
        assert ours.doc_to_choice(doc) == list(letters)
        assert ours.doc_to_target(doc) == labels.index(row["answerKey"])
        # lm-eval's own task reads the same converted rows.
        assert theirs.doc_to_choice(doc) == [c["text"] for c in question["choices"]]
        assert theirs.doc_to_target(doc) == labels.index(row["answerKey"])


def test_boolq_task_and_its_seeded_split(tasks):
    raw = {row["idx"]: row for row in _jsonl(DATA / "boolq" / "val.jsonl")}
    ours = tasks["boolq_spade"]
    train, validation = list(ours.training_docs()), list(ours.validation_docs())
    assert (len(train), len(validation)) == (981, 2289)
    train_ids, validation_ids = {d["idx"] for d in train}, {d["idx"] for d in validation}
    assert not train_ids & validation_ids and train_ids | validation_ids == set(raw)
    for doc in validation[::113]:
        row = raw[doc["idx"]]
        prompt = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
        assert ours.fewshot_context(doc, 0) == prompt
        assert ours.doc_to_choice(doc) == ["no", "yes"]
        assert ours.doc_to_target(doc) == (1 if row["label"] == "true" else 0)
        assert tasks["boolq"].doc_to_target(doc) == ours.doc_to_target(doc)
    assert [d["idx"] for d in tasks["boolq"].validation_docs()] == [d["idx"] for d in validation]


def test_arc_questions_labelled_with_digits_get_letters(tasks):
    docs = [d for d in tasks["arc_easy_spade"].test_docs() if d["choices"]["label"][0] == "1"]
    assert docs, "ARC-Easy test has questions labelled 1-4"
    doc = docs[0]
    assert tasks["arc_easy_spade"].doc_to_choice(doc) == list(
        "ABCD"[: len(doc["choices"]["label"])]
    )
    assert tasks["arc_easy_spade"].doc_to_target(doc) == doc["choices"]["label"].index(
        doc["answerKey"]
    )


@pytest.mark.parametrize("tokenizer", ["llama", "gpt2", "gpt_neox"])
def test_every_answer_is_one_token(tasks, tokenizer):
    """Each choice, as HFLM splits a request (`_encode_pair`), adds exactly one token."""
    tok = real_tokenizers()[tokenizer]
    names = ("arc_easy_spade", "arc_challenge_spade", "boolq_spade", "headqa_en_spade",
             "headqa_es_spade")  # fmt: skip
    for name in names:
        task = tasks[name]
        docs = [*list(task.validation_docs())[:40], *list(task.training_docs())[:40]]
        if name.startswith("arc"):  # and the digit-labelled questions
            docs += [d for d in task.test_docs() if d["choices"]["label"][0] == "1"][:10]
        for doc in docs:
            context = task.fewshot_context(doc, 0)
            for choice in task.doc_to_choice(doc):
                continuation = task.config.target_delimiter + choice
                whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
                ctx = tok(context, add_special_tokens=False)["input_ids"]
                assert whole[: len(ctx)] == ctx, (name, tokenizer)
                assert len(whole) - len(ctx) == 1, (name, tokenizer, choice)


@pytest.mark.parametrize("language", ["en", "es"])
@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_headqa_task_renders_the_files(tasks, split, language):
    prefix = {"train": "train", "validation": "dev", "test": "test"}[split]
    folder = {"en": "HEAD_EN", "es": "HEAD"}[language]
    exams = json.loads((DATA / "headqa" / folder / f"{prefix}_{folder}.json").read_text())
    raw = [q for exam in exams["exams"].values() for q in exam["data"]]
    ours = tasks[f"headqa_{language}_spade"]
    docs = {"train": ours.training_docs, "validation": ours.validation_docs,
            "test": ours.test_docs}[split]()  # fmt: skip
    assert len(docs) == len(raw)
    for doc, q in list(zip(docs, raw, strict=True))[::101]:
        letters = "ABCDE"[: len(q["answers"])]
        options = "".join(
            f"{x}. {a['atext']}\n" for x, a in zip(letters, q["answers"], strict=True)
        )
        assert ours.fewshot_context(doc, 0) == f"Question: {q['qtext']}\n{options}Answer:"
        assert ours.doc_to_choice(doc) == list(letters)
        gold = [str(a["aid"]) for a in q["answers"]].index(str(q["ra"]))
        assert ours.doc_to_target(doc) == gold
        assert tasks[f"headqa_{language}"].doc_to_target(doc) == gold


def test_unset_setting_leaves_the_hub(monkeypatch):
    monkeypatch.delenv(offline.ENV, raising=False)
    assert offline.local_dataset("allenai/ai2_arc", "ARC-Easy") is None
    monkeypatch.setenv(offline.ENV, str(DATA))
    assert offline.local_dataset("some/other_dataset", None) is None


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda root: root / "nope", "is not a directory"),
        (lambda root: root, "ARC-Easy-Train.jsonl is missing"),
        (lambda root: _with(root, "arc/ARC-Easy/ARC-Easy-Train.jsonl", '{"id": 1}\n'),
         "record 1 lacks \\['question', 'answerKey'\\]"),
        (lambda root: _with(root, "arc/ARC-Easy/ARC-Easy-Train.jsonl", "{oops\n"),
         "ARC-Easy-Train.jsonl:1 is not JSON"),
    ],
)  # fmt: skip
def test_bad_data_directory(tmp_path, monkeypatch, make, words):
    monkeypatch.setenv(offline.ENV, str(make(tmp_path)))
    with pytest.raises(offline.OfflineDataError, match=words) as excinfo:
        offline.local_dataset("allenai/ai2_arc", "ARC-Easy")
    assert offline.ENV in str(excinfo.value) or "JSON" in str(excinfo.value)


def test_bad_boolq_and_headqa_files(tmp_path, monkeypatch):
    monkeypatch.setenv(offline.ENV, str(tmp_path))
    _with(tmp_path, "boolq/val.jsonl", '{"question": "q", "passage": "p", "idx": 0, "label": 3}\n')
    with pytest.raises(offline.OfflineDataError, match="label 3 is not true/false"):
        offline.local_dataset("aps/super_glue", "boolq")
    for split in ("train", "dev", "test"):
        _with(tmp_path, f"headqa/HEAD_EN/{split}_HEAD_EN.json", "[1, 2]")
    with pytest.raises(offline.OfflineDataError, match="is not HEAD-QA's release JSON"):
        offline.local_dataset("EleutherAI/headqa", "en")


def _headqa_with(root: Path, edit) -> Path:
    """The English HEAD-QA release with the first question of the dev file edited."""
    for split in ("train", "dev", "test"):
        data = json.loads((DATA / "headqa" / "HEAD_EN" / f"{split}_HEAD_EN.json").read_text())
        if split == "dev":
            edit(next(iter(data["exams"].values()))["data"][0])
        _with(root, f"headqa/HEAD_EN/{split}_HEAD_EN.json", json.dumps(data))
    return root


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda q: q.update(ra="9"), "right answer ra='9', which is not among its answers' aid"),
        (lambda q: q.update(qid="x"), "has an id that is not a number"),
        (lambda q: q["answers"][0].pop("atext"), r"an answer of question .* lacks \['atext'\]"),
        (lambda q: q.pop("ra"), r"lacks \['ra'\]"),
    ],
)
def test_damaged_headqa_questions_are_refused(tmp_path, monkeypatch, edit, words):
    monkeypatch.setenv(offline.ENV, str(_headqa_with(tmp_path, edit)))
    with pytest.raises(offline.OfflineDataError, match=words):
        offline.local_dataset("EleutherAI/headqa", "en")


def test_the_release_checksums_are_those_of_the_shared_files(monkeypatch, caplog):
    import hashlib

    for relative, (digest, _) in offline.RELEASE.items():
        assert hashlib.sha256((DATA / relative).read_bytes()).hexdigest() == digest, relative
    monkeypatch.setenv(offline.ENV, str(DATA))
    offline.local_dataset("allenai/ai2_arc", "ARC-Challenge")
    assert "differs from its release" not in caplog.text


def test_a_file_that_differs_from_its_release_is_warned_about_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(offline.ENV, str(tmp_path))
    for name in ("Train", "Dev", "Test"):
        lines = (DATA / "arc" / "ARC-Easy" / f"ARC-Easy-{name}.jsonl").read_text().splitlines()
        kept = lines[:-3] if name == "Dev" else lines  # cut at a line boundary
        _with(tmp_path, f"arc/ARC-Easy/ARC-Easy-{name}.jsonl", "\n".join(kept) + "\n")
    dev = offline.local_dataset("allenai/ai2_arc", "ARC-Easy")["validation"]
    offline.local_dataset("allenai/ai2_arc", "ARC-Easy")
    warnings = [r.getMessage() for r in caplog.records if "differs from its release" in r.message]
    assert len(warnings) == 1 and len(dev) == 567
    assert "ARC-Easy-Dev.jsonl differs" in warnings[0]
    assert "it holds 567 records where the release has 570" in warnings[0]


def test_spanish_headqa_reads_the_release_head_folder(tmp_path, monkeypatch):
    """lm-eval's `headqa` tag is headqa_en and headqa_es; the release keeps Spanish in
    HEAD/. Here HEAD/ holds copies of the English files (same format; only the language
    differs), so both configs must give the same rows."""
    monkeypatch.setenv(offline.ENV, str(tmp_path))
    for split in ("train", "dev", "test"):
        text = (DATA / "headqa" / "HEAD_EN" / f"{split}_HEAD_EN.json").read_text()
        _with(tmp_path, f"headqa/HEAD_EN/{split}_HEAD_EN.json", text)
        _with(tmp_path, f"headqa/HEAD/{split}_HEAD.json", text)
    english = offline.local_dataset("EleutherAI/headqa", "en")
    spanish = offline.local_dataset("EleutherAI/headqa", "es")
    assert set(spanish) == {"train", "validation", "test"}
    for split in spanish:
        assert spanish[split].to_list() == english[split].to_list()


def _lm_eval(tasks: str, data: Path, out: Path | None = None) -> subprocess.CompletedProcess:
    """The mission's command, offline, on stories260K (logit lens: BoolQ passages outgrow
    its context and are left-truncated, dropping the start token SPADE pairs with)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **{offline.ENV: str(data)})
    saving = ["--output_path", str(out)] if out else []
    return subprocess.run(
        [str(Path(sys.executable).parent / "lm_eval"), "--model", "spade-exit",
         "--model_args", f"pretrained={STORIES},dtype=float32,exit_layer=3,decoder=logit_lens",
         "--tasks", tasks, "--limit", "2", "--device", "cpu", *saving],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_missing_spanish_headqa_is_one_line_from_lm_eval(tmp_path):
    """A data folder with English HEAD-QA only: `--tasks headqa` (English and Spanish)
    stops with one line that names the missing file and the English-only task."""
    for relative in ("arc", "boolq", "headqa/HEAD_EN"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).symlink_to(DATA / relative)
    done = _lm_eval("arc_easy,boolq,headqa", tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lm_eval: error: {tmp_path / 'headqa' / 'HEAD' / 'train_HEAD.json'}")
    assert "use --tasks headqa_en" in last


@pytest.mark.slow
def test_the_missions_task_list_runs_offline(tmp_path):
    """`--tasks arc_easy,boolq,headqa` on the release files: lm-eval's results for all
    four tasks (`headqa` is headqa_en and headqa_es), and spade-exit's exit row for each."""
    done = _lm_eval("arc_easy,boolq,headqa", DATA, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "differs from its release" not in done.stderr
    (result,) = tmp_path.rglob("results_*.json")
    results = json.loads(result.read_text())
    tasks = ("arc_easy", "boolq", "headqa_en", "headqa_es")
    assert set(tasks) <= set(results["results"])
    rows = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in tasks and len(cells) == 5:
            rows[cells[0]] = cells
    assert set(rows) == set(tasks), done.stdout[-3000:]
    for task in tasks:
        assert results["n-samples"][task]["effective"] == 2
        assert 0.0 <= results["results"][task]["acc,none"] <= 1.0
        assert results["config"]["spade"]["tasks"][task]["exit_layer"] == 3
        choices = 2 if task == "boolq" else None
        requests, mean, fraction, exits = rows[task][1:]
        assert mean == "3.00 of 5" and exits == f"3:{requests}"
        assert choices is None or int(requests) == 2 * choices
        assert 0.0 < float(fraction) < 1.0


def _with(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return root


@pytest.mark.slow
def test_lm_eval_runs_offline_on_every_task(tmp_path):
    """The real `lm_eval` command, no hub, no --include_path: our tasks and lm-eval's.

    BoolQ passages outgrow stories260K's 512-token context and are left-truncated, which
    drops the start token SPADE pairs with (spade-exit refuses that, see test_errors.py),
    so this run decodes with logit lens."""
    names = "spade,arc_easy,arc_challenge,boolq,headqa_en"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **ENV)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "lm_eval"), "--model", "spade-exit",
         "--model_args", f"pretrained={STORIES},dtype=float32,exit_layer=3,decoder=logit_lens",
         "--tasks", names, "--limit", "3", "--batch_size", "8", "--device", "cpu",
         "--output_path", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.rglob("results_*.json")
    results = json.loads(result.read_text())
    expected = {
        "arc_easy_spade", "arc_challenge_spade", "boolq_spade", "headqa_en_spade",
        "arc_easy", "arc_challenge", "boolq", "headqa_en",
    }  # fmt: skip
    assert expected <= set(results["results"])
    for task in expected:
        assert results["n-samples"][task]["effective"] == 3
        assert results["config"]["spade"]["tasks"][task]["exit_layer"] == 3
