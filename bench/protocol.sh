#!/usr/bin/env bash
# Bench protocol v1 (../shared/bench/README.md): one GPU, 240 s of training, sp8192 bench shards,
# TRAIN_BATCH_TOKENS = one GPU's share of the configuration's 8-GPU batch.
#
#   bench/protocol.sh CONFIG [VAR=value ...]      CONFIG: default | candidate | baseline
#
# baseline = bench/baseline.env: the public naive baseline's shape and optimizer (9x512, MLP 2x,
# relu^2, seq 1024, QK gain 1.5, no XSA/loops/parallel/gates/EMA/WD) on vocab 8192.
# BENCH_DIR (default ../shared/bench) holds make_shards.py; BENCH_DATA (default /tmp/benchdata)
# receives the shards. SCRIPT (default train_gpt.py) picks the file to run, e.g. build/train_gpt.py
# from scripts/pack_code.py. NPROC (default 1) is torchrun's --nproc_per_node (bench/scaling.sh).
# BENCH_VARIANT=caseops runs on the CaseOps sp8192 bench data instead, BENCH_VARIANT=lossless on its plain
# counterpart (bench/sidecar_data.sh: the same documents and split, a lossless tokenizer with or without
# the case operators, val bpb over the original bytes by sidecar).
# candidate = default + bench/candidate.env: the levers under test for the next default (an override changes one:
# bench/protocol.sh candidate QK_GAIN_INIT=5.0).
# EVAL_SHARE=1 (with EVAL_ONLY=ARTIFACT) scores one GPU's share of FineWeb val instead of the bench val, for the
# eval-time budget: 5,070,000 tokens (40.5M / 8) from the start of the bench train shard (plain data only).
# Extra VAR=value pairs override anything.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: bench/protocol.sh default|candidate|baseline [VAR=value ...]}
shift
bench_dir=${BENCH_DIR:-../shared/bench}
data=${BENCH_DATA:-/tmp/benchdata}
if [ "${EVAL_SHARE:-0}" = 1 ] && [ "${BENCH_VARIANT:-plain}" != plain ]; then
  echo "error: EVAL_SHARE=1 needs the plain bench data (BENCH_VARIANT=plain)" >&2; exit 2
fi
case "${BENCH_VARIANT:-plain}" in
  plain)
    if [ ! -f "$data/datasets/bench_sp8192/fineweb_val_000000.bin" ]; then
      python3 "$bench_dir/make_shards.py" "$data" 8192
    fi
    paths=(DATA_PATH="$data/datasets/bench_sp8192" TOKENIZER_PATH="$data/tokenizers/bench_8192_bpe.model") ;;
  caseops|lossless)
    name=bench_sp8192_$BENCH_VARIANT
    if [ ! -f "$data/datasets/$name/fineweb_val_bytes_000000.bin" ]; then
      bash bench/sidecar_data.sh "$BENCH_VARIANT" "$bench_dir" "$data" --workers "$(nproc)"
    fi
    paths=(DATA_PATH="$data/datasets/$name" TOKENIZER_PATH="$data/tokenizers/${name}_bpe.model") ;;
  *) echo "error: unknown BENCH_VARIANT '$BENCH_VARIANT' (expected plain, caseops or lossless)" >&2; exit 2 ;;
esac
common=("${paths[@]}" VOCAB_SIZE=8192 MAX_WALLCLOCK_SECONDS=240 SEED=1337)
if [ "${EVAL_SHARE:-0}" = 1 ]; then
  common+=(VAL_FILES="$data/datasets/bench_sp8192/fineweb_train_000000.bin" VAL_MAX_TOKENS=5070000)
fi
case "$config" in
  default) cfg=(TRAIN_BATCH_TOKENS=98304) ;;
  candidate) mapfile -t cfg < bench/candidate.env; cfg=(TRAIN_BATCH_TOKENS=98304 "${cfg[@]}") ;;
  baseline) mapfile -t cfg < bench/baseline.env ;;
  *) echo "error: unknown CONFIG '$config' (expected default, candidate or baseline)" >&2; exit 2 ;;
esac
# A knob exported in the shell reaches the run too, unless the protocol or a VAR=value pair sets it: say so (the
# log records it as well).
knobs=$(python3 "${SCRIPT:-train_gpt.py}" --help-env) || { echo "error: ${SCRIPT:-train_gpt.py} --help-env failed" >&2; exit 2; }
set_here=" $(printf '%s\n' "${common[@]}" "${cfg[@]}" "$@" | sed 's/=.*//' | tr '\n' ' ') "
leaked=()
for k in $(sed -n 's/^| `\([A-Z0-9_]*\)` |.*/\1/p' <<< "$knobs"); do
  if [ -n "${!k+x}" ] && [[ "$set_here" != *" $k "* ]]; then leaked+=("$k=${!k}"); fi
done
if [ ${#leaked[@]} -gt 0 ]; then echo "warning: knobs from the environment reach this protocol run: ${leaked[*]}" >&2; fi
exec env "${common[@]}" "${cfg[@]}" "$@" torchrun --standalone --nproc_per_node="${NPROC:-1}" "${SCRIPT:-train_gpt.py}"
