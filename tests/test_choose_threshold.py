"""`lm-eval-spade choose-threshold` end to end on the shipped calibration model.

It chooses on the validation split; the printed `--model_args` then run through the real
`lm_eval` command on the test split give the exits, accuracy and compute that the JSON
predicted for that threshold there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from lmutil import DATA, run_cli

from lm_eval_spade import calibration
from lm_eval_spade.calibration.task import TaskSpec, prompt, split_items
from lm_eval_spade.cli import main
from lm_eval_spade.files import CHOICE, MARKER
from lm_eval_spade.paths import portable
from lm_eval_spade.tasks import offline

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)

TASK = calibration.TASK
LIMIT = "120"


@pytest.fixture(scope="module")
def chosen(tmp_path_factory) -> tuple[Path, str, dict]:
    out = tmp_path_factory.mktemp("choose")
    printed = run_cli(
        "choose-threshold", "--model", calibration.NAME, "--lens", calibration.NAME,
        "--task", TASK, "--limit", LIMIT, "--max-drop", "0.05", "--eval-tasks", TASK,
        "--eval-limit", LIMIT, "--out", str(out),
    )  # fmt: skip
    return out, printed, json.loads((out / "choose_threshold.json").read_text())


def test_choice_is_the_last_candidate_to_pass_in_order(chosen):
    _, printed, data = chosen
    candidates = data["candidates"]
    assert data["calibration"]["questions"] == 120
    assert [c["threshold"] for c in candidates][-1] == "inf"
    first_failure = next(i for i, c in enumerate(candidates) if c["p_value"] > 0.1)
    assert all(c["certified"] for c in candidates[:first_failure])
    assert not any(c["certified"] for c in candidates[first_failure:])
    best = candidates[first_failure - 1]
    assert data["chosen"]["threshold"] == best["threshold"]
    assert data["chosen"]["disagreements"] <= 2  # P(Binomial(120, 0.05) <= 2) = 0.058
    assert data["chosen"]["mean_exit_layer"] < 12  # it does exit early
    # accuracy counted here is lm-eval's own at full depth
    full = data["lm_eval_full_depth"][TASK]["acc,none"]
    assert best["accuracy"] + best["accuracy_drop"] == pytest.approx(full)
    assert f"chosen threshold: {best['threshold']:g} nats" in printed
    assert "| certified" in printed and "fails: stop" in printed


@pytest.mark.slow
def test_printed_model_args_give_the_predicted_test_results(chosen, tmp_path):
    out, printed, data = chosen
    (model_args,) = re.findall(
        rf"lm_eval --model spade-exit --model_args (\S+) --device cpu --tasks {TASK}", printed
    )
    assert portable(model_args) == data["chosen"]["model_args"]  # no path of this machine
    assert data["chosen"]["model_args_fragment"] in model_args
    lm_eval = str(Path(sys.executable).parent / "lm_eval")
    done = subprocess.run(
        [
            lm_eval, "--model", "spade-exit", "--model_args", model_args, "--device", "cpu",
            "--tasks", TASK,
            "--limit", LIMIT, "--batch_size", "16", "--output_path", str(tmp_path),
        ],
        env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.rglob("results_*.json")
    real = json.loads(path.read_text())
    predicted = data["evaluation"][TASK]["chosen"]
    stats = real["config"]["spade"]["tasks"][TASK]
    assert real["results"][TASK]["acc,none"] == pytest.approx(predicted["accuracy"])
    assert stats["exit_layer_histogram"] == predicted["exit_layer_histogram"]
    assert stats["mean_exit_layer"] == pytest.approx(predicted["mean_exit_layer"])
    assert stats["compute_fraction"] == pytest.approx(predicted["compute_fraction"])
    # the chosen setting's results file is that run too, and report marks it
    written = json.loads((out / "results" / "chosen.json").read_text())
    assert (
        written["config"]["spade"]["tasks"][TASK]["exit_layer_histogram"]
        == (stats["exit_layer_histogram"])
    )
    assert written["sweep"]["chosen"] is True
    report = run_cli("report", str(out), "--out", str(tmp_path / "report"))
    assert "chosen (δ=0.05, ε=0.1" in report
    assert (tmp_path / "report" / "thresholds.png").stat().st_size > 10_000


def test_too_few_prompts_say_how_many_would_do(tmp_path):
    """A prompt file (no labels): next-token agreement, and 60 prompts cannot certify
    δ=0.01 at ε=0.1 (that needs 230 even without a disagreement)."""
    items = split_items(TaskSpec(), "validation")[:60]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": prompt(d)}) + "\n" for d in items))
    printed = run_cli(
        "choose-threshold", "--model", calibration.NAME, "--lens", calibration.NAME,
        "--prompts", str(prompts), "--thresholds", "0.01", "0.1", "1", "inf",
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    data = json.loads((tmp_path / "out" / "choose_threshold.json").read_text())
    assert data["chosen"] is None and data["calibration"]["questions"] == 60
    assert "accuracy" not in data["candidates"][0]
    assert "No threshold could be certified with 60 calibration questions" in printed
    assert "at least 230 even with no disagreement" in printed
    assert not (tmp_path / "out" / "results").exists()
    # an output like every command's: marked, and not replaced by a rerun unless asked
    marker = json.loads((tmp_path / "out" / MARKER).read_text())
    assert marker["kind"] == CHOICE
    with pytest.raises(SystemExit) as rerun:
        main(["choose-threshold", "--model", calibration.NAME, "--prompts", str(prompts),
              "--lens", calibration.NAME, "--out", str(tmp_path / "out")])  # fmt: skip
    assert "already holds a threshold choice from an earlier run" in str(rerun.value)
    assert json.loads((tmp_path / "out" / MARKER).read_text()) == marker


def _error(*argv: str) -> str:
    with pytest.raises(SystemExit) as raised:
        main(["choose-threshold", "--model", calibration.NAME, "--out", "unused", *argv])
    return str(raised.value)


def test_bad_input_gives_one_line_errors(tmp_path):
    lens = ("--lens", calibration.NAME)
    assert "--max-drop 1.5 must lie strictly between 0 and 1" in _error(
        "--task", TASK, *lens, "--max-drop", "1.5"
    )
    assert "--task NAME or --prompts FILE" in _error(*lens)
    assert f"both --task {TASK} and --prompts p.txt were given" in _error(
        "--task", TASK, "--prompts", "p.txt", *lens
    )
    assert "needs a confidence source" in _error("--task", TASK)
    assert "drop --lens" in _error("--task", TASK, *lens, "--confidence-decoder", "logit_lens")
    assert "needs a tuned_lens lens" in _error(
        "--task", TASK, *lens, "--confidence-decoder", "tuned_lens"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(offline.ENV, str(DATA))
        assert "task boolq_spade has no test split (it has: train, validation)" in _error(
            "--task", "boolq_spade", "--split", "test", "--confidence-decoder", "logit_lens"
        )
    assert not Path("unused").exists()
