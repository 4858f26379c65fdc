#!/usr/bin/env bash
# Copy what experiments.sh made (runs/smollm2, ignored by git) into results/smollm2 and
# render the reports: the adapters and lens the README's SmolLM2 main job uses, the
# full-depth accuracy runs, the sweeps and timed points with their reports (tables,
# figures, leaderboard), and the main job's table. Only what this machine's runs/ holds
# is copied; everything else in results/smollm2 stays as committed.
#
#   bash benchmarks/smollm2/collect.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=runs/smollm2
KEEP=results/smollm2
SPADE=.venv/bin/lm-eval-spade

copy() {  # copy SRC DST: a folder from runs/, replacing the committed one
  if [ ! -e "$RUNS/$1" ]; then echo "keep $KEEP/$2 (no $RUNS/$1 here)"; return 1; fi
  rm -rf "${KEEP:?}/$2"
  mkdir -p "$(dirname "$KEEP/$2")"
  cp -r "$RUNS/$1" "$KEEP/$2"
  rm -rf "${KEEP:?}/$2/report"
}

copy adapters/arc adapter-arc || true
copy adapters/boolq adapter-boolq || true
copy adapters/headqa adapter-headqa || true
# The letter-prompt adapter is a negative result: only its record (settings, losses) is kept.
if [ -e "$RUNS/adapters/letters/finetune.json" ]; then
  cp "$RUNS/adapters/letters/finetune.json" "$KEEP/finetune-letters.json"
fi
for lens in arc-lspade arc-tuned_lens arc-lspade-from-boolq arc-lspade-from-headqa boolq-lspade \
  boolq-lspade-from-arc boolq-tuned_lens headqa-lspade headqa-lspade-from-arc headqa-tuned_lens \
  base-lspade; do
  copy "lenses/$lens" "lens-$lens" || true
done
for run in accuracy-base accuracy-arc accuracy-boolq accuracy-headqa accuracy-letters; do
  if [ ! -e "$RUNS/$run" ]; then continue; fi
  mkdir -p "$KEEP/$run"
  find "$RUNS/$run" -name 'results_*.json' -exec cp {} "$KEEP/$run/" \;
done
copied=()
for sweep in choose-arc thresholds-arc layers-arc-lspade layers-arc-tuned_lens timed-arc \
  layers-boolq layers-boolq-lspade layers-boolq-tuned_lens transfer-boolq transfer-arc-from-boolq \
  transfer-arc layers-headqa-lspade layers-headqa-tuned_lens transfer-headqa layers-base-arc_easy \
  layers-base-boolq layers-base-headqa_en; do
  if copy "$sweep" "$sweep"; then copied+=("$sweep"); fi
done
# CPU times: the committed lines, then this machine's new ones
touch "$KEEP/times.tsv"
if [ -e "$RUNS/times.tsv" ]; then
  grep -vxF -f "$KEEP/times.tsv" "$RUNS/times.tsv" >> "$KEEP/times.tsv" || true
fi
# The main job's closing table (accuracy, exits, wall clock against hf).
if [ -e "$RUNS/demo.log" ]; then
  sed -n '/^| run | task |/,/^$/p' "$RUNS/demo.log" > "$KEEP/demo_cpu.md"
fi
# One report per copied sweep; the timed points make the leaderboard with wall-clock
# speedups (choose-threshold writes its own tables).
for sweep in "${copied[@]}"; do
  if [ "$sweep" != choose-arc ]; then $SPADE report "$KEEP/$sweep" --out "$KEEP/$sweep/report"; fi
done
# Figures 3/4/7 with every decoder: each task's L-SPADE and tuned-lens sweeps together.
for m in arc boolq headqa; do
  if [ -e "$KEEP/layers-$m-lspade" ] && [ -e "$KEEP/layers-$m-tuned_lens" ]; then
    $SPADE report "$KEEP/layers-$m-lspade" "$KEEP/layers-$m-tuned_lens" --overwrite \
      --out "$KEEP/layers-$m-report"
  fi
done
