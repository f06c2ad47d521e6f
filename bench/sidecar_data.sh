#!/usr/bin/env bash
# Bench data scored over the original bytes by val byte sidecars, from the bench corpus
# (BENCH_DIR/docs.jsonl.xz, first 400 docs val, as the plain bench shards):
#   caseops   CaseOps-encoded (data/caseops.py), a lossless 8192-piece tokenizer with the four operators
#             reserved (ids 4..7)
#   lossless  the same lossless tokenizer settings without the transform: CaseOps' plain counterpart
# both by data/tokenize_jsonl.py (--caseops / --lossless), with the sidecar fineweb_val_bytes_000000.bin.
#
#   bench/sidecar_data.sh caseops|lossless BENCH_DIR OUT [tokenize_jsonl options, e.g. --workers 16]
#
# Writes OUT/datasets/bench_sp8192_VARIANT/ (shards, sidecar, split.json) and
# OUT/tokenizers/bench_sp8192_VARIANT_bpe.model, then prints the DATA_PATH / TOKENIZER_PATH for
# train_gpt.py. A tokenizer already at BENCH_DIR/tokenizers/bench_sp8192_VARIANT_bpe.model (copy one
# there to pin it) is used instead of training one, so every machine can tokenize with the same pieces.
# Like the plain bench tokenizer, training sees only documents under SentencePiece's default
# max_sentence_length (4192 bytes): most bench documents are longer and are skipped in training only.
set -euo pipefail
usage="usage: bench/sidecar_data.sh caseops|lossless BENCH_DIR OUT [tokenize_jsonl options]"
variant=${1:?$usage}
case "$variant" in
  caseops|lossless) ;;
  *) echo "error: unknown variant '$variant' (expected caseops or lossless)" >&2; exit 2 ;;
esac
bench_dir=$(realpath "${2:?$usage}")
out=$(realpath -m "${3:?$usage}")
shift 3
cd "$(dirname "$0")/.."
name=bench_sp8192_$variant
pinned="$bench_dir/tokenizers/${name}_bpe.model"
if [ -f "$pinned" ]; then tokenizer=(--tokenizer "$pinned"); else tokenizer=(--vocab-size 8192); fi
python3 data/tokenize_jsonl.py "$bench_dir/docs.jsonl.xz" --out-dir "$out" "--$variant" "${tokenizer[@]}" \
  --val-docs 400 --name "$name" "$@"
echo "DATA_PATH=$out/datasets/$name TOKENIZER_PATH=$out/tokenizers/${name}_bpe.model VOCAB_SIZE=8192"
