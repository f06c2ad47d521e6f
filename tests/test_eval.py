"""Sliding windows, score-first TTT and SLOT: every target scored once, and legality proven by
perturbing the future (a method that peeks at unscored targets must fail)."""
import copy
import math
import time

import numpy as np
import pytest
import torch

import train_gpt
from test_model import randomized, small_cfg

Phase = train_gpt.Phase


def phase(ttt=False, slot="off"):
    return Phase("test", 32, 8, ttt=ttt, slot=slot)

EVAL_ENV = dict(EVAL_SEQ_LEN="32", EVAL_STRIDE="8", EVAL_BATCH_SEQS="4", TTT_CHUNK_TOKENS="64", TTT_LORA_RANK="0",
                TTT_BATCH_SEQS="2", TTT_EPOCHS="2", TTT_LR="0.05", SLOT_STEPS="3", SLOT_LR="0.1",
                NGRAM_TILT="0")  # the phases as such; the tilt's tests switch it on


def setup(n_tokens=301, seed=0, cfg=None):
    hp = train_gpt.Hyperparameters(EVAL_ENV)
    model = randomized(cfg or small_cfg())
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 64, size=n_tokens).astype(np.uint16)
    tokens[::37] = 1  # some BOS boundaries
    lut = train_gpt.ByteLUT(rng.integers(0, 4, 64).astype(np.int32), rng.random(64) < 0.3, np.arange(64) < 4)
    return hp, model, tokens, train_gpt.ValSet.from_lut(tokens, lut)


def test_token_scores_count_only_masked_in_targets():
    """TokenScores.add counts the targets its mask holds; the others (padding, possibly pointing past the
    stream, with any value, NaN too) add nothing anywhere."""
    out = train_gpt.TokenScores.zeros(5, torch.device("cpu"))
    targets = torch.tensor([[1, 2, 9], [5, 0, 3]])
    nll = torch.tensor([[0.5, 1.5, float("nan")], [2.0, 7.0, float("inf")]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out.add(targets, nll, mask)
    assert out.count.tolist() == [1, 1, 0, 0, 1] and out.nll.tolist() == [0.5, 1.5, 0.0, 0.0, 2.0]


@pytest.mark.parametrize("n,L,s", [(301, 32, 8), (33, 32, 8), (20, 32, 8), (1000, 64, 64), (1025, 64, 64), (97, 32, 5)])
def test_window_ends_cover_each_target_once(n, L, s):
    ends = train_gpt.window_ends(n, L, s)
    prev = np.concatenate(([0], ends[:-1]))
    assert ends[-1] == n - 1 and (ends > prev).all()
    assert (ends - prev <= max(s, min(L, n - 1))).all()
    assert ((ends - np.minimum(L, n - 1)) >= 0).all()  # full-length windows
    # every scored target but the first window's sees >= L - stride tokens of context
    assert (prev[1:] - (ends[1:] - min(L, n - 1)) >= min(L, n - 1) - s).all()


@pytest.mark.parametrize("n,size", [(4065, 32), (16448, 32), (33, 32), (1, 32), (0, 32), (7, 3)])
def test_even_batches_cover_in_order_without_singletons(n, size):
    batches = train_gpt.even_batches(np.arange(n), size)
    assert np.array_equal(np.concatenate(batches) if batches else np.arange(0), np.arange(n))
    assert all(len(b) <= size for b in batches) and len(batches) == -(-n // size)
    assert n < 2 or min(len(b) for b in batches) >= 2


@pytest.mark.parametrize("looped", [True, False])
def test_sliding_scores_match_direct_forward(looped):
    """Each target from the window that scores it, at its place there (the first window's targets, one in the
    middle of a stride, a window's last, the last partial window's), in the phase's layer order: training's
    checks before the loop turns on score the plain one."""
    hp, model, tokens, val = setup()
    scores = train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, Phase("test", 32, 8, looped=looped))
    assert (scores.count == 1).all()
    ends = train_gpt.window_ends(len(tokens), 32, 8)
    for t in (1, 17, 32, 197, 200, 297, 300):  # target t: the window ending at the first end >= t, its 32 tokens
        e = int(ends[np.searchsorted(ends, t)])
        x = torch.from_numpy(tokens[e - 32:e].astype(np.int64))[None]
        y = torch.from_numpy(tokens[e - 31:e + 1].astype(np.int64))[None]
        with torch.no_grad():
            direct, other = (model(x, y, looped=lp)[0, t - (e - 31)].item() for lp in (looped, not looped))
        assert abs(scores.nll[t - 1].item() - direct) < 1e-5 and abs(direct - other) > 1e-4, t


@pytest.mark.parametrize("ttt,slot", [(False, "off"), (True, "off"), (False, "context"), (True, "context")])
def test_legal_modes_pass_the_future_perturbation_check(ttt, slot):
    hp, model, tokens, val = setup()
    assert train_gpt.legality_check(model, val, train_gpt.Dist(), hp, phase(ttt, slot))


@pytest.mark.parametrize("seq_len", [32, 36])
def test_slot_full_fails_the_check(seq_len):
    """SLOT=full fits on the targets it scores: the check must catch it, also where EVAL_SEQ_LEN is no multiple of
    the stride (36 = 4.5 strides: a point placed on the multiples of the stride was a window's last target)."""
    hp, model, tokens, val = setup()
    hp.eval_seq_len = seq_len
    checked = Phase("test", seq_len, 8, slot="full")
    assert train_gpt.legality_check(model, val, train_gpt.Dist(), hp, checked) is False


def test_the_check_runs_reproducible_kernels_and_says_when_they_are_not(monkeypatch):
    """Eager, deterministic kernels, math attention (cuDNN's backward is not bitwise reproducible) for
    both passes; if scoring the same stream twice already differs, the check is inconclusive (None)."""
    _, model, tokens, val = setup()
    hp = train_gpt.Hyperparameters(EVAL_ENV | dict(EVAL_COMPILE="1"))
    real, seen = train_gpt.eval_tokens, []

    def noisy(model, val, dctx, hp, phase, *args):
        seen.append((model.attention, hp.eval_compile, torch.are_deterministic_algorithms_enabled()))
        out = real(model, val, dctx, hp, phase, *args)
        out.nll += torch.rand_like(out.nll) * 1e-9
        return out
    monkeypatch.setattr(train_gpt, "eval_tokens", noisy)
    assert train_gpt.legality_check(model, val, train_gpt.Dist(), hp, phase(ttt=True)) is None
    assert seen == [(train_gpt.reproducible_attention, False, True)] * 3
    assert not torch.are_deterministic_algorithms_enabled() and hp.eval_compile is True  # nothing left changed
    lines = []
    with pytest.raises(train_gpt.UserError, match="legality check of phase sliding inconclusive"):
        train_gpt.score_phases(model, 32, val, train_gpt.Dist(), train_gpt.Hyperparameters(
            EVAL_ENV | dict(LEGALITY_CHECK="1", TTT_ENABLED="0")), lines.append)
    assert any(line.startswith("legality_check phase:sliding passed:0 reproducible:0 time:") for line in lines)


def test_ttt_and_slot_change_scores_only_where_allowed():
    hp, model, tokens, val = setup()
    base = train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, phase()).nll
    ttt = train_gpt.eval_tokens(randomized(small_cfg()), val, train_gpt.Dist(), hp, phase(ttt=True)).nll
    assert torch.equal(base[:64], ttt[:64])  # chunk 0 is scored before any update
    assert not torch.allclose(base[64:], ttt[64:])  # later chunks see the adapted model
    slot = train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, phase(slot="context")).nll
    assert torch.equal(base[:32], slot[:32])  # window 0 has no scored context: delta stays 0
    assert not torch.allclose(base[32:], slot[32:])


def test_slot_fits_its_delta_in_float32_under_autocast(monkeypatch):
    """SLOT's delta is small against h: a head under bf16 autocast (the GPU's) rounds h + delta to bf16 and
    most of the delta's early steps with it. The fit runs the head in fp32 whatever autocast_ctx does."""
    hp, model, tokens, val = setup()
    torch.manual_seed(0)
    h = torch.randn(2, 16, model.cfg.model_dim) * 8
    y = torch.randint(0, 64, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.bool)
    plain = train_gpt.fit_slot_delta(model, h, y, mask, hp)
    monkeypatch.setattr(train_gpt, "autocast_ctx", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    assert torch.equal(train_gpt.fit_slot_delta(model, h, y, mask, hp), plain)


def test_ttt_refuses_to_train_on_unscored_targets():
    hp, model, tokens, val = setup()
    upd = train_gpt.TTTUpdater(model, hp, train_gpt.Dist(), True)
    t = torch.from_numpy(tokens.astype(np.int64))
    count = torch.zeros(len(tokens) - 1, dtype=torch.int32)
    count[:63] = 1  # target 64 not scored yet
    with pytest.raises(RuntimeError, match="unscored targets"):
        upd.update(t, 0, 64, 0, 4, count)


def test_ttt_freeze_blocks_keeps_frozen_layers():
    hp = train_gpt.Hyperparameters(EVAL_ENV | {"TTT_FREEZE_BLOCKS": "2"})
    _, model, tokens, val = setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, phase(ttt=True))
    L = model.cfg.num_layers
    rows = train_gpt.bank_rows("qo_bank", [0, 1], L)  # Q and output projection of layers 0-1
    assert torch.equal(before["qo_bank"][rows], model.qo_bank[rows])
    assert torch.equal(before["mlp_down_bank"][:2], model.mlp_down_bank[:2])
    assert not torch.equal(before["mlp_down_bank"][2:], model.mlp_down_bank[2:])


def test_score_phases_logs_and_dumps(tmp_path):
    hp = train_gpt.Hyperparameters(EVAL_ENV | {"SLOT": "full", "LEGALITY_CHECK": "1",
                                               "DUMP_TOKEN_NLL": str(tmp_path / "nll.npz")})
    _, model, tokens, val = setup()
    lines = []
    out = train_gpt.score_phases(model, 32, val, train_gpt.Dist(), hp, lines.append)
    text = "\n".join(lines)
    for key in ("legality_check phase:sliding passed:1", "legality_check phase:ttt passed:1",
                "legality_check phase:slot_full passed:0", "slot_full val_loss:", "valid:0", "eval_total_time:"):
        assert key in text, key
    assert out["final_val_bpb"] == out["ttt_val_bpb"]  # the invalid SLOT score is never the final one
    dump = np.load(tmp_path / "nll.npz")
    assert dump["nll"].dtype == np.float32 and dump["bytes"].dtype == np.uint16 and len(dump["nll"]) == len(tokens) - 1
    assert abs(dump["nll"].astype(np.float64).sum() / len(dump["nll"]) - out["final_val_loss"]) < 1e-5


@pytest.mark.parametrize("mode,budget,runs_sliding", [("auto", 1e6, True), ("auto", 0.0, False),
                                                      ("1", 0.0, True), ("0", 1e6, False)])
def test_sliding_reference_phase_follows_eval_budget(mode, budget, runs_sliding):
    """With TTT on, the plain sliding phase is a reference only and runs after TTT: `auto` abandons it
    once its pace projects past the time left in EVAL_BUDGET_SECONDS; TTT still scores every target and
    is the final score."""
    hp = train_gpt.Hyperparameters(EVAL_ENV | {"EVAL_SLIDING": mode, "EVAL_BUDGET_SECONDS": str(budget),
                                               "TTT_BUDGET_STOP": "0"})
    _, model, tokens, val = setup()
    lines = []
    out = train_gpt.score_phases(model, 32, val, train_gpt.Dist(), hp, lines.append)
    text = "\n".join(lines)
    assert ("sliding_val_bpb" in out) == runs_sliding
    assert ("sliding:skipped " in text) == (mode == "auto" and not runs_sliding)  # no time left: not even started
    assert out["final_val_bpb"] == out["ttt_val_bpb"] and out["final_phase"] == "ttt"
    assert out["final_eval_seconds"] <= out["eval_seconds"]
    phases = [line.split()[0] for line in lines if " val_bpb:" in line]
    assert phases == ["roundtrip", "ttt"] + ["sliding"] * runs_sliding
    if mode == "auto" and not runs_sliding:  # with a little time left, its pace after chunk 1 abandons it
        lines.clear()
        sliding = next(p for p in train_gpt.plan_phases(hp, 32) if p.reference)
        assert train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, sliding, lines.append, 1e-9) is None
        assert lines[-1].startswith("sliding:abandoned after_chunk:2/8 ")


def test_a_non_finite_reference_leaves_the_final_score(monkeypatch):
    """The sliding reference runs after the final phase: if it scores NaN, it is dropped with a warning and the
    run keeps its final score (a non-finite final phase still stops the run)."""
    hp = train_gpt.Hyperparameters(EVAL_ENV | {"EVAL_SLIDING": "1", "TTT_BUDGET_STOP": "0"})
    _, model, tokens, val = setup()
    real = train_gpt.eval_tokens

    def nan_in(name):
        def scored(model, val, dctx, hp, phase, *args):
            out = real(model, val, dctx, hp, phase, *args)
            if phase.name == name and out is not None:
                out.nll[0] = float("nan")
            return out
        return scored
    monkeypatch.setattr(train_gpt, "eval_tokens", nan_in("sliding"))
    lines = []
    out = train_gpt.score_phases(model, 32, val, train_gpt.Dist(), hp, lines.append)
    assert out["final_phase"] == "ttt" and math.isfinite(out["final_val_bpb"]) and "sliding_val_bpb" not in out
    assert [line.split()[0] for line in lines if line.startswith("warning:")] == ["warning:reference_not_finite"]
    monkeypatch.setattr(train_gpt, "eval_tokens", nan_in("ttt"))
    with pytest.raises(train_gpt.UserError, match="phase ttt scored val_bpb nan: not a score"):
        train_gpt.score_phases(model, 32, val, train_gpt.Dist(), hp, [].append)


def test_the_legality_check_counts_against_the_eval_budget(monkeypatch):
    """LEGALITY_CHECK runs after the artifact's load and before the phases: its seconds are evaluation time."""
    hp = train_gpt.Hyperparameters(EVAL_ENV | {"LEGALITY_CHECK": "1", "EVAL_SLIDING": "0", "EVAL_BUDGET_SECONDS": "1",
                                               "TTT_BUDGET_STOP": "0"})
    _, model, tokens, val = setup()
    real = train_gpt.legality_check
    monkeypatch.setattr(train_gpt, "legality_check", lambda *a, **k: time.sleep(1) or real(*a, **k))
    out = train_gpt.score_phases(model, 32, val, train_gpt.Dist(), hp, [].append)
    assert out["final_valid"] == 0 and out["invalid_reasons"] == "eval_over_budget"
    assert out["final_eval_seconds"] == out["eval_seconds"] > 1


def test_the_artifact_load_counts_against_the_eval_budget():
    """The eval clock starts load_seconds in (decompressing the artifact is evaluation time): a load that took
    the budget leaves the sliding reference no time, where without it the reference runs; the total counts it."""
    hp = train_gpt.Hyperparameters(EVAL_ENV | {"EVAL_BUDGET_SECONDS": "1000", "TTT_BUDGET_STOP": "0"})
    _, model, tokens, val = setup()
    for load, runs_sliding in ((0.0, True), (1000.0, False)):
        out = train_gpt.score_phases(model, 32, val, train_gpt.Dist(), hp, [].append, load_seconds=load)
        assert ("sliding_val_bpb" in out) == runs_sliding and load <= out["eval_seconds"] < load + 60


def test_plan_phases_orders_the_score_before_the_reference():
    hp = train_gpt.Hyperparameters(EVAL_ENV | {"SLOT": "context"})
    names = [(p.name, p.ttt, p.slot, p.reference) for p in train_gpt.plan_phases(hp, 16)]
    assert names == [("roundtrip", False, "off", False), ("ttt", True, "off", False),
                     ("slot_context", True, "context", False), ("sliding", False, "off", True)]
    hp = train_gpt.Hyperparameters(EVAL_ENV | {"TTT_ENABLED": "0", "EVAL_SLIDING": "0"})
    assert [(p.name, p.reference) for p in train_gpt.plan_phases(hp, 16)] == [("roundtrip", False), ("sliding", False)]


def test_sliding_phase_runs_without_ttt_whatever_eval_sliding_says():
    hp = train_gpt.Hyperparameters(EVAL_ENV | {"EVAL_SLIDING": "0", "TTT_ENABLED": "0", "EVAL_BUDGET_SECONDS": "0"})
    _, model, tokens, val = setup()
    out = train_gpt.score_phases(model, 32, val, train_gpt.Dist(), hp, [].append)
    assert out["final_val_bpb"] == out["sliding_val_bpb"]


# The compile tests' model: every feature of small_cfg (XSA, a loop, parallel residuals, skip gates) in
# 2 layers run as 3 (0, 1, 1: a sequential block, then a parallel one looped, a U-Net skip between the
# halves), so that inductor (CPU here) builds and compiles a small part of small_cfg's graph: each
# layer's constants (its ln_scale) make kernels of its own.
COMPILE_CFG = small_cfg(num_layers=2, xsa_last_n=2, loop_start=1, loop_end=1, num_loops=1, parallel_residual_start=1)


def test_phase_lines_count_compiled_graphs():
    """With EVAL_COMPILE=1 the first phase builds the graph and the sliding phase reuses it (new_graphs:0);
    eager phases report 0. The log line is where a GPU run shows a phase that recompiled."""
    for flag, expect in (("0", ["0", "0"]), ("1", ["1", "0"])):
        hp = train_gpt.Hyperparameters(EVAL_ENV | {"EVAL_COMPILE": flag, "TTT_ENABLED": "0", "EVAL_BATCH_SEQS": "5"})
        _, model, tokens, val = setup(cfg=COMPILE_CFG)
        torch._dynamo.reset()
        lines = []
        train_gpt.score_phases(model, 32, val, train_gpt.Dist(), hp, lines.append)
        graphs = [line.rsplit("new_graphs:", 1)[1] for line in lines if " val_bpb:" in line]
        assert graphs == expect, lines


def test_compiled_eval_scores_like_eager():
    """EVAL_COMPILE=1 (inductor, here on CPU) scores sliding and TTT like the eager forward, one graph
    for every batch size and phase; the scores of every target are still counted exactly once. EVAL_COMPILE=auto
    stays eager on CPU."""
    from torch._dynamo.utils import counters
    outs, graphs = {}, []
    for flag in ("0", "auto", "1"):  # auto compiles where training does (CUDA): eager here
        hp = train_gpt.Hyperparameters(EVAL_ENV | {"EVAL_COMPILE": flag, "EVAL_BATCH_SEQS": "5"})
        _, model, tokens, val = setup(cfg=COMPILE_CFG)
        torch._dynamo.reset()
        outs[flag] = []
        for ttt in (False, True):
            counters.clear()
            outs[flag].append(train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, phase(ttt)).totals())
            graphs.append(counters["stats"]["unique_graphs"])
    # one graph for both phases and every batch size (even_batches never makes a batch of one window,
    # which would be specialized: before it, the TTT phase compiled a second graph for a one-window remainder)
    assert graphs == [0, 0, 0, 0, 1, 0]
    assert outs["auto"] == outs["0"]
    for (loss0, bpb0), (loss1, bpb1) in zip(outs["0"], outs["1"]):
        assert abs(loss0 - loss1) < 1e-5 and abs(bpb0 - bpb1) < 1e-5


def test_ttt_projection_runs_the_remaining_steps_at_the_pace_since_chunk_0():
    # 10 chunks; chunk 4 scored 10 s in, 8 s after chunk 0 (4 steps: 2 s each); 5 steps left
    assert train_gpt.projected_seconds(10.0, 8.0, 4, 10) == 20.0
    assert train_gpt.projected_seconds(10.0, 8.0, 9, 10) == 10.0  # the last chunk: nothing left


def test_ttt_stops_updating_when_its_pace_overruns_the_time_left():
    """With no time left, TTT knows its pace after chunk 1 and stops there: chunks 0-1 score as in a full
    TTT pass, and the rest as a sliding pass of a copy updated once (on chunk 0) does. With time to spare
    it keeps updating, and the later chunks score differently."""
    hp, model, tokens, val = setup()
    n = len(tokens) - 1
    ends = train_gpt.window_ends(len(tokens), 32, 8)
    n_chunks = int(np.concatenate(([0], ends[:-1]))[-1] // 64) + 1
    assert n_chunks >= 4

    def run(time_left):
        lines = []
        out = train_gpt.eval_tokens(copy.deepcopy(model), val, train_gpt.Dist(), hp, Phase("ttt", 32, 8, ttt=True),
                                    log=lines.append, time_left=time_left)
        return out.nll, [line for line in lines if line.startswith("ttt:updates_stopped")]

    stopped, stop_lines = run(0.0)
    full, full_lines = run(1e9)
    assert full_lines == [] and len(stop_lines) == 1
    assert stop_lines[0].startswith(f"ttt:updates_stopped after_chunk:2/{n_chunks} ")
    once = copy.deepcopy(model)
    train_gpt.TTTUpdater(once, hp, train_gpt.Dist(), True).update(
        torch.from_numpy(tokens.astype(np.int64)), 0, 64, 0, n_chunks, torch.ones(n, dtype=torch.int32))
    frozen = train_gpt.eval_tokens(once, val, train_gpt.Dist(), hp, phase()).nll
    # chunk c holds the windows whose previous end is in [64c, 64(c+1)): targets from index 128 on are chunks >= 2
    torch.testing.assert_close(stopped[:128], full[:128], rtol=0, atol=1e-6)
    torch.testing.assert_close(stopped[128:], frozen[128:], rtol=0, atol=1e-5)
    assert (full[128:] - frozen[128:]).abs().max() > 1e-3


def test_an_eval_past_its_budget_is_not_a_valid_score():
    """The pace keeps TTT inside EVAL_BUDGET_SECONDS where it can; a run whose final phase still ends past it
    scores, but never as valid: on every phase line that ends past it, and in final_valid."""
    _, model, tokens, val = setup()
    for budget, valid in (("1000", 1), ("0", 0)):
        hp = train_gpt.Hyperparameters(EVAL_ENV | {"EVAL_SLIDING": "0", "EVAL_BUDGET_SECONDS": budget})
        lines = []
        out = train_gpt.score_phases(model, 32, val, train_gpt.Dist(), hp, lines.append)
        phase_lines = [ln for ln in lines if " val_bpb:" in ln]
        assert len(phase_lines) == 2 and all(f" valid:{valid} " in ln for ln in phase_lines), phase_lines
        assert out["final_valid"] == valid and out["final_phase"] == "ttt"
        assert out["invalid_reasons"] == ("none" if valid else "eval_over_budget")
        assert any(ln.startswith("warning:eval_over_budget phase:ttt") for ln in lines) == (not valid)
    # a looser budget than the rule paces the phases, but a score past the rule's 600 s never counts
    hp = train_gpt.Hyperparameters(EVAL_ENV | {"EVAL_SLIDING": "0", "EVAL_BUDGET_SECONDS": "100000"})
    lines = []
    out = train_gpt.score_phases(model, 32, val, train_gpt.Dist(), hp, lines.append, load_seconds=601.0)
    assert out["final_valid"] == 0 and any(ln.startswith("warning:eval_over_budget phase:ttt") for ln in lines)
    assert out["invalid_reasons"] == "eval_over_budget"
    # the rules scoring cannot see come first, each named
    out = train_gpt.score_phases(model, 32, val, train_gpt.Dist(), hp, lines.append, ("val_subset",), 601.0)
    assert out["final_valid"] == 0 and out["invalid_reasons"] == "val_subset,eval_over_budget"


@pytest.mark.parametrize("stop", ["1", "0"])
def test_ttt_budget_stop_knob(stop):
    hp = train_gpt.Hyperparameters(EVAL_ENV | {"EVAL_SLIDING": "0", "EVAL_BUDGET_SECONDS": "0", "TTT_BUDGET_STOP": stop})
    _, model, tokens, val = setup()
    lines = []
    out = train_gpt.score_phases(model, 32, val, train_gpt.Dist(), hp, lines.append)
    assert any(line.startswith("ttt:updates_stopped") for line in lines) == (stop == "1")
    assert out["final_val_bpb"] == out["ttt_val_bpb"]
