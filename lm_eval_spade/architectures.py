"""Everything that differs between model families, in one place.

The rest of the package sees a model only through `Architecture`: embed tokens into
`h^0`, run any blocks `l+1..m` on any set of hidden states with explicit position ids,
and apply the model's own final norm and LM head. Adding a family means adding one
subclass here and one line to `FAMILIES`.

Attention masks are built with transformers' own mask builders for the model's attention
implementation, but never from position ids: transformers reads non-consecutive position
ids such as SPADE's `(0, i)` as packed sequences and would mask the pair apart.

Generation runs blocks against a key/value cache: `run_blocks` takes explicit masks (from
`attention_mask`, in the format the model's attention implementation reads) and any
object with the `update(keys, values, layer_idx, ...)` method transformers' attention
modules call; `key_values` gives a block's keys and values for hidden states without
running the rest of the block.
"""

from __future__ import annotations

from functools import cached_property
from typing import ClassVar, Protocol

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from lm_eval_spade.errors import UserInputError


class UnsupportedArchitectureError(UserInputError):
    """The model's family is not one this package knows how to run block by block."""


class KeyValueCache(Protocol):
    """What transformers' attention modules call on a cache: store this block's new keys
    and values (`[batch, heads, queries, head_dim]`) and return the ones to attend to."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class _Probed(Exception):
    """Raised by `_KeyValueProbe` to stop a block once its keys and values are known."""


class _KeyValueProbe:
    """A cache that records the keys/values a block writes and stops the block there, so
    the family's own code (norms, projections, rotary, q/k norms) computes them."""

    keys: torch.Tensor
    values: torch.Tensor

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys, self.values = key_states, value_states
        raise _Probed


class Architecture:
    """Block-level access to a causal LM; subclasses fill in one family each."""

    #: `config.model_type` values this class handles.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: Whether positions enter through rotary embeddings inside the blocks (True), or
    #: only once, as learned absolute embeddings added to `h^0` (False).
    rotary: ClassVar[bool] = True

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.config = model.config

    # --- what each family provides -------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """`h^0`: token embeddings, plus learned positions where the family has them."""
        raise NotImplementedError

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _final_norm_modules(self) -> list[nn.Module | None]:
        """The modules `final_norm` applies, in order (None where a family's is absent)."""
        raise NotImplementedError

    def _call_block(
        self,
        index: int,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KeyValueCache | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def _rotary(
        self, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def _layer_mask_kind(self, index: int) -> str:
        layer_types = getattr(self.config, "layer_types", None)
        return layer_types[index] if layer_types else "full_attention"

    # --- shared machinery -----------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """`head(h) = W · final_norm(h)`: logits from any layer's hidden states."""
        return self.lm_head(self.final_norm(hidden))

    def head_parameters(self) -> dict[str, torch.Tensor]:
        """Every tensor `head` depends on, named; lenses are tied to these."""
        modules = [*self._final_norm_modules(), self.lm_head]
        return {
            f"{i}.{name}": tensor
            for i, module in enumerate(modules)
            if module is not None
            for name, tensor in module.state_dict().items()
        }

    def run_blocks(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        position_ids: torch.Tensor,
        masks: dict[str, torch.Tensor | None] | None = None,
        cache: KeyValueCache | None = None,
    ) -> torch.Tensor:
        """Run blocks `start+1..end` (`layers[start:end]`) on `hidden`.

        Without `masks`, as causal sequences: `hidden` is `[batch, seq, d]` with no padding
        on the left; right padding is harmless. `position_ids` is `[batch, seq]` or
        `[1, seq]`. With `masks` (per mask kind, see `mask_kinds`, made by
        `attention_mask`) and a `cache`, the queries attend to what the cache returns.
        """
        if start == end:
            return hidden
        if masks is None:
            masks = self._masks(hidden, range(start, end))
        rotary = self._rotary(hidden, position_ids)
        for index in range(start, end):
            mask = masks[self._mask_kind_of[index]]
            hidden = self._call_block(index, hidden, mask, position_ids, rotary, cache)
        return hidden

    def key_values(
        self, index: int, hidden: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `index`'s keys and values for `hidden` `[batch, seq, d]`, each
        `[batch, kv_heads, seq, head_dim]`: the norm and projections before its attention,
        without the attention or MLP."""
        probe = _KeyValueProbe()
        rotary = self._rotary(hidden, position_ids)
        try:
            self._call_block(index, hidden, None, position_ids, rotary, probe)
        except _Probed:
            return probe.keys, probe.values
        raise RuntimeError(f"block {index} of {self.config.model_type} never used its cache")

    def mask_kinds(self, indices: range) -> set[str]:
        """The attention kinds (`full_attention`, `sliding_attention`) of these blocks."""
        return {self._mask_kind_of[i] for i in indices}

    @cached_property
    def _mask_kind_of(self) -> tuple[str, ...]:
        """Every block's attention kind, read once: generation asks at every block call."""
        return tuple(self._layer_mask_kind(i) for i in range(self.num_layers))

    @property
    def sliding_window(self) -> int | None:
        return getattr(self.config, "sliding_window", None)

    def attention_mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`allowed` `[batch, queries, keys]` (True: may attend) in the format the model's
        attention implementation reads: boolean for sdpa, additive for eager."""
        implementation = self.config._attn_implementation
        if implementation == "sdpa":
            return allowed[:, None]
        if implementation == "eager":
            zero = torch.zeros((), dtype=dtype, device=allowed.device)
            blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
            return torch.where(allowed, zero, blocked)[:, None]
        raise UnsupportedArchitectureError(
            f"spade-exit generates with explicit attention masks, which attn_implementation="
            f"{implementation} does not take; load the model with attn_implementation=sdpa "
            "or eager."
        )

    def _masks(self, hidden: torch.Tensor, indices: range) -> dict[str, torch.Tensor | None]:
        kinds = self.mask_kinds(indices)
        builders = {
            "full_attention": create_causal_mask,
            "sliding_attention": create_sliding_window_causal_mask,
        }
        unknown = kinds - builders.keys()
        if unknown:
            raise UnsupportedArchitectureError(
                f"{self.config.model_type}: attention layer types {sorted(unknown)} are not "
                "supported; only full and sliding-window causal attention are."
            )
        return {
            kind: builders[kind](
                config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None
            )
            for kind in kinds
        }


class LlamaLike(Architecture):
    """Llama and the families that copy its layout (`model.model.layers`, rotary, RMSNorm).

    Gemma's `sqrt(d)` embedding scale lives inside its embedding module, so it comes
    with `embed_tokens` here too.
    """

    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma")

    @cached_property  # looked up at every block call; the module never changes
    def _base(self) -> nn.Module:
        return self.model.get_decoder()

    @property
    def layers(self) -> nn.ModuleList:
        return self._base.layers

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self._base.embed_tokens(input_ids)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._base.norm(hidden)

    def _final_norm_modules(self):
        return [self._base.norm]

    def _rotary(self, hidden, position_ids):
        return self._base.rotary_emb(hidden, position_ids=position_ids)

    def _layer_mask_kind(self, index: int) -> str:
        # Mistral has no `layer_types`: a set sliding window applies to every layer.
        if self.config.model_type == "mistral" and self.config.sliding_window is not None:
            return "sliding_attention"
        return super()._layer_mask_kind(index)

    def _call_block(self, index, hidden, mask, position_ids, rotary, cache=None):
        return self.layers[index](
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=rotary,
            cache=cache,
        )


class GPTNeoX(Architecture):
    model_types = ("gpt_neox",)

    @cached_property
    def _base(self) -> nn.Module:
        return self.model.gpt_neox

    @property
    def layers(self) -> nn.ModuleList:
        return self._base.layers

    def embed(self, input_ids, position_ids):
        return self._base.embed_in(input_ids)

    def final_norm(self, hidden):
        return self._base.final_layer_norm(hidden)

    def _final_norm_modules(self):
        return [self._base.final_layer_norm]

    def _rotary(self, hidden, position_ids):
        return self._base.rotary_emb(hidden, position_ids=position_ids)

    def _call_block(self, index, hidden, mask, position_ids, rotary, cache=None):
        return self.layers[index](
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=rotary,
            layer_past=cache,
        )


class GPT2(Architecture):
    model_types = ("gpt2",)
    rotary = False

    @cached_property
    def _base(self) -> nn.Module:
        return self.model.transformer

    @property
    def layers(self) -> nn.ModuleList:
        return self._base.h

    @property
    def hidden_size(self) -> int:
        return int(self.config.n_embd)

    def embed(self, input_ids, position_ids):
        return self._base.wte(input_ids) + self._base.wpe(position_ids)

    def final_norm(self, hidden):
        return self._base.ln_f(hidden)

    def _final_norm_modules(self):
        return [self._base.ln_f]

    def _call_block(self, index, hidden, mask, position_ids, rotary, cache=None):
        return self.layers[index](hidden, attention_mask=mask, cache=cache)


class OPT(Architecture):
    """OPT: learned positions with an offset of 2, optional `project_in`/`project_out`.

    `project_out` maps back to the embedding width and belongs to the head side, so
    `final_norm` applies it after the final layer norm, as `OPTDecoder` does.
    """

    model_types = ("opt",)
    rotary = False

    @cached_property
    def _base(self) -> nn.Module:
        return self.model.model.decoder

    @property
    def layers(self) -> nn.ModuleList:
        return self._base.layers

    def embed(self, input_ids, position_ids):
        base = self._base
        tokens = base.embed_tokens(input_ids)
        if base.project_in is not None:
            tokens = base.project_in(tokens)
        ones = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        return tokens + base.embed_positions(ones, 0, position_ids=position_ids)

    def final_norm(self, hidden):
        base = self._base
        if base.final_layer_norm is not None:
            hidden = base.final_layer_norm(hidden)
        if base.project_out is not None:
            hidden = base.project_out(hidden)
        return hidden

    def _final_norm_modules(self):
        return [self._base.final_layer_norm, self._base.project_out]

    def _call_block(self, index, hidden, mask, position_ids, rotary, cache=None):
        return self.layers[index](
            hidden, attention_mask=mask, position_ids=position_ids, cache=cache
        )


FAMILIES: tuple[type[Architecture], ...] = (LlamaLike, GPTNeoX, GPT2, OPT)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


def _unwrap(model: nn.Module) -> PreTrainedModel:
    """The transformers model under a peft wrapper, where there is one.

    LoRA replaces linear layers in place, so running the base model's blocks runs the
    adapted weights as well.
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def architecture_for(model: nn.Module) -> Architecture:
    """The `Architecture` for `model`, or a clear error naming the family."""
    base = _unwrap(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family(base)
    raise UnsupportedArchitectureError(
        f"spade-exit does not support the model family {model_type!r} "
        f"({type(base).__name__}). Supported families: {', '.join(SUPPORTED_MODEL_TYPES)}."
    )
