#!/usr/bin/env python3
"""Fixed short speed benchmark: one line per configuration, side by side in one process.

usage: python3 bench/speed.py [--configs default,default_looped,baseline] [--steps 100] [--warmup 10]
                              [--eval-tokens 262144] [--data DIR] [--set KEY=VALUE ...] [--inductor OPTION=VALUE ...]

Each configuration builds train_gpt's model and Trainer (compiled on CUDA unless COMPILE=0), runs
--warmup steps, then times --steps optimizer steps on uniform random tokens, or with --data on real
train shards (on an H100 these ran 0.8 ms/step slower than random tokens), and a sliding-window eval
(EVAL_SEQ_LEN/EVAL_STRIDE) over --eval-tokens random tokens, after a
short warm-up eval (so the compiled forward, EVAL_COMPILE=auto on CUDA, is timed without its compile;
--set EVAL_COMPILE=0 times the eager one).
Configurations: default = the default stack with one H100's share of the batch (98,304 tokens);
default_looped = the same with depth recurrence on; baseline = bench/baseline.env; plain = the default's
shape (layers, MLP width, sequence length, batch) with the baseline's features and optimizer, so that
plain vs default is the cost of the record techniques and baseline vs plain that of the shape. --set applies
overrides to every configuration (e.g. --set DEVICE=cpu NUM_LAYERS=2 for a smoke test); --inductor
sets torch._inductor.config options on top of train_gpt's (e.g. coordinate_descent_tuning=True), to
try one before it goes into configure_inductor().
Prints: config, looped, attention (the kernel ATTN_BACKEND chose), ms_step,
ms_step_read (the same number of steps again, each loss read one step late as train_gpt's loop does), host_ms
(median time the host takes to queue one step, measured with the GPU idle), tok_s, flops_per_token, warmup_s
(the --warmup steps, compile included: run the script twice on one machine for a cold and a warm start),
mfu (CUDA), peak_mem_mib (CUDA, the timed training steps), what torch.compile's caches served during the warm-up
(compiled: fxgraph_hits ... compile_ms), eval_tok_s (printed last, after the eval).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: the repository root, once
    sys.path.insert(0, str(HERE.parent))
import train_gpt  # noqa: E402


def read_env_file(path: Path) -> dict:
    return dict(line.split("=", 1) for line in path.read_text().split() if "=" in line)


BASELINE = read_env_file(HERE / "baseline.env")
SHAPE_KNOBS = ("TRAIN_BATCH_TOKENS", "NUM_LAYERS", "MLP_MULT", "TRAIN_SEQ_LEN")
CONFIGS = {
    "default": ({"TRAIN_BATCH_TOKENS": "98304"}, False),
    "default_looped": ({"TRAIN_BATCH_TOKENS": "98304"}, True),
    "baseline": (BASELINE, False),
    "plain": ({k: v for k, v in BASELINE.items() if k not in SHAPE_KNOBS} | {"TRAIN_BATCH_TOKENS": "98304"}, False),
}


class RandomStream:
    """Stands in for TrainStream: uniform random tokens, same shapes."""

    def __init__(self, vocab: int, seq_len: int):
        self.rng, self.vocab, self.seq_len = np.random.default_rng(0), vocab, seq_len

    def next_batch(self, n_seqs: int, rows: slice) -> np.ndarray:
        return self.rng.integers(0, self.vocab, size=(n_seqs, self.seq_len + 1))[rows]


def positive(text: str) -> int:
    """argparse type: an integer >= 1 (a count of steps or repetitions to divide by)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def key_value(text: str) -> tuple[str, str]:
    """argparse type: one KEY=VALUE pair."""
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def apply_inductor_options(options: list[str]):
    """OPTION=VALUE pairs onto torch._inductor.config (a trusted command line; VALUE is a literal)."""
    import ast
    import torch._inductor.config as inductor_config
    for kv in options:
        key, value = kv.split("=", 1)
        *path, attr = key.split(".")
        target = inductor_config
        for part in path:
            target = getattr(target, part)
        if not hasattr(target, attr):
            raise SystemExit(f"error: --inductor: torch._inductor.config has no option {key!r}")
        setattr(target, attr, ast.literal_eval(value))


def build_trainer(hp, dctx, data: str = ""):
    """Model (with the attention kernel ATTN_BACKEND selects) and Trainer on random tokens, or on the
    train shards in `data`."""
    torch.manual_seed(0)
    attention, attend = train_gpt.select_attention(hp.attn_backend, dctx.device)
    model = train_gpt.GPT(hp.model_config(), attend).to(dctx.device)
    trainer = train_gpt.Trainer(hp, dctx, model)
    trainer.use_streams({hp.train_seq_len: train_gpt.TrainStream(train_gpt.shard_files(data, "train"), hp.train_seq_len,
                                                                 hp.seed, hp.vocab_size)
                         if data else RandomStream(hp.vocab_size, hp.train_seq_len)})
    return trainer, attention


def bench(name: str, overrides: dict, looped: bool, args):
    """Prints the config's line: the training figures as soon as they are measured, then the eval rate
    on the same line, so that a failing eval leaves the training figures on record."""
    # Each config starts from an empty dynamo cache, as a run of its own would: the compiled Muon
    # update keeps one graph per bank shape, and earlier configs' shapes would use up dynamo's
    # recompile limit (8), leaving later configs' updates eager (seen: baseline 40.1 vs 37.5 ms).
    torch._dynamo.reset()
    hp = train_gpt.Hyperparameters(overrides)
    dctx = train_gpt.setup_distributed(hp)
    trainer, attention = build_trainer(hp, dctx, args.data)
    model = trainer.model
    t0, caches0 = time.perf_counter(), train_gpt.compile_cache_counts()
    for _ in range(args.warmup):
        trainer.step(0, 1.0, hp.train_seq_len, looped)
    train_gpt.synchronize(dctx.device)
    warmup_s = time.perf_counter() - t0  # the first step compiles (or loads the graphs from the caches)
    if dctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.step(0, 1.0, hp.train_seq_len, looped)
    train_gpt.synchronize(dctx.device)
    ms = 1000 * (time.perf_counter() - t0) / args.steps
    tok_s = hp.train_batch_tokens / ms * 1000
    # The same steps as train_gpt's loop runs them: each loss read one step late (PendingScalar).
    t0, queued = time.perf_counter(), None
    for _ in range(args.steps):
        loss = train_gpt.PendingScalar(trainer.step(0, 1.0, hp.train_seq_len, looped))
        if queued is not None:
            queued.read()
        queued = loss
    train_gpt.synchronize(dctx.device)
    ms_read = 1000 * (time.perf_counter() - t0) / args.steps
    # The host's own time to queue one step, with the GPU idle and the launch queue empty: when it
    # nears ms_step, a run that waits for each loss a step late (train_gpt's loop) can starve the GPU.
    host = []
    for _ in range(5):
        train_gpt.synchronize(dctx.device)
        t1 = time.perf_counter()
        trainer.step(0, 1.0, hp.train_seq_len, looped)
        host.append(time.perf_counter() - t1)
    train_gpt.synchronize(dctx.device)
    host_ms = 1000 * sorted(host)[len(host) // 2]
    flops = train_gpt.model_flops_per_token(model.cfg, hp.train_seq_len, looped)
    peak = train_gpt.device_peak_flops(dctx.device)
    line = (f"config:{name} looped:{int(looped)} attention:{attention} ms_step:{ms:.2f} ms_step_read:{ms_read:.2f} "
            f"host_ms:{host_ms:.1f} tok_s:{tok_s:.0f} flops_per_token:{flops:.4g} warmup_s:{warmup_s:.1f}")
    if peak:
        line += f" mfu:{100 * tok_s * flops / peak:.1f}% peak_mem_mib:{torch.cuda.max_memory_allocated() // 2**20}"
    if trainer.compiled:
        line += f" {train_gpt.cache_counts_line(caches0)}"
    print(line, end=" ", flush=True)
    val = np.random.default_rng(1).integers(0, hp.vocab_size, size=args.eval_tokens + 1).astype(np.uint16)
    # Every target charged one byte: the timing does not depend on the byte count.
    val = train_gpt.ValSet(val, np.ones(len(val) - 1, dtype=np.int32), "tokenizer")
    phase = train_gpt.Phase("sliding", hp.eval_seq_len, hp.eval_stride or hp.eval_seq_len, tilt=hp.ngram_tilt)  # as scored
    # Warm-up on a short prefix: builds kernel plans and, with EVAL_COMPILE on, the compiled graph
    # (reused by later calls on the same model), so the timing below is the steady-state rate.
    train_gpt.eval_tokens(model, val.prefix(2 * hp.eval_seq_len + 1), dctx, hp, phase)
    train_gpt.synchronize(dctx.device)
    t0 = time.perf_counter()
    train_gpt.eval_tokens(model, val, dctx, hp, phase)
    train_gpt.synchronize(dctx.device)
    print(f"eval_tok_s:{args.eval_tokens / (time.perf_counter() - t0):.0f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="default,default_looped,baseline", help="comma-separated: " + ",".join(CONFIGS))
    ap.add_argument("--steps", type=positive, default=100, help="timed optimizer steps per config")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (compile)")
    ap.add_argument("--eval-tokens", type=positive, default=262144, help="random tokens scored by the sliding eval")
    ap.add_argument("--data", default="", metavar="DIR",
                    help="train on the fineweb_train_*.bin shards in DIR instead of uniform random tokens")
    ap.add_argument("--set", nargs="*", type=key_value, default=[], metavar="KEY=VALUE", help="overrides for every config")
    ap.add_argument("--inductor", nargs="*", default=[], metavar="OPTION=VALUE",
                    help="torch._inductor.config options, e.g. coordinate_descent_tuning=True")
    args = ap.parse_args(argv)
    apply_inductor_options(args.inductor)
    extra = dict(args.set)
    names = args.configs.split(",")
    for name in names:  # all before the first runs: a typo found after minutes of benchmarking wastes them
        if name not in CONFIGS:
            print(f"error: --configs: unknown config {name!r} (expected one of {', '.join(CONFIGS)})", file=sys.stderr)
            return 2
    for name in names:
        overrides, looped = CONFIGS[name]
        try:
            bench(name, overrides | extra, looped, args)
        except train_gpt.UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
