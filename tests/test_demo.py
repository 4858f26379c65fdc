"""The README's main job: `lm-eval-spade demo`, end to end through the real lm_eval."""

from __future__ import annotations

import json

import pytest
from lmutil import DATA, STORIES

from lm_eval_spade import calibration, demo
from lm_eval_spade.cli import main
from lm_eval_spade.errors import UserInputError


@pytest.mark.slow
def test_demo_command_runs_spade_exit_on_calibration_and_real_tasks(tmp_path, capfd):
    """The README's main job, `lm-eval-spade demo --data-dir ... --model ...`, through the
    command (on 4 documents per real task instead of 40)."""
    main(["demo", "--data-dir", str(DATA), "--model", str(STORIES), "--limit", "4",
          "--out", str(tmp_path)])  # fmt: skip
    printed = capfd.readouterr().out
    # lm_eval's own output: each spade-exit run's results table, then its exit table.
    assert printed.count("spade-exit: adaptive exits (entropy of lspade") == 2
    lines = printed[printed.index("| run | task |") :].splitlines()
    assert lines[2].startswith(f"| calibration-hf | {calibration.TASK} |")
    assert lines[3].startswith(f"| calibration-spade-exit | {calibration.TASK} |")
    rows = [line.strip("| ").split(" | ") for line in lines[4:]]
    # stories260K's tokenizer puts the start token first itself: no separate full-depth run.
    expected = [(run, task) for run in ("real-hf", "real-spade-exit") for task in demo.REAL_TASKS]
    assert [(row[0], row[1]) for row in rows] == expected
    assert all(row[-1] == "1.00x" for row in rows[:3])  # hf against itself
    assert all(row[-1].endswith("x") and float(row[-2]) > 0 for row in rows)

    def results(run: str) -> dict:
        (path,) = (tmp_path / "results" / run).rglob("results_*.json")
        return json.loads(path.read_text())

    task = calibration.TASK
    assert results("calibration-hf")["results"][task]["acc,none"] >= 0.9
    stats = results("calibration-spade-exit")["config"]["spade"]["tasks"][task]
    assert stats["compute_fraction"] < 1 and stats["requests"] == 4 * 600
    real = results("real-spade-exit")["config"]["spade"]["tasks"]
    assert {t: real[t]["num_layers"] for t in demo.REAL_TASKS} == dict.fromkeys(demo.REAL_TASKS, 5)


def test_demo_refuses_real_tasks_without_a_model(tmp_path):
    with pytest.raises(UserInputError, match="add --model"):
        demo.run(demo.DemoConfig(out=tmp_path, data_dir=DATA))
    with pytest.raises(UserInputError, match="is not a directory"):
        demo.run(demo.DemoConfig(out=tmp_path, data_dir=tmp_path / "none", model="x"))
