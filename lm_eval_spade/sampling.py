"""How the next token is chosen from the exit layer's logits: greedy or sampled, as `hf`.

lm-eval hands `generate_until` the task's generation kwargs; HFLM's `_model_generate`
turns temperature 0 into greedy decoding and `model.generate` fills what the request
leaves unset from the model's generation config, then from transformers' defaults.
`Sampling.from_request` does the same, and sampling uses transformers' own warpers
(temperature, top-k, top-p, in that order) and `torch.multinomial`, as `generate` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lm_eval_spade.errors import UserInputError

#: transformers' own defaults (`GenerationConfig._get_default_generation_params`), used
#: where neither the request nor the model's generation config sets a value.
_DEFAULTS: dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
_FIX = "change the task's generation_kwargs or --gen_kwargs"


class GenerationSettingsError(UserInputError):
    """A generation setting spade-exit cannot honour."""


def _number(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or math.isnan(number):
        raise GenerationSettingsError(f"{key}={value!r} must be a number; {_FIX}.")
    if math.isinf(number):  # temperature=inf samples uniformly: garbage, never meant
        raise GenerationSettingsError(f"{key}={value!r} must be a finite number; {_FIX}.")
    return number


@dataclass(frozen=True)
class Sampling:
    """Greedy (`do_sample=False`) or sampling with temperature, top-k and top-p."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0

    @classmethod
    def from_request(
        cls, kwargs: dict[str, Any], model_config: GenerationConfig | None = None
    ) -> Sampling:
        """Settings from lm-eval's normalised generation kwargs (as `_model_generate` gets
        them), completed from `model_config` and transformers' defaults."""
        unknown = sorted(set(kwargs) - {"do_sample", "temperature", "top_k", "top_p"})
        if unknown:
            raise GenerationSettingsError(
                f"spade-exit generation does not support {', '.join(unknown)} (it supports "
                f"do_sample, temperature, top_k, top_p, until and max_gen_toks); {_FIX}, or "
                "drop the exit settings to generate with hf."
            )
        values = dict(kwargs)
        if values.get("temperature", 0.0) == 0.0 and values.get("do_sample") is None:
            values["do_sample"] = False  # HFLM: temperature 0 means greedy
        for key, default in _DEFAULTS.items():
            if values.get(key) is None:
                configured = getattr(model_config, key, None)
                values[key] = default if configured is None else configured
        temperature = _number("temperature", values["temperature"])
        top_p = _number("top_p", values["top_p"])
        top_k = _number("top_k", values["top_k"])
        do_sample = bool(values["do_sample"])
        if temperature < 0:
            raise GenerationSettingsError(
                f"temperature={temperature:g} is not valid: it must be >= 0 (0 is greedy); {_FIX}."
            )
        if do_sample and temperature == 0:
            raise GenerationSettingsError(
                "do_sample=True with temperature=0 is not valid: sampling needs temperature "
                f"> 0 (or set do_sample=False for greedy); {_FIX}."
            )
        if not 0 < top_p <= 1:
            raise GenerationSettingsError(
                f"top_p={top_p:g} is not valid: it must be in (0, 1] (1 keeps every token); {_FIX}."
            )
        if top_k < 0 or top_k != int(top_k):
            raise GenerationSettingsError(
                f"top_k={top_k:g} is not valid: it must be a whole number >= 0 (0 keeps every "
                f"token); {_FIX}."
            )
        return cls(do_sample, temperature, int(top_k), top_p)

    def warpers(self) -> LogitsProcessorList:
        """transformers' warpers for these settings, in `generate`'s order."""
        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(top_k=self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=self.top_p))
        return warpers

    def choose(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Next token per row from `logits` `[rows, vocab]` (scored in float32, as
        `generate` does); `input_ids` are the rows' tokens so far."""
        scores = logits.float()
        if not self.do_sample:
            return scores.argmax(dim=-1)
        scores = self.warpers()(input_ids, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
