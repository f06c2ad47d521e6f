#!/usr/bin/env python3
"""The work of per-document LoRA TTT on a val stream, counted without a model: sequential scoring steps,
adapter updates and the padded tokens that go through the forward (and the backward), for several
settings. Its time scales with these counts, so one measured run projects to other settings and to other
data (one GPU's share of FineWeb val is timed on 5.07M tokens of the bench train shard).

usage: [WORLD_SIZE=N] [VAR=value ...] python3 bench/lora_cost.py 'NAME [K=V ...]' ['NAME K=V ...' ...]

Each variant reads the val tokens as train_gpt would (DATA_PATH or VAL_FILES, VAL_MAX_TOKENS). One line per
variant: tokens, docs, global_chunks, steps (scoring steps, one after another), passes (forward calls: a step
whose update reads less context, TTT_LORA_GRAD_CONTEXT, takes two), updates (adapter steps), forward_tokens
and backward_tokens (rows x padded window length, summed over passes), scored (targets, all ranks), shapes
(distinct (rows, padded length, backward or not) of the passes' attention: cuDNN attention plans each one the
first time it meets it; with N ranks the most any one rank meets). With
WORLD_SIZE=N the documents of every global chunk are split over N ranks as eval_tokens splits them (dealt by
length), and the ranks wait for each other at each chunk's end (the global update): the counts are then the
critical path, per chunk the busiest rank's steps plus, separately, the busiest rank's tokens (an upper
bound when those are two ranks). Many chunks and few documents per rank mean more steps, each smaller.
Not counted: the base model's SGD update after each global chunk but the last (TTT_EPOCHS passes forward and
backward over the chunk's tokens): global_chunks - 1 of them, of a size set by TTT_LORA_PHASE_TOKENS.
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: the repository root, once
    sys.path.insert(0, str(HERE.parent))
import train_gpt  # noqa: E402
from bench.eval_sweep import cli, variant_knobs  # noqa: E402

COUNTS = ("steps", "passes", "updates", "forward_tokens", "backward_tokens")


def rank_cost(starts, ends, hp: train_gpt.Hyperparameters) -> tuple[dict, set]:
    """One rank's counts for its documents of one global chunk, every update taken (no budget stop), and the
    shapes of its passes."""
    out, shapes = dict.fromkeys(COUNTS + ("scored",), 0), set()
    seq_len = hp.eval_seq_len
    for s, e in train_gpt.doc_batches(starts, ends, hp.ttt_lora_docs, hp.ttt_lora_row_align):
        for step in train_gpt.step_plan(s, e, hp, True, seq_len):
            begin, prev, last, stepping, grad_begin = step
            length = train_gpt.window_len(begin, last, seq_len)
            out["steps"] += 1
            out["passes"] += 1
            out["forward_tokens"] += len(begin) * length
            out["scored"] += int((last - prev).sum())
            shapes.add((len(begin), length, step.scores_with_grad))
            if stepping:
                if grad_begin is not None:  # the step's own pass (score_docs)
                    length = train_gpt.window_len(grad_begin, last, seq_len)
                    out["passes"] += 1
                    out["forward_tokens"] += len(begin) * length
                    shapes.add((len(begin), length, True))
                out["updates"] += 1
                out["backward_tokens"] += len(begin) * length
    return out, shapes


def lora_cost(tokens, hp: train_gpt.Hyperparameters, world_size: int = 1) -> tuple[dict, list[set]]:
    """The counts of eval_tokens' LoRA phase on world_size ranks (per global chunk, the busiest rank's), and the
    attention shapes each rank meets."""
    starts, ends = train_gpt.doc_spans(tokens)
    chunks = train_gpt.doc_chunks(starts, ends, train_gpt.global_chunk_tokens(hp, world_size))
    out = dict(docs=len(starts), global_chunks=len(chunks)) | dict.fromkeys(COUNTS + ("scored",), 0)
    shapes = [set() for _ in range(world_size)]  # each rank's own, over all chunks
    for docs, _, _ in chunks:
        ranks = [rank_cost(starts[mine], ends[mine], hp)
                 for mine in (train_gpt.doc_share(docs, ends[docs] - starts[docs], r, world_size)
                              for r in range(world_size))]
        for k in COUNTS:
            out[k] += max(r[k] for r, _ in ranks)
        out["scored"] += sum(r["scored"] for r, _ in ranks)
        for seen, (_, new) in zip(shapes, ranks):
            seen |= new
    return out | dict(shapes=max(map(len, shapes))), shapes


def costs(argv: list[str]):
    raw = os.environ.get("WORLD_SIZE", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise train_gpt.UserError(f"WORLD_SIZE={raw!r}: expected a positive integer (the ranks to count for)")
    streams = {}  # variants may read other val data
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"} | {"TTT_ENABLED": "1", "TTT_LORA_RANK": "1"}
    for name, hp in variant_knobs(argv, env):
        key = (hp.data_path, hp.val_files, hp.vocab_size, hp.val_max_tokens)
        if key not in streams:
            files = train_gpt.shard_files(hp.data_path, "val", hp.val_files)
            streams[key] = train_gpt.load_val_tokens(files, hp.vocab_size, hp.val_max_tokens)
        cost = lora_cost(streams[key], hp, int(raw))[0]
        print(f"variant:{name} world_size:{raw} tokens:{len(streams[key])} "
              + " ".join(f"{k}:{v}" for k, v in cost.items()), flush=True)


if __name__ == "__main__":
    sys.exit(cli(costs, sys.argv[1:]))
