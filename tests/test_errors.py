"""Bad model_args are refused with one clear line that names the fix."""

from __future__ import annotations

import pytest
import transformers as T
from lm_eval.api.instance import Instance
from lmutil import STORIES, make_lm, save_tiny_model

from lm_eval_spade.architectures import UnsupportedArchitectureError
from lm_eval_spade.config import SpadeArgumentError

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)


def _message(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_unknown_key_lists_valid_ones():
    with pytest.raises(SpadeArgumentError) as excinfo:
        make_lm("spade-exit", STORIES, exit_layr=3)
    message = _message(excinfo)
    assert "exit_layr" in message and "exit_layer" in message and "spade_positions" in message


def test_config_attributes_and_loading_options_pass_through():
    lm = make_lm(
        "spade-exit", STORIES, exit_layer=5, attn_implementation="eager", rms_norm_eps=1e-5
    )
    assert lm.model.config._attn_implementation == "eager"


@pytest.mark.parametrize("layer", [6, -1])
def test_exit_layer_out_of_range(layer):
    with pytest.raises(SpadeArgumentError) as excinfo:
        make_lm("spade-exit", STORIES, exit_layer=layer)
    assert f"exit_layer={layer} is out of range" in _message(excinfo)
    assert "between 0 (embeddings) and 5" in _message(excinfo)


@pytest.mark.parametrize("value", [2.5, "two", True])
def test_exit_layer_not_an_integer(value):
    with pytest.raises(SpadeArgumentError) as excinfo:
        make_lm("spade-exit", STORIES, exit_layer=value)
    assert "must be an integer" in _message(excinfo)


def test_unknown_decoder():
    with pytest.raises(SpadeArgumentError) as excinfo:
        make_lm("spade-exit", STORIES, exit_layer=2, decoder="tuned")
    assert "decoder='tuned' is not valid; choose one of: logit_lens, spade, spade_nos" in _message(
        excinfo
    )


def test_decoder_without_layer():
    with pytest.raises(SpadeArgumentError) as excinfo:
        make_lm("spade-exit", STORIES, decoder="spade")
    assert "add exit_layer=K" in _message(excinfo)


def test_unsupported_family(tmp_path):
    config = T.PhiConfig(
        vocab_size=512,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    path = save_tiny_model(config, tmp_path / "phi")
    with pytest.raises(UnsupportedArchitectureError) as excinfo:
        make_lm("spade-exit", path, exit_layer=1)
    message = _message(excinfo)
    assert (
        "'phi'" in message and "llama, mistral, qwen2, qwen3, gemma, gpt_neox, gpt2, opt" in message
    )
    # Without an exit setting spade-exit is plain HF and loads any family.
    make_lm("spade-exit", path)


def test_spade_without_start_token_names_add_bos_token_false():
    lm = make_lm("spade-exit", STORIES, exit_layer=2, add_bos_token=False)
    request = Instance("loglikelihood", {}, ("Once upon a time", " there"), 0, metadata=("t", 0, 1))
    with pytest.raises(SpadeArgumentError) as excinfo:
        lm.loglikelihood([request], disable_tqdm=True)
    message = _message(excinfo)
    assert "needs a start token at position 0" in message
    assert "Drop add_bos_token=False" in message and "decoder=spade_nos" in message
    # SPADE-NoS and logit lens need no start token.
    for decoder in ("spade_nos", "logit_lens"):
        lm = make_lm("spade-exit", STORIES, exit_layer=2, add_bos_token=False, decoder=decoder)
        lm.loglikelihood([request], disable_tqdm=True)
