"""Compile time of the candidate schedule's training graphs: four static (rows, length, looped) shapes, or one graph
per looped state with rows and length dynamic (rows x length fixed). CPU, default model, cold Inductor cache.

usage: TORCHINDUCTOR_CACHE_DIR=<fresh folder> TORCHINDUCTOR_FX_GRAPH_CACHE=0 python3 dyn.py static|dynamic
"""
import sys
from pathlib import Path

import torch
from torch._dynamo.utils import counters

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent / "2026-12-06_eval_compile_cpu")]
from default_model import default_model, time_training_loss  # noqa: E402

mode = sys.argv[1]
hp, cfg, MODEL = default_model(192)
tokens = 384
shapes = [(64, False), (128, False), (128, True), (192, True)]
fn = torch.compile(MODEL, fullgraph=True, dynamic=False)
for T, looped in shapes:
    B = tokens // T
    torch.manual_seed(T)
    x, y = (torch.randint(0, cfg.vocab_size, (B, T)) for _ in range(2))
    if mode == "dynamic":
        for a in (x, y):
            torch._dynamo.mark_dynamic(a, 0)
            torch._dynamo.mark_dynamic(a, 1)
    print(f"T:{T} B:{B} looped:{int(looped)} {time_training_loss(fn, MODEL, x, y, looped)}", flush=True)
print(f"mode:{mode} graphs:{counters['stats']['unique_graphs']} torch:{torch.__version__}")
