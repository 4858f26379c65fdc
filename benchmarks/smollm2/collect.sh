#!/usr/bin/env bash
# Copy what experiments.sh made (runs/smollm2, ignored by git) into results/smollm2 and
# render the reports: the adapter and lens the README's SmolLM2 main job uses, the
# full-depth accuracy runs, the sweeps and timed points with their reports (tables,
# figures, leaderboard), and the main job's table.
#
#   bash benchmarks/smollm2/collect.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=runs/smollm2
KEEP=results/smollm2
SPADE=.venv/bin/lm-eval-spade

copy() {  # copy SRC DST: a folder, without lm-eval-spade's output marker's host details
  rm -rf "$KEEP/$2"
  mkdir -p "$(dirname "$KEEP/$2")"
  cp -r "$RUNS/$1" "$KEEP/$2"
}

copy adapters/arc adapter-arc
copy lenses/arc-lspade lens-arc-lspade
for run in accuracy-base accuracy-arc; do
  mkdir -p "$KEEP/$run"
  find "$RUNS/$run" -name 'results_*.json' -exec cp {} "$KEEP/$run/" \;
done
for sweep in choose-arc thresholds-arc layers-arc-lspade timed-arc; do
  if [ -e "$RUNS/$sweep" ]; then copy "$sweep" "$sweep"; rm -rf "$KEEP/$sweep/report"; fi
done
cp "$RUNS/times.tsv" "$KEEP/times.tsv"
# The main job's closing table (accuracy, exits, wall clock against hf).
sed -n '/^| run | task |/,/^$/p' "$RUNS/demo.log" > "$KEEP/demo_cpu.md"
# One report per sweep; the timed points make the leaderboard with wall-clock speedups.
for sweep in thresholds-arc layers-arc-lspade timed-arc; do
  $SPADE report "$KEEP/$sweep" --out "$KEEP/$sweep/report"
done
