"""prime_eval (the eval graphs compiled before the clock) at the default model size on CPU, with whatever Inductor
and AOTAutograd caches TORCHINDUCTOR_CACHE_DIR holds: run it twice on one folder and the second run is a warm start
(every graph a cache hit), as a run that loads COMPILE_CACHE. Prints the priming's time and torch's compile-time
table; --profile writes a cProfile of the priming (split it with ../2026-12-06_eval_compile_cpu/analyze_prof.py).

usage: TORCHINDUCTOR_CACHE_DIR=<folder> python3 warm_prime.py [--seq 256] [--profile FILE]
"""
import argparse
import cProfile
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import compile_times

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent / "2026-12-06_eval_compile_cpu")]
import train_gpt  # noqa: E402
from default_model import default_model  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--seq", type=int, default=256)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--profile", default="")
args = ap.parse_args()
torch.set_num_threads(args.threads)

hp, cfg, model = default_model(args.seq)
lines = []
prof = cProfile.Profile() if args.profile else None
t0 = time.perf_counter()
if prof:
    prof.enable()
secs = train_gpt.prime_eval(model, args.seq, train_gpt.Dist(), hp, lines.append)
if prof:
    prof.disable()
    prof.dump_stats(args.profile)
print(f"torch:{torch.__version__} threads:{torch.get_num_threads()} seq:{args.seq} wall:{time.perf_counter() - t0:.1f}s")
print("\n".join(lines))
print(compile_times(repr="str", aggregate=True))
