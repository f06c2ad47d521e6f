#!/usr/bin/env bash
# Export other revisions' train_gpt.py, each beside a copy of this checkout's bench/, into the
# git-ignored .variants/REV/, so that one job on the benchmark machine can time them side by side
# with the working tree:
#
#   bench/variants.sh xsa-function qkv-gemm         # here; then copy .variants along with the tree
#   for d in . .variants/*; do echo "$d"; python3 "$d/bench/speed.py" --configs default; done   # there
# (`default` is each revision's own: before 3523d3f it had no SmearGate/SparseGate; --set SMEAR_GATE=0 ATTN_GATE=0
# on a newer side compares like with like)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then echo "usage: bench/variants.sh REV [REV ...]" >&2; exit 2; fi
for rev in "$@"; do
  if ! git rev-parse --verify -q "$rev^{commit}" >/dev/null; then
    echo "error: $rev: not a git revision here" >&2; exit 2
  fi
done
for rev in "$@"; do
  dir=.variants/${rev//\//_}
  rm -rf "$dir" && mkdir -p "$dir"
  git show "$rev:train_gpt.py" > "$dir/train_gpt.py"
  cp -r bench "$dir/bench"
  echo "$dir <- $rev:train_gpt.py ($(git rev-parse --short "$rev"))"
done
