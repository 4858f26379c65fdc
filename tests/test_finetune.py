"""LoRA fine-tuning on a task's training split, and evaluation with the adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from lmutil import DATA, STORIES, arc_requests, make_lm

from lm_eval_spade.finetune import (
    FinetuneConfig,
    FinetuneError,
    _batch,
    answer_loss,
    encode_example,
    finetune_task,
    loss_summary,
    loss_windows,
)
from lm_eval_spade.lens.data import LensDataError
from lm_eval_spade.tasks import offline

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)

BIN = Path(sys.executable).parent


@pytest.fixture
def local_data(monkeypatch):
    monkeypatch.setenv(offline.ENV, str(DATA))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> tuple[Path, list[float]]:
    old = os.environ.get(offline.ENV)
    os.environ[offline.ENV] = str(DATA)
    try:
        out = tmp_path_factory.mktemp("lora") / "arc"
        config = FinetuneConfig(steps=30, batch_size=8, lr=3e-3)
        losses = finetune_task(str(STORIES), "arc_easy_spade", out, config, limit=128)
    finally:
        if old is None:
            os.environ.pop(offline.ENV)
        else:
            os.environ[offline.ENV] = old
    return out, losses


def test_finetuning_on_arc_train_lowers_the_loss(adapter):
    out, losses = adapter
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    report = json.loads((out / "finetune.json").read_text())
    assert report["task"] == "arc_easy_spade" and report["examples"] == 128
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    # The base model by its folder's name, not this machine's path to it (paths.py).
    peft_config = json.loads((out / "adapter_config.json").read_text())
    assert report["base_model"] == peft_config["base_model_name_or_path"] == STORIES.name
    assert str(STORIES) not in (out / "README.md").read_text()


def test_loss_summary_windows_never_overlap():
    assert loss_summary([2.0]) == "loss at the only step 2.0000"
    assert loss_summary([4.0, 3.0, 2.0, 1.0, 0.5]) == (
        "loss over the first 2 steps 3.5000, over the last 2 steps 0.7500 (5 steps)"
    )
    windows = loss_windows([float(i) for i in range(30)])
    assert windows == {
        "loss_window_steps": 10,
        "loss_first_steps": 4.5,
        "loss_last_steps": 24.5,
    }


def test_the_adapter_changes_spade_exit_scores(adapter):
    out, _ = adapter
    requests = arc_requests(6)
    for args in ({"exit_layer": 3}, {"exit_layer": 5}):
        base = make_lm("spade-exit", STORIES, **args).loglikelihood(requests, disable_tqdm=True)
        tuned = make_lm("spade-exit", STORIES, peft=str(out), **args).loglikelihood(
            requests, disable_tqdm=True
        )
        assert max(abs(a[0] - b[0]) for a, b in zip(base, tuned, strict=True)) > 1e-3
    # At the last layer spade-exit with the adapter is hf with the adapter.
    hf = make_lm("hf", STORIES, peft=str(out)).loglikelihood(requests)
    full = make_lm("spade-exit", STORIES, peft=str(out), exit_layer=5).loglikelihood(
        requests, disable_tqdm=True
    )
    assert max(abs(a[0] - b[0]) for a, b in zip(hf, full, strict=True)) <= 1e-5


def test_examples_are_split_as_hflm_splits_requests():
    tokenizer = T.AutoTokenizer.from_pretrained(STORIES)
    ids, start = encode_example(tokenizer, "Question: x\nAnswer: ", "B")
    whole = tokenizer("Question: x\nAnswer: B", add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.bos_token_id, *whole]
    context = tokenizer("Question: x\nAnswer:", add_special_tokens=False)["input_ids"]
    assert start == 1 + len(context)


@pytest.mark.parametrize(
    ("settings", "words"),
    [({"rank": 0}, "rank=0"), ({"lr": 0.0}, "lr=0.0"), ({"target_modules": ["nope"]}, "LoRA")],
)
def test_bad_settings(local_data, tmp_path, settings, words):
    with pytest.raises(FinetuneError, match=words):
        finetune_task(
            str(STORIES), "arc_easy_spade", tmp_path / "o", FinetuneConfig(steps=1, **settings),
            limit=4,
        )  # fmt: skip


def test_task_without_training_split(tmp_path):
    (tmp_path / "t.yaml").write_text(
        "task: arc_no_train\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {DATA}/arc/ARC-Easy/ARC-Easy-Test.jsonl\noutput_type: multiple_choice\n"
        'test_split: test\ndoc_to_text: "{{question.stem}}"\n'
        "doc_to_choice: \"{{question.choices | map(attribute='label') | list}}\"\n"
        "doc_to_target: \"{{(question.choices | map(attribute='label') | list)"
        '.index(answerKey)}}"\n'
    )
    with pytest.raises(LensDataError, match="has no train split"):
        finetune_task(
            str(STORIES), "arc_no_train", tmp_path / "o", FinetuneConfig(steps=1),
            include_path=str(tmp_path),
        )  # fmt: skip


@pytest.mark.slow
def test_finetune_command(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **{offline.ENV: str(DATA)})
    command = [str(BIN / "lm-eval-spade"), "finetune", "--model", str(STORIES)]
    done = subprocess.run(
        [*command, "--task", "boolq_spade", "--limit", "8", "--steps", "2", "--batch-size",
         "2", "--max-length", "256", "--out", str(tmp_path / "boolq")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # Two steps: the first and the last are different steps, not one window twice.
    assert "loss over the first step " in done.stdout and "over the last step " in done.stdout
    report = json.loads((tmp_path / "boolq" / "finetune.json").read_text())
    assert report["loss_window_steps"] == 1
    bad = subprocess.run(
        [*command, "--task", "boolq_spade", "--rank", "0", "--out", str(tmp_path / "x")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        "lm-eval-spade finetune: error: argument --rank: 0 is not valid: it must be a whole "
        "number >= 1"
    )


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox"])
def test_answer_loss_equals_the_models_own_loss(family, tiny_models):
    """The head only where answers are predicted gives the loss of the full logits."""
    model = T.AutoModelForCausalLM.from_pretrained(tiny_models[family])
    tokenizer = T.AutoTokenizer.from_pretrained(tiny_models[family])
    examples = [("Once upon a time", " there was"), ("Lily and her mom went to the", " park")]
    batch = _batch([encode_example(tokenizer, c, g) for c, g in examples], 64, torch.device("cpu"))
    want = model(**batch).loss
    assert float(answer_loss(model, batch).detach()) == pytest.approx(float(want), abs=1e-5)
