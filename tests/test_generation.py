"""SPADE-EXIT in generation: parity with `hf`, what each token is decoded from, and the
key/value cache each strategy promises, against references computed apart."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as T
from lm_eval.api.instance import Instance
from lmutil import STORIES, TINY_CONFIGS, make_lm
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.config import SpadeArgumentError
from lm_eval_spade.decoders import DecoderKind, decode
from lm_eval_spade.generation import Generated, GenerationPlan, generate
from lm_eval_spade.kv_cache import (
    BlockCache,
    KVStore,
    KVStrategy,
    MissingKeyValuesError,
    causal_allowed,
)
from lm_eval_spade.sampling import GenerationSettingsError, Sampling

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)

L = 5  # stories260K's blocks
PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to",
    "Tom was sad because",
    "One day, a big dog came to the park. The dog",
    "The sun",
]
GREEDY = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
#: Exits at layers 3, 4 and 5 on these prompts (logit lens is confidently wrong below 3).
NEVER = {"threshold": "-inf", "confidence_decoder": "logit_lens"}  # delegates to HFLM
MIXED = {"threshold": 1.0, "min_layer": 3, "confidence_decoder": "logit_lens"}


def _requests(gen_kwargs: dict, prompts=PROMPTS, task: str = "gen") -> list[Instance]:
    return [
        Instance("generate_until", {}, (p, dict(gen_kwargs)), i, metadata=(task, i, 1))
        for i, p in enumerate(prompts)
    ]


def _generate(lm, gen_kwargs=GREEDY, prompts=PROMPTS) -> list[str]:
    return lm.generate_until(_requests(gen_kwargs, prompts), disable_tqdm=True)


# --- parity with hf ------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_greedy_equals_hf_tiny(family, tiny_models):
    path = tiny_models[family]
    for batch_size in (1, 4):
        want = _generate(make_lm("hf", path, batch_size=batch_size))
        assert any(want)
        for args in (NEVER, {"exit_layer": 3}):
            got = _generate(make_lm("spade-exit", path, batch_size=batch_size, **args))
            assert got == want, (family, batch_size, args)


def test_greedy_equals_hf_stories260K():
    stop = {"until": ["."], "max_gen_toks": 24, "do_sample": False}  # stops mid-batch
    for batch_size in (1, 4):
        hf = make_lm("hf", STORIES, batch_size=batch_size)
        for gen_kwargs in (GREEDY, stop):
            want = _generate(hf, gen_kwargs)
            for args in (
                {"threshold": "-inf", "confidence_decoder": "logit_lens"},
                {"exit_layer": L},
            ):
                lm = make_lm("spade-exit", STORIES, batch_size=batch_size, **args)
                assert _generate(lm, gen_kwargs) == want, (batch_size, gen_kwargs, args)
    assert all("." not in text for text in want) and all(want)


def test_seeded_sampling_equals_hf():
    """Same warpers, same draws: at full depth a seeded sample is hf's sample."""
    sampled = {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": True, "temperature": 0.8,
               "top_p": 0.9}  # fmt: skip
    outputs = []
    for name, args in (("hf", {}), ("spade-exit", {"exit_layer": L})):
        lm = make_lm(name, STORIES, batch_size=1, **args)
        torch.manual_seed(7)
        outputs.append(_generate(lm, sampled))
    assert outputs[0] == outputs[1]
    torch.manual_seed(8)
    assert (
        _generate(make_lm("spade-exit", STORIES, batch_size=1, exit_layer=L), sampled) != outputs[0]
    )


def test_narrow_sampling_is_greedy():
    lm = make_lm("spade-exit", STORIES, exit_layer=3)
    greedy = _generate(lm)
    narrow = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": True, "top_p": 1e-9,
              "temperature": 1.0}  # fmt: skip
    assert _generate(lm, narrow) == greedy


# --- what each token is decoded from -----------------------------------------------------
def _direct_generate(lm, strategy: KVStrategy, max_new: int = 10) -> tuple[Generated, int]:
    ids, mask = lm.tok_batch_encode(PROMPTS[:3])
    stopping = T.StoppingCriteriaList([T.MaxLengthCriteria(ids.shape[1] + max_new)])
    with torch.no_grad():
        plan = GenerationPlan(lm.plan, strategy, Sampling())
        out = generate(lm.arch, plan, ids, mask, ids.shape[1] + max_new, stopping, 0)
    return out, ids.shape[1]


def _trunk_states(model, tokens: torch.Tensor, real: torch.Tensor) -> tuple:
    """transformers' own full forward over the final sequences (left padded)."""
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(
            tokens, attention_mask=real.long(), position_ids=positions, use_cache=True,
            output_hidden_states=True,
        )  # fmt: skip
    return out.hidden_states, out.cache, positions


@pytest.mark.parametrize("decoder", ["spade", "spade_nos", "logit_lens"])
def test_fixed_exit_tokens_are_the_decoders_argmax(decoder):
    """Below a fixed exit every cache entry is exact, so each generated token is the
    argmax of the decoder over the whole sequence so far, computed without a cache."""
    layer = 2
    lm = make_lm("spade-exit", STORIES, exit_layer=layer, decoder=decoder)
    out, prompt = _direct_generate(lm, KVStrategy.RECOMPUTE)
    real = out.kv.real[:, : out.tokens.shape[1]]
    hidden, _, positions = _trunk_states(lm.model, out.tokens, real)
    for row in range(len(out.tokens)):
        keep = real[row]
        states = hidden[layer][row][keep]
        pos = positions[row][keep]
        start = states[0].expand(len(states), -1)
        with torch.no_grad():
            logits = decode(lm.arch, DecoderKind(decoder), layer, start, states, pos).logits
        n_prompt = int(keep[:prompt].sum())
        want = logits[n_prompt - 1 : -1].argmax(-1)
        assert out.tokens[row, prompt:].tolist() == want.tolist()
    assert out.rows[0].exit_layers == [layer] * (out.tokens.shape[1] - prompt)


# --- the cache each strategy promises --------------------------------------------------------
def _decoded_slots(out: Generated, prompt: int) -> range:
    return range(prompt - 1, out.tokens.shape[1] - 1)  # each step's newest position


def _fed(out: Generated) -> torch.Tensor:
    """`[B, S]`: the real slots the model has run (all but the last generated token)."""
    fed = out.kv.real[:, : out.tokens.shape[1]].clone()
    fed[:, -1] = False
    return fed


def _assert_lower_blocks_exact(out: Generated, cache, below: torch.Tensor) -> None:
    """Every entry at a block under `below` `[B, S]` equals transformers' own cache."""
    for block in range(L):
        use = _fed(out) & (block < below)
        got = out.kv.keys[block][:, :, : below.shape[1]].transpose(1, 2)[use]
        want = cache.layers[block].keys.transpose(1, 2)[use]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        got = out.kv.values[block][:, :, : below.shape[1]].transpose(1, 2)[use]
        want = cache.layers[block].values.transpose(1, 2)[use]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_recompute_cache_is_the_full_models():
    """Adaptive exits at mixed layers; every entry the cache holds (depth) equals the full
    model's key/value at that block, including positions recomputed after an early exit."""
    lm = make_lm("spade-exit", STORIES, **MIXED)
    out, prompt = _direct_generate(lm, KVStrategy.RECOMPUTE, max_new=16)
    width = out.tokens.shape[1]
    _, cache, _ = _trunk_states(lm.model, out.tokens, out.kv.real[:, :width])
    depth = out.kv.depth[:, :width]
    _assert_lower_blocks_exact(out, cache, depth)
    layers = [layer for row in out.rows for layer in row.exit_layers]
    assert min(layers) < L and max(layers) == L  # mixed exits
    recomputed = [
        (row, slot)
        for row, record in enumerate(out.rows)
        for slot, layer in zip(_decoded_slots(out, prompt), record.exit_layers, strict=False)
        if int(depth[row, slot]) > layer
    ]
    assert recomputed  # some early exits were later completed


def test_copy_cache_projects_the_exit_state():
    """Fixed exit: below it the full model's cache; at every block above it, the block's
    own K/V projections of `h^l`, computed here with the model's modules."""
    layer = 2
    lm = make_lm("spade-exit", STORIES, exit_layer=layer)
    out, _ = _direct_generate(lm, KVStrategy.COPY)
    width = out.tokens.shape[1]
    real = out.kv.real[:, :width]
    hidden, cache, positions = _trunk_states(lm.model, out.tokens, real)
    _assert_lower_blocks_exact(out, cache, torch.full_like(positions, layer))
    base = lm.model.model
    cos, sin = base.rotary_emb(hidden[layer], position_ids=positions)
    fed = _fed(out)
    n_fed = int(fed.sum())
    for block in range(layer, L):
        module = base.layers[block]
        x = module.input_layernorm(hidden[layer])
        shape = (*x.shape[:2], -1, module.self_attn.head_dim)
        with torch.no_grad():
            k = module.self_attn.k_proj(x).view(shape).transpose(1, 2)
            v = module.self_attn.v_proj(x).view(shape).transpose(1, 2)
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        got_k = out.kv.keys[block][:, :, :width].transpose(1, 2)[fed]
        got_v = out.kv.values[block][:, :, :width].transpose(1, 2)[fed]
        torch.testing.assert_close(got_k, k.transpose(1, 2)[fed], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_v, v.transpose(1, 2)[fed], atol=1e-4, rtol=1e-4)
    assert bool((out.kv.depth[:, :width][fed] == L).all())
    assert sum(r.kv_projections for r in out.rows) == n_fed * (L - layer)


def test_fill_cache_is_the_pairs():
    """Fixed exit: each decoded position's entries above the exit are the keys/values of
    its SPADE pair `[h_0^l, h_t^l]` run by transformers' own LlamaModel on a truncated
    copy; prompt positions before the last have the blocks below the exit only."""
    layer = 2
    lm = make_lm("spade-exit", STORIES, exit_layer=layer, kv_strategy="fill")
    out, prompt = _direct_generate(lm, KVStrategy.FILL)
    width = out.tokens.shape[1]
    real = out.kv.real[:, :width]
    hidden, cache, positions = _trunk_states(lm.model, out.tokens, real)
    _assert_lower_blocks_exact(out, cache, torch.full_like(positions, layer))
    upper = copy.deepcopy(lm.model)
    upper.model.layers = upper.model.layers[layer:]
    upper.config.num_hidden_layers = L - layer
    for index, module in enumerate(upper.model.layers):
        module.self_attn.layer_idx = index  # the truncated copy's own cache numbering
    for row in range(len(out.tokens)):
        start = int(out.kv.first_real[row])
        for slot in _decoded_slots(out, prompt):
            pair = torch.stack([hidden[layer][row, start], hidden[layer][row, slot]])[None]
            with torch.no_grad():
                ref = upper(
                    inputs_embeds=pair,
                    position_ids=torch.tensor([[0, int(positions[row, slot])]]),
                    attention_mask=torch.ones(1, 2, dtype=torch.long),
                    use_cache=True,
                ).cache
            for block in range(layer, L):
                got = out.kv.keys[block][row, :, slot]
                want = ref.layers[block - layer].keys[0, :, 1]
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
                got = out.kv.values[block][row, :, slot]
                want = ref.layers[block - layer].values[0, :, 1]
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            assert int(out.kv.depth[row, slot]) == L
        earlier = range(start + 1, prompt - 1)
        assert all(int(out.kv.depth[row, s]) == layer for s in earlier)


def test_attending_to_a_slot_without_keys_values_raises():
    """The guard behind every strategy, through the model's own blocks: a query that would
    attend to an earlier slot lacking a block's keys/values stops with an error naming
    the block and the slot, however many blocks below pass."""
    lm = make_lm("spade-exit", STORIES, exit_layer=L)
    arch = architecture_for(lm.model)
    ids = torch.tensor([lm.tok_encode("Once upon a time")])
    width = ids.shape[1]
    store = KVStore(L, torch.ones_like(ids, dtype=torch.bool), torch.arange(width)[None])
    rows = torch.tensor([0])

    def run(slots: torch.Tensor, start: int, end: int) -> None:
        allowed = causal_allowed(store, rows, slots)
        hidden = arch.embed(ids[:, slots[0]], store.positions[:, slots[0]])
        if start:  # the state entering `start` is not checked; any will do
            hidden = arch.run_blocks(hidden, 0, start, store.positions[:, slots[0]])
        masks = {
            kind: arch.attention_mask(allowed, hidden.dtype)
            for kind in arch.mask_kinds(range(start, end))
        }
        cache = BlockCache(store, rows, slots, allowed)
        arch.run_blocks(hidden, start, end, store.positions[:, slots[0]], masks, cache)

    with torch.no_grad():
        run(torch.arange(width - 1)[None], 0, 2)  # the prompt but its last token, 2 blocks
        assert store.depth[0].tolist() == [2] * (width - 1) + [0]
        run(torch.tensor([[width - 1]]), 0, 2)  # the last token: everything it sees is there
        with pytest.raises(MissingKeyValuesError, match=f"block 2: row 0, query slot {width - 1}"):
            run(torch.tensor([[width - 1]]), 2, 3)  # block 3: the earlier slots have 2 only


@pytest.mark.parametrize("strategy", ["fill", "copy", "recompute"])
def test_strategies_generate_with_mixed_exits(strategy):
    """Every strategy runs mixed exits to the end (the cache check never fires) and
    records one exit per generated token."""
    lm = make_lm("spade-exit", STORIES, **MIXED, kv_strategy=strategy)
    texts = _generate(lm)
    assert all(texts)
    stats = lm.exit_stats["gen"].to_dict()
    assert stats["exits_per"] == "generated token"
    assert stats["generated_tokens"] == sum(stats["exit_layer_histogram"].values())
    assert 0 < stats["mean_exit_layer"] < L and len(stats["exit_layer_histogram"]) > 1


def test_batch_size_does_not_change_fixed_exit_outputs():
    outputs = [
        _generate(make_lm("spade-exit", STORIES, batch_size=b, exit_layer=3)) for b in (1, 4)
    ]
    assert outputs[0] == outputs[1]


def test_accounting_and_exit_log(tmp_path):
    log = tmp_path / "exits.jsonl"
    lm = make_lm(
        "spade-exit", STORIES, threshold="inf", min_layer=3, confidence_decoder="logit_lens",
        exit_log=str(log),
    )  # fmt: skip
    _generate(lm, prompts=PROMPTS[:1])
    stats = lm.exit_stats["gen"].to_dict()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    tokens = stats["generated_tokens"]
    assert lines[0]["token_exit_layers"] == [3] * tokens and stats["mean_exit_layer"] == 3
    n = lm.tok_batch_encode(PROMPTS[:1])[0].shape[1]
    # start token through all blocks; prompt to 3; pair of each token above 3; tokens to 3
    run = L + 3 * n + (L - 3) * tokens + 3 * (tokens - 1)
    assert stats["block_token_passes"] == run
    assert stats["block_token_passes_full"] == L * (n + tokens - 1)
    assert stats["confidence_checks"] == tokens


# --- bad settings -------------------------------------------------------------------------
def _message(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "gen_kwargs,expected",
    [
        ({"temperature": -0.5}, "temperature=-0.5 is not valid: it must be >= 0"),
        ({"do_sample": True, "temperature": 1.0, "top_p": 0.0}, "top_p=0 is not valid"),
        ({"do_sample": True, "temperature": 1.0, "top_p": 1.5}, "top_p=1.5 is not valid"),
        ({"num_beams": 4}, "does not support num_beams"),
    ],
)
def test_bad_generation_settings(gen_kwargs, expected):
    lm = make_lm("spade-exit", STORIES, exit_layer=3)
    with pytest.raises(GenerationSettingsError) as excinfo:
        _generate(lm, {"until": ["\n"], "max_gen_toks": 4, **gen_kwargs}, PROMPTS[:1])
    assert expected in _message(excinfo) and "--gen_kwargs" in _message(excinfo)


@pytest.mark.parametrize(
    "args,expected",
    [
        ({"exit_layer": 3, "kv_strategy": "lazy"}, "kv_strategy='lazy' is not valid; choose one "
         "of: fill, copy, recompute."),
        ({"kv_strategy": "copy"}, "only applies to early exits in generation"),
        ({"exit_layer": 3, "decoder": "logit_lens", "kv_strategy": "fill"},
         "which decoder=logit_lens does not make"),
        ({"exit_layer": 3, "spade_positions": "compact", "kv_strategy": "fill"},
         "use spade_positions=original"),
    ],
)  # fmt: skip
def test_bad_kv_strategy(args, expected):
    with pytest.raises(SpadeArgumentError) as excinfo:
        make_lm("spade-exit", STORIES, **args)
    assert expected in _message(excinfo)
