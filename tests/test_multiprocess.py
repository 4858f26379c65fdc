"""`accelerate launch` with two CPU processes gives what one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lmutil import STORIES, write_arc_letter_task

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)

BIN = Path(sys.executable).parent


def _run(tmp: Path, task_dir: Path, task: str, launcher: list[str]) -> tuple[dict, list[dict]]:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        ACCELERATE_USE_CPU="1",
    )  # fmt: skip
    log = tmp / "exits.jsonl"
    args = (
        f"pretrained={STORIES},dtype=float32,threshold=1.9,confidence_decoder=logit_lens,"
        f"exit_log={log}"
    )
    command = [
        *launcher, "--model", "spade-exit", "--model_args", args, "--tasks", task,
        "--include_path", str(task_dir), "--limit", "9", "--batch_size", "4",
        "--output_path", str(tmp / "out"),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = (tmp / "out").rglob("results_*.json")
    exits = [json.loads(line) for line in log.read_text().splitlines()]
    return json.loads(result.read_text()), exits


@pytest.mark.slow
def test_two_cpu_processes_equal_one(tmp_path):
    task = write_arc_letter_task(tmp_path / "tasks")
    one, one_exits = _run(tmp_path / "one", tmp_path / "tasks", task, [str(BIN / "lm_eval")])
    two, two_exits = _run(
        tmp_path / "two", tmp_path / "tasks", task,
        [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
         "-m", "lm_eval"],
    )  # fmt: skip

    # The two processes really split the documents: rank 0 took the even ones first.
    assert [e["doc_id"] for e in two_exits][:4] == [0, 0, 0, 0]
    assert two_exits[4]["doc_id"] == 2
    assert one["results"][task] == two["results"][task]

    key = lambda e: (e["doc_id"], e["idx"])  # noqa: E731
    assert len(one_exits) == len(two_exits)  # the padding request is not counted twice
    for a, b in zip(sorted(one_exits, key=key), sorted(two_exits, key=key), strict=True):
        assert (a["doc_id"], a["idx"], a["exit_layer"]) == (b["doc_id"], b["idx"], b["exit_layer"])
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)

    stats_one = one["config"]["spade"]["tasks"][task]
    stats_two = two["config"]["spade"]["tasks"][task]
    assert stats_two["exit_layer_histogram"] == stats_one["exit_layer_histogram"]
    for field in ("requests", "block_token_passes", "block_token_passes_full"):
        assert stats_two[field] == stats_one[field]
    assert stats_two["compute_fraction"] == pytest.approx(stats_one["compute_fraction"])
