"""The committed tree records no absolute path of a machine (issue 31).

Outputs name models, task files and adapters portably (`lm_eval_spade/paths.py`); the
committed results were cleaned by `benchmarks/scrub_paths.py`. This scans every tracked
text file (binary ones skipped):

- anywhere: a quoted string or a `key=value` value that is an absolute path
  (`"/abs/dir"`, `pretrained=/abs/dir`), except the system paths and the made-up paths
  of tests listed below;
- under `results/` and `docs/`: any `/work/`, `/root/`, `/home/` or `/tmp/` at all.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: `"/a/b` or `key=/a/b`: a quoted string or key=value value that is an absolute path
#: (`"$tmp"/x` in a shell script is not: the quote closes a variable).
ABSOLUTE = re.compile(r"(?:(?<![\w$}\"])\"|(?<=[\w-])=)(/(?!/)[\w.~+@-]+(?:/[\w.~+@-]+)+)")
#: A machine's own folders, anywhere in a path (not `runs/tmp/`: a relative path).
MACHINE = re.compile(r"(?<![\w.~-])/(?:work|root|home|tmp)/")
STRICT = ("results/", "docs/")

#: Absolute paths that are the same on every machine.
SYSTEM = ("/dev/", "/proc/", "/sys/", "/usr/", "/bin/", "/etc/")
#: Made-up absolute paths given on purpose (a model that does not exist, examples).
MADE_UP = {
    "tests/test_bad_inputs.py": ("/no/",),
    "tests/test_sweeps.py": ("/m/", "/a/"),
    "lm_eval_spade/paths.py": ("/abs/",),  # its docstring's example
    "tests/test_paths.py": ("/",),  # the rule's own cases
    "tests/test_repository.py": ("/",),  # this file's examples
}


def tracked_text_files() -> list[tuple[str, str]]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout (or no git): {err}")
    files = []
    for name in filter(None, listed.split("\0")):
        try:
            data = (ROOT / name).read_bytes()
        except OSError:  # deleted in the work tree, or not a file (a submodule)
            continue
        if b"\0" in data[:8192]:
            continue
        try:
            files.append((name, data.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return files


def problems(name: str, text: str) -> list[str]:
    allowed = SYSTEM + MADE_UP.get(name, ())
    found = [m.group(1) for m in ABSOLUTE.finditer(text) if not m.group(1).startswith(allowed)]
    if name.startswith(STRICT):
        found += [text[m.start() : m.start() + 60].split()[0] for m in MACHINE.finditer(text)]
    return found


def test_the_checks_catch_what_they_are_for():
    assert problems("results/x.json", '"model": "/data/models/m"') == ["/data/models/m"]
    assert problems("x.json", '"pretrained=/srv/m,peft=/srv/a"') == ["/srv/m", "/srv/a"]
    assert problems("docs/a.md", "see /tmp/x.txt") == ["/tmp/x.txt"]
    assert problems("docs/a.md", "in runs/tmp/x and 'https://h/a/b'") == []
    assert problems("x.sh", '#!/usr/bin/env bash\ncp "$tmp"/a/b x >"/dev/null"') == []


def test_no_tracked_file_records_an_absolute_path_of_a_machine():
    files = tracked_text_files()
    assert files, "git ls-files listed no text file"
    bad = {name: found for name, text in files if (found := problems(name, text))}
    listing = "\n".join(
        f"{name}: {', '.join(sorted(set(found))[:3])}" for name, found in bad.items()
    )
    assert not bad, (
        f"{len(bad)} tracked files record absolute paths (write them through "
        f"lm_eval_spade.paths.portable, or clean them with benchmarks/scrub_paths.py):\n"
        f"{listing}"
    )
