"""Host time of RowAdamW.step on tiny tensors (172 of them, as the adapters; compute negligible), against the
same step with the row views built once (cached_views) and torch's fused step over whole tensors (no slicing).
Run from the repository root: python3 results/2026-12-07_lora_adamw_fused/row_views_host.py"""
import sys
import time

import torch
sys.path.insert(0, '.')
import train_gpt  # noqa: E402
from torch.optim.adamw import adamw  # noqa: E402
torch.set_num_threads(1)
params = [torch.zeros(64, 8, 4) for _ in range(172)]
grads = tuple(torch.randn(64, 8, 4) for _ in range(172))
opt = train_gpt.RowAdamW(params, 1e-3)
def bench(f, n, reps=300):
    for _ in range(20): f(n)
    t = time.perf_counter()
    for _ in range(reps): f(n)
    return (time.perf_counter() - t) / reps * 1e3
views = {}
def cached(n):
    if n not in views:
        views[n] = ([p[:n] for p in opt.params], [m[:n] for m in opt.m], [v[:n] for v in opt.v])
    p, m, v = views[n]
    adamw(p, [g[:n].contiguous() for g in grads], m, v, [], opt.counts, fused=True, amsgrad=False, beta1=0.0,
          beta2=0.99, lr=1e-3, weight_decay=0.5, eps=1e-10, maximize=False)
def full(n):
    adamw(opt.params, list(grads), opt.m, opt.v, [], opt.counts, fused=True, amsgrad=False, beta1=0.0,
          beta2=0.99, lr=1e-3, weight_decay=0.5, eps=1e-10, maximize=False)
for n in (64, 27):
    print(f"n:{n} rowadamw_ms:{bench(lambda n: opt.step(grads, n), n):.3f} cached_views_ms:{bench(cached, n):.3f} "
          f"all_rows_no_slicing_ms:{bench(full, n):.3f}")
