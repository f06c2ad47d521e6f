"""No wrong number is ever reported as a valid score, and impossible settings are refused before
any compute is spent: one `error:` line, a non-zero exit, nothing already written lost."""
import errno
import os
import re
import signal

import pytest
import torch

import train_gpt
from conftest import parse_log, random_artifact, run_script, tiny_env


def one_error_line(res, *needles):
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("env,msg", [
    (dict(MAX_WALLCLOCK_SECONDS="3", GPTQ_RESERVE_SECONDS="5"), "MAX_WALLCLOCK_SECONDS=3.0: must exceed GPTQ_RESERVE"),
    (dict(ENABLE_LOOPING_AT="1"), "ENABLE_LOOPING_AT=1.0: must be < 1 with NUM_LOOPS=2"),
    (dict(MAX_WALLCLOCK_SECONDS="5", GPTQ_RESERVE_SECONDS="5"), "MAX_WALLCLOCK_SECONDS=5.0: must exceed GPTQ_RESERVE"),
    (dict(EVAL_STRIDE="512", EVAL_SEQ_LEN="128"), "EVAL_STRIDE=512: must be <= EVAL_SEQ_LEN=128"),
    (dict(TTT_CHUNK_TOKENS="100", EVAL_STRIDE="64", TTT_LORA_RANK="0"),
     "TTT_CHUNK_TOKENS=100: must be a multiple of EVAL_STRIDE=64"),
    (dict(SLOT="context"), "SLOT=context: runs on windowed TTT only: set TTT_LORA_RANK=0"),
    (dict(VAL_MAX_TOKENS="100"), "VAL_MAX_TOKENS=100: must exceed TRAIN_SEQ_LEN"),
    (dict(TTT_ENABLED="yes"), "env TTT_ENABLED='yes': expected 0 | 1"),
    (dict(EVAL_SLIDING="maybe"), "env EVAL_SLIDING='maybe': expected auto | 0 | 1"),
    (dict(ADAM_EPS="1e-6"), "env ADAM_EPS is not supported: now the constant"),
    (dict(DOC_ATTENTION="1"), "env DOC_ATTENTION is not supported: removed: FlexAttention's document mask"),
    # decay rates of 1 never move their average (EMA_DECAY=1 exported the initial weights; Adam refused late)
    (dict(EMA_DECAY="1"), "EMA_DECAY=1.0: expected a value in [0, 1)"),
    (dict(BETA1="1"), "BETA1=1.0: expected a value in [0, 1)"),
    (dict(BETA2="1.0"), "BETA2=1.0: expected a value in [0, 1)"),
    (dict(MUON_MOMENTUM="1"), "MUON_MOMENTUM=1.0: expected a value in [0, 1)"),
    (dict(MUON_MOMENTUM_WARMUP_START="1"), "MUON_MOMENTUM_WARMUP_START=1.0: expected a value in [0, 1)"),
    # a path would pass until the artifact's write, after the whole training run
    (dict(RUN_ID="runs/a"), "RUN_ID='runs/a': expected a file name (no '/')"),
    (dict(LQER_FIT="activation", GPTQ_CALIBRATION_BATCHES="0"),
     "LQER_FIT=activation: weighs the error by the GPTQ Hessians: needs GPTQ_CALIBRATION_BATCHES > 0"),
])
def test_cross_knob_rules_are_refused_at_startup(env, msg):
    with pytest.raises(train_gpt.UserError, match=re.escape(msg)):
        train_gpt.Hyperparameters(env)


def test_allowed_edges_and_bool_words():
    hp = train_gpt.Hyperparameters(dict(MAX_WALLCLOCK_SECONDS="0", GPTQ_RESERVE_SECONDS="5", EVAL_STRIDE="0",
                                        TTT_ENABLED="false", EVAL_SLIDING="1", EVAL_COMPILE="auto"))
    assert hp.max_wallclock_seconds == 0 and hp.ttt_enabled is False and hp.eval_sliding is True
    assert hp.eval_compile == train_gpt.AUTO


def test_divergence_hint_names_the_raised_learning_rate():
    assert train_gpt.divergence_lr_hint(train_gpt.Hyperparameters({"TIED_EMBED_LR": "1e30"})) == \
        "lower TIED_EMBED_LR, or set GRAD_CLIP_NORM"
    assert train_gpt.divergence_lr_hint(train_gpt.Hyperparameters({})) == \
        "lower MATRIX_LR or SCALAR_LR or TIED_EMBED_LR, or set GRAD_CLIP_NORM"


def test_a_full_disk_leaves_nothing_behind(tmp_path, monkeypatch):
    def no_space(*_):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train_gpt.os, "link", no_space)
    target = tmp_path / "final_model_x.int6.br"
    with pytest.raises(train_gpt.UserError, match="write failed \\(No space left on device\\); nothing was written"):
        train_gpt.write_atomic(target, b"model bytes", overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_never_overwritten(tmp_path):
    target = tmp_path / "a.br"
    target.write_bytes(b"first")
    with pytest.raises(train_gpt.UserError, match="already exists: it is never overwritten"):
        train_gpt.write_atomic(target, b"second", overwrite=False)
    assert target.read_bytes() == b"first" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("args,rc,out", [(["--help"], 0, "| `TTT_LR` |"), (["-h"], 0, "configured by environment"),
                                         (["--bogus"], 2, "error: unknown argument '--bogus'")])
def test_command_line(args, rc, out, launcher):
    res = launcher.run(dict(os.environ), args=args)
    assert res.returncode == rc and out in res.stdout + res.stderr


def test_startup_refusals_in_a_process(tiny_data, tmp_path, launcher):
    """Each is one error line and exit 2 before any training: a LOG_DIR that cannot be created (under a
    file: root can write anywhere else), WORLD_SIZE without torchrun, a bare run without the tokenizer
    (which says how to download it). The bare run is a `python3 train_gpt.py` of its own, so that what
    the interpreter and the imports print is in its stderr too; the other two are forked runs
    (tests/forkserver.py), each its own process with its own environment, output and exit status."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [(dict(LOG_DIR=str(blocker / "logs")), ("env LOG_DIR: cannot create log",)),
             (dict(WORLD_SIZE="2"), ("WORLD_SIZE=2 without RANK", "torchrun"))]
    for overrides, needles in cases:
        one_error_line(launcher.run(tiny_env(tiny_data, tmp_path, **overrides), timeout=120), *needles)
    bare = tiny_env(tiny_data, tmp_path, TOKENIZER_PATH=str(tmp_path / "none.model"))
    one_error_line(run_script(["train_gpt.py"], bare, timeout=120), "file not found", "--repo-id kevclark/parameter-golf")
    assert not (tmp_path / "art").exists() or not any((tmp_path / "art").iterdir())


def test_a_cap_the_measured_gptq_reserve_fills_is_refused_before_training(tiny_data, tmp_path, launcher):
    """The Hessians' reserve, measured first (200 calibration batches: ~5 s here, past the 1-s slack), leaves
    MAX_WALLCLOCK_SECONDS=3 no training time: one error line naming both knobs to change, before any compile or
    step, no artifact."""
    env = tiny_env(tiny_data, tmp_path, RUN_ID="tight", MAX_WALLCLOCK_SECONDS="3", ITERATIONS="100000",
                   GPTQ_CALIBRATION_BATCHES="200")
    one_error_line(launcher.run(env, timeout=120), "MAX_WALLCLOCK_SECONDS=3.0: leaves no training time after the "
                   "Hessians' reserve", "measured calibration_batch:", "raise it or lower GPTQ_CALIBRATION_BATCHES")
    log = (tmp_path / "logs" / "tight.txt").read_text()
    assert "\nerror:MAX_WALLCLOCK_SECONDS=3.0: leaves no training time" in log
    assert not re.search(r"^(step|warmup|eval_prime)", log, re.M)
    assert not (tmp_path / "art").exists() or not any((tmp_path / "art").iterdir())


def test_diverged_ttt_is_not_a_score(tiny_data, tmp_path, launcher):
    """TTT_LR=1e12 without clipping turns TTT's scores to NaN: the phase is logged valid:0, no final score
    is reported, and the run exits 2 naming the phase and the knob to lower."""
    env = tiny_env(tiny_data, tmp_path, RUN_ID="div", TTT_ENABLED=1, TTT_LR="1e12", TTT_GRAD_CLIP=0, EVAL_SLIDING=0)
    res = launcher.run(env)
    one_error_line(res, "phase ttt scored val_bpb nan", "lower TTT_LR")
    text = (tmp_path / "logs" / "div.txt").read_text()
    assert [line for line in text.splitlines() if line.startswith("ttt ")][0].split()[-2] == "valid:0"
    assert "final_val_bpb" not in text and "error:phase ttt" in text


def doctored(artifact, tmp_path, name, **changes):
    """A copy of the artifact whose recorded config has `changes` (tensors untouched)."""
    qstate, meta = train_gpt.unpack_artifact(artifact.read_bytes())
    for key, value in changes.items():
        if key == "vocab_size":
            meta["model"]["vocab_size"] = value
        else:
            meta[key] = value
    path = tmp_path / name
    path.write_bytes(train_gpt.pack_artifact(qstate, meta))
    return path


def test_records_tokenizer_and_never_reuses_a_run_id(tiny_data, tmp_path, launcher):
    """One run, then what must be refused around its artifact: the same RUN_ID into the same ARTIFACT_DIR
    (even with another LOG_DIR), EVAL_ONLY with a tokenizer the artifact was not trained with, or of another
    vocab. EVAL_ONLY of the artifact itself needs no model knobs (its vocab comes from the artifact). A knob
    typo is warned first and again in the final block; a partial val set is never a valid score."""
    env = tiny_env(tiny_data, tmp_path, RUN_ID="rec", TTT_ENABLED=0, EVAL_STRIDE=0, TTT_LRR="1")
    assert launcher.run(env).returncode == 0
    log = (tmp_path / "logs" / "rec.txt").read_text().splitlines()
    warning = "warning:env TTT_LRR is set but no knob reads it (typo?)"
    assert log[0] == warning and log[-1] == warning
    sha = train_gpt.file_sha256(tiny_data[1])
    assert any(line.startswith(f"tokenizer:{tiny_data[1]} tokenizer_sha256:{sha}") for line in log)
    summary = parse_log(tmp_path / "logs" / "rec.txt")
    assert summary["final_valid"] == "0" and summary["final_phase"] == "roundtrip"
    assert all(line.split()[-2] == "valid:0" for line in log if line.startswith("roundtrip "))
    artifact = tmp_path / "art" / "final_model_rec.int6.br"
    before = artifact.read_bytes()
    _, meta = train_gpt.unpack_artifact(before)
    assert meta["tokenizer_sha256"] == sha and meta["model"]["vocab_size"] == 1024

    again = launcher.run(env | dict(LOG_DIR=str(tmp_path / "other_logs")), timeout=120)
    one_error_line(again, f"artifact {artifact} already exists")
    assert artifact.read_bytes() == before and "train_loss" not in (tmp_path / "other_logs" / "rec.txt").read_text()
    taken = tmp_path / "taken.pt"  # a PREQUANT_SAVE file is never overwritten either, refused before training
    taken.write_bytes(b"x")
    again = launcher.run(env | dict(RUN_ID="rec2", PREQUANT_SAVE=str(taken)), timeout=120)
    one_error_line(again, f"env PREQUANT_SAVE={taken}: the file exists")
    assert taken.read_bytes() == b"x" and "train_loss" not in (tmp_path / "logs" / "rec2.txt").read_text()

    evaluate = {k: v for k, v in env.items() if k not in ("VOCAB_SIZE", "TTT_LRR")} | dict(EVAL_ONLY=str(artifact))
    ok = launcher.run(evaluate | dict(RUN_ID="ev_ok", NUM_LAYERS="5"), timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert parse_log(tmp_path / "logs" / "ev_ok.txt")["final_val_bpb"] == summary["final_val_bpb"]
    dumped = launcher.run(evaluate | dict(RUN_ID="ev_dump", DUMP_TOKEN_NLL=str(taken)), timeout=120)  # nor a dump
    one_error_line(dumped, f"env DUMP_TOKEN_NLL={taken}: the file exists")
    assert taken.read_bytes() == b"x"
    # a model knob cannot change a trained artifact: it is named in a warning, not silently dropped
    lines = (tmp_path / "logs" / "ev_ok.txt").read_text().splitlines()
    assert "warning:env NUM_LAYERS=5 ignored: EVAL_ONLY scores the artifact's NUM_LAYERS=4" in lines
    # nor can a training or export knob: one line names those set
    unread = sorted(k for k in evaluate if k in train_gpt.EVAL_ONLY_UNREAD)
    assert "ITERATIONS" in unread and "VAL_MAX_TOKENS" not in train_gpt.EVAL_ONLY_UNREAD
    assert [ln.split()[1] for ln in lines if ln.startswith("warning:env_ignored_by_eval_only ")] == \
        [f"knobs:{','.join(unread)}"]
    other_tok = doctored(artifact, tmp_path, "other_tok.br", tokenizer_sha256="0" * 64)
    one_error_line(launcher.run(evaluate | dict(RUN_ID="ev_tok", EVAL_ONLY=str(other_tok)), timeout=120),
                   "trained with tokenizer sha256 0000000000000000", "TOKENIZER_PATH")
    other_vocab = doctored(artifact, tmp_path, "other_vocab.br", vocab_size=8192)
    one_error_line(launcher.run(evaluate | dict(RUN_ID="ev_voc", EVAL_ONLY=str(other_vocab)), timeout=120),
                   "vocab 1024 != the vocab of artifact", "other_vocab.br=8192")


def test_a_loaded_compile_cache_that_lacked_graphs_says_so(tmp_path, monkeypatch):
    """A run that loaded COMPILE_CACHE keeps the file; where it still had to compile graphs (the code changed
    since the file was written), a warning says to renew it, else nothing does."""
    cache = tmp_path / "compile.bin"
    cache.write_bytes(b"x")
    for misses, warned in ((0, False), (1, True)):
        counts = dict(fxgraph_hits=3, fxgraph_misses=misses, aot_hits=2, aot_misses=misses, aot_bypasses=0)
        monkeypatch.setattr(train_gpt, "compile_cache_counts", lambda: counts)
        lines = []
        train_gpt.save_compile_cache(str(cache), True, lines.append)
        assert lines[0].startswith("compile_cache:kept ") and f" fxgraph_misses:{misses} " in lines[0], lines
        assert [line.split()[0] for line in lines[1:]] == (["warning:compile_cache_incomplete"] if warned else []), lines
        assert cache.read_bytes() == b"x"


def test_a_run_stopped_by_a_signal_keeps_what_it_compiled(tmp_path, monkeypatch):
    """COMPILE_CACHE: a run that a signal stops (a time limit's SIGTERM) writes the graphs compiled so far, so the
    next run starts from them; its log still ends in the stop. One that loaded the file keeps it as it was."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # fresh: the graph is compiled here

    def compiles_then_stops(*args):
        torch.compile(lambda x: x * 3 + 1)(torch.ones(8))
        raise train_gpt.Interrupted(signal.SIGTERM)
    monkeypatch.setattr(train_gpt, "score_only", compiles_then_stops)
    cache = tmp_path / "cc" / "compile.bin"
    for run in ("stopped", "loaded"):
        hp = train_gpt.Hyperparameters(dict(DEVICE="cpu", EVAL_ONLY=str(tmp_path / "unread.br"), RUN_ID=run,
                                            COMPILE_CACHE=str(cache), LOG_DIR=str(tmp_path / "logs")))
        before = cache.read_bytes() if cache.exists() else None
        with pytest.raises(train_gpt.Interrupted):
            train_gpt.run(hp)
        lines = (tmp_path / "logs" / f"{run}.txt").read_text().splitlines()
        assert lines[-1] == "error:stopped by SIGTERM", lines[-3:]
        caches = [line.split()[0] for line in lines if line.startswith("compile_cache:")]
        if before is None:
            assert caches == ["compile_cache:saved"] and cache.stat().st_size > 0, caches
        else:
            assert caches == ["compile_cache:loaded"] and cache.read_bytes() == before, caches


def test_compile_cache_lets_a_fresh_machine_compile_from_the_file(tiny_data, tmp_path, launcher):
    """COMPILE_CACHE: a run writes torch.compile's caches to the file; a run whose inductor cache folder is empty
    (a fresh machine) loads it, builds its graphs from it (FX graph cache hits, no misses) and keeps the file as
    it was. A file that is no cache, or a folder that cannot take one, is refused before any compute."""
    env = tiny_env(tiny_data, tmp_path, TTT_ENABLED=0, EVAL_STRIDE=0, NUM_LAYERS=1, XSA_LAST_N=1,
                   NUM_LOOPS=0, PARALLEL_RESIDUAL_START=-1, SMEAR_GATE=0, ATTN_GATE=0, ASYM_LOGIT=0,
                   SKIP_GATES=0)  # less to compile
    cache = tmp_path / "cc" / "compile.bin"
    scored = env | dict(EVAL_ONLY=str(random_artifact(env, tmp_path / "art" / "random.br")), EVAL_COMPILE="1",
                        COMPILE_CACHE=str(cache))
    for run in ("first", "second"):
        res = launcher.run(scored | dict(RUN_ID=run, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor_{run}")))
        assert res.returncode == 0, res.stderr[-2000:]
    first, second = ([line for line in (tmp_path / "logs" / f"{run}.txt").read_text().splitlines()
                      if line.startswith("compile_cache:")] for run in ("first", "second"))
    assert len(first) == 1 and first[0].startswith("compile_cache:saved") and " fxgraph_hits:0 " in first[0], first
    assert [line.split()[0] for line in second] == ["compile_cache:loaded", "compile_cache:kept"], second
    assert " fxgraph_misses:0 " in second[1] and " fxgraph_hits:0 " not in second[1], second
    assert f"bytes:{cache.stat().st_size} " in first[0] and f"bytes:{cache.stat().st_size} " in second[1]  # kept
    cache.write_bytes(b"not a cache")
    one_error_line(launcher.run(scored | dict(RUN_ID="bad")), f"env COMPILE_CACHE={cache}: not a torch.compile cache")
    blocked = tmp_path / "file"
    blocked.write_text("")
    one_error_line(launcher.run(scored | dict(RUN_ID="bad2", COMPILE_CACHE=str(blocked / "compile.bin"))),
                   "COMPILE_CACHE's folder")
