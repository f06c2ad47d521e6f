#!/usr/bin/env python3
"""Each fused piece of the model against the plain form it replaced, compiled, at the training
shape: forward+backward time, GPU kernel time and the number of kernels inductor generated.

usage: python3 bench/fusions.py [--shape B,T,H,Hkv,hd] [--reps 50] [--device cuda|cpu]

Pieces: xsa (the op train_gpt.xsa: one Triton kernel each way on CUDA, vs autograd of the
normalize-then-project formula). The shape defaults to one H100's share of the default batch
(48 x 2048 tokens, 8 / 4 heads of 64). Prints one line per piece:
  piece:<name> plain_ms:<ms> fused_ms:<ms> plain_gpu_ms:<ms> fused_gpu_ms:<ms> plain_kernels:<n>
  fused_kernels:<n> max_abs_diff:<output diff>
*_ms is wall time per forward+backward, which is host-bound for a piece this small: on an H200 the
XSA op took 0.99 ms wall here, while its two kernels took 0.16 ms per layer in a profiled training
step. *_gpu_ms, the kernels' own time from torch.profiler (CUDA only), is the figure to compare.
Kernels: Triton kernels plus extern and custom-op calls in inductor's code for forward and backward
(C++ kernels on CPU, where the times are a smoke test).
"""
import argparse
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: the repository root, once
    sys.path.insert(0, str(HERE.parent))
import train_gpt  # noqa: E402
from bench.profile_step import kernel_times  # noqa: E402
from bench.speed import positive  # noqa: E402


def plain_xsa(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA as first written: y [B,T,Hkv,G,hd] minus its projection on the normalized v [B,T,Hkv,hd]."""
    vn = F.normalize(v, dim=-1).unsqueeze(-2)
    return y - (y * vn).sum(-1, keepdim=True) * vn


def pieces(B, T, H, Hkv, hd, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as autocast has it
    y = torch.randn(B, T, Hkv, H // Hkv, hd, device=device, dtype=dtype)
    v = torch.randn(B, T, Hkv, hd, device=device, dtype=dtype)
    return {"xsa": (plain_xsa, lambda y, v: train_gpt.xsa(y, v), [y, v])}


def as_tuple(outs) -> tuple:
    return tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)


def run_once(fn, inputs, grads):
    outs = as_tuple(fn(*inputs))
    torch.autograd.backward(outs, grads)
    return outs


def kernel_count(codes: list[str]) -> int:
    calls = r"triton_\w+\.run\(|extern_kernels\.\w+\(|cpp_fused_\w+\(|torch\.ops\.\w+\.\w+\.default\("
    return sum(len(re.findall(calls, code)) for code in codes)


def gpu_ms(fn, inputs, grads, reps: int) -> float | None:
    """Kernel time per forward+backward from torch.profiler (None off CUDA)."""
    if inputs[0].device.type != "cuda":
        return None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run_once(fn, inputs, grads)
        train_gpt.synchronize(inputs[0].device)
    return sum(kernel_times(prof, reps)[0].values())


def measure(fn, inputs, reps: int) -> tuple[float, float | None, int, list]:
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    inputs = [t.detach().requires_grad_() for t in inputs]
    outs = as_tuple(compiled(*inputs))
    torch.manual_seed(1)
    grads = [torch.randn_like(o) for o in outs]
    outs, codes = run_and_get_code(lambda: run_once(compiled, inputs, grads))
    for _ in range(3):
        run_once(compiled, inputs, grads)
    train_gpt.synchronize(inputs[0].device)
    t0 = time.perf_counter()
    for _ in range(reps):
        run_once(compiled, inputs, grads)
    train_gpt.synchronize(inputs[0].device)
    wall = 1000 * (time.perf_counter() - t0) / reps
    return wall, gpu_ms(compiled, inputs, grads, reps), kernel_count(codes), [o.detach().float() for o in outs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="48,2048,8,4,64", help="B,T,H,Hkv,hd")
    ap.add_argument("--reps", type=positive, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    try:
        B, T, H, Hkv, hd = (int(s) for s in args.shape.split(","))
    except ValueError:
        print(f"error: --shape {args.shape!r}: expected five integers B,T,H,Hkv,hd", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    for name, (plain, fused, inputs) in pieces(B, T, H, Hkv, hd, torch.device(args.device)).items():
        plain_ms, plain_gpu, plain_k, plain_out = measure(plain, inputs, args.reps)
        fused_ms, fused_gpu, fused_k, fused_out = measure(fused, inputs, args.reps)
        diff = max((a - b).abs().max().item() for a, b in zip(plain_out, fused_out))
        gpu = "".join(f" {k}_gpu_ms:{'n/a' if ms is None else f'{ms:.3f}'}"
                      for k, ms in (("plain", plain_gpu), ("fused", fused_gpu)))
        print(f"piece:{name} plain_ms:{plain_ms:.3f} fused_ms:{fused_ms:.3f}{gpu} plain_kernels:{plain_k} "
              f"fused_kernels:{fused_k} max_abs_diff:{diff:.3g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
