#!/usr/bin/env python3
"""Model-free statistics of the tilt's hints on a val stream: per order and per backoff list, how many targets get
a hint and how often it is the target, with the share of each backoff order's added hints.

usage: python3 hint_stats.py VAL_SHARD [THRESHOLD] ['16' '16,8' ...]"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt  # noqa: E402


def main():
    shard, threshold = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.8
    specs = sys.argv[3:] or ["16", "12", "8", "6", "4", "16,8", "16,6", "16,12,8,6"]
    tokens = torch.from_numpy(np.asarray(train_gpt.open_shard(shard), dtype=np.int64))
    target = tokens[1:]
    print(f"tokens:{len(tokens)} threshold:{threshold}")
    for spec in specs:
        orders = train_gpt.ngram_orders(train_gpt.Hyperparameters({"NGRAM_ORDER": spec}))
        hints = train_gpt.backoff_hints(tokens, orders, threshold)[1:]
        on = hints >= 0
        hit = on & (hints == target)
        line = (f"orders:{spec} hinted:{int(on.sum())} hinted_frac:{on.float().mean():.4f} "
                f"precision:{hit.sum() / on.sum().clamp(min=1):.4f}")
        if len(orders) > 1:  # what the orders after the first add
            first = train_gpt.ngram_hints(tokens, orders[0], threshold)[1:] >= 0
            added = on & ~first
            line += (f" added:{int(added.sum())} added_precision:"
                     f"{(hit & added).sum() / added.sum().clamp(min=1):.4f}")
        print(line)


if __name__ == "__main__":
    main()
