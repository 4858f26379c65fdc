#!/usr/bin/env bash
# The committed sweeps of results/sweeps/: stories260K on the story sentences and on the
# real ARC-Easy, ARC-Challenge, BoolQ and HeadQA files (../shared/data). CPU, ~15 min.
# Reruns replace the committed outputs (--overwrite).
# Run from the repository root: bash benchmarks/sweeps_stories260K.sh
set -euo pipefail
export LM_EVAL_SPADE_DATA_DIR=${LM_EVAL_SPADE_DATA_DIR:-../shared/data}
MODEL=../shared/models/stories260K
OUT=results/sweeps
LENSES=$OUT/lenses
TASKS="arc_easy_spade arc_challenge_spade boolq_spade headqa_en_spade"
# BoolQ passages outgrow stories260K's 512-token context; HFLM would cut the start token
# off and SPADE refuses such requests, so the whole prompt is kept (RoPE runs past 512).
ARGS=max_length=2048
LIMIT=200

# Lenses trained on ARC-Easy's training split, as the paper's figure 4 trains them.
lm-eval-spade train-lens --model $MODEL --kind lspade --data arc_easy_spade \
  --steps 300 --limit 1000 --out $LENSES/lspade-arc_easy --overwrite
lm-eval-spade train-lens --model $MODEL --kind tuned_lens --data arc_easy_spade \
  --steps 300 --limit 1000 --out $LENSES/tuned_lens-arc_easy --overwrite

lm-eval-spade sweep layers --model $MODEL --tasks tinystories_sentences_spade \
  --lens $LENSES/lspade-arc_easy $LENSES/tuned_lens-arc_easy --out $OUT/layers-stories --overwrite
lm-eval-spade sweep layers --model $MODEL --tasks $TASKS --limit $LIMIT --model-args $ARGS \
  --lens $LENSES/lspade-arc_easy $LENSES/tuned_lens-arc_easy --out $OUT/layers-qa --overwrite
lm-eval-spade sweep thresholds --model $MODEL --tasks $TASKS --limit $LIMIT \
  --model-args $ARGS --lens $LENSES/lspade-arc_easy \
  --thresholds 0.5 1 1.5 2 2.5 3 3.5 4 5 inf --out $OUT/thresholds-qa --overwrite
lm-eval-spade sweep transfer --model $MODEL --tasks arc_easy_spade boolq_spade headqa_en_spade \
  --limit $LIMIT --model-args $ARGS --train-limit 1000 --lens-steps 300 \
  --thresholds 0.5 1 1.5 2 2.5 3 3.5 4 5 inf --out $OUT/transfer-qa --overwrite
for d in layers-stories layers-qa thresholds-qa transfer-qa; do
  lm-eval-spade report $OUT/$d --overwrite
done
