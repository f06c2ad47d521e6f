#!/usr/bin/env python3
"""The n-gram tilt's variants scored offline on a trained artifact: one CPU pass over a val prefix records, per
target, -log p(target) and -log p(hint) for each n-gram order's hint; any (orders, beta, gamma) is then exact
arithmetic on those (train_gpt.tilted_nll), no second model pass.

usage: python3 tilt_offline.py collect ARTIFACT VAL_SHARD TOKENIZER N_TARGETS OUT.npz
       python3 tilt_offline.py score OUT.npz 'ORDERS BETA GAMMA' ...     (e.g. '16 2.625 0' '16,8 3.5 1')

Windows of 2048 tokens; each scores its last 1024 targets (the first window all of its own), so every target
sees at least 1024 tokens of context (the real sliding eval: stride 64, at least 1984)."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt  # noqa: E402

ORDERS, WINDOW, STRIDE, THRESHOLD = (16, 12, 8, 6, 4), 2048, 1024, 0.8


def collect(artifact, shard, tokenizer, n_targets, out):
    torch.set_num_threads(2)
    qstate, meta = train_gpt.read_artifact(Path(artifact))
    model = train_gpt.artifact_model(qstate, meta, Path(artifact), torch.device("cpu"), train_gpt.causal_attention)
    model.eval()
    stream = np.asarray(train_gpt.open_shard(shard), dtype=np.int64)[:n_targets + 1]
    sp = train_gpt.load_tokenizer(tokenizer, model.cfg.vocab_size)
    val = train_gpt.ValSet.from_lut(stream, train_gpt.build_byte_lut(sp, model.cfg.vocab_size))
    tokens = torch.from_numpy(stream)
    hints = torch.stack([train_gpt.ngram_hints(tokens, o, THRESHOLD) for o in ORDERS], -1)[1:]  # per target
    targets = tokens[1:]
    nll = torch.full((n_targets, 1 + len(ORDERS)), float("nan"))
    done = 0
    with torch.no_grad():
        for end in range(WINDOW, n_targets + STRIDE, STRIDE):  # window inputs end-WINDOW..end-1 predict targets ..end-1
            end = min(end, n_targets)
            if end <= done:
                break
            begin = max(0, end - WINDOW)
            h = model.hidden(tokens[begin:end][None], looped=True)[0]
            first = done - begin  # this window's first new target (index into the window)
            ids = torch.cat((targets[done:end, None], hints[done:end].clamp_min(0)), -1)
            nll[done:end] = model.nll_of_ids(h[first:], ids)
            done = end
            print(f"targets:{done}/{n_targets}", flush=True)
    np.savez(out, nll=nll.numpy(), hints=hints.numpy(), targets=targets.numpy(), nbytes=val.target_bytes,
             orders=np.array(ORDERS))


def score(path, specs):
    d = np.load(path)
    nll, hints, targets = (torch.from_numpy(d[k]) for k in ("nll", "hints", "targets"))
    orders, bits_per_nat = list(d["orders"]), 1 / np.log(2)
    nbytes = float(d["nbytes"].sum())
    base = float(nll[:, 0].double().sum()) * bits_per_nat / nbytes
    print(f"targets:{len(targets)} bytes:{int(nbytes)} no_tilt_bpb:{base:.5f}")
    for spec in specs:
        order_list, beta, gamma = spec.split()
        cols = [orders.index(int(o)) for o in order_list.split(",")]
        hint, hint_nll = hints[:, cols[0]].clone(), nll[:, 1 + cols[0]].clone()
        for c in cols[1:]:  # back off where the earlier orders have no hint
            take = (hint < 0) & (hints[:, c] >= 0)
            hint[take], hint_nll[take] = hints[take, c], nll[take, 1 + c]
        on = hint >= 0
        tilted = torch.where(on, train_gpt.tilted_nll(nll[:, 0], hint_nll, hint == targets, float(beta), float(gamma)),
                             nll[:, 0])
        bpb = float(tilted.double().sum()) * bits_per_nat / nbytes
        print(f"orders:{order_list} beta:{beta} gamma:{gamma} hinted:{int(on.sum())} bpb:{bpb:.5f} "
              f"vs_no_tilt:{bpb - base:+.5f}")


if __name__ == "__main__":
    if sys.argv[1] == "collect":
        collect(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
    else:
        score(sys.argv[2], sys.argv[3:])
