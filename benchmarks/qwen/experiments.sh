#!/usr/bin/env bash
# The paper's protocol, zero-shot with its letter prompts, on Qwen2.5-Coder-1.5B-Instruct
# (docs/qwen.md), on 2 CPU cores:
#
#   bash benchmarks/qwen/experiments.sh [STAGE ...]     (default: every stage)
#
# Stages: accuracy (lm-eval's `hf` at full depth, per task), layers (every decoder that
# needs no lens at every layer, with the oracle exit, per task), rules (the lens-free exit
# rules against the oracle, per task: answer-level entropy and margin and patience from
# SPADE and logit lens, logit-lens vocabulary entropy, static exits; checks from L/2).
# Each step skips an output that is already there, so an interrupted run resumes; each
# logs its wall clock to runs/qwen/times.tsv. Outputs go to runs/qwen/ (ignored by git);
# what is kept is copied to results/qwen/, with this script as the record of what made it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
SPADE=.venv/bin/lm-eval-spade
export LM_EVAL_SPADE_DATA_DIR=${LM_EVAL_SPADE_DATA_DIR:-$(cd .. && pwd)/shared/data}
export TOKENIZERS_PARALLELISM=false
MODEL=$($PY benchmarks/qwen/get_model.py --quiet)
OUT=runs/qwen
mkdir -p "$OUT"
LIMIT=${LIMIT:-300}   # test questions per task
TASKS=${TASKS:-arc_easy_spade arc_challenge_spade boolq_spade headqa_en_spade}

step() {  # step NAME OUTPUT COMMAND...: run unless OUTPUT exists, and time it
  local name=$1 output=$2
  shift 2
  if [ -e "$output" ]; then echo "skip $name ($output exists)"; return; fi
  echo "== $name"
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  printf '%s\t%s\n' "$name" $((SECONDS - start)) | tee -a "$OUT/times.tsv"
}

accuracy() {  # lm-eval's own `hf` at full depth (no start token), per task
  for t in $TASKS; do
    step "accuracy-hf-$t" "$OUT/accuracy-hf-$t" .venv/bin/lm_eval --model hf \
      --model_args "pretrained=$MODEL,dtype=float32" --tasks "$t" --limit "$LIMIT" \
      --device cpu --batch_size 16 --output_path "$OUT/accuracy-hf-$t"
  done
}

layers() {  # figures 3/4/7 without lenses, and the oracle exit of each decoder, per task
  for t in $TASKS; do
    step "layers-$t" "$OUT/layers-$t" $SPADE sweep layers --model "$MODEL" --tasks "$t" \
      --limit "$LIMIT" --decoders logit_lens spade spade_nos --no-full-depth-timing \
      --out "$OUT/layers-$t"
  done
}

ANSWER_THRESHOLDS="0.01 0.02 0.05 0.1 0.2 0.3 0.5 0.75 1 1.5 inf"

rules() {
  for t in $TASKS; do
    step "rules-$t" "$OUT/rules-$t" $SPADE sweep thresholds --model "$MODEL" --tasks "$t" \
      --limit "$LIMIT" --min-layer 14 --answer-decoders spade logit_lens \
      --patience 0 1 2 3 4 6 --thresholds $ANSWER_THRESHOLDS --no-full-depth-timing \
      --out "$OUT/rules-$t"
  done
}

for stage in "${@:-accuracy layers rules}"; do
  for s in $stage; do "$s"; done
done
