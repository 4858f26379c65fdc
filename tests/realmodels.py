"""The real pretrained models of `../shared/models` in HuggingFace format, for tests and
benchmarks.

SmolLM2-135M-Instruct is kept there as a GGUF with a `to_hf.py` that builds its HF
folder (about 20 s). The folder is built once into `.cache/models/` of this checkout
(ignored by git) and reused. Several pytest-xdist workers may ask for it at once, so the
build holds an exclusive file lock, and `to_hf.py` writes the folder atomically: a
worker either builds it or waits and finds it complete.

Qwen2.5-Coder-1.5B-Instruct is too large to build in a test (a 1.1 GB download, minutes,
~9 GB of RAM): `benchmarks/qwen/get_model.py` builds it into the same cache, and tests
only use it where it is already complete.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SMOLLM2_SOURCE = SHARED / "models" / "smollm2-135m-instruct"
CACHE = Path(os.environ.get("LM_EVAL_SPADE_MODEL_CACHE", REPO / ".cache" / "models"))

#: SmolLM2's two candidate start tokens (its tokenizer adds none): its BOS and the
#: document separator of its pretraining data.
IM_START, ENDOFTEXT = 1, 0


def smollm2_dir(dtype: str = "float32") -> Path:
    """The HF folder of SmolLM2-135M-Instruct (dequantized from the shared GGUF)."""
    out = CACHE / f"smollm2-135m-instruct-{dtype}"
    if (out / "config.json").is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():  # another worker may have built it
            build = subprocess.run(
                [sys.executable, str(SMOLLM2_SOURCE / "to_hf.py"), str(out), "--dtype", dtype],
                capture_output=True,
                text=True,
            )
            if build.returncode:
                raise RuntimeError(f"building {out} failed:\n{build.stderr[-3000:]}")
    return out


def qwen_dir() -> Path | None:
    """The HF folder of Qwen2.5-Coder-1.5B-Instruct (float32, dequantized from the Q4_K_M
    GGUF) if `benchmarks/qwen/get_model.py` has built it, else None: tests never download.
    The folder is complete once its SOURCE.json is there (written last, then the folder is
    renamed into place)."""
    out = CACHE / "qwen2.5-coder-1.5b-instruct-float32"
    if (out / "SOURCE.json").is_file() and (out / "config.json").is_file():
        return out
    return None


if __name__ == "__main__":
    print(smollm2_dir(*sys.argv[1:]))
