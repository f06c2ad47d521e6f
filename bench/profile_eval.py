#!/usr/bin/env python3
"""Where does an eval phase's time go? Profiles the scored phases of one EVAL_ONLY run.

usage: EVAL_ONLY=<artifact> [knobs] python3 bench/profile_eval.py [--phase NAME ...] [--top 30]

Runs train_gpt's evaluation of the artifact as the environment configures it (its log and summary as usual). The
compile priming (eval_prime) runs unprofiled; each scored phase after it (roundtrip, sliding, ttt; --phase picks)
runs under torch.profiler, and its lines follow the phase's:
  profile phase:<name> wall_s:<the phase> busy_s:<summed GPU kernel time; on CPU, op self time> calls:<count>
  one line per kernel class (bench/profile_step.py's classes), then the top --top kernels: share, seconds, calls
busy_s far below wall_s: the phase waits on the host (launches, syncs, Python), not on the GPU. The log's phase
times include the profiler's own overhead.
Keep the val short (VAL_MAX_TOKENS): the profiler holds every launch of the phase in memory.
"""
import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: the repository root, once
    sys.path.insert(0, str(HERE.parent))
import train_gpt  # noqa: E402
from bench.eval_sweep import cli  # noqa: E402
from bench.profile_step import kernel_class, kernel_times  # noqa: E402
from bench.speed import positive  # noqa: E402

PHASES = ("roundtrip", "sliding", "ttt")


def op_times(prof, cuda: bool) -> tuple[dict, dict]:
    """Seconds and calls per kernel (CUDA) or per op's self time (CPU) in one profiled phase."""
    if cuda:
        ms, calls, _ = kernel_times(prof, 1)
        return {k: v / 1000 for k, v in ms.items()}, calls
    secs, calls = defaultdict(float), defaultdict(int)
    for ev in prof.key_averages():
        secs[ev.key] += ev.self_cpu_time_total / 1e6
        calls[ev.key] += ev.count
    return secs, calls


def report(name: str, wall: float, secs: dict, calls: dict, top: int) -> list[str]:
    busy = sum(secs.values())
    lines = [f"profile phase:{name} wall_s:{wall:.2f} busy_s:{busy:.2f} calls:{sum(calls.values())}"]
    by_class = defaultdict(float)
    for op, s in secs.items():
        by_class[kernel_class(op)] += s
    for c, s in sorted(by_class.items(), key=lambda kv: -kv[1]):
        lines.append(f"profile class:{c} s:{s:.3f} share:{100 * s / max(busy, 1e-12):.1f}%")
    for op, s in sorted(secs.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"profile {100 * s / max(busy, 1e-12):5.1f}% {s:8.3f}s x{calls[op]:<6d} {op[:150]}")
    return lines


def profiled(eval_tokens, phases: set, top: int, primed: list):
    """eval_tokens, profiling each call for a phase in `phases` once the priming is done."""
    cuda = torch.cuda.is_available()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])

    def run(model, val, dctx, hp, phase, *args, **kwargs):
        if not primed or phase.name not in phases:
            return eval_tokens(model, val, dctx, hp, phase, *args, **kwargs)
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=acts) as prof:
            out = eval_tokens(model, val, dctx, hp, phase, *args, **kwargs)
            train_gpt.synchronize(dctx.device)
        wall = time.perf_counter() - t0
        if dctx.is_main:
            print("\n".join(report(phase.name, wall, *op_times(prof, cuda), top)), flush=True)
        return out
    return run


def profile(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--top", type=positive, default=30)
    args = ap.parse_args(argv)
    hp = train_gpt.Hyperparameters()
    if not hp.eval_only:
        raise train_gpt.UserError("env EVAL_ONLY: expected the path of an artifact to evaluate (bench/profile_eval.py "
                                  "trains nothing)")
    primed, prime_eval = [], train_gpt.prime_eval

    def prime(*a, **k):  # phases before it (none in EVAL_ONLY) and the priming's own scoring are not profiled
        secs = prime_eval(*a, **k)
        primed.append(True)
        return secs
    train_gpt.prime_eval = prime
    train_gpt.eval_tokens = profiled(train_gpt.eval_tokens, set(args.phase), args.top, primed)
    train_gpt.run(hp)


def main(argv=None) -> int:
    return cli(profile, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
