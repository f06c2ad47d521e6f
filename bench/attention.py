#!/usr/bin/env python3
"""Causal attention forward+backward time per backend, at the training shapes (CUDA only).

usage: python3 bench/attention.py [--batch 48] [--seq 2048] [--heads 8] [--kv-heads 4] [--head-dim 64]

One line per (backend, gqa) pair: gqa:native passes K/V with fewer heads (enable_gqa),
gqa:expand repeats them to the query heads first (the repeat is inside the timed region).
Also prints the bf16 matmul rate of an 8192^3 product, the practical peak for MFU figures.
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def timed(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench/attention.py needs CUDA", file=sys.stderr)
        return 2
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = timed(lambda: m @ m, reps=10)
    print(f"matmul_8192_bf16_tflops:{2 * 8192 ** 3 / ms / 1e9:.0f}")
    B, T, H, Hkv, D = a.batch, a.seq, a.heads, a.kv_heads, a.head_dim
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    flops = 4 * B * H * T * T * D / 2 * 3.5  # causal fwd (2 matmuls) + bwd (5 matmuls)
    ref = None
    for name, backend in BACKENDS.items():
        for gqa in ("native", "expand"):
            def fwd():
                kk, vv = (k, v) if gqa == "native" else (k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1))
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa == "native")

            try:
                out = fwd()
                out.backward(g)
                err = 0.0
                if ref is None:
                    ref = out.detach().float()
                else:
                    err = (out.detach().float() - ref).abs().max().item()
                f_ms = timed(lambda: fwd())
                fb_ms = timed(lambda: fwd().backward(g))
                print(f"backend:{name} gqa:{gqa} fwd_ms:{f_ms:.3f} fwd_bwd_ms:{fb_ms:.3f} "
                      f"tflops:{flops / fb_ms / 1e9:.0f} max_abs_diff:{err:.2e}")
            except RuntimeError as e:
                print(f"backend:{name} gqa:{gqa} unsupported ({str(e).splitlines()[0][:100]})")
            q.grad = k.grad = v.grad = None
    return 0


if __name__ == "__main__":
    sys.exit(main())
