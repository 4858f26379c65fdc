"""`lm-eval-spade report DIR...`: tables (markdown, CSV) and figures (PNG) from results.

It reads every lm-eval results JSON under the given folders: the files the sweeps write
(their `sweep` block says which sweep and which point), and plain `lm_eval --model
spade-exit --output_path ...` or `--model hf` results, placed by their `config.spade`
settings (a fixed `exit_layer` is a layer-sweep point, a `threshold` a SPADE-EXIT point,
no exit setting the full model). For each kind of sweep found it writes:

- `<kind>.csv`: one row per (results file, task, metric), everything the report knows;
- `<kind>.md`: leaderboard-style tables of each task's main metric (accuracy for
  multiple choice, word perplexity for text), with exit layer and compute fraction;
- `<kind>*.png`: the paper's figures: metric by layer per decoder (figures 3, 4),
  accuracy against mean exit layer and compute fraction (figure 5), per lens (figure 6);
- `leaderboard.md` / `leaderboard.csv`: one row per setting (model and adapter, decoder or
  exit rule, layer or threshold), one column per task and their average, then the mean
  compute fraction and, where the results carry a measured timing, the wall-clock
  speedup against `hf`; ranked by the average, with standard errors.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lm_eval_spade.files import REPORT, check_output, staged_output
from lm_eval_spade.sweeps import inputs
from lm_eval_spade.sweeps.layers import DECODER_NAMES
from lm_eval_spade.sweeps.oracle import ORACLE
from lm_eval_spade.sweeps.spec import SweepError

logger = logging.getLogger(__name__)

#: Metrics a task is judged by, in order of preference, and how they read.
MAIN_METRICS = {
    "acc": "accuracy",
    "acc_norm": "accuracy (length-normalised)",
    "word_perplexity": "word perplexity",
    "byte_perplexity": "byte perplexity",
    "bits_per_byte": "bits per byte",
}
LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "bits_per_byte"}
KINDS = ("layers", "thresholds", "transfer")


@dataclass
class Report:
    """What `report` made: the long table and the files written."""

    table: pd.DataFrame
    files: list[Path]
    markdown: dict[str, str]


# --- reading -----------------------------------------------------------------------------
def markdown_table(frame: pd.DataFrame, **kwargs: Any) -> str:
    """`frame` as markdown with "—" where a value is missing (a decoder not run at a
    layer, a point without an ideal): pandas would print "nan", which reads as a failed
    computation."""
    cells = frame.astype(object).where(frame.notna(), None)
    return cells.to_markdown(missingval="—", **kwargs)


def _placement(data: dict[str, Any]) -> dict[str, Any]:
    """Where a results file sits: its sweep block, or what its spade settings imply."""
    if isinstance(data.get("sweep"), dict):
        return dict(data["sweep"])
    spade = (data.get("config") or {}).get("spade")
    if not isinstance(spade, dict):  # `--model hf`: its own tokens (no start token added)
        return {"kind": "full model", "series": "full model", "runner": "hf"}
    config = spade.get("config", {})
    decoder = config.get("decoder") or "spade"
    num_layers = spade.get("num_layers")
    if config.get("exit_layer") is not None:
        return {
            "kind": "layers",
            "decoder": decoder,
            "decoder_label": DECODER_NAMES.get(_decoder_kind(decoder), decoder),
            "layer": config["exit_layer"],
            "num_layers": num_layers,
        }
    if config.get("threshold") is not None:
        return {
            "kind": "thresholds",
            "series": f"{config.get('confidence')} of {config.get('confidence_decoder')}, "
            f"decoded by {decoder}",
            "threshold": float(config["threshold"]),
            "decoder": decoder,
            "num_layers": num_layers,
        }
    if config.get("patience") is not None:  # the patience rule: threshold -patience
        return {
            "kind": "thresholds",
            "series": f"patience of {config.get('confidence_decoder')}, decoded by {decoder}",
            "threshold": -float(config["patience"]),
            "decoder": decoder,
            "num_layers": num_layers,
        }
    return {"kind": "full model", "series": "full model", "num_layers": num_layers}


def _decoder_kind(name: str):
    from lm_eval_spade.decoders import DecoderKind

    try:
        return DecoderKind(name)
    except ValueError:
        return name


def _rows(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    place = _placement(data)
    config = data.get("config") or {}
    tasks = (config.get("spade") or {}).get("tasks", {})
    timing = data.get("timing") if isinstance(data.get("timing"), dict) else {}
    rows = []
    for task, metrics in data["results"].items():
        if not isinstance(metrics, dict):
            continue
        stats = tasks.get(task, {})
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or "_stderr" in metric or isinstance(value, bool):
                continue
            if not isinstance(value, int | float):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(
                {
                    **place,
                    "file": str(path),
                    "task": task,
                    "metric": metric,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, int | float) else None,
                    "samples": metrics.get("sample_len")
                    or (data.get("n-samples", {}).get(task) or {}).get("effective"),
                    "mean_exit_layer": stats.get("mean_exit_layer"),
                    "compute_fraction": stats.get("compute_fraction", 1.0 if not tasks else None),
                    "model": _model_name(config.get("model_args")),
                    "speedup": _speedup(timing),
                }
            )
    return rows


def _model_name(model_args: str | dict | None) -> str:
    """`pretrained` (its last path part) and `peft` adapter of a results file's model_args
    (a `key=value,...` string, or the dict newer lm-eval versions record)."""
    if isinstance(model_args, dict):
        args = {str(k): str(v) for k, v in model_args.items()}
    else:
        args = dict(part.split("=", 1) for part in str(model_args or "").split(",") if "=" in part)
    name = Path(args.get("pretrained", "?")).name
    return f"{name} + {Path(args['peft']).name}" if args.get("peft") else name


def _speedup(timing: dict[str, Any]) -> float | None:
    """`hf`'s seconds over this run's, where a benchmark timed both on the same requests."""
    seconds, hf = timing.get("seconds"), timing.get("hf_seconds")
    if isinstance(seconds, int | float) and isinstance(hf, int | float) and seconds > 0:
        return float(hf) / float(seconds)
    return None


def _placed_rows(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    """`_rows`, once the file's place (its sweep block, or its spade settings) is known to
    be one the report can read; a ValueError names what is wrong."""
    where = "sweep block" if "sweep" in data else "spade settings (config.spade)"
    try:
        wrong = inputs.place_error(_placement(data))
        if wrong is None:
            return _rows(path, data)
    except (ValueError, TypeError, AttributeError) as err:
        wrong = str(err)
    raise ValueError(f"has a malformed {where}: {wrong}")


def _gap_rows(problem: inputs.Problem, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with no value for what `problem` leaves out, where it would have been, each
    task with the metrics the other files report for it (`report --allow-gaps`)."""
    if problem.place is None or not problem.tasks:
        return []
    out = []
    for task in problem.tasks:
        metrics = [problem.metric] if problem.metric else []
        metrics = metrics or sorted({r["metric"] for r in rows if r["task"] == task})
        for metric in metrics:
            out.append(
                {
                    **problem.place,
                    "file": str(problem.file),
                    "task": task,
                    "metric": metric,
                    "value": float("nan"),
                    "stderr": None,
                    "samples": None,
                    "mean_exit_layer": None,
                    "compute_fraction": None,
                    "model": _model_name(problem.model_args),
                    "speedup": None,
                    "gap": problem.reason,
                }
            )
    return out


def load_results(dirs: list[Path], allow_gaps: bool = False) -> pd.DataFrame:
    """The long table of every results JSON under `dirs`, each checked against what its
    folder says it holds (`inputs.py`); clear errors for folders that are missing, given
    twice, overlapping, empty, or that hold a missing or unusable results file. With
    `allow_gaps`, such a file is a warning and rows marked `gap` instead."""
    rows: list[dict[str, Any]] = []
    problems: list[inputs.Problem] = []
    read: dict[Path, dict[str, Any]] = {}  # the files placed
    for folder in inputs.check_dirs(dirs):
        found = inputs.read_folder(folder)
        for path, data in found.results:
            try:
                rows += _placed_rows(path, data)
                read[path] = data
            except ValueError as err:
                found.problems.append(found.problem(path, str(err)))
        if not found.results and not found.problems:
            raise SweepError(
                f"{folder} holds no lm-eval results files (JSON with 'results' and 'config'); "
                "point report at the --out folder of a sweep or an lm_eval --output_path."
            )
        problems += found.problems
    if problems and not allow_gaps:
        raise inputs.refusal(problems)
    gaps = []
    for problem in problems:
        data = read.get(problem.file)
        if problem.metric is not None and data is not None:  # placed as its other numbers
            problem.place, problem.model_args = _placement(data), data["config"].get("model_args")
            rows = [
                r
                for r in rows
                if (r["file"], r["task"], r["metric"])
                != (str(problem.file), problem.tasks[0], problem.metric)
            ]
        marked = _gap_rows(problem, rows)
        gaps += marked
        logger.warning(
            "gap: %s; %s", problem,
            "its results are marked 'gap' in the tables" if marked
            else "left out of the tables" if problem.foreign
            else "left out of the tables (where its results go is unknown)",
        )  # fmt: skip
    table = pd.DataFrame(rows + gaps)
    if table.empty or table["value"].notna().sum() == 0:
        raise SweepError(f"the results under {', '.join(map(str, dirs))} hold no task metrics.")
    return table


def main_metrics(table: pd.DataFrame) -> pd.DataFrame:
    """Each task's main metric only (accuracy, else word perplexity, ...)."""
    chosen = []
    for _, group in table.groupby("task", sort=True):
        metrics = set(group["metric"])
        metric = next((m for m in MAIN_METRICS if m in metrics), sorted(metrics)[0])
        chosen.append(group[group["metric"] == metric])
    return pd.concat(chosen, ignore_index=True)


def _label(metric: str) -> str:
    return MAIN_METRICS.get(metric, metric.replace("_", " "))


# --- tables ------------------------------------------------------------------------------
GAP = "gap"


def _gaps(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of `frame` that stand for missing or unusable results (`--allow-gaps`)."""
    return frame[frame["gap"].notna()] if "gap" in frame else frame.iloc[:0]


def _shown_value(value: Any, floatfmt: str = ".4g") -> Any:
    return value if pd.isna(value) else format(value, floatfmt)


def _mark_gap_cells(pivot: pd.DataFrame, group: pd.DataFrame, index: str, column: str):
    """`pivot` (values of `group` by `index` and `column`) with GAP in the cells of gaps."""
    gaps = _gaps(group)
    if gaps.empty:
        return pivot
    marked = pivot.astype(object).map(_shown_value)
    for _, row in gaps.iterrows():
        marked.loc[row[index], row[column]] = GAP
    return marked.sort_index()


def _mark_gap_values(view: pd.DataFrame, group: pd.DataFrame) -> pd.DataFrame:
    """`view` (rows of `group`) with GAP as the value of gaps."""
    gaps = _gaps(group)
    if gaps.empty:
        return view
    values = [GAP if i in gaps.index else _shown_value(v) for i, v in view["value"].items()]
    return view.assign(value=pd.Series(values, index=view.index, dtype=object))


def _gap_note(gaps: pd.DataFrame) -> str:
    """What the cells marked GAP stand for."""
    files = gaps.drop_duplicates("file")
    lines = [f"- {row['file']} {row['gap']}" for _, row in files.iterrows()]
    return (
        f"**Gaps** (`report --allow-gaps`): {len(files)} results file(s) missing or unusable; "
        f"their cells read `{GAP}`:\n\n" + "\n".join(lines)
    )


def _layer_tables(main: pd.DataFrame) -> str:
    parts = []
    for (task, metric), group in main.groupby(["task", "metric"], sort=True):
        pivot = group.pivot_table(
            index="layer", columns="decoder_label", values="value", aggfunc="first"
        )
        order = [d for d in DECODER_NAMES.values() if d in pivot.columns]
        pivot = pivot[order + [c for c in pivot.columns if c not in order]]
        pivot.columns.name = None
        pivot = _mark_gap_cells(pivot, group, "layer", "decoder_label")
        n = group["samples"].dropna()
        size = f", {int(n.iloc[0])} documents" if len(n) else ""
        better = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
        parts.append(
            f"### {task}: {_label(metric)} by layer ({better}{size})\n\n"
            + markdown_table(pivot, floatfmt=".4g")
        )
    return "\n\n".join(parts)


def _exit_tables(main: pd.DataFrame, by: str) -> str:
    parts = []
    for (task, metric), group in main.groupby(["task", "metric"], sort=True):
        cols = [by, "threshold", "layer", "value", "mean_exit_layer", "compute_fraction"]
        cols = [c for c in cols if c in group.columns]
        keys = [by, "compute_fraction", *[c for c in ("threshold", "layer") if c in cols]]
        view = group[cols].sort_values(keys, ascending=[True, False] + [True] * (len(keys) - 2))
        view = _mark_gap_values(view, group)
        view = view.rename(
            columns={
                "value": _label(metric),
                "mean_exit_layer": "mean exit layer",
                "compute_fraction": "compute fraction",
                "lens_task": "L-SPADE trained on",
            }
        )
        parts.append(
            f"### {task}: {_label(metric)} against exit layer and compute\n\n"
            + markdown_table(view, index=False, floatfmt=".4g")
        )
    return "\n\n".join(parts)


def tables(table: pd.DataFrame) -> dict[str, str]:
    """Markdown per sweep kind found in the long table."""
    main = main_metrics(table)
    out = {}
    if (main["kind"] == "layers").any():
        out["layers"] = _layer_tables(main[main["kind"] == "layers"])
    if (main["kind"] == "thresholds").any():
        out["thresholds"] = _exit_tables(main[main["kind"] == "thresholds"], "series")
    if (main["kind"] == "transfer").any():
        out["transfer"] = _exit_tables(main[main["kind"] == "transfer"], "lens_task")
    gaps = _gaps(main)
    for kind in out:
        if (gaps["kind"] == kind).any():
            out[kind] += "\n\n" + _gap_note(gaps[gaps["kind"] == kind])
    if not out:
        kinds = ", ".join(sorted(set(main["kind"])))
        raise SweepError(
            f"the results found are of kind(s) {kinds} only; the report needs layer, "
            "threshold or transfer sweeps (or spade-exit runs with exit_layer or threshold)."
        )
    return out


def _at_full_depth(row: pd.Series) -> bool:
    layer, num_layers = row.get("layer"), row.get("num_layers")
    return row["kind"] == "full model" or (
        pd.notna(layer) and pd.notna(num_layers) and int(layer) == int(num_layers)
    )


def _rule(row: pd.Series) -> str:
    if row.get("runner") == "hf":  # may score other tokens than spade-exit's full depth
        return "hf"
    if _at_full_depth(row):  # every decoder at layer L is the full model
        return "full model"
    if row["kind"] == "layers":
        return f"static exit ({row['decoder_label']})"
    if row["kind"] == "transfer":
        return f"SPADE-EXIT, L-SPADE trained on {row['lens_task']}"
    return str(row.get("series") or row["kind"])


def _point(row: pd.Series) -> str:
    if _at_full_depth(row):
        return "full depth"
    if pd.notna(row.get("threshold")):
        return f"threshold {row['threshold']:g}"
    if pd.notna(row.get("layer")):
        return f"layer {int(row['layer'])}"
    return "full depth"


def leaderboard(table: pd.DataFrame) -> pd.DataFrame:
    """One row per setting, a column per task's main metric (and its standard error), the
    average over tasks, mean compute fraction and measured wall-clock speedup, ranked.

    A setting that lacks some task gets no average and sinks to the bottom, so averages
    are only compared over the same tasks.
    """
    main = main_metrics(table).copy()
    main["rule"] = main.apply(_rule, axis=1)
    main["point"] = main.apply(_point, axis=1)
    keys = ["model", "rule", "point"]
    tasks = sorted(main["task"].unique())
    rows = []
    for key, group in main.groupby(keys, sort=False):
        row = dict(zip(keys, key, strict=True))
        by_task = group.drop_duplicates("task").set_index("task")
        for task in tasks:
            row[task] = by_task["value"].get(task)
            row[f"{task} stderr"] = by_task["stderr"].get(task)
        values = [row[t] for t in tasks]
        complete = all(v is not None and pd.notna(v) for v in values)
        row["average"] = sum(values) / len(values) if complete else None
        row["compute fraction"] = by_task["compute_fraction"].mean()
        speedups = group["speedup"].dropna()  # from whichever file of the setting was timed
        row["speedup vs hf"] = speedups.mean() if len(speedups) else None
        if len(_gaps(group)):
            row["gaps"] = ", ".join(sorted(set(_gaps(group)["task"])))
        rows.append(row)
    board = pd.DataFrame(rows)
    lower = bool(main["metric"].isin(LOWER_IS_BETTER).all())
    board = board.sort_values(
        ["average", "compute fraction"], ascending=[lower, True], na_position="last"
    )
    return board.reset_index(drop=True)


def _board_cell(value: Any, stderr: Any, gap: bool) -> str:
    if gap:
        return GAP
    if pd.isna(value):
        return ""
    return f"{value:.3f} ± {stderr:.3f}" if pd.notna(stderr) else f"{value:.3f}"


def leaderboard_markdown(board: pd.DataFrame) -> str:
    tasks = [c for c in board.columns if f"{c} stderr" in board.columns]
    view = pd.DataFrame({"rank": range(1, len(board) + 1)})
    for key in ("model", "rule", "point"):
        view[key] = board[key]
    gaps = board["gaps"].fillna("") if "gaps" in board else pd.Series("", index=board.index)
    for task in tasks:
        view[task] = [
            _board_cell(v, e, task in g.split(", "))
            for v, e, g in zip(board[task], board[f"{task} stderr"], gaps, strict=True)
        ]
    view["average"] = [f"{v:.3f}" if pd.notna(v) else "" for v in board["average"]]
    view["compute fraction"] = [
        f"{v:.3f}" if pd.notna(v) else "" for v in board["compute fraction"]
    ]
    view["speedup vs hf"] = [f"{v:.2f}x" if pd.notna(v) else "" for v in board["speedup vs hf"]]
    return "### Leaderboard\n\n" + view.to_markdown(index=False)


# --- the oracle (each sweep's oracle.json; docs/method.md#the-oracle-exit) ---------------
#: How tables and figures name the points of an oracle file's decoder entry.
ORACLE_POINTS = {
    "oracle": "oracle",
    "oracle_1pt": "oracle at 1 point",
    "static_frontier": "static frontier",
}
ORACLE_COLUMNS = [
    "kind", "task", "rule", "decoder", "layer", "threshold", "accuracy", "mean_exit_layer",
    "compute_fraction", "disagreements", "share_of_oracle_saving", "why_null", "questions",
    "full_depth_accuracy", "sweep",
]  # fmt: skip


def _oracle_rows(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per point of an oracle file: each decoder's three, each rule family's
    cheapest threshold within the point, and a row per task it skipped."""
    rows = []
    for task, entry in sorted(data["tasks"].items()):
        head = {"kind": data.get("kind"), "task": task, "sweep": str(path.parent)}
        if "skipped" in entry:
            rows.append({**head, "rule": "skipped", "why_null": entry["skipped"]})
            continue
        head |= {
            "questions": entry.get("questions"),
            "full_depth_accuracy": (entry.get("full_depth") or {}).get("accuracy"),
        }
        labels = {}
        for decoder in entry.get("decoders", []):
            labels[decoder["decoder"]] = decoder["label"]
            for key, rule in ORACLE_POINTS.items():
                rows.append({**head, **decoder[key], "rule": rule, "decoder": decoder["label"]})
        for family in entry.get("rules", []):
            point = family.get("cheapest_within_point") or {"why_null": family.get("why_null")}
            label = labels.get(family.get("decoder"), family.get("decoder"))
            rows.append({**head, **point, "rule": family["family"], "decoder": label})
    return rows


def load_oracles(dirs: list[Path]) -> pd.DataFrame:
    """Every `oracle.json` under `dirs` as rows (`ORACLE_COLUMNS`); empty where none is
    found, as for sweeps made before the oracle file, which report as before."""
    rows: list[dict[str, Any]] = []
    for folder in map(Path, dirs):
        for path in sorted(folder.rglob(ORACLE)) if folder.is_dir() else []:
            if "report" in path.relative_to(folder).parts[:-1]:
                continue
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
                logger.warning("%s is not an oracle file (%s); left out of the report", path, err)
                continue
            if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
                rows += _oracle_rows(path, data)
    return pd.DataFrame(rows, columns=ORACLE_COLUMNS)


def oracle_markdown(oracles: pd.DataFrame) -> str:
    """Per sweep kind and task: the oracle, the 1-point oracle and the static frontier of
    each decoder, and each rule family's cheapest threshold within 1 point of full depth."""
    parts = []
    shown = oracles[oracles["rule"] != "skipped"]
    for (kind, task), group in shown.groupby(["kind", "task"], sort=True):
        n, full = group["questions"].iloc[0], group["full_depth_accuracy"].iloc[0]
        view = group[ORACLE_COLUMNS[2:12]].rename(
            columns={
                "mean_exit_layer": "mean exit layer",
                "compute_fraction": "compute fraction",
                "share_of_oracle_saving": "share of oracle saving",
                "why_null": "note",
            }
        )
        view = view.dropna(axis=1, how="all")
        parts.append(
            f"### {task} ({kind} sweep): oracle exits ({int(n)} questions, full depth "
            f"accuracy {full:.4g})\n\n" + markdown_table(view, index=False, floatfmt=".4g")
        )
    for _, row in oracles[oracles["rule"] == "skipped"].iterrows():
        parts.append(f"No oracle for {row['task']} ({row['kind']} sweep): {row['why_null']}.")
    parts.append(
        "Oracle: each question exits at the earliest check from which its answer is full "
        "depth's; at 1 point: the costliest 1% of questions exit at the first check instead; "
        "static frontier and rules: the cheapest within 1 point of full depth; share: "
        "(1 - compute) / (1 - the oracle's compute), same decoder "
        "(lm-eval-spade's docs/method.md, The oracle exit)."
    )
    return "\n\n".join(parts)


def _mark_oracles(ax, oracles: pd.DataFrame, x: str) -> bool:
    """The oracle, the 1-point oracle and the static frontier of each decoder as labelled
    points: the floor no exit rule that agrees with full depth can beat, and the static
    exit a rule has to beat to be worth its checks. Colours outside seaborn's default
    palette, so no point reads as one of the lines; whether any point was drawn."""
    markers = {"oracle": ("P", 240), "oracle at 1 point": ("X", 110), "static frontier": ("s", 130)}
    points = oracles[oracles["rule"].isin(list(markers)) & oracles[x].notna()]
    palette = ["black", "gold", "navy", "lime", "magenta"]
    colours = dict(zip(sorted(points["decoder"].unique()), palette, strict=False))
    for _, point in points.iterrows():
        marker, size = markers[point["rule"]]
        where = f", layer {int(point['layer'])}" if point["rule"] == "static frontier" else ""
        ax.scatter(point[x], point["accuracy"], marker=marker, s=size, zorder=6,
                   color=colours.get(point["decoder"], "gray"), edgecolor="0.4", linewidth=0.6,
                   label=f"{point['rule']} ({point['decoder']}{where})")  # fmt: skip
    return not points.empty


# --- figures -----------------------------------------------------------------------------
def _full_model_line(ax, group: pd.DataFrame) -> None:
    num_layers = group["num_layers"].dropna()
    if "layer" not in group or num_layers.empty:
        return
    full = group[group["layer"] == num_layers.max()]["value"]
    if len(full):
        ax.axhline(full.iloc[0], color="0.3", linestyle="--", linewidth=1, label="full model")


def _layer_figures(main: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    files = []
    main = main.assign(perplexity=main["metric"].isin(LOWER_IS_BETTER))
    for perplexity, part in main.groupby("perplexity"):
        tasks = sorted(part["task"].unique())
        fig, axes = plt.subplots(1, len(tasks), figsize=(max(6, 5 * len(tasks)), 4), squeeze=False)
        order = [d for d in DECODER_NAMES.values() if d in set(part["decoder_label"])]
        order += sorted(set(part["decoder_label"]) - set(order))
        for ax, task in zip(axes[0], tasks, strict=True):
            group = part[part["task"] == task]
            sns.lineplot(
                data=group.sort_values("layer"), x="layer", y="value", hue="decoder_label",
                style="decoder_label", hue_order=order, style_order=order, markers=True,
                dashes=False, ax=ax,
            )  # fmt: skip
            _full_model_line(ax, group[group["decoder"] != "lspade"])
            metric = group["metric"].iloc[0]
            if perplexity:
                ax.set_yscale("log")
            ax.set(
                title=task,
                xlabel="layer decoded (blocks run)",
                ylabel=_label(metric) + (" (log scale, lower is better)" if perplexity else ""),
            )
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(title="decoder", fontsize="small")
        fig.suptitle("Layer-wise " + ("perplexity" if perplexity else "accuracy") + " per decoder")
        fig.tight_layout()
        path = out / f"layers_{'perplexity' if perplexity else 'accuracy'}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def _mark_chosen(ax, chosen: pd.DataFrame, x: str) -> None:
    """A star for each threshold `choose-threshold` chose (its results file's point)."""
    for _, point in chosen.iterrows():
        label = f"{point['series']}: T={point['threshold']:g}"
        ax.scatter(point[x], point["value"], marker="*", s=260, color="crimson", zorder=5,
                   edgecolor="black", linewidth=0.5, label=label)  # fmt: skip


def _exit_figure(
    main: pd.DataFrame,
    hue: str,
    legend: str,
    title: str,
    path: Path,
    oracles: pd.DataFrame | None = None,
) -> Path:
    import matplotlib.pyplot as plt
    import seaborn as sns

    tasks = sorted(main["task"].unique())
    is_chosen = main["chosen"].eq(True) if "chosen" in main else pd.Series(False, main.index)
    chosen, main = main[is_chosen], main[~is_chosen]
    order = sorted(main[hue].dropna().unique(), key=lambda s: (not str(s).startswith("SPADE"), s))
    axes_x = [
        ("mean_exit_layer", "mean exit layer (blocks run)"),
        ("compute_fraction", "compute fraction (block-token passes / full model)"),
    ]
    width = max(7, 5 * len(tasks)) * (1.6 if oracles is not None and len(oracles) else 1)
    fig, axes = plt.subplots(2, len(tasks), figsize=(width, 8), squeeze=False)
    for col, task in enumerate(tasks):
        group, marked = main[main["task"] == task], chosen[chosen["task"] == task]
        for row, (x, xlabel) in enumerate(axes_x):
            ax = axes[row][col]
            if len(group):  # a chosen threshold's folder alone has its star only
                sns.lineplot(
                    data=group.sort_values(x), x=x, y="value", hue=hue, style=hue,
                    hue_order=order, style_order=order, markers=True, dashes=False,
                    sort=False, ax=ax,
                )  # fmt: skip
            _full_model_line(ax, group[group.get("decoder", "") == "spade"])
            _mark_chosen(ax, marked, x)
            marked_oracle = oracles is not None and _mark_oracles(
                ax, oracles[oracles["task"] == task], x
            )
            metric = pd.concat([group, marked])["metric"].iloc[0]
            ax.set(title=task, xlabel=xlabel, ylabel=_label(metric))
            outside = {"loc": "upper left", "bbox_to_anchor": (1.01, 1)} if marked_oracle else {}
            ax.legend(title=legend, fontsize="small", **outside)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figures(table: pd.DataFrame, out: Path, oracles: pd.DataFrame | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    main = main_metrics(table)
    files = []
    if (main["kind"] == "layers").any():
        files += _layer_figures(main[main["kind"] == "layers"], out)
    if (main["kind"] == "thresholds").any():
        files.append(
            _exit_figure(
                main[main["kind"] == "thresholds"], "series", "exit rule",
                "SPADE-EXIT against baselines: accuracy vs exit layer and compute",
                out / "thresholds.png",
                None if oracles is None else oracles[oracles["kind"] == "thresholds"],
            )
        )  # fmt: skip
    if (main["kind"] == "transfer").any():
        files.append(
            _exit_figure(
                main[main["kind"] == "transfer"], "lens_task", "L-SPADE trained on",
                "SPADE-EXIT with L-SPADE trained on each task",
                out / "transfer.png",
            )
        )  # fmt: skip
    return files


def is_report_dir(path: Path) -> bool:
    """A report folder written by an earlier version (before output markers): only the
    CSV, markdown and PNG files `make_report` writes."""
    return all(
        p.is_file()
        and p.suffix in {".csv", ".md", ".png"}
        and p.name.startswith((*KINDS, "leaderboard", "oracle"))
        for p in path.iterdir()
    )


def make_report(
    dirs: list[Path], out: Path | None = None, overwrite: bool = False, allow_gaps: bool = False
) -> Report:
    """Read `dirs` (checked: `load_results`), write CSV, markdown and PNG files into `out`
    (default DIR/report, not elsewhere inside an input folder), written whole; an earlier
    report there is replaced only with `overwrite`."""
    dirs = inputs.check_dirs(dirs)
    out = Path(out) if out is not None else Path(dirs[0]) / "report"
    check_output(out, REPORT, overwrite, is_report_dir)
    inputs.check_out(out, dirs)
    table = load_results(dirs, allow_gaps)
    markdown = tables(table)
    names = []
    with staged_output(out, REPORT, overwrite, is_report_dir) as work:
        for kind, text in markdown.items():
            table[table["kind"] == kind].to_csv(work / f"{kind}.csv", index=False)
            (work / f"{kind}.md").write_text(text + "\n")
            names += [f"{kind}.csv", f"{kind}.md"]
        board = leaderboard(table)
        board.to_csv(work / "leaderboard.csv", index=False)
        markdown["leaderboard"] = leaderboard_markdown(board)
        (work / "leaderboard.md").write_text(markdown["leaderboard"] + "\n")
        names += ["leaderboard.csv", "leaderboard.md"]
        oracles = load_oracles(dirs)
        if not oracles.empty:
            oracles.to_csv(work / "oracle.csv", index=False)
            markdown["oracle"] = oracle_markdown(oracles)
            (work / "oracle.md").write_text(markdown["oracle"] + "\n")
            names += ["oracle.csv", "oracle.md"]
        names += [path.name for path in figures(table, work, oracles)]
    files = [out / name for name in names]
    logger.info("wrote %s", ", ".join(str(f) for f in files))
    return Report(table, files, markdown)
