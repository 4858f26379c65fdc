"""Training lenses on stories260K: determinism, and that training does what it is for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from lmutil import (
    SENTENCES,
    STORIES,
    arc_requests,
    make_lm,
    sample_stories,
    write_arc_letter_task,
)

from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.lens import LensKind, read_lens
from lm_eval_spade.lens.data import LensDataError, load_texts
from lm_eval_spade.lens.jobs import DataSpec, train_and_save
from lm_eval_spade.lens.targets import encode
from lm_eval_spade.lens.training import (
    LensTrainConfig,
    LensTrainingError,
    TargetSource,
    batch_order,
    make_targets,
    train_lens,
)
from lm_eval_spade.paths import portable_path
from lm_eval_spade.perplexity import rolling_perplexity

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)

BIN = Path(sys.executable).parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def stories():
    model = T.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    return model, T.AutoTokenizer.from_pretrained(STORIES)


@pytest.fixture(scope="module")
def arc_task(tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("tasks")
    return write_arc_letter_task(root), root


def test_training_is_deterministic_for_a_seed(stories):
    model, tokenizer = stories

    def weights(seed: int) -> dict[str, torch.Tensor]:
        config = LensTrainConfig(kind=LensKind.LSPADE, steps=6, batch_size=2, seed=seed)
        return train_lens(
            model, tokenizer, SENTENCES * 3, config, progress=False
        ).lens.state_tensors()

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_targets_are_made_only_for_the_examples_the_steps_use(stories, caplog):
    model, tokenizer = stories
    texts = [f"{s} ({i})" for i in range(4) for s in SENTENCES]  # 12 distinct prompts
    config = LensTrainConfig(kind=LensKind.LSPADE, steps=2, batch_size=2, eval_fraction=0)
    with caplog.at_level("INFO", logger="lm_eval_spade.lens.training"):
        trained = train_lens(model, tokenizer, texts, config, progress=False)
    assert trained.lens.config.training["train_examples"] == 12
    assert trained.lens.config.training["train_examples_used"] == 4
    assert "use 4 of the 12 training examples" in caplog.text

    arch = architecture_for(model)
    ids = encode(tokenizer, texts, config.max_length)
    batches = batch_order(len(ids), config.steps, config.batch_size, torch.Generator())
    used = sorted({i for batch in batches for i in batch})
    source = TargetSource(arch, config, ids, [0, 2], progress=False, used=used)
    assert source.cache is not None and sorted(source.cache) == used
    for i in used:  # each cached target is the one made for that example alone
        alone = make_targets(arch, config, [ids[i]], [0, 2])
        for layer in (0, 2):
            torch.testing.assert_close(source.cache[i].log_probs[layer], alone.log_probs[layer])


def test_lspade_on_arc_train_lowers_heldout_kl_to_spade(arc_task, tmp_path):
    """L-SPADE trained on ARC-Easy train prompts, measured on ARC-Easy dev prompts."""
    name, root = arc_task
    data = DataSpec(name, "train", str(root), limit=480, eval_source=name, eval_split="validation")
    config = LensTrainConfig(kind=LensKind.LSPADE, steps=80, batch_size=32, lr=3e-3)
    trained = train_and_save(str(STORIES), data, config, tmp_path / "lspade")
    report = trained.report.set_index("layer")
    assert list(report.index) == [0, 1, 2, 3, 4]
    assert (report["kl_trained"] < report["kl_logit_lens"]).all(), report
    assert (report["kl_trained"] < 0.5 * report["kl_logit_lens"]).all(), report

    # Through spade-exit: L-SPADE's answer-letter log-probs are closer to SPADE's than logit
    # lens's (less so than the KL: letters are rare tokens for a story model, and the KL is
    # dominated by the likely ones).
    requests = arc_requests(20)
    scores = {
        decoder: torch.tensor(
            [s for s, _ in make_lm("spade-exit", STORIES, exit_layer=2, decoder=decoder, **extra)
             .loglikelihood(requests, disable_tqdm=True)]
        )
        for decoder, extra in [
            ("spade", {}), ("logit_lens", {}), ("lspade", {"lens": tmp_path / "lspade"}),
        ]
    }  # fmt: skip
    gap = {d: float((scores[d] - scores["spade"]).abs().mean()) for d in ("logit_lens", "lspade")}
    assert gap["lspade"] < gap["logit_lens"], gap


def test_tuned_lens_on_story_text_lowers_perplexity(stories, tmp_path):
    """Tuned lens trained on text sampled from stories260K, scored on held-out sentences."""
    model, tokenizer = stories
    texts = sample_stories(n=48, tokens=160, seed=0)
    config = LensTrainConfig(kind=LensKind.TUNED_LENS, steps=120, batch_size=8, lr=3e-3)
    trained = train_lens(model, tokenizer, texts, config, progress=False)
    from lm_eval_spade.lens import save_lens

    lens = save_lens(trained.lens, tmp_path / "tuned")
    for layer in range(5):
        ppl = {
            decoder: rolling_perplexity(
                make_lm("spade-exit", STORIES, exit_layer=layer, decoder=decoder, **extra),
                SENTENCES,
            )
            for decoder, extra in [("logit_lens", {}), ("tuned_lens", {"lens": lens})]
        }
        assert ppl["tuned_lens"] < ppl["logit_lens"], (layer, ppl)


@pytest.mark.slow
def test_train_lens_command_then_lm_eval_with_the_lens(arc_task, tmp_path):
    name, root = arc_task
    prompts = tmp_path / "prompts.jsonl"
    texts = load_texts(name, documents=False, include_path=str(root), limit=64)
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "lens"
    done = subprocess.run(
        [str(BIN / "lm-eval-spade"), "train-lens", "--model", str(STORIES), "--kind", "lspade",
         "--data", str(prompts), "--steps", "4", "--batch-size", "8", "--out", str(out)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "layer |" in done.stdout and "kl_trained" in done.stdout
    rows = [line.split("|")[1].strip() for line in done.stdout.splitlines() if "|" in line]
    assert rows[2:] == ["0", "1", "2", "3", "4"]  # integer layer numbers
    assert read_lens(out).layers == [0, 1, 2, 3, 4]
    assert read_lens(out).config.training["train_examples_used"] == 32  # 4 steps of 8
    assert read_lens(out).config.training["data"] == portable_path(prompts)  # paths.py

    results = tmp_path / "results"
    args = f"pretrained={STORIES},dtype=float32,exit_layer=3,decoder=lspade,lens={out}"
    done = subprocess.run(
        [str(BIN / "lm_eval"), "--model", "spade-exit", "--model_args", args, "--tasks", name,
         "--include_path", str(root), "--limit", "4", "--device", "cpu",
         "--output_path", str(results)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = results.rglob("results_*.json")
    spade = json.loads(result.read_text())["config"]["spade"]
    assert spade["config"]["decoder"] == "lspade" and spade["lens"]["kind"] == "lspade"
    assert spade["tasks"][name]["exit_layer"] == 3


def test_train_lens_command_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no prompt field"}\n')
    done = subprocess.run(
        [str(BIN / "lm-eval-spade"), "train-lens", "--model", str(STORIES), "--kind", "lspade",
         "--data", str(bad), "--out", str(tmp_path / "o")],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("lm-eval-spade train-lens: error: ")
    assert "bad.jsonl:1 has no prompt / text / context field" in done.stderr


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"layers": [5]}, "out of range"),
        ({"optimizer": "lion"}, "not one of adam, sgd"),
        ({"steps": 0}, "steps=0 is too small"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
    ],
)
def test_bad_training_settings(stories, settings, words):
    model, tokenizer = stories
    config = LensTrainConfig(kind=LensKind.LSPADE, **settings)
    with pytest.raises(LensTrainingError, match=words):
        train_lens(model, tokenizer, SENTENCES, config, progress=False)


def test_bad_data_sources(tmp_path):
    with pytest.raises(LensDataError, match="does not exist"):
        load_texts(str(tmp_path / "missing.jsonl"), documents=False)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(LensDataError, match="unsupported file type"):
        load_texts(str(tmp_path / "x.csv"), documents=False)
    (tmp_path / "broken.jsonl").write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(LensDataError, match=r"broken\.jsonl:2 is not JSON"):
        load_texts(str(tmp_path / "broken.jsonl"), documents=False)
    with pytest.raises(LensDataError, match="neither a file nor an lm-eval task"):
        load_texts("no_such_task_xyz", documents=False)
