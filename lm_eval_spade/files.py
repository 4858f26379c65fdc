"""Output folders: refused when they are not ours, written whole or not at all.

Every command that writes a folder (`--out` of train-lens, export-lens, finetune,
calibrate, demo, the sweeps and report) goes through `staged_output`:

- Before any work, `check_output` refuses an `--out` that is a file, a folder this
  package did not write, one of another kind, or one of ours without `overwrite`. An
  empty folder holds nothing to lose and is accepted. Ours means: it carries `MARKER`
  (written into every output), or, for outputs of earlier versions, the caller's
  `recognise` says so.
- The output is written into a sibling `.NAME.partial.HOST.PID.RAND` folder, then renamed
  into place. Replacing an old output moves it to `.NAME.replaced.HOST.PID` first and
  deletes it only once the new one is in place.
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
import socket
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from lm_eval_spade import __version__
from lm_eval_spade.errors import UserInputError

logger = logging.getLogger(__name__)

MARKER = ".lm-eval-spade-output.json"

#: What kind of folder each command writes (the marker's `kind`).
LENS, TUNED_LENS_EXPORT, ADAPTER, SWEEP = "lens", "tuned-lens export", "LoRA adapter", "sweep"
REPORT, CALIBRATION, DEMO = "report", "calibration", "demo"


class OutputError(UserInputError):
    """An output path this command may not write."""


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


def output_kind(path: Path, recognise: Callable[[Path], bool] | None = None) -> str | None:
    """The kind of output folder `path` holds if this package wrote it, else None.

    `recognise(path)` identifies outputs of earlier versions (written before the marker);
    they count as the caller's kind.
    """
    marker = path / MARKER
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text()).get("kind")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
            kind = None
        if isinstance(kind, str):
            return kind
    return "" if recognise is not None and recognise(path) else None


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
    if not path.exists() or not any(path.iterdir()):
        return
    found = output_kind(path, recognise)
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


def _write_marker(folder: Path, kind: str) -> None:
    record = {
        "kind": kind,
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _commit(tmp: Path, path: Path) -> None:
    """Put `tmp` at `path`; an existing `path` (checked before) is replaced."""
    if path.exists() and path.is_dir() and any(path.iterdir()):
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
    ends without an error, and is removed when it raises."""
    path = Path(path)
    check_output(path, kind, overwrite, recognise)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial.{_host()}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        check_output(path, kind, overwrite, recognise)  # nothing appeared meanwhile
        _write_marker(tmp, kind)
        _commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    ours: those are replaced, with a log line)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{key}{path} is a folder; give the path of a file to write.")
    if not path.exists() or path.stat().st_size == 0:
        return
    if not recognise(path):
        raise OutputError(
            f"{key}{path} is an existing file that lm-eval-spade did not write; nothing was "
            "changed: choose another file."
        )
    logger.info("replacing %s, written by an earlier run", path)
