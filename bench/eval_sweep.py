#!/usr/bin/env python3
"""Score one artifact under several eval settings in one process on one GPU: Python, torch and the
compiled forward graphs are set up once, so a variant after the first costs little more than its phases.

usage: EVAL_ONLY=ARTIFACT [VAR=value ...] python3 bench/eval_sweep.py 'NAME [K=V ...]' ['NAME K=V ...' ...]
       PREQUANT=FILE [VAR=value ...] python3 bench/eval_sweep.py 'NAME [K=V ...]' ...

PREQUANT (a training run's PREQUANT_SAVE file: its EMA weights, GPTQ Hessians and export knobs) re-exports them
for each variant under the run's export knobs as the environment and the variant change them (GPTQ, clip search,
LQER, AWQ-lite; ARTIFACT_DIR receives the artifact, never overwritten, every variant's checked first) and scores
that artifact: quantization settings compared on one trained model, without retraining. Its lines go to stdout only.

Each variant is train_gpt's EVAL_ONLY run with the environment plus its overrides, logged as
RUN_ID=<RUN_ID>_<NAME>; every variant's knobs are checked before the first one runs. After each run's own
log lines it prints one line: variant, final_phase, final_val_bpb, final_valid, eval_seconds, log. Each run
compiles its graphs before its eval clock (eval_prime, as a training run does before its training clock), a later
variant only those that an earlier one did not build; its phases then run warm, alone or not (a new_graphs above 0
says otherwise). cuDNN's attention plans are made per shape on first use, inside the phases: the first variant of a
process pays for the shapes it meets first, so to compare eval times run one variant both first and last.
"""
import difflib
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: the repository root, once
    sys.path.insert(0, str(HERE.parent))
import train_gpt  # noqa: E402


def parse_variant(spec: str) -> tuple[str, dict]:
    name, *pairs = spec.split()
    if not name.isidentifier() or not all("=" in p and p.split("=", 1)[0] for p in pairs):
        raise train_gpt.UserError(f"variant {spec!r}: expected 'NAME K=V ...' (NAME letters, digits, _)")
    knobs = {k.name for k in train_gpt.KNOBS}
    for key in (p.split("=", 1)[0] for p in pairs):  # the environment may hold anything; a variant only knobs
        if key not in knobs:
            near = difflib.get_close_matches(key.upper(), knobs, n=1)
            raise train_gpt.UserError(f"variant {spec!r}: {key} is not a knob" + (f" ({near[0]}?)" if near else ""))
    return name, dict(p.split("=", 1) for p in pairs)


def variant_knobs(argv: list[str], env: dict, after=lambda name: {}) -> list[tuple[str, train_gpt.Hyperparameters]]:
    """Each variant's knobs (env, then its K=V pairs, then after(name)), all checked before any runs."""
    if not argv:
        raise train_gpt.UserError("give at least one variant: 'NAME [K=V ...]'")
    variants = [parse_variant(spec) for spec in argv]
    if len({name for name, _ in variants}) < len(variants):
        raise train_gpt.UserError("variant names must differ (each names its log)")
    return [(name, train_gpt.Hyperparameters(env | pairs | after(name))) for name, pairs in variants]


def cli(body, argv: list[str]) -> int:
    """Run body(argv); a UserError is one `error:` line on stderr and its exit code."""
    try:
        body(argv)
    except train_gpt.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def reexport(saved: dict, hp: train_gpt.Hyperparameters) -> tuple[Path, str]:
    """The artifact of a PREQUANT file under hp's export knobs, written as a training run's would be, and its
    figures for the variant line."""
    blob, clip = train_gpt.quantize_within_budget(saved["state"], saved["hessians"], saved["model"], hp,
                                                  saved["code_bytes"], lambda line: print(line, flush=True),
                                                  saved["meta"])
    total = len(blob) + saved["code_bytes"]
    path = train_gpt.artifact_path(hp, hp.run_id, over_limit=total > train_gpt.ARTIFACT_LIMIT_BYTES)
    train_gpt.write_atomic(path, blob, overwrite=False)
    return path, f"artifact_bytes:{total} matrix_clip_sigmas:{clip:.4f}"


def check_new_outputs(variants: list[tuple[str, train_gpt.Hyperparameters]], reexport: bool):
    """Before the first variant runs: every variant's log is new, and with re-exports its artifact (either name) too
    and ARTIFACT_DIR takes files (a taken one would stop the sweep halfway)."""
    for _, hp in variants:
        problem = train_gpt.check_outputs(hp, hp.run_id) if reexport else None
        if problem:
            raise train_gpt.UserError(problem)
        log = train_gpt.log_path(hp.log_dir, hp.run_id)
        if log.exists():
            raise train_gpt.UserError(train_gpt.LOG_TAKEN.format(log))


def sweep(argv: list[str]):
    prequant, env = os.environ.get("PREQUANT"), dict(os.environ)
    if bool(prequant) == bool(env.get("EVAL_ONLY")):
        raise train_gpt.UserError("set one of env EVAL_ONLY (the artifact to score) or PREQUANT (weights to re-export)")
    if env.get("WORLD_SIZE", "1") != "1":
        raise train_gpt.UserError("eval_sweep.py runs one process: start it with python3, not torchrun")
    saved = train_gpt.load_prequant(prequant) if prequant else None
    # A re-export starts from the training run's export knobs (the environment and the variant override them)
    # and records the run's training length, as its own export did.
    fixed = {"TRAIN_SEQ_LEN": str(saved["train_seq_len"])} if saved else {}
    base = env.get("RUN_ID") or "sweep"
    variants = variant_knobs(argv, (saved["export"] if saved else {}) | env,
                             lambda name: {"RUN_ID": f"{base}_{name}"} | fixed)
    check_new_outputs(variants, reexport=bool(saved))
    if saved:
        # once for every variant: the weights and Hessians where GPTQ runs (the GPU unless DEVICE=cpu)
        device = "cuda" if variants[0][1].device != "cpu" and torch.cuda.is_available() else "cpu"
        saved |= {part: {k: v.to(device) for k, v in saved[part].items()} for part in ("state", "hessians")}
    for name, hp in variants:
        export = ""
        if saved:
            path, export = reexport(saved, hp)
            hp = hp.replace(eval_only=str(path))
        s = train_gpt.run(hp)
        print(f"variant:{name} final_phase:{s['final_phase']} final_val_bpb:{s['final_val_bpb']:.8f} "
              f"final_valid:{s['final_valid']} eval_seconds:{s['eval_seconds']:.1f} {export + ' ' if export else ''}"
              f"log:{train_gpt.log_path(hp.log_dir, hp.run_id)}", flush=True)


if __name__ == "__main__":
    sys.exit(cli(sweep, sys.argv[1:]))
