#!/usr/bin/env python3
"""Causal attention forward+backward time per backend, at the training shapes (CUDA only).

usage: python3 bench/attention.py [--batch 48] [--seq 2048] [--heads 8] [--kv-heads 4] [--head-dim 64] [--shapes N]

One line per (backend, gqa) pair, for the SDPA kernels ATTN_BACKEND offers (sdpa: torch's choice,
sdpa_cudnn) and FlashAttention 4: gqa:native passes K/V with fewer heads (enable_gqa), gqa:expand
repeats them to the query heads first (the repeat is inside the timed region).
Also prints the bf16 matmul rate of an 8192^3 product, the practical peak for MFU figures.
--shapes N instead: per SDPA kernel (cuDNN, flash, efficient), the first forward+backward at each of N new
(batch, length) shapes against the same calls again: what a new shape costs (LoRA TTT runs hundreds).
"""
import argparse
import contextlib
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"sdpa": None, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}  # None: torch's own kernel choice


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


def measure(label: str, fwd, g, params, ref, flops):
    """One line: forward and forward+backward ms, TFLOP/s, max |diff| from ref (output in [B,H,T,D])."""
    try:
        t0 = time.perf_counter()
        out = fwd()
        out.backward(g)
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0  # includes any JIT compile (FlashAttention 4)
        err = (out.detach().float() - ref).abs().max().item() if ref is not None else 0.0
        f_ms = timed(fwd)
        fb_ms = timed(lambda: fwd().backward(g))
        print(f"backend:{label} fwd_ms:{f_ms:.3f} fwd_bwd_ms:{fb_ms:.3f} tflops:{flops / fb_ms / 1e9:.0f} "
              f"max_abs_diff:{err:.2e} first_call_s:{first_s:.1f}", flush=True)
        return out.detach().float()
    except torch.OutOfMemoryError:  # a RuntimeError too, but not a kernel's refusal of the shape
        print(f"backend:{label} out_of_memory (lower --batch)", flush=True)
        return None
    except (RuntimeError, AssertionError, ValueError) as e:
        print(f"backend:{label} unsupported ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})", flush=True)
        return None
    finally:
        for p in params:
            p.grad = None


def shape_costs(n: int, heads: int, kv_heads: int, head_dim: int):
    """One line per SDPA kernel: summed seconds of a first call at each of n (batch, length) shapes, then of the
    same calls warm, and the difference per shape (e.g. an execution plan built per shape)."""
    rng = random.Random(0)
    shapes = sorted({(rng.randint(2, 64), 64 * rng.randint(1, 32)) for _ in range(n)})

    def call(b, t, backend) -> float:
        q = torch.randn(b, heads, t, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(b, kv_heads, t, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        backend = getattr(SDPBackend, name)
        try:
            call(4, 128, backend)  # the kernel's own start-up, outside both sums
        except RuntimeError as e:
            print(f"shapes backend:{name.lower()} unsupported ({str(e).splitlines()[0][:100]})", flush=True)
            continue
        first = sum(call(b, t, backend) for b, t in shapes)
        warm = sum(call(b, t, backend) for b, t in shapes)
        print(f"shapes backend:{name.lower()} n:{len(shapes)} first_s:{first:.3f} warm_s:{warm:.3f} "
              f"per_new_shape_ms:{1000 * (first - warm) / len(shapes):.1f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--shapes", type=int, default=0, help="time N new (batch, length) shapes per SDPA kernel instead")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench/attention.py needs CUDA", file=sys.stderr)
        return 2
    if a.shapes:
        shape_costs(a.shapes, a.heads, a.kv_heads, a.head_dim)
        return 0
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = timed(lambda: m @ m, reps=10)
    print(f"matmul_8192_bf16_tflops:{2 * 8192 ** 3 / ms / 1e9:.0f}")
    B, T, H, Hkv, D = a.batch, a.seq, a.heads, a.kv_heads, a.head_dim
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    flops = 4 * B * H * T * T * D / 2 * 3.5  # causal fwd (2 matmuls) + bwd (5 matmuls)

    def sdpa(backend, gqa):
        def fwd():
            kk, vv = (k, v) if gqa == "native" else (k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1))
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa == "native")
        return fwd

    ref = None
    for name, backend in BACKENDS.items():
        for gqa in ("native", "expand"):
            out = measure(f"{name} gqa:{gqa}", sdpa(backend, gqa), g, (q, k, v), ref, flops)
            ref = out if ref is None else ref
    # FlashAttention 4 (CuTe DSL, package flash-attn-4): called directly in its [B,T,H,D] layout (the
    # kernels train_gpt's fa4_causal op runs), and through torch's own FA4 hook for SDPA's flash kernel
    # (which failed against flash-attn-4 4.0.0b36 on torch 2.11).
    try:
        from flash_attn.cute.interface import flash_attn_func
    except ImportError as e:
        print(f"backend:fa4 unavailable ({e})")
        return 0
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))

    def fa4():
        out = flash_attn_func(qt, kt, vt, causal=True)
        return (out[0] if isinstance(out, tuple) else out)
    out = measure("fa4_direct gqa:native", lambda: fa4().transpose(1, 2), g, (qt, kt, vt), ref, flops)
    try:
        from torch.nn.attention import activate_flash_attention_impl
        activate_flash_attention_impl("FA4")
    except (ImportError, ValueError, RuntimeError) as e:
        print(f"backend:fa4_sdpa unavailable ({e})")
        return 0
    for gqa in ("native", "expand"):
        measure(f"fa4_sdpa gqa:{gqa}", sdpa(SDPBackend.FLASH_ATTENTION, gqa), g, (q, k, v), ref, flops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
