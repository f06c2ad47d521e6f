"""The speed benchmark runs (tiny, CPU) and prints its fixed line format; bench configs are valid."""
import re

import numpy as np

import train_gpt
from bench import speed
from conftest import ROOT, run_script

TINY = ["DEVICE=cpu", "NUM_LAYERS=3", "MODEL_DIM=64", "NUM_HEADS=4", "NUM_KV_HEADS=2", "TRAIN_BATCH_TOKENS=1024",
        "TRAIN_SEQ_LEN=128", "EVAL_SEQ_LEN=128", "EVAL_STRIDE=64", "VOCAB_SIZE=512", "LOOP_START=0", "LOOP_END=1"]


def test_speed_script_prints_one_line_per_config():
    res = run_script(["bench/speed.py", "--steps", "2", "--warmup", "1", "--eval-tokens", "1024", "--set", *TINY],
                     env=None)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["config:default", "config:default_looped", "config:baseline"]
    for line in lines:
        assert re.fullmatch(r"config:\w+ looped:[01] attention:sdpa ms_step:[\d.]+ ms_step_read:[\d.]+ host_ms:[\d.]+ tok_s:\d+ "
                            r"flops_per_token:\S+ eval_tok_s:\d+", line)
    looped = float(lines[1].split()[7].split(":")[1])
    assert looped > float(lines[0].split()[7].split(":")[1])  # recurrence adds FLOPs per token


def test_speed_script_trains_on_real_shards(tmp_path):
    """--data: the same line from train shards on disk; a folder without shards is a one-line error."""
    rng = np.random.default_rng(0)
    train_gpt.write_shard(tmp_path / "fineweb_train_000000.bin", rng.integers(0, 512, 20000).astype(np.uint16))
    args = ["bench/speed.py", "--configs", "default", "--steps", "2", "--warmup", "1", "--eval-tokens", "1024"]
    res = run_script([*args, "--data", str(tmp_path), "--set", *TINY], env=None)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("config:default looped:0 attention:sdpa ms_step:")
    res = run_script([*args, "--data", str(tmp_path / "missing"), "--set", *TINY], env=None)
    assert res.returncode == 2 and res.stderr.startswith("error: no train shards match")


def test_fusions_script_prints_one_line_per_piece():
    """bench/fusions.py on CPU (a smoke test): each fused piece equals its plain form, no GPU time off
    CUDA; a bad --shape is a one-line error."""
    res = run_script(["bench/fusions.py", "--shape", "2,32,4,2,8", "--reps", "1", "--device", "cpu"], env=None)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["piece:xsa"]
    for line in lines:
        assert re.fullmatch(r"piece:\w+ plain_ms:[\d.]+ fused_ms:[\d.]+ plain_gpu_ms:n/a fused_gpu_ms:n/a "
                            r"plain_kernels:\d+ fused_kernels:\d+ max_abs_diff:\S+", line)
        assert float(line.split("max_abs_diff:")[1]) < 1e-5
    res = run_script(["bench/fusions.py", "--shape", "2,32", "--device", "cpu"], env=None)
    assert res.returncode == 2 and res.stderr.startswith("error: --shape")


def test_bench_configs_are_valid_knobs():
    env = dict(line.split("=", 1) for line in (ROOT / "bench" / "baseline.env").read_text().split())
    hp = train_gpt.Hyperparameters(env)
    assert hp.warnings == [] and hp.num_layers == 9 and hp.num_loops == 0


def test_plain_config_is_the_default_shape_with_the_baseline_features():
    """speed.py's plain config isolates the record techniques' cost: same shape as default, every
    feature as in the baseline."""
    default, plain, baseline = (train_gpt.Hyperparameters(speed.CONFIGS[c][0]) for c in ("default", "plain", "baseline"))
    shape = ("train_batch_tokens", "num_layers", "mlp_mult", "train_seq_len", "model_dim", "vocab_size")
    assert [getattr(plain, k) for k in shape] == [getattr(default, k) for k in shape]
    assert {k: v for k, v in plain.items() if k not in shape} == {k: v for k, v in baseline.items() if k not in shape}
    assert (plain.xsa_last_n, plain.num_loops, plain.skip_gates, plain.mlp_leaky_slope) == (0, 0, 0, 0)


def test_speed_script_rejects_unknown_config():
    res = run_script(["bench/speed.py", "--configs", "nope"], env=None)
    assert res.returncode == 2 and "unknown config 'nope'" in res.stderr


def test_variants_script_exports_revisions_beside_bench(tmp_path):
    import subprocess
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
