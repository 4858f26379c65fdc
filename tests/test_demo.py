"""The README's main job: `lm-eval-spade demo`, end to end through the real lm_eval."""

from __future__ import annotations

import pytest
from lmutil import DATA, STORIES

from lm_eval_spade import calibration, demo
from lm_eval_spade.errors import UserInputError


@pytest.mark.slow
def test_demo_runs_spade_exit_on_calibration_and_real_tasks(tmp_path):
    config = demo.DemoConfig(out=tmp_path, data_dir=DATA, model=str(STORIES), limit=4)
    results = demo.run(config)
    lines = demo.summary(results).splitlines()
    assert lines[2].startswith(f"| calibration-hf | {calibration.TASK} |")
    assert lines[3].startswith(f"| calibration-spade-exit | {calibration.TASK} |")
    assert [line.split(" | ")[1] for line in lines[4:]] == demo.REAL_TASKS
    (_, full), (_, spade) = results[:2]
    task = calibration.TASK
    assert full["results"][task]["acc,none"] >= 0.9
    stats = spade["config"]["spade"]["tasks"][task]
    assert stats["compute_fraction"] < 1 and stats["requests"] == 4 * 600
    real = results[2][1]["config"]["spade"]["tasks"]
    assert {t: real[t]["num_layers"] for t in demo.REAL_TASKS} == dict.fromkeys(demo.REAL_TASKS, 5)


def test_demo_refuses_real_tasks_without_a_model(tmp_path):
    with pytest.raises(UserInputError, match="add --model"):
        demo.run(demo.DemoConfig(out=tmp_path, data_dir=DATA))
    with pytest.raises(UserInputError, match="is not a directory"):
        demo.run(demo.DemoConfig(out=tmp_path, data_dir=tmp_path / "none", model="x"))
