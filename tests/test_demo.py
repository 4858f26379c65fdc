"""The README's main job: `lm-eval-spade demo`, end to end through the real lm_eval."""

from __future__ import annotations

import json

import pytest
from lmutil import DATA, REPO, STORIES
from realmodels import ENDOFTEXT, smollm2_dir

from lm_eval_spade import calibration, demo
from lm_eval_spade.cli import main
from lm_eval_spade.errors import UserInputError

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)


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


#: The README's SmolLM2 main job: the committed ARC adapter and L-SPADE lens, and the
#: threshold choose-threshold certified on ARC-Easy validation (docs/results.md).
SMOLLM2_ADAPTER = REPO / "results" / "smollm2" / "adapter-arc"
SMOLLM2_LENS = REPO / "results" / "smollm2" / "lens-arc-lspade"
SMOLLM2_THRESHOLD = "0.0251"


@pytest.mark.slow
def test_smollm2_main_job_runs_hf_and_spade_exit_with_the_committed_adapter_and_lens(
    tmp_path, capfd
):
    """`demo --model SMOLLM2 --peft ... --lens ... --prefix-token-id 0 --real-tasks arc_easy
    --real-threshold ... --limit 100`, on 4 questions: hf, a full-depth run on spade-exit's
    tokens (its start token differs from hf's input), then SPADE-EXIT with the adapter."""
    main(["demo", "--data-dir", str(DATA), "--model", str(smollm2_dir()),
          "--peft", str(SMOLLM2_ADAPTER), "--lens", str(SMOLLM2_LENS),
          "--prefix-token-id", str(ENDOFTEXT), "--real-tasks", "arc_easy",
          "--real-threshold", SMOLLM2_THRESHOLD, "--limit", "4",
          "--out", str(tmp_path)])  # fmt: skip
    printed = capfd.readouterr().out
    lines = printed[printed.index("| run | task |") :].splitlines()
    rows = [line.strip("| ").split(" | ") for line in lines[4:]]
    assert [(row[0], row[1]) for row in rows] == [
        ("real-hf", "arc_easy"), ("real-full-depth", "arc_easy"), ("real-spade-exit", "arc_easy")
    ]  # fmt: skip
    (path,) = (tmp_path / "results" / "real-spade-exit").rglob("results_*.json")
    config = json.loads(path.read_text())["config"]
    assert "prefix_token_id" in str(config["model_args"])
    spade = config["spade"]
    assert spade["config"]["threshold"] == float(SMOLLM2_THRESHOLD)
    assert spade["lens"]["kind"] == "lspade" and spade["lens"]["layers"] == list(range(12, 30))
    stats = spade["tasks"]["arc_easy"]
    assert stats["num_layers"] == 30 and stats["requests"] == 4 * 4


def test_demo_refuses_real_tasks_without_a_model(tmp_path):
    with pytest.raises(UserInputError, match="add --model"):
        demo.run(demo.DemoConfig(out=tmp_path, data_dir=DATA))
    with pytest.raises(UserInputError, match="is not a directory"):
        demo.run(demo.DemoConfig(out=tmp_path, data_dir=tmp_path / "none", model="x"))


def test_a_failed_lm_eval_run_ends_the_demo_with_one_line(tmp_path):
    """lm_eval prints its own error; the demo adds one line naming the run, no traceback."""
    failing = demo.Run("real-hf", "spade-exit", f"pretrained={tmp_path / 'none'}", ["arc_easy"])
    with pytest.raises(UserInputError, match=r"the real-hf run of lm_eval failed \(status"):
        demo.lm_eval(failing, tmp_path)


def test_a_ready_lens_sets_where_the_checks_begin(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"layers": [12, 13, 29]}))
    assert demo._first_lens_layer(tmp_path) == 12
    assert demo._first_lens_layer(tmp_path / "missing") is None
