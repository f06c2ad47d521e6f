#!/usr/bin/env python3
"""Summarize train_gpt.py run logs: per-seed table, mean/std of final_val_bpb, Welch test, submission.json.

usage: scripts/summarize.py LOG... [--reference MEAN STD N | --reference-logs LOG...]
                            [--json submission.json --name NAME --blurb TEXT]
                            [--skip-bad] [--allow-invalid] [--allow-duplicate-seeds] [--allow-mixed]

Each LOG is LOG_DIR/<RUN_ID>.txt as written by train_gpt.py (read by scripts/runlog.py). A log without
the final summary block (a failed or truncated run) is an error naming the log and the missing keys,
and so is an invalid run: one whose log has an error: line or a non-finite score (a phase with
val_bpb:nan), or whose final score is not valid for a submission (valid:0 on the final phase,
final_valid:0, or VAL_MAX_TOKENS set: only part of the val set was scored). --skip-bad skips all of
these with a warning; --allow-invalid keeps runs whose only fault is a score not valid for a
submission in the table (column valid:0) and the statistics, but never writes --json for them.
The runs must share their code (code_sha256), knobs (all but the bookkeeping ones: seed, names and
places of files), hardware and torch; --allow-mixed tabulates them anyway, never with --json. The std
is the sample standard deviation (n - 1).
The reference test is one-sided (H1: our mean final_val_bpb is lower), Welch's unequal-variance
t-test with Welch-Satterthwaite degrees of freedom.
"""
import argparse
import datetime
import json
import math
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file (python3 scripts/summarize.py): import scripts.runlog as the tests do
    sys.path.insert(0, str(ROOT))
from scripts.runlog import FILE_KNOBS, LogError, read_log  # noqa: E402

# total_seconds is the block's last line: a log cut inside the block (a half-written value too) lacks it
REQUIRED = ("final_val_bpb", "final_val_loss", "artifact_bytes", "code_bytes", "steps", "train_seconds", "total_seconds")
INT_KEYS = {"artifact_bytes", "model_bytes", "code_bytes", "steps"}
# The seed and the knobs that name or place a run's files: may differ between seeds, never env overrides.
BOOKKEEPING_KNOBS = {"SEED"} | FILE_KNOBS


class BadLog(Exception):
    pass


def parse_log(path: Path) -> dict:
    """One run: summary keys (typed), hyperparameters (raw strings) and header facts."""
    try:
        log = read_log(path)
    except LogError as e:
        raise BadLog(str(e)) from None
    run = {"path": path, "name": path.stem, "hparams": log.hparams, "summary": dict(log.summary)}
    facts = log.facts
    if log.errors:
        run["error"] = log.errors[-1]
    if "device_name" in facts or "world_size" in facts:
        run["hardware"] = f"{facts.get('world_size', '?')}x{facts.get('device_name', '?')}"
    run["torch"] = facts.get("torch")
    run["git_commit"] = facts.get("git_commit")
    run["code_sha256"] = facts.get("code_sha256")
    roundtrip = log.phase("roundtrip")
    run["roundtrip_eval_s"] = roundtrip.eval_time if roundtrip else None
    s = run["summary"]
    missing = [k for k in REQUIRED if k not in s] + ([] if "seed" in run["hparams"] else ["seed"])
    if missing:
        why = (f"run failed: {run['error']}" if "error" in run
               else "an EVAL_ONLY log: it scored an artifact and trained nothing" if run["hparams"].get("eval_only")
               else "no summary block: crashed, still running, or not a train_gpt.py log?")
        raise BadLog(f"{path}: missing {', '.join(missing)} ({why})")
    for k, v in s.items():
        if k in INT_KEYS or k.endswith(("_bpb", "_loss", "_seconds")):
            try:
                s[k] = int(v) if k in INT_KEYS else float(v)
            except ValueError:
                raise BadLog(f"{path}: {k}:{v} is not a number") from None
    try:
        run["seed"] = int(run["hparams"]["seed"])
    except ValueError:
        raise BadLog(f"{path}: seed: {run['hparams']['seed']!r} is not an integer") from None
    run["eval_s"] = s.get("eval_seconds", run["roundtrip_eval_s"])
    if fault := log.score_fault():
        raise BadLog(f"{path}: invalid run: {fault}")
    run["invalid"] = log.invalid_reason()  # a complete run whose score is not valid for a submission, or None
    if run["invalid"] is None and s["artifact_bytes"] > artifact_limit():
        run["invalid"] = f"artifact_bytes:{s['artifact_bytes']} over the {artifact_limit()}-byte cap"
    return run


def artifact_limit() -> int:
    import train_gpt  # imported late: it pulls in torch (ROOT is on sys.path, as scripts.runlog's import needs)
    return train_gpt.ARTIFACT_LIMIT_BYTES


def load_runs(paths, skip_bad: bool, allow_dup: bool, what: str = "logs",
              allow_invalid: bool = False) -> tuple[list[dict], int]:
    """Parsed runs and the number of bad logs skipped (only with skip_bad; otherwise BadLog). A run whose
    score is not valid for a submission is bad too, unless allow_invalid (then it is kept, with a warning)."""
    runs, bad = [], 0
    for p in map(Path, paths):
        if p.name.endswith(".console.txt"):
            print(f"note: ignoring {p} (a run_seeds.sh console stream, not a run log)", file=sys.stderr)
            continue
        try:
            run = parse_log(p)
            if run["invalid"] and not allow_invalid:
                raise BadLog(f"{p}: invalid run: {run['invalid']}: not a score for a submission "
                             f"(--allow-invalid to tabulate it anyway)")
            if run["invalid"]:
                print(f"warning: {p}: invalid run kept (--allow-invalid): {run['invalid']}", file=sys.stderr)
            runs.append(run)
        except BadLog as e:
            if not skip_bad:
                raise
            bad += 1
            print(f"warning: skipping {e}", file=sys.stderr)
    if bad:
        print(f"warning: skipped {bad} of {bad + len(runs)} {what}; using n={len(runs)}", file=sys.stderr)
    if not runs:
        raise BadLog(f"no usable {what}")
    seen = {}
    for r in runs:
        if r["seed"] in seen and not allow_dup:
            raise BadLog(f"{r['path']}: seed {r['seed']} also in {seen[r['seed']]} "
                         "(--allow-duplicate-seeds to keep both)")
        seen.setdefault(r["seed"], r["path"])
    return runs, bad


def mixed_setups(runs) -> list[str]:
    """What the runs do not share (a set of seeds is one configuration run several times): code, knobs other
    than the bookkeeping ones, hardware, torch. Each as `what=a|b`."""
    import train_gpt
    facets = [("code_sha256", lambda r: r["code_sha256"]), ("hardware", lambda r: r.get("hardware")),
              ("torch", lambda r: r["torch"])]
    facets += [(k.name, lambda r, key=k.name.lower(): r["hparams"].get(key)) for k in train_gpt.KNOBS
               if k.name not in BOOKKEEPING_KNOBS]
    out = []
    for what, get in facets:
        values = list(dict.fromkeys(str(get(r)) for r in runs))
        if len(values) > 1:
            out.append(f"{what}={'|'.join(values)}")
    return out


def mean_std(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


# --- Student t distribution and Welch's test (no scipy) ---------------------------------

def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b): continued fraction (modified Lentz)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean: use symmetry
        return 1.0 - betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return front * h


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom (df may be fractional)."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def welch_one_sided(m1, s1, n1, m2, s2, n2):
    """H1: mean1 < mean2. Returns (t, dof, p); t > 0 when sample 1 is lower."""
    if n1 < 2 or n2 < 2:
        raise ValueError(f"Welch's test needs n >= 2 on both sides (got {n1} and {n2})")
    a, b = s1 * s1 / n1, s2 * s2 / n2
    if a + b == 0:
        t = math.copysign(math.inf, m2 - m1) if m1 != m2 else 0.0
        return t, float("nan"), (0.0 if t > 0 else 1.0 if t < 0 else 0.5)
    t = (m2 - m1) / math.sqrt(a + b)
    dof = (a + b) ** 2 / (a * a / (n1 - 1) + b * b / (n2 - 1))
    return t, dof, t_sf(t, dof)


# --- output -------------------------------------------------------------------------------

def table(runs) -> str:
    cols = [("log", lambda r: r["name"]), ("seed", lambda r: r["seed"]), ("steps", lambda r: r["summary"]["steps"]),
            ("train_s", lambda r: f"{r['summary']['train_seconds']:.1f}")]
    if any(r["invalid"] for r in runs):
        cols.append(("valid", lambda r: 0 if r["invalid"] else 1))
    if any(r["eval_s"] is not None for r in runs):
        cols.append(("eval_s", lambda r: "-" if r["eval_s"] is None else f"{r['eval_s']:.1f}"))
    cols.append(("artifact_bytes", lambda r: r["summary"]["artifact_bytes"]))
    for key, head in [("prequant_val_bpb", "prequant_bpb"), ("final_val_bpb", "final_bpb"),
                      ("sliding_val_bpb", "sliding_bpb"), ("ttt_val_bpb", "ttt_bpb")]:
        if any(key in r["summary"] for r in runs):
            cols.append((head, lambda r, k=key: f"{r['summary'][k]:.5f}" if k in r["summary"] else "-"))
    rows = [[h for h, _ in cols]] + [[str(f(r)) for _, f in cols] for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def logged_value(knob, text: str):
    """A knob's value as the log spells it, read as train_gpt reads its environment (0/1 for on/off); the text
    itself where that refuses it."""
    import train_gpt
    try:
        return train_gpt._parse(knob, text)
    except train_gpt.UserError:
        return text


def env_overrides(runs) -> dict:
    """Knobs whose logged value differs from train_gpt.KNOBS' default (both spelled as the environment would)."""
    import train_gpt
    out = {}
    for knob in train_gpt.KNOBS:
        key = knob.name.lower()
        values = [r["hparams"][key] for r in runs if key in r["hparams"]]
        if not values or knob.name in BOOKKEEPING_KNOBS:
            continue
        value = logged_value(knob, values[0])  # one config: mixed_setups refused runs that differ
        if train_gpt.knob_text(value) != train_gpt.knob_text(knob.default):
            out[knob.name] = value
    return out


def one(runs, key: str, what: str):
    values = {r.get(key) for r in runs}
    if len(values) > 1:
        print(f"warning: logs disagree on {what}: {sorted(map(str, values))}", file=sys.stderr)
    return next(iter(values)) if len(values) == 1 else ",".join(sorted(map(str, values)))


def submission(runs, name: str, blurb: str) -> dict:
    bpb = [r["summary"]["final_val_bpb"] for r in runs]
    seed_results = {}
    for r in runs:
        key = str(r["seed"]) if str(r["seed"]) not in seed_results else f"{r['seed']} ({r['name']})"
        seed_results[key] = {"val_bpb": r["summary"]["final_val_bpb"], "val_loss": r["summary"]["final_val_loss"],
                             "artifact_bytes": r["summary"]["artifact_bytes"], "steps": r["summary"]["steps"],
                             "train_seconds": r["summary"]["train_seconds"]}
    std = mean_std(bpb)[1]
    return {"name": name, "blurb": blurb,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "val_bpb": statistics.fmean(bpb),
            "val_loss": statistics.fmean(r["summary"]["final_val_loss"] for r in runs),
            "val_bpb_std": None if math.isnan(std) else std,
            "bytes_total": max(r["summary"]["artifact_bytes"] for r in runs),
            "bytes_code": max(r["summary"]["code_bytes"] for r in runs),
            "seeds": [r["seed"] for r in runs], "seed_results": seed_results,
            # one configuration (mixed_setups refused others): its code, hardware and torch are the first run's
            "hardware": runs[0].get("hardware"), "pytorch_version": runs[0]["torch"],
            "env_overrides": env_overrides(runs), "git_commit": one(runs, "git_commit", "git commit"),
            "code_sha256": runs[0]["code_sha256"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("logs", nargs="+", metavar="LOG")
    ref = ap.add_mutually_exclusive_group()
    ref.add_argument("--reference", nargs=3, type=float, metavar=("MEAN", "STD", "N"),
                     help="reference final_val_bpb mean, sample std and number of seeds")
    ref.add_argument("--reference-logs", nargs="+", metavar="LOG", help="reference run logs")
    ap.add_argument("--json", metavar="PATH", help="write submission.json here")
    ap.add_argument("--name", help="submission name (default: the first log's name without _seedN)")
    ap.add_argument("--blurb", default="", help="submission one-line description")
    ap.add_argument("--skip-bad", action="store_true", help="skip failed, truncated and invalid runs with a warning")
    ap.add_argument("--allow-invalid", action="store_true",
                    help="keep runs whose score is not valid for a submission (valid:0, VAL_MAX_TOKENS) in the "
                         "table and statistics, marked valid:0; --json is refused for them")
    ap.add_argument("--allow-duplicate-seeds", action="store_true")
    ap.add_argument("--allow-mixed", action="store_true",
                    help="tabulate runs of different code, knobs, hardware or torch together (never with --json)")
    args = ap.parse_args(argv)
    try:
        runs, skipped = load_runs(args.logs, args.skip_bad, args.allow_duplicate_seeds, "logs", args.allow_invalid)
        invalid = [r for r in runs if r["invalid"]]
        if args.json and any(Path(args.json).resolve() == Path(p).resolve()
                             for p in args.logs + (args.reference_logs or [])):
            raise BadLog(f"--json {args.json}: is one of the logs (it would be overwritten)")
        if args.json and invalid:
            raise BadLog(f"not writing {args.json}: {len(invalid)} of {len(runs)} runs have no valid score for a "
                         f"submission ({invalid[0]['path']}: {invalid[0]['invalid']})")
        if mixed := mixed_setups(runs):
            if not args.allow_mixed or args.json:
                raise BadLog(f"the runs are not one configuration: {' '.join(mixed)} (--allow-mixed to tabulate "
                             "them anyway, without --json)")
            print(f"warning: the runs are not one configuration (--allow-mixed): {' '.join(mixed)}", file=sys.stderr)
        reference = None
        if args.reference_logs:
            refs, _ = load_runs(args.reference_logs, args.skip_bad, args.allow_duplicate_seeds, "reference logs",
                                args.allow_invalid)
            reference = (*mean_std([r["summary"]["final_val_bpb"] for r in refs]), len(refs))
        elif args.reference:
            m, s, n = args.reference
            if not (math.isfinite(m) and math.isfinite(s)) or n != int(n) or n < 2 or s < 0:
                raise BadLog(f"--reference {m} {s} {n}: expected a finite MEAN, a finite STD >= 0 and an integer "
                             "N >= 2")
            reference = (m, s, int(n))
    except BadLog as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    bpb = [r["summary"]["final_val_bpb"] for r in runs]
    mean, std = mean_std(bpb)
    print(table(runs))
    note = f" (skipped {skipped} bad logs)" if skipped else ""
    if invalid:
        note += f" ({len(invalid)} invalid: not a submission score)"
    print(f"final_val_bpb mean:{mean:.6f} std:{'n/a' if math.isnan(std) else f'{std:.6f}'} n:{len(runs)}{note}")
    if reference:
        try:
            t, dof, p = welch_one_sided(mean, std, len(runs), *reference)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"reference mean:{reference[0]:.6f} std:{reference[1]:.6f} n:{reference[2]}")
        print(f"welch_one_sided (ours lower) delta:{mean - reference[0]:+.6f} t:{t:.4f} dof:{dof:.2f} p:{p:.6f}")
    if args.json:
        name = args.name or re.sub(r"_seed-?\d+$", "", runs[0]["name"])
        import train_gpt  # its write: all of the file or none of it, an earlier one left as it was
        try:
            train_gpt.write_atomic(Path(args.json), (json.dumps(submission(runs, name, args.blurb), indent=2)
                                                     + "\n").encode())
        except train_gpt.UserError as e:
            print(f"error: --json {e}", file=sys.stderr)
            return 1
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
