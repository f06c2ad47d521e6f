"""LQER: low-rank corrections of the largest GPTQ errors, their INT2/INT4 storage and the artifact."""
import copy
import dataclasses
import types

import pytest
import torch

import train_gpt
from test_quant import correlated_hessian

L = 2  # layers of the test matrices


def small_cfg():
    return train_gpt.ModelConfig(vocab_size=512, num_layers=L, model_dim=192, num_heads=4, num_kv_heads=2, mlp_mult=2,
                                 rope_dims=0, xsa_last_n=0, num_loops=0, loop_start=0, loop_end=0,
                                 parallel_residual_start=-1, smear_gate=False, attn_gate=False, asym_logit=False)


def random_state(cfg, seed=0):
    """A model's tensors drawn at random (a fresh GPT zero-inits some matrices: no error to correct)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in train_gpt.GPT(cfg).state_dict().items()}


def hessians(cfg, seed=0):
    """Correlated input Hessians for every GPTQ'd matrix: GPTQ then shapes its error, as on a real model."""
    d, hidden = cfg.model_dim, cfg.model_dim * cfg.mlp_mult
    cols = {"attn_in": d, "attn_out": d, "mlp_in": d, "mlp_act": hidden}
    out = {(kind, i): correlated_hessian(c, 512, seed=seed + 10 * i + j)
           for j, (kind, c) in enumerate(cols.items()) for i in range(cfg.num_layers)}
    out[("head_in",)] = correlated_hessian(d, 512, seed=seed + 99)
    return out


CLIP = train_gpt.Hyperparameters({}).matrix_clip_sigmas  # where the clip search starts: its first try


def quantized(cfg, state, hess):
    return train_gpt.quantize_state(state, hess, cfg.num_layers, 6, CLIP, 8, 20.0)


@pytest.fixture
def quick_pack(monkeypatch):
    """pack_artifact at brotli quality 1 instead of 11 (~1.5 s a pack of these matrices): for the tests
    that only need a blob to read back or compare. Lossless compression maps different bodies to
    different blobs at any quality, and unpacking does not depend on it."""
    real = train_gpt.brotli
    monkeypatch.setattr(train_gpt, "brotli", types.SimpleNamespace(
        compress=lambda data, quality=11: real.compress(data, quality=1), decompress=real.decompress,
        Decompressor=real.Decompressor, __version__=real.__version__))


@pytest.fixture(scope="module")
def setup():
    cfg = small_cfg()
    state, hess = random_state(cfg), hessians(cfg)
    return cfg, state, quantized(cfg, state, hess)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 4, 7, 64])
def test_code_packing_round_trips(bits, n):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(lo, hi + 1, (3, n), generator=g, dtype=torch.int8)
    codes[0, : min(n, hi - lo + 1)] = torch.arange(lo, lo + min(n, hi - lo + 1))  # every code value appears
    packed = train_gpt.pack_codes(codes, bits)
    assert packed.dtype == torch.int8 and packed.shape == (3, -(-n * bits // 8)) == (3, train_gpt.packed_width(n, bits))
    assert torch.equal(train_gpt.unpack_codes(packed, bits, n), codes)


def test_group_quantization_covers_the_int4_range():
    x = torch.linspace(-1, 1, 100)
    codes, scale = train_gpt.quantize_groups(x, 32, 4)
    assert codes.shape == (4, 32) and scale.shape == (4,) and scale.dtype == torch.float16
    assert codes.min() == -8 and codes.max() == 7 and torch.all(codes.flatten()[100:] == 0)  # padding is 0
    err = (codes.float() * scale.float()[:, None]).flatten()[:100] - x  # a group's max sits half a step out
    assert torch.all(err.abs() <= scale.float().repeat_interleave(32)[:100] * 0.51)


def test_top_k_is_by_error_norm(setup):
    cfg, state, q = setup
    state = dict(state)
    state["mlp_down_bank"] = state["mlp_down_bank"].clone()
    state["mlp_down_bank"][1] *= 3  # a wider slice has a larger GPTQ error under the same clip sigmas
    q = quantized(cfg, state, hessians(cfg))
    errors = train_gpt.gptq_errors(state, q)
    assert errors[0][1:] == ("mlp_down_bank", 1)
    assert [e[0] for e in errors] == sorted((e[0] for e in errors), reverse=True)
    W = state["qo_bank"][3]  # spot-check one norm: o of layer 1
    expect = torch.linalg.matrix_norm(W - train_gpt.dequantize_rows(q["qo_bank"]["q"][3], q["qo_bank"]["scale"][3]))
    assert next(n for n, name, k in errors if (name, k) == ("qo_bank", 3)) == pytest.approx(expect.item())
    report = train_gpt.apply_lqer(state, q, 3, 4, 64, cfg.num_layers)
    assert [(r["name"], r["slice"]) for r in report] == [(name, k) for _, name, k in errors[:3]]
    assert report[0]["label"] == "down.1"


def test_correction_lowers_the_error_and_leaves_the_rest_alone(setup):
    cfg, state, q = setup
    plain = train_gpt.dequantize_state(q)
    corrected = copy.deepcopy(q)
    report = train_gpt.apply_lqer(state, corrected, 4, 4, 64, cfg.num_layers)
    assert all(r["kept"] for r in report)
    chosen = {(r["name"], r["slice"]) for r in report}
    deq = train_gpt.dequantize_state(corrected)
    for name, t in deq.items():
        assert all(torch.equal(corrected[name][f], q[name][f]) for f in q[name] if f != "kind")  # GPTQ's untouched
        for k in range(t.reshape(-1, *t.shape[-2:]).size(0) if t.ndim >= 2 else 1):
            if (name, k) in chosen:
                W = state[name].reshape(-1, *t.shape[-2:])[k]
                before = torch.linalg.matrix_norm(W - plain[name].reshape(-1, *t.shape[-2:])[k])
                after = torch.linalg.matrix_norm(W - t.reshape(-1, *t.shape[-2:])[k])
                assert after < 0.97 * before, (name, k, before, after)
                r = next(r for r in report if (r["name"], r["slice"]) == (name, k))
                assert r["after"] == pytest.approx(after.item(), rel=1e-4)
            elif t.ndim >= 2:
                assert torch.equal(t.reshape(-1, *t.shape[-2:])[k], plain[name].reshape(-1, *t.shape[-2:])[k])
            else:
                assert torch.equal(t, plain[name])


def test_with_hessians_a_correction_is_kept_only_where_the_output_error_falls(setup):
    """GPTQ puts its error where the inputs are small; a low-rank fit of E can shrink ||E|| and still raise
    tr(E H E^T), what the layer's output feels. With Hessians that error decides and is reported; on these random
    weights some corrections are dropped that the Frobenius norm would keep."""
    cfg, state, q = setup
    hess = hessians(cfg)
    q, plain = copy.deepcopy(q), train_gpt.dequantize_state(q)
    by_norm = train_gpt.apply_lqer(state, copy.deepcopy(q), 6, 4, 64, cfg.num_layers)
    report = train_gpt.apply_lqer(state, q, 6, 4, 64, cfg.num_layers, hess)
    assert [(r["name"], r["slice"]) for r in report] == [(r["name"], r["slice"]) for r in by_norm]
    loaded = train_gpt.dequantize_state(q)
    def out_err(r, deq):
        rows, cols = state[r["name"]].shape[-2:]
        E = (state[r["name"]] - deq[r["name"]]).reshape(-1, rows, cols)[r["slice"]]
        return (E @ hess[train_gpt.hessian_keys(r["name"], cfg.num_layers)[r["slice"]]] * E).sum().item()
    for r in report:
        assert r["before"] == pytest.approx(out_err(r, plain), rel=1e-4)
        assert r["after"] == pytest.approx(out_err(r, loaded), rel=1e-4)  # what loading gives
        assert r["kept"] == (r["after"] < r["before"])
    assert all(r["kept"] for r in by_norm) and 0 < sum(r["kept"] for r in report) < len(report)


def test_the_activation_fit_leaves_less_output_error(setup):
    """LQER_FIT=activation: A from the SVD of E H^1/2 (rounded and B refitted as the plain fit does), the rank-r
    fit of least output error before rounding: after rounding too it leaves less tr(E H E^T) than the plain fit on
    every slice here, kept as many or more, and what loading adds is what the report measured."""
    cfg, state, q = setup
    hess = hessians(cfg)
    plain_q, aware_q = copy.deepcopy(q), copy.deepcopy(q)
    plain = train_gpt.apply_lqer(state, plain_q, 6, 4, 64, cfg.num_layers, hess)
    aware = train_gpt.apply_lqer(state, aware_q, 6, 4, 64, cfg.num_layers, hess, "activation")
    assert [(r["name"], r["slice"]) for r in aware] == [(r["name"], r["slice"]) for r in plain]
    for p, a in zip(plain, aware):
        assert a["before"] == p["before"] and a["kept"]
        rows, cols = state[a["name"]].shape[-2:]
        E = (state[a["name"]] - train_gpt.dequantize_gptq(q[a["name"]])).reshape(-1, rows, cols)[a["slice"]]
        H = hess[train_gpt.hessian_keys(a["name"], cfg.num_layers)[a["slice"]]]
        A, B = train_gpt.lqer_factors(train_gpt.lqer_fit(E, 4, 64), rows, cols)
        assert a["after"] < ((E - A @ B) @ H * (E - A @ B)).sum().item()  # the plain fit's, kept or not
    loaded = train_gpt.dequantize_state(aware_q)
    for a in aware:
        rows, cols = state[a["name"]].shape[-2:]
        E = (state[a["name"]] - loaded[a["name"]]).reshape(-1, rows, cols)[a["slice"]]
        H = hess[train_gpt.hessian_keys(a["name"], cfg.num_layers)[a["slice"]]]
        assert a["after"] == pytest.approx((E @ H * E).sum().item(), rel=1e-4)


def test_rank_is_capped_by_the_matrix():
    E = torch.randn(6, 3)
    fields = train_gpt.lqer_fit(E, 8, 4)
    A, B = train_gpt.lqer_factors(fields, 6, 3)
    assert A.shape == (6, 3) and B.shape == (3, 3)


def test_a_correction_that_does_not_help_is_dropped(setup, monkeypatch):
    """Factors that would raise the error (here: fitted to -E) are left out and logged as not kept."""
    cfg, state, q = setup
    q = copy.deepcopy(q)
    fit = train_gpt.lqer_fit
    monkeypatch.setattr(train_gpt, "lqer_fit", lambda E, rank, group, H=None: fit(-E, rank, group, H))
    report = train_gpt.apply_lqer(state, q, 2, 4, 64, cfg.num_layers)
    assert len(report) == 2 and not any(r["kept"] for r in report)
    assert all(r["after"] == r["before"] for r in report)
    assert not any(f.startswith("lqer") for e in q.values() for f in e)
    assert "->dropped" in train_gpt.lqer_line(report, q, train_gpt.Hyperparameters({"LQER_TOP_K": "2"}))


def test_lqer_survives_the_artifact(setup, tmp_path, quick_pack):
    cfg, state, q = setup
    q = copy.deepcopy(q)
    train_gpt.apply_lqer(state, q, 3, 4, 16, cfg.num_layers)
    path = tmp_path / "lqer.br"
    path.write_bytes(train_gpt.pack_artifact(q, dict(model=dataclasses.asdict(cfg))))
    back, meta = train_gpt.read_artifact(path)
    assert {n: sorted(e) for n, e in back.items()} == {n: sorted(e) for n, e in q.items()}
    expect = train_gpt.dequantize_state(q)
    model = train_gpt.artifact_model(back, meta, path, torch.device("cpu"), train_gpt.causal_attention)
    for name, t in model.state_dict().items():
        assert torch.equal(t, expect[name]), name


def test_knob_off_writes_todays_bytes(setup, quick_pack):
    """LQER_TOP_K=0 must not change a byte: the blob equals GPTQ + pack without any LQER code."""
    cfg, state, _ = setup
    hess = {}
    hp = train_gpt.Hyperparameters({"CLIP_SEARCH_STEPS": "0", "LQER_TOP_K": "0", "EMBED_BITS": "8", "EMBED_CLIP_SIGMAS": "20"})
    blob, k = train_gpt.quantize_within_budget(state, hess, cfg, hp, 0, lambda line: None)
    config = dict(model=dataclasses.asdict(cfg), train_seq_len=2048, matrix_clip_sigmas=CLIP, mlp_clip_scale=1.0)
    assert blob == train_gpt.pack_artifact(quantized(cfg, state, hess), config)


def test_budget_counts_the_factors(setup, monkeypatch):
    """With LQER on, every clip-search try packs the factors; the `lqer:` line names the chosen
    matrices, their error before -> after, and bytes close to what the artifact grew by."""
    cfg, state, _ = setup
    hess = {}  # plain rounding: quicker, and the budget does not care how the error was made
    off, _ = train_gpt.quantize_within_budget(state, hess, cfg, train_gpt.Hyperparameters({"CLIP_SEARCH_STEPS": "0", "LQER_TOP_K": "0"}),
                                              0, lambda line: None)
    lines = []
    hp = train_gpt.Hyperparameters({"CLIP_SEARCH_STEPS": "0", "LQER_TOP_K": "3"})
    on, _ = train_gpt.quantize_within_budget(state, hess, cfg, hp, 0, lines.append)
    lqer = [line for line in lines if line.startswith("lqer:")]
    assert len(lqer) == 1 and lqer[0].startswith("lqer: top_k:3 rank:4 group:64 ")
    chosen = train_gpt.gptq_errors(state, quantized(cfg, state, hess))[:3]
    for norm, name, k in chosen:
        assert f" {train_gpt.slice_label(name, k, cfg.num_layers)}:{norm:.6g}->" in lqer[0]
    added = len(on) - len(off)
    estimate = int(lqer[0].rsplit("bytes:", 1)[1])
    assert added > 0 and abs(estimate - added) < 0.15 * added + 100, (estimate, added)
    gptq_try = next(line for line in lines if line.startswith("gptq_try"))
    assert f"artifact_bytes:{len(on)} " in gptq_try  # the cap is checked on the blob with the factors
    # A cap between the two sizes: the search must move the clip until the blob with LQER fits.
    monkeypatch.setattr(train_gpt, "ARTIFACT_LIMIT_BYTES", len(on) - added // 2)
    hp = train_gpt.Hyperparameters({"CLIP_SEARCH_STEPS": "3", "LQER_TOP_K": "3"})
    blob, k = train_gpt.quantize_within_budget(state, hess, cfg, hp, 0, lambda line: None)
    assert len(blob) <= train_gpt.ARTIFACT_LIMIT_BYTES and k > CLIP
    assert any(f.startswith("lqer") for e in train_gpt.unpack_artifact(blob)[0].values() for f in e)


def corruptions(q):
    """(description, a copy of q with one LQER entry broken)."""
    name = next(n for n, e in q.items() if any(f.startswith("lqer") for f in e))
    k = next(int(f[4:].split(".")[0]) for f in q[name] if f.startswith("lqer"))
    n_slices = q[name]["q"].reshape(-1, *q[name]["q"].shape[-2:]).size(0)

    def edit(fn):
        bad = copy.deepcopy(q)
        fn(bad[name])
        return bad
    yield "expected a, a_scale, b, b_scale", edit(lambda e: e.pop(f"lqer{k}.b_scale"))
    yield "a has shape", edit(lambda e: e.update({f"lqer{k}.a": e[f"lqer{k}.a"][:, :-1].contiguous()}))
    yield "b has shape", edit(lambda e: e.update({f"lqer{k}.b": e[f"lqer{k}.b"][:-1].contiguous()}))
    yield "scales do not match", edit(lambda e: e.update({f"lqer{k}.a_scale": e[f"lqer{k}.a_scale"].repeat(2)}))
    yield "non-finite scale", edit(lambda e: e[f"lqer{k}.b_scale"].fill_(float("inf")))
    yield "element types", edit(lambda e: e.update({f"lqer{k}.b_scale": e[f"lqer{k}.b_scale"].to(torch.int8)}))
    yield f"slice {n_slices} of a tensor of {n_slices}", edit(
        lambda e: e.update({f"lqer{n_slices}.{f}": e.pop(f"lqer{k}.{f}") for f in ("a", "a_scale", "b", "b_scale")}))
    yield "unknown fields", edit(  # a second copy of the slice under a zero-padded number (it would merge into it)
        lambda e: e.update({f"lqer0{k}.{f}": e[f"lqer{k}.{f}"].clone() for f in ("a", "a_scale", "b", "b_scale")}))
    bad = copy.deepcopy(q)
    bad["skip_weights"]["lqer0.a"] = bad[name][f"lqer{k}.a"]
    yield "fp16 holds one float16 w", bad  # LQER on a tensor that is not a GPTQ'd matrix: entry_problem's


def test_a_corrupted_lqer_entry_is_a_one_line_error(setup, quick_pack):
    cfg, state, q = setup
    q = copy.deepcopy(q)
    train_gpt.apply_lqer(state, q, 2, 4, 64, cfg.num_layers)
    assert "skip_weights" in q and all(n.startswith("mlp") for n in q if any(f.startswith("lqer") for f in q[n]))
    for why, bad in corruptions(q):
        with pytest.raises(train_gpt.UserError) as err:
            small = {n: e for n, e in bad.items() if n in ("skip_weights", "mlp_up_bank", "mlp_down_bank")}
            train_gpt.unpack_artifact(train_gpt.pack_artifact(small, {}), "x.br")
        msg = str(err.value)
        assert msg.startswith("x.br: corrupted ") and why in msg and "\n" not in msg, msg
