"""Outputs: refused when not ours, replaced only with --overwrite, whole or not at all,
and what a SIGKILL leaves behind (and how the next run cleans it up)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as T
from cliutil import command_env
from lmutil import STORIES

from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.files import (
    CHOICE,
    COMMITTED,
    LENS,
    MARKER,
    REPORT,
    SWEEP,
    OutputError,
    check_output,
    clean_orphans,
    output_kind,
    staged_output,
)
from lm_eval_spade.lens import Lens, LensKind, load_lens, read_lens, save_lens
from lm_eval_spade.lens.checkpoint import is_lens_dir

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)

HOST = __import__("re").sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())


def _dead_pid() -> int:
    """The id of a process that has ended."""
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


@pytest.fixture(scope="module")
def arch():
    return architecture_for(T.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32))


# --- refusing -----------------------------------------------------------------------------
def test_what_may_be_written(tmp_path):
    check_output(tmp_path / "new", LENS)  # nothing there
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", LENS)  # an empty folder holds nothing to lose
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is an existing file"):
        check_output(tmp_path / "file", LENS, overwrite=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(OutputError, match="did not write"):
        check_output(mine, LENS, overwrite=True)
    (mine / MARKER).write_text(json.dumps({"kind": SWEEP}))
    with pytest.raises(OutputError, match="holds a sweep output, not a lens"):
        check_output(mine, LENS, overwrite=True)
    with pytest.raises(OutputError, match="add --overwrite"):
        check_output(mine, SWEEP)
    check_output(mine, SWEEP, overwrite=True)
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(OutputError, match="is an existing file, not a folder"):
        check_output(tmp_path / "link", SWEEP, overwrite=True)


def test_outputs_of_earlier_versions_are_recognised(arch, tmp_path):
    """Lens folders written before the marker existed still count as lenses."""
    old = save_lens(Lens.untrained(arch, LensKind.LSPADE, layers=[1]), tmp_path / "old")
    (old / MARKER).unlink()
    assert output_kind(old) is None and output_kind(old, is_lens_dir) == ""
    with pytest.raises(OutputError, match="add --overwrite"):
        save_lens(Lens.untrained(arch, LensKind.LSPADE), old)
    save_lens(Lens.untrained(arch, LensKind.LSPADE), old, overwrite=True)
    assert read_lens(old).layers == [0, 1, 2, 3, 4] and output_kind(old) == LENS


def test_a_failed_write_changes_nothing(arch, tmp_path):
    out = save_lens(Lens.untrained(arch, LensKind.LSPADE, layers=[1]), tmp_path / "lens")
    with pytest.raises(RuntimeError), staged_output(out, LENS, overwrite=True) as work:
        (work / "half").write_text("x")
        raise RuntimeError("the job failed")
    assert read_lens(out).layers == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens"]


# --- outputs inside outputs -----------------------------------------------------------------
def _output(path: Path, kind: str, parts: tuple[str, ...] = ()) -> Path:
    """An output folder of `kind`, written as a command writes it, with `parts` (outputs
    its own run writes inside it)."""
    with staged_output(path, kind) as work:
        (work / "data.txt").write_text(kind)
        for part in parts:
            with staged_output(work / part, LENS) as inner:
                (inner / "data.txt").write_text("part")
    return path


def test_no_output_inside_another(tmp_path):
    sweep = _output(tmp_path / "sweep", SWEEP)
    for inside in (sweep / "lens", sweep / "results" / "deeper"):
        with pytest.raises(OutputError, match=r"is inside .*sweep, a sweep output"):
            check_output(inside, LENS)
    check_output(sweep / "report", REPORT)  # a sweep's report, in its default place
    with pytest.raises(OutputError, match="is inside"):
        check_output(sweep / "figures", REPORT)
    choice = _output(tmp_path / "choice", CHOICE)
    check_output(choice / "report", REPORT)
    with pytest.raises(OutputError, match=r"is inside .*choice, a threshold choice output"):
        check_output(choice / "report", LENS)
    # outputs of earlier versions (no marker) are found by their layout
    old = tmp_path / "old_sweep"
    old.mkdir()
    (old / "sweep.json").write_text(json.dumps({"kind": "layers", "package_version": "0.0"}))
    with pytest.raises(OutputError, match=r"is inside .*old_sweep, a sweep output"):
        check_output(old / "x" / "y", LENS)


def test_overwrite_never_reaches_into_another_output(tmp_path, caplog):
    # the parts its own run wrote go with it (a transfer sweep's lenses)
    sweep = _output(tmp_path / "sweep", SWEEP, parts=("lenses/a", "lenses/b"))
    assert json.loads((sweep / MARKER).read_text())["parts"] == ["lenses/a", "lenses/b"]
    _output(sweep / "report", REPORT)  # its report, in its place
    check_output(sweep, SWEEP, overwrite=True)
    with (
        caplog.at_level("WARNING", logger="lm_eval_spade.files"),
        staged_output(sweep, SWEEP, overwrite=True) as work,
    ):
        (work / "data.txt").write_text("new")
    assert "removing" in caplog.text and "run `lm-eval-spade report" in caplog.text
    assert sorted(p.name for p in sweep.iterdir()) == [MARKER, "data.txt"]
    # an output another command put inside it is never deleted with it
    lens = _output(tmp_path / "lens", LENS)
    (lens / "inner").mkdir()
    (lens / "inner" / MARKER).write_text(json.dumps({"kind": LENS, "created": "9999"}))
    with pytest.raises(OutputError, match=r"holds .*inner, a lens output of another command"):
        check_output(lens, LENS, overwrite=True)
    assert (lens / "inner" / MARKER).is_file()


def test_an_output_is_put_in_place_whole_even_when_interrupted(tmp_path, monkeypatch):
    """Ctrl-C while the output is renamed into place waits for the renames, then stops."""
    import lm_eval_spade.files as files

    old = _output(tmp_path / "out", SWEEP)
    rename = Path.rename

    def interrupted_rename(self, target):
        done = rename(self, target)
        if ".partial." in self.name:
            os.kill(os.getpid(), signal.SIGINT)  # between the renames
        return done

    monkeypatch.setattr(files.Path, "rename", interrupted_rename)
    before = len(COMMITTED)
    with pytest.raises(KeyboardInterrupt), staged_output(old, SWEEP, overwrite=True) as work:
        (work / "data.txt").write_text("new")
    assert (old / "data.txt").read_text() == "new" and COMMITTED[before:] == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # interrupted while writing: nothing is put in place, nothing is left
    with pytest.raises(KeyboardInterrupt), staged_output(tmp_path / "new", SWEEP):
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- cleaning up after killed runs ----------------------------------------------------------
def _leftover(parent: Path, name: str, state: str, pid: int, host: str = HOST) -> Path:
    suffix = ".0a1b2c3d" if state == "partial" else ""
    folder = parent / f".{name}.{state}.{host}.{pid}{suffix}"
    folder.mkdir()
    (folder / "translators.safetensors").write_text("half")
    return folder


def test_leftovers_of_dead_runs_are_removed_or_restored(tmp_path):
    dead = _dead_pid()
    partial = _leftover(tmp_path, "out", "partial", dead)
    alive = _leftover(tmp_path, "out", "partial", os.getpid())
    elsewhere = _leftover(tmp_path, "out", "partial", dead, host="another_host")
    other = _leftover(tmp_path, "other", "partial", dead)
    replaced = _leftover(tmp_path, "out", "replaced", dead)
    clean_orphans(tmp_path / "out")
    # The killed run never put its output in place: the old one comes back.
    assert (tmp_path / "out" / "translators.safetensors").read_text() == "half"
    assert not partial.exists() and not replaced.exists()
    assert alive.exists() and elsewhere.exists() and other.exists()  # not ours to touch
    # A swap that completed but was killed before deleting the old output.
    replaced = _leftover(tmp_path, "out", "replaced", dead)
    clean_orphans(tmp_path / "out")
    assert not replaced.exists() and (tmp_path / "out").is_dir()


# --- SIGKILL through the real command ------------------------------------------------------
KILL_AT = {
    # the weights are written, the config is being opened
    "saving": "event == 'open' and str(args[0]).endswith('config.json') and '.partial.' in "
    "str(args[0])",
    # the old lens moved aside, the new one not yet in place
    "swapping": "event == 'os.rename' and '.partial.' in str(args[0])",
}


def _train_lens(out: Path, *extra: str, kill_at: str | None = None, steps: int = 2):
    """`lm-eval-spade train-lens` in a subprocess (with an audit hook that SIGKILLs it
    at `kill_at`): the `main` the executable calls."""
    argv = [*_argv(out, steps), *extra]
    hook = ""
    if kill_at:
        hook = (
            "import os, signal\n"
            "def hook(event, args):\n"
            f"    if {KILL_AT[kill_at]}:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "sys.addaudithook(hook)\n"
        )
    code = f"import sys\n{hook}from lm_eval_spade.cli import main\nmain({argv!r})\n"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=command_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _lens_dir(tmp_path: Path, arch) -> tuple[Path, torch.Tensor]:
    (tmp_path / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"Once upon a time {i}"}) for i in range(8)) + "\n"
    )
    lens = Lens.untrained(arch, LensKind.LSPADE, layers=[1, 2])
    with torch.no_grad():
        lens.translators.maps["1"].weight.fill_(0.01)
    out = save_lens(lens, tmp_path / "lens")
    return out, lens.translators.maps["1"].weight.clone()


def _old_lens_intact(out: Path, weight: torch.Tensor, arch) -> None:
    lens = load_lens(out, arch)
    assert lens.layers == [1, 2] and torch.equal(lens.translators.maps["1"].weight, weight)


@pytest.mark.slow
def test_sigkill_while_training_leaves_the_old_lens(tmp_path, arch):
    out, weight = _lens_dir(tmp_path, arch)
    proc = _train_lens(out, "--overwrite", steps=10**6)
    deadline = time.time() + 300
    progress = ""
    while "train lspade" not in progress and time.time() < deadline:
        progress += os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "train lspade" in progress
    _old_lens_intact(out, weight, arch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens", "prompts.jsonl"]


def _killed(tmp_path: Path, arch, at: str) -> tuple[Path, torch.Tensor]:
    """An earlier lens, and a `train-lens --overwrite` into it SIGKILLed `at`."""
    out, weight = _lens_dir(tmp_path, arch)
    proc = _train_lens(out, "--overwrite", kill_at=at)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    return out, weight


@pytest.mark.slow
def test_sigkill_while_saving_then_the_next_run(tmp_path, arch):
    out, weight = _killed(tmp_path, arch, "saving")
    _old_lens_intact(out, weight, arch)
    (partial,) = [p for p in tmp_path.iterdir() if ".partial." in p.name]
    # Without --overwrite the next run cleans up and refuses; the old lens stays.
    done = subprocess.run(
        [str(Path(sys.executable).parent / "lm-eval-spade"), *_argv(out)],
        env=command_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and "add --overwrite" in done.stderr
    assert "left behind by a killed run" in done.stderr and not partial.exists()
    _old_lens_intact(out, weight, arch)


@pytest.mark.slow
def test_sigkill_between_the_renames_then_the_next_run(tmp_path, arch):
    out, _ = _killed(tmp_path, arch, "swapping")
    assert not out.exists()  # the old lens is aside, the new one not in place
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(aside) == 2 and any(".replaced." in n for n in aside)
    # The next run puts the old lens back, clears the unfinished one, then does its job.
    proc = _train_lens(out, "--overwrite")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "restored" in err and "left behind by a killed run" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens", "prompts.jsonl"]
    assert read_lens(out).layers == [0, 1, 2, 3, 4]


def _argv(out: Path, steps: int = 2) -> list[str]:
    return [
        "train-lens", "--model", str(STORIES), "--kind", "lspade", "--data",
        str(out.parent / "prompts.jsonl"), "--steps", str(steps), "--batch-size", "2",
        "--out", str(out),
    ]  # fmt: skip
