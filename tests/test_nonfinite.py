"""Non-finite numbers stop training without saving, are never written, and are an error
where spade-exit computes a score or a confidence."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as T
from lmutil import SENTENCES, STORIES

from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.confidence import Confidence, uncertainty
from lm_eval_spade.finetune import FinetuneConfig, finetune
from lm_eval_spade.finite import NonFiniteError
from lm_eval_spade.lens import Lens, LensKind, save_lens
from lm_eval_spade.lens.jobs import DataSpec, train_and_save
from lm_eval_spade.lens.training import LensTrainConfig, LensTrainingError
from lm_eval_spade.sampling import GenerationSettingsError, Sampling

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)


@pytest.fixture
def stories():
    model = T.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    return model, T.AutoTokenizer.from_pretrained(STORIES)


def test_lens_training_stops_at_the_first_non_finite_weight_and_saves_nothing(tmp_path):
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": s}) + "\n" for s in SENTENCES)
    )
    config = LensTrainConfig(LensKind.LSPADE, steps=5, batch_size=2, lr=1e38, optimizer="sgd")
    with pytest.raises(NonFiniteError) as excinfo:
        train_and_save(str(STORIES), DataSpec(str(tmp_path / "prompts.jsonl")), config,
                       tmp_path / "lens")  # fmt: skip
    message = str(excinfo.value)
    assert "training stopped at step 1 of 5: the weight translators.maps." in message
    assert "inf after the update" in message
    assert "learning rate (1e+38) is too high" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


@pytest.mark.parametrize("lr", [math.inf, math.nan, 0.0, 1e39])
def test_lens_training_refuses_a_learning_rate_no_one_means(lr):
    with pytest.raises(LensTrainingError, match="lr must be a positive finite number"):
        LensTrainConfig(LensKind.LSPADE, lr=lr).check(5)


def test_lens_training_refuses_negative_weight_decay():
    with pytest.raises(LensTrainingError, match="weight_decay must be a finite number >= 0"):
        LensTrainConfig(LensKind.LSPADE, weight_decay=-0.1).check(5)


def test_finetuning_stops_at_the_first_non_finite_step(stories):
    model, tokenizer = stories
    examples = [(s[:30], s[30:]) for s in SENTENCES]
    with pytest.raises(NonFiniteError, match=r"step 1 of 3: the update overflowed float32"):
        finetune(model, tokenizer, examples, FinetuneConfig(steps=3, lr=1e38), progress=False)


def test_a_lens_with_non_finite_weights_is_never_written(stories, tmp_path):
    lens = Lens.untrained(architecture_for(stories[0]), LensKind.LSPADE, layers=[1])
    with torch.no_grad():
        lens.translators.maps["1"].bias[3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"layers\.1\.bias holds inf"):
        save_lens(lens, tmp_path / "lens")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("measure", [m for m in Confidence if not m.answer_level])
def test_a_nan_confidence_is_an_error(measure):
    logits = torch.zeros(3, 10)
    assert torch.equal(uncertainty(logits, measure).isfinite(), torch.tensor([True] * 3)) or (
        measure is Confidence.MARGIN  # a tie: infinitely unsure, which is a value
    )
    logits[1, 4] = float("nan")
    with pytest.raises(NonFiniteError, match=f"confidence \\({measure.value}\\) came out NaN"):
        uncertainty(logits, measure)


@pytest.mark.parametrize("value", [math.inf, -math.inf, "inf"])
def test_infinite_temperature_is_refused(value):
    with pytest.raises(GenerationSettingsError, match="must be a finite number"):
        Sampling.from_request({"do_sample": True, "temperature": value})
