#!/usr/bin/env python3
"""Where does a training step's GPU time go? Profiles optimizer steps of one configuration.

usage: python3 bench/profile_step.py [--steps 3] [--warmup 8] [--top 40] [--looped] [--data DIR] [--set KEY=VALUE ...]
                                     [--inductor OPTION=VALUE ...]

Builds train_gpt's model and Trainer (one H100's share of the default batch unless --set says
otherwise), runs --warmup steps (compile), then records --steps steps with torch.profiler and prints:
  step_ms:<wall ms per profiled step> gpu_busy_ms:<summed kernel time per step>
  one line per kernel (top --top by total GPU time): share %, ms per step, calls per step, name
  one line per kernel class (gemm / attention / triton fused / elementwise / reduction / comm / other).
"""
import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: the repository root, once
    sys.path.insert(0, str(HERE.parent))
import train_gpt  # noqa: E402
from bench.speed import apply_inductor_options, build_trainer, key_value, positive  # noqa: E402

CLASSES = [  # first match wins
    ("attention", r"flash|fmha|attention|cudnn.*sdpa|sdpa"),
    ("gemm", r"gemm|sm90_xmma|cutlass|nvjet|matmul|cublas|^aten::(mm|bmm|addmm|baddbmm|linear)$"),  # CPU: ops
    ("comm", r"nccl"),
    ("triton", r"^triton_"),
    ("reduction", r"reduce|norm|softmax|cross_entropy|nll"),
    ("elementwise", r"elementwise|vectorized|unrolled|copy|fill"),
]


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((c for c, pat in CLASSES if re.search(pat, low)), "other")


def kernel_times(prof, reps: int) -> tuple[dict, dict, dict]:
    """From a torch.profiler run of `reps` repetitions: GPU ms per repetition of each kernel, its
    launches (summed over the run), and the GPU ms spanned by each record_function range."""
    totals, calls, spans = defaultdict(float), defaultdict(int), defaultdict(float)
    for ev in prof.events():
        if getattr(ev, "is_user_annotation", False) or ev.name.startswith("Optimizer."):
            # record_function ranges (optimizer steps): GPU time spanned, not kernels; kept apart
            spans[ev.name] += ev.device_time_total / 1000 / reps
        elif ev.device_type == torch.autograd.DeviceType.CUDA:
            totals[ev.name] += ev.device_time_total / 1000 / reps
            calls[ev.name] += 1
    return totals, calls, spans


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=positive, default=3)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--top", type=positive, default=40)
    ap.add_argument("--looped", action="store_true", help="depth recurrence on")
    ap.add_argument("--data", default="", metavar="DIR", help="real train shards instead of random tokens")
    ap.add_argument("--set", nargs="*", type=key_value, default=[], metavar="KEY=VALUE")
    ap.add_argument("--inductor", nargs="*", default=[], metavar="OPTION=VALUE",
                    help="torch._inductor.config options to try, e.g. triton.persistent_reductions=False")
    args = ap.parse_args(argv)
    apply_inductor_options(args.inductor)
    hp = train_gpt.Hyperparameters({"TRAIN_BATCH_TOKENS": "98304"} | dict(args.set))
    dctx = train_gpt.setup_distributed(hp)
    trainer, attention = build_trainer(hp, dctx, args.data)
    for _ in range(args.warmup):
        trainer.step(0, 1.0, hp.train_seq_len, args.looped)
    train_gpt.synchronize(dctx.device)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                    if dctx.device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.step(0, 1.0, hp.train_seq_len, args.looped)
        train_gpt.synchronize(dctx.device)
        step_ms = 1000 * (time.perf_counter() - t0) / args.steps
    totals, calls, spans = kernel_times(prof, args.steps)
    busy = sum(totals.values())
    print(f"step_ms:{step_ms:.2f} gpu_busy_ms:{busy:.2f} looped:{int(args.looped)} attention:{attention} set:{','.join(f'{k}={v}' for k, v in args.set)} "
          f"inductor:{','.join(args.inductor)}")
    by_class = defaultdict(float)
    for name, ms in totals.items():
        by_class[kernel_class(name)] += ms
    for name, ms in sorted(by_class.items(), key=lambda kv: -kv[1]):
        print(f"class:{name} ms:{ms:.2f} share:{100 * ms / max(busy, 1e-9):.1f}%")
    for name, ms in sorted(spans.items(), key=lambda kv: -kv[1]):
        if ms > 0:
            print(f"span:{name} ms:{ms:.2f}")
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{100 * ms / max(busy, 1e-9):5.1f}% {ms:7.3f}ms x{calls[name] // args.steps:<4d} {name[:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
