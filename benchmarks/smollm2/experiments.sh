#!/usr/bin/env bash
# The paper's protocol on SmolLM2-135M-Instruct (../shared/models), on 2 CPU cores:
# LoRA per task, lenses per fine-tuned model, then layer, threshold and transfer sweeps.
#
#   bash benchmarks/smollm2/experiments.sh [STAGE ...]     (default: every stage)
#
# Stages: start finetune lenses layers thresholds transfer base. Each step skips an output
# that is already there, so an interrupted run resumes; each logs its wall clock to
# runs/smollm2/times.tsv. Outputs go to runs/smollm2/ (ignored by git); what is kept is
# copied to results/smollm2/ by hand, with this script as the record of what made it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
SPADE=.venv/bin/lm-eval-spade
export LM_EVAL_SPADE_DATA_DIR=${LM_EVAL_SPADE_DATA_DIR:-$(cd .. && pwd)/shared/data}
export TOKENIZERS_PARALLELISM=false
MODEL=$($PY tests/realmodels.py)
OUT=runs/smollm2
TASKS_DIR=benchmarks/smollm2/tasks
mkdir -p "$OUT"

# Tasks: lm-eval's own cloze ARC and HeadQA, one-token BoolQ. The ARC adapter is trained
# on ARC-Easy + ARC-Challenge train (lm-eval's ai2_arc tag), as the paper's "ARC".
declare -A TRAIN=([arc]=ai2_arc [boolq]=boolq [headqa]=headqa_en)
declare -A EVAL=([arc]="arc_easy arc_challenge" [boolq]=boolq [headqa]=headqa_en)
declare -A STEPS=([arc]=421 [boolq]=123 [headqa]=332)  # one epoch of 8 documents a step
LIMIT=${LIMIT:-300}            # test questions per task in the sweeps
# The start token: SmolLM2's tokenizer adds none; <|endoftext|> (id 0), its pretraining
# document separator, decoded ARC-Easy Dev better than its BOS <|im_start|> (id 1):
# results/smollm2/start-token/. Every step uses it: LoRA, lenses and spade-exit.
START=0
THRESHOLDS="0.05 0.1 0.2 0.3 0.5 0.75 1 1.5 2 3 inf"

step() {  # step NAME OUTPUT COMMAND...: run unless OUTPUT exists, and time it
  local name=$1 output=$2
  shift 2
  if [ -e "$output" ]; then echo "skip $name ($output exists)"; return; fi
  echo "== $name"
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  printf '%s\t%s\n' "$name" $((SECONDS - start)) | tee -a "$OUT/times.tsv"
}

start() {  # the start token: SPADE at every layer with each candidate, on ARC-Easy Dev
  for id in 1 0; do
    step "start-token-$id" "$OUT/start-token-$id" $SPADE sweep layers --model "$MODEL" \
      --model-args "prefix_token_id=$id" --tasks arc_easy_dev --include-path "$TASKS_DIR" \
      --limit 200 --decoders logit_lens spade spade_nos --out "$OUT/start-token-$id"
  done
  $PY benchmarks/smollm2/start_token.py "$OUT/start-token-1" "$OUT/start-token-0"
}

finetune() {
  for m in arc boolq headqa; do
    step "finetune-$m" "$OUT/adapters/$m" $SPADE finetune --model "$MODEL" \
      --task "${TRAIN[$m]}" --steps "${STEPS[$m]}" --batch-size 8 --rank 16 --alpha 32 \
      --lr 3e-4 --seed 0 --prefix-token-id $START --out "$OUT/adapters/$m"
  done
}

lenses() {  # L-SPADE and tuned lens of each fine-tuned model, on its own task's train split
  for m in arc boolq headqa; do
    for kind in lspade tuned_lens; do
      step "lens-$m-$kind" "$OUT/lenses/$m-$kind" $SPADE train-lens --model "$MODEL" \
        --peft "$OUT/adapters/$m" --kind $kind --data "${TRAIN[$m]}" --steps 300 \
        --batch-size 16 --lr 1e-3 --seed 0 --prefix-token-id $START --out "$OUT/lenses/$m-$kind"
    done
  done
}

layers() {  # figures 3/4/7: every decoder at every layer, each fine-tuned model on its tasks
  for m in arc boolq headqa; do
    step "layers-$m" "$OUT/layers-$m" $SPADE sweep layers --model "$MODEL" \
      --model-args "prefix_token_id=$START,peft=$OUT/adapters/$m" --tasks ${EVAL[$m]} --limit "$LIMIT" \
      --lens "$OUT/lenses/$m-lspade" "$OUT/lenses/$m-tuned_lens" --out "$OUT/layers-$m"
  done
}

thresholds() {  # figure 5: SPADE-EXIT against static exits, logit-lens entropy, top-2 margin
  for m in arc boolq headqa; do
    step "thresholds-$m" "$OUT/thresholds-$m" $SPADE sweep thresholds --model "$MODEL" \
      --model-args "prefix_token_id=$START,peft=$OUT/adapters/$m" --tasks ${EVAL[$m]} --limit "$LIMIT" \
      --lens "$OUT/lenses/$m-lspade" --thresholds $THRESHOLDS --out "$OUT/thresholds-$m"
  done
  # The main job's threshold is chosen on ARC-Easy's validation split, never on test.
  step "thresholds-arc-dev" "$OUT/thresholds-arc-dev" $SPADE sweep thresholds \
    --model "$MODEL" --model-args "prefix_token_id=$START,peft=$OUT/adapters/arc" --tasks arc_easy_dev \
    --include-path "$TASKS_DIR" --lens "$OUT/lenses/arc-lspade" --thresholds $THRESHOLDS \
    --no-baselines --out "$OUT/thresholds-arc-dev"
}

transfer() {  # figure 6: L-SPADE trained on ARC used on BoolQ and HeadQA, and the reverse
  for m in boolq headqa; do
    step "lens-$m-lspade-from-arc" "$OUT/lenses/$m-lspade-from-arc" $SPADE train-lens \
      --model "$MODEL" --peft "$OUT/adapters/$m" --kind lspade --data ai2_arc --steps 300 \
      --batch-size 16 --lr 1e-3 --seed 0 --prefix-token-id $START --out "$OUT/lenses/$m-lspade-from-arc"
    step "lens-arc-lspade-from-$m" "$OUT/lenses/arc-lspade-from-$m" $SPADE train-lens \
      --model "$MODEL" --peft "$OUT/adapters/arc" --kind lspade --data "${TRAIN[$m]}" \
      --steps 300 --batch-size 16 --lr 1e-3 --seed 0 --prefix-token-id $START --out "$OUT/lenses/arc-lspade-from-$m"
    step "transfer-$m" "$OUT/transfer-$m" $SPADE sweep transfer --model "$MODEL" \
      --model-args "prefix_token_id=$START,peft=$OUT/adapters/$m" --tasks ${EVAL[$m]} --limit "$LIMIT" \
      --lens "${TRAIN[$m]}=$OUT/lenses/$m-lspade" "ai2_arc=$OUT/lenses/$m-lspade-from-arc" \
      --thresholds $THRESHOLDS --out "$OUT/transfer-$m"
  done
  step "transfer-arc" "$OUT/transfer-arc" $SPADE sweep transfer --model "$MODEL" \
    --model-args "prefix_token_id=$START,peft=$OUT/adapters/arc" --tasks arc_easy --limit "$LIMIT" \
    --lens "ai2_arc=$OUT/lenses/arc-lspade" "boolq=$OUT/lenses/arc-lspade-from-boolq" \
    "headqa_en=$OUT/lenses/arc-lspade-from-headqa" --thresholds $THRESHOLDS \
    --out "$OUT/transfer-arc"
}

base() {  # figure 8: the un-fine-tuned model, every decoder at every layer
  step "lens-base-lspade" "$OUT/lenses/base-lspade" $SPADE train-lens --model "$MODEL" \
    --kind lspade --data ai2_arc --steps 300 --batch-size 16 --lr 1e-3 --seed 0 \
    --prefix-token-id $START --out "$OUT/lenses/base-lspade"
  step "layers-base" "$OUT/layers-base" $SPADE sweep layers --model "$MODEL" \
    --model-args "prefix_token_id=$START" --tasks arc_easy arc_challenge boolq headqa_en \
    --limit "$LIMIT" --lens "$OUT/lenses/base-lspade" --out "$OUT/layers-base"
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(start finetune lenses layers thresholds transfer base)
for stage in "${stages[@]}"; do "$stage"; done
