"""`lm_eval --use_cache`: spade-exit settings never share cached answers, and answers
from the cache keep their exit statistics."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cliutil import BIN, command_env
from lmutil import STORIES, make_lm, save_tiny_model

from lm_eval_spade import answer_cache
from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.lens import Lens, LensKind, save_lens

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)


def test_the_cache_identity_follows_every_setting_that_changes_answers(tmp_path):
    import torch
    import transformers as T

    base = make_lm("spade-exit", STORIES, exit_layer=2)
    ident = base.answer_cache_identity()
    assert (
        make_lm("spade-exit", STORIES, exit_layer=2, batch_size=7).answer_cache_identity() == ident
    )
    others = [
        make_lm("spade-exit", STORIES, exit_layer=3),
        make_lm("spade-exit", STORIES, exit_layer=2, decoder="logit_lens"),
        make_lm("spade-exit", STORIES, exit_layer=2, max_length=64),
        make_lm("spade-exit", STORIES),
    ]
    arch = architecture_for(T.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32))
    lens = Lens.untrained(arch, LensKind.LSPADE)
    save_lens(lens, tmp_path / "a")
    with torch.no_grad():
        lens.translators.maps["2"].bias[0] = 0.5
    save_lens(lens, tmp_path / "b")  # same settings, other weights
    for name in "ab":
        others.append(
            make_lm("spade-exit", STORIES, exit_layer=2, decoder="lspade", lens=tmp_path / name)
        )
    copy = save_tiny_model(T.LlamaConfig.from_pretrained(STORIES), tmp_path / "m")
    others.append(make_lm("spade-exit", copy, exit_layer=2))
    identities = [lm.answer_cache_identity() for lm in others]
    assert len({ident, *identities}) == 1 + len(identities)
    assert answer_cache.cache_path("c/results_rank0.db", "ab") == "c/results_rank0.spade-ab.db"


def _lm_eval(out: Path, cache: Path, exit_layer: int) -> tuple[dict, list[dict], str]:
    done = subprocess.run(
        [
            str(BIN / "lm_eval"), "--model", "spade-exit", "--model_args",
            f"pretrained=spade-calibration,exit_layer={exit_layer}", "--tasks",
            "spade_calibration", "--limit", "8", "--batch_size", "8", "--device", "cpu",
            "--use_cache", str(cache), "--output_path", str(out), "--log_samples",
        ],
        env=command_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    (samples,) = out.rglob("samples_*.jsonl")
    resps = [json.loads(line)["resps"] for line in samples.read_text().splitlines()]
    return json.loads(results.read_text()), resps, done.stderr


@pytest.mark.slow
def test_use_cache_keeps_settings_apart_and_exits_counted(tmp_path):
    cache = tmp_path / "cache" / "answers"
    first, first_resps, _ = _lm_eval(tmp_path / "a", cache, exit_layer=1)
    other, other_resps, log = _lm_eval(tmp_path / "b", cache, exit_layer=12)
    assert "Cached requests: 0" in log  # another setting: nothing shared
    assert other_resps != first_resps
    again, again_resps, log = _lm_eval(tmp_path / "c", cache, exit_layer=1)
    assert "Requests remaining: 0" in log  # the same setting: every answer cached
    assert again_resps == first_resps
    task = "spade_calibration"
    stats = [r["config"]["spade"]["tasks"][task] for r in (first, other, again)]
    assert stats[0] == stats[2] and stats[0]["requests"] == stats[1]["requests"] == 8 * 4
    assert stats[0]["exit_layer_histogram"] == {"1": 32}
    assert len(list(cache.parent.glob("answers_rank0.spade-*.db"))) == 2


def test_a_model_passed_as_an_object_is_keyed_by_its_weights():
    import torch
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    first = answer_cache._where(model, contents=False)
    assert answer_cache._where(model, contents=False) == first
    with torch.no_grad():
        model.model.norm.weight[0] += 1.0
    assert answer_cache._where(model, contents=False) != first
