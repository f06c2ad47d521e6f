#!/usr/bin/env bash
# Install the requirements and run the default job.
#  - FineWeb sp8192 shards in data/datasets/fineweb10B_sp8192 and a GPU: the real default run on every local GPU.
#  - otherwise: say so, tokenize a slice of the bench corpus (BENCH_DIR, default ../shared/bench), or
#    the small test corpus shipped in tests/fixtures, and train a tiny model on it (CPU or GPU), so a
#    fresh clone still runs end to end (the default job on a CPU would take hours).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt
if compgen -G "data/datasets/fineweb10B_sp8192/fineweb_val_*.bin" >/dev/null; then
  ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
  if [ "$ngpu" -gt 0 ]; then
    echo "quickstart: FineWeb sp8192 shards found; running the default job on $ngpu GPU(s)"
    exec torchrun --standalone --nproc_per_node="$ngpu" train_gpt.py
  fi
  echo "quickstart: FineWeb sp8192 shards found but no GPU: the default job would take hours on a CPU"
else
  echo "quickstart: no FineWeb shards in data/datasets/fineweb10B_sp8192"
  echo "quickstart: (download them with: python3 data/cached_challenge_fineweb.py --variant sp8192 --repo-id kevclark/parameter-golf)"
fi
bench=${BENCH_DIR:-../shared/bench}
if [ -f "$bench/docs.jsonl.xz" ]; then
  name=bench_sp1024 tokenizer=data/tokenizers/bench_1024_bpe.model
  echo "quickstart: training a TINY model on 3,000 documents of the bench corpus ($bench) instead"
  [ -f data/datasets/$name/fineweb_val_000000.bin ] || python3 data/tokenize_jsonl.py "$bench/docs.jsonl.xz" \
    --out-dir data --name $name --tokenizer "$bench/tokenizers/bench_1024_bpe.model" --val-docs 400 --max-docs 3000
else
  name=quickstart_sp1024 tokenizer=data/tokenizers/quickstart_sp1024_bpe.model
  echo "quickstart: no bench corpus at $bench (BENCH_DIR): training a TINY model on the test corpus instead"
  [ -f data/datasets/$name/fineweb_val_000000.bin ] || python3 data/tokenize_jsonl.py tests/fixtures/corpus.jsonl.xz \
    --out-dir data --name $name --vocab-size 1024 --val-docs 12
fi
echo "quickstart: its val_bpb is a smoke test, not a benchmark (see bench/protocol.sh for that)"
exec env DATA_PATH=data/datasets/$name TOKENIZER_PATH=$tokenizer \
  VOCAB_SIZE=1024 NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 MLP_MULT=2 TRAIN_SEQ_LEN=256 \
  TRAIN_BATCH_TOKENS=8192 ITERATIONS=200 MAX_WALLCLOCK_SECONDS=120 WARMUP_STEPS=2 VAL_LOSS_EVERY=100 \
  GPTQ_CALIBRATION_BATCHES=4 \
  TRAIN_LOG_EVERY=20 VAL_MAX_TOKENS=65536 EVAL_SEQ_LEN=256 EVAL_STRIDE=128 TTT_LORA_PHASE_TOKENS=32768 LOOP_START=1 LOOP_END=2 PARALLEL_RESIDUAL_START=3 XSA_LAST_N=4 EMA_DECAY=0.95 \
  RUN_ID="${RUN_ID:-quickstart_$(date -u +%Y%m%d_%H%M%S)}" python3 train_gpt.py
