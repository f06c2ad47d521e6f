"""LoRA TTT's distinct pass shapes and padded tokens under coarser padding (the table of README.md), counted on
CPU by bench/lora_cost.py with train_gpt's step_rows / WINDOW_ALIGN replaced.

usage (repository root): python3 results/2026-12-06_default_round_trip_h100/padding_counts.py DATA_PATH
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt as tg  # noqa: E402
import bench.lora_cost as lc  # noqa: E402

hp = tg.Hyperparameters({"DATA_PATH": sys.argv[1], "VOCAB_SIZE": "8192", "TTT_ENABLED": "1"})
tokens = tg.load_val_tokens(tg.shard_files(hp.data_path, "val", ""), hp.vocab_size, 0)
real_rows = tg.step_rows
for mult in (1, 4, 8):
    tg.step_rows = lambda prev, last, m=mult: min(len(prev), -(-real_rows(prev, last) // m) * m)
    print(f"rows_multiple:{mult}", lc.lora_cost(tokens, hp))
tg.step_rows = real_rows
for align in (128, 256):
    tg.WINDOW_ALIGN = align
    print(f"window_align:{align}", lc.lora_cost(tokens, hp))
