"""Portable paths in what this package writes: no file it writes records where the machine
that made it keeps things.

`portable_path` turns one absolute path into a portable name, by the first rule that fits:

1. this package's own task configs (`task_dir()`) -> `task_configs/NAME.yaml`;
2. inside an installed package (a `site-packages` or `dist-packages` folder) -> the part
   after it, `PACKAGE/...` (`lm_eval/tasks/arc/arc_easy.yaml`);
3. inside a root (the current working directory, then the source tree this package runs
   from) -> relative to it (`.cache/models/NAME`, `results/smollm2/adapter-arc`);
4. a Hugging Face hub cache snapshot (`.../models--ORG--NAME/snapshots/HASH`) -> `ORG/NAME`;
5. anywhere else -> its last part: the folder (or file) name, which names a model folder.

A relative path, a hub id (`HuggingFaceTB/SmolLM2-135M`) or any other string is kept as
given. `portable` applies this to every string of a JSON-like object: a string that is a
path, and each absolute path inside a string (the values of `key=value,...` model_args
such as `pretrained=/abs/model,peft=/abs/adapter`, the paths of a command line). Keys are
kept. The numbers are untouched.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

#: Folders that hold installed packages (rule 2).
PACKAGE_DIRS = ("site-packages", "dist-packages")

#: An absolute path inside a string: it starts the string or follows a space, `=`, `:`,
#: `,`, a bracket or a quote, and has at least two parts (`/a/b`). URLs (`https://`) are
#: not paths: their `//` does not match.
PATH_IN_TEXT = re.compile(
    r"(?:^|(?<=[\s=:,(\[\"']))/(?!/)[A-Za-z0-9._~+@-]+(?:/[A-Za-z0-9._~+@-]+)+/?"
)

#: A string that is one absolute path (one part is enough: `/model`).
WHOLE_PATH = re.compile(r"/(?!/)[A-Za-z0-9._~+@-]+(?:/[A-Za-z0-9._~+@-]+)*/?")

_HUB_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+)--([^/]+)/snapshots/[^/]+/?$")


def source_root() -> Path:
    """The top of the source tree this package runs from (its parent folder)."""
    return Path(__file__).resolve().parents[1]


def default_roots() -> list[Path]:
    """The current working directory and this package's source tree (not `/`: relative to
    it, a path would only lose its leading slash)."""
    return [root for root in (Path.cwd(), source_root()) if root.parent != root]


def _inside(path: PurePosixPath, root: Path | PurePath) -> str | None:
    """`path` relative to `root` (as given or resolved), or None when outside it."""
    candidates = {PurePosixPath(Path(root).as_posix())}
    with contextlib.suppress(OSError):
        candidates.add(PurePosixPath(Path(root).resolve().as_posix()))
    for base in sorted(candidates, key=lambda p: -len(p.parts)):
        if path == base:
            return "."
        if path.is_relative_to(base):
            return path.relative_to(base).as_posix()
    return None


def portable_path(value: str | PurePath, roots: Iterable[Path | str] | None = None) -> str:
    """`value` as a portable path (module docstring); relative paths and other strings are
    returned as given. `roots` are the folders whose insides become relative paths
    (default: the current working directory and this package's source tree)."""
    text = value.as_posix() if isinstance(value, PurePath) else str(value)
    if not text.startswith("/") or text.startswith("//"):
        return text
    path = PurePosixPath(os.path.normpath(text))
    from lm_eval_spade.tasks.configs import task_dir

    try:
        own_tasks = [task_dir()]
    except FileNotFoundError:
        own_tasks = []
    for tasks in own_tasks:
        inside = _inside(path, tasks)
        if inside is not None:
            return "task_configs" if inside == "." else f"task_configs/{inside}"
    parts = path.parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in PACKAGE_DIRS and i + 1 < len(parts):
            return PurePosixPath(*parts[i + 1 :]).as_posix()
    for root in default_roots() if roots is None else [Path(r) for r in roots]:
        inside = _inside(path, root)
        if inside is not None:
            return inside
    hub = _HUB_SNAPSHOT.search(path.as_posix())
    if hub:
        return f"{hub.group(1)}/{hub.group(2)}"
    return path.name or text


def portable_text(text: str, roots: Iterable[Path | str] | None = None) -> str:
    """`text` with every absolute path in it made portable: the whole string when it is one
    path, else each path `PATH_IN_TEXT` finds in it."""
    if WHOLE_PATH.fullmatch(text):
        return portable_path(text, roots)
    roots = None if roots is None else list(roots)
    return PATH_IN_TEXT.sub(lambda m: portable_path(m.group(0), roots), text)


def portable(data: Any, roots: Iterable[Path | str] | None = None) -> Any:
    """A copy of a JSON-like object with its strings' absolute paths made portable
    (dict keys and non-string values kept; paths given as `PurePath` become strings)."""
    roots = None if roots is None else list(roots)
    if isinstance(data, str):
        return portable_text(data, roots)
    if isinstance(data, PurePath):
        return portable_text(data.as_posix(), roots)
    if isinstance(data, Mapping):
        return {key: portable(value, roots) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [portable(value, roots) for value in data]
    return data


def make_file_portable(path: Path) -> bool:
    """Rewrite a text file another library wrote (peft's `adapter_config.json` and
    `README.md`) with its absolute paths made portable, keeping its formatting; whether
    it changed."""
    text = path.read_text(encoding="utf-8")
    new = portable_text(text)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text
