"""Start-up of the default model's training graphs (plain, then looped; forward + backward) in one process, with
whatever caches the environment leaves: run twice on one TORCHINDUCTOR_CACHE_DIR, the second run is a warm start.
CPU, default model, window 128 x 3 rows.

usage: TORCHINDUCTOR_CACHE_DIR=<folder> python3 warm.py [precompile]
  precompile: torch._dynamo.config.caching_precompile on (Dynamo's output and guards saved and reused too)
"""
import sys
import time
from pathlib import Path

import torch
import torch._dynamo.config
from torch._dynamo.utils import compile_times, counters

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent / "2026-12-06_eval_compile_cpu")]
from default_model import default_model, time_training_loss  # noqa: E402

mode = sys.argv[1] if len(sys.argv) > 1 else "plain"
if mode == "precompile":
    torch._dynamo.config.caching_precompile = True
hp, cfg, MODEL = default_model(128)
fn = torch.compile(MODEL, fullgraph=True, dynamic=False)
torch.manual_seed(0)
x, y = (torch.randint(0, cfg.vocab_size, (3, 128)) for _ in range(2))
start = time.perf_counter()
for looped in (False, True):
    print(f"looped:{int(looped)} {time_training_loss(fn, MODEL, x, y, looped)}", flush=True)
print(f"mode:{mode} both_s:{time.perf_counter() - start:.1f} fxgraph_hit:{counters['inductor']['fxgraph_cache_hit']} "
      f"fxgraph_miss:{counters['inductor']['fxgraph_cache_miss']} aot_hit:{counters['aot_autograd']['autograd_cache_hit']} "
      f"aot_miss:{counters['aot_autograd']['autograd_cache_miss']} torch:{torch.__version__}")
print(compile_times(repr="str", aggregate=True))
