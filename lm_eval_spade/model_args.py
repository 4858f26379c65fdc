"""Refuse misspelt model_args before they reach transformers.

HFLM forwards every key it does not know to `from_pretrained`, which quietly turns
unknown keys into config attributes: `exit_layr=3` would load the model, ignore the
setting, and report full-depth numbers as if they were early-exit ones. So a key must be
an HFLM argument, a spade-exit argument, a `from_pretrained` loading option, or an
attribute of the model's config.
"""

from __future__ import annotations

import inspect
from typing import Any

from lm_eval.models.huggingface import HFLM
from transformers import AutoConfig, PretrainedConfig

from lm_eval_spade.config import SPADE_MODEL_ARGS, SpadeArgumentError

#: Loading options that HFLM passes through to `from_pretrained` (transformers 5).
FROM_PRETRAINED_OPTIONS: frozenset[str] = frozenset(
    {
        "attn_implementation",
        "cache_dir",
        "device_map",
        "force_download",
        "gpus",
        "key_mapping",
        "local_files_only",
        "low_cpu_mem_usage",
        "max_memory",
        "offload_buffers",
        "offload_state_dict",
        "quantization_config",
        "token",
        "torch_dtype",
        "use_kernels",
        "use_safetensors",
        "variant",
        "weights_only",
    }
)


def hflm_arguments() -> frozenset[str]:
    params = inspect.signature(HFLM.__init__).parameters.values()
    return frozenset(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD) - {"self"}


def check_model_args(pretrained: Any, kwargs: dict[str, Any]) -> None:
    """Raise `SpadeArgumentError` for keys nobody would read."""
    known = hflm_arguments() | FROM_PRETRAINED_OPTIONS | set(SPADE_MODEL_ARGS)
    unknown = [key for key in kwargs if key not in known]
    if not unknown:
        return
    config = _model_config(pretrained, kwargs)
    unknown = [key for key in unknown if config is None or not hasattr(config, key)]
    if unknown:
        raise SpadeArgumentError(
            f"unknown model_args {', '.join(sorted(unknown))} for spade-exit. "
            f"spade-exit arguments: {', '.join(SPADE_MODEL_ARGS)}; HF arguments: "
            f"{', '.join(sorted(hflm_arguments()))}; transformers loading options and "
            "attributes of the model's config are passed through."
        )


def _model_config(pretrained: Any, kwargs: dict[str, Any]) -> PretrainedConfig | None:
    if not isinstance(pretrained, str):
        return getattr(pretrained, "config", None)
    try:
        return AutoConfig.from_pretrained(
            pretrained,
            revision=kwargs.get("revision") or "main",
            trust_remote_code=bool(kwargs.get("trust_remote_code", False)),
        )
    except (OSError, ValueError):
        return None  # HFLM will report the unloadable model itself
