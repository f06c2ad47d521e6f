#!/usr/bin/env python3
"""Two training logs of one configuration side by side: a run on N GPUs against the same global batch
on fewer (bench/scaling.sh), or any two runs of one global batch.

usage: python3 bench/compare_runs.py RUN.txt REFERENCE.txt [--steps 200]

Prints one line per log:
  run:<name> world_size:<n> last_step:<k> step_avg_ms:<at the last step both logged> tok_s:<total>
  tok_s_per_gpu:<...> eval_s_<phase>:<...> ... final_val_bpb:<...> final_valid:<0|1>
then
  differs:<none, or each knob, code hash and data fact the runs do not share as name=RUN|REFERENCE>
  curve steps:<train-loss steps both logged, up to --steps> max_abs_diff:<...> mean_abs_diff:<...>
  scaling world_size:<n>/<m> efficiency:<per-GPU tok/s of RUN over REFERENCE's>
"""
import argparse
import math
import sys
from pathlib import Path

if not __package__:  # run as a file (python3 bench/compare_runs.py): import scripts.runlog from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.runlog import FILE_KNOBS, LogError, read_log  # noqa: E402


# Per-run names, not settings: a run on N GPUs and its 1-GPU reference differ in these only (logged lower-case).
BOOKKEEPING = {k.lower() for k in FILE_KNOBS}
# The code that ran, and what the scores divide and what was scored: two runs that differ in the last four have
# bpbs over other bytes or text.
FACTS = ("code_sha256", "tokenizer_sha256", "val_tokens", "val_bytes", "val_byte_source")


class BadInput(Exception):
    """A log that cannot be read or compared: one line on stderr, exit status 2."""


def parse(path: Path) -> dict:
    try:
        log = read_log(path)
    except LogError as e:
        raise BadInput(f"error: {e}") from None
    batch = log.hparams.get("train_batch_tokens")
    train = {s.step: (s.train_loss, s.step_avg_ms) for s in log.steps if s.step_avg_ms is not None}
    if not train or batch is None or not batch.isdigit():
        raise BadInput(f"error: {path}: no train_batch_tokens or step lines: not a train_gpt.py log")
    world = log.facts.get("world_size", "1")
    if not world.isdigit():
        raise BadInput(f"error: {path}: world_size:{world} is not a count of GPUs")
    # a run that stopped with an error has no score to show, whatever its summary block says
    final = "failed" if log.errors else log.summary.get("final_val_bpb", "n/a")
    setting = {k: v for k, v in log.hparams.items() if k not in BOOKKEEPING}
    setting |= {k: log.facts.get(k) for k in FACTS}
    return {"name": path.stem, "train": train, "batch": int(batch),
            "eval": {p.name: p.eval_time for p in log.phases if p.eval_time is not None},
            "world_size": int(world), "final": final, "valid": int(log.invalid_reason() is None),
            "setting": setting}


def compare(run: dict, ref: dict, max_steps: int) -> list[str]:
    if run["batch"] != ref["batch"]:
        raise BadInput(f"error: the logs' train_batch_tokens differ ({run['batch']} vs {ref['batch']}): "
                       f"not the same global batch")
    common = sorted(set(run["train"]) & set(ref["train"]))
    if not common:
        raise BadInput("error: the logs have no train step in common")
    last, out, per_gpu = common[-1], [], []
    for r in (run, ref):
        ms = r["train"][last][1]
        tok_s = r["batch"] / ms * 1000
        per_gpu.append(tok_s / r["world_size"])
        out.append(" ".join([f"run:{r['name']} world_size:{r['world_size']} last_step:{last} step_avg_ms:{ms:.2f} "
                             f"tok_s:{tok_s:.0f} tok_s_per_gpu:{tok_s / r['world_size']:.0f}",
                             *(f"eval_s_{k}:{v:.1f}" for k, v in r["eval"].items()), f"final_val_bpb:{r['final']}",
                             f"final_valid:{r['valid']}"]))
    keys = dict.fromkeys([*run["setting"], *ref["setting"]])
    differs = [f"{k}={run['setting'].get(k)}|{ref['setting'].get(k)}" for k in keys
               if run["setting"].get(k) != ref["setting"].get(k)]
    out.append(f"differs:{' '.join(differs) or 'none'}")
    diffs = [abs(run["train"][k][0] - ref["train"][k][0]) for k in common if k <= max_steps]
    if diffs:
        worst = math.nan if any(map(math.isnan, diffs)) else max(diffs)  # max() keeps or drops a NaN by its place
        out.append(f"curve steps:{len(diffs)} max_abs_diff:{worst:.4f} mean_abs_diff:{sum(diffs) / len(diffs):.4f}")
    out.append(f"scaling world_size:{run['world_size']}/{ref['world_size']} "
               f"efficiency:{per_gpu[0] / per_gpu[1]:.3f}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("reference", type=Path)
    ap.add_argument("--steps", type=int, default=200, help="compare train losses up to this step")
    args = ap.parse_args(argv)
    try:
        print("\n".join(compare(parse(args.run), parse(args.reference), args.steps)))
    except BadInput as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
