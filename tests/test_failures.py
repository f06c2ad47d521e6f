"""Faults that must end a run cleanly: one error line, non-zero exit, nothing half-written."""
import signal
import subprocess
import time

import numpy as np
import pytest

import torch

import train_gpt
from conftest import ROOT, tiny_env
from data.shards import write_shard


def test_sigterm_mid_training_keeps_log_and_writes_no_artifact(tiny_data, tmp_path, launcher):
    """The run's launcher (tests/forkserver.py's client) passes the SIGTERM it is sent on to the run."""
    env = tiny_env(tiny_data, tmp_path, RUN_ID="term", ITERATIONS=100000, TRAIN_LOG_EVERY=1)
    launcher.ready()
    proc = subprocess.Popen([*launcher.argv, "train_gpt.py"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "logs" / "term.txt"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "step:3/" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines() == ["error: stopped by SIGTERM"]
    text = log.read_text()
    assert "step:3/" in text and text.rstrip().endswith("error:stopped by SIGTERM")
    assert not (tmp_path / "art").exists() or not any((tmp_path / "art").iterdir())


def test_nan_loss_stops_with_the_step(tiny_data, tmp_path, launcher):
    res = launcher.run(tiny_env(tiny_data, tmp_path, RUN_ID="nan", MATRIX_LR="1e30", TIED_EMBED_LR="1e30",
                                SCALAR_LR="1e30", GRAD_CLIP_NORM="0"))
    assert res.returncode == 2
    assert res.stderr.startswith("error: train_loss became nan at step") or "became inf" in res.stderr
    assert "error:train_loss became" in (tmp_path / "logs" / "nan.txt").read_text()


def test_artifact_dir_that_is_a_file_fails_before_training(tiny_data, tmp_path, launcher):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = launcher.run(tiny_env(tiny_data, tmp_path, RUN_ID="ro", ARTIFACT_DIR=str(blocker / "sub")))
    assert res.returncode == 2 and res.stderr.startswith(f"error: ARTIFACT_DIR {blocker / 'sub'}: not writable")
    text = (tmp_path / "logs" / "ro.txt").read_text()
    assert "train_loss" not in text and "error:ARTIFACT_DIR" in text


def test_eval_only_missing_or_foreign_artifact(tiny_data, tmp_path, launcher):
    foreign = tmp_path / "model.pt"
    foreign.write_bytes(b"\x80\x04\x95 pickle bytes that must never be unpickled")
    for path, msg in [(tmp_path / "nope.br", "file not found"), (foreign, "bad magic")]:
        res = launcher.run(tiny_env(tiny_data, tmp_path, RUN_ID=f"ev_{path.stem}", EVAL_ONLY=str(path)))
        assert res.returncode == 2 and msg in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_an_error_only_one_rank_meets_reaches_the_log(tiny_data, tmp_path, launcher):
    """A train token out of range in a window that only rank 1 of 2 reads: rank 1 stops with the error and
    torchrun stops rank 0, whose log would say only that it was stopped; rank 1's error line is there too."""
    import shutil
    data, tok = tiny_data
    bad = tmp_path / "data"
    bad.mkdir()
    shutil.copy(data / "fineweb_val_000000.bin", bad)
    files = [str(data / "fineweb_train_000000.bin")]
    stream = train_gpt.TrainStream(files, 64, 1337, 1024)  # TINY_ENV's shape: 16 rows of 64, rows 8-15 rank 1's
    stream.next_batch(16, slice(None))
    (_, start), = stream._places(stream.order[12:13])
    tokens = np.array(train_gpt.open_shard(files[0]))
    tokens[start + 10] = 2000
    write_shard(bad / "fineweb_train_000000.bin", tokens)
    res = launcher.run(tiny_env(tiny_data, tmp_path, RUN_ID="rank1", DATA_PATH=str(bad)), nproc=2)
    assert res.returncode != 0
    errors = [ln for ln in (tmp_path / "logs" / "rank1.txt").read_text().splitlines() if ln.startswith("error:")]
    assert any(ln.startswith("error:rank1:shard ") and "token 2000 at offset 10 >= VOCAB_SIZE=1024" in ln
               for ln in errors), (errors, res.stderr[-3000:])
    # a second run under the taken RUN_ID stops at its log on rank 0; rank 1 adds nothing to the first run's log
    before = (tmp_path / "logs" / "rank1.txt").read_text()
    again = launcher.run(tiny_env(tiny_data, tmp_path, RUN_ID="rank1", DATA_PATH=str(bad)), nproc=2)
    assert again.returncode != 0 and (tmp_path / "logs" / "rank1.txt").read_text() == before


def test_train_token_out_of_vocab_names_the_shard(tmp_path):
    toks = np.arange(3000) % 1000
    toks[1700] = 5000
    write_shard(tmp_path / "fineweb_train_000000.bin", toks)
    stream = train_gpt.TrainStream(train_gpt.shard_files(str(tmp_path), "train"), 64, 0, vocab_size=1024)
    with pytest.raises(train_gpt.UserError, match=r"fineweb_train_000000.bin \(window at token \d+\): token 5000 at offset \d+ >= VOCAB_SIZE=1024"):
        for _ in range(10):
            stream.next_batch(16, slice(None))


# --- bad input: one line on stderr, exit 2 -------------------------------------------------------

@pytest.mark.parametrize("overrides,msg", [
    (dict(DATA_PATH="/nonexistent/dir"), "no val shards match /nonexistent/dir"),
    (dict(ITERATIONS="ten"), "env ITERATIONS='ten': expected int"),
    (dict(MATRIX_LR="nan"), "env MATRIX_LR='nan': expected a finite number"),
    (dict(DEVICE="tpu"), "env DEVICE='tpu': expected one of auto|cuda|cpu"),
    (dict(VOCAB_SIZE="8192"), "vocab 1024 != VOCAB_SIZE=8192"),
    (dict(WORLD_SIZE="3"), "WORLD_SIZE=3: must divide 8"),
    (dict(DEVICE="cuda"), "env DEVICE=cuda: no CUDA device"),
    (dict(WARMDOWN_ITERS="1200"), "env WARMDOWN_ITERS is not supported"),
    (dict(NUM_KV_HEADS="3"), "NUM_KV_HEADS=3: must divide NUM_HEADS=4"),
    (dict(MUON_BACKEND_STEPS="3"), "MUON_BACKEND_STEPS=3: Polar Express needs >= 5"),
    (dict(TRAIN_BATCH_TOKENS="1000"), "TRAIN_BATCH_TOKENS=1000: must be a positive multiple"),
    (dict(TOKENIZER_PATH="/nonexistent/tok.model"), "tokenizer /nonexistent/tok.model: file not found"),
    (dict(TOKENIZER_PATH=__file__), "not a SentencePiece model"),
    (dict(NUM_LAYERS="0"), "env NUM_LAYERS='0': expected a value in [1, 256]"),
    (dict(ENABLE_LOOPING_AT="1.5"), "env ENABLE_LOOPING_AT='1.5': expected a value in [0, 1]"),
    (dict(SLOT="maybe"), "env SLOT='maybe': expected one of off|context|full"),
    (dict(VAL_FILES="/nonexistent/*.bin"), "no val shards match /nonexistent/*.bin"),
])
def test_bad_input(tiny_data, tmp_path, launcher, overrides, msg):
    if overrides.get("DEVICE") == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = launcher.run(tiny_env(tiny_data, tmp_path, **overrides), timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], res.stderr
    assert not (tmp_path / "art").exists() or not any((tmp_path / "art").iterdir())


def test_unknown_knob_warns():
    hp = train_gpt.Hyperparameters({"MUON_MOMENTUN": "0.9", "NUM_LAYERS": "9"})
    assert hp.num_layers == 9 and hp.warnings == ["env MUON_MOMENTUN is set but no knob reads it (typo?)"]
