"""Lens checkpoints: exactness, refusal of other models and damaged files, tuned-lens format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
from lmutil import SENTENCES, STORIES, TINY_CONFIGS, make_lm, rolling_requests, save_tiny_model

from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.config import SpadeArgumentError
from lm_eval_spade.files import MARKER, OutputError
from lm_eval_spade.lens import (
    Lens,
    LensCheckpointError,
    LensKind,
    export_tuned_lens,
    load_lens,
    read_lens,
    save_lens,
)
from lm_eval_spade.lens.head_identity import tuned_lens_unembed_hash
from lm_eval_spade.lens.training import LensTrainConfig, train_lens

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)


def _scores(lm, requests=None) -> list[float]:
    return lm.loglikelihood_rolling(requests or rolling_requests(), disable_tqdm=True)


@pytest.fixture(scope="module")
def stories():
    model = T.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    return model, T.AutoTokenizer.from_pretrained(STORIES)


@pytest.fixture(scope="module")
def trained_dir(stories, tmp_path_factory) -> Path:
    """A tuned lens on stories260K, briefly trained so its weights are not zero."""
    model, tokenizer = stories
    config = LensTrainConfig(kind=LensKind.TUNED_LENS, steps=8, batch_size=2, lr=1e-2)
    trained = train_lens(model, tokenizer, SENTENCES * 2, config, progress=False)
    return save_lens(trained.lens, tmp_path_factory.mktemp("lens") / "tuned")


def _arch():
    return architecture_for(T.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32))


# --- exactness ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_untrained_translator_is_exactly_logit_lens(family, tiny_models, tmp_path):
    path = tiny_models[family]
    arch = architecture_for(T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    for kind in LensKind:
        save_lens(Lens.untrained(arch, kind), tmp_path / kind.value)
    logit = _scores(make_lm("spade-exit", path, exit_layer=1, decoder="logit_lens"))
    for kind in LensKind:
        lm = make_lm(
            "spade-exit", path, exit_layer=1, decoder=kind.value, lens=tmp_path / kind.value
        )
        assert _scores(lm) == logit


def test_save_then_load_is_bit_for_bit(stories, trained_dir, tmp_path):
    model, _ = stories
    arch = architecture_for(model)
    lens = load_lens(trained_dir, arch)
    assert any(float(p.abs().max()) > 0 for p in lens.parameters())
    again = load_lens(save_lens(lens, tmp_path / "again"), arch)
    hidden = torch.randn(7, arch.hidden_size)
    for layer in lens.layers:
        assert torch.equal(lens.logits(arch, hidden, layer), again.logits(arch, hidden, layer))
    first, second = (
        _scores(make_lm("spade-exit", STORIES, exit_layer=2, decoder="tuned_lens", lens=path))
        for path in (trained_dir, tmp_path / "again")
    )
    assert first == second


def test_overwriting_a_lens_needs_overwrite_and_replaces_it_whole(trained_dir, tmp_path):
    target = tmp_path / "lens"
    save_lens(Lens.untrained(_arch(), LensKind.LSPADE, layers=[1]), target)
    with pytest.raises(OutputError, match="add --overwrite"):
        save_lens(read_lens(trained_dir), target)
    assert read_lens(target).layers == [1]
    save_lens(read_lens(trained_dir), target, overwrite=True)
    assert read_lens(target).layers == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens"]  # no temporary left over


def test_lens_trained_in_float32_loads_on_a_bfloat16_model(trained_dir):
    model = T.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.bfloat16)
    lens = load_lens(trained_dir, architecture_for(model))
    assert lens.layers == [0, 1, 2, 3, 4]


# --- another model -----------------------------------------------------------------------
def _other_model(tmp_path: Path, **changes) -> Path:
    config = T.LlamaConfig.from_pretrained(STORIES)
    for key, value in changes.items():
        setattr(config, key, value)
    return save_tiny_model(config, tmp_path / "other")


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"num_hidden_layers": 4}, "5 blocks"),
        ({"hidden_size": 32, "intermediate_size": 64, "head_dim": 4}, "64 hidden size"),
        ({}, r"another final norm \+ LM head"),
    ],
)
def test_lens_for_another_model_is_refused(trained_dir, tmp_path, changes, words):
    other = _other_model(tmp_path, **changes)
    with pytest.raises(LensCheckpointError, match=words) as excinfo:
        load_lens(trained_dir, architecture_for(T.AutoModelForCausalLM.from_pretrained(other)))
    assert "train-lens" in str(excinfo.value)
    with pytest.raises(SpadeArgumentError, match=words):
        make_lm("spade-exit", other, exit_layer=1, decoder="tuned_lens", lens=trained_dir)


# --- damaged files -----------------------------------------------------------------------
def _damage(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    weights, config = dst / "translators.safetensors", dst / "config.json"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "flipped byte":
        weights.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    elif how == "truncated, no checksum":
        weights.write_bytes(data[: len(data) // 2])
        settings = json.loads(config.read_text())
        del settings["weights_sha256"]
        config.write_text(json.dumps(settings))
    elif how == "missing weights":
        weights.unlink()
    elif how == "config not json":
        config.write_text(config.read_text()[:40])
    elif how == "config lists another layer":
        settings = json.loads(config.read_text())
        config.write_text(json.dumps({**settings, "layers": [0, 1, 3]}))
    return dst


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("truncated", "truncated or corrupt"),
        ("flipped byte", "truncated or corrupt"),
        ("truncated, no checksum", r"lacks \['weights_sha256'\]"),
        ("missing weights", "is missing"),
        ("config not json", "not valid JSON"),
        ("config lists another layer", "do not match the config"),
    ],
)
def test_damaged_lens_is_refused(trained_dir, tmp_path, how, words):
    damaged = _damage(trained_dir, tmp_path / "damaged", how)
    with pytest.raises(LensCheckpointError, match=words):
        read_lens(damaged)


def test_missing_lens_directory(tmp_path):
    with pytest.raises(SpadeArgumentError, match="is not a directory"):
        make_lm("spade-exit", STORIES, exit_layer=1, decoder="lspade", lens=tmp_path / "nope")


# --- tuned-lens's format -----------------------------------------------------------------
def test_export_writes_tuned_lens_layout_and_reads_back_exactly(trained_dir, tmp_path):
    out = export_tuned_lens(read_lens(trained_dir), tmp_path / "tl")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "config.json", "params.pt"]
    config = json.loads((out / "config.json").read_text())
    assert set(config) == {
        "base_model_name_or_path", "d_model", "num_hidden_layers", "bias",
        "base_model_revision", "unembed_hash", "lens_type",
    }  # fmt: skip
    # The model's folder by its name, not this machine's path to it (paths.py).
    assert config["base_model_name_or_path"] == STORIES.name
    ours = json.loads((trained_dir / "config.json").read_text())
    assert ours["base_model_name_or_path"] == STORIES.name
    assert (config["d_model"], config["num_hidden_layers"], config["lens_type"]) == (
        64,
        5,
        "linear_tuned_lens",
    )
    state = torch.load(out / "params.pt", weights_only=True)
    assert sorted(state) == sorted(f"{i}.{p}" for i in range(5) for p in ("weight", "bias"))
    ours, theirs = (
        _scores(make_lm("spade-exit", STORIES, exit_layer=3, decoder="tuned_lens", lens=path))
        for path in (trained_dir, out)
    )
    assert ours == theirs


def _write_tuned_lens(path: Path, state: dict, **config) -> Path:
    path.mkdir()
    torch.save(state, path / "params.pt")
    settings = {
        "base_model_name_or_path": "x", "d_model": 64, "num_hidden_layers": 5,
        "unembed_hash": tuned_lens_unembed_hash(_arch()), **config,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(settings))
    return path


def test_hand_written_tuned_lens_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    state = {f"{i}.{p}": torch.randn(64, 64) * 0.01 for i in range(5) for p in ("weight",)}
    state |= {f"{i}.bias": torch.randn(64) * 0.01 for i in range(5)}
    lens = load_lens(_write_tuned_lens(tmp_path / "tl", state), _arch())
    assert lens.kind is LensKind.TUNED_LENS and lens.layers == [0, 1, 2, 3, 4]
    assert torch.equal(lens.translators.maps["3"].weight, state["3.weight"])


def test_tuned_lens_for_another_head_is_refused(trained_dir, tmp_path):
    out = export_tuned_lens(read_lens(trained_dir), tmp_path / "tl")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "unembed_hash": "0" * 64}))
    with pytest.raises(LensCheckpointError, match="unembed_hash differs"):
        load_lens(out, _arch())


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / "_pwned",))


def test_params_pt_never_runs_code(tmp_path):
    marker = Path(__file__).parent / "_pwned"
    marker.unlink(missing_ok=True)
    _write_tuned_lens(tmp_path / "evil", {"0.weight": _RunsCode()})
    with pytest.raises(LensCheckpointError, match="could run code"):
        read_lens(tmp_path / "evil")
    assert not marker.exists()


def test_truncated_params_pt_is_refused(trained_dir, tmp_path):
    out = export_tuned_lens(read_lens(trained_dir), tmp_path / "tl")
    data = (out / "params.pt").read_bytes()
    (out / "params.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(LensCheckpointError, match="damaged"):
        read_lens(out)


def test_lspade_lens_does_not_export_to_tuned_lens(tmp_path):
    with pytest.raises(LensCheckpointError, match="only tuned_lens lenses export"):
        export_tuned_lens(Lens.untrained(_arch(), LensKind.LSPADE), tmp_path / "tl")


# --- model_args --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"decoder": "lspade"}, "add lens=DIR"),
        ({"decoder": "spade", "lens": "x"}, "only used by decoder=tuned_lens or decoder=lspade"),
        ({"lens": "x"}, "only used by decoder=tuned_lens or decoder=lspade"),
    ],
)
def test_lens_model_arg_errors(args, words):
    with pytest.raises(SpadeArgumentError, match=words):
        make_lm("spade-exit", STORIES, exit_layer=2, **args)


def test_lens_of_the_wrong_kind_is_refused(trained_dir):
    with pytest.raises(SpadeArgumentError, match="is a tuned_lens lens, but decoder=lspade"):
        make_lm("spade-exit", STORIES, exit_layer=2, decoder="lspade", lens=trained_dir)


def test_exit_layer_without_a_translator_is_refused(tmp_path):
    save_lens(Lens.untrained(_arch(), LensKind.LSPADE, layers=[1, 3]), tmp_path / "l")
    with pytest.raises(SpadeArgumentError, match=r"layers \[1, 3\] only"):
        make_lm("spade-exit", STORIES, exit_layer=2, decoder="lspade", lens=tmp_path / "l")
    lm = make_lm("spade-exit", STORIES, exit_layer=5, decoder="lspade", lens=tmp_path / "l")
    assert _scores(lm) == _scores(make_lm("spade-exit", STORIES, exit_layer=5))


def test_the_tuned_lens_package_loads_our_export_and_we_load_its_save(
    trained_dir, tmp_path, caplog
):
    """Against tuned-lens 0.2.0 itself (installed by scripts/setup.sh)."""
    from tuned_lens.nn.lenses import TunedLens

    model = T.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    arch = architecture_for(model)
    ours = load_lens(trained_dir, arch)
    export_tuned_lens(read_lens(trained_dir), tmp_path / "exported")
    theirs = TunedLens.from_model_and_pretrained(model, str(tmp_path / "exported"))
    # tuned-lens logs a warning when our unembed_hash is not the one it computes.
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    hidden = torch.randn(6, arch.hidden_size)
    with torch.no_grad():
        for layer in range(arch.num_layers):
            assert torch.equal(theirs.forward(hidden, layer), ours.logits(arch, hidden, layer))
        theirs.save(tmp_path / "saved")
        back = load_lens(tmp_path / "saved", arch)
        for layer in range(arch.num_layers):
            assert torch.equal(back.logits(arch, hidden, layer), theirs.forward(hidden, layer))
