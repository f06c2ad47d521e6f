#!/usr/bin/env python3
"""The work of per-document LoRA TTT on a val stream, counted without a model: sequential scoring steps,
adapter updates and the padded tokens that go through the forward (and the backward), on one GPU, for
several settings. Its time scales with these counts, so one measured run projects to other settings and to
other data (one GPU's share of FineWeb val is timed on 5.07M tokens of the bench train shard).

usage: [VAR=value ...] python3 bench/lora_cost.py 'NAME [K=V ...]' ['NAME K=V ...' ...]

Each variant reads the val tokens as train_gpt would (DATA_PATH or VAL_FILES, VAL_MAX_TOKENS). One line per
variant: tokens, docs, global_chunks, steps (forward calls, one after another), updates (adapter steps),
forward_tokens and backward_tokens (rows x padded window length, summed over steps), scored (targets).
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: the repository root, once
    sys.path.insert(0, str(HERE.parent))
import train_gpt  # noqa: E402
from bench.eval_sweep import cli, variant_knobs  # noqa: E402


def lora_cost(tokens, hp: train_gpt.Hyperparameters) -> dict:
    """The counts of eval_tokens' LoRA phase with every update taken (no budget stop)."""
    starts, ends = train_gpt.doc_spans(tokens)
    chunks = train_gpt.doc_chunks(starts, ends, hp.ttt_chunk_tokens)
    out = dict(docs=len(starts), global_chunks=len(chunks), steps=0, updates=0, forward_tokens=0,
               backward_tokens=0, scored=0)
    for docs, _, _ in chunks:
        for batch in train_gpt.doc_batches(starts[docs], ends[docs], hp.ttt_lora_docs):
            steps = train_gpt.doc_steps(starts[docs][batch], ends[docs][batch], hp, True, hp.eval_seq_len)
            for j, (begin, prev, last) in enumerate(steps):
                work = train_gpt.step_rows(prev, last) * train_gpt.window_len(begin, last, hp.eval_seq_len)
                out["steps"] += 1
                out["forward_tokens"] += work
                out["scored"] += int((last - prev).sum())
                if j + 1 < len(steps):
                    out["updates"] += 1
                    out["backward_tokens"] += work
    return out


def costs(argv: list[str]):
    streams = {}  # variants may read other val data
    for name, hp in variant_knobs(argv, dict(os.environ) | {"TTT_LORA_RANK": "1"}):
        key = (hp.data_path, hp.val_files, hp.vocab_size, hp.val_max_tokens)
        if key not in streams:
            files = train_gpt.shard_files(hp.data_path, "val", hp.val_files)
            streams[key] = train_gpt.load_val_tokens(files, hp.vocab_size, hp.val_max_tokens)
        cost = lora_cost(streams[key], hp)
        print(f"variant:{name} tokens:{len(streams[key])} " + " ".join(f"{k}:{v}" for k, v in cost.items()),
              flush=True)


if __name__ == "__main__":
    sys.exit(cli(costs, sys.argv[1:]))
