"""How much of a training window's attention crosses into other documents, on a token shard: for windows of length L
cut from the stream (as training cuts them), the share of targets whose context holds another document's tokens, the
share of context tokens that belong to another document, and the share of the causal (query, key) pairs that join two
documents (what DOC_ATTENTION masks; FlexAttention skips such pairs by 128 x 128 blocks, so this bounds its saving).

usage: python3 context_share.py SHARD [SHARD ...]
"""
import sys

import numpy as np

BOS = 1


def load(path):
    header = np.fromfile(path, dtype="<i4", count=256)
    return np.fromfile(path, dtype="<u2", offset=1024)[:header[2]]


for path in sys.argv[1:]:
    tokens = load(path)
    lengths = np.diff(np.flatnonzero(tokens == BOS))
    print(f"shard:{path} tokens:{len(tokens)} documents:{len(lengths) + 1} mean_len:{lengths.mean():.0f} "
          f"median_len:{np.median(lengths):.0f}")
    for L in (1024, 2048, 3072):
        w = tokens[:len(tokens) // L * L].reshape(-1, L)
        pos = np.arange(L)[None, :]
        starts = np.maximum.accumulate(np.where(w == BOS, pos, 0), axis=1)  # where each position's document starts
        other = starts / (pos + 1)  # share of the context (positions 0..t) before its document's start
        pairs = starts.sum() / (w.shape[0] * L * (L + 1) / 2)  # causal pairs (t, s <= t) with s in an earlier document
        print(f"  window:{L} targets_seeing_other_documents:{(starts > 0).mean():.3f} "
              f"context_from_other_documents:{other.mean():.3f} cross_document_pairs:{pairs:.3f}")
