"""`spade_start=shared`: SPADE with the start token's upper-block states computed once.

The pair `[h_0^l, h_i^l]` and the shared start must give the same logits (float32 noise
only) in every family, at every layer, with original and compact positions, with several
distinct start tokens in one batch, past a sliding window, and with eager attention; the
passes counted are the ones run: `L - l` per position plus the shared starts' share.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from lmutil import STORIES, TINY_CONFIGS, arc_requests, loglikelihood_requests, make_lm, run_cli

from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.config import SpadeArgumentError
from lm_eval_spade.decoders import (
    DecoderKind,
    LayerStates,
    SpadePositions,
    SpadeStart,
    decode_layers,
)

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)

SEQ = 40  # past mistral's sliding window of 16
L = 5  # stories260K's blocks


def _model(family: str, attn: str = "sdpa") -> T.PreTrainedModel:
    torch.manual_seed(0)
    config = TINY_CONFIGS[family]()
    config._attn_implementation = attn
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model


def _states(arch, ids: torch.Tensor) -> dict[int, LayerStates]:
    """Every position of every row at every layer, each with its own row's `h_0^l`."""
    positions = torch.arange(ids.shape[1])[None]
    hidden = arch.embed(ids, positions)
    rows = torch.arange(ids.shape[0]).repeat_interleave(ids.shape[1])
    cols = torch.arange(ids.shape[1]).repeat(ids.shape[0])
    out = {}
    for layer in range(arch.num_layers + 1):
        if layer:
            hidden = arch.run_blocks(hidden, layer - 1, layer, positions)
        out[layer] = LayerStates(hidden[rows, 0], hidden[rows, cols], cols)
    return out


def _ids(vocab: int) -> torch.Tensor:
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (3, SEQ))
    ids[:2, 0] = 1  # two rows share a start token, the third has its own
    ids[2, 0] = 2
    return ids


@torch.no_grad()
@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("positions", list(SpadePositions))
def test_shared_start_equals_the_pair(family, positions):
    arch = architecture_for(_model(family))
    states = _states(arch, _ids(arch.config.vocab_size))
    inputs = {layer: states[layer] for layer in range(arch.num_layers)}
    pair = decode_layers(arch, DecoderKind.SPADE, inputs, positions)
    shared = decode_layers(
        arch, DecoderKind.SPADE, inputs, positions, spade_start=SpadeStart.SHARED
    )
    for layer in inputs:
        torch.testing.assert_close(shared[layer].logits, pair[layer].logits, rtol=0, atol=2e-5)
        above = arch.num_layers - layer
        n = 3 * SEQ
        # the pair: 2 tokens per position, 1 at position 0; shared: 1 per position
        # plus 2 distinct start tokens climbing once for the n - 3 positions past 0
        assert pair[layer].block_token_passes == above * (2 * (n - 3) + 3)
        assert shared[layer].block_token_passes == pytest.approx(above * (n - 3 + 2 + 3))


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_start_with_eager_attention(family):
    arch = architecture_for(_model(family, attn="eager"))
    states = _states(arch, _ids(arch.config.vocab_size))
    inputs = {1: states[1]}
    pair = decode_layers(arch, DecoderKind.SPADE, inputs)[1]
    shared = decode_layers(arch, DecoderKind.SPADE, inputs, spade_start=SpadeStart.SHARED)[1]
    torch.testing.assert_close(shared.logits, pair.logits, rtol=0, atol=2e-5)


@torch.no_grad()
def test_shared_start_in_small_chunks():
    """Chunks of 7 sequences: every chunk finds its own distinct start tokens."""
    arch = architecture_for(_model("llama"))
    states = _states(arch, _ids(arch.config.vocab_size))
    inputs = {layer: states[layer] for layer in range(arch.num_layers)}
    pair = decode_layers(arch, DecoderKind.SPADE, inputs, max_sequences=7)
    shared = decode_layers(
        arch, DecoderKind.SPADE, inputs, max_sequences=7, spade_start=SpadeStart.SHARED
    )
    for layer in inputs:
        torch.testing.assert_close(shared[layer].logits, pair[layer].logits, rtol=0, atol=2e-5)


# --- through spade-exit and the sweeps ------------------------------------------------------
def _passes(lm, task: str) -> tuple[float, float]:
    stats = lm.get_model_info()["spade"]["tasks"][task]
    return stats["block_token_passes"], stats["block_token_passes_full"]


@pytest.mark.parametrize("task", ["arc", "story"])
def test_spade_exit_with_a_shared_start_scores_as_the_pair(task):
    """Same scores; the decoding above the exit costs half the pair's passes plus one
    start token per batch (rows of a batch share the tokenizer's BOS)."""
    requests = arc_requests(6) if task == "arc" else loglikelihood_requests()
    layer, batch_size = 2, 4
    got = {}
    for start in ("pair", "shared"):
        lm = make_lm("spade-exit", STORIES, batch_size, exit_layer=layer, spade_start=start)
        scores = lm.loglikelihood(requests, disable_tqdm=True)
        got[start] = (torch.tensor([s for s, _ in scores]), _passes(lm, task))
    torch.testing.assert_close(got["shared"][0], got["pair"][0], rtol=0, atol=2e-5)
    (pair, full), (shared, full_shared) = got["pair"][1], got["shared"][1]
    assert full == full_shared
    trunk = layer * full / L
    starts = ((shared - trunk) - (pair - trunk) / 2) / (L - layer)
    batches = -(-len(requests) // batch_size)
    assert starts == int(starts) and 1 <= starts <= batches, (pair, shared, starts)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"exit_layer": 2, "spade_start": "both"}, "spade_start='both'"),
        ({"exit_layer": 2, "decoder": "logit_lens", "spade_start": "shared"}, "has none"),
        ({"spade_start": "shared"}, "only applies to early exits"),
    ],
)
def test_bad_spade_start(args, words):
    with pytest.raises(SpadeArgumentError, match=words):
        make_lm("spade-exit", STORIES, **args)


def test_layer_sweep_with_a_shared_start(tmp_path):
    """The calibration model's SPADE sweep: same accuracy at every layer, and below L a
    compute fraction that counts one pass per decoded position above the layer. `shared`
    is the layer sweep's default (the threshold sweeps keep spade-exit's `pair`)."""
    runs = {}
    for start, chosen in (("pair", ["--spade-start", "pair"]), ("shared", [])):
        out = tmp_path / start
        run_cli(
            "sweep", "layers", "--model", "spade-calibration", "--tasks", "spade_calibration",
            "--limit", "24", "--decoders", "spade", *chosen, "--out", str(out),
            "--no-full-depth-timing",
        )  # fmt: skip
        runs[start] = out
    for layer in range(13):
        pair, shared = (
            json.loads((runs[s] / "results" / f"spade_L{layer}.json").read_text())
            for s in ("pair", "shared")
        )
        task = "spade_calibration"
        assert shared["results"][task]["acc,none"] == pair["results"][task]["acc,none"]
        assert shared["config"]["spade"]["config"]["spade_start"] == "shared"
        fraction = {
            s: d["config"]["spade"]["tasks"][task]["compute_fraction"]
            for s, d in (("pair", pair), ("shared", shared))
        }
        if layer < 12:
            assert fraction["shared"] < fraction["pair"], (layer, fraction)
        else:
            assert fraction["shared"] == fraction["pair"] == 1.0
    # without a timed full-depth run the wall-clock ratios are null, never NaN; per scored
    # position (one per question: its one-token options share it) the pair climbs
    # 2(12 - l) block-tokens above each layer l: 156 in all, and the shared start less
    costs = {s: json.loads((runs[s] / "sweep.json").read_text())["cost"] for s in runs}
    for cost in costs.values():
        assert cost["time_ratio"] is None and cost["extra_seconds_per_scored_position"] is None
        assert cost["scored_positions"] == pytest.approx(24)
    assert costs["pair"]["extra_passes_per_scored_position"] == pytest.approx(156)
    assert 78 < costs["shared"]["extra_passes_per_scored_position"] < 156
