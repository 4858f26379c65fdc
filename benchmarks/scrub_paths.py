"""One-off: remove the absolute paths of the machine that made them from the committed
files under `results/` (issue 31).

Why: lm-eval result files, sweep manifests, lens and adapter configs and `finetune.json`
recorded where that machine kept the model, lm-eval's installed task files and this
repository's checkouts (`/work/main/.cache/models/...`, `/work/main/.venv/lib/python3.11/
site-packages/lm_eval/tasks/...`, `/work/wt6/task_configs/...`). Those say nothing to a
reader elsewhere and tie the files to one machine. Outputs written since go through
`lm_eval_spade.paths.portable`; this script gives the committed ones the same form.

How: every tracked text file under `results/` (JSON, md, csv, tsv, yaml) is rewritten in
place by `lm_eval_spade.paths.portable_text` on its raw text, so only the paths change and
the formatting stays byte for byte. The checkouts of that machine (`/work/main`,
`/work/wtN`, `/work/wt-NAME`) count as repository roots, so a path inside one becomes
relative to it (`.cache/models/NAME`, `task_configs/NAME.yaml`); installed packages become
`PACKAGE/...` (`lm_eval/tasks/arc/arc_easy.yaml`). Each JSON file is checked to parse to
exactly `portable(original)`: same structure, same numbers. Binary files are not touched.

Run from the top of the repository: `python benchmarks/scrub_paths.py [--check]`
(`--check` lists what would change and writes nothing).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_eval_spade.paths import PATH_IN_TEXT, portable, portable_text

SUFFIXES = {".json", ".md", ".csv", ".tsv", ".yaml", ".yml", ".txt"}
#: The checkouts of the machine that wrote the committed results.
CHECKOUT = re.compile(r"/work/(?:main|wt[A-Za-z0-9_-]*)(?=/)")


def tracked(folder: str) -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files", "-z", folder], capture_output=True, text=True, check=True
    ).stdout.split("\0")
    return [Path(n) for n in names if n and Path(n).suffix in SUFFIXES]


def scrub(path: Path) -> bool:
    """Rewrite `path` in place; whether it changed."""
    text = path.read_text(encoding="utf-8")
    if not PATH_IN_TEXT.search(text):
        return False
    roots = sorted(set(CHECKOUT.findall(text)), key=len, reverse=True)
    new = portable_text(text, roots)
    if new == text:
        return False
    if path.suffix == ".json":
        expected = portable(json.loads(text), roots)
        if json.loads(new) != expected:
            raise SystemExit(f"{path}: the rewritten JSON is not the original's portable form")
    path.write_text(new, encoding="utf-8")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="list files, write nothing")
    parser.add_argument("folder", nargs="?", default="results")
    args = parser.parse_args()
    changed = 0
    for path in tracked(args.folder):
        if args.check:
            text = path.read_text(encoding="utf-8")
            roots = sorted(set(CHECKOUT.findall(text)), key=len, reverse=True)
            hit = portable_text(text, roots) != text
        else:
            hit = scrub(path)
        if hit:
            changed += 1
            print(path)
    print(f"{changed} files {'would change' if args.check else 'rewritten'}", file=sys.stderr)


if __name__ == "__main__":
    main()
