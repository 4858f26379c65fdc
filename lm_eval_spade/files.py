"""Outputs: one policy for every command that writes (`--out` of train-lens, export-lens,
finetune, calibrate, demo, the sweeps, choose-threshold and report) through
`staged_output`:

- Before any work, `check_output` refuses an `--out` that is a file, a folder this
  package did not write, one of another kind, or one of ours without `overwrite`. An
  empty folder holds nothing to lose and is accepted. Ours means: it carries `MARKER`
  (written into every output), or, for outputs of earlier versions, it has the layout of
  its kind (`LAYOUTS`, or the caller's `recognise`).
- No output inside another: an `--out` inside a folder that is an output of this package
  is refused (it would be deleted or mixed when that one is replaced). The one exception
  is a report in the folder `report` of the sweep or threshold choice it reports on, its
  default place (`ATTACHED`).
- No `--overwrite` that reaches into a nested output: replacing an output that holds
  another output inside it (one its own run did not write, as its `parts`) is refused. An
  attached report goes with the output it describes (with a log line).
- The output is written into a sibling `.NAME.partial.HOST.PID.RAND` folder, then renamed
  into place. Replacing an old output moves it to `.NAME.replaced.HOST.PID` first and
  deletes it only once the new one is in place. Ctrl-C during the renames waits for them.
- A run killed part-way leaves one of those folders behind. The next command that
  checks the same `--out` cleans them up, for processes of this host that are gone: a
  `.partial` folder is deleted; a `.replaced` folder is renamed back when nothing took
  its place (the killed run never finished), else deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lm_eval_spade import __version__
from lm_eval_spade.errors import UserInputError

logger = logging.getLogger(__name__)

MARKER = ".lm-eval-spade-output.json"

#: What kind of folder each command writes (the marker's `kind`).
LENS, TUNED_LENS_EXPORT, ADAPTER, SWEEP = "lens", "tuned-lens export", "LoRA adapter", "sweep"
REPORT, CALIBRATION, DEMO = "report", "calibration", "demo"
CHOICE = "threshold choice"

#: The folder name a report may have inside the output it reports on (its default place).
ATTACHED = "report"

#: Outputs of this process put in place, in order (what an interrupt leaves written).
COMMITTED: list[Path] = []


class OutputError(UserInputError):
    """An output path this command may not write."""


# --- what is ours ---------------------------------------------------------------------------
def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _field(path: Path, key: str) -> Any:
    data = _json(path)
    return data.get(key) if isinstance(data, dict) else None


def _has(path: Path, key: str) -> bool:
    data = _json(path)
    return isinstance(data, dict) and key in data


def _report_layout(path: Path) -> bool:
    """Only the CSV, markdown and PNG files `report` writes (and at least one)."""
    found = False
    for p in path.iterdir():
        if not (
            p.is_file()
            and p.suffix in {".csv", ".md", ".png"}
            and p.name.startswith(("layers", "thresholds", "transfer", "leaderboard"))
        ):
            return False
        found = True
    return found


#: How outputs of earlier versions (before the marker) are recognised, by kind: the
#: files each command has always written. (A tuned-lens export has none of its own:
#: tuned-lens writes the same files.)
LAYOUTS: dict[str, Callable[[Path], bool]] = {
    LENS: lambda p: _field(p / "config.json", "format") == "lm-eval-spade-lens",
    SWEEP: lambda p: _has(p / "sweep.json", "package_version"),
    ADAPTER: lambda p: _has(p / "finetune.json", "package_version"),
    CHOICE: lambda p: _field(p / "choose_threshold.json", "command") == "choose-threshold",
    CALIBRATION: lambda p: (
        (p / "model" / "training.json").is_file()
        and _field(p / "lspade" / "config.json", "format") == "lm-eval-spade-lens"
    ),
    REPORT: _report_layout,
}


def _marker(path: Path) -> dict[str, Any] | None:
    data = _json(path / MARKER) if (path / MARKER).is_file() else None
    return data if isinstance(data, dict) and isinstance(data.get("kind"), str) else None


def output_kind(path: Path, recognise: Callable[[Path], bool] | None = None) -> str | None:
    """The kind of output folder `path` holds if this package wrote it, else None.

    `recognise(path)` identifies outputs of earlier versions (written before the marker);
    they count as the caller's kind.
    """
    marker = _marker(path)
    if marker is not None:
        return marker["kind"]
    return "" if recognise is not None and recognise(path) else None


def found_kind(path: Path) -> str | None:
    """The kind of output `path` is, by its marker or the layout of any kind (`LAYOUTS`),
    else None."""
    try:
        if not path.is_dir() or path.is_symlink():
            return None
        marker = _marker(path)
        if marker is not None:
            return marker["kind"]
        return next((kind for kind, layout in LAYOUTS.items() if layout(path)), None)
    except OSError:
        return None


def _shown(path: Path) -> str:
    """`path` as the user would write it: relative to the working folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _nested(path: Path) -> Iterator[tuple[Path, str]]:
    """Every output inside `path` (not descending into them), with its kind."""
    for root, dirs, _ in os.walk(path):
        keep = []
        for name in sorted(dirs):
            sub = Path(root) / name
            kind = found_kind(sub)
            if kind is not None:
                yield sub, kind
            elif not sub.is_symlink():
                keep.append(name)
        dirs[:] = keep


def _parts(path: Path, marker: dict[str, Any] | None) -> Callable[[Path, str], bool]:
    """Which outputs inside `path` its own run wrote: those its marker lists as `parts`;
    for markers of earlier versions, those made before it (a later one was put there by
    another command), and for outputs without a marker, those without one too."""
    if marker is not None and isinstance(marker.get("parts"), list):
        listed = {str(p) for p in marker["parts"]}
        return lambda sub, _: sub.relative_to(path).as_posix() in listed
    if marker is not None:
        made = str(marker.get("created", ""))
        return lambda sub, _: str((_marker(sub) or {}).get("created", "")) <= made
    return lambda sub, _: _marker(sub) is None


def _attached(path: Path, kind: str, sub: Path, sub_kind: str) -> bool:
    """A report in its default place inside the sweep or threshold choice it reports on."""
    return sub_kind == REPORT and kind in (SWEEP, CHOICE) and sub == path / ATTACHED


# --- refusing ---------------------------------------------------------------------------------
def check_not_inside(path: Path, kind: str, what: str = "--out ") -> None:
    """Refuse a path inside an output of this package (but a report in its place)."""
    path = Path(path)
    target = path.resolve()
    for parent in target.parents:
        found = found_kind(parent)
        if found is None:
            continue
        if kind == REPORT and target == parent / ATTACHED and found in (SWEEP, CHOICE):
            continue
        raise OutputError(
            f"{what}{path} is inside {_shown(parent)}, a {found} output of lm-eval-spade; "
            "an output inside another is deleted or mixed with it when that one is "
            "replaced, so nothing was written: choose a folder outside it."
        )


def _check_nested(path: Path, kind: str) -> None:
    """Refuse to replace an output that holds another command's output inside it."""
    own = _parts(path, _marker(path))
    for sub, sub_kind in _nested(path):
        if _attached(path, kind, sub, sub_kind) or own(sub, sub_kind):
            continue
        raise OutputError(
            f"--out {path} holds {_shown(sub.resolve())}, a {sub_kind} output of another "
            f"command, which --overwrite would delete with the old {kind}; nothing was "
            "changed: move it out of the folder (or delete it) first."
        )


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _leftovers(path: Path) -> Iterator[tuple[Path, str, int]]:
    """`(folder, state, pid)` for every staging folder of `path` left by this host."""
    if not path.parent.is_dir():
        return
    pattern = re.compile(
        rf"^\.{re.escape(path.name)}\.(partial|replaced)\.{_host()}\.(\d+)(\.[0-9a-f]+)?$"
    )
    for entry in path.parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            yield entry, match.group(1), int(match.group(2))


def clean_orphans(path: Path) -> None:
    """Put right what killed runs into `path` left behind (see the module doc)."""
    path = Path(path)
    found = sorted(_leftovers(path), key=lambda item: item[1] != "replaced")
    for entry, state, pid in found:
        if pid == os.getpid() or _alive(pid):
            continue
        if state == "replaced" and not path.exists():
            entry.rename(path)
            logger.warning(
                "restored %s: a run (pid %d) that was replacing it was killed first", path, pid
            )
        else:
            shutil.rmtree(entry, ignore_errors=True)
            logger.warning("removed %s, left behind by a killed run (pid %d)", entry, pid)


def check_output(
    path: Path,
    kind: str,
    overwrite: bool = False,
    recognise: Callable[[Path], bool] | None = None,
) -> None:
    """Refuse, before any work starts, an output path this command may not write."""
    path = Path(path)
    clean_orphans(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(
            f"--out {path} is an existing file, not a folder; this command writes a folder "
            "and replaces nothing it did not write: choose another path."
        )
    check_not_inside(path, kind)
    if not path.exists() or not any(path.iterdir()):
        return
    found = output_kind(path, recognise or LAYOUTS.get(kind))
    if found is None:
        raise OutputError(
            f"--out {path} is a folder that lm-eval-spade did not write (it has no {MARKER}); "
            "nothing in it was changed: choose a new or empty folder."
        )
    found = found or kind
    if found != kind:
        raise OutputError(
            f"--out {path} holds a {found} output, not a {kind}; nothing was changed: choose "
            "another folder."
        )
    if not overwrite:
        raise OutputError(
            f"--out {path} already holds a {kind} from an earlier run; add --overwrite to "
            "replace it (it is kept until the new one is complete), or choose a new folder."
        )
    _check_nested(path, kind)


# --- writing ----------------------------------------------------------------------------------
def _write_marker(folder: Path, kind: str) -> None:
    record = {
        "kind": kind,
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # outputs this run wrote inside its own (a transfer sweep's lenses, ...)
        "parts": [sub.relative_to(folder).as_posix() for sub, _ in _nested(folder)],
    }
    (folder / MARKER).write_text(json.dumps(record, indent=2) + "\n")


@contextlib.contextmanager
def _interrupts_wait(held: list[int]) -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the block ends, noting it in `held`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, _: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _commit(tmp: Path, path: Path, kind: str) -> None:
    """Put `tmp` at `path`; an existing `path` (checked before) is replaced."""
    if path.exists() and path.is_dir() and any(path.iterdir()):
        report = path / ATTACHED
        if found_kind(report) == REPORT and kind in (SWEEP, CHOICE):
            logger.warning(
                "removing %s with the %s it reports on: it describes the replaced results "
                "(run `lm-eval-spade report %s` again)", report, kind, path,
            )  # fmt: skip
        old = path.with_name(f".{path.name}.replaced.{_host()}.{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        if path.exists():
            path.rmdir()  # empty: nothing to lose
        tmp.rename(path)


@contextlib.contextmanager
def staged_output(
    path: Path,
    kind: str,
    overwrite: bool = False,
    recognise: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Yield a fresh folder to write the output into; it replaces `path` when the block
    ends without an error, and is removed when it raises (Ctrl-C included)."""
    path = Path(path)
    check_output(path, kind, overwrite, recognise)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial.{_host()}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.mkdir()
    held: list[int] = []
    try:
        yield tmp
        check_output(path, kind, overwrite, recognise)  # nothing appeared meanwhile
        _write_marker(tmp, kind)
        with _interrupts_wait(held):
            _commit(tmp, path, kind)
            COMMITTED.append(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if held:  # Ctrl-C while the output was put in place: it is complete, then stop
        raise KeyboardInterrupt


def write_atomically(
    path: Path,
    write: Callable[[Path], None],
    kind: str,
    overwrite: bool = False,
    recognise: Callable[[Path], bool] | None = None,
) -> Path:
    """Call `write(folder)`, then put that folder at `path` (see `staged_output`)."""
    with staged_output(Path(path), kind, overwrite, recognise) as tmp:
        write(tmp)
    return Path(path)


def check_output_file(path: Path, recognise: Callable[[Path], bool], key: str) -> None:
    """Refuse to replace a file this package did not write (`recognise` says which are
    ours: those are replaced, with a log line), or one inside an output folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{key}{path} is a folder; give the path of a file to write.")
    check_not_inside(path, "file", key)
    if not path.exists() or path.stat().st_size == 0:
        return
    if not recognise(path):
        raise OutputError(
            f"{key}{path} is an existing file that lm-eval-spade did not write; nothing was "
            "changed: choose another file."
        )
    logger.info("replacing %s, written by an earlier run", path)
