#!/usr/bin/env bash
# Run train_gpt.py once per seed with the same environment.
#
# usage: scripts/run_seeds.sh NAME "SEED1 SEED2 ..." [-- LAUNCHER_ARGS...]
#
#   Each run gets SEED=<S> RUN_ID=<NAME>_seed<S>, so its log is $LOG_DIR/<NAME>_seed<S>.txt
#   (LOG_DIR defaults to logs, as in train_gpt.py) and its console stream (stdout+stderr) is
#   also saved to $LOG_DIR/<NAME>_seed<S>.console.txt. Every other knob comes from your env.
#   Launcher: torchrun --standalone --nproc_per_node=${NPROC:-8}; LAUNCH replaces it entirely
#   (e.g. LAUNCH=python3 for CPU). Args after -- go to the launcher, before train_gpt.py.
#   SCRIPT picks the file to run (default train_gpt.py beside scripts/; for a record, the packed
#   build/train_gpt.py from scripts/pack_code.py, whose bytes are what is counted).
#   Stops at the first failing seed: prints the tail of its log and exits non-zero.
#   Refuses to start if any of the logs already exists (train_gpt.py never overwrites a log).
#
# example: NPROC=8 scripts/run_seeds.sh sp8192_base "1337 42 2025"
#          scripts/summarize.py logs/sp8192_base_seed{1337,42,2025}.txt
set -uo pipefail

usage() { sed -n '2,18s/^# \{0,1\}//p' "$0" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
name=$1
read -r -a seeds <<< "$2"
shift 2
if [[ $# -gt 0 ]]; then
  [[ $1 == "--" ]] || usage
  shift
fi
[[ ${#seeds[@]} -gt 0 && -n $name ]] || usage

train=${SCRIPT:-$(cd "$(dirname "$0")/.." && pwd)/train_gpt.py}
[[ -f $train ]] || { echo "error: SCRIPT=$train: file not found" >&2; exit 2; }
read -r -a launch <<< "${LAUNCH:-torchrun --standalone --nproc_per_node=${NPROC:-8}}"
log_dir=${LOG_DIR:-logs}

declare -A seen=()
for s in "${seeds[@]}"; do
  # spelled as train_gpt.py reads it: "01" would be seed 1 again under another log name
  [[ $s =~ ^-?(0|[1-9][0-9]*)$ ]] || { echo "error: seed '$s': expected an integer without leading zeros" >&2; exit 2; }
  [[ -z ${seen[$s]:-} ]] || { echo "error: seed $s listed twice" >&2; exit 2; }
  seen[$s]=1
  for f in "$log_dir/${name}_seed$s.txt" "$log_dir/${name}_seed$s.console.txt"; do
    [[ ! -e $f ]] || { echo "error: $f already exists: pick another NAME or move it away" >&2; exit 2; }
  done
done
mkdir -p "$log_dir"

for s in "${seeds[@]}"; do
  log="$log_dir/${name}_seed$s.txt" console="$log_dir/${name}_seed$s.console.txt"
  echo "=== $name seed $s: ${launch[*]} ${*:+$* }$train -> $log" >&2
  SEED=$s RUN_ID="${name}_seed$s" "${launch[@]}" "$@" "$train" 2>&1 | tee "$console"
  rc=${PIPESTATUS[0]}
  if [[ $rc -ne 0 ]]; then
    echo "=== FAILED: $name seed $s exited with $rc" >&2
    if [[ -f $log ]]; then
      echo "--- last 20 lines of $log ---" >&2
      tail -n 20 "$log" >&2
    fi
    # No log, or one without a final error: line (a crash): the console has the traceback.
    if [[ ! -f $log ]] || ! tail -n 1 "$log" | grep -q '^error:'; then
      echo "--- last 20 lines of $console ---" >&2
      tail -n 20 "$console" >&2
    fi
    exit "$rc"
  fi
done
echo "=== done: ${#seeds[@]} seeds; logs in $log_dir/${name}_seed*.txt" >&2
