"""What `report` reads, checked before a table is made from it.

A table built from what is left of a broken folder reads as a complete one. So each input
folder is checked against what it says it holds, and every problem is named:

- the folders: each given once, none inside another (its results would count twice);
- a sweep folder's `sweep.json` (`results.MANIFEST`): a JSON object whose fields have the
  types the sweeps write; a malformed one is an error of its own (what the folder should
  hold is then unknown);
- the results files: every one `sweep.json` lists is there, is JSON (not cut short), is
  an lm-eval results file and holds the tasks it lists; nothing else is in the sweep's
  place (another command's results, such as a threshold choice written into the folder
  by an earlier version); every metric is a number, not a string or NaN; where a file is
  placed (its `sweep` block, or its spade settings) has the types the report reads.

`report` stops at the first problem (naming the file, and how many more there are), or
with `--allow-gaps` logs one warning per problem and marks the gaps in its tables.
Sweeps written before `sweep.json` listed its files (no `results` field) are checked for
everything but missing files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval_spade.files import MARKER
from lm_eval_spade.sweeps.oracle import ORACLE
from lm_eval_spade.sweeps.results import MANIFEST
from lm_eval_spade.sweeps.spec import SweepError

#: Files in result folders that are not results (read by their own readers).
NOT_RESULTS = {MANIFEST, MARKER, ORACLE, "choose_threshold.json"}


class ReportInputError(SweepError):
    """An input folder of `report` that cannot be read as it says it is."""


@dataclass
class Problem:
    """A results file that is missing or unusable (whole, or for some task and metric)."""

    file: Path
    reason: str
    #: where its rows go: its sweep block (from the file, else from `sweep.json`)
    place: dict[str, Any] | None = None
    #: the tasks it leaves without results (a metric problem: that task alone)
    tasks: list[str] = field(default_factory=list)
    metric: str | None = None
    #: the model, as `key=value` model_args, for the gap's row
    model_args: Any = None
    #: another run's results in a sweep's folder: left out, not a gap
    foreign: bool = False

    def __str__(self) -> str:
        return f"{self.file} {self.reason}"


@dataclass
class Sweep:
    """A sweep folder and what its `sweep.json` says it holds."""

    root: Path
    kind: str
    files: dict[str, dict[str, Any]] | None  # results/NAME -> sweep block (None: not listed)
    tasks: list[str]
    model_args: str


@dataclass
class Folder:
    """What one input folder holds: usable results files, and the problems found."""

    results: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    sweeps: list[Sweep] = field(default_factory=list)

    def problem(self, path: Path, reason: str) -> Problem:
        """A problem with the whole of `path`, placed where its sweep.json lists it."""
        sweep = _owner(path, self.sweeps)
        return Problem(
            path, reason, _listed(path, sweep), _tasks(sweep),
            model_args=sweep and sweep.model_args,
        )  # fmt: skip


# --- the folders -----------------------------------------------------------------------------
def check_dirs(dirs: list[Path]) -> list[Path]:
    """The input folders, each an existing folder given once and none inside another."""
    dirs = [Path(d) for d in dirs]
    for folder in dirs:
        if not folder.is_dir():
            raise ReportInputError(
                f"{folder} is not a folder; give sweep output or lm-eval result folders."
            )
    resolved = [d.resolve() for d in dirs]
    for i, (a, real_a) in enumerate(zip(dirs, resolved, strict=True)):
        for b, real_b in zip(dirs[i + 1 :], resolved[i + 1 :], strict=True):
            if real_a == real_b:
                given = f"{b} is given twice" if a == b else f"{a} and {b} are one folder"
                raise ReportInputError(
                    f"{given}; its results would be counted twice: give each folder once."
                )
            inner, outer = (b, a) if real_a in real_b.parents else (a, b)
            if real_a in real_b.parents or real_b in real_a.parents:
                raise ReportInputError(
                    f"{inner} is inside {outer}, which is also given; its results would be "
                    f"counted twice: give {outer} alone (it includes {inner}) or only "
                    "folders that do not overlap."
                )
    return dirs


def check_out(out: Path, dirs: list[Path]) -> None:
    """Refuse a report folder inside an input folder, but in its default place."""
    real = Path(out).resolve()
    for folder in dirs:
        inside = folder.resolve()
        if inside in real.parents and real != inside / "report":
            raise ReportInputError(
                f"--out {out} is inside {folder}, one of the folders read; a report there is "
                "lost or mixed with the results when that folder is replaced: choose a "
                f"folder outside it (or {folder / 'report'}, the default)."
            )


# --- sweep.json --------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


#: The fields of a sweep block (or a placement), and what each must be.
PLACE_FIELDS = {
    "kind": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "setting": (lambda v: isinstance(v, str), "a string"),
    "series": (lambda v: isinstance(v, str), "a string"),
    "decoder": (lambda v: isinstance(v, str), "a string"),
    "decoder_label": (lambda v: isinstance(v, str), "a string"),
    "lens_task": (lambda v: isinstance(v, str), "a string"),
    "layer": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "num_layers": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1"),
    "threshold": (lambda v: _is_number(v) and not math.isnan(v), "a number"),
    "chosen": (lambda v: isinstance(v, bool), "true or false"),
}


def place_error(place: Any) -> str | None:
    """What is wrong with a sweep block (where a results file goes), if anything."""
    if not isinstance(place, dict):
        return f"{_short(place)} is not an object"
    if "kind" not in place:
        return "it has no kind"
    for key, (valid, what) in PLACE_FIELDS.items():
        if key in place and not valid(place[key]):
            return f"{key} is {_short(place[key])}, but must be {what}"
    return None


def _short(value: Any) -> str:
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else repr(value)
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _manifest_error(data: Any) -> str | None:
    if not isinstance(data, dict):
        return f"it is {_short(data)}, not a JSON object"
    checks = {
        "kind": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
        "num_layers": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
        "settings": (lambda v: isinstance(v, dict), "an object"),
        "results": (
            lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
            "an object of results file names",
        ),
        "result_tasks": (
            lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
            "a list of task names",
        ),
    }
    if "kind" not in data:
        return "it has no kind"
    for key, (valid, what) in checks.items():
        if key in data and not valid(data[key]):
            return f"field {key} is {_short(data[key])}, but must be {what}"
    settings = data.get("settings", {})
    tasks = settings.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        return f"field settings.tasks is {_short(tasks)}, but must be a list of task names"
    for key in ("model", "model_args"):
        if key in settings and not isinstance(settings[key], str | None):
            return f"field settings.{key} is {_short(settings[key])}, but must be a string"
    for name, place in data.get("results", {}).items():
        wrong = place_error(place)
        if wrong:
            return f"field results.{name} (a sweep block) is malformed: {wrong}"
    return None


def read_manifest(root: Path) -> Sweep:
    """A sweep folder's `sweep.json`, checked (a malformed one is one clear error)."""
    path = root / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportInputError(
            f"{path} cannot be read as JSON ({err}); it records what the sweep holds: "
            "rerun the sweep, or restore the file."
        ) from None
    wrong = _manifest_error(data)
    if wrong:
        raise ReportInputError(
            f"{path}: {wrong}; it records what the sweep holds, so its results cannot be "
            "checked: rerun the sweep, or restore the file."
        )
    settings = data.get("settings", {})
    model = f"pretrained={settings.get('model') or '?'},{settings.get('model_args') or ''}"
    return Sweep(root, data["kind"], data.get("results"), list(data.get("result_tasks", [])), model)


# --- results files ---------------------------------------------------------------------------
def is_results(data: Any) -> bool:
    """An lm-eval results JSON: `results` (per task) and `config`."""
    return isinstance(data, dict) and isinstance(data.get("results"), dict) and "config" in data


def _hidden_or_report(path: Path, folder: Path) -> bool:
    parts = path.relative_to(folder).parts
    return "report" in parts[:-1] or any(p.startswith(".") for p in parts[:-1])


def _metric_problems(path: Path, data: dict[str, Any]) -> list[Problem]:
    """Metrics that are not numbers (a string, NaN), and task entries that are not objects."""
    found = []
    for task, metrics in data["results"].items():
        if not isinstance(metrics, dict):
            found.append(Problem(path, f"has {_short(metrics)} for task {task}, not metrics"))
            continue
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or "_stderr" in metric:
                continue
            if not _is_number(value) or math.isnan(value):
                found.append(
                    Problem(
                        path,
                        f"has {key} {_short(value)} for task {task}, not a number",
                        tasks=[task],
                        metric=metric,
                    )
                )
    return found


def _owner(path: Path, sweeps: list[Sweep]) -> Sweep | None:
    """The sweep whose folder holds `path` (the innermost)."""
    holding = [s for s in sweeps if s.root in path.parents]
    return max(holding, key=lambda s: len(s.root.parts), default=None)


def _foreign(path: Path, data: dict[str, Any], sweep: Sweep) -> str | None:
    """Why a results file inside a sweep folder is not one of that sweep's, if it is not."""
    name = path.relative_to(sweep.root).as_posix()
    if sweep.files is not None:
        if name.startswith("results/") and name[len("results/") :] in sweep.files:
            return None
        return (
            f"is not one of the {len(sweep.files)} results files {sweep.root / MANIFEST} "
            "lists (another run's results in the sweep's folder)"
        )
    block = data.get("sweep")
    if not isinstance(block, dict) or block.get("chosen") or block.get("kind") != sweep.kind:
        return (
            f"is not a result of the {sweep.kind} sweep in {sweep.root} (another run's "
            "results in the sweep's folder)"
        )
    return None


def read_folder(folder: Path) -> Folder:
    """Every lm-eval results file under `folder`, and every problem with them."""
    out = Folder()
    paths = [p for p in sorted(folder.rglob("*.json")) if not _hidden_or_report(p, folder)]
    sweeps = out.sweeps = [read_manifest(p.parent) for p in paths if p.name == MANIFEST]
    seen: set[Path] = set()
    for path in paths:
        if path.name in NOT_RESULTS:
            continue
        sweep = _owner(path, sweeps)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            if sweep is not None or path.name.startswith("results"):
                place = _listed(path, sweep)
                out.problems.append(
                    Problem(
                        path, f"cannot be read as JSON, so it is cut short or damaged ({err})",
                        place, _tasks(sweep), model_args=sweep and sweep.model_args,
                    )
                )  # fmt: skip
                seen.add(path)
            continue
        if not is_results(data):
            if sweep is not None and _listed(path, sweep) is not None:
                out.problems.append(
                    Problem(path, "is not an lm-eval results file", _listed(path, sweep),
                            _tasks(sweep), model_args=sweep.model_args)
                )  # fmt: skip
                seen.add(path)
            continue
        seen.add(path)
        if sweep is not None:
            foreign = _foreign(path, data, sweep)
            if foreign:
                out.problems.append(Problem(path, foreign, foreign=True))
                continue
            lacking = [t for t in sweep.tasks if t not in data["results"]]
            if lacking:
                out.problems.append(
                    Problem(
                        path,
                        f"lacks task(s) {', '.join(lacking)}, which {sweep.root / MANIFEST} "
                        "says every results file holds (cut short?)",
                        _listed(path, sweep),
                        lacking,
                        model_args=sweep.model_args,
                    )
                )
        out.problems += _metric_problems(path, data)
        out.results.append((path, data))
    for sweep in sweeps:
        for name, place in (sweep.files or {}).items():
            path = sweep.root / "results" / name
            if path not in seen:
                out.problems.append(
                    Problem(
                        path, f"is missing ({sweep.root / MANIFEST} lists it)", place,
                        sweep.tasks, model_args=sweep.model_args,
                    )
                )  # fmt: skip
    return out


def _listed(path: Path, sweep: Sweep | None) -> dict[str, Any] | None:
    """The sweep block `sweep.json` records for `path`, if it lists it."""
    if sweep is None or sweep.files is None:
        return None
    name = path.relative_to(sweep.root).as_posix()
    return sweep.files.get(name[len("results/") :]) if name.startswith("results/") else None


def _tasks(sweep: Sweep | None) -> list[str]:
    return list(sweep.tasks) if sweep is not None else []


def refusal(problems: list[Problem]) -> ReportInputError:
    """One line for the problems found: the first, and how many more."""
    first, more = problems[0], len(problems) - 1
    also = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if first.foreign:
        fix = (
            "tables would mix it in, so no report was written: move it out of the sweep's "
            "folder, or add --allow-gaps to report without it"
        )
    else:
        fix = (
            "tables without it would read as complete, so no report was written: rerun what "
            "made it, or add --allow-gaps to report the rest with the gaps marked"
        )
    return ReportInputError(f"{first}{also}; {fix}.")
