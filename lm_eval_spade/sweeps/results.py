"""Sweep output: one lm-eval results JSON per setting, and a manifest per sweep.

A sweep writes `OUT/results/<setting>.json` for every setting it evaluates, each what
`lm_eval --model spade-exit --model_args <config.model_args> --tasks ...` writes
(`results`, `configs`, `versions`, `n-shot`, `higher_is_better`, `n-samples`, and
`config` with `config.spade`: settings and per-task exit statistics), plus a `sweep`
block naming the sweep kind and the setting's place in it. `OUT/sweep.json` holds the
sweep's own record: kind, settings, what scoring cost, and what the folder holds
(`results`: each results file's name and `sweep` block; `result_tasks`: the tasks each
holds). `report` reads both, checks the first against the second (`sweeps/inputs.py`),
and reads plain lm-eval result folders too.

A sweep writes into a fresh folder that replaces `OUT` only when it is complete
(`sweep_output`), so a rerun never mixes its files with an earlier run's.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lm_eval_spade import __version__
from lm_eval_spade.files import SWEEP, staged_output
from lm_eval_spade.paths import portable
from lm_eval_spade.sweeps.model import LayerwiseLM
from lm_eval_spade.sweeps.oracle import ORACLE, OraclePlan, QuestionTable, sweep_oracle
from lm_eval_spade.sweeps.settings import SweepSettings
from lm_eval_spade.sweeps.views import Rule, ScoresView, ScoreTable, ScoringCost

logger = logging.getLogger(__name__)

MANIFEST = "sweep.json"


@dataclass
class Setting:
    """One point of a sweep: a name, its exit rule, and how the report places it."""

    name: str
    rule: Rule
    sweep: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepOutcome:
    """What a sweep wrote and what scoring cost."""

    out: Path
    cost: ScoringCost
    results: list[dict[str, Any]]


def is_sweep_dir(path: Path) -> bool:
    """A sweep folder written by an earlier version (before output markers)."""
    try:
        return "package_version" in json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError, TypeError):
        return False


@contextmanager
def sweep_output(settings: SweepSettings) -> Iterator[Path]:
    """Check the sweep's settings and `--out` before any work, and yield the folder to
    write into; it becomes `settings.out` when the sweep completes."""
    settings.check()
    with staged_output(settings.out, SWEEP, settings.overwrite, is_sweep_dir) as work:
        yield work


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-")


def evaluate_setting(
    table: ScoreTable, setting: Setting, task_dict: dict, settings: SweepSettings
) -> dict[str, Any]:
    """lm-eval's `evaluate` against the setting's view, with the run's `config`."""
    from lm_eval.evaluator import evaluate

    view = ScoresView(table, setting.rule)
    results = evaluate(
        lm=view,
        task_dict=task_dict,
        limit=settings.limit,
        log_samples=False,
        bootstrap_iters=settings.bootstrap_iters,
        verbosity="WARNING",
    )
    assert results is not None
    spade = view.spade_info()
    results["config"] = {
        "model": "spade-exit",
        "model_args": settings.model_args_string(setting.rule.settings()),
        "batch_size": settings.batch_size,
        "limit": settings.limit,
        "bootstrap_iters": settings.bootstrap_iters,
        "spade": spade,
    }
    results["sweep"] = {"setting": setting.name, **setting.sweep}
    return results


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write JSON via a temporary file, so a crash never leaves half a file; its paths
    made portable (`paths.py`: no absolute path of this machine in an output)."""
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(portable(data), indent=2, default=handle_non_serializable) + "\n")
    tmp.replace(path)
    return path


def run_settings(
    table: ScoreTable,
    settings_list: Sequence[Setting],
    task_dict: dict,
    settings: SweepSettings,
    out: Path,
) -> list[dict[str, Any]]:
    """Evaluate every setting and write its results JSON under `out/results/`."""
    names = [result_file(setting) for setting in settings_list]
    assert len(set(names)) == len(names), "two settings would share a results file"
    written = []
    for setting, name in zip(
        tqdm(settings_list, desc="settings (lm-eval metrics)"), names, strict=True
    ):
        results = evaluate_setting(table, setting, task_dict, settings)
        write_json(out / "results" / name, results)
        written.append(results)
    return written


def result_file(setting: Setting) -> str:
    """The name of a setting's results file under `OUT/results/`."""
    return f"{slug(setting.name)}.json"


def contents(points: Sequence[Setting], written: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What a sweep folder holds, for its manifest: each results file with its `sweep`
    block (where `report` places it), and the tasks every one of them reports."""
    tasks = sorted(set().union(*(r.get("results", {}) for r in written))) if written else []
    return {
        "results": {result_file(p): r["sweep"] for p, r in zip(points, written, strict=True)},
        "result_tasks": tasks,
    }


def write_manifest(out: Path, kind: str, settings: SweepSettings, **record: Any) -> Path:
    data = {
        "kind": kind,
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings.to_dict(),
        **record,
    }
    return write_json(out / MANIFEST, data)


def run_sweep(
    lm: LayerwiseLM,
    points: Sequence[Setting],
    task_dict: dict,
    settings: SweepSettings,
    kind: str,
    work: Path,
    oracle: OraclePlan | None = None,
    **record: Any,
) -> SweepOutcome:
    """Score the tasks' requests once with `lm`, evaluate every point, write the results,
    the oracle file (`oracle.py`, from the same scores) when an `oracle` plan is given, and
    the manifest (with `record`, the scoring cost and the oracle file's name) into `work`
    (`sweep_output`)."""
    table = QuestionTable(lm, settings.time_full_depth)
    results = run_settings(table, points, task_dict, settings, work)
    if oracle is not None:
        found = sweep_oracle(table.records(), lm.layout, oracle, task_dict["tasks"])
        write_json(work / ORACLE, found)
        record["oracle"] = ORACLE
    cost = table.cost.to_dict()
    write_manifest(
        work, kind, settings, num_layers=lm.layout.num_layers, cost=cost, **record,
        **contents(points, results),
    )  # fmt: skip
    logger.info("wrote %d results files for %s", len(points), settings.out / "results")
    return SweepOutcome(settings.out, table.cost, results)
