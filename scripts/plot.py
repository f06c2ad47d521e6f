#!/usr/bin/env python3
"""Plot train_gpt.py training curves: one line per log, 2x2 panels.

usage: scripts/plot.py LOG... [-o curves.png]

Panels: train loss vs step, train loss vs train time, val bpb vs step, val bpb vs train time.
Train time is the training clock the log reports (compile warm-up and validation excluded). The
final score (final_val_bpb: the final phase's, after quantization), when the log has one, is a star at the last step.
"""
import argparse
import sys
from pathlib import Path

if not __package__:  # run as a file (python3 scripts/plot.py): import scripts.runlog as the tests do
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.runlog import number, read_log  # noqa: E402


def read_curves(path: Path) -> dict:
    """train: [(step, train_loss, seconds)], val: [(step, val_bpb, seconds)], final: (steps, final_val_bpb,
    seconds) or None. train_time has 0.1 s resolution; step * step_avg gives a finer clock."""
    log = read_log(path)
    c = {"train": [(s.step, s.train_loss, s.step * s.step_avg_ms / 1000) for s in log.steps
                   if s.train_loss is not None and s.step_avg_ms is not None],
         "val": [(s.step, s.val_bpb, s.step * s.step_avg_ms / 1000) for s in log.val_steps
                 if s.val_bpb is not None and s.step_avg_ms is not None],
         "final": None}
    if not c["train"] and not c["val"]:
        raise ValueError(f"{path}: no step lines (not a train_gpt.py log, or the run failed before training)")
    last = {k: number(log.summary.get(key)) for k, key in (("final", "final_val_bpb"), ("steps", "steps"),
                                                           ("train_s", "train_seconds"))}
    if None not in last.values():  # share the last val point's x (both clocks are rounded differently)
        secs = c["val"][-1][2] if c["val"] and c["val"][-1][0] == last["steps"] else last["train_s"]
        c["final"] = (int(last["steps"]), last["final"], secs)
    return c


def labels(paths: list[Path]) -> list[str]:
    """Each log's legend label: its file stem, or its path where two logs share a stem (one would hide the other)."""
    stems = [p.stem for p in paths]
    return [p.stem if stems.count(p.stem) == 1 else str(p) for p in paths]


def robust_top(steps, ys):
    """Upper y limit ignoring the first 5% of steps, whose loss spikes would flatten the rest."""
    rest = [y for s, y in zip(steps, ys) if s > 0.05 * max(steps) and y == y] or [y for y in ys if y == y]
    return max(rest) * 1.05 if rest else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("logs", nargs="+", metavar="LOG")
    ap.add_argument("-o", "--out", default="curves.png", help="output image (default curves.png)")
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.logs if not p.endswith(".console.txt")]
    if len(paths) < len(args.logs):
        print(f"note: ignoring {len(args.logs) - len(paths)} run_seeds.sh *.console.txt file(s)", file=sys.stderr)
    try:
        curves = dict(zip(labels(paths), map(read_curves, paths)))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not curves:
        print("error: no logs to plot", file=sys.stderr)
        return 1
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    tops = []
    for i, (label, c) in enumerate(curves.items()):
        color = f"C{i % 10}"
        if c["train"]:
            step, loss, secs = zip(*c["train"])
            axes[0, 0].plot(step, loss, color=color, label=label, lw=1.2)
            axes[0, 1].plot(secs, loss, color=color, label=label, lw=1.2)
            tops.append(robust_top(step, loss))
        if c["val"]:
            step, bpb, secs = zip(*c["val"])
            axes[1, 0].plot(step, bpb, color=color, label=label, marker="o", ms=3, lw=1.2)
            axes[1, 1].plot(secs, bpb, color=color, label=label, marker="o", ms=3, lw=1.2)
        if c["final"]:
            step, bpb, secs = c["final"]
            axes[1, 0].plot([step], [bpb], color=color, marker="*", ms=12, ls="none")
            axes[1, 1].plot([secs], [bpb], color=color, marker="*", ms=12, ls="none")
    if tops := [t for t in tops if t is not None]:
        for ax in axes[0]:
            ax.set_ylim(top=max(tops))
    for col in range(2):  # val panels share the train panels' x range (runs validated only at the end too)
        axes[1, col].set_xlim(0, 1.04 * max(axes[0, col].get_xlim()[1], axes[1, col].get_xlim()[1]))
    titles = [["train loss vs step", "train loss vs train time"],
              ["val bpb vs step (* = final score)", "val bpb vs train time (* = final score)"]]
    for r, ylabel in enumerate(["train loss (nats/token)", "val bpb"]):
        for col, xlabel in enumerate(["step", "train time (s)"]):
            ax = axes[r, col]
            ax.set(title=titles[r][col], xlabel=xlabel, ylabel=ylabel)
            ax.grid(True, alpha=0.3)
            ax.ticklabel_format(useOffset=False)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(args.out, dpi=110)
    except (OSError, ValueError) as e:  # a missing folder, a format matplotlib cannot write
        print(f"error: {args.out}: cannot write the plot ({e})", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
