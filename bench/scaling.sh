#!/usr/bin/env bash
# Multi-GPU check: the default stack on N GPUs, then the same global batch (N x one GPU's share of
# 98,304 tokens) on 1 GPU by gradient accumulation. Both run a fixed ITERATIONS=200 with no wall
# clock, so they follow one step-based LR schedule and turn looping on at the same step, log the train
# loss every 10 steps, quantize and evaluate in full. Then bench/compare_runs.py compares them, and the
# files each run wrote are listed (only rank 0 writes: one log and one artifact per run).
#
#   bench/scaling.sh N [VAR=value ...]    N: 2, 4 or 8. SCALING_OUT (default /tmp/scaling) receives
#                                         gpus<N>/ and gpus1/; BENCH_DIR, BENCH_DATA, SCRIPT as in
#                                         bench/protocol.sh; VAR=value pairs go to both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:?usage: bench/scaling.sh N [VAR=value ...]}
shift
case "$n" in 2|4|8) ;; *) echo "error: N=$n: expected 2, 4 or 8 GPUs" >&2; exit 2 ;; esac
out=${SCALING_OUT:-/tmp/scaling}
for world in "$n" 1; do
  dir=$out/gpus$world
  rm -rf "$dir" && mkdir -p "$dir"
  NPROC=$world bench/protocol.sh default TRAIN_BATCH_TOKENS=$((98304 * n)) ITERATIONS=200 MAX_WALLCLOCK_SECONDS=0 \
    TRAIN_LOG_EVERY=10 VAL_LOSS_EVERY=0 RUN_ID="scaling_gpus$world" LOG_DIR="$dir" ARTIFACT_DIR="$dir" "$@"
  echo "files_written gpus:$world $(cd "$dir" && ls | paste -sd ' ' -)"
done
python3 bench/compare_runs.py "$out/gpus$n/scaling_gpus$n.txt" "$out/gpus1/scaling_gpus1.txt"
