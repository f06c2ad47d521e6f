#!/usr/bin/env python3
"""Each fused piece of the attention block against the plain form it replaced, compiled, at the
training shape: forward+backward time and the number of kernels inductor generated for each.

usage: python3 bench/fusions.py [--shape B,T,H,Hkv,hd] [--reps 50] [--set KEY=VALUE ...]

Pieces: xsa (the op train_gpt.xsa: Triton kernels on CUDA, vs autograd of the normalize-then-project formula)
and qkv (one GEMM over the concatenated Q/K/V bank rows vs three). The shape defaults to one H100's
share of the default batch (48 x 2048 tokens, 8 / 4 heads of 64). Prints one line per piece:
  piece:<name> plain_ms:<ms> fused_ms:<ms> plain_kernels:<n> fused_kernels:<n> max_abs_diff:<output diff>
(kernels: Triton kernels plus extern and custom-op calls in inductor's code for forward and backward; on CPU it
counts C++ kernels, and the times are only a smoke test.)
"""
import argparse
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import train_gpt  # noqa: E402


def plain_xsa(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA as first written: y [B,T,Hkv,G,hd] minus its projection on the normalized v [B,T,Hkv,hd]."""
    vn = F.normalize(v, dim=-1).unsqueeze(-2)
    return y - (y * vn).sum(-1, keepdim=True) * vn


def fused_xsa(y, v):
    return train_gpt.xsa(y, v)


def separate_qkv(x, wq, wk, wv):
    return F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)


def fused_qkv(x, wq, wk, wv):
    return F.linear(x, torch.cat((wq, wk, wv))).split((wq.size(0), wk.size(0), wv.size(0)), dim=-1)


def pieces(B, T, H, Hkv, hd, device):
    bf = dict(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)  # as autocast has it
    y, v = torch.randn(B, T, Hkv, H // Hkv, hd, **bf), torch.randn(B, T, Hkv, hd, **bf)
    d = H * hd
    x = torch.randn(B, T, d, **bf)
    w = [torch.randn(n, d, device=device) * d ** -0.5 for n in (d, Hkv * hd, Hkv * hd)]
    return {"xsa": (plain_xsa, fused_xsa, [y, v]), "qkv": (separate_qkv, fused_qkv, [x, *w])}


def run_once(fn, inputs, grads):
    with train_gpt.autocast_ctx(inputs[0].device):
        outs = fn(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    torch.autograd.backward(outs, grads)
    return outs


def kernel_count(codes: list[str]) -> int:
    calls = r"triton_\w+\.run\(|extern_kernels\.\w+\(|cpp_fused_\w+\(|torch\.ops\.\w+\.\w+\.default\("
    return sum(len(re.findall(calls, code)) for code in codes)


def measure(fn, inputs, reps: int) -> tuple[float, int, list]:
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    inputs = [t.detach().requires_grad_() for t in inputs]
    with train_gpt.autocast_ctx(inputs[0].device):
        outs = compiled(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
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
    return 1000 * (time.perf_counter() - t0) / reps, kernel_count(codes), [o.detach().float() for o in outs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="48,2048,8,4,64", help="B,T,H,Hkv,hd")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    try:
        B, T, H, Hkv, hd = (int(s) for s in args.shape.split(","))
    except ValueError:
        print(f"error: --shape {args.shape!r}: expected five integers B,T,H,Hkv,hd", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    for name, (plain, fused, inputs) in pieces(B, T, H, Hkv, hd, torch.device(args.device)).items():
        plain_ms, plain_k, plain_out = measure(plain, inputs, args.reps)
        fused_ms, fused_k, fused_out = measure(fused, inputs, args.reps)
        diff = max((a - b).abs().max().item() for a, b in zip(plain_out, fused_out))
        print(f"piece:{name} plain_ms:{plain_ms:.3f} fused_ms:{fused_ms:.3f} plain_kernels:{plain_k} "
              f"fused_kernels:{fused_k} max_abs_diff:{diff:.3g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
