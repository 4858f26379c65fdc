"""Every command of the README is run here, or by the test named for it.

The README's shell commands are read from its ```bash blocks (and its Python example
from the ```python block). `PLAN` says, for each, how it is covered: run here for real
(`Run`: with `MODEL` the stories260K model, and extra arguments such as a small `--limit`
so it stays cheap), or run by another test (`ByTest`: that test must exist and its file
must use the command's subcommand and every one of its options). A README command that
no entry covers, or an entry that no longer matches the README, fails the first test.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from lmutil import DATA, GENERATION_YAML, REPO, SHARED, STORIES
from test_lm_eval_cli import STORY_DOCS

from lm_eval_spade.tasks import offline

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)

README = REPO / "README.md"


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def readme_commands() -> list[str]:
    """Each shell command of the README: continuation lines joined, comments dropped."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(shlex.split(line, comments=True))
            if line:
                commands.append(line)
    return commands


@dataclass
class Run:
    """Run here, in order, with `extra` arguments appended; `expect` must be printed."""

    extra: list[str] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)
    as_written: bool = False  # a real subprocess from the repository root, unchanged


@dataclass
class ByTest:
    """Run by `test` in `file`, which must use the command's words and options, and
    `mentions` (e.g. the exact task list)."""

    file: str
    test: str
    mentions: list[str] = field(default_factory=list)


LIMIT = ["--limit", "2"]
LM_EVAL_ARC = "lm_eval --model spade-exit --tasks arc_easy --model_args pretrained=MODEL,"
FIXED_EXIT = LM_EVAL_ARC + "exit_layer=3,decoder=spade"
LENS_DECODER = LM_EVAL_ARC + "exit_layer=3,decoder=lspade,lens=lenses/arc-lspade"
SMALL_TRAINING = ["--limit", "24", "--steps", "2", "--batch-size", "4"]

SWEEPS = "tests/test_sweeps.py"
KL_TABLE_LAST_ROW = ["|       4 |"]  # the layer column, as integers

#: README command prefix -> how it is covered, in the order the runs happen.
PLAN: dict[str, Run | ByTest] = {
    "bash scripts/setup.sh && .venv/bin/python -m pytest -q": ByTest(
        "tests/test_readme.py", "test_setup_script_is_valid_bash"
    ),
    "bash scripts/setup.sh && .venv/bin/lm-eval-spade demo --data-dir ../shared/data --model "
    "../shared/models/stories260K": ByTest(
        "tests/test_demo.py", "test_demo_command_runs_spade_exit_on_calibration_and_real_tasks"
    ),
    "bash scripts/setup.sh && .venv/bin/lm-eval-spade demo --data-dir ../shared/data --model "
    "$(.venv/bin/python tests/realmodels.py)": ByTest(
        "tests/test_demo.py",
        "test_smollm2_main_job_runs_hf_and_spade_exit_with_the_committed_adapter_and_lens",
        mentions=["0.0251", "adapter-arc", "lens-arc-lspade", "realmodels"],
    ),
    ".venv/bin/lm_eval --model spade-exit --device cpu": Run(
        as_written=True, expect=["|spade_calibration|    2400|11.70 of 12 ", "|↑  | 0.91|"]
    ),
    FIXED_EXIT: Run(
        LIMIT, ["fixed exit at layer 3 of 5, decoded with spade", "|arc_easy|       8|3.00 of 5"]
    ),
    "lm-eval-spade train-lens --model MODEL --kind lspade": Run(SMALL_TRAINING, KL_TABLE_LAST_ROW),
    "lm-eval-spade train-lens --model MODEL --kind tuned": Run(SMALL_TRAINING, KL_TABLE_LAST_ROW),
    LENS_DECODER: Run(LIMIT, ["fixed exit at layer 3 of 5, decoded with lspade"]),
    "lm-eval-spade export-lens": Run(expect=["(tuned-lens format)"]),
    "lm_eval --model spade-exit --tasks arc_easy --batch_size 16": Run(
        LIMIT, ["adaptive exits (entropy of lspade <= 0.5 nats), decoded with spade"]
    ),
    "lm-eval-spade sweep layers": ByTest(SWEEPS, "test_layer_sweep_equals_fixed_layer_runs"),
    "lm-eval-spade sweep thresholds": ByTest(SWEEPS, "test_threshold_sweep_equals_spade_exit_runs"),
    "lm-eval-spade sweep transfer": Run(
        [*LIMIT, "--lens-steps", "2", "--train-limit", "8", "--no-full-depth-timing"],
        ["lm-eval-spade report runs/transfer"],
    ),
    "lm-eval-spade report": ByTest(SWEEPS, "test_report_renders_tables_and_figures"),
    "lm_eval --model spade-exit --tasks GENERATIVE_TASK": Run(LIMIT, [" tokens "]),
    "LM_EVAL_SPADE_DATA_DIR=../shared/data lm_eval": ByTest(
        "tests/test_lm_eval_output.py",
        "test_lm_eval_prints_the_exit_table_and_logs_exits",
        mentions=["arc_easy,boolq,headqa_en", "exit_layer=3"],
    ),
    "LM_EVAL_SPADE_DATA_DIR=../shared/data lm-eval-spade finetune": Run(
        SMALL_TRAINING, ["adapter saved to adapters/arc"]
    ),
    "lm_eval --model spade-exit --tasks arc_easy_spade": Run(
        LIMIT, ["|arc_easy_spade|", "3.00 of"]
    ),
}


def _covering(command: str) -> list[str]:
    return [prefix for prefix in PLAN if command.startswith(prefix)]


def test_every_readme_command_is_covered_once_and_every_entry_is_in_the_readme():
    commands = readme_commands()
    assert len(commands) >= 15
    for command in commands:
        assert len(_covering(command)) == 1, (
            f"README command covered by {_covering(command)}: {command}"
        )
    for prefix in PLAN:
        assert any(c.startswith(prefix) for c in commands), f"not in the README: {prefix}"
    assert len(readme_blocks("python")) == 1


def test_commands_run_by_other_tests_are_the_same_commands():
    for prefix, how in PLAN.items():
        if not isinstance(how, ByTest):
            continue
        source = (REPO / how.file).read_text()
        assert f"def {how.test}(" in source, how
        (command,) = [c for c in readme_commands() if c.startswith(prefix)]
        words = shlex.split(command.split("&&")[-1])
        program = next(i for i, w in enumerate(words) if "=" not in w)
        # The subcommand words (demo; sweep layers) and every option the README uses.
        needed = [
            w
            for w in words[program + 1 :]
            if w.startswith("--") or (w.isalpha() and not w.isupper())
        ]
        for word in [*needed, *how.mentions]:
            assert word in source, f"{how.file} does not use {word!r} of: {command}"


def test_setup_script_is_valid_bash():
    """`scripts/setup.sh` made the environment this suite runs in; here: it parses."""
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "setup.sh")]).returncode == 0


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    """`lm_eval` configures its loggers (and ours) for good; later tests in this process
    must find them as they were."""
    import lm_eval.utils

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm_eval_spade")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    configured = lm_eval.utils._LOGGING_CONFIGURED
    try:
        yield
    finally:
        for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            lg.handlers, lg.level, lg.propagate = handlers, level, propagate
        lm_eval.utils._LOGGING_CONFIGURED = configured


def _run_in_process(words: list[str]) -> str:
    from lm_eval.__main__ import cli_evaluate

    from lm_eval_spade.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), _logging_restored():
        if words[0] == "lm_eval":
            argv = sys.argv
            sys.argv = words
            try:
                cli_evaluate()
            finally:
                sys.argv = argv
        else:
            main(words[1:])
    return out.getvalue()


@pytest.fixture(scope="module")
def one_task_index():
    """lm-eval indexes every task folder for each TaskManager (seconds for its own
    folder, and each command here makes several); a folder's index does not change
    during the test, so each is built once and merged as lm-eval merges them."""
    from lm_eval.tasks._index import TaskIndex

    built: dict[str, dict] = {}
    build = TaskIndex.build

    def build_once(paths, *args, **kwargs):
        index = {}
        for root in paths:
            if str(root) not in built:
                built[str(root)] = build([root], *args, **kwargs)
            index.update(built[str(root)])  # later folders override earlier ones
        return index

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskIndex, "build", staticmethod(build_once))
        yield


@pytest.mark.slow
def test_readme_commands_run(tmp_path, monkeypatch, one_task_index):
    """The README's commands in order, as a newcomer would type them, in a fresh folder
    next to `shared/` (so `../shared/data` resolves as in the README)."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    stories = tasks / "stories.jsonl"
    stories.write_text(
        "".join(json.dumps({"prompt": p, "ending": e}) + "\n" for p, e in STORY_DOCS)
    )
    (tasks / "story_generation_test.yaml").write_text(GENERATION_YAML.format(data=stories))
    monkeypatch.chdir(work)
    monkeypatch.setenv(offline.ENV, str(DATA))  # commands without it read these files too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    commands = readme_commands()
    for prefix, how in PLAN.items():
        if not isinstance(how, Run):
            continue
        (command,) = [c for c in commands if c.startswith(prefix)]
        if how.as_written:
            done = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-3000:]
            printed = done.stdout
        else:
            words = shlex.split(command.replace("MODEL", str(STORIES)))
            while "=" in words[0]:  # VAR=value before the program
                name, value = words.pop(0).split("=", 1)
                monkeypatch.setenv(name, str((work / value).resolve()))
            words = [w.replace("GENERATIVE_TASK", "story_generation_test") for w in words]
            local = ["--include_path", str(tasks)] if "GENERATIVE_TASK" in command else []
            printed = _run_in_process([*words, *how.extra, *local])
        for text in how.expect:
            assert text in printed, (command, printed[-3000:])

    # What the commands wrote, where the README says.
    assert (work / "lenses" / "arc-tuned-tl" / "params.pt").is_file()
    exits = (work / "exits.jsonl").read_text().splitlines()
    assert len(exits) == 8 and {json.loads(e)["task"] for e in exits} == {"arc_easy"}
    assert len(list((work / "runs" / "transfer" / "results").glob("*.json"))) > 2
    assert json.loads((work / "adapters" / "arc" / "finetune.json").read_text())["examples"] == 24


@pytest.mark.slow
def test_readme_python_example_runs(capsys, one_task_index):
    (code,) = readme_blocks("python")
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert "|spade_calibration|" in printed
    assert "spade-exit: adaptive exits (entropy of lspade <= 0.05 nats)" in printed
