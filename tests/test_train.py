"""Data loading, distributed equivalence, the end-to-end run and its artifact, and bad input."""
import math
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt
from conftest import parse_log, run_script, tiny_env
from data.shards import write_shard

VOCAB = 65536  # the streams' vocab where a test's token ids are all in range (uint16 shards)


# --- shards and the train stream -------------------------------------------------------------

def test_shard_roundtrip(tmp_path):
    toks = np.random.default_rng(0).integers(0, 65535, size=1000).astype(np.uint16)
    write_shard(tmp_path / "s.bin", toks)
    assert (tmp_path / "s.bin").stat().st_size == 1024 + 2000
    assert np.array_equal(train_gpt.open_shard(tmp_path / "s.bin"), toks)


@pytest.mark.parametrize("corrupt,msg", [
    (lambda b: b[:100], "shorter than"),
    (lambda b: b"\x00\x00\x00\x00" + b[4:], "bad magic"),
    (lambda b: b[:4] + (2).to_bytes(4, "little") + b[8:], "unsupported version 2"),
    (lambda b: b[:-2], "size 2022 != 1024"),
])
def test_shard_header_errors(tmp_path, corrupt, msg):
    good = tmp_path / "good.bin"
    write_shard(good, np.arange(500, dtype=np.uint16))
    bad = tmp_path / "fineweb_val_000000.bin"
    bad.write_bytes(corrupt(good.read_bytes()))
    with pytest.raises(train_gpt.UserError, match=msg) as e:
        train_gpt.open_shard(bad)
    assert str(bad) in str(e.value)


def test_token_out_of_vocab(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 5, 9, 2000, 3], dtype=np.uint16))
    with pytest.raises(train_gpt.UserError, match="token 2000 at offset 3 >= VOCAB_SIZE=1024"):
        train_gpt.load_val_tokens(train_gpt.shard_files(str(tmp_path), "val"), 1024, 0)


def test_stream_deterministic_and_rank_sliced(tmp_path):
    for i in range(2):
        write_shard(tmp_path / f"fineweb_train_00000{i}.bin", np.arange(i * 5000, i * 5000 + 4000) % 60000)
    files = train_gpt.shard_files(str(tmp_path), "train")
    a, b, c = (train_gpt.TrainStream(files, 32, seed, VOCAB) for seed in (7, 7, 8))
    batches_a = [a.next_batch(16, slice(None)) for _ in range(40)]  # > 1 epoch (248 windows)
    assert all(np.array_equal(x, b.next_batch(16, slice(None))) for x in batches_a)
    assert not np.array_equal(batches_a[0], c.next_batch(16, slice(None)))
    # windows are contiguous token runs of one shard
    assert all((np.diff(w) == 1).all() for bt in batches_a for w in bt)
    # rank r of a 4-way world gets exactly rows [4r, 4r+4) of the global batch
    d = train_gpt.TrainStream(files, 32, 7, VOCAB)
    ranks = [train_gpt.TrainStream(files, 32, 7, VOCAB).next_batch(16, slice(4 * r, 4 * r + 4)) for r in range(4)]
    assert np.array_equal(np.concatenate(ranks), d.next_batch(16, slice(None)))


def test_stream_epochs_are_permutations_of_their_own_windows(tmp_path):
    """A batch that spans two epochs reads each window in its own epoch's layout: the stream is exactly each
    epoch's permutation of that epoch's windows, one after another. (Mapping the old epoch's ids through the
    new epoch's phases read shifted windows, and an id past the new epoch's count raised IndexError.)"""
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(200) % 1000)
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(300, 390) % 1000)
    files = train_gpt.shard_files(str(tmp_path), "train")
    tokens = [np.asarray(train_gpt.open_shard(f), dtype=np.int64) for f in files]
    for seed in range(40):
        stream, layout = train_gpt.TrainStream(files, 16, seed, VOCAB), train_gpt.TrainStream(files, 16, seed, VOCAB)
        expected = []
        while len(expected) < 60:
            layout._new_epoch()
            for w in layout.order:  # window w of this epoch: shard s, from its phase on
                s = int(np.searchsorted(layout.offsets, w, side="right")) - 1
                a = layout.phase[s] + (w - layout.offsets[s]) * 16
                expected.append(tokens[s][a:a + 17])
        got = np.concatenate([stream.next_batch(5, slice(None)) for _ in range(12)])
        assert np.array_equal(got, np.stack(expected[:60])), seed


def test_stream_without_a_whole_window_is_an_error(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"fineweb_train_00000{i}.bin", np.arange(32))
    with pytest.raises(train_gpt.UserError, match="none holds a window of 33 tokens"):
        train_gpt.TrainStream(train_gpt.shard_files(str(tmp_path), "train"), 32, 0, VOCAB)


def test_every_schedule_length_is_checked_before_the_clock(tmp_path):
    """A TRAIN_SEQ_SCHEDULE length that no train shard holds a window of is an error when the streams are made
    (before the clock, warm-up or not), not at the switch to it, late in the training budget."""
    for i in range(30):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.arange(100) % 50)
    hp = train_gpt.Hyperparameters(dict(DEVICE="cpu", NUM_LAYERS="1", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1",
                                        VOCAB_SIZE="64", TRAIN_SEQ_LEN="128", TRAIN_SEQ_SCHEDULE="16@0.5", NUM_LOOPS="0",
                                        TRAIN_BATCH_TOKENS="128", WARMUP_STEPS="0", DATA_PATH=str(tmp_path)))
    trainer = train_gpt.Trainer(hp, train_gpt.setup_distributed(hp), train_gpt.GPT(hp.model_config()))
    with pytest.raises(train_gpt.UserError, match="none holds a window of 129 tokens"):
        trainer.reset_stream(train_gpt.shard_files(str(tmp_path), "train"))


def test_only_the_whole_val_split_is_a_valid_score(tmp_path):
    """VAL_MAX_TOKENS (a prefix) or VAL_FILES naming anything but DATA_PATH's val shards (a subset, a train shard)
    scores something else: such a run logs full_val:0 and final_valid:0."""
    for name in ("fineweb_val_000000.bin", "fineweb_val_000001.bin", "fineweb_train_000000.bin"):
        write_shard(tmp_path / name, np.arange(100))
    def whole(**env):
        return train_gpt.scores_whole_val(train_gpt.Hyperparameters(dict(DATA_PATH=str(tmp_path), **env)))
    assert whole() and whole(VAL_FILES=str(tmp_path / "fineweb_val_*.bin"))
    assert not whole(VAL_MAX_TOKENS="5000")
    assert not whole(VAL_FILES=str(tmp_path / "fineweb_val_000001.bin"))
    assert not whole(VAL_FILES=str(tmp_path / "fineweb_train_000000.bin"))


def test_plan_batches():
    hp = train_gpt.Hyperparameters(dict(TRAIN_BATCH_TOKENS="786432", TRAIN_SEQ_LEN="2048"))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert train_gpt.plan_batches(hp, 8, cuda) == (48, 1)
    assert train_gpt.plan_batches(hp, 1, cuda) == (48, 8)  # 1 GPU: same global batch, 8 micro-batches
    small = train_gpt.Hyperparameters(dict(TRAIN_BATCH_TOKENS="65536", TRAIN_SEQ_LEN="1024"))
    assert train_gpt.plan_batches(small, 1, cuda) == (64, 1)  # not chopped into 8 tiny micro-batches
    with pytest.raises(train_gpt.UserError, match="TRAIN_BATCH_TOKENS=1000"):
        train_gpt.plan_batches(train_gpt.Hyperparameters(dict(TRAIN_BATCH_TOKENS="1000")), 1, cpu)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_pending_scalar_reads_the_value_it_was_given(device):
    """The loss read one step late: later in-place work on the tensor (queued after it) does not show."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    t = torch.tensor(2.5, device=device)
    pending = train_gpt.PendingScalar(t)
    t.mul_(4)
    assert pending.read() == 2.5 and t.item() == 10.0


def test_lr_schedule():
    assert train_gpt.lr_multiplier(0.0, 0.5, 0.0) == 1.0
    assert train_gpt.lr_multiplier(0.5, 0.5, 0.0) == 1.0
    assert math.isclose(train_gpt.lr_multiplier(0.75, 0.5, 0.0), 0.5)
    assert train_gpt.lr_multiplier(1.0, 0.5, 0.1) == 0.1


# --- progressive context (TRAIN_SEQ_SCHEDULE) ----------------------------------------------------

def test_seq_schedule_shapes_and_errors():
    hp = train_gpt.Hyperparameters(dict(TRAIN_SEQ_SCHEDULE="1024@0.1, 2048@0.7", TRAIN_SEQ_LEN="3072",
                                        TRAIN_BATCH_TOKENS="98304"))
    schedule = train_gpt.seq_schedule(hp)
    assert schedule == [(1024, 0.1), (2048, 0.7), (3072, math.inf)]
    assert [train_gpt.seq_len_at(schedule, p) for p in (0.0, 0.0999, 0.1, 0.69, 0.7, 1.0, 1.5)] == \
        [1024, 1024, 2048, 2048, 3072, 3072, 3072]
    # looping turns on at 0.35, inside the 2048 stretch: both of its shapes, the others one each
    assert train_gpt.train_shapes(hp) == [(1024, False), (2048, False), (2048, True), (3072, True)]
    flat = train_gpt.Hyperparameters(dict(NUM_LOOPS="0", TRAIN_SEQ_SCHEDULE="1024@0.5"))
    assert train_gpt.train_shapes(flat) == [(1024, False), (2048, False)]
    assert train_gpt.train_shapes(train_gpt.Hyperparameters({})) == [(2048, False), (2048, True)]
    for bad in ("1024", "1024@0", "1024@1", "2048@0.5,1024@0.5", "4@0.1", "1024@0.1.2", "x@0.5",
                "1024@0.2,1024@0.5", "2048@0.5",  # a length twice in a row (2048 is TRAIN_SEQ_LEN)
                "8@0.1,16@0.2,24@0.3,32@0.34,40@0.5,48@0.6,56@0.7"):  # 9 shapes: past the recompile limit
        with pytest.raises(train_gpt.UserError, match="TRAIN_SEQ_SCHEDULE"):
            train_gpt.Hyperparameters(dict(TRAIN_SEQ_SCHEDULE=bad))
    with pytest.raises(train_gpt.UserError, match="length 1000 of TRAIN_SEQ_SCHEDULE"):
        train_gpt.plan_batches(train_gpt.Hyperparameters(dict(TRAIN_SEQ_SCHEDULE="1000@0.5")), 1,
                               torch.device("cpu"), 1000)


def test_seq_schedule_trains_each_length_in_turn_and_rewarms_the_lr(tiny_data, monkeypatch):
    """Warm-up visits every shape (even with fewer WARMUP_STEPS), training switches length where the schedule
    says (same tokens per step), and each switch restarts the LR from 1/SEQ_REWARM_STEPS of its value."""
    data, _ = tiny_data
    hp = train_gpt.Hyperparameters(dict(DEVICE="cpu", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2",
                                        NUM_KV_HEADS="1", VOCAB_SIZE="1024", TRAIN_SEQ_LEN="32",
                                        TRAIN_SEQ_SCHEDULE="8@0.25,16@0.5", TRAIN_BATCH_TOKENS="128",
                                        ITERATIONS="8", WARMUP_STEPS="2", VAL_LOSS_EVERY="0", EMA_DECAY="0",
                                        NUM_LOOPS="0", MAX_WALLCLOCK_SECONDS="0", DATA_PATH=str(data)))
    dctx = train_gpt.setup_distributed(hp)
    trainer = train_gpt.Trainer(hp, dctx, train_gpt.GPT(hp.model_config()))
    shapes, lrs = [], []
    real_forward, real_step = trainer.forward, trainer.step
    monkeypatch.setattr(trainer, "forward",
                        lambda x, y, looped: shapes.append(tuple(x.shape)) or real_forward(x, y, looped))
    monkeypatch.setattr(trainer, "step", lambda k, lr, L, looped: lrs.append(lr) or real_step(k, lr, L, looped))

    class NoVal:
        def quick(self, model, seq_len, looped):
            return 0.0, 0.0
    lines = []
    result = train_gpt.train(hp, dctx, trainer, train_gpt.shard_files(str(data), "train"), NoVal(), 0.0, lines.append)
    assert result["steps"] == 8
    assert shapes == [(16, 8), (8, 16), (4, 32)] + [(16, 8)] * 2 + [(8, 16)] * 2 + [(4, 32)] * 4
    assert [ln for ln in lines if ln.startswith("seq_len:")] == ["seq_len:16 step:2 progress:0.250",
                                                                 "seq_len:32 step:4 progress:0.500"]
    # start-up is logged per shape: the first step of each (its compile on a GPU), in the order warm-up meets them
    timed = [re.fullmatch(r"warmup_shape seq_len:(\d+) looped:0 time:[\d.]+s", ln) for ln in lines
             if ln.startswith("warmup_shape")]
    assert [int(m[1]) for m in timed] == [8, 16, 32]
    base = [train_gpt.lr_multiplier(k / 8, hp.warmdown_frac, hp.min_lr) for k in range(8)]
    since_switch = [None, None, 1, 2, 1, 2, 3, 4]  # steps into the current length, counting this one
    assert lrs[3:] == pytest.approx([b * (1 if r is None else r / train_gpt.SEQ_REWARM_STEPS)
                                     for b, r in zip(base, since_switch)])


@pytest.mark.parametrize("batches,warmup,calls", [(16, 2, 1), (0, 2, 0), (16, 0, 0)])
def test_warm_up_compiles_the_calibration_forward_before_the_clock(tiny_data, batches, warmup, calls):
    """Where training compiles, warm-up also runs one calibration micro-batch through Trainer.matrix_inputs: with a
    fixed GPTQ_RESERVE_SECONDS nothing else compiles it before the Hessians, whose time is the budget's. Not without
    Hessians, and not where warm-up is off (WARMUP_STEPS=0 compiles on the clock)."""
    data, _ = tiny_data
    hp = train_gpt.Hyperparameters(dict(DEVICE="cpu", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2",
                                        NUM_KV_HEADS="1", VOCAB_SIZE="1024", TRAIN_SEQ_LEN="32", NUM_LOOPS="0",
                                        TRAIN_BATCH_TOKENS="128", WARMUP_STEPS=str(warmup), EMA_DECAY="0",
                                        GPTQ_CALIBRATION_BATCHES=str(batches), GPTQ_RESERVE_SECONDS="6",
                                        DATA_PATH=str(data)))
    trainer = train_gpt.Trainer(hp, train_gpt.setup_distributed(hp), train_gpt.GPT(hp.model_config()))
    trainer.compiled, seen = True, []  # as on a GPU: the calibration forward is a compiled graph
    trainer.matrix_inputs = lambda model, x: seen.append(tuple(x.shape)) or train_gpt.matrix_inputs(model, x)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    train_gpt.prime_compile(trainer, hp, train_gpt.shard_files(str(data), "train"), lambda line: None)
    assert seen == [(4, 32)] * calls  # one micro-batch of training's plan
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_iterations_that_end_before_the_clock_still_run_the_whole_schedule(tiny_data, monkeypatch):
    """With both limits set and ITERATIONS reached long before the clock, the schedule follows the steps: the loop
    turns on at ENABLE_LOOPING_AT of them and the LR warms down (the clock's share alone left both untouched). A
    loop that training ends before is never switched on at the end, and the log warns of it."""
    data, _ = tiny_data
    knobs = dict(DEVICE="cpu", NUM_LAYERS="3", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", VOCAB_SIZE="1024",
                 TRAIN_SEQ_LEN="32", LOOP_START="1", LOOP_END="1", PARALLEL_RESIDUAL_START="2", ROPE_DIMS="8",
                 XSA_LAST_N="3", TRAIN_BATCH_TOKENS="128", ITERATIONS="10", WARMUP_STEPS="0", VAL_LOSS_EVERY="2",
                 EMA_DECAY="0", MAX_WALLCLOCK_SECONDS="600", DATA_PATH=str(data))
    hp = train_gpt.Hyperparameters(knobs)
    dctx = train_gpt.setup_distributed(hp)
    trainer = train_gpt.Trainer(hp, dctx, train_gpt.GPT(hp.model_config()))
    lrs, real_step = [], trainer.step
    monkeypatch.setattr(trainer, "step",
                        lambda k, lr, L, looped: lrs.append((lr, looped)) or real_step(k, lr, L, looped))

    class Checks:  # the layer order each check scores
        orders = []

        def quick(self, model, seq_len, looped):
            self.orders.append(looped)
            return 0.0, 0.0
    lines, checks = [], Checks()
    files = train_gpt.shard_files(str(data), "train")
    cap_ms = train_gpt.train_clock_cap(hp, dctx, trainer, files).ms
    result = train_gpt.train(hp, dctx, trainer, files, checks, cap_ms, lines.append)
    assert result["steps"] == 10 and result["stop_reason"] == "iterations"
    assert "layer_loop:enabled step:4 progress:0.400" in lines
    assert [looped for _, looped in lrs] == [False] * 4 + [True] * 6
    # VAL_LOSS_EVERY=2: the check at step 2 scores the plain order being trained, those from step 4 on the loop
    assert checks.orders == [False, True, True, True, True]
    assert lrs[-1][0] == pytest.approx(train_gpt.lr_multiplier(0.9, hp.warmdown_frac, hp.min_lr))
    late = train_gpt.Hyperparameters(knobs | dict(ENABLE_LOOPING_AT="0.95"))  # reached only as training ends
    lines.clear()
    train_gpt.train(late, dctx, trainer, files, checks, cap_ms, lines.append)
    assert not any(line.startswith("layer_loop:enabled") for line in lines) and checks.orders[-1]
    assert [line.split()[0] for line in lines if line.startswith("warning:")] == ["warning:loop_never_trained"]


@pytest.mark.parametrize("slow_from", [0, 30, 300])
def test_training_ends_inside_its_cap_when_the_steps_slow_down(slow_from):
    """The loop as a GPU runs it: the clock is read after step k-1 while step k runs. For step times of 10 ms that
    become 120 ms (looping) and any cap but one right behind the change (no clock foresees the first slow step),
    the steps it queues end inside the cap, and at most 2 steps before it."""
    ends = np.cumsum([10.0 if k < slow_from else 120.0 for k in range(2000)])  # end of step k+1, ms
    for cap in np.arange(500.0, 3000.0, 7.0):
        if 10 * slow_from <= cap < 10 * slow_from + 3 * 120:
            continue
        step, read_ms = 1, 0.0
        while True:
            clock = ends[step - 2] if step > 1 else 0.0  # the last read: step-1 steps done
            if train_gpt.past_cap(clock, read_ms, step, cap):
                break
            read_ms, step = clock, step + 1
        assert cap - 3 * 120 < ends[step - 1] <= cap, (cap, step)  # step `step` was in flight: its end is the last
    assert not train_gpt.past_cap(1e9, 0.0, 5, 0.0)  # no cap


# --- distributed: N gloo processes (Parallel Muon) == 1 process with accumulation --------------

@pytest.mark.parametrize("nproc", [2, 4])
def test_parallel_muon_matches_single_process(tiny_data, tmp_path, launcher, nproc):
    """3 layers: banks of 6 and 3 matrices, so 4 ranks exercise the padded shards too. The ranks are
    gloo processes with torchrun's variables (tests/forkserver.py: no torch import per rank)."""
    env = tiny_env(tiny_data, tmp_path, ITERATIONS=3, NUM_LAYERS=3, PARALLEL_RESIDUAL_START=2,
                   MICRO_BATCH_TOKENS=1024 // nproc, EMA_DECAY="0.9", GRAD_CLIP_NORM="0.05")
    one = launcher.run(env, "tests/dist_worker.py", [str(tmp_path / "one.pt")])
    assert one.returncode == 0, one.stderr
    many = launcher.run(env, "tests/dist_worker.py", [str(tmp_path / "many.pt")], nproc=nproc)
    assert many.returncode == 0, many.stderr
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "many.pt")
    assert (a["accum"], b["accum"]) == (nproc, 1)
    assert np.allclose(a["losses"], b["losses"], rtol=0, atol=1e-5), (a["losses"], b["losses"])
    for k in a["state"]:
        assert torch.allclose(a["state"][k], b["state"][k], atol=1e-5), k
    assert a["clipped"] and b["clipped"]  # the clip was active, so the global-norm path is tested


# --- end to end ---------------------------------------------------------------------------------

def test_end_to_end_run(tiny_data, tmp_path, launcher):
    env = tiny_env(tiny_data, tmp_path, RUN_ID="e2e", VAL_LOSS_EVERY=3, TTT_LORA_PHASE_TOKENS=1024)
    del env["CLIP_SEARCH_STEPS"], env["TTT_EPOCHS"], env["TTT_LORA_RANK"]  # this run keeps their defaults: the clip search runs
    res = launcher.run(env)
    assert res.returncode == 0, res.stderr
    log = tmp_path / "logs" / "e2e.txt"
    text = log.read_text()
    for key in ("hyperparameters:", "train_shards:1", "model_params:", "step:6/6 train_loss:", "gptq_hessians:",
                "step:3/6 val_loss:", "layer_loop:enabled", "roundtrip val_loss:", "ttt_lora rank:80 ",
                "global_chunks:4 ", "ttt_chunk:3/4 ", " new_graphs:0\n", "ttt val_loss:"):
        assert key in text, key
    summary = parse_log(log)
    artifact = tmp_path / "art" / "final_model_e2e.int6.br"
    assert artifact.exists() and int(summary["model_bytes"]) == artifact.stat().st_size
    assert int(summary["artifact_bytes"]) == artifact.stat().st_size + (train_gpt.Path(train_gpt.__file__).stat().st_size)
    assert int(summary["artifact_bytes"]) <= train_gpt.ARTIFACT_LIMIT_BYTES
    assert 0 < float(summary["final_val_bpb"]) < 12 and summary["steps"] == "6"
    assert summary["final_valid"] == "0" and summary["invalid_reasons"] == "val_subset"  # TINY_ENV's VAL_MAX_TOKENS
    # compile and warm-up happen before the clock and are reported, not hidden
    warmup = [line for line in log.read_text().splitlines() if line.startswith("warmup_done time:")]
    assert len(warmup) == 1
    secs = float(warmup[0].split()[1].removeprefix("time:").removesuffix("s"))
    assert float(summary["warmup_seconds"]) == pytest.approx(secs, abs=0.06)
    assert abs(float(summary["quant_gap_bpb"])) < 0.05
    # A second launch with the same RUN_ID must not overwrite the first log.
    again = launcher.run(env)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert log.read_text() == text
    # EVAL_ONLY on the artifact reproduces the training run's score exactly, training nothing.
    ev = launcher.run(env | dict(RUN_ID="e2e_eval", EVAL_ONLY=str(artifact), TRAIN_SEQ_LEN="32"))
    assert ev.returncode == 0, ev.stderr
    ev_summary = parse_log(tmp_path / "logs" / "e2e_eval.txt")
    for key in ("final_val_bpb", "final_val_loss", "artifact_bytes"):
        assert ev_summary[key] == summary[key], key
    assert "train_loss" not in (tmp_path / "logs" / "e2e_eval.txt").read_text()
    # A corrupted artifact is a one-line error, and nothing from the file is executed.
    bad = tmp_path / "bad.br"
    bad.write_bytes(artifact.read_bytes()[:-100])
    ev = launcher.run(env | dict(RUN_ID="e2e_bad", EVAL_ONLY=str(bad)))
    assert ev.returncode == 2 and ev.stderr.strip() == \
        f"error: {bad}: corrupted or truncated artifact (its size or checksum does not match)"


def test_reloaded_artifact_scores_like_in_memory_quantized_model(tiny_data, tmp_path):
    """Wide enough that the matrices and the embedding are quantized (TINY_ENV's all pass through as fp16)."""
    data, tok = tiny_data
    from conftest import TINY_ENV
    hp = train_gpt.Hyperparameters(TINY_ENV | dict(MODEL_DIM="128", MLP_MULT="4"))
    cfg = hp.model_config()
    torch.manual_seed(0)
    model = train_gpt.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sp = train_gpt.load_tokenizer(str(tok), 1024)
    tokens = train_gpt.load_val_tokens(train_gpt.shard_files(str(data), "val"), 1024, 4096)
    val = train_gpt.ValSet.from_lut(tokens, train_gpt.build_byte_lut(sp, 1024))
    qstate = train_gpt.quantize_state(model.state_dict(), None, cfg.num_layers, 6, 12.85, 8, 20.0)
    kinds = {name: entry["kind"] for name, entry in qstate.items()}
    assert {kinds[k] for k in ("qo_bank", "mlp_up_bank", "mlp_down_bank")} == {"int6_rows"}, kinds
    assert kinds["tok_emb.weight"] != "fp16", kinds
    in_memory = train_gpt.GPT(cfg)
    in_memory.load_state_dict(train_gpt.dequantize_state(qstate))
    path = tmp_path / "a.br"
    meta = dict(model=train_gpt.dataclasses.asdict(cfg), train_seq_len=64)
    train_gpt.write_atomic(path, train_gpt.pack_artifact(qstate, meta))
    qstate_back, meta_back = train_gpt.read_artifact(path)
    reloaded = train_gpt.artifact_model(qstate_back, meta_back, path, torch.device("cpu"), train_gpt.causal_attention)
    assert meta_back == meta
    dctx = train_gpt.Dist()
    phase = train_gpt.Phase("roundtrip", 64, 64)
    a = train_gpt.eval_tokens(in_memory, val, dctx, hp, phase).totals()
    b = train_gpt.eval_tokens(reloaded, val, dctx, hp, phase).totals()
    assert a == b
    for k, v in in_memory.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k


def test_eval_only_of_an_artifact_over_the_cap_is_not_valid(tiny_data, tmp_path):
    """EVAL_ONLY scores any artifact it is given, but one whose bytes with the code's pass the cap is never a
    valid score (a training run would have refused to write it)."""
    data, tok = tiny_data
    from conftest import TINY_ENV
    cfg = train_gpt.Hyperparameters(TINY_ENV).model_config()
    torch.manual_seed(0)
    qstate = train_gpt.quantize_state(train_gpt.GPT(cfg).state_dict(), None, cfg.num_layers, 6, 12.85, 8, 20.0)
    path = tmp_path / "a.br"
    train_gpt.write_atomic(path, train_gpt.pack_artifact(qstate, dict(model=train_gpt.dataclasses.asdict(cfg),
                                                                     train_seq_len=64, train_data_in_budget=1)))
    hp = train_gpt.Hyperparameters(TINY_ENV | dict(EVAL_ONLY=str(path), DATA_PATH=str(data), TOKENIZER_PATH=str(tok),
                                                   VAL_MAX_TOKENS="0", TTT_ENABLED="0", DEVICE="cpu"))
    fits_code = bytes(1000)
    over_code = bytes(train_gpt.ARTIFACT_LIMIT_BYTES - path.stat().st_size + 1)
    for code, valid in ((fits_code, 1), (over_code, 0)):  # an artifact that records no code: this file counted
        lines = []
        summary = train_gpt.score_only(hp, train_gpt.Dist(), lines.append, code)
        assert summary["final_valid"] == valid and summary["code_bytes"] == len(code)
        assert summary["invalid_reasons"] == ("none" if valid else "artifact_over_limit")
        assert any(ln.startswith("warning:artifact_over_limit") for ln in lines) == (not valid)
        phase_lines = [ln for ln in lines if " val_bpb:" in ln and " valid:" in ln]
        assert phase_lines and all(f" valid:{valid} " in ln for ln in phase_lines), phase_lines
    # One that records the code that wrote it counts that code (a packed file's), whatever file scores it now.
    for written_by, valid in ((1000, 1), (len(over_code), 0)):
        train_gpt.write_atomic(path, train_gpt.pack_artifact(qstate, dict(
            model=train_gpt.dataclasses.asdict(cfg), train_seq_len=64, code_bytes=written_by, train_data_in_budget=1)))
        lines = []
        summary = train_gpt.score_only(hp, train_gpt.Dist(), lines.append, fits_code if valid == 0 else over_code)
        assert summary["final_valid"] == valid and summary["code_bytes"] == written_by
        assert summary["artifact_bytes"] == path.stat().st_size + written_by
    # One that does not record whether its training kept the budget (older artifacts) is no valid score.
    train_gpt.write_atomic(path, train_gpt.pack_artifact(qstate, dict(
        model=train_gpt.dataclasses.asdict(cfg), train_seq_len=64, code_bytes=1000)))
    lines = []
    summary = train_gpt.score_only(hp, train_gpt.Dist(), lines.append, fits_code)
    assert summary["final_valid"] == 0 and summary["invalid_reasons"] == "training_budget_unrecorded"
    for recorded in ([1], 2):  # nor one that records something else
        train_gpt.write_atomic(path, train_gpt.pack_artifact(qstate, dict(
            model=train_gpt.dataclasses.asdict(cfg), train_seq_len=64, code_bytes=1000, train_data_in_budget=recorded)))
        summary = train_gpt.score_only(hp, train_gpt.Dist(), lines.append, fits_code)
        assert summary["invalid_reasons"] == "training_budget_unrecorded"
    assert "warning:artifact_records_no_training_budget (written before artifacts did): final_valid:0" in lines
    # One without a usable train_seq_len (the roundtrip's window): one error, not a traceback mid-eval.
    for seq_len in ({}, dict(train_seq_len="64"), dict(train_seq_len=0)):
        train_gpt.write_atomic(path, train_gpt.pack_artifact(qstate, dict(
            model=train_gpt.dataclasses.asdict(cfg), code_bytes=1000, train_data_in_budget=1) | seq_len))
        with pytest.raises(train_gpt.UserError, match=re.escape(f"artifact {path}: its config has no positive integer "
                                                                "train_seq_len")):
            train_gpt.score_only(hp, train_gpt.Dist(), [].append, fits_code)


def test_artifact_corruption_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    qstate = train_gpt.quantize_state({"qo_bank": torch.randn(4, 300, 300), "g": torch.randn(8)}, None, 2, 6, 12.85, 8, 20)
    blob = train_gpt.pack_artifact(qstate, {"x": 1})
    back, cfg = train_gpt.unpack_artifact(blob)
    assert cfg == {"x": 1} and back["qo_bank"]["kind"] == "int6_rows"
    assert torch.equal(back["qo_bank"]["q"], qstate["qo_bank"]["q"])
    assert torch.equal(back["qo_bank"]["scale"], qstate["qo_bank"]["scale"])
    assert torch.equal(back["g"]["w"], qstate["g"]["w"])
    for bad, msg in [(b"PK\x03\x04" + blob[4:], "bad magic"), (blob[:len(blob) // 2], "corrupted or truncated"),
                     (blob[:8] + (9).to_bytes(4, "little") + blob[12:], "version 9"),
                     (blob[:-1] + bytes([blob[-1] ^ 0xFF]), "corrupted or truncated")]:
        with pytest.raises(train_gpt.UserError, match=msg):
            train_gpt.unpack_artifact(bad)


def test_over_budget_artifact_is_an_error_and_kept_aside(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_gpt, "ARTIFACT_LIMIT_BYTES", 50_000)
    env = tiny_env(tiny_data, tmp_path, RUN_ID="big", ITERATIONS=2)
    with pytest.raises(train_gpt.UserError, match=r"artifact \d+ bytes \(model \d+ \+ code \d+\) > limit 50000: "
                                                   r"raise MATRIX_CLIP_SIGMAS"):
        train_gpt.run(train_gpt.Hyperparameters(env))
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["final_model_big.OVER_LIMIT_NOT_VALID.br"]
    log = (tmp_path / "logs" / "big.txt").read_text()
    assert "error:artifact" in log
    assert re.search(r"^prequant val_loss:[\d.]+ val_bpb:[\d.]+$", log, re.M)  # the model is still scored


def test_help_env_lists_every_knob(launcher):
    res = launcher.run(dict(os.environ), args=["--help-env"])
    assert res.returncode == 0
    assert all(f"`{k.name}`" in res.stdout for k in train_gpt.KNOBS)


def test_readme_env_reference_is_current():
    readme = (train_gpt.Path(train_gpt.__file__).parent / "README.md").read_text()
    table = readme.split("<!-- knobs:start -->\n")[1].split("\n<!-- knobs:end -->")[0]
    assert table == train_gpt.knob_reference(), "regenerate with: python3 train_gpt.py --help-env"


def test_results_index_lists_every_study():
    """README's layout says every results/ study is in results/README.md's table: one per folder, none missing."""
    results = train_gpt.Path(train_gpt.__file__).parent / "results"
    index = (results / "README.md").read_text()
    folders = sorted(p.name for p in results.iterdir() if p.is_dir())
    assert folders and [name for name in folders if f"| `{name}/` |" not in index] == []


def test_two_process_run_matches_one_process(tiny_data, tmp_path, launcher):
    """The whole pipeline under torchrun (train loop and its shared clock, Hessians, GPTQ, eval and TTT
    split across ranks, rank-0-only files) scores like one process with accumulation. With no eval budget
    left, both ranks stop TTT's updates at the same chunk (one decision for all), as one process does
    (that TTT runs all its updates with time to spare is tests/test_eval.py's). Under the real torchrun:
    the other multi-rank tests fork their ranks (tests/forkserver.py). 128 wide, so that the matrices are GPTQ'd
    (TINY_ENV's pass through as fp16): the Hessians, summed over ranks, come from the same tokens."""
    env = tiny_env(tiny_data, tmp_path, MICRO_BATCH_TOKENS=512, TTT_ENABLED=1, EVAL_SLIDING=1,
                   EVAL_BUDGET_SECONDS=0, MODEL_DIM=128, MLP_MULT=4)
    one = launcher.run(env | dict(RUN_ID="one"))
    assert one.returncode == 0, one.stderr
    two = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gpt.py"],
                     env | dict(RUN_ID="two"))
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = parse_log(tmp_path / "logs" / "one.txt"), parse_log(tmp_path / "logs" / "two.txt")
    assert "world_size:2" in (tmp_path / "logs" / "two.txt").read_text()
    assert a["steps"] == b["steps"] == "6"
    for key in ("prequant_val_bpb", "roundtrip_val_bpb", "sliding_val_bpb", "ttt_val_bpb"):
        assert abs(float(a[key]) - float(b[key])) < 1e-4, (key, a[key], b[key])
    for run in ("one", "two"):
        kinds = {e["kind"] for e in train_gpt.read_artifact(tmp_path / "art" / f"final_model_{run}.int6.br")[0].values()}
        assert "int6_rows" in kinds, kinds
    stops = [[line for line in (tmp_path / "logs" / f"{r}.txt").read_text().splitlines()
              if line.startswith("ttt:updates_stopped")] for r in ("one", "two")]
    assert [len(s) for s in stops] == [1, 1]
    assert stops[0][0].split()[1] == stops[1][0].split()[1] and stops[0][0].startswith("ttt:updates_stopped after_chunk:2/")
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["one.txt", "two.txt"]
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["final_model_one.int6.br",
                                                                    "final_model_two.int6.br"]


def test_wallclock_cap_stops_training_within_a_step(tiny_data, tmp_path, launcher):
    """MAX_WALLCLOCK_SECONDS - GPTQ_RESERVE_SECONDS caps the training clock; the loop reads the clock one
    queued step late, so it stops while the step in flight still ends inside the cap: within a step of it."""
    env = tiny_env(tiny_data, tmp_path, RUN_ID="cap", ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=3,
                   GPTQ_RESERVE_SECONDS=1, TTT_ENABLED=0, EVAL_STRIDE=0, TRAIN_LOG_EVERY=1000)
    res = launcher.run(env)
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "logs" / "cap.txt").read_text()
    summary = parse_log(tmp_path / "logs" / "cap.txt")
    steps, secs = int(summary["steps"]), float(summary["train_seconds"])
    assert summary["stop_reason"] == "wallclock_cap" and 5 < steps < 100000
    assert "train_clock_cap:2.0s" in text
    assert 2.0 - 3 * secs / steps < secs <= 2.0 + 0.5 * secs / steps  # inside the cap, give or take a step's jitter
    assert summary["train_data_in_budget"] == "1" and "hessians_outside_budget" not in text
    _, meta = train_gpt.read_artifact(tmp_path / "art" / "final_model_cap.int6.br")
    assert meta["code_bytes"] == int(summary["code_bytes"])  # what EVAL_ONLY of it counts, whatever file scores it


def test_measured_gptq_reserve_keeps_the_hessians_inside_the_cap(tiny_data, tmp_path, launcher):
    """By default (GPTQ_RESERVE_SECONDS=0) the Hessians' share of MAX_WALLCLOCK_SECONDS is measured before the
    clock, one calibration batch timed, since their cost differs by GPU and GPU count: the cap is what is left
    and the Hessians, however many batches, end inside the budget."""
    env = tiny_env(tiny_data, tmp_path, RUN_ID="measured", ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=5,
                   GPTQ_CALIBRATION_BATCHES=12, VAL_MAX_TOKENS=0, TTT_ENABLED=0, EVAL_STRIDE=0, TRAIN_LOG_EVERY=1000)
    res = launcher.run(env)
    assert res.returncode == 0, res.stderr[-2000:]
    text = (tmp_path / "logs" / "measured.txt").read_text()
    cap = re.search(r"^train_clock_cap:([\d.]+)s gptq_reserve:([\d.]+)s reserve_source:measured "
                    r"calibration_batch:([\d.]+)s reserve_batches:12$", text, re.M)
    assert cap, text[-3000:]
    cap_s, reserve, batch_s = map(float, cap.groups())
    assert abs(reserve - (train_gpt.RESERVE_MARGIN * 12 * batch_s + train_gpt.RESERVE_SLACK_SECONDS)) < 0.1
    assert abs(cap_s + reserve - 5) < 0.11 and batch_s > 0
    hess_s = float(re.search(r"^gptq_hessians:\d+ batches:12 time:([\d.]+)s", text, re.M).group(1))
    assert hess_s <= reserve
    summary = parse_log(tmp_path / "logs" / "measured.txt")
    assert summary["train_data_in_budget"] == "1" and "hessians_outside_budget" not in text


def test_the_cap_line_names_where_its_reserve_came_from():
    """A fixed GPTQ_RESERVE_SECONDS is used as given and no Hessians reserve the slack alone; neither times a batch."""
    trainer = SimpleNamespace(model=None, plans={2048: (48, 1)}, matrix_inputs=None)  # never run: nothing measured
    cap = lambda **env: train_gpt.train_clock_cap(train_gpt.Hyperparameters(
        {k: str(v) for k, v in env.items()}), train_gpt.Dist(), trainer, [])
    fixed, plain, none = (cap(MAX_WALLCLOCK_SECONDS=240, GPTQ_RESERVE_SECONDS=6),
                          cap(MAX_WALLCLOCK_SECONDS=240, GPTQ_CALIBRATION_BATCHES=0), cap(MAX_WALLCLOCK_SECONDS=0))
    assert (fixed, fixed.line()) == ((234000.0, 6.0, "GPTQ_RESERVE_SECONDS"),
                                     "train_clock_cap:234.0s gptq_reserve:6.0s reserve_source:GPTQ_RESERVE_SECONDS")
    assert (plain, plain.line()) == ((239000.0, 1.0, "no_hessians"),
                                     "train_clock_cap:239.0s gptq_reserve:1.0s reserve_source:no_hessians")
    assert (none.ms, none.line()) == (0.0, "train_clock_cap:none")


def test_a_capped_run_without_hessians_ends_inside_its_budget(tiny_data, tmp_path, launcher):
    """GPTQ_CALIBRATION_BATCHES=0 reserves the slack alone (a step's jitter), and the loop's stop rule keeps the
    training (the last data it reads) inside the cap: the run is valid."""
    env = tiny_env(tiny_data, tmp_path, RUN_ID="plain", ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=3,
                   GPTQ_CALIBRATION_BATCHES=0, VAL_MAX_TOKENS=0, TTT_ENABLED=0, EVAL_STRIDE=0, TRAIN_LOG_EVERY=1000)
    res = launcher.run(env)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = parse_log(tmp_path / "logs" / "plain.txt")
    assert "train_clock_cap:2.0s gptq_reserve:1.0s reserve_source:no_hessians" in (tmp_path / "logs" / "plain.txt").read_text()
    assert float(summary["train_seconds"]) <= 2.1 and summary["train_data_in_budget"] == "1"
    assert summary["final_valid"] == "1" and summary["invalid_reasons"] == "none"


def test_hessians_past_the_training_budget_make_the_score_invalid(tiny_data, tmp_path, launcher):
    """GPTQ's Hessians read training data, so they belong inside MAX_WALLCLOCK_SECONDS: a run whose Hessians
    end past it warns and is never a valid score (VAL_MAX_TOKENS=0 here, so nothing else makes it invalid)."""
    env = tiny_env(tiny_data, tmp_path, RUN_ID="over", ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=1,
                   GPTQ_RESERVE_SECONDS=0.001, GPTQ_CALIBRATION_BATCHES=40, VAL_MAX_TOKENS=0, TTT_ENABLED=0,
                   EVAL_STRIDE=0, TRAIN_LOG_EVERY=1000)
    res = launcher.run(env)
    assert res.returncode == 0, res.stderr
    summary = parse_log(tmp_path / "logs" / "over.txt")
    text = (tmp_path / "logs" / "over.txt").read_text()
    assert "warning:hessians_outside_budget" in text
    hint = re.search(r"training ended at ([\d.]+)s, the Hessians took ([\d.]+)s: lower MAX_WALLCLOCK_SECONDS, or set "
                     r"GPTQ_RESERVE_SECONDS to at least ([\d.]+)\)", text)
    assert hint, text[-2000:]
    ended, took, least = map(float, hint.groups())  # the reserve that would have fit this run's Hessians
    assert abs(least - (0.001 + ended + took - 1)) < 0.11
    assert summary["train_data_in_budget"] == "0" and summary["final_valid"] == "0"
    assert summary["invalid_reasons"] == "training_over_budget"  # VAL_MAX_TOKENS=0: the whole val set
    phase_lines = [ln for ln in text.splitlines() if " val_bpb:" in ln and " valid:" in ln]
    assert phase_lines and all(" valid:0 " in ln for ln in phase_lines), phase_lines  # no phase line says otherwise
    # its artifact records it: scored again alone, it is still no valid score
    res = launcher.run(env | dict(RUN_ID="over_again", EVAL_ONLY=str(tmp_path / "art" / "final_model_over.int6.br"),
                                  TRAIN_SEQ_LEN="128"))
    assert res.returncode == 0, res.stderr[-2000:]
    again = (tmp_path / "logs" / "over_again.txt").read_text()
    assert "warning:artifact_trained_outside_budget" in again
    assert "warning:env TRAIN_SEQ_LEN=128 ignored: EVAL_ONLY scores the artifact's TRAIN_SEQ_LEN=64" in again
    again = parse_log(tmp_path / "logs" / "over_again.txt")
    assert again["final_valid"] == "0" and again["invalid_reasons"] == "training_over_budget"


def test_a_valid_training_ends_within_the_rule_whatever_its_cap():
    """MAX_WALLCLOCK_SECONDS tightens the training limit of a valid run; 0 (no cap) or a looser one leaves the rule's."""
    limit = lambda cap: train_gpt.train_limit(train_gpt.Hyperparameters(dict(MAX_WALLCLOCK_SECONDS=cap)))
    assert (limit("240"), limit("0"), limit("100000")) == (240, train_gpt.RULE_SECONDS, train_gpt.RULE_SECONDS) == \
        (240, 600, 600)


class CountingStream:
    """Stands in for TrainStream: batch i is filled with token i, so a step shows which batch it used."""

    def __init__(self, seq_len: int, offset: int = 0):
        self.seq_len, self.drawn = seq_len, offset

    def next_batch(self, n_seqs: int, rows: slice) -> np.ndarray:
        self.drawn += 1
        return np.full((n_seqs, self.seq_len + 1), self.drawn - 1, dtype=np.int64)[rows]


class RandomStream:
    """Stands in for TrainStream: random tokens of a fixed seed."""

    def __init__(self, seq_len: int, vocab: int):
        self.seq_len, self.vocab, self.rng = seq_len, vocab, np.random.default_rng(0)

    def next_batch(self, n_seqs: int, rows: slice) -> np.ndarray:
        return self.rng.integers(0, self.vocab, (n_seqs, self.seq_len + 1))[rows]


def test_every_parameter_has_one_optimizer_and_moves():
    """Each trained parameter belongs to exactly one optimizer (Muon: the banks, Adam: the rest), whatever its
    shape, and a few steps move every one of them; only the test-time-only ones stay out. resid_mix (3-D)
    once belonged to none and stayed at its initial value through every run."""
    hp = train_gpt.Hyperparameters(dict(DEVICE="cpu", NUM_LAYERS="3", MODEL_DIM="32", NUM_HEADS="2",
                                        NUM_KV_HEADS="1", VOCAB_SIZE="64", TRAIN_SEQ_LEN="16", LOOP_START="1",
                                        LOOP_END="1", PARALLEL_RESIDUAL_START="2", ROPE_DIMS="8", XSA_LAST_N="3",
                                        TRAIN_BATCH_TOKENS="128", EMA_DECAY="0", X0_MIX="1"))
    dctx = train_gpt.setup_distributed(hp)
    model = train_gpt.GPT(hp.model_config())
    trainer = train_gpt.Trainer(hp, dctx, model)
    owners = {}
    for opt in trainer.optimizers:
        for g in opt.param_groups:
            for p in g["params"]:
                owners[id(p)] = owners.get(id(p), 0) + 1
    names = dict(model.named_parameters())
    assert {n: owners.get(id(p), 0) for n, p in names.items()} == \
        {n: 0 if n in train_gpt.TEST_TIME_ONLY else 1 for n in names}
    assert "resid_mix" in names and names["resid_mix"].ndim == 3
    before = {n: p.detach().clone() for n, p in names.items()}
    trainer.use_streams({hp.train_seq_len: RandomStream(hp.train_seq_len, hp.vocab_size)})
    for k in range(3):
        trainer.step(k, 1.0, hp.train_seq_len, looped=True)
    still = [n for n, p in names.items() if torch.equal(p.detach(), before[n])]
    assert still == list(train_gpt.TEST_TIME_ONLY)


def test_a_parameter_no_forward_reads_gets_a_zero_gradient():
    """A one-layer model with depth recurrence has a skip that only the looped order reads: its unlooped steps
    give that parameter no gradient, which the all-reduce and the clip norm take as zero (it crashed them)."""
    hp = train_gpt.Hyperparameters(dict(DEVICE="cpu", NUM_LAYERS="1", LOOP_START="0", LOOP_END="0", NUM_LOOPS="2",
                                        MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", VOCAB_SIZE="64",
                                        TRAIN_SEQ_LEN="16", TRAIN_BATCH_TOKENS="128", XSA_LAST_N="1",
                                        PARALLEL_RESIDUAL_START="-1", EMA_DECAY="0"))
    model = train_gpt.GPT(hp.model_config())
    trainer = train_gpt.Trainer(hp, train_gpt.setup_distributed(hp), model)
    trainer.use_streams({hp.train_seq_len: RandomStream(hp.train_seq_len, hp.vocab_size)})
    assert model.skip_weights.numel()
    losses = [float(trainer.step(k, 1.0, hp.train_seq_len, looped=k > 0)) for k in range(2)]
    assert all(math.isfinite(x) for x in losses)


def test_prefetch_keeps_the_batch_order_and_a_new_stream_drops_it(monkeypatch):
    """Trainer.step loads the next batch while the current one is on the GPU: step k must still train
    on batch k, and neither new streams (the warm-up restore) nor a step of another length may take a batch loaded
    ahead for the old ones; one loaded ahead and not taken is skipped."""
    hp = train_gpt.Hyperparameters(dict(DEVICE="cpu", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2",
                                        NUM_KV_HEADS="1", VOCAB_SIZE="64", TRAIN_SEQ_LEN="16",
                                        TRAIN_BATCH_TOKENS="128", EMA_DECAY="0", NUM_LOOPS="0"))
    dctx = train_gpt.setup_distributed(hp)
    model = train_gpt.GPT(hp.model_config())
    trainer = train_gpt.Trainer(hp, dctx, model)
    seen = []
    real_forward = trainer.forward
    monkeypatch.setattr(trainer, "forward", lambda x, y, looped: seen.append(int(x[0, 0])) or real_forward(x, y, looped))
    L = hp.train_seq_len
    trainer.use_streams({L: CountingStream(L), L // 2: CountingStream(L // 2, offset=20)})
    trainer.plans[L // 2] = (trainer.plans[L][0] * 2, trainer.plans[L][1])  # same tokens per step at half the length
    for k in range(3):
        trainer.step(k, 1.0, L, False)
    trainer.use_streams({L: CountingStream(L, offset=50), L // 2: trainer.streams[L // 2]})
    trainer.step(3, 1.0, L, False)
    trainer.step(4, 1.0, L // 2, False)  # another length: the batch loaded ahead for L goes unused
    trainer.step(5, 1.0, L, False)
    assert seen == [0, 1, 2, 50, 20, 52]


def test_the_over_budget_hint_fits_the_cap():
    """A reserve is the fix under a cap; without one (MAX_WALLCLOCK_SECONDS=0) GPTQ_RESERVE_SECONDS does nothing."""
    capped = train_gpt.Hyperparameters(dict(MAX_WALLCLOCK_SECONDS="240"))
    assert train_gpt.over_budget_fix(capped, 3.25) == ("lower MAX_WALLCLOCK_SECONDS, or set GPTQ_RESERVE_SECONDS to "
                                                       "at least 3.2")
    uncapped = train_gpt.Hyperparameters(dict(MAX_WALLCLOCK_SECONDS="0"))
    assert train_gpt.over_budget_fix(uncapped, 3.25).startswith("set MAX_WALLCLOCK_SECONDS (at most 600)")
