"""The speed benchmark runs (tiny, CPU) and prints its fixed line format; bench configs are valid."""
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import torch

import train_gpt
from conftest import ROOT, parse_log, random_artifact, run_script, tiny_env
from data.shards import write_shard

TINY = ["DEVICE=cpu", "NUM_LAYERS=3", "MODEL_DIM=64", "NUM_HEADS=4", "NUM_KV_HEADS=2", "TRAIN_BATCH_TOKENS=1024",
        "TRAIN_SEQ_LEN=128", "EVAL_SEQ_LEN=128", "EVAL_STRIDE=64", "VOCAB_SIZE=512", "LOOP_START=0", "LOOP_END=1"]


def bench_script(launcher, script: str, *args: str):
    """`python3 bench/SCRIPT args` (as a forked process of tests/forkserver.py: no torch import of its own)
    on one torch thread, as the tiny runs (tiny_env): these shapes are too small for a second one."""
    return launcher.run(dict(os.environ, OMP_NUM_THREADS="1"), f"bench/{script}", args)


def test_speed_script_prints_one_line_per_config(launcher):
    res = bench_script(launcher, "speed.py", "--steps", "2", "--warmup", "1", "--eval-tokens", "1024", "--set", *TINY)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["config:default", "config:default_looped", "config:baseline"]
    for line in lines:
        assert re.fullmatch(r"config:\w+ looped:[01] attention:sdpa ms_step:[\d.]+ ms_step_read:[\d.]+ host_ms:[\d.]+ tok_s:\d+ "
                            r"flops_per_token:\S+ warmup_s:[\d.]+ eval_tok_s:\d+", line)  # CUDA adds mfu ... before eval_tok_s
    looped = float(lines[1].split()[7].split(":")[1])
    assert looped > float(lines[0].split()[7].split(":")[1])  # recurrence adds FLOPs per token


def test_speed_script_trains_on_real_shards(tmp_path, launcher):
    """--data: the same line from train shards on disk; a folder without shards is a one-line error."""
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "fineweb_train_000000.bin", rng.integers(0, 512, 20000))
    args = ["--configs", "default", "--steps", "2", "--warmup", "1", "--eval-tokens", "1024"]
    res = bench_script(launcher, "speed.py", *args, "--data", str(tmp_path), "--set", *TINY)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("config:default looped:0 attention:sdpa ms_step:")
    res = bench_script(launcher, "speed.py", *args, "--data", str(tmp_path / "missing"), "--set", *TINY)
    assert res.returncode == 2 and res.stderr.startswith("error: no train shards match")


def test_fusions_script_prints_one_line_per_piece(launcher):
    """bench/fusions.py on CPU (a smoke test): each fused piece equals its plain form, no GPU time off
    CUDA; a bad --shape is a one-line error."""
    res = bench_script(launcher, "fusions.py", "--shape", "2,32,4,2,8", "--reps", "1", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["piece:xsa"]
    for line in lines:
        assert re.fullmatch(r"piece:\w+ plain_ms:[\d.]+ fused_ms:[\d.]+ plain_gpu_ms:n/a fused_gpu_ms:n/a "
                            r"plain_kernels:\d+ fused_kernels:\d+ max_abs_diff:\S+", line)
        assert float(line.split("max_abs_diff:")[1]) < 1e-5
    res = bench_script(launcher, "fusions.py", "--shape", "2,32", "--device", "cpu")
    assert res.returncode == 2 and res.stderr.startswith("error: --shape")


def test_bench_configs_are_valid_knobs():
    env = dict(line.split("=", 1) for line in (ROOT / "bench" / "baseline.env").read_text().split())
    hp = train_gpt.Hyperparameters(env)
    assert hp.warnings == [] and hp.num_layers == 9 and hp.num_loops == 0
    env = dict(line.split("=", 1) for line in (ROOT / "bench" / "candidate.env").read_text().split())
    hp = train_gpt.Hyperparameters(env)
    assert hp.warnings == [] and len(hp.explicit) == len(env)  # every line a knob, none a default
    assert all(str(getattr(hp, k.lower())) != str(next(kn.default for kn in train_gpt.KNOBS if kn.name == k))
               for k in env)


def test_protocol_candidate_is_the_default_plus_its_env_and_overrides_win(tmp_path):
    """bench/protocol.sh candidate: the default's batch, every line of bench/candidate.env, then the
    command line's VAR=value (an ablation switches one lever back off). torchrun is a stub printing its env."""
    val = tmp_path / "data" / "datasets" / "bench_sp8192" / "fineweb_val_000000.bin"
    val.parent.mkdir(parents=True)
    val.touch()  # present: the protocol builds no shards
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "torchrun").write_text("#!/bin/sh\nenv\n")
    (tmp_path / "bin" / "torchrun").chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", BENCH_DATA=str(tmp_path / "data"))
    lever = dict(line.split("=", 1) for line in (ROOT / "bench" / "candidate.env").read_text().split())
    first = next(iter(lever))
    off = "1" if lever[first] != "1" else "2"  # the command line's value for the file's first lever
    res = subprocess.run(["bash", "bench/protocol.sh", "candidate", f"{first}={off}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    seen = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    assert seen["TRAIN_BATCH_TOKENS"] == "98304" and seen["MAX_WALLCLOCK_SECONDS"] == "240"
    assert {k: seen[k] for k in lever} == lever | {first: off}
    assert "VAL_FILES" not in seen and "VAL_MAX_TOKENS" not in seen
    assert "warning: knobs from the environment" not in res.stderr
    # A knob exported in the shell reaches the run: the protocol says which; not the ones it or the command
    # line sets (the run gets those as set there).
    res = subprocess.run(["bash", "bench/protocol.sh", "default", "QK_GAIN_INIT=4"], cwd=ROOT, capture_output=True,
                         env=env | dict(NUM_LAYERS="5", SEED="7", QK_GAIN_INIT="9"), text=True, timeout=60)
    assert res.returncode == 0 and "NUM_LAYERS=5" in res.stdout and "SEED=1337" in res.stdout, res.stderr
    assert "QK_GAIN_INIT=4" in res.stdout.splitlines()
    assert res.stderr.strip() == "warning: knobs from the environment reach this protocol run: NUM_LAYERS=5"
    # No knob list (the script cannot start): an error, not a silent run.
    res = subprocess.run(["bash", "bench/protocol.sh", "default"], cwd=ROOT, env=env | dict(SCRIPT="missing.py"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip().endswith("error: missing.py --help-env failed"), res.stderr
    # EVAL_SHARE=1: one GPU's share of FineWeb val, read from the bench train shard
    res = subprocess.run(["bash", "bench/protocol.sh", "default", "EVAL_ONLY=a.br"], cwd=ROOT, env=env | dict(EVAL_SHARE="1"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    seen = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    assert seen["VAL_FILES"] == str(val.parent / "fineweb_train_000000.bin") and seen["VAL_MAX_TOKENS"] == "5070000"
    assert seen["EVAL_ONLY"] == "a.br"
    res = subprocess.run(["bash", "bench/protocol.sh", "default"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=env | dict(EVAL_SHARE="1", BENCH_VARIANT="caseops"))
    assert res.returncode == 2 and res.stderr.strip() == "error: EVAL_SHARE=1 needs the plain bench data (BENCH_VARIANT=plain)"


def test_plain_config_is_the_default_shape_with_the_baseline_features():
    """speed.py's plain config isolates the record techniques' cost: same shape as default, every
    feature as in the baseline. (The one test that reads a bench module: the configs are not printed.)"""
    from bench import speed
    default, plain, baseline = (train_gpt.Hyperparameters(speed.CONFIGS[c][0]) for c in ("default", "plain", "baseline"))
    shape = ("train_batch_tokens", "num_layers", "mlp_mult", "train_seq_len", "model_dim", "vocab_size")
    assert [getattr(plain, k) for k in shape] == [getattr(default, k) for k in shape]
    assert {k: v for k, v in plain.items() if k not in shape} == {k: v for k, v in baseline.items() if k not in shape}
    assert (plain.xsa_last_n, plain.num_loops, plain.skip_gates, plain.mlp_leaky_slope) == (0, 0, 0, 0)


def test_bench_scripts_reject_bad_arguments_before_any_work(launcher):
    """An unknown config after a good one is refused before the good one runs (minutes on a GPU); a count of
    0 steps or reps (a division by it) and a --set entry without '=' are argparse errors, not tracebacks."""
    res = bench_script(launcher, "speed.py", "--configs", "default,nope", "--steps", "1", "--set", *TINY)
    assert res.returncode == 2 and res.stdout == "" and "unknown config 'nope'" in res.stderr
    for script, args, message in (("speed.py", ["--steps", "0"], "expected a positive integer, got '0'"),
                                  ("speed.py", ["--set", "DEVICE"], "expected KEY=VALUE, got 'DEVICE'"),
                                  ("profile_step.py", ["--set", "DEVICE"], "expected KEY=VALUE, got 'DEVICE'"),
                                  ("fusions.py", ["--reps", "0"], "expected a positive integer, got '0'"),
                                  ("profile_eval.py", ["--phase", "slot"], "invalid choice: 'slot'"),
                                  ("profile_eval.py", [], "error: env EVAL_ONLY: expected the path of an artifact")):
        res = bench_script(launcher, script, *args)
        assert res.returncode == 2 and "Traceback" not in res.stderr and message in res.stderr, (script, res.stderr)


def test_variants_script_exports_revisions_beside_bench(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    res = subprocess.run(["bash", "bench/variants.sh", "HEAD"], cwd=clone, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = clone / ".variants" / "HEAD"
    assert (out / "train_gpt.py").read_bytes() == (clone / "train_gpt.py").read_bytes()
    assert (out / "bench" / "speed.py").is_file()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert status == ""  # .variants is git-ignored
    res = subprocess.run(["bash", "bench/variants.sh", "HEAD", "no-such-rev"], cwd=clone, capture_output=True, text=True)
    assert res.returncode == 2 and "no-such-rev: not a git revision" in res.stderr


def scaled_log(src: Path, dst: Path, world_size: int, ms_factor: float, loss_shift: float) -> Path:
    """A copy of a real log as if run on world_size GPUs: step times times ms_factor, losses + loss_shift."""
    def edit(line: str) -> str:
        if m := re.match(r"(step:\d+/\d+ train_loss:)(\S+)( .*step_avg:)([\d.]+)(ms.*)", line):
            return f"{m[1]}{float(m[2]) + loss_shift:.4f}{m[3]}{float(m[4]) * ms_factor:.2f}{m[5]}"
        return line.replace("world_size:1", f"world_size:{world_size}")
    dst.write_text("\n".join(edit(line) for line in src.read_text().splitlines()) + "\n")
    return dst


def test_compare_runs_reads_scaling_and_curve_agreement(tmp_path):
    """bench/compare_runs.py on a real log (tests/fixtures) and a copy as if from 2 GPUs that each ran
    10% below the 1-GPU rate, its losses 0.01 off: efficiency 0.9, curve difference 0.01."""
    ref = Path(__file__).parent / "fixtures" / "baseline_shape_log.txt"
    (tmp_path / "gpus2").mkdir()  # the same file name as the reference's: runs are told apart by position
    run = scaled_log(ref, tmp_path / "gpus2" / ref.name, world_size=2, ms_factor=0.5 / 0.9, loss_shift=0.01)
    res = run_script(["bench/compare_runs.py", str(run), str(ref), "--steps", "200"], env=None)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("run:baseline_shape_log world_size:2 ") and lines[1].startswith("run:baseline_shape_log world_size:1 ")
    assert "eval_s_roundtrip:" in lines[1] and "final_val_bpb:" in lines[1]
    assert lines[2] == "differs:none"
    assert lines[3] == "curve steps:7 max_abs_diff:0.0100 mean_abs_diff:0.0100"  # steps 1-5, 100, 200
    assert re.fullmatch(r"scaling world_size:2/1 efficiency:0\.9\d\d", lines[4])
    assert abs(float(lines[4].split("efficiency:")[1]) - 0.9) < 0.002  # step times are logged to 0.01 ms
    # Another seed, run id, code and val set: the settings, code and data facts are named, the run id is not.
    other = tmp_path / "other.txt"
    other.write_text(ref.read_text().replace("  seed: 1337", "  seed: 7").replace("  run_id: ", "  run_id: x")
                     .replace("code_sha256:aaf4c62d90b632bd", "code_sha256:0123")
                     .replace(" val_tokens:1054657", " val_tokens:100 val_bytes:300 val_byte_source:sidecar"))
    res = run_script(["bench/compare_runs.py", str(other), str(ref)], env=None)
    assert res.returncode == 0 and res.stdout.splitlines()[2] == (
        "differs:seed=7|1337 code_sha256=0123|aaf4c62d90b632bd val_tokens=100|1054657 val_bytes=300|None "
        "val_byte_source=sidecar|None"), res.stdout
    no_eval = tmp_path / "no_eval.txt"  # a run cut before its eval: no eval fields, single spaces still
    no_eval.write_text("".join(line for line in ref.read_text().splitlines(True) if "eval_time:" not in line))
    res = run_script(["bench/compare_runs.py", str(no_eval), str(ref)], env=None)
    assert res.returncode == 0 and re.fullmatch(r"run:no_eval( \S+)+", res.stdout.splitlines()[0]), res.stdout


def test_compare_runs_shows_a_diverged_curve_and_a_failed_run(tmp_path):
    """A NaN train loss makes the curve's max difference nan, wherever it falls (max() kept or dropped it by its
    place), and a log that ends in an error shows no score."""
    ref = Path(__file__).parent / "fixtures" / "baseline_shape_log.txt"
    lines = ref.read_text().splitlines()
    last = max(i for i, ln in enumerate(lines) if re.match(r"step:\d+/\d+ train_loss:", ln)
               and int(ln.split("/")[0].removeprefix("step:")) <= 200)
    lines[last] = re.sub(r"train_loss:\S+", "train_loss:nan", lines[last])
    lines.append("error:stopped by SIGTERM")
    run = tmp_path / "diverged.txt"
    run.write_text("\n".join(lines) + "\n")
    res = run_script(["bench/compare_runs.py", str(run), str(ref), "--steps", "200"], env=None)
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert out[0].endswith("final_val_bpb:failed final_valid:0") and out[1].endswith(" final_valid:1"), out
    assert re.match(r"curve steps:7 max_abs_diff:nan ", out[3]), out


def test_compare_runs_rejects_logs_it_cannot_compare(tmp_path):
    ref = Path(__file__).parent / "fixtures" / "baseline_shape_log.txt"
    other = tmp_path / "other.txt"
    other.write_text(ref.read_text().replace("train_batch_tokens: 65536", "train_batch_tokens: 131072"))
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "world.txt").write_text(ref.read_text().replace("world_size:1", "world_size:x"))
    for args, message in ([other, ref], "train_batch_tokens differ (131072 vs 65536)"), \
                         ([tmp_path / "missing.txt", ref], "missing.txt: cannot read the log"), \
                         ([tmp_path / "notes.txt", ref], "notes.txt: no train_batch_tokens or step lines"), \
                         ([tmp_path / "world.txt", ref], "world.txt: world_size:x is not a count of GPUs"):
        res = run_script(["bench/compare_runs.py", *map(str, args)], env=None)
        assert res.returncode == 2 and res.stderr.startswith("error:") and message in res.stderr, res.stderr


def test_scaling_script_runs_two_ranks_against_one(tiny_data, tmp_path, launcher):
    """bench/scaling.sh 2 end to end on CPU (two gloo ranks, then one process accumulating the same
    batch), on the tiny shards laid out where bench/protocol.sh looks for its built ones: each run writes
    one log and one artifact, and the two loss curves agree. The torchrun on PATH is tests/bin/torchrun:
    the ranks are forked by tests/forkserver.py (test_train's two-process test runs the real one)."""
    data, tok = tiny_data
    bench_data = tmp_path / "benchdata"
    (bench_data / "datasets").mkdir(parents=True)
    (bench_data / "tokenizers").mkdir()
    (bench_data / "datasets" / "bench_sp8192").symlink_to(data)
    (bench_data / "tokenizers" / "bench_8192_bpe.model").symlink_to(tok)
    env = tiny_env(tiny_data, tmp_path) | dict(BENCH_DATA=str(bench_data), SCALING_OUT=str(tmp_path / "out"))
    launcher.ready()
    env |= dict(PATH=f"{ROOT / 'tests' / 'bin'}{os.pathsep}{env['PATH']}", FORKSERVER_SOCKET=str(launcher.socket))
    res = subprocess.run(["bash", "bench/scaling.sh", "2", "VOCAB_SIZE=1024", "TRAIN_BATCH_TOKENS=1024",
                          "MICRO_BATCH_TOKENS=512", "ITERATIONS=6", "TRAIN_LOG_EVERY=1",
                          "CLIP_SEARCH_STEPS=0", "TTT_ENABLED=0", "EVAL_STRIDE=0"],  # cheaper, and beside the point here
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    for world in (2, 1):
        assert f"files_written gpus:{world} final_model_scaling_gpus{world}.int6.br scaling_gpus{world}.txt" in lines
    curve = next(line for line in lines if line.startswith("curve "))
    assert curve.startswith("curve steps:6 ") and float(curve.split("max_abs_diff:")[1].split()[0]) < 1e-3
    assert lines[-1].startswith("scaling world_size:2/1 efficiency:")


def test_scaling_script_rejects_a_gpu_count_that_does_not_divide_8():
    res = subprocess.run(["bash", "bench/scaling.sh", "3"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip() == "error: N=3: expected 2, 4 or 8 GPUs"


def test_eval_sweep_scores_one_artifact_under_several_settings(tiny_data, tmp_path, launcher):
    """bench/eval_sweep.py: one EVAL_ONLY run per variant in one process, each with its own log and line;
    the variants' knobs are checked before any runs; a bad variant is a one-line error. With PREQUANT (the
    training run's PREQUANT_SAVE), each variant re-exports the trained weights under the run's export knobs as it
    changes them: none changed (none repeated either) gives the run's artifact byte for byte, AWQ-lite another,
    scored from the file; taken outputs are refused before any export."""
    pre = tmp_path / "pre" / "art.pt"
    env = tiny_env(tiny_data, tmp_path, RUN_ID="art", TTT_ENABLED=0, PREQUANT_SAVE=pre, MODEL_DIM=128)  # GPTQ'd embedding
    assert launcher.run(env).returncode == 0
    assert f"prequant_saved:{pre}" in (tmp_path / "logs" / "art.txt").read_text()
    env = {k: v for k, v in env.items() if k not in ("PREQUANT_SAVE", "CLIP_SEARCH_STEPS")}  # 0 in the file
    sweep = env | dict(RUN_ID="sw", EVAL_ONLY=str(tmp_path / "art" / "final_model_art.int6.br"))
    res = launcher.run(sweep, "bench/eval_sweep.py", ["plain", "ttt TTT_ENABLED=1 EVAL_SLIDING=0"])
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("variant:")]  # among the runs' log lines
    assert [line.split()[:2] for line in lines] == [["variant:plain", "final_phase:sliding"],
                                                     ["variant:ttt", "final_phase:ttt"]]
    for line, name in zip(lines, ("plain", "ttt")):
        log = tmp_path / "logs" / f"sw_{name}.txt"
        assert line.endswith(f"log:{log}") and parse_log(log)["final_val_bpb"] in line
        assert f"final_valid:{parse_log(log)['final_valid']} " in line  # 0 here: TINY_ENV scores a val prefix
    res = launcher.run(sweep, "bench/eval_sweep.py", ["new", "ttt"])  # sw_ttt's log is taken: nothing runs
    assert res.returncode == 2 and "already exists" in res.stderr and not (tmp_path / "logs" / "sw_new.txt").exists()
    res = launcher.run(sweep | dict(RUN_ID="bad"), "bench/eval_sweep.py", ["ok", "broken TTT_LR=x"])
    assert res.returncode == 2 and res.stderr.startswith("error: env TTT_LR='x'")
    assert not (tmp_path / "logs" / "bad_ok.txt").exists()  # nothing ran
    res = launcher.run(sweep, "bench/eval_sweep.py", ["two words=1=2 x"])
    assert res.returncode == 2 and res.stderr.startswith("error: variant 'two words=1=2 x'")
    for spec, message in (("low ttt_enabled=0", "ttt_enabled is not a knob (TTT_ENABLED?)"),
                          ("typo TTT_LORA_DOC=4", "TTT_LORA_DOC is not a knob (TTT_LORA_DOCS?)"),
                          ("other SLIDING=0", "SLIDING is not a knob (EVAL_SLIDING?)")):  # they ran as the base, under this name
        res = launcher.run(sweep | dict(RUN_ID="bad"), "bench/eval_sweep.py", ["ok", spec])
        assert res.returncode == 2 and res.stderr.strip() == f"error: variant {spec!r}: {message}", res.stderr
    redo = env | dict(RUN_ID="re", PREQUANT=str(pre), ARTIFACT_DIR=str(tmp_path / "re"))
    res = launcher.run(redo, "bench/eval_sweep.py", ["same", "awq AWQ_GROUPS=1"])
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("variant:")]
    assert [line.split()[0] for line in lines] == ["variant:same", "variant:awq"]
    same, awq = (tmp_path / "re" / f"final_model_re_{n}.int6.br" for n in ("same", "awq"))
    assert same.read_bytes() == (tmp_path / "art" / "final_model_art.int6.br").read_bytes()
    assert any("awq.cols" in e for e in train_gpt.unpack_artifact(awq.read_bytes())[0].values())
    code_bytes = int(re.search(r" code_bytes:(\d+)", (tmp_path / "logs" / "art.txt").read_text())[1])
    for line, path in zip(lines, (same, awq)):
        assert f" artifact_bytes:{path.stat().st_size + code_bytes} " in line, line
        assert parse_log(tmp_path / "logs" / f"re_{line.split()[0].split(':')[1]}.txt")["final_val_bpb"] in line
    res = launcher.run(redo | dict(EVAL_ONLY=str(same)), "bench/eval_sweep.py", ["x"])
    assert res.returncode == 2 and res.stderr.startswith("error: set one of env EVAL_ONLY")
    res = launcher.run(redo | dict(PREQUANT=str(same)), "bench/eval_sweep.py", ["x"])
    assert res.returncode == 2 and res.stderr.startswith(f"error: {same}: not a PREQUANT_SAVE file")
    partial = tmp_path / "partial.pt"
    torch.save({"state": {}, "model": {}}, partial)
    res = launcher.run(redo | dict(PREQUANT=str(partial)), "bench/eval_sweep.py", ["x"])
    assert res.returncode == 2 and "not a PREQUANT_SAVE file (ValueError: no hessians, train_seq_len" in res.stderr
    res = launcher.run(redo, "bench/eval_sweep.py", ["fresh AWQ_GROUPS=2", "same"])
    assert res.returncode == 2 and res.stderr.strip() == f"error: artifact {same} already exists: it is never " \
        "overwritten (choose another RUN_ID or ARTIFACT_DIR)" and not (tmp_path / "re" / "final_model_re_fresh.int6.br").exists()


def test_artifact_bytes_script_reports_fields_and_both_coders(tmp_path, launcher):
    """bench/artifact_bytes.py: a line per large field (brotli alone, entropy, coded by rANS or not), then the
    artifact repacked by each coder, the rANS one as train_gpt writes it; not an artifact is a one-line error."""
    torch.manual_seed(0)
    q = train_gpt.quantize_state({"qo_bank": torch.randn(4, 256, 256), "g": torch.randn(8)}, None, 2, 6, 12.85, 8, 20)
    path = tmp_path / "a.br"
    path.write_bytes(train_gpt.pack_artifact(q, {"x": 1}))
    res = launcher.run(dict(os.environ), "bench/artifact_bytes.py", [str(path)])
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert lines[0] == f"artifact:{path} bytes:{path.stat().st_size}"
    assert [line.split()[0] for line in lines[1:]] == ["field:qo_bank.q", "coder:brotli", "coder:rans"]
    assert " numel:262144 " in lines[1] and lines[1].endswith(" rans:1")
    brotli_bytes, rans_bytes = (int(re.search(r"model_bytes:(\d+)", line)[1]) for line in lines[2:])
    assert rans_bytes == path.stat().st_size < brotli_bytes
    path.write_bytes(b"not an artifact")
    res = launcher.run(dict(os.environ), "bench/artifact_bytes.py", [str(path)])
    assert res.returncode == 2 and res.stderr.strip() == f"error: {path}: not a parameter-golf artifact (bad magic)"


def test_eval_profile_reports_the_phases_it_was_asked_for(tiny_data, tmp_path, launcher):
    """bench/profile_eval.py scores an artifact as EVAL_ONLY does (its log as usual) and profiles the phases named,
    after the priming: one summary line per phase, its kernel (here op) classes and its top ops, shares of its busy
    time; a phase not named runs unprofiled."""
    art = random_artifact(tiny_env(tiny_data, tmp_path), tmp_path / "random.br")
    env = tiny_env(tiny_data, tmp_path, RUN_ID="prof", EVAL_ONLY=art, EVAL_SLIDING=0, VAL_MAX_TOKENS=1024)
    res = launcher.run(env, "bench/profile_eval.py", ["--phase", "ttt", "--top", "4"])
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("profile ")]
    head = re.fullmatch(r"profile phase:ttt wall_s:([\d.]+) busy_s:([\d.]+) calls:(\d+)", lines[0])
    assert head and float(head[2]) > 0 and int(head[3]) > 0, lines
    classes = [line for line in lines if line.startswith("profile class:")]
    tops = lines[1 + len(classes):]
    assert len(tops) == 4 and sum(float(line.split("%")[0].split()[1]) for line in tops) <= 100.5, lines
    assert {line.split()[1].split(":")[1] for line in classes} >= {"gemm", "attention"}, classes
    assert not any("phase:roundtrip" in line for line in lines)  # run, unprofiled
    text = (tmp_path / "logs" / "prof.txt").read_text()
    assert "roundtrip val_loss:" in text and "ttt val_loss:" in text
