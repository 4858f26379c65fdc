"""Answer-level exit rules: entropy and top-2 margin over a question's choices, and patience.

First on hand-made per-layer choice loglikelihoods, against a direct computation of each
rule; then a threshold sweep without a lens on stories260K (ARC with one-token letter
answers, and with whole-answer continuations), whose settings must equal real
`lm_eval --model spade-exit` runs of them (metrics, exit histograms, block-token passes,
confidence checks), and whose oracle file must rank the new families.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lmutil import DATA, STORIES, make_lm, rolling_requests, run_cli
from test_sweeps import assert_same_run, spade_exit_run, with_paths

from lm_eval_spade.confidence import Confidence, choice_uncertainties
from lm_eval_spade.config import SpadeArgumentError, SpadeConfig
from lm_eval_spade.decoders import DecoderKind
from lm_eval_spade.sweeps.model import RequestScores
from lm_eval_spade.sweeps.outcomes import ExitRule
from lm_eval_spade.sweeps.results import slug
from lm_eval_spade.sweeps.spec import Decoding, Layout, Signal
from lm_eval_spade.sweeps.views import ThresholdExit
from lm_eval_spade.tasks import offline

# --- hand-made scores ------------------------------------------------------------------------
L, TOKENS, CHECKS = 4, 10, (1, 2, 3)
SPADE, LOGIT = Decoding(DecoderKind.SPADE), Decoding(DecoderKind.LOGIT_LENS)
#: Per question, each choice's loglikelihood at layers 0..4 (the same for both decoders).
LOGLIKS = np.array(
    [
        [[-1, -1, -0.1, -0.1, -0.1], [-1, -2, -3, -4, -5], [-2, -2, -3, -4, -5]],
        [[-1, -3, -1, -1, -2], [-2, -1, -1.5, -2, -1], [-3, -2, -3, -3, -3]],
        [[-1, -1, -1, -1, -1], [-1, -1, -1, -1, -1.5], [-5, -5, -5, -5, -5]],
    ],
    dtype=np.float64,
)


def spade_passes(layer: int) -> float:
    """A request's SPADE fixed exit at `layer`: 10 prefix tokens, one scored position."""
    return TOKENS * layer + 2.0 * (L - layer)


def hand_scores(layout: Layout) -> list[RequestScores]:
    out = []
    for q, question in enumerate(LOGLIKS):
        for j, loglik in enumerate(question):
            per_column = torch.tensor([float(loglik[layer]) for _, layer in layout.columns])
            costs = [spade_passes(k) if d == SPADE else TOKENS * k for d, k in layout.columns]
            passes = torch.tensor(costs, dtype=torch.float64)
            out.append(
                RequestScores(
                    per_column,
                    torch.zeros(len(layout.columns), dtype=torch.bool),
                    passes,
                    float(TOKENS * L),
                    torch.full((len(layout.signals), L), math.nan),
                    1.0,
                    (q,),
                    3 * q + j,
                    scored=1.0,
                )
            )
    return out


def direct(question: np.ndarray, measure: Confidence) -> list[float]:
    """The rule's uncertainty at each check, from its definition."""
    values, answers = [], []
    for layer in CHECKS:
        ll = question[:, layer]
        q = np.exp(ll - ll.max()) / np.exp(ll - ll.max()).sum()
        top = np.sort(q)[::-1]
        answers.append(int(np.argmax(ll)))
        if measure is Confidence.ANSWER_ENTROPY:
            values.append(float(-(q * np.log(q)).sum()))
        elif measure is Confidence.ANSWER_MARGIN:
            values.append(math.inf if top[0] == top[1] else float(-np.log(top[0] - top[1])))
        else:
            held = 0
            while held + 1 < len(answers) and answers[-held - 2] == answers[-1]:
                held += 1
            values.append(-float(held))
    return values


@pytest.mark.parametrize(
    ("measure", "thresholds"),
    [
        (Confidence.ANSWER_ENTROPY, (0.05, 0.5, 0.8, 1.0, math.inf)),
        (Confidence.ANSWER_MARGIN, (0.1, 0.5, 1.0, 3.0, math.inf)),
        (Confidence.PATIENCE, (-3.0, -2.0, -1.0, 0.0)),  # patience 3, 2, 1, 0
    ],
)
@pytest.mark.parametrize("source", [SPADE, LOGIT])
def test_rule_decisions_on_hand_made_scores_match_a_direct_computation(measure, thresholds, source):
    signal = Signal(source, measure)
    layout = Layout.build([SPADE, LOGIT], [signal], L, {})
    scores = hand_scores(layout)
    rule = ExitRule(layout, signal, CHECKS, SPADE)
    exit_index = rule.exit_index(scores, np.array(thresholds))
    for q, question in enumerate(LOGLIKS):
        u = direct(question, measure)
        got = choice_uncertainties(torch.tensor(question[:, list(CHECKS)].T), measure)
        assert got.tolist() == pytest.approx(u)
        for t, threshold in enumerate(thresholds):
            exit = next((k for k, value in zip(CHECKS, u, strict=True) if value <= threshold), L)
            chosen = ThresholdExit(layout, signal, threshold, SPADE, CHECKS, 1, 1).choose(scores)
            made = [k for k in CHECKS if k <= exit]
            # a SPADE confidence decoder costs its passes above each check made; at the
            # exit check its decoding is the answer's (reused)
            extra = sum(2.0 * (L - k) for k in made if k != exit) if source == SPADE else 0.0
            for j in range(3):  # every choice of the question exits together
                c, record = chosen[3 * q + j]
                assert layout.columns[c] == (SPADE, exit), (q, threshold)
                assert record.exit_layer == exit
                assert record.passes_run == pytest.approx(spade_passes(exit) + extra)
                assert record.checks == len(made)
                assert rule.layers[exit_index[3 * q + j, t]] == exit


def test_patience_counts_only_from_the_first_check():
    """The answer is the same at layers 0..2 and changes at 3: counted from a first check
    at 2, it has held over one check only at 4 (patience 1), never at 2."""
    question = np.array([[-1, -1, -1, -3, -3, -3], [-2, -2, -2, -1, -1, -1]], dtype=np.float64)
    held = choice_uncertainties(torch.tensor(question[:, 2:5].T), Confidence.PATIENCE)
    assert held.tolist() == [0, -0.0, -1]  # checks 2, 3, 4: the answer changes at 3
    assert choice_uncertainties(
        torch.tensor([[0.0], [1.0]]), Confidence.ANSWER_MARGIN
    ).tolist() == [
        0,
        0,
    ]  # one choice: certain


def test_settings_are_checked():
    assert SpadeConfig.from_model_args(
        patience=2, confidence_decoder="spade"
    ).exit_threshold == pytest.approx(-2)
    bad = [
        (dict(confidence="patience", confidence_decoder="spade", threshold=1), "add patience=K"),
        (dict(patience=1, threshold=1.0, confidence_decoder="logit_lens"), "not both"),
        (dict(patience=-1, confidence_decoder="logit_lens"), "at least 0"),
        (
            dict(patience=1, confidence="entropy", confidence_decoder="logit_lens"),
            "drop confidence",
        ),
        (dict(threshold=1.0, confidence_decoder="spade"), "serves only the answer-level"),
        (dict(patience=1), "needs a confidence source"),
    ]
    for args, message in bad:
        with pytest.raises(SpadeArgumentError, match=message):
            SpadeConfig.from_model_args(**args)


@pytest.mark.shared
def test_answer_level_rules_refuse_perplexity_and_generation_requests():
    from lm_eval.api.instance import Instance

    lm = make_lm("spade-exit", STORIES, confidence="answer_entropy", threshold=1.0,
                 confidence_decoder="logit_lens")  # fmt: skip
    with pytest.raises(SpadeArgumentError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling(rolling_requests())
    prompt = ("Once upon a time", {"until": ["."], "max_gen_toks": 4, "do_sample": False})
    request = Instance("generate_until", {}, prompt, 0, metadata=("gen", 0, 1))
    with pytest.raises(SpadeArgumentError, match="generate_until requests have none"):
        lm.generate_until([request])


# --- a sweep without a lens against real spade-exit runs -------------------------------------
ARC = "arc_easy_spade"
LIMIT = 8


#: ARC-Easy scored on each choice's whole text (multi-token continuations).
TEXT_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {root}/ARC-Easy-Dev.jsonl
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def letters(tmp_path_factory) -> tuple[str, str]:
    """A task folder, and its ARC task with whole-text answers."""
    root = tmp_path_factory.mktemp("tasks")
    name = "arc_easy_text_rules"
    data = DATA / "arc" / "ARC-Easy"
    (root / f"{name}.yaml").write_text(TEXT_TASK.format(name=name, root=data))
    return str(root), name


@pytest.fixture(scope="module")
def answer_sweep(tmp_path_factory, letters) -> Path:
    include, letter_task = letters
    out = tmp_path_factory.mktemp("answers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(offline.ENV, str(DATA))
        run_cli(
            "sweep", "thresholds", "--model", str(STORIES), "--tasks", ARC, letter_task,
            "--include-path", include, "--limit", str(LIMIT), "--out", str(out),
            "--answer-decoders", "spade", "logit_lens", "--patience", "0", "1", "2",
            "--thresholds", "0.01", "0.1", "1.23", "1.8", "--no-full-depth-timing",
        )  # fmt: skip
    return out


def swept(out: Path, name: str) -> dict:
    return json.loads((out / "results" / f"{slug(name)}.json").read_text())


#: Thresholds where some questions exit and others go on, on this model (stories260K).
SETTINGS = [
    "answer margin (SPADE)_T1.8",
    "answer entropy (SPADE)_T1.23",
    "answer entropy (logit lens)_T0.1",
    "patience (SPADE)_P1",
    "patience (logit lens)_P2",
]


@pytest.fixture(scope="module")
def manager(letters):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=letters[0])


@pytest.mark.shared
@pytest.mark.parametrize("name", SETTINGS)
def test_answer_rule_sweep_settings_equal_spade_exit_runs(answer_sweep, letters, manager, name):
    tasks = [ARC, letters[1]]
    result = swept(answer_sweep, name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(offline.ENV, str(DATA))
        real = spade_exit_run(manager, with_paths(result["config"]["model_args"]), tasks)
    assert_same_run(result, real, tasks)


@pytest.mark.shared
def test_answer_rules_exit_early_and_enter_the_oracle_file(answer_sweep, letters):
    sweep = json.loads((answer_sweep / "sweep.json").read_text())
    assert sweep["lens"] is None and sweep["patience"] == [0, 1, 2]
    histograms = [
        swept(answer_sweep, name)["config"]["spade"]["tasks"][task]["exit_layer_histogram"]
        for name in SETTINGS
        for task in (ARC, letters[1])
    ]
    assert sum(len(h) > 1 for h in histograms) >= 5  # some questions exit, others go on
    assert (
        swept(answer_sweep, "patience (SPADE)_P0")["config"]["spade"]["tasks"][ARC][
            "mean_exit_layer"
        ]
        == 1
    )  # patience 0 exits at the first check
    oracle = json.loads((answer_sweep / "oracle.json").read_text())
    for task in (ARC, letters[1]):
        rules = {r["family"]: r for r in oracle["tasks"][task]["rules"]}
        for source in ("SPADE", "logit lens"):
            assert {f"answer entropy ({source})", f"answer margin ({source})"} <= set(rules)
            assert f"patience ({source})" in rules
        for family, rule in rules.items():
            point = rule["cheapest_within_point"]
            if point is None:
                continue
            name = (
                f"{family}_P{point['patience']}"
                if "patience" in point
                else f"{family}_T{float(point['threshold']):g}"
            )
            stats = swept(answer_sweep, name)
            compute = stats["config"]["spade"]["tasks"][task]["compute_fraction"]
            assert point["compute_fraction"] == pytest.approx(compute), (task, family)
            assert "share_of_oracle_saving" in point


# --- a lens as the confidence decoder (the calibration model and its L-SPADE lens) ----------
@pytest.fixture(scope="module")
def lens_sweep(tmp_path_factory) -> Path:
    from lm_eval_spade import calibration

    out = tmp_path_factory.mktemp("lens-answers")
    run_cli(
        "sweep", "thresholds", "--model", calibration.NAME, "--lens", calibration.NAME,
        "--tasks", calibration.TASK, "--limit", "24", "--out", str(out), "--no-baselines",
        "--answer-decoders", "lens", "--patience", "2", "--thresholds", "0.2",
        "--no-full-depth-timing",
    )  # fmt: skip
    return out


@pytest.mark.shared
@pytest.mark.parametrize("name", ["answer margin (L-SPADE)_T0.2", "patience (L-SPADE)_P2"])
def test_lens_answer_rules_equal_spade_exit_runs(lens_sweep, manager, name):
    from lm_eval_spade import calibration

    result = swept(lens_sweep, name)
    assert "lens=spade-calibration" in result["config"]["model_args"]
    assert len(result["config"]["spade"]["tasks"][calibration.TASK]["exit_layer_histogram"]) > 2
    real = spade_exit_run(manager, result["config"]["model_args"], [calibration.TASK], limit=24)
    assert_same_run(result, real, [calibration.TASK])


@pytest.mark.shared
def test_choose_threshold_calibrates_an_answer_level_rule(tmp_path, manager):
    """choose-threshold over answer-entropy thresholds; its chosen setting's results file
    is the real spade-exit run of the model_args it prints."""
    from lm_eval_spade import calibration

    out = tmp_path / "choose"
    run_cli(
        "choose-threshold", "--model", calibration.NAME, "--task", calibration.TASK,
        "--confidence", "answer_entropy", "--confidence-decoder", "logit_lens",
        "--limit", "40", "--max-drop", "0.1", "--eval-tasks", calibration.TASK,
        "--eval-limit", "24", "--out", str(out),
    )  # fmt: skip
    chosen = json.loads((out / "choose_threshold.json").read_text())["chosen"]
    assert "confidence=answer_entropy,confidence_decoder=logit_lens" in chosen["model_args"]
    written = json.loads((out / "results" / "chosen.json").read_text())
    real = spade_exit_run(manager, written["config"]["model_args"], [calibration.TASK], limit=24)
    assert_same_run(written, real, [calibration.TASK])
