"""The real `lm_eval` command, in a subprocess, on a local task over the ARC files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lmutil import DATA, GENERATION_YAML, STORIES

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)

TASK_YAML = """\
task: arc_easy_local_test
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
metric_list:
  - metric: acc
"""


STORY_DOCS = [  # story openings and how ../shared/models/SOURCES.md's sentences go on
    ("Once upon a time, there was a little girl named Lily. She loved to", " play"),
    ("One day, a big dog came to the park. The dog was very happy and", " wanted"),
    ("Tom was sad because he lost his red ball. His mom", " helped"),
    ("Once upon a time, there was a boy named Tim. He", " liked"),
    ("The sun was shining and the birds were", " singing"),
    ("Lily and her mom went to the", " park"),
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    data = DATA / "arc" / "ARC-Easy" / "ARC-Easy-Test.jsonl"
    (root / "arc_easy_local_test.yaml").write_text(TASK_YAML.format(data=data))
    stories = root / "stories.jsonl"
    lines = [json.dumps({"prompt": p, "ending": e}) for p, e in STORY_DOCS]
    stories.write_text("\n".join(lines) + "\n")
    (root / "story_generation_test.yaml").write_text(GENERATION_YAML.format(data=stories))
    return root


def run_lm_eval(
    command: list[str],
    model: str,
    model_args: str,
    task_dir: Path,
    out: Path,
    task: str = "arc_easy_local_test",
) -> dict:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    args = [
        *command, "--model", model, "--model_args", model_args,
        "--tasks", task, "--include_path", str(task_dir), "--limit", "6",
        "--batch_size", "4", "--device", "cpu", "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = out.rglob("results_*.json")
    return json.loads(result.read_text())


def logged_samples(out: Path) -> list[dict]:
    (samples,) = out.rglob("samples_*.jsonl")
    return [json.loads(line) for line in samples.read_text().splitlines()]


@pytest.mark.slow
def test_lm_eval_command_hf_and_spade_exit(task_dir, tmp_path):
    bin_dir = Path(sys.executable).parent  # the environment the package is installed in
    lm_eval = str(bin_dir / "lm_eval")
    base = f"pretrained={STORIES},dtype=float32"
    hf = run_lm_eval([lm_eval], "hf", base, task_dir, tmp_path / "hf")
    full = run_lm_eval([lm_eval], "spade-exit", base + ",exit_layer=5", task_dir, tmp_path / "full")
    early = run_lm_eval(
        [str(bin_dir / "lm-eval"), "run"], "spade-exit",
        base + ",exit_layer=2,decoder=spade", task_dir, tmp_path / "early",
    )  # fmt: skip

    task = "arc_easy_local_test"
    acc = {name: r["results"][task]["acc,none"] for name, r in [("hf", hf), ("full", full)]}
    assert acc["full"] == acc["hf"]
    assert hf["n-samples"][task]["effective"] == 6

    spade = early["config"]["spade"]
    config = spade["config"]
    settings = ("decoder", "exit_layer", "threshold", "lens")
    assert [config[k] for k in settings] == ["spade", 2, None, None]
    stats = spade["tasks"][task]
    assert stats["exit_layer"] == 2 and stats["requests"] > 6
    assert 2 / 5 < stats["compute_fraction"] < 1
    assert full["config"]["spade"]["tasks"][task]["compute_fraction"] == 1.0


@pytest.mark.slow
def test_lm_eval_command_generate_until(task_dir, tmp_path):
    """A generate_until task over local data: spade-exit with adaptive exits generates
    every document, stops at the task's stop sequence, and reports per-token exits."""
    lm_eval = str(Path(sys.executable).parent / "lm_eval")
    task = "story_generation_test"
    args = (
        f"pretrained={STORIES},dtype=float32,threshold=1.0,min_layer=3,"
        f"confidence_decoder=logit_lens,exit_log={tmp_path / 'exits.jsonl'}"
    )
    result = run_lm_eval([lm_eval], "spade-exit", args, task_dir, tmp_path / "out", task)
    assert result["n-samples"][task]["effective"] == 6
    assert "exact_match,none" in result["results"][task]
    samples = logged_samples(tmp_path / "out")
    texts = [s["filtered_resps"][0] for s in samples]
    assert len(texts) == 6 and all(texts) and not any("." in t for t in texts)

    spade = result["config"]["spade"]
    assert spade["config"]["kv_strategy"] == "fill"  # the default for SPADE
    stats = spade["tasks"][task]
    assert stats["requests"] == 6 and stats["exits_per"] == "generated token"
    assert stats["generated_tokens"] == sum(stats["exit_layer_histogram"].values()) >= 6
    assert 3 <= stats["mean_exit_layer"] < 5 and set(stats["exit_layer_histogram"]) <= {
        "3",
        "4",
        "5",
    }
    assert 0 < stats["compute_fraction"] < 1.5
    log = [json.loads(line) for line in (tmp_path / "exits.jsonl").read_text().splitlines()]
    assert sorted(entry["doc_id"] for entry in log) == list(range(6))
    assert sum(len(entry["token_exit_layers"]) for entry in log) == stats["generated_tokens"]
