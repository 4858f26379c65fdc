#!/usr/bin/env bash
# The committed sweeps of the shipped calibration model (pretrained=spade-calibration) on its
# held-out task: every decoder at every layer, SPADE-EXIT over thresholds with the baselines,
# and L-SPADE trained on each level exiting on every level. CPU, a few minutes.
# Reruns replace the committed outputs (--overwrite).
# Run from the repository root: bash benchmarks/sweeps_calibration.sh
set -euo pipefail
MODEL=spade-calibration
OUT=results/sweeps
LENSES=$OUT/lenses
THRESHOLDS="0.01 0.02 0.05 0.1 0.2 0.5 1 inf"

# The shipped L-SPADE translators are spade-calibration's own; a tuned lens is trained here.
lm-eval-spade train-lens --model $MODEL --kind tuned_lens --data spade_calibration \
  --steps 1000 --batch-size 64 --lr 3e-3 --out $LENSES/tuned_lens-calibration --overwrite

lm-eval-spade sweep layers --model $MODEL \
  --tasks spade_calibration spade_calibration_terms1 spade_calibration_terms2 spade_calibration_terms3 \
  --lens spade-calibration $LENSES/tuned_lens-calibration --out $OUT/layers-calibration --overwrite
lm-eval-spade sweep thresholds --model $MODEL --tasks spade_calibration \
  --lens spade-calibration --thresholds $THRESHOLDS --out $OUT/thresholds-calibration --overwrite
lm-eval-spade sweep transfer --model $MODEL \
  --tasks spade_calibration_terms1 spade_calibration_terms2 spade_calibration_terms3 \
  --lens-steps 1000 --thresholds $THRESHOLDS --out $OUT/transfer-calibration --overwrite
for d in layers-calibration thresholds-calibration transfer-calibration; do
  lm-eval-spade report $OUT/$d --overwrite
done
