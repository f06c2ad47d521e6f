"""scripts/: run_seeds.sh, summarize.py, plot.py and the log reader runlog.py, on real tiny CPU runs of
train_gpt.py and on a real H100 log (tests/fixtures)."""
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, parse_log, run_script, tiny_env
from scripts import split_parts, pack_code, plot, runlog, summarize

SCRIPTS = ROOT / "scripts"
H100_LOG = Path(__file__).parent / "fixtures" / "baseline_shape_log.txt"
SEEDS = (1, 2, 3)
# Knobs that make a tiny run cheaper without changing what these tests look at: no clip search (the
# tiny artifact is far under the cap anyway), one TTT epoch.
QUICK = dict(CLIP_SEARCH_STEPS=0, TTT_EPOCHS=1)


def run_seeds(name: str, seeds: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / "run_seeds.sh"), name, seeds], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def summ(capsys, *argv):
    """summarize.main in-process (train_gpt is already imported here): (rc, stdout, stderr)."""
    rc = summarize.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="session")
def seed_run(tiny_data, tmp_path_factory, launcher):
    """Three seeds scored on the whole (small) val split, so that their scores are valid. LAUNCH is
    tests/forkserver.py's client: each seed a process of its own without a torch import."""
    tmp = tmp_path_factory.mktemp("seeds")
    env = tiny_env(tiny_data, tmp, LAUNCH=launcher.command, VAL_LOSS_EVERY=3, VAL_MAX_TOKENS=0, **QUICK)
    res = run_seeds("tiny", " ".join(map(str, SEEDS)), env)
    assert res.returncode == 0, res.stdout + res.stderr
    return env, [tmp / "logs" / f"tiny_seed{s}.txt" for s in SEEDS]


def write_lines(path: Path, lines) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_scripts_are_executable_and_documented():
    for name in ("run_seeds.sh", "summarize.py", "plot.py", "split_parts.py"):
        path = SCRIPTS / name
        assert os.access(path, os.X_OK), name
        assert "usage:" in path.read_text()[:1500], name


def test_run_seeds_writes_one_log_and_console_per_seed(seed_run):
    env, logs = seed_run
    for seed, log in zip(SEEDS, logs):
        text = log.read_text()
        assert f"  seed: {seed}\n" in text and f"  run_id: tiny_seed{seed}\n" in text
        assert parse_log(log)["stop_reason"] == "iterations"
        console = log.with_name(f"tiny_seed{seed}.console.txt").read_text()
        assert "final_val_bpb:" in console and "hyperparameters:" in console
    # Different seeds really are different runs.
    assert len({parse_log(log)["final_val_bpb"] for log in logs}) == len(SEEDS)
    # Re-using a NAME is refused before anything runs (no log or console is touched).
    before = logs[0].with_name("tiny_seed1.console.txt").read_text()
    res = run_seeds("tiny", "4 1", env)
    assert res.returncode != 0 and "already exists" in res.stderr
    res = run_seeds("other", "5 05", env)  # seed 5 twice under two spellings
    assert res.returncode == 2 and "seed '05': expected an integer without leading zeros" in res.stderr
    assert not logs[0].with_name("other_seed5.txt").exists()
    assert not logs[0].with_name("tiny_seed4.txt").exists()
    assert logs[0].with_name("tiny_seed1.console.txt").read_text() == before


def test_run_seeds_stops_at_first_failure(tiny_data, tmp_path, capsys, launcher):
    env = tiny_env(tiny_data, tmp_path, LAUNCH=launcher.command, ITERATIONS=2, TTT_ENABLED=0, EVAL_STRIDE=0, **QUICK)
    res = run_seeds("bad", "1 -5 3", env)  # SEED=-5 is out of range: train_gpt.py exits 2
    assert res.returncode == 2, res.stderr
    assert "FAILED: bad seed -5" in res.stderr
    assert "last 20 lines of" in res.stderr and "SEED='-5'" in res.stderr.split("last 20 lines of")[1]
    logs = tmp_path / "logs"
    assert (logs / "bad_seed1.txt").exists() and (logs / "bad_seed-5.console.txt").exists()
    assert not (logs / "bad_seed3.txt").exists() and not (logs / "bad_seed3.console.txt").exists()
    assert "=== bad seed 3" not in res.stderr
    # Seed 1 completed, but scored only VAL_MAX_TOKENS=4096 of the val tokens: not a submission score.
    rc, out, err = summ(capsys, logs / "bad_seed1.txt")
    assert rc == 1 and out == "" and err.startswith(f"error: {logs / 'bad_seed1.txt'}: invalid run: ")
    assert "val_max_tokens:4096" in err and "not a score for a submission" in err and len(err.splitlines()) == 1


def test_summarize_cli_table_stats_and_submission(seed_run, tmp_path):
    env, logs = seed_run
    out_json = tmp_path / "submission.json"
    res = run_script([str(SCRIPTS / "summarize.py"), *map(str, logs), "--json", str(out_json),
                      "--name", "tiny test", "--blurb", "three tiny seeds"], env)
    assert res.returncode == 0, res.stderr
    summaries = [parse_log(log) for log in logs]
    bpb = [float(s["final_val_bpb"]) for s in summaries]
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["log", "seed", "steps", "train_s", "eval_s", "artifact_bytes", "prequant_bpb",
                                "final_bpb", "sliding_bpb", "ttt_bpb"]
    for seed, s, row in zip(SEEDS, summaries, lines[1:4]):
        cells = row.split()
        assert cells[:3] == [f"tiny_seed{seed}", str(seed), s["steps"]]
        assert cells[5] == s["artifact_bytes"] and float(cells[7]) == pytest.approx(float(s["final_val_bpb"]), abs=1e-5)
    assert f"mean:{statistics.fmean(bpb):.6f} std:{statistics.stdev(bpb):.6f} n:3" in res.stdout

    sub = json.loads(out_json.read_text())
    types = dict(name=str, blurb=str, date=str, val_bpb=float, val_loss=float, val_bpb_std=float, bytes_total=int,
                 bytes_code=int, seeds=list, seed_results=dict, hardware=str, pytorch_version=str,
                 env_overrides=dict, git_commit=str, code_sha256=str)
    assert set(sub) == set(types)
    for key, kind in types.items():
        assert type(sub[key]) is kind, key
    assert sub["name"] == "tiny test" and sub["blurb"] == "three tiny seeds"
    import datetime
    datetime.datetime.fromisoformat(sub["date"])
    assert sub["val_bpb"] == pytest.approx(statistics.fmean(bpb), abs=1e-12)
    assert sub["val_bpb_std"] == pytest.approx(statistics.stdev(bpb), abs=1e-12)
    assert sub["val_loss"] == pytest.approx(statistics.fmean(float(s["final_val_loss"]) for s in summaries))
    assert sub["bytes_total"] == max(int(s["artifact_bytes"]) for s in summaries)
    assert sub["bytes_code"] == int(summaries[0]["code_bytes"])
    assert sub["seeds"] == list(SEEDS)
    for seed, s in zip(SEEDS, summaries):
        r = sub["seed_results"][str(seed)]
        assert r == {"val_bpb": float(s["final_val_bpb"]), "val_loss": float(s["final_val_loss"]),
                     "artifact_bytes": int(s["artifact_bytes"]), "steps": int(s["steps"]),
                     "train_seconds": float(s["train_seconds"])}
    header = logs[0].read_text()
    device = dict(t.split(":", 1) for t in next(l for l in header.splitlines() if l.startswith("device:")).split())
    assert sub["hardware"] == f"{device['world_size']}x{device['device_name']}"
    assert f"torch:{sub['pytorch_version']} " in header and f"git_commit:{sub['git_commit']}\n" in header
    assert f"code_sha256:{sub['code_sha256']} " in header
    ov = sub["env_overrides"]
    assert ov["NUM_LAYERS"] == 4 and ov["MODEL_DIM"] == 64 and ov["EMA_DECAY"] == 0.0 and ov["DEVICE"] == "cpu"
    assert ov["VAL_LOSS_EVERY"] == 3 and ov["DATA_PATH"] == env["DATA_PATH"]
    for name in ("SEED", "RUN_ID", "LOG_DIR", "ARTIFACT_DIR", "ROPE_BASE", "MATRIX_LR", "VAL_BATCH_SIZE"):
        assert name not in ov, name  # bookkeeping knobs and knobs left at their default


def test_bad_logs_are_named_errors_or_skipped(seed_run, tmp_path, capsys):
    _, logs = seed_run
    lines = logs[1].read_text().splitlines()
    cut = next(i for i, l in enumerate(lines) if l.startswith("final_val_bpb:"))
    truncated = write_lines(tmp_path / "truncated.txt", lines[:cut])
    failed = write_lines(tmp_path / "failed.txt", lines[:60] + ["error:val shards in /x: 3 tokens, need more"])
    garbled = write_lines(tmp_path / "garbled.txt", [l if not l.startswith("steps:") else "steps:many" for l in lines])

    rc, out, err = summ(capsys, logs[0], truncated, logs[2])
    assert rc == 1 and out == ""
    assert err.strip() == f"error: {truncated}: missing final_val_bpb, artifact_bytes, code_bytes, steps, " \
                          f"train_seconds, total_seconds (no summary block: crashed, still running, or not a " \
                          f"train_gpt.py log?)"
    rc, _, err = summ(capsys, failed)
    assert rc == 1 and f"{failed}: missing final_val_bpb" in err and "run failed: val shards in /x" in err
    rc, _, err = summ(capsys, garbled)
    assert rc == 1 and f"{garbled}: steps:many is not a number" in err

    rc, out, err = summ(capsys, logs[0], truncated, failed, logs[2], "--skip-bad")
    assert rc == 0
    assert f"warning: skipping {truncated}: missing final_val_bpb" in err
    assert "warning: skipped 2 of 4 logs; using n=2" in err
    bpb = [float(parse_log(l)["final_val_bpb"]) for l in (logs[0], logs[2])]
    assert f"mean:{statistics.fmean(bpb):.6f} std:{statistics.stdev(bpb):.6f} n:2 (skipped 2 bad logs)" in out
    rc, _, err = summ(capsys, truncated, "--skip-bad")
    assert rc == 1 and "error: no usable logs" in err


def doctored(src: Path, dst: Path, edit) -> Path:
    """A copy of a real log with each line passed through edit (a line, or None to drop it)."""
    return write_lines(dst, [e for line in src.read_text().splitlines() if (e := edit(line)) is not None])


def phase_line(line: str, name: str) -> bool:
    return line.startswith(f"{name} val_loss:")


def test_invalid_runs_are_reported_not_crashed_on(seed_run, tmp_path, capsys):
    """A NaN score, an error after the summary, or a final phase that is not valid: each log is an
    "invalid run" error naming it (one line, exit 1), skipped with --skip-bad."""
    _, logs = seed_run
    src = logs[1]
    final = runlog.read_log(src).final_phase.name
    nan = doctored(src, tmp_path / "nan.txt", lambda l: (
        "roundtrip val_loss:nan val_bpb:nan eval_time:0.2s valid:1" if phase_line(l, "roundtrip")
        else "final_val_bpb:nan" if l.startswith("final_val_bpb:") else l))
    nan_summary_only = doctored(src, tmp_path / "inf.txt",
                                lambda l: "final_val_bpb:inf" if l.startswith("final_val_bpb:") else l)
    died = write_lines(tmp_path / "died.txt", src.read_text().splitlines() + ["error:RuntimeError: NCCL timeout"])
    not_valid = doctored(src, tmp_path / "notvalid.txt",
                         lambda l: l.replace("valid:1", "valid:0") if phase_line(l, final) else l)
    cases = [(nan, "invalid run: phase roundtrip scored val_loss:nan val_bpb:nan"),
             (nan_summary_only, "invalid run: final_val_bpb:inf is not a finite number"),
             (died, "invalid run: run failed: RuntimeError: NCCL timeout"),
             (not_valid, f"invalid run: final phase {final} logged valid:0: not a score for a submission "
                         f"(--allow-invalid to tabulate it anyway)")]
    for log, message in cases:
        rc, out, err = summ(capsys, logs[0], log)
        assert rc == 1 and out == "" and err == f"error: {log}: {message}\n", err
    rc, out, err = summ(capsys, logs[0], *(log for log, _ in cases), logs[2], "--skip-bad")
    assert rc == 0 and "warning: skipped 4 of 6 logs; using n=2" in err
    bpb = [float(parse_log(l)["final_val_bpb"]) for l in (logs[0], logs[2])]
    assert f"mean:{statistics.fmean(bpb):.6f} std:{statistics.stdev(bpb):.6f} n:2 (skipped 4 bad logs)" in out


def test_partial_val_runs_are_not_submission_scores(seed_run, tmp_path, capsys):
    """VAL_MAX_TOKENS runs (valid:0 on every phase, final_valid:0; or, from before that was logged, just
    val_max_tokens set) are invalid for a submission; --allow-invalid tabulates them, marked, and still
    refuses --json."""
    _, logs = seed_run

    def partial(line: str, mark: bool):
        if line.startswith("  val_max_tokens:"):
            return "  val_max_tokens: 4096"
        if mark and " val_loss:" in line and " valid:1" in line and not line.startswith("step:"):
            return line.replace(" valid:1", " valid:0")
        return line
    marked = doctored(logs[1], tmp_path / "partial_seed2.txt", lambda l: partial(l, True))
    unmarked = doctored(logs[2], tmp_path / "older_seed3.txt", lambda l: partial(l, False))
    final = runlog.read_log(marked).final_phase.name
    rc, out, err = summ(capsys, logs[0], marked)
    assert rc == 1 and err.strip() == (f"error: {marked}: invalid run: final phase {final} logged valid:0 "
                                       f"(val_max_tokens:4096: not the full val set): not a score for a "
                                       f"submission (--allow-invalid to tabulate it anyway)")
    rc, out, err = summ(capsys, unmarked)
    assert rc == 1 and "invalid run: val_max_tokens:4096: only part of the val set was scored" in err
    rc, out, err = summ(capsys, logs[0], marked, unmarked, "--allow-invalid", "--allow-mixed")  # VAL_MAX_TOKENS
    assert rc == 0 and err.count("invalid run kept (--allow-invalid)") == 2
    head, *rows = out.splitlines()[:4]
    col = head.split().index("valid")
    assert [r.split()[col] for r in rows] == ["1", "0", "0"]
    assert "n:3 (2 invalid: not a submission score)" in out
    rc, out, err = summ(capsys, logs[0], marked, "--allow-invalid", "--json", tmp_path / "s.json")
    assert rc == 1 and f"not writing {tmp_path / 's.json'}: 1 of 2 runs have no valid score" in err
    assert not (tmp_path / "s.json").exists()


def test_an_invalid_run_says_why(seed_run, tmp_path, capsys):
    """A run's own invalid_reasons (its Hessians past the training budget here) reach summarize's refusal."""
    _, logs = seed_run

    def over(line: str) -> str:
        if " val_loss:" in line and " valid:1" in line and not line.startswith("step:"):
            return line.replace(" valid:1", " valid:0")
        return {"final_valid:1": "final_valid:0",
                "invalid_reasons:none": "invalid_reasons:training_over_budget"}.get(line, line)
    assert "invalid_reasons:none" in logs[1].read_text().splitlines()
    bad = doctored(logs[1], tmp_path / "over_seed2.txt", over)
    final = runlog.read_log(bad).final_phase.name
    rc, out, err = summ(capsys, logs[0], bad)
    assert rc == 1 and err.strip() == (f"error: {bad}: invalid run: final phase {final} logged valid:0 "
                                       "(training_over_budget): not a score for a submission (--allow-invalid to "
                                       "tabulate it anyway)")
    # a val subset is said once, with the knob that made it
    both = doctored(bad, tmp_path / "over_part_seed2.txt", lambda line: {
        "invalid_reasons:training_over_budget": "invalid_reasons:val_subset,training_over_budget",
        "  val_max_tokens: 0": "  val_max_tokens: 4096"}.get(line, line))
    assert runlog.read_log(both).invalid_reason() == (f"final phase {final} logged valid:0 (training_over_budget; "
                                                      "val_max_tokens:4096: not the full val set)")


def test_duplicate_seeds_and_console_files(seed_run, tmp_path, capsys):
    _, logs = seed_run
    copy = tmp_path / "again_seed1.txt"
    copy.write_text(logs[0].read_text())
    rc, _, err = summ(capsys, logs[0], copy)
    assert rc == 1 and f"{copy}: seed 1 also in {logs[0]}" in err
    rc, out, _ = summ(capsys, logs[0], copy, "--allow-duplicate-seeds")
    assert rc == 0 and "n:2" in out
    # A shell glob over LOG_DIR also matches run_seeds.sh's console copies: they are not counted twice.
    rc, out, err = summ(capsys, *sorted(logs[0].parent.glob("tiny_seed*.txt")))
    assert rc == 0 and "n:3" in out and err.count("ignoring") == 3


def test_student_t_tail_known_values():
    t_sf = summarize.t_sf
    assert t_sf(2.0, 5) == pytest.approx(0.05097, abs=1e-5)
    assert t_sf(1.0, 10) == pytest.approx(0.17046, abs=1e-4)
    assert t_sf(1.0, 10) == pytest.approx(0.1704465662, abs=1e-9)  # exact (the brief's 0.17046 is rounded up)
    assert t_sf(0.0, 7.3) == pytest.approx(0.5, abs=1e-14)
    for t in (0.1, 1.0, 3.0, 40.0):  # closed forms for df = 1, 2, 3
        assert t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-10)
        assert t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-10)
        u = t / math.sqrt(3)
        assert t_sf(t, 3) == pytest.approx(0.5 - (u / (1 + u * u) + math.atan(u)) / math.pi, rel=1e-9)
        assert t_sf(-t, 4.5) == pytest.approx(1 - t_sf(t, 4.5), abs=1e-14)
    assert t_sf(1.959963985, 1e7) == pytest.approx(0.025, abs=1e-6)  # -> normal
    assert summarize.betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # = P(Binomial(4, 0.4) >= 2)


def test_welch_one_sided_hand_values():
    t, dof, p = summarize.welch_one_sided(1.10, 0.01, 3, 1.12, 0.01, 3)
    assert t == pytest.approx(math.sqrt(6)) and dof == pytest.approx(4.0)
    # df=4 closed form: F(t) = 1/2 + 3/8 * t/sqrt(1+t^2/4) * (1 - t^2/(12(1+t^2/4))) = 0.9647580...
    assert p == pytest.approx(0.5 - 0.375 * math.sqrt(6 / 2.5) * 0.8, abs=1e-12)
    t, dof, p = summarize.welch_one_sided(1.0, 0.02, 4, 1.1, 0.01, 2)
    assert dof == pytest.approx(2.25e-8 / (1e-8 / 3 + 2.5e-9))  # Welch-Satterthwaite = 3.857142...
    t2, _, p2 = summarize.welch_one_sided(1.1, 0.01, 2, 1.0, 0.02, 4)  # the other way round
    assert t2 == pytest.approx(-t) and p2 == pytest.approx(1 - p)
    with pytest.raises(ValueError, match="n >= 2"):
        summarize.welch_one_sided(1.0, 0.0, 1, 1.1, 0.01, 3)


def test_reference_cli(seed_run, capsys):
    _, logs = seed_run
    bpb = [float(parse_log(l)["final_val_bpb"]) for l in logs]
    mean, std = statistics.fmean(bpb), statistics.stdev(bpb)
    rc, out, _ = summ(capsys, *logs, "--reference", mean + 3 * std, std, 3)
    t, dof, p = summarize.welch_one_sided(mean, std, 3, mean + 3 * std, std, 3)
    assert rc == 0 and t == pytest.approx(3 * math.sqrt(1.5)) and dof == pytest.approx(4)
    assert f"t:{t:.4f} dof:{dof:.2f} p:{p:.6f}" in out
    rc, out, _ = summ(capsys, *logs, "--reference-logs", *logs)
    assert rc == 0 and "t:0.0000 dof:4.00 p:0.500000" in out
    rc, _, err = summ(capsys, logs[0], "--reference", 1.0, 0.01, 3)
    assert rc == 1 and "n >= 2" in err


def test_summarize_h100_log_and_optional_columns(tmp_path, capsys):
    run = summarize.parse_log(H100_LOG)
    assert run["seed"] == 1337 and run["hardware"] == "1xNVIDIA_H100_80GB_HBM3" and run["torch"] == "2.11.0+cu130"
    assert run["git_commit"] == "none" and run["eval_s"] == 0.8
    assert run["summary"]["final_val_bpb"] == 1.16305707 and run["summary"]["stop_reason"] == "wallclock_cap"
    # Later train_gpt.py versions add keys to the summary block: shown as columns when present.
    text = H100_LOG.read_text().replace("  seed: 1337", "  seed: 7")
    extra = write_lines(tmp_path / "more_seed7.txt", [text.rstrip("\n"), "sliding_val_bpb:1.14000000",
                                                      "ttt_val_bpb:1.13000000", "eval_seconds:321.50000000"])
    # this baseline's int8 artifact is over the cap: tabulated only with --allow-invalid, never a submission
    rc, out, err = summ(capsys, H100_LOG, extra)
    assert rc == 1 and out == "" and "artifact_bytes:19100350 over the 16000000-byte cap" in err
    rc, out, _ = summ(capsys, H100_LOG, extra, "--allow-invalid")
    assert rc == 0
    head, row1, row2 = out.splitlines()[:3]
    assert head.split() == ["log", "seed", "steps", "train_s", "valid", "eval_s", "artifact_bytes", "prequant_bpb",
                            "final_bpb", "sliding_bpb", "ttt_bpb"]
    assert row1.split()[-2:] == ["-", "-"] and row2.split()[-2:] == ["1.14000", "1.13000"]
    assert row1.split()[5] == "0.8" and row2.split()[5] == "321.5"


def test_submission_overrides_read_on_off_knobs_as_the_log_spells_them():
    """Logs spell on/off knobs 0/1 (or auto): an off knob whose default is on is an override, a knob logged at
    its default is not (bool("0") read every logged 0 as on)."""
    import train_gpt
    hparams = {k.name.lower(): train_gpt.knob_text(k.default) for k in train_gpt.KNOBS}
    hparams |= {"ln_scale": "0", "num_layers": "9", "max_wallclock_seconds": "600.0", "ema_decay": "0"}
    ov = summarize.env_overrides([{"hparams": hparams}])
    assert ov == {"LN_SCALE": False, "NUM_LAYERS": 9, "EMA_DECAY": 0.0}


def test_summarize_refuses_a_reference_that_is_no_number_and_a_json_over_a_log(seed_run, capsys):
    _, logs = seed_run
    for ref in (("nan", 0.01, 3), (1.0, "inf", 3), (1.0, 0.01, 1)):
        rc, _, err = summ(capsys, *logs, "--reference", *ref)
        assert rc == 1 and "expected a finite MEAN, a finite STD >= 0 and an integer N >= 2" in err
    before = logs[0].read_text()
    rc, _, err = summ(capsys, *logs, "--json", logs[0])
    assert rc == 1 and "is one of the logs" in err and logs[0].read_text() == before


def test_a_log_cut_inside_its_summary_block_is_no_score(seed_run, tmp_path, capsys):
    """A run killed (or a disk full) while writing the final block: the block's last line is missing, or a
    value is half-written (no newline after it). Either is refused, never read as the run's figure."""
    _, logs = seed_run
    text = logs[1].read_text()
    at = text.index("\ntrain_seconds:") + len("\ntrain_seconds:") + 2  # inside its value
    for cut in (text[:at], text[:text.index("\ntotal_seconds:") + 1], text[:-1] + "9"):
        log = tmp_path / "cut_seed5.txt"
        log.write_text(cut)
        rc, out, err = summ(capsys, logs[0], log)
        assert rc == 1 and out == "" and "total_seconds" in err and f"error: {log}: missing" in err, err
    assert runlog.parse(text[:-1]).summary.get("total_seconds") is None  # a last line without its newline
    assert runlog.parse(text).summary["total_seconds"] == parse_log(logs[1])["total_seconds"]


def test_seeds_of_different_code_or_knobs_are_not_one_submission(seed_run, tmp_path, capsys):
    """A set of seeds is one configuration: logs of other code (code_sha256), other knobs, hardware or torch
    are refused together (--allow-mixed tabulates them, never as --json); files' names and places may differ."""
    _, logs = seed_run
    src = logs[1]
    other_code = doctored(src, tmp_path / "code_seed8.txt", lambda l: re.sub(r"code_sha256:\w+", "code_sha256:0123", l))
    other_knob = doctored(src, tmp_path / "knob_seed8.txt",
                          lambda l: "  ttt_enabled: 0" if l.startswith("  ttt_enabled:") else l)
    other_torch = doctored(src, tmp_path / "torch_seed8.txt", lambda l: re.sub(r"torch:\S+", "torch:9.9", l))
    other_place = doctored(src, tmp_path / "place_seed8.txt", lambda l: (
        "  seed: 8" if l.startswith("  seed:") else "  dump_token_nll: x.npz" if l.startswith("  dump_token_nll:")
        else l))
    for log, what in ((other_code, "code_sha256="), (other_knob, "TTT_ENABLED=1|0"), (other_torch, "torch=")):
        rc, out, err = summ(capsys, logs[0], log)
        assert rc == 1 and out == "" and "error: the runs are not one configuration: " in err and what in err, err
        rc, out, err = summ(capsys, logs[0], log, "--allow-mixed", "--json", tmp_path / "s.json")
        assert rc == 1 and not (tmp_path / "s.json").exists()
        rc, out, err = summ(capsys, logs[0], log, "--allow-mixed")
        assert rc == 0 and "n:2" in out and "warning: the runs are not one configuration" in err
    rc, out, err = summ(capsys, logs[0], other_place)
    assert rc == 0 and "n:2" in out, err


def test_submission_json_is_written_whole_or_not_at_all(seed_run, tmp_path, capsys, monkeypatch):
    """A failed write leaves the earlier file as it was (and no temporary file); a missing folder or a
    reference log as the target is a one-line error."""
    _, logs = seed_run
    target = tmp_path / "submission.json"
    target.write_text('{"earlier": 1}\n')

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(os, "replace", full_disk)
        rc, _, err = summ(capsys, *logs, "--json", target)
    assert rc == 1 and err == f"error: --json {target}: write failed (No space left on device); nothing was written\n"
    assert target.read_text() == '{"earlier": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["submission.json"]
    rc, _, err = summ(capsys, *logs, "--json", tmp_path / "no" / "such" / "s.json")
    assert rc == 1 and err.count("\n") == 1 and "error: --json" in err
    before = logs[2].read_text()
    rc, _, err = summ(capsys, *logs[:2], "--reference-logs", logs[2], logs[0], "--json", logs[2])
    assert rc == 1 and "is one of the logs" in err and logs[2].read_text() == before
    rc, _, _ = summ(capsys, *logs, "--json", target)
    assert rc == 0 and json.loads(target.read_text())["seeds"] == list(SEEDS)


def test_a_summary_that_disagrees_with_its_log_is_no_score(seed_run, tmp_path, capsys):
    """A final_val_bpb logged twice, or one that is not the final phase's val_bpb, is refused (the last line won)."""
    _, logs = seed_run
    text = logs[0].read_text()
    twice = write_lines(tmp_path / "twice_seed1.txt", [text.rstrip("\n"), "final_val_bpb:0.90000000"])
    rc, _, err = summ(capsys, twice)
    assert rc == 1 and "summary key final_val_bpb logged twice" in err
    bpb = parse_log(logs[0])["final_val_bpb"]
    other = tmp_path / "other_seed1.txt"
    other.write_text(text.replace(f"\nfinal_val_bpb:{bpb}\n", "\nfinal_val_bpb:0.90000000\n"))
    rc, _, err = summ(capsys, other)
    assert rc == 1 and "final_val_bpb:0.90000000 is not its final phase's" in err
    # an EVAL_ONLY log (no training keys) is named as one
    lines = [ln for ln in text.splitlines() if not ln.startswith(("steps:", "train_seconds:"))]
    scored = write_lines(tmp_path / "scored_seed1.txt", [ln.replace("  eval_only: ", "  eval_only: a.br")
                                                         if ln.startswith("  eval_only:") else ln for ln in lines])
    rc, _, err = summ(capsys, scored)
    assert rc == 1 and "an EVAL_ONLY log: it scored an artifact and trained nothing" in err


def test_log_and_shard_tools_import_without_torch():
    code = ("import sys; import scripts.runlog, scripts.summarize, scripts.plot, data.shards; "
            "import bench.compare_runs; print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == "False\n", res.stderr


def test_runlog_reads_every_part_of_a_real_log():
    log = runlog.read_log(H100_LOG)
    assert len(log.hparams) == 56 and log.hparams["seed"] == "1337" and log.hparams["train_batch_tokens"] == "65536"
    assert [(s.step, s.train_loss, s.step_avg_ms) for s in log.steps[:2]] == [(1, 9.0099, 97.37), (2, 18.6125, 85.12)]
    assert len(log.steps) == 46 and log.steps[-1].train_time == 240.0 and log.steps[-1].total == 20000
    assert [(s.step, s.val_loss, s.val_bpb) for s in log.val_steps] == [(4100, 2.2561, 1.1611)]
    assert [(p.name, p.val_loss, p.val_bpb, p.eval_time, p.valid) for p in log.phases] == [
        ("prequant", 2.25611031, 1.16108645, None, None), ("roundtrip", 2.25993943, 1.16305707, 0.8, None)]
    assert list(log.summary) == ["final_val_loss", "final_val_bpb", "prequant_val_bpb", "quant_gap_bpb",
                                 "artifact_bytes", "model_bytes", "code_bytes", "steps", "train_seconds",
                                 "stop_reason", "total_seconds"]
    assert log.summary["final_val_bpb"] == "1.16305707" and log.summary["stop_reason"] == "wallclock_cap"
    assert log.facts["world_size"] == "1" and log.facts["torch"] == "2.11.0+cu130" and log.facts["git_commit"] == "none"
    assert log.warnings == ["artifact_over_limit artifact_bytes:19100350 limit:16000000"] and log.errors == []
    assert log.final_phase.name == "roundtrip" and log.invalid_reason() is None


def test_runlog_keeps_each_lines_values_under_its_name():
    """Lines that share a key (time:) each keep their value under the line's name; a line led by a bare word
    (eval_prime, artifact_load) is read too."""
    log = runlog.parse("\n".join([
        "eval_prime time:31.3s graphs:4 tokens:12288", "gptq_hessians:45 batches:16 time:2.5s",
        "artifact_load time:1.4s", "ttt_chunk:1/10 time:20.3s", "ttt_chunk:2/10 time:38.4s",
        "final_val_bpb:1.0"]) + "\n")
    assert (log.facts["eval_prime.time"], log.facts["eval_prime.graphs"], log.facts["gptq_hessians.time"],
            log.facts["artifact_load.time"], log.facts["ttt_chunk.time"]) == ("31.3s", "4", "2.5s", "1.4s", "38.4s")
    assert log.facts["gptq_hessians"] == "45" and log.facts["time"] == "38.4s"  # as before: the last line's


def test_runlog_summary_is_the_last_block_of_single_key_values(tmp_path):
    """Single key:value lines earlier in the log (run_id:, attention:) are facts, not summary; warning
    and error lines and blank lines do not end the block, any other line does."""
    lines = ["hyperparameters:", "  seed: 7", "  val_max_tokens: 0", "run_id:x", "attention:sdpa",
             "step:1/2 train_loss:5.0 train_time:0.1s step_avg:100.00ms",
             "roundtrip val_loss:3.0 val_bpb:1.5 eval_time:1.0s valid:1 new_graphs:0",
             "ttt val_loss:2.9 val_bpb:1.4 eval_time:2.0s valid:1 new_graphs:0", "eval_total_time:3.0s budget:600s",
             "final_phase:ttt", "final_val_bpb:1.4", "warning:env FOO is set but no knob reads it (typo?)", "",
             "steps:2"]
    log = runlog.parse("\n".join(lines) + "\n")
    assert log.summary == {"final_phase": "ttt", "final_val_bpb": "1.4", "steps": "2"}
    assert log.facts["run_id"] == "x" and log.facts["budget"] == "600s" and log.hparams == {"seed": "7",
                                                                                        "val_max_tokens": "0"}
    assert log.final_phase.name == "ttt" and log.final_phase.eval_time == 2.0 and log.invalid_reason() is None
    assert log.warnings == ["env FOO is set but no knob reads it (typo?)"]
    failed = runlog.parse("\n".join(lines + ["error:barrier timed out after 600 s"]))
    assert failed.summary == log.summary and failed.errors == ["barrier timed out after 600 s"]
    assert failed.invalid_reason() == "run failed: barrier timed out after 600 s"
    cut = runlog.parse("\n".join(lines[:-5] + ["eval_total_time:3.0s budget:600s", "steps:2"]) + "\n")
    assert cut.summary == {"steps": "2"} and cut.invalid_reason().startswith("no final_val_bpb")
    with pytest.raises(runlog.LogError, match="missing.txt: cannot read the log"):
        runlog.read_log(tmp_path / "missing.txt")


def test_plot_reads_curves():
    c = plot.read_curves(H100_LOG)
    assert len(c["train"]) == 46 and c["train"][0][:2] == (1, 9.0099) and len(c["val"]) == 1
    assert c["val"][0][:2] == (4100, 1.1611) and c["val"][0][2] == pytest.approx(4100 * 58.55 / 1000)
    assert abs(c["train"][-1][2] - 240.036) < 0.05  # step * step_avg: finer than train_time's 0.1 s
    assert c["final"] == (4100, 1.16305707, c["val"][0][2])  # the star sits on the last val point's x


def test_plot_labels_logs_that_share_a_name_by_their_paths():
    a, b, c = Path("x/run_seed1.txt"), Path("y/run_seed1.txt"), Path("y/other.txt")
    assert plot.labels([a, b, c]) == ["x/run_seed1.txt", "y/run_seed1.txt", "other"]


def test_plot_writes_png_and_rejects_logs_without_steps(seed_run, tmp_path):
    env, logs = seed_run
    png = tmp_path / "curves.png"
    res = run_script([str(SCRIPTS / "plot.py"), *map(str, logs), str(H100_LOG), "-o", str(png)], env)
    assert res.returncode == 0, res.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    header_only = write_lines(tmp_path / "early.txt", H100_LOG.read_text().splitlines()[:65])  # up to warmup
    res = run_script([str(SCRIPTS / "plot.py"), str(logs[0]), str(header_only), "-o", str(tmp_path / "x.png")], env)
    assert res.returncode == 1 and f"{header_only}: no step lines" in res.stderr
    assert not (tmp_path / "x.png").exists()
    for out in (tmp_path / "missing" / "x.png", tmp_path / "x.txt"):  # no folder; no such image format
        res = run_script([str(SCRIPTS / "plot.py"), str(logs[0]), "-o", str(out)], env)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: {out}: cannot write"), res.stderr
        assert not out.exists()


def test_packed_code_runs_and_counts_its_own_bytes(tiny_data, tmp_path):
    out = tmp_path / "train_gpt.py"
    res = run_script([str(ROOT / "scripts" / "pack_code.py"), str(ROOT / "train_gpt.py"), "-o", str(out)], env=None)
    assert res.returncode == 0, res.stderr
    first = out.read_bytes()
    assert run_script([str(ROOT / "scripts" / "pack_code.py"), str(ROOT / "train_gpt.py"), "-o", str(out)],
                      env=None).returncode == 0 and out.read_bytes() == first  # deterministic
    assert len(first) < (ROOT / "train_gpt.py").stat().st_size / 2
    env = tiny_env(tiny_data, tmp_path, RUN_ID="packed", ITERATIONS=2, TTT_ENABLED=0, EVAL_STRIDE=0, **QUICK)
    res = run_script([str(out)], env)
    assert res.returncode == 0, res.stderr
    summary = parse_log(tmp_path / "logs" / "packed.txt")
    assert int(summary["code_bytes"]) == len(first)
    # The unpacked functions' source is readable (triton.jit needs its kernels' source).
    probe = tmp_path / "probe.py"
    probe.write_text("import inspect\nimport train_gpt\nprint(train_gpt.__file__)\n"
                     "print(inspect.getsource(train_gpt.xsa_reference).splitlines()[0])\n")
    res = run_script([str(probe)], env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [str(out), "def xsa_reference(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:"]


def test_a_packed_run_names_its_commit_only_if_packed_from_it(tiny_data, tmp_path):
    """A packed file logs the sha256 of the source it was packed from; git_commit gets "+stale" where that is
    not the commit's train_gpt.py (a build left from other source: the tree itself is clean, so "+dirty" cannot say)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train_gpt.py").write_bytes((ROOT / "train_gpt.py").read_bytes())
    edited = tmp_path / "edited.py"
    edited.write_bytes((ROOT / "train_gpt.py").read_bytes() + b"# an edit\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    for args in (["init", "-q"], ["add", "train_gpt.py"], ["commit", "-qm", "x"]):
        subprocess.run(git + args, check=True, capture_output=True)
    commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    # the log's header is written first: a run refused at once (no such artifact to score) has it all the same
    env = tiny_env(tiny_data, tmp_path, EVAL_ONLY=str(tmp_path / "none.br"))
    for name, src, suffix in (("same", repo / "train_gpt.py", ""), ("other", edited, "+stale")):
        out = repo / "build" / f"{name}.py"
        assert run_script([str(ROOT / "scripts" / "pack_code.py"), str(src), "-o", str(out)], env=None).returncode == 0
        res = run_script([str(out)], env | dict(RUN_ID=name))
        assert res.returncode == 2 and "artifact file not found" in res.stderr, res.stderr[-2000:]
        sha = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
        facts = runlog.read_log(tmp_path / "logs" / f"{name}.txt").facts
        assert (facts["git_commit"], facts["packed_from"]) == (commit + suffix, sha), name


def test_packing_drops_comments_and_docstrings_only(tmp_path, monkeypatch, capsys):
    """The packed program is the source's syntax tree without its docstrings (a lone one becomes `pass`), its
    non-ASCII text intact; a packing whose program differs is refused; the latin-1 literal carries every byte
    value, the escaped ones included."""
    source = ('"""module doc"""\n# a comment\nclass A:\n    """only a docstring"""\n\n\n'
              'def f(x):\n    """doc"""\n    return x + "\u00b2\u2192"  # tail comment\n\n\nprint(f("a"), A.__doc__)\n').encode()
    packed = tmp_path / "p.py"
    packed.write_bytes(pack_code.pack(source))
    res = subprocess.run([sys.executable, str(packed)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == "a\u00b2\u2192 None\n", res.stderr
    assert not any(text in pack_code.minified(source) for text in (b"comment", b"module doc", b"only a", b'"""'))
    src = tmp_path / "m.py"
    src.write_bytes(source)
    monkeypatch.setattr(pack_code, "minified", lambda s: b"x = (\n")  # an unparse that went wrong
    assert pack_code.main([str(src), "-o", str(tmp_path / "bad.py")]) == 2 and not (tmp_path / "bad.py").exists()
    assert "did not give back the same program" in capsys.readouterr().err
    blob = bytes(range(256)) * 2
    namespace = {}
    exec(compile(b"# -*- coding: latin-1 -*-\nx = '" + pack_code.latin1_literal(blob) + b"'\n", "t", "exec"), namespace)
    assert namespace["x"].encode("latin-1") == blob


def test_split_parts_round_trip_over_several_calls(tmp_path):
    """A folder split into parts, each gathered on its own (as after its own upload: one part folder at a time,
    in any order), comes out byte-identical only once the last part is in."""
    src = tmp_path / "wheels"
    src.mkdir()
    blobs = {f"w{i}.whl": os.urandom(n) for i, n in enumerate((70_000, 5, 130_001))}
    for name, data in blobs.items():
        (src / name).write_bytes(data)
    res = run_script(["scripts/split_parts.py", "split", str(src), str(tmp_path / "parts"), "--max-mib", "0.05"],
                     env=None)
    assert res.returncode == 0, res.stderr
    parts = sorted((tmp_path / "parts").iterdir(), key=lambda d: int(d.name))
    n = len(parts)
    assert n >= 4 and len(res.stdout.splitlines()) == n
    assert all((d / f"part_{d.name}.bin").stat().st_size <= 0.05 * 2**20 for d in parts)
    stash, dest = tmp_path / "stash", tmp_path / "dest"
    for k, d in enumerate(parts[1:] + parts[:1], 1):  # the first part last
        res = run_script(["scripts/split_parts.py", "gather", str(d), str(stash), "--into", str(dest)], env=None)
        assert res.returncode == 0, res.stderr
        if k < n:
            assert res.stdout.strip() == f"parts:{k}/{n}" and not dest.exists()
    assert res.stdout.strip() == f"parts:{n}/{n} unpacked:3 dest:{dest}"
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == blobs


def test_split_parts_refuses_bad_parts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(200_000))
    first, second = split_parts.split(src, tmp_path / "p", 120_000)
    part = second / "part_2.bin"
    part.write_bytes(part.read_bytes()[:-1] + b"x")  # one byte off
    with pytest.raises(split_parts.PartsError, match="does not match its manifest"):
        split_parts.gather(second, tmp_path / "stash", tmp_path / "dest")
    other = split_parts.split(src, tmp_path / "q", 50_000)[0]  # another split of the same files
    split_parts.gather(first, tmp_path / "stash", tmp_path / "dest")
    with pytest.raises(split_parts.PartsError, match="holds parts of another split"):
        split_parts.gather(other, tmp_path / "stash", tmp_path / "dest")
    res = run_script(["scripts/split_parts.py", "split", str(tmp_path / "none"), str(tmp_path / "r")], env=None)
    assert res.returncode == 2 and res.stderr.strip() == f"error: {tmp_path / 'none'}: no files to split"
    assert not (tmp_path / "dest").exists()
    # A folder that holds an earlier split would keep its extra parts beside the new ones: refused, as are a
    # part size under a byte, an output that is a file, a part's name without a number, a manifest of another kind.
    for out, mib, message in ((tmp_path / "p", "0.1", f"{tmp_path / 'p'}: not an empty folder"),
                              (tmp_path / "new", "1e-9", "a part of 0 bytes: expected at least one byte"),
                              (part, "0.1", f"{part}: not an empty folder")):
        res = run_script(["scripts/split_parts.py", "split", str(src), str(out), "--max-mib", mib], env=None)
        assert res.returncode == 2 and res.stderr.strip() == f"error: {message}" + (
            " (remove it or pick another)" if "empty" in message else ""), res.stderr
    (first / "part_1.bin").rename(first / "part_x.bin")
    with pytest.raises(split_parts.PartsError, match="expected one part_K.bin, found 0"):
        split_parts.gather(first, tmp_path / "stash2", tmp_path / "dest")
    (second / "manifest.json").write_text("[]")
    with pytest.raises(split_parts.PartsError, match="not a manifest of this tool"):
        split_parts.gather(second, tmp_path / "stash2", tmp_path / "dest")
    assert not (tmp_path / "new").exists()


def test_every_tool_with_a_shebang_is_executable():
    """The README calls the tools by path (bench/eval_sweep.py ...): one without the executable bit stops with
    'Permission denied'."""
    tools = [p for d in ("bench", "scripts", "data") for p in sorted((ROOT / d).iterdir())
             if p.is_file() and p.read_bytes().startswith(b"#!")]
    assert len(tools) >= 10 and [p.name for p in tools if not os.access(p, os.X_OK)] == []


def test_quickstart_runs_the_default_job_only_on_gpus(tmp_path):
    """With FineWeb shards but no GPU, quickstart.sh takes the tiny smoke run, not the default job (hours on a CPU).
    Run from a copy holding only the script, the shards and an empty requirements file; torchrun is a stub that
    says it was called, and the smoke run then stops at its missing tokenizer script."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: quickstart runs the default job")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "quickstart.sh").write_text((SCRIPTS / "quickstart.sh").read_text())
    (tmp_path / "requirements.txt").write_text("")
    shards = tmp_path / "data" / "datasets" / "fineweb10B_sp8192"
    shards.mkdir(parents=True)
    (shards / "fineweb_val_000000.bin").write_bytes(b"")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "torchrun").write_text("#!/bin/sh\necho torchrun_called\n")
    (tmp_path / "bin" / "torchrun").chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", BENCH_DIR=str(tmp_path / "none"))
    res = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert "torchrun_called" not in res.stdout and "shards found but no GPU" in res.stdout, res.stdout
    assert "training a TINY model on the test corpus" in res.stdout


def test_pack_code_refuses_bad_input_in_one_line(tmp_path, capsys):
    """A source that does not compile and an output it cannot write: one error line, exit 2, no traceback."""
    broken = tmp_path / "broken.py"
    broken.write_text("x = (\n")
    blocker = tmp_path / "file"
    blocker.write_text("")
    good = tmp_path / "good.py"
    good.write_text("x = 1\n")
    for args, message in (([str(broken)], f"error: {broken}: does not compile ('(' was never closed, line 1)"),
                          ([str(good), "-o", str(blocker / "out.py")], f"error: {blocker / 'out.py'}: cannot write (")):
        assert pack_code.main(args) == 2
        assert capsys.readouterr().err.startswith(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.py", "file", "good.py"]
