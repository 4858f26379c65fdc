"""The README's main job: `lm-eval-spade demo`, end to end through the real lm_eval."""

from __future__ import annotations

import pytest

from lm_eval_spade import demo


@pytest.mark.slow
def test_demo_runs_hf_and_spade_exit(tmp_path):
    results = demo.run(tmp_path, exit_layers=[3, 6])
    table = demo.summary(results)
    lines = table.splitlines()
    assert lines[2].startswith("| hf | full |")
    assert lines[3].startswith("| spade-exit | 3 |") and lines[4].startswith("| spade-exit | 6 |")
    # At the last layer spade-exit is the full model: same accuracy as hf.
    acc = [r["results"][demo.TASK]["acc,none"] for r in results]
    assert acc[0] == acc[2]
    fraction = results[1]["config"]["spade"]["tasks"][demo.TASK]["compute_fraction"]
    assert 0.5 < fraction < 1.0
