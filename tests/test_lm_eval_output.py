"""spade-exit's exits in lm-eval's own output (a table after its results table, a log
line, exits in logged samples), and what this package changes in lm-eval's logs and
errors: our lines in its format, our errors one line, its tracebacks untouched."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from lmutil import DATA, STORIES

import lm_eval_spade  # noqa: F401  (registers spade-exit)
from lm_eval_spade import exit_output
from lm_eval_spade.stats import ExitStats, RequestExit
from lm_eval_spade.tasks import offline

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)

BIN = Path(sys.executable).parent
ENV = dict(
    os.environ,
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    **{offline.ENV: str(DATA)},
)
#: lm-eval 0.4.13's log line: `2025-01-31:12:00:00 INFO     [evaluator:214] ...`
LOG_LINE = r"\d{4}-\d\d-\d\d:\d\d:\d\d:\d\d (INFO|WARNING) +\[[\w.]+:\d+\] "


def _stats(layers: list[int], generated: list[list[int]] | None = None) -> dict:
    stats = ExitStats(num_layers=5)
    for i, layer in enumerate(layers):
        tokens = generated[i] if generated else None
        stats.add(RequestExit(layer, 0.5, layer * 10 + 2, 50, layer, tokens))
    return stats.to_dict()


def test_exit_table_heading_and_log_line():
    spade = {
        "config": {
            "exit_layer": None,
            "threshold": 0.5,
            "confidence": "entropy",
            "confidence_decoder": "lspade",
            "decoder": "spade",
        },
        "num_layers": 5,
        "tasks": {
            "arc_easy": _stats([2, 3, 3, 5]),
            "stories": _stats([3, 3], generated=[[3, 4, 5], [5]]),
        },
    }
    lines = exit_output.exit_table(spade).splitlines()
    assert lines[0] == (
        "spade-exit: adaptive exits (entropy of lspade <= 0.5 nats), decoded with spade"
    )
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    assert cells[0] == ["Tasks", "Requests", "Mean exit layer", "Compute fraction",
                        "Exits (layer:count)"]  # fmt: skip
    # arc_easy: passes (22 + 32 + 32 + 52) / (4 * 50) = 0.69
    assert cells[2] == ["arc_easy", "4", "3.25 of 5", "0.69", "2:1 3:2 5:1"]
    # generation counts generated tokens: layers 3, 4, 5 and 5
    assert cells[3] == ["stories", "2", "4.25 of 5", "0.64", "3:1 4:1 5:2 tokens"]

    fixed = {**spade, "config": {**spade["config"], "exit_layer": 3, "threshold": None}}
    assert (
        exit_output.heading(fixed) == "spade-exit: fixed exit at layer 3 of 5, decoded with spade"
    )
    assert exit_output.summary_line({"arc_easy": spade["tasks"]["arc_easy"]}) == (
        "spade-exit exits: arc_easy: mean exit layer 3.25 of 5, compute 0.690, 4 requests"
    )


def test_samples_get_the_exits_of_their_requests():
    def record(doc_id: int, idx: int, layer: int) -> dict:
        return {"task": "t", "doc_id": doc_id, "idx": idx, "exit_layer": layer,
                "confidence": 0.1 * layer, "token_exit_layers": None}  # fmt: skip

    exits = [record(0, 1, 3), record(0, 0, 3), record(1, 0, 4), record(1, 1, 4)]
    samples = {"t": [{"doc_id": 7, "arguments": [1, 2]}, {"doc_id": 9, "arguments": [1, 2]}]}
    # lm-eval's `samples={"t": [9, 7]}`: the logged doc_id 9 is the first document (0).
    exit_output.annotate_samples(samples, exits, {"t": [9, 7]})
    assert samples["t"][0]["spade_exits"] == [
        {"exit_layer": 4, "confidence": pytest.approx(0.4)},
        {"exit_layer": 4, "confidence": pytest.approx(0.4)},
    ]
    assert [e["exit_layer"] for e in samples["t"][1]["spade_exits"]] == [3, 3]
    # Requests that were not all recorded leave the sample as lm-eval wrote it.
    partial = {"t": [{"doc_id": 0, "arguments": [1, 2, 3]}]}
    exit_output.annotate_samples(partial, exits)
    assert "spade_exits" not in partial["t"][0]


def test_simple_evaluate_samples_and_table_carry_the_exits(monkeypatch):
    """Python use: the README's `simple_evaluate` call with adaptive exits."""
    import lm_eval
    from lm_eval.utils import make_table  # imported before any spade-exit model exists

    monkeypatch.setenv(offline.ENV, str(DATA))
    model_args = f"pretrained={STORIES},threshold=2.0,min_layer=3,confidence_decoder=logit_lens"
    results = lm_eval.simple_evaluate(
        model="spade-exit", model_args=model_args, tasks=["arc_easy"], limit=3,
        device="cpu", log_samples=True, samples=None,
    )  # fmt: skip
    samples = results["samples"]["arc_easy"]
    assert len(samples) == 3
    for sample in samples:
        exits = sample["spade_exits"]
        assert len(exits) == len(sample["arguments"]) == 4  # one per answer choice
        assert len({e["exit_layer"] for e in exits}) == 1  # a question exits together
        assert exits[0]["exit_layer"] in (3, 4, 5) and exits[0]["confidence"] > 0
    stats = results["config"]["spade"]["tasks"]["arc_easy"]
    layers = [s["spade_exits"][0]["exit_layer"] for s in samples for _ in range(4)]
    assert stats["mean_exit_layer"] == pytest.approx(sum(layers) / len(layers))
    table = make_table(results)
    assert table.index("|arc_easy|") < table.index("spade-exit: adaptive exits")


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout)


MISSION_TASKS = "arc_easy,boolq,headqa_en"


@pytest.mark.slow
def test_lm_eval_prints_the_exit_table_and_logs_exits(tmp_path):
    """The mission's command (`--tasks arc_easy,boolq,headqa_en`: BoolQ passages outgrow
    stories260K's context and are cut after the start token), with --limit."""
    tasks = MISSION_TASKS
    done = _run(
        [str(BIN / "lm_eval"), "--model", "spade-exit",
         "--model_args", f"pretrained={STORIES},exit_layer=3",
         "--tasks", tasks, "--limit", "3", "--log_samples", "--output_path", str(tmp_path)]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    names = tasks.split(",")
    out = done.stdout
    heading = "spade-exit: fixed exit at layer 3 of 5, decoded with spade"
    assert out.index("|Version|") < out.index("|acc ") < out.index(heading)
    rows = out[out.index(heading) :].splitlines()[3:]
    for name, row in zip(names, rows[: len(names)], strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == name and cells[2] == "3.00 of 5" and cells[4].startswith("3:")
        assert 0.6 < float(cells[3]) < 1
    summary = [line for line in done.stderr.splitlines() if "spade-exit exits:" in line]
    assert len(summary) == 1 and re.match(LOG_LINE + "spade-exit exits: arc_easy: ", summary[0])
    for name in names:
        (path,) = tmp_path.rglob(f"samples_{name}_*.jsonl")
        for line in path.read_text().splitlines():
            exits = json.loads(line)["spade_exits"]
            assert exits and {e["exit_layer"] for e in exits} == {3}


@pytest.mark.parametrize(
    ("error", "status", "last_line"),
    [
        ("lm_eval_spade.errors.UserInputError('bad x; use y')", 2, "-c: error: bad x; use y"),
        ("RuntimeError('boom')", 1, "RuntimeError: boom"),
    ],
)
def test_error_hook_of_the_lm_eval_command(error, status, last_line):
    """Once lm-eval's CLI loads, our errors end the process with one line and status 2;
    any other keeps its traceback, with no frame of ours."""
    code = f"import lm_eval._cli.harness, lm_eval_spade.errors; raise {error}"
    done = _run([sys.executable, "-c", code])
    assert done.returncode == status
    assert done.stderr.strip().splitlines()[-1] == last_line
    assert ("Traceback" in done.stderr) == (status == 1) and "lm_eval_spade/" not in done.stderr


@pytest.mark.slow
def test_lm_eval_errors_of_other_models_hold_no_frame_of_ours(tmp_path):
    """Under `--model hf`, lm-eval's own traceback, untouched by our error hook."""
    done = _run(
        [str(BIN / "lm_eval"), "--model", "hf", "--model_args",
         f"pretrained={tmp_path / 'no-such-model'}", "--tasks", "arc_easy"]
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
    assert "lm_eval_spade" not in done.stderr and "lm_eval/_cli/run.py" in done.stderr
