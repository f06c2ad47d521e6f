"""GPTQ + SDClip: never worse than rounding under the Hessian metric; bounds; dead columns."""
import pytest
import torch

import train_gpt


def hessian_error(W, Wq, H):
    D = (W - Wq).double()
    return torch.einsum("...rc,...cd,...rd->", D, H.double(), D).item()


def correlated_hessian(cols, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols))
    X[:, ::7] *= 3  # uneven feature scales, so act-order matters
    return X.T @ X


@pytest.mark.parametrize("shape", [(64, 256), (3, 128, 128), (2, 256, 64)])
@pytest.mark.parametrize("bits,k", [(6, 12.85), (8, 20.0), (4, 6.0)])
def test_gptq_not_worse_than_rounding(shape, bits, k):
    torch.manual_seed(0)
    W = torch.randn(shape)
    batch = shape[:-2]
    H = torch.stack([correlated_hessian(shape[-1], seed=i) for i in range(max(1, *batch) if batch else 1)])
    H = H.reshape(*batch, shape[-1], shape[-1]) if batch else H[0]
    qg, sg = train_gpt.gptq_quantize(W, H, bits, k)
    qr, sr = train_gpt.gptq_quantize(W, None, bits, k)
    assert torch.equal(sg, sr)  # same SDClip scales: only the rounding decisions differ
    qmax = 2 ** (bits - 1) - 1
    assert qg.dtype == torch.int8 and qg.abs().max() <= qmax
    e_gptq = hessian_error(W, train_gpt.dequantize_rows(qg, sg), H)
    e_rtn = hessian_error(W, train_gpt.dequantize_rows(qr, sr), H)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)


def test_rounding_path_is_round_to_nearest():
    W = torch.randn(16, 32)
    q, s = train_gpt.gptq_quantize(W, None, 6, 12.85)
    expect = torch.clamp(torch.round(W / s.float()[:, None]), -31, 31)
    assert torch.equal(q.float(), expect)


def test_dead_columns():
    W = torch.randn(8, 16)
    H = correlated_hessian(16)
    H[3, :] = 0
    H[:, 3] = 0
    q, s = train_gpt.gptq_quantize(W, H, 6, 12.85)
    assert torch.isfinite(s.float()).all() and q[:, 3].abs().sum() == 0


def test_a_constant_row_gets_a_positive_scale_and_zero_codes():
    """A row of zeros has std 0: its scale is fp16's smallest step (not 0, which made its codes 0/0 = NaN cast
    to int8), so it codes to 0 and dequantizes to 0, on the GPTQ path and the rounding path."""
    W = torch.randn(4, 32)
    W[1] = 0
    for H in (correlated_hessian(32), None):
        q, s = train_gpt.gptq_quantize(W, H, 6, 12.85)
        assert s.float()[1] > 0 and torch.isfinite(s.float()).all()
        assert q[1].abs().sum() == 0 and train_gpt.dequantize_rows(q, s)[1].abs().sum() == 0


def test_quantize_state_routes_tensors():
    L = 4
    state = {"qo_bank": torch.randn(2 * L, 128, 128), "kv_bank": torch.randn(2 * L, 96, 128),
             "mlp_up_bank": torch.randn(L, 256, 128), "mlp_down_bank": torch.randn(L, 128, 256),
             "tok_emb.weight": torch.randn(1100, 128), "q_gain": torch.randn(L, 4)}
    cols = {"attn_in": 128, "attn_out": 128, "mlp_in": 128, "mlp_act": 256}
    hess = {(kind, i): correlated_hessian(c, 512, seed=i) for kind, c in cols.items() for i in range(L)}
    hess[("head_in",)] = correlated_hessian(128, 512)
    q = train_gpt.quantize_state(state, hess, L, 6, 12.85, 8, 20.0)
    assert {k: v["kind"] for k, v in q.items()} == {
        "qo_bank": "int6_rows", "kv_bank": "int6_rows", "mlp_up_bank": "int6_rows", "mlp_down_bank": "int6_rows",
        "tok_emb.weight": "int8_rows", "q_gain": "fp16"}
    assert q["tok_emb.weight"]["q"].abs().max() <= 127 and q["qo_bank"]["q"].abs().max() <= 31
    deq = train_gpt.dequantize_state(q)
    assert all(deq[k].shape == state[k].shape for k in state)
    # the banks were quantized with their own layer's Hessian: equal to quantizing that slice alone
    row = train_gpt.bank_rows("kv_bank", [1], L)[1]  # V of layer 1
    alone, _ = train_gpt.gptq_quantize(state["kv_bank"][row], hess[("attn_in", 1)], 6, 12.85)
    assert torch.equal(alone, q["kv_bank"]["q"][row])


def test_mlp_clip_scale_moves_the_mlp_banks_clip_only():
    """MLP_CLIP_SCALE: the MLP banks' row scales follow their clip (SDClip: proportional); the attention
    banks and the embedding are quantized exactly as without it."""
    torch.manual_seed(0)
    state = {"qo_bank": torch.randn(4, 192, 128), "kv_bank": torch.randn(4, 160, 128),
             "mlp_up_bank": torch.randn(2, 384, 128), "mlp_down_bank": torch.randn(2, 128, 384),
             "tok_emb.weight": torch.randn(600, 128)}  # each over PASSTHROUGH_MAX_NUMEL: GPTQ'd
    base = train_gpt.quantize_state(state, None, 2, 6, 12.0, 7, 14.0)
    tight = train_gpt.quantize_state(state, None, 2, 6, 12.0, 7, 14.0, mlp_clip_scale=0.75)
    for name in state:
        ratio = tight[name]["scale"].float() / base[name]["scale"].float()
        if name.startswith("mlp_"):
            assert torch.allclose(ratio, torch.full_like(ratio, 0.75), rtol=2e-3)
            assert not torch.equal(tight[name]["q"], base[name]["q"])
        else:
            assert torch.equal(tight[name]["q"], base[name]["q"]) and torch.equal(ratio, torch.ones_like(ratio))


def one_layer_cfg() -> "train_gpt.ModelConfig":
    """One layer whose Q/O and MLP banks are past the fp16 pass-through size: every try GPTQs them."""
    return train_gpt.ModelConfig(vocab_size=256, num_layers=1, model_dim=192, num_heads=4, num_kv_heads=2, mlp_mult=2,
                                 mlp_leaky_slope=0.5, rope_base=1e4, rope_dims=0, logit_softcap=30.0,
                                 qk_gain_init=1.0, tied_embed_init_std=0.5, ln_scale=True, skip_gates=True,
                                 xsa_last_n=0, num_loops=0, loop_start=0, loop_end=0, parallel_residual_start=-1)


def test_clip_search_lands_under_the_cap(monkeypatch):
    """Shrink the cap below the first try: the search must raise the clip until the blob fits, and
    the returned blob is the smallest-clip one that fits. One layer is enough: its Q/O and MLP banks are
    past the fp16 pass-through size."""
    torch.manual_seed(0)
    cfg = one_layer_cfg()
    state = {k: torch.randn_like(v) for k, v in train_gpt.GPT(cfg).state_dict().items()}
    lines = []
    hp = train_gpt.Hyperparameters({"CLIP_SEARCH_STEPS": "0"})
    first, k0 = train_gpt.quantize_within_budget(state, {}, cfg, hp, 0, lines.append)
    monkeypatch.setattr(train_gpt, "ARTIFACT_LIMIT_BYTES", len(first) - 3000)
    monkeypatch.setattr(train_gpt, "CLIP_SEARCH_HEADROOM", 1500)
    hp = train_gpt.Hyperparameters({"CLIP_SEARCH_STEPS": "6"})
    n = len(lines)  # the search's own lines (LQER, on by default, logs one before each try)
    blob, k = train_gpt.quantize_within_budget(state, {}, cfg, hp, 0, lines.append)
    tries = [(float(l.split()[1].split(":")[1]), int(l.split()[2].split(":")[1])) for l in lines[n:] if l.startswith("gptq_try")]
    assert len(blob) <= train_gpt.ARTIFACT_LIMIT_BYTES and k > k0
    fitting = [kk for kk, size in tries if size <= train_gpt.ARTIFACT_LIMIT_BYTES]
    assert abs(k - min(fitting)) < 1e-3
    sizes = [size for _, size in sorted(tries)]
    assert sizes == sorted(sizes, reverse=True)  # size falls as the clip rises


def test_far_under_the_cap_the_search_keeps_the_clip_of_least_output_error():
    """A small model far under the cap: each fitting try steps the clip down 15% for precision, until clipping
    costs more than it buys. The search stops at the first fitting try worse than the best and returns the best
    by output error (it returned the last, smallest clip: 4x the error of the best it had tried on a trained tiny
    model, results/2026-12-07_clip_search_cpu/)."""
    torch.manual_seed(0)
    cfg = one_layer_cfg()
    state = {k: torch.randn_like(v) for k, v in train_gpt.GPT(cfg).state_dict().items()}
    cols = {("attn_in", 0): 192, ("attn_out", 0): 192, ("mlp_in", 0): 192, ("mlp_act", 0): 384, ("head_in",): 192}
    hess = {key: correlated_hessian(c, seed=i) / 4096 for i, (key, c) in enumerate(cols.items())}
    lines = []
    hp = train_gpt.Hyperparameters({"CLIP_SEARCH_STEPS": "20", "LQER_TOP_K": "0"})
    blob, k = train_gpt.quantize_within_budget(state, hess, cfg, hp, 0, lines.append)
    tries = [(float(l.split()[1].split(":")[1]), float(l.split()[-1].split(":")[1]))
             for l in lines if l.startswith("gptq_try")]
    assert len(blob) < train_gpt.ARTIFACT_LIMIT_BYTES // 10 and 3 <= len(tries) < 21  # all fit; it stopped early
    errs = [e for _, e in tries]
    assert errs[:-1] == sorted(errs[:-1], reverse=True) and errs[-1] > errs[-2]  # down, then the turn that ends it
    assert k == pytest.approx(tries[-2][0], abs=1e-4) and k > tries[-1][0] > 1.0  # the best tried, not the last
    best = train_gpt.quantize_state(state, hess, 1, hp.matrix_bits, k, hp.embed_bits, hp.embed_clip_sigmas)
    assert abs(train_gpt.output_error(state, best, hess, 1) - errs[-2]) < 1e-6 * errs[-2]


def test_next_clip_interpolates_between_a_fit_and_a_miss_and_steps_at_most_15_percent():
    cap = 16_000_000
    k = train_gpt.next_clip([(12.85, 15_849_269), (11.17, 16_533_786)], cap - 50_000)  # bytes fall as the clip rises
    assert 11.17 + 0.1 * 1.68 < k < 12.85 - 0.1 * 1.68 and abs(k - 12.6) < 0.05  # where bytes cross the target
    assert train_gpt.next_clip([(12.0, 15_000_000)], cap) == pytest.approx(12.0 / 1.15)  # far under: 15% down
    assert train_gpt.next_clip([(12.0, 17_000_000)], cap) == pytest.approx(12.0 * 1.15)
    assert 12.0 < train_gpt.next_clip([(12.0, 16_010_000)], cap) < 12.05  # close: a small step, the right way
    assert train_gpt.next_clip([(12.0, 16_200_000), (12.2, 16_200_000)], cap) > 12.2  # a flat response still moves


def test_clip_search_reaches_the_band_in_fewer_tries_than_bisection():
    """On a smooth size response (bytes ~ clip^-0.27, about the bench artifacts') the search lands within
    CLIP_SEARCH_HEADROOM under the cap in 2-3 tries from a start near it, 3-4 from far (stepping 15% and
    then bisecting, the search before this one, took 3-5 and 6-7 on the same responses to land within 100 KB)."""
    cap, band = 16_000_000, train_gpt.CLIP_SEARCH_HEADROOM
    for start, scale in ((12.85, 0.99), (12.85, 1.02), (9.0, 1.0), (16.0, 0.995)):
        size = lambda k: int(scale * 15_849_269 * (k / 12.85) ** -0.27)  # noqa: E731
        k, tries = start, []
        while not tries or not 0 <= cap - tries[-1][1] < band:
            tries.append((k, size(k)))
            k = train_gpt.next_clip(tries, cap - band // 2)
            assert len(tries) <= 4, tries
        assert len(tries) <= (3 if 11 < start < 14 else 4), tries


def test_ill_conditioned_hessian_gets_more_damping():
    """A rank-deficient H (fewer samples than columns, duplicated features) must still quantize."""
    torch.manual_seed(0)
    X = torch.randn(40, 128)
    X = torch.cat([X, X * 1e3], dim=1)  # 256 columns of rank 40, half of them huge duplicates
    H = torch.stack([X.T @ X, correlated_hessian(256)])
    W = torch.randn(2, 32, 256)
    q, s = train_gpt.gptq_quantize(W, H, 6, 12.85, damp=1e-9)
    assert q.abs().max() <= 31 and torch.isfinite(s.float()).all()
    U = train_gpt.inverse_hessian_factor(H, 1e-9)
    assert torch.isfinite(U).all()


@pytest.mark.parametrize("where,value,field", [
    ((0, 7, 3), 4e6, "mlp_up_bank scale"),  # an outlier whose row scale passes fp16's range
    ((0, 2, 5), float("nan"), "mlp_up_bank scale"),
    ("g", 1e5, "g w"),  # a value kept in fp16, past its range
])
def test_the_export_refuses_what_would_load_as_nan_or_inf(where, value, field):
    """Such a tensor would load as NaN or inf rows and surface only as a non-finite score after the run."""
    torch.manual_seed(0)
    state = {"mlp_up_bank": torch.randn(1, 512, 256) * 0.05, "g": torch.randn(8)}
    if where == "g":
        state["g"][0] = value
    else:
        state["mlp_up_bank"][where] = value
    with pytest.raises(train_gpt.UserError, match=f"export: {field} is not finite in fp16"):
        train_gpt.quantize_state(state, None, 1, 6, 12.35, 7, 14.0)
    state = {"mlp_up_bank": torch.randn(1, 512, 256) * 0.05, "g": torch.randn(8)}
    assert train_gpt.quantize_state(state, None, 1, 6, 12.35, 7, 14.0)["g"]["kind"] == "fp16"  # finite: exported


def test_gptq_damp_reaches_each_class_of_matrix():
    """GPTQ_DAMP: one value damps every GPTQ'd matrix alike (0.01 is quantize_state's default, bit for bit);
    three damp the attention, MLP and embedding matrices each with its own, so a change to one moves that
    class's codes only. Anything else is refused, naming the knob."""
    from test_lqer import hessians, random_state, small_cfg
    cfg = small_cfg()
    state, hess = random_state(cfg), hessians(cfg)

    def codes(damp: str) -> dict:
        damps = train_gpt.gptq_damps(train_gpt.Hyperparameters(dict(GPTQ_DAMP=damp)))
        q = train_gpt.quantize_state(state, hess, cfg.num_layers, 6, 12.85, 7, 14.0, damps=damps)
        return {name: e["q"] for name, e in q.items() if "q" in e}

    base = {name: e["q"] for name, e in train_gpt.quantize_state(state, hess, cfg.num_layers, 6, 12.85, 7, 14.0).items()
            if "q" in e}
    assert set(base) == {"qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank", "tok_emb.weight"}
    assert all(torch.equal(base[n], q) for n, q in codes("0.01").items())
    assert all(torch.equal(base[n], q) for n, q in codes("0.01, 0.01, 0.01").items())
    for damp, moved in (("0.5,0.01,0.01", {"qo_bank", "kv_bank"}), ("0.01,0.5,0.01", {"mlp_up_bank", "mlp_down_bank"}),
                        ("0.01,0.01,0.5", {"tok_emb.weight"})):
        assert {n for n, q in codes(damp).items() if not torch.equal(base[n], q)} == moved, damp
    for bad in ("0", "-0.1", "1.5", "x", "0.01,0.02", "0.01,,0.02"):
        with pytest.raises(train_gpt.UserError, match="GPTQ_DAMP"):
            train_gpt.Hyperparameters(dict(GPTQ_DAMP=bad))
