"""Token-only n-gram tilt: the hints read only earlier tokens, the tilted distribution is normalized
exactly, the tilt moves only hinted targets' scores (never TTT's updates), passes the perturbation
check, and with the tilt off every score is what it was."""
import copy

import numpy as np
import pytest
import torch

import train_gpt
from test_eval import EVAL_ENV, phase, setup
from test_model import randomized, small_cfg

Phase = train_gpt.Phase


def hints_of(tokens, order=3, threshold=0.8) -> np.ndarray:
    return train_gpt.ngram_hints(torch.as_tensor(np.asarray(tokens, dtype=np.int64)), order, threshold).numpy()


def table_hints(tokens, order: int, threshold: float) -> np.ndarray:
    """The definition: one left-to-right pass over a table of continuation counts per context, which
    proposes the context's most frequent continuation (of a tie, the one that reached the top count
    first) before it counts the token at t."""
    k, seen, hints = order - 1, {}, np.full(len(tokens), -1, dtype=np.int64)
    for t in range(k, len(tokens)):
        entry = seen.setdefault(tuple(tokens[t - k:t]), [0, -1, 0, {}])  # total, best, top count, counts
        total, best, top, counts = entry
        if total and top >= threshold * total:
            hints[t] = best
        tok = int(tokens[t])
        counts[tok] = counts.get(tok, 0) + 1
        entry[0] += 1
        if counts[tok] > top:
            entry[1], entry[2] = tok, counts[tok]
    return hints


def repetitive_stream(n=301, period=23, seed=0) -> np.ndarray:
    """A random passage repeated, with a few random tokens mixed in: hints fire, mostly right."""
    rng = np.random.default_rng(seed)
    tokens = np.resize(rng.integers(4, 64, size=period), n).astype(np.uint16)
    noise = rng.random(n) < 0.05
    tokens[noise] = rng.integers(4, 64, size=int(noise.sum()))
    return tokens


def tilt_setup(n_tokens=301):
    """test_eval's model and byte counts, with a repetitive stream (shorter where TTT makes it slow)."""
    hp, model, _, val = setup(n_tokens)
    tokens = repetitive_stream(n_tokens)
    return hp, model, tokens, val.with_tokens(tokens)


def test_a_tiny_stream_gets_the_expected_hints():
    # order 2: the context is the previous token
    tokens = [5, 7, 5, 7, 5, 8, 5, 7]
    # t=3: after 5 came 7 (1/1); t=4: after 7 came 5; t=5: 7 again (2/2, the target is 8: a miss);
    # t=6: 8 never seen before; t=7: after 5 came 7, 7, 8: top share 2/3
    assert hints_of(tokens, 2, 0.8).tolist() == [-1, -1, -1, 7, 5, 7, -1, -1]
    assert hints_of(tokens, 2, 0.6).tolist() == [-1, -1, -1, 7, 5, 7, -1, 7]
    # a tie keeps the continuation that reached the top count first: after 3 came 1, 2 (t=5: 1),
    # then 2 (t=7: 2), then 1 (t=9: 2 and 1 tie, 2 got there first)
    assert hints_of([3, 1, 3, 2, 3, 2, 3, 1, 3, 0], 2, 0.0).tolist() == [-1, -1, -1, 1, -1, 1, 3, 2, 3, 2]
    # order 3 needs two tokens of context; a stream no longer than that gets no hint
    assert hints_of([4, 4, 4, 4], 3, 0.8).tolist() == [-1, -1, -1, 4]
    assert hints_of([4, 4], 3, 0.8).tolist() == [-1, -1]


@pytest.mark.parametrize("order", [2, 3, 4])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.8, 1.0])
def test_hints_match_a_left_to_right_table(order, threshold):
    rng = np.random.default_rng(order * 10 + int(threshold * 10))
    for _ in range(10):
        tokens = rng.integers(0, int(rng.integers(2, 6)), size=int(rng.integers(1, 300)))
        assert np.array_equal(hints_of(tokens, order, threshold), table_hints(tokens, order, threshold))


def causal_at(hint_fn, tokens: np.ndarray, t: int, seed: int) -> bool:
    """Perturb tokens t.. (the target t included): the hints of positions <= t must not move."""
    other = tokens.copy()
    other[t:] = np.random.default_rng(seed).integers(0, int(tokens.max()) + 1, size=len(tokens) - t)
    return np.array_equal(hint_fn(tokens)[:t + 1], hint_fn(other)[:t + 1])


def test_hints_read_only_earlier_tokens():
    tokens = repetitive_stream(400).astype(np.int64)
    assert (hints_of(tokens) >= 0).mean() > 0.5
    for t in range(0, 400, 7):
        assert causal_at(hints_of, tokens, t, seed=t), t


def test_backoff_takes_the_first_order_with_a_hint_and_reads_only_earlier_tokens():
    """NGRAM_ORDER=4,2: order 4's hint where it has one, else order 2's; still causal, and more targets hinted."""
    rng = np.random.default_rng(5)
    tokens = np.concatenate([repetitive_stream(200, period=17), rng.integers(4, 9, size=200)]).astype(np.int64)
    orders = train_gpt.ngram_orders(train_gpt.Hyperparameters({"NGRAM_ORDER": "4, 2"}))
    assert orders == (4, 2)
    backoff = lambda toks: train_gpt.backoff_hints(torch.as_tensor(np.asarray(toks)), orders, 0.5).numpy()  # noqa: E731
    long, short = hints_of(tokens, 4, 0.5), hints_of(tokens, 2, 0.5)
    assert np.array_equal(backoff(tokens), np.where(long >= 0, long, short))
    assert (backoff(tokens) >= 0).sum() > (long >= 0).sum() and ((long >= 0) & (short >= 0) & (long != short)).any()
    for t in range(0, 400, 7):
        assert causal_at(backoff, tokens, t, seed=t), t


def test_the_causality_check_catches_a_gate_on_the_target():
    """The illegal word-start expert's pattern: hint only where the target itself has some property.
    The future-perturbation check never perturbs the scored target, so it is blind to this; the
    hints' own check (perturb from t on) is what catches it."""
    def leaky(tokens):
        hints = hints_of(tokens)
        return np.where(np.asarray(tokens) % 2 == 0, hints, -1)
    tokens = repetitive_stream(400).astype(np.int64)
    assert not all(causal_at(leaky, tokens, t, seed=t) for t in range(0, 400, 7))


@pytest.mark.parametrize("gamma", [0.0, 1.5])
def test_tilted_distribution_is_exactly_normalized(gamma):
    """Over the whole vocabulary, the tilted probabilities sum to 1 and equal a brute-force softmax of
    the softcapped logits with the boost beta (1 - p(hint))^gamma added to the hinted token's."""
    model, beta = randomized(small_cfg()), 2.625
    V, cap = model.cfg.vocab_size, model.cfg.logit_softcap
    torch.manual_seed(1)
    h = torch.randn(3, 5, model.cfg.model_dim)
    hint = torch.randint(0, V, (3, 5))
    every = torch.arange(V).expand(3, 5, V)  # every candidate target at every position
    with torch.no_grad():
        nll = train_gpt.tilted_scores(model, h[:, :, None].expand(3, 5, V, -1), every, hint[..., None].expand(3, 5, V),
                                      beta, gamma)
        z = cap * torch.tanh(torch.nn.functional.linear(h, model.tok_emb.weight).double() / cap)
        p_hint = torch.softmax(z, -1).gather(-1, hint[..., None])
        boost = beta * (1 - p_hint) ** gamma
        brute = -torch.log_softmax(z + boost * torch.nn.functional.one_hot(hint, V).double(), dim=-1)
    if gamma:  # the boost does vary with the context
        assert boost.std() > 0.01
    torch.testing.assert_close(torch.exp(-nll.double()).sum(-1), torch.ones(3, 5, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(nll.double(), brute, rtol=0, atol=1e-4)


def test_without_a_hint_the_score_is_the_models_bit_for_bit():
    model = randomized(small_cfg())
    torch.manual_seed(2)
    h, y = torch.randn(4, 9, model.cfg.model_dim), torch.randint(0, 64, (4, 9))
    with torch.no_grad():
        plain = model.nll_from_hidden(h, y)
        assert torch.equal(model.nll_of_ids(h, y[..., None])[..., 0], plain)
        assert torch.equal(train_gpt.tilted_scores(model, h, y, torch.full_like(y, -1), 3.5, 1.0), plain)


def test_tilt_off_or_without_hints_scores_as_before():
    """NGRAM_TILT=0 takes the plain path; the tilt on a stream whose contexts never repeat gives no
    hint and the identical scores."""
    hp, model, tokens, val = setup()  # random tokens: no 15-token context repeats
    assert (hints_of(tokens, 16) < 0).all()
    plain = train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, phase()).nll
    tilted = train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, Phase("t", 32, 8, tilt=True)).nll
    assert torch.equal(plain, tilted)
    phases = train_gpt.plan_phases(hp, 32)
    assert not hp.ngram_tilt and not any(p.tilt for p in phases)


@pytest.mark.parametrize("ttt", [False, True])
def test_tilt_moves_only_hinted_targets(ttt):
    _, model, tokens, val = tilt_setup(161 if ttt else 301)
    hp = train_gpt.Hyperparameters(EVAL_ENV | {"NGRAM_ORDER": "3"})
    hints = hints_of(tokens, 3, hp.ngram_threshold)[1:]  # per target, in val order
    plain = train_gpt.eval_tokens(copy.deepcopy(model), val, train_gpt.Dist(), hp, Phase("t", 32, 8, ttt=ttt)).nll
    tilted = train_gpt.eval_tokens(copy.deepcopy(model), val, train_gpt.Dist(), hp,
                                   Phase("t", 32, 8, ttt=ttt, tilt=True)).nll
    on = torch.from_numpy(hints >= 0)
    assert on.float().mean() > 0.5
    assert torch.equal(plain[~on], tilted[~on])
    hit = torch.from_numpy(hints == tokens[1:].astype(np.int64))
    assert (tilted[on & hit] < plain[on & hit]).all() and (tilted[on & ~hit] > plain[on & ~hit]).all()
    assert tilted.mean() < plain.mean()  # the hints are mostly right on a repeated passage


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_tilted_scores_follow_the_formula_at_each_hinted_target(gamma):
    hp = train_gpt.Hyperparameters(EVAL_ENV | {"NGRAM_ORDER": "3", "NGRAM_GAMMA": str(gamma)})
    _, model, tokens, val = tilt_setup()
    tilted = train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, Phase("t", 32, 8, tilt=True)).nll
    hints = hints_of(tokens, 3)
    ends = train_gpt.window_ends(len(tokens), 32, 8)
    hinted = np.nonzero(hints >= 0)[0]
    misses = hinted[hints[hinted] != tokens[hinted]]
    assert len(misses)
    for t in (hinted[0], misses[-1], hinted[-1]):  # target t is scored by the first window ending at or after it
        e = int(ends[np.searchsorted(ends, t)])
        x = torch.from_numpy(tokens[e - 32:e].astype(np.int64))[None]
        with torch.no_grad():
            h = model.hidden(x, looped=True)[0, t - 1 - (e - 32)]
            logp = torch.log_softmax(30.0 * torch.tanh((model.tok_emb.weight @ h).double() / 30.0), -1)
        p_hint, y = logp[hints[t]].exp(), int(tokens[t])
        beta = hp.ngram_beta * (1 - p_hint) ** gamma
        expected = -logp[y] - beta * (y == hints[t]) + torch.log(1 - p_hint + p_hint * torch.exp(beta))
        assert abs(tilted[t - 1].item() - expected.item()) < 1e-4


def test_ttt_trains_on_the_plain_loss():
    hp = train_gpt.Hyperparameters(EVAL_ENV | {"NGRAM_ORDER": "3"})
    _, model, tokens, val = tilt_setup(161)
    plain, tilted = copy.deepcopy(model), copy.deepcopy(model)
    train_gpt.eval_tokens(plain, val, train_gpt.Dist(), hp, Phase("t", 32, 8, ttt=True))
    train_gpt.eval_tokens(tilted, val, train_gpt.Dist(), hp, Phase("t", 32, 8, ttt=True, tilt=True))
    for (name, a), b in zip(plain.state_dict().items(), tilted.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(plain.qo_bank, model.qo_bank)  # TTT did update


@pytest.mark.parametrize("ttt,slot,gamma", [(False, "off", "0"), (True, "off", "0"), (False, "context", "0"),
                                            (True, "off", "1.5")])
def test_tilt_passes_the_future_perturbation_check(ttt, slot, gamma):
    hp = train_gpt.Hyperparameters(EVAL_ENV | {"NGRAM_ORDER": "3", "NGRAM_GAMMA": gamma})
    _, model, tokens, val = tilt_setup(161 if ttt else 301)
    assert (hints_of(tokens, 3)[:len(tokens) // 2] >= 0).mean() > 0.5  # hints fire before the check's split point
    assert train_gpt.legality_check(model, val, train_gpt.Dist(), hp, Phase("t", 32, 8, ttt=ttt, slot=slot, tilt=True))


def test_score_phases_tilts_the_scored_phases_and_logs_it():
    hp = train_gpt.Hyperparameters(EVAL_ENV | {"NGRAM_TILT": "1", "NGRAM_ORDER": "3", "LEGALITY_CHECK": "1"})
    _, model, tokens, val = tilt_setup()
    phases = train_gpt.plan_phases(hp, 32)
    assert [(p.name, p.tilt) for p in phases] == [("roundtrip", False), ("ttt", True), ("sliding", True)]
    lines = []
    out = train_gpt.score_phases(model, 32, val, train_gpt.Dist(), hp, lines.append)
    text = "\n".join(lines)
    for key in ("legality_check phase:ttt passed:1", "legality_check phase:sliding passed:1", "ngram_tilt:ttt ",
                "ngram_tilt:sliding ", "precompute:"):
        assert key in text, key
    n_hinted = int((hints_of(tokens, 3)[1:] >= 0).sum())
    assert f"hinted:{n_hinted}/{len(tokens) - 1} " in text
    assert not any(line.startswith("ngram_tilt:roundtrip") for line in lines)
    off = train_gpt.score_phases(model, 32, val, train_gpt.Dist(), train_gpt.Hyperparameters(EVAL_ENV), lambda s: None)
    assert out["roundtrip_val_bpb"] == off["roundtrip_val_bpb"] and out["final_val_bpb"] < off["final_val_bpb"]


def test_ngram_knobs_are_checked():
    for bad in ("1", "16,1", "16,16", "sixteen", ""):
        with pytest.raises(train_gpt.UserError, match="NGRAM_ORDER"):
            train_gpt.Hyperparameters({"NGRAM_ORDER": bad})
    with pytest.raises(train_gpt.UserError, match="NGRAM_THRESHOLD"):
        train_gpt.Hyperparameters({"NGRAM_THRESHOLD": "1.5"})
    with pytest.raises(train_gpt.UserError, match="NGRAM_GAMMA"):
        train_gpt.Hyperparameters({"NGRAM_GAMMA": "-1"})
    hp = train_gpt.Hyperparameters({})
    assert (hp.ngram_tilt, train_gpt.ngram_orders(hp), hp.ngram_threshold, hp.ngram_beta, hp.ngram_gamma) == \
        (True, (16,), 0.8, 3.5, 1)
