#!/usr/bin/env bash
# Set up .venv for lm-eval-spade on a fresh Linux machine: Python 3.11 (or python3),
# torch 2.13.0 (CPU wheel) only where no torch is installed yet, then this package with
# its dev extras, editable, so `lm_eval --model spade-exit` works from the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
# Test-only cross-check: the tests load our exported lenses with the real tuned-lens
# package. Its lens module needs only torch/transformers/huggingface_hub; its declared
# dependencies (torchdata, wandb, ...) would pull another torch, so they are skipped.
.venv/bin/python -m pip install -q --no-deps tuned-lens==0.2.0
# Test-only: real Llama (SentencePiece), GPT-2 and GPT-NeoX tokenizers for the
# single-answer-token test. llama.cpp keeps their vocabularies as tokenizer-test files,
# and llama-cpp-python's source distribution vendors them; only those three are kept.
VOCAB=.cache/tokenizers
if [ ! -f "$VOCAB/ggml-vocab-gpt-neox.gguf" ]; then
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$tmp"
  tar xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp" --wildcards \
    '*/models/ggml-vocab-llama-spm.gguf' '*/models/ggml-vocab-gpt-2.gguf' \
    '*/models/ggml-vocab-gpt-neox.gguf'
  mkdir -p "$VOCAB"
  cp "$tmp"/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-*.gguf "$VOCAB"/
  rm -rf "$tmp"
fi
