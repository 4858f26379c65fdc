"""Loading a causal LM and its tokenizer for the package's own commands.

Evaluation loads models through lm-eval's HFLM; training commands (lenses, LoRA) load
them here, with the same hub-or-directory paths and dtype names. Both check the paths
first (`check_model_path`, `check_adapter_path`): a path that does not exist would
otherwise reach transformers as a malformed hub id ("Repo id must be in the form ..."),
and a folder without an adapter would fail deep inside peft.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers as T

from lm_eval_spade import calibration
from lm_eval_spade.errors import UserInputError
from lm_eval_spade.finite import check_finite

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelPathError(UserInputError):
    """A model or adapter path that names nothing loadable."""


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _named(key: str, value: str) -> str:
    """`--model X` or `pretrained=X`, as the user wrote it."""
    return f"{key}{value}" if key.endswith("=") else f"{key} {value}"


def check_model_path(pretrained: str, key: str = "--model") -> None:
    """Refuse a model that is neither a HuggingFace model folder nor a hub id."""
    path, named = Path(pretrained).expanduser(), _named(key, pretrained)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelPathError(
                f"{named} is a folder without config.json, not a HuggingFace model folder "
                "(one written by save_pretrained)."
            )
        return
    if path.exists():
        raise ModelPathError(f"{named} is a file; give a model folder or a hub id.")
    if not _is_hub_id(pretrained):
        raise ModelPathError(
            f"{named} does not exist: it is neither a model folder nor a hub id (org/name). "
            "Check the path."
        )


def check_adapter_path(peft: str, key: str = "--peft") -> None:
    """Refuse an adapter path that is not a peft adapter folder or a hub id."""
    path, named = Path(peft).expanduser(), _named(key, peft)
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise ModelPathError(
                f"{named} holds no adapter_config.json: not a LoRA adapter folder (as "
                "`lm-eval-spade finetune --out` writes)."
            )
        return
    if path.exists() or not _is_hub_id(peft):
        raise ModelPathError(f"{named} is not an adapter folder (or a hub id of one).")


def check_adapter_weights(model: torch.nn.Module, peft: str) -> None:
    """Refuse a loaded LoRA adapter whose weights are not finite."""
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    check_finite(lora, f"the adapter {peft}", "it is damaged: train it again.")


def hub_load_error(pretrained: str, err: OSError) -> ModelPathError:
    """One line for a model that is no local folder and could not come from the hub."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelPathError(
        f"{pretrained} is not a local folder, and loading it from the hub failed ({first}). "
        "Check the name, or give the path of a downloaded model folder."
    )


def load_causal_lm(
    pretrained: str,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    peft: str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Model (in eval mode) and tokenizer; a LoRA adapter directory is applied if given."""
    pretrained = calibration.resolve_model(pretrained)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    check_model_path(pretrained)
    if peft is not None:
        check_adapter_path(peft)
    try:
        model = T.AutoModelForCausalLM.from_pretrained(
            pretrained, revision=revision, dtype=DTYPES[dtype]
        )
        tokenizer = T.AutoTokenizer.from_pretrained(pretrained, revision=revision)
    except OSError as err:
        if Path(pretrained).is_dir():
            raise
        raise hub_load_error(pretrained, err) from err
    if peft is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, peft)
        check_adapter_weights(model, peft)
    return model.to(device).eval(), tokenizer
