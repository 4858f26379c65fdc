"""The calibration task family and the committed calibration model."""

from __future__ import annotations

import json

import lm_eval
import pytest
import transformers as T

from lm_eval_spade import calibration
from lm_eval_spade.calibration.jobs import calibrate, lens_config
from lm_eval_spade.calibration.task import LETTERS, TaskSpec, prompt, split_items
from lm_eval_spade.calibration.training import CalibrationConfig, heldout_accuracy
from lm_eval_spade.errors import UserInputError


def test_items_are_seeded_correct_and_held_out():
    spec = TaskSpec()
    test = split_items(spec, "test")
    assert test == split_items(spec, "test")  # same seed, same items
    keys = {(d["question"], tuple(d["choices"])) for d in test}
    assert not keys & {(d["question"], tuple(d["choices"])) for d in split_items(spec, "train")}
    for doc in test:
        terms = [int(t) for t in doc["question"].removesuffix(" = ?").split(" + ")]
        assert len(terms) == doc["level"] and int(doc["choices"][doc["label"]]) == sum(terms)
        assert len(set(doc["choices"])) == 4
    assert {d["level"] for d in test} == {1, 2, 3}


def test_every_prompt_word_and_answer_is_one_token():
    tokenizer = T.AutoTokenizer.from_pretrained(calibration.model_dir())
    doc = split_items(TaskSpec(), "test")[5]
    ids = tokenizer(prompt(doc) + " " + LETTERS[doc["label"]])["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert len(ids) == 1 + len((prompt(doc) + " A").split())


def test_committed_model_meets_the_accuracy_bar_through_lm_eval():
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={calibration.model_dir()}",
        tasks=[calibration.TASK], batch_size=64, device="cpu",
    )  # fmt: skip
    acc = out["results"][calibration.TASK]["acc,none"]
    assert acc >= 0.9
    record = json.loads((calibration.model_dir() / "training.json").read_text())
    assert acc == pytest.approx(record["heldout_accuracy"]["all"], abs=1e-9)


def test_spade_exit_defaults_to_the_calibration_model_and_exits_early():
    out = lm_eval.simple_evaluate(
        model="spade-exit", model_args=f"lens={calibration.NAME},threshold=0.05",
        tasks=[calibration.TASK], batch_size=64, device="cpu", limit=200,
    )  # fmt: skip
    stats = out["config"]["spade"]["tasks"][calibration.TASK]
    assert stats["num_layers"] == 12
    assert stats["mean_exit_layer"] < 12 and stats["compute_fraction"] < 1
    assert out["results"][calibration.TASK]["acc,none"] >= 0.85


def test_calibrate_command_trains_a_model_and_lens_that_spade_exit_loads(tmp_path):
    config = CalibrationConfig(layers=2, hidden_size=16, steps=20, batch_size=16)
    lens = lens_config()
    lens.steps = 5
    info, trained = calibrate(config, tmp_path, lens)
    assert set(info["heldout_accuracy"]) == {"all", "level_1", "level_2", "level_3"}
    assert list(trained.report["layer"]) == [0, 1]
    out = lm_eval.simple_evaluate(
        model="spade-exit",
        model_args=f"pretrained={tmp_path / 'model'},lens={tmp_path / 'lspade'},threshold=0.5",
        tasks=[calibration.TASK], batch_size=64, device="cpu", limit=20,
    )  # fmt: skip
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokenizer = T.AutoTokenizer.from_pretrained(tmp_path / "model")
    assert info["heldout_accuracy"] == heldout_accuracy(model, tokenizer, TaskSpec())
    assert out["config"]["spade"]["tasks"][calibration.TASK]["requests"] == 80


def test_bad_calibration_settings_name_the_problem():
    with pytest.raises(UserInputError, match="hidden_size=30 is not a multiple of heads=4"):
        CalibrationConfig(hidden_size=30).check()
    with pytest.raises(UserInputError, match="steps=0"):
        CalibrationConfig(steps=0).check()


def test_level_tasks_split_the_held_out_test_items():
    from lm_eval_spade.calibration.task import dataset

    full = dataset(version=1.0)["test"]
    parts = [dataset(levels=[n])["test"] for n in (1, 2, 3)]
    assert [len(p) for p in parts] == [200, 200, 200] and len(full) == 600
    assert [set(p["level"]) for p in parts] == [{1}, {2}, {3}]
    assert sorted(q for p in parts for q in p["question"]) == sorted(full["question"])
