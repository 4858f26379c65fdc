"""Sweeps and report on stories260K with the real ARC files and the story-sentence task.

Each sweep's numbers are checked against real `lm_eval --model spade-exit` runs
(`simple_evaluate`) of the setting its results file names: same metric, exit histogram
and compute fraction.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import lm_eval
import matplotlib.image
import pandas as pd
import pytest
from lmutil import DATA, REPO, STORIES, run_cli

from lm_eval_spade.lens.jobs import DataSpec, train_and_save
from lm_eval_spade.lens.training import LensTrainConfig
from lm_eval_spade.lens.translators import LensKind
from lm_eval_spade.paths import portable
from lm_eval_spade.sweeps.layers import cost_summary
from lm_eval_spade.sweeps.report import markdown_table
from lm_eval_spade.sweeps.results import slug
from lm_eval_spade.sweeps.settings import SweepSettings
from lm_eval_spade.sweeps.thresholds import ThresholdSweepConfig
from lm_eval_spade.sweeps.transfer import TransferConfig, run_transfer_sweep
from lm_eval_spade.sweeps.views import ScoringCost
from lm_eval_spade.tasks import offline

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)

ARC, STORY = "arc_easy_spade", "tinystories_sentences_spade"
LIMIT = 8


@pytest.fixture(scope="module", autouse=True)
def local_data():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(offline.ENV, str(DATA))
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def lens(tmp_path_factory, local_data) -> Path:
    """A small L-SPADE lens on ARC-Easy training prompts (a few seconds)."""
    out = tmp_path_factory.mktemp("lens") / "arc"
    config = LensTrainConfig(LensKind.LSPADE, steps=20, batch_size=8)
    train_and_save(str(STORIES), DataSpec(ARC, limit=48), config, out)
    return out


@pytest.fixture(scope="module")
def layer_sweep(tmp_path_factory, lens) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("layers")
    printed = run_cli(
        "sweep", "layers", "--model", str(STORIES), "--tasks", STORY, ARC,
        "--limit", str(LIMIT), "--batch-size", "4", "--out", str(out), "--lens", str(lens),
        "--spade-start", "pair",  # the pass counts below are the pair's
    )  # fmt: skip
    return out, printed


@pytest.fixture(scope="module")
def threshold_sweep(tmp_path_factory, lens) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("thresholds")
    printed = run_cli(
        "sweep", "thresholds", "--model", str(STORIES), "--tasks", ARC, "--limit", str(LIMIT),
        "--out", str(out), "--lens", str(lens), "--thresholds", "1.5,2.5", "inf",
    )  # fmt: skip
    return out, printed


def results(out: Path, name: str) -> dict:
    return json.loads((out / "results" / f"{name}.json").read_text())


def with_paths(model_args: str, *folders: Path) -> str:
    """A results file's model_args with this machine's paths back: outputs record a model
    or lens folder outside the working directory by its name (`lm_eval_spade/paths.py`)."""
    named = {folder.name: str(folder) for folder in (STORIES, *folders)}
    return ",".join(
        f"{key}={named.get(value, value)}" if key in ("pretrained", "lens") else f"{key}={value}"
        for key, value in (part.split("=", 1) for part in model_args.split(","))
    )


@pytest.fixture(scope="module")
def task_manager(local_data):
    from lm_eval.tasks import TaskManager

    return TaskManager()


def spade_exit_run(manager, model_args: str, tasks: list[str], limit: int = LIMIT) -> dict:
    """A real `lm_eval --model spade-exit` run (simple_evaluate)."""
    return lm_eval.simple_evaluate(
        model="spade-exit", model_args=model_args, tasks=tasks, limit=limit,
        batch_size=4, bootstrap_iters=0, verbosity="WARNING", task_manager=manager,
    )  # fmt: skip


def assert_same_run(swept: dict, real: dict, tasks: list[str]) -> None:
    for task in tasks:
        for key, value in real["results"][task].items():
            if key.endswith(",none") and "_stderr" not in key:
                assert swept["results"][task][key] == pytest.approx(value, rel=1e-4), (task, key)
        mine, theirs = (
            swept["config"]["spade"]["tasks"][task],
            real["config"]["spade"]["tasks"][task],
        )
        for key in ("requests", "exit_layer_histogram", "block_token_passes", "confidence_checks"):
            assert mine[key] == theirs[key], (task, key)
        assert mine["compute_fraction"] == pytest.approx(theirs["compute_fraction"])
    # the sweep's file records the run's settings with portable paths (paths.py)
    assert swept["config"]["spade"]["config"] == portable(real["config"]["spade"]["config"])


@pytest.mark.parametrize(
    ("name", "layer"),
    [("spade_L1", 1), ("spade_nos_L3", 3), ("lspade_L4", 4)],
)
def test_layer_sweep_equals_fixed_layer_runs(layer_sweep, lens, task_manager, name, layer):
    out, _ = layer_sweep
    swept = results(out, name)
    assert swept["sweep"]["layer"] == layer
    real = spade_exit_run(
        task_manager, with_paths(swept["config"]["model_args"], lens), [STORY, ARC]
    )
    assert_same_run(swept, real, [STORY, ARC])


def test_layer_sweep_covers_every_decoder_and_layer_and_prints_its_cost(layer_sweep):
    out, printed = layer_sweep
    names = {p.stem for p in (out / "results").glob("*.json")}
    decoders = ("logit_lens", "spade", "spade_nos", "lspade")
    assert names == {f"{d}_L{k}" for d in decoders for k in range(6)}
    manifest = json.loads((out / "sweep.json").read_text())
    cost = manifest["cost"]
    assert manifest["kind"] == "layers" and cost["requests"] == 3 + 4 * LIMIT
    # the prefix runs once: 24 settings cost far less than 24 runs
    assert 1 < cost["pass_ratio"] < 2.5
    assert "cost ratio" in printed and f"{cost['pass_ratio']:.2f}x block-token passes" in printed
    # per scored position, SPADE's pair climbs 2(L - l) block-tokens above each layer l < L
    # and SPADE-NoS L - l: 30 + 15 = 45 for L = 5 (the lenses climb nothing), except that
    # each of the 3 story documents' first position is its start token, which SPADE climbs
    # alone (15, not 30)
    extra = cost["extra_passes_per_scored_position"] * cost["scored_positions"]
    assert extra == pytest.approx(45 * cost["scored_positions"] - 3 * 15)
    assert f"Each of the {cost['scored_positions']:.0f} scored positions" in printed
    assert "### tinystories_sentences_spade: word perplexity by layer" in printed
    # every decoder but the trained one is the full model at the last layer
    full = {results(out, f"{d}_L5")["results"][STORY]["word_perplexity,none"] for d in decoders[:3]}
    assert max(full) == pytest.approx(min(full), rel=1e-6)


def test_threshold_sweep_equals_spade_exit_runs(threshold_sweep, lens, task_manager):
    out, printed = threshold_sweep
    names = {p.stem for p in (out / "results").glob("*.json")}
    assert {"SPADE-EXIT_T1.5", "top-2-margin-L-SPADE-_T2.5", "entropy-logit-lens-_Tinf"} <= names
    assert {f"static-exit-SPADE-_L{k}" for k in range(6)} <= names
    for name in ("SPADE-EXIT_T2.5", "entropy-logit-lens-_T1.5"):
        swept = results(out, name)
        real = spade_exit_run(task_manager, with_paths(swept["config"]["model_args"], lens), [ARC])
        assert_same_run(swept, real, [ARC])
    # inf exits everything at the first check
    assert results(out, "SPADE-EXIT_Tinf")["config"]["spade"]["tasks"][ARC]["mean_exit_layer"] == 1
    # the threshold sweeps keep spade-exit's default climb (the layer sweep shares it)
    assert results(out, "SPADE-EXIT_T2.5")["config"]["spade"]["config"]["spade_start"] == "pair"
    assert "SPADE-EXIT" in printed and "cost ratio" in printed


@pytest.fixture(scope="module")
def transfer_sweep(tmp_path_factory, lens):
    out = tmp_path_factory.mktemp("transfer")
    settings = SweepSettings(str(STORIES), [ARC, "arc_challenge_spade"], out, limit=4, batch_size=8)
    config = TransferConfig(
        ThresholdSweepConfig([2.0, 3.0]),
        train_tasks=[ARC, "arc_challenge_spade"],
        lenses={ARC: str(lens)},  # one given, one trained here
        training=LensTrainConfig(LensKind.LSPADE, steps=5, batch_size=8),
        train_limit=16,
    )
    return out, run_transfer_sweep(settings, config)


def test_transfer_trains_a_lens_per_task_and_evaluates_every_task(
    transfer_sweep, lens, task_manager
):
    out, outcome = transfer_sweep
    assert (out / "lenses" / "arc_challenge_spade" / "config.json").is_file()
    placed = {(r["sweep"]["lens_task"], r["sweep"]["threshold"]) for r in outcome.results}
    assert placed == {(t, x) for t in (ARC, "arc_challenge_spade") for x in (2.0, 3.0)}
    for r in outcome.results:
        assert set(r["results"]) == {ARC, "arc_challenge_spade"}
    swept = results(out, "L-SPADE-trained-on-arc_challenge_spade_T3")
    tasks = [ARC, "arc_challenge_spade"]
    model_args = with_paths(swept["config"]["model_args"], lens, out / "lenses" / tasks[1])
    real = spade_exit_run(task_manager, model_args, tasks, limit=4)
    assert_same_run(swept, real, [ARC, "arc_challenge_spade"])


def oracle_file(out: Path) -> dict:
    """The sweep's oracle file, named by its manifest, with no NaN or infinity."""
    assert json.loads((out / "sweep.json").read_text())["oracle"] == "oracle.json"
    text = (out / "oracle.json").read_text()
    assert not re.search(r"\bNaN\b|Infinity", text)
    return json.loads(text)


def task_stats(out: Path, name: str, task: str = ARC) -> tuple[float, float]:
    """Accuracy and compute fraction of one results file of a sweep."""
    data = results(out, name)
    return data["results"][task]["acc,none"], data["config"]["spade"]["tasks"][task][
        "compute_fraction"
    ]


def test_sweeps_write_an_oracle_consistent_with_their_results(layer_sweep, threshold_sweep):
    out = layer_sweep[0]
    found = oracle_file(out)
    assert found["tasks"][STORY]["skipped"].startswith("a loglikelihood_rolling task")
    arc = found["tasks"][ARC]
    full, _ = task_stats(out, "spade_L5")
    assert arc["questions"] == LIMIT and arc["full_depth"]["accuracy"] == pytest.approx(full)
    assert [d["decoder"] for d in arc["decoders"]] == ["logit_lens", "spade", "spade_nos", "lspade"]
    for decoder in arc["decoders"]:
        _, at_l = task_stats(out, f"{decoder['decoder']}_L5")
        assert at_l == pytest.approx(1) and decoder["oracle"]["compute_fraction"] <= at_l + 1e-12
        assert decoder["oracle"]["accuracy"] == pytest.approx(full)
        assert decoder["oracle"]["disagreements"] == 0
        frontier = decoder["static_frontier"]
        acc, compute = task_stats(out, f"{decoder['decoder']}_L{frontier['layer']}")
        assert (frontier["accuracy"], frontier["compute_fraction"]) == pytest.approx((acc, compute))
        assert acc >= full - 0.01
    out = threshold_sweep[0]
    arc = oracle_file(out)["tasks"][ARC]
    checks = json.loads((out / "sweep.json").read_text())["checks"]
    assert [(d["decoder"], d["checks"]) for d in arc["decoders"]] == [
        ("spade", [*checks, 5]),
        ("logit_lens", [*checks, 5]),
    ]
    families = {r["family"]: r for r in arc["rules"]}
    assert set(families) == {"SPADE-EXIT", "top-2 margin (L-SPADE)", "entropy (logit lens)"}
    for family, rule in families.items():
        point = rule["cheapest_within_point"]
        if point is None:  # no threshold within 1 point: the file says so
            assert rule["why_null"]
            continue
        acc, compute = task_stats(out, slug(f"{family}_T{float(point['threshold']):g}"))
        assert (point["accuracy"], point["compute_fraction"]) == pytest.approx((acc, compute))


def test_a_sweep_without_an_oracle_file_reports_as_before(threshold_sweep, tmp_path):
    earlier = tmp_path / "sweep"
    shutil.copytree(threshold_sweep[0], earlier)
    (earlier / "oracle.json").unlink()
    printed = run_cli("report", str(earlier), "--out", str(tmp_path / "report"))
    assert "oracle exits" not in printed
    assert not (tmp_path / "report" / "oracle.md").exists()
    _check_png(tmp_path / "report" / "thresholds.png")


def _check_png(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 400 and image.shape[1] >= 600, image.shape
    assert image[..., :3].std() > 0.05  # not blank


def test_report_renders_tables_and_figures(layer_sweep, threshold_sweep, transfer_sweep, tmp_path):
    dirs = [layer_sweep[0], threshold_sweep[0], transfer_sweep[0]]
    printed = run_cli("report", *map(str, dirs), "--out", str(tmp_path))
    for kind in ("layers", "thresholds", "transfer"):
        assert (tmp_path / f"{kind}.csv").stat().st_size > 0
        text = (tmp_path / f"{kind}.md").read_text()
        assert text.startswith("### ") and not re.search(r"\bnan\b", text, re.IGNORECASE)
    pngs = ["layers_accuracy.png", "layers_perplexity.png", "thresholds.png", "transfer.png"]
    for png in pngs:
        _check_png(tmp_path / png)
    assert "| layer |" in printed.replace("|   layer |", "| layer |")
    assert "L-SPADE trained on" in printed
    # the oracle files of all three sweeps: one table, and points on the thresholds figure
    oracle = (tmp_path / "oracle.md").read_text()
    for kind in ("layers", "thresholds", "transfer"):
        assert (
            f"### {ARC} ({kind} sweep): oracle exits ({LIMIT if kind != 'transfer' else 4}"
            in oracle
        )
    assert f"No oracle for {STORY} (layers sweep)" in oracle and "oracle at 1 point" in oracle
    assert not re.search(r"\bnan\b", oracle, re.IGNORECASE) and oracle in printed
    rows = pd.read_csv(tmp_path / "oracle.csv")
    assert {"oracle", "oracle at 1 point", "static frontier", "SPADE-EXIT"} <= set(rows["rule"])


def test_markdown_tables_show_missing_values_as_a_dash():
    frame = pd.DataFrame({"layer": [1, 2], "L-SPADE": [float("nan"), 0.61234]})
    lines = markdown_table(frame, index=False, floatfmt=".3f").splitlines()
    assert lines[2].split("|")[2].strip() == "—"
    assert lines[3].split("|")[2].strip() == "0.612"


def test_report_reads_plain_lm_eval_output(tmp_path, task_manager):
    args = f"pretrained={STORIES},device=cpu,add_bos_token=True,exit_layer=2"
    real = spade_exit_run(task_manager, args, [ARC])
    folder = tmp_path / "lm_eval_out" / "model"
    folder.mkdir(parents=True)
    (folder / "results_2024.json").write_text(json.dumps(real, default=str))
    printed = run_cli("report", str(tmp_path / "lm_eval_out"))
    assert f"### {ARC}: accuracy by layer" in printed
    assert f"{real['results'][ARC]['acc,none']:.4g}" in printed


def _error(*argv: str) -> str:
    with pytest.raises(SystemExit) as caught:
        run_cli(*argv)
    message = str(caught.value.code)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_bad_input_gives_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no lm-eval results" in _error("report", str(empty))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.json").write_text('{"name": "not results"}')
    (foreign / "broken.json").write_text("{")
    assert "holds no lm-eval results" in _error("report", str(foreign))
    assert "is not a folder" in _error("report", str(tmp_path / "missing"))
    common = ["--model", str(STORIES), "--tasks", ARC, "--out", str(tmp_path / "o")]
    message = _error("sweep", "layers", *common, "--decoders", "spade", "logitlens")
    assert "unknown decoder name(s) 'logitlens'" in message and "logit_lens" in message
    message = _error("sweep", "layers", *common, "--decoders", "lspade")
    assert "needs a lens" in message
    message = _error("sweep", "thresholds", *common, "--lens", "x", "--thresholds", "0.5", "low")
    assert "threshold 'low' is not a number" in message
    assert "knows no task 'no_such_task'" in _error(
        "sweep", "layers", "--model", str(STORIES), "--tasks", "no_such_task", "--out", "o"
    )
    assert "sets exit_layer" in _error("sweep", "layers", *common, "--model-args", "exit_layer=2")
    assert "must be TASK=DIR" in _error(
        "sweep", "transfer", *common, "--thresholds", "1", "--lens", "nodir"
    )


def test_leaderboard_ranks_settings_over_tasks_with_speedups(tmp_path):
    """From the committed calibration sweep: one row per setting, a column per task, the
    full model first, SPADE-EXIT's points with their compute fraction; a measured timing
    becomes the speedup column."""
    from lm_eval_spade.sweeps.report import leaderboard, load_results

    source = REPO / "results" / "sweeps" / "thresholds-calibration"
    timed = tmp_path / "timed"
    shutil.copytree(source / "results", timed)
    point = timed / "SPADE-EXIT_T0.05.json"
    data = json.loads(point.read_text())
    data["timing"] = {"seconds": 2.0, "hf_seconds": 3.0}
    point.write_text(json.dumps(data))
    board = leaderboard(load_results([timed]))
    (full,) = board[board["rule"] == "full model"].to_dict("records")
    assert full["point"] == "full depth" and full["compute fraction"] == 1.0
    assert full["spade_calibration"] == pytest.approx(0.9567, abs=1e-4)
    # Ties on the average go to the cheaper setting: an exit that loses nothing ranks first.
    top = board.iloc[0]
    assert top["average"] == pytest.approx(full["average"]) and top["compute fraction"] < 1
    assert len(board) == len(board[["model", "rule", "point"]].drop_duplicates())
    exit_row = board[(board["rule"] == "SPADE-EXIT") & (board["point"] == "threshold 0.05")]
    (row,) = exit_row.to_dict("records")
    assert row["spade_calibration"] == pytest.approx(0.91)
    assert row["compute fraction"] == pytest.approx(0.97976, abs=1e-4)
    assert row["speedup vs hf"] == pytest.approx(1.5)
    averages = board["average"].dropna().tolist()
    assert averages == sorted(averages, reverse=True)


def test_leaderboard_keeps_the_speedup_of_a_timed_copy_of_a_swept_setting(tmp_path):
    """A setting both swept (no timing) and timed on its own is one row with the speedup."""
    from lm_eval_spade.sweeps.report import leaderboard, load_results

    source = REPO / "results" / "sweeps" / "thresholds-calibration" / "results"
    timed = tmp_path / "timed"
    timed.mkdir()
    data = json.loads((source / "SPADE-EXIT_T0.05.json").read_text())
    data["timing"] = {"seconds": 1.0, "hf_seconds": 1.25}
    (timed / "SPADE-EXIT_T0.05.json").write_text(json.dumps(data))
    hf = json.loads((source / "SPADE-EXIT_T0.05.json").read_text())
    del hf["config"]["spade"], hf["sweep"]  # as `lm_eval --model hf` writes it
    (timed / "hf.json").write_text(json.dumps(hf))
    board = leaderboard(load_results([source, timed]))
    row = board[(board["rule"] == "SPADE-EXIT") & (board["point"] == "threshold 0.05")]
    assert row["speedup vs hf"].tolist() == [pytest.approx(1.25)]
    # hf is its own row: it may score other tokens than spade-exit's full depth.
    assert board[board["rule"] == "hf"]["point"].tolist() == ["full depth"]
    assert len(board[board["rule"] == "full model"]) == 1


def test_report_names_the_model_from_model_args_as_string_or_dict():
    """lm-eval records model_args as the command's string or, in newer versions, a dict."""
    from lm_eval_spade.sweeps.report import _model_name

    assert _model_name("pretrained=/m/SmolLM2,peft=/a/arc,exit_layer=3") == "SmolLM2 + arc"
    assert _model_name({"pretrained": "/m/SmolLM2", "prefix_token_id": 0}) == "SmolLM2"
    assert _model_name(None) == "?"


def test_a_rerun_replaces_the_earlier_sweep_whole_and_only_when_asked(
    threshold_sweep, lens, tmp_path
):
    earlier = tmp_path / "sweep"
    shutil.copytree(threshold_sweep[0], earlier)
    before = {p.stem for p in (earlier / "results").glob("*.json")}
    rerun = [
        "sweep", "thresholds", "--model", str(STORIES), "--tasks", ARC, "--limit", "2",
        "--out", str(earlier), "--lens", str(lens), "--thresholds", "0.5", "--no-baselines",
    ]  # fmt: skip
    assert "add --overwrite" in _error(*rerun)
    assert {p.stem for p in (earlier / "results").glob("*.json")} == before
    run_cli(*rerun, "--overwrite")
    after = {p.stem for p in (earlier / "results").glob("*.json")}
    assert after == {"SPADE-EXIT_T0.5", *(f"static-exit-SPADE-_L{k}" for k in range(6))}
    assert json.loads((earlier / "sweep.json").read_text())["thresholds"] == [0.5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]


def test_cost_line_and_record_without_a_base_hold_no_nan():
    """An untimed full-depth run and no scored positions: the printed line leaves those
    numbers out and `sweep.json` records null, never NaN."""
    cost = ScoringCost(seconds=1.5, block_token_passes=30.0, full_depth_passes=20.0, requests=2)
    line = cost_summary(cost, 4)
    assert "nan" not in line.lower() and "(full-depth run not timed) 1.50x" in line
    assert "scored positions" not in line
    record = cost.to_dict()
    assert record["time_ratio"] is None and record["extra_passes_per_scored_position"] is None
    cost.scored_positions = 5.0
    assert "Each of the 5 scored positions cost 2.0 block-token passes beyond" in cost_summary(
        cost, 4
    )
    cost.full_depth_seconds = 2.0  # the sweep beat the separately timed full-depth run
    assert "2.0 block-token passes (and 100.00 ms less wall clock) beyond" in cost_summary(cost, 4)
    cost.full_depth_seconds = 1.0
    assert "2.0 block-token passes and 100.00 ms beyond" in cost_summary(cost, 4)
