#!/usr/bin/env bash
# CaseOps sp8192 bench data: the bench corpus (BENCH_DIR/docs.jsonl.xz, first 400 docs val) CaseOps-
# encoded (data/caseops.py), a lossless CaseOps tokenizer of 8192 pieces trained on its train split
# with the four operators reserved (ids 4..7), BOS + ids shards and the val byte sidecar
# fineweb_val_bytes_000000.bin (original UTF-8 bytes per token), all by data/tokenize_jsonl.py --caseops.
#
#   bench/caseops_data.sh BENCH_DIR OUT [tokenize_jsonl options, e.g. --workers 16]
#
# Writes OUT/datasets/bench_sp8192_caseops/{fineweb_train_000000,fineweb_val_000000,
# fineweb_val_bytes_000000}.bin, split.json and OUT/tokenizers/bench_sp8192_caseops_bpe.model, then
# prints the DATA_PATH / TOKENIZER_PATH for train_gpt.py. A tokenizer already at
# BENCH_DIR/tokenizers/bench_sp8192_caseops_bpe.model (copy one there to pin it) is used instead of
# training one, so every machine can tokenize with the same pieces.
# Like the plain bench tokenizer, training sees only documents under SentencePiece's default
# max_sentence_length (4192 bytes): most bench documents are longer and are skipped in training only.
set -euo pipefail
bench_dir=$(realpath "${1:?usage: bench/caseops_data.sh BENCH_DIR OUT [tokenize_jsonl options]}")
out=$(realpath -m "${2:?usage: bench/caseops_data.sh BENCH_DIR OUT [tokenize_jsonl options]}")
shift 2
cd "$(dirname "$0")/.."
pinned="$bench_dir/tokenizers/bench_sp8192_caseops_bpe.model"
if [ -f "$pinned" ]; then tokenizer=(--tokenizer "$pinned"); else tokenizer=(--vocab-size 8192); fi
python3 data/tokenize_jsonl.py "$bench_dir/docs.jsonl.xz" --out-dir "$out" --caseops "${tokenizer[@]}" \
  --val-docs 400 --name bench_sp8192_caseops "$@"
echo "DATA_PATH=$out/datasets/bench_sp8192_caseops TOKENIZER_PATH=$out/tokenizers/bench_sp8192_caseops_bpe.model VOCAB_SIZE=8192"
