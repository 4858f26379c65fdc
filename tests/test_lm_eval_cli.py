"""The real `lm_eval` command, in a subprocess, on a local task over the ARC files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lmutil import DATA, STORIES

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


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    data = DATA / "arc" / "ARC-Easy" / "ARC-Easy-Test.jsonl"
    (root / "arc_easy_local_test.yaml").write_text(TASK_YAML.format(data=data))
    return root


def run_lm_eval(command: list[str], model: str, model_args: str, task_dir: Path, out: Path) -> dict:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    args = [
        *command, "--model", model, "--model_args", model_args,
        "--tasks", "arc_easy_local_test", "--include_path", str(task_dir), "--limit", "6",
        "--batch_size", "4", "--device", "cpu", "--output_path", str(out),
    ]  # fmt: skip
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = out.rglob("results_*.json")
    return json.loads(result.read_text())


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
