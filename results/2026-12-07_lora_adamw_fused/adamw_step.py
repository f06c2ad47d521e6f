#!/usr/bin/env python3
"""One AdamW step of per-document LoRA adapters in torch's three forms: ms per step.

usage: python3 results/2026-12-07_lora_adamw_fused/adamw_step.py [--tensors N] [--device cpu|cuda] [--rows N]

The adapters' shapes are the default's (TTT_LORA_DOCS=64 rows, rank 80, model dim 512, 17 virtual layer slots,
the tied head); --tensors takes the first N of the 172 (all: 445.6M float32 weights), for a machine with less
memory. LORA_BETAS, LORA_EPS and LORA_WD as train_gpt's LoRA TTT uses them. Forms: default (what torch picks:
foreach on CUDA, one tensor at a time on CPU), foreach, fused (train_gpt's before RowAdamW), and train_gpt.RowAdamW
stepping all 64 rows and the first --rows (default 27: the average of live rows over one GPU's share of FineWeb val).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--tensors", type=int, default=172)
parser.add_argument("--device", default="cpu")
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--rows", type=int, default=27)
args = parser.parse_args()
device = torch.device(args.device)
hp = train_gpt.Hyperparameters({})
shapes = [p.shape for p in train_gpt.LoRA(hp.model_config(), hp.ttt_lora_docs, hp.ttt_lora_rank, torch.device("meta"),
                                          train_gpt.lora_targets(hp)).parameters()][:args.tensors]
torch.manual_seed(0)
for form in ("default", "foreach", "fused", "rows:64", f"rows:{args.rows}"):
    params = [(torch.randn(s, device=device) * 0.01).requires_grad_() for s in shapes]
    grads = [torch.randn_like(p) for p in params]
    if form.startswith("rows:"):
        opt, n = train_gpt.RowAdamW(params, hp.ttt_lora_lr), int(form[5:])
        step = lambda: opt.step(grads, n)  # noqa: E731
    else:
        for p, g in zip(params, grads):
            p.grad = g
        opt = torch.optim.AdamW(params, lr=hp.ttt_lora_lr, betas=train_gpt.LORA_BETAS, eps=train_gpt.LORA_EPS,
                                weight_decay=train_gpt.LORA_WD, foreach=form == "foreach" or None,
                                fused=form == "fused" or None)
        step = opt.step
    step()  # the moments allocated
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / args.steps * 1000
    print(f"adamw:{form} device:{device.type} tensors:{len(shapes)} "
          f"weights:{sum(s.numel() for s in shapes)} ms_per_step:{ms:.1f}", flush=True)
