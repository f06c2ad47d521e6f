"""Model invariants: causality with every feature on, the loop order, XSA, Newton-Schulz."""
import dataclasses
import importlib.util
import os
import sys
import types

import pytest
import torch

import train_gpt
from conftest import run_script


def small_cfg(**kw) -> train_gpt.ModelConfig:
    base = dict(vocab_size=64, num_layers=6, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2,
                mlp_leaky_slope=0.5, rope_base=10000.0, rope_dims=4, logit_softcap=30.0, qk_gain_init=5.0,
                tied_embed_init_std=0.5, ln_scale=True, skip_gates=True, xsa_last_n=6, num_loops=2,
                loop_start=2, loop_end=3, parallel_residual_start=4,
                smear_gate=False, attn_gate=False, asym_logit=False,  # the April stack: the later levers test themselves
                x0_mix=True)
    return train_gpt.ModelConfig(**base | kw)


def plain_xsa(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA as first written: y [B,T,Hkv,G,hd] minus its projection on the normalized v [B,T,Hkv,hd]."""
    vn = torch.nn.functional.normalize(v, dim=-1).unsqueeze(-2)
    return y - (y * vn).sum(-1, keepdim=True) * vn


def randomized(cfg) -> train_gpt.GPT:
    """A model with every parameter random (zero-init projections would hide leaks)."""
    torch.manual_seed(0)
    model = train_gpt.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("looped", [False, True])
@pytest.mark.parametrize("features", [{}, dict(xsa_last_n=0, num_loops=0, parallel_residual_start=-1,
                                               skip_gates=False, ln_scale=False, rope_dims=0)])
def test_causal(looped, features):
    model = randomized(small_cfg(**features))
    x = torch.randint(0, 64, (2, 24))
    t = 11
    y = x.clone()
    y[:, t + 1:] = torch.randint(0, 64, (2, 24 - t - 1))
    with torch.no_grad():
        hx, hy = model.hidden(x, looped), model.hidden(y, looped)
    assert torch.equal(hx[:, :t + 1], hy[:, :t + 1])
    assert not torch.allclose(hx[:, t + 1:], hy[:, t + 1:])  # the change is visible downstream


def test_layer_order():
    cfg = small_cfg(num_layers=11, loop_start=3, loop_end=5, num_loops=2)
    assert cfg.layer_order(False) == list(range(11))
    assert cfg.layer_order(True) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert cfg.num_skips() == 8  # 17 virtual layers: 8 encoder slots
    assert small_cfg(num_layers=9, num_loops=0).num_skips() == 4  # the baseline's 4 skips


def test_xsa_removes_own_value_component():
    """With XSA every head output is orthogonal to its token's own (normalized) value vector."""
    cfg = small_cfg(xsa_last_n=6, num_loops=0)
    model = randomized(cfg)
    captured = {}
    real_linear = torch.nn.functional.linear

    def spy(x, w, *a):
        if w.data_ptr() == model.w("o", 5).data_ptr():
            captured["y"] = x
        if w.data_ptr() == model.w("v", 5).data_ptr():
            captured["v"] = real_linear(x, w, *a)
        return real_linear(x, w, *a)

    torch.nn.functional.linear = spy
    try:
        with torch.no_grad():
            model.hidden(torch.randint(0, 64, (2, 16)), looped=False)
    finally:
        torch.nn.functional.linear = real_linear
    B, T = 2, 16
    y = captured["y"].view(B, T, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
    v = captured["v"].view(B, T, cfg.num_kv_heads, 1, cfg.head_dim)
    along_v = (y * v).sum(-1) / v.norm(dim=-1)  # component of each head output along its own value
    assert along_v.abs().max() < 1e-5 * y.norm(dim=-1).max()
    assert y[:, 1:].norm(dim=-1).min() > 1e-3  # (token 0 sees only itself, so XSA zeroes it)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_xsa_op_matches_the_plain_formula(groups):
    """The XSA op's values and its written-out backward (here the torch formula, as on CPU) equal
    autograd of the normalize-then-project formula (float64, a zero value vector included, where the
    norm is clamped), pass gradcheck and the custom-op checks, and keep the input dtype for bf16."""
    torch.manual_seed(0)
    y = torch.randn(2, 5, 3, groups, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    v[0, 1, 2] = 0
    v.requires_grad_(True)
    out = train_gpt.xsa(y, v)
    ref = plain_xsa(y, v)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (y, v), grad)
    want = torch.autograd.grad(ref, (y, v), grad)
    assert torch.allclose(out, ref, atol=1e-12)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-10)
    assert torch.autograd.gradcheck(train_gpt.xsa, (y[:1, :3], v[:1, :3]))
    torch.library.opcheck(train_gpt.xsa, (y[:1, :3], v[:1, :3]))
    yb, vb = y.detach().bfloat16().requires_grad_(), v.detach().bfloat16().requires_grad_()
    ob = train_gpt.xsa(yb, vb)
    ob.backward(grad.bfloat16())
    assert ob.dtype == yb.grad.dtype == vb.grad.dtype == torch.bfloat16
    assert torch.allclose(ob.double(), ref, atol=0.05)


def test_xsa_op_compiles_to_the_eager_result():
    """The training forward is compiled (fullgraph): inductor's code (CPU here) gives eager's values
    and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    y = torch.randn(2, 16, 2, 2, 16, requires_grad=True)
    v = torch.randn(2, 16, 2, 16, requires_grad=True)
    grad = torch.randn(2, 16, 2, 2, 16)
    results = []

    def xsa(y, v):
        return train_gpt.xsa(y, v)

    for fn in (xsa, torch.compile(xsa, fullgraph=True)):
        out = fn(y, v)
        results.append((out, *torch.autograd.grad(out, (y, v), grad)))
    for eager, compiled in zip(*results):
        assert torch.allclose(eager, compiled, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available() or train_gpt.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("groups,strided", [(2, True), (2, False), (1, True), (4, False)])
def test_xsa_kernels_match_the_torch_formula(groups, strided):
    """On CUDA the op runs one Triton kernel each way: bf16 values and gradients match the float32
    torch formula, for v contiguous or read in place from a wider projection output (strided: the
    kernel takes any per-token stride), with a zero value vector; the op also passes the custom-op
    checks there."""
    torch.manual_seed(0)
    B, T, Hkv, hd = 2, 33, 4, 64  # rows not a multiple of the kernel's block
    dev = torch.device("cuda")
    y = torch.randn(B, T, Hkv, groups, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
    qkv = torch.randn(B, T, Hkv * hd * (groups + 2), device=dev, dtype=torch.bfloat16)
    v = qkv[..., -Hkv * hd:].view(B, T, Hkv, hd) if strided else torch.randn(B, T, Hkv, hd, device=dev,
                                                                            dtype=torch.bfloat16)
    with torch.no_grad():
        v[0, 3, 1] = 0
    v.requires_grad_(True)
    grad = torch.randn(B, T, Hkv, groups, hd, device=dev, dtype=torch.bfloat16)
    out = train_gpt.xsa(y, v)
    dy, dv = torch.autograd.grad(out, (y, v), grad)
    yf, vf = y.detach().float().requires_grad_(), v.detach().float().requires_grad_()
    ref = train_gpt.xsa_reference(yf, vf)
    ry, rv = torch.autograd.grad(ref, (yf, vf), grad.float())
    for got, want in ((out, ref), (dy, ry), (dv, rv)):
        assert got.dtype == torch.bfloat16
        assert (got.float() - want).abs().max() <= 0.02 * want.abs().max() + 1e-3
    torch.library.opcheck(train_gpt.xsa, (y, v))


def test_attention_matches_the_plain_composition():
    """The block's attention (with the XSA op) equals the plain composition: Q, K and V each from its
    bank matrix, q/k RMS norm, partial RoPE, QK gain, causal attention with K/V repeated to the query
    heads, the normalize-then-project XSA and the output projection."""
    cfg = small_cfg(num_loops=0)
    model = randomized(cfg)
    F = torch.nn.functional
    B, T, H, Hkv, hd, i = 2, 12, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 5
    x = torch.randn(B, T, cfg.model_dim)
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), model.inv_freq)
    cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
    with torch.no_grad():
        got = model._attention(i, x, cos, sin, None)
        q = F.linear(x, model.w("q", i)).view(B, T, H, hd)
        k = F.linear(x, model.w("k", i)).view(B, T, Hkv, hd)
        v = F.linear(x, model.w("v", i)).view(B, T, Hkv, hd)
        norm = lambda t: F.rms_norm(t, (hd,))  # noqa: E731
        q = train_gpt.apply_rope(norm(q), cos, sin, cfg.rope_dims) * model.q_gain[i][:, None]
        k = train_gpt.apply_rope(norm(k), cos, sin, cfg.rope_dims)
        y = plain_xsa(reference_attention(q, k, v).reshape(B, T, Hkv, H // Hkv, hd), v).reshape(B, T, H * hd)
        want = F.linear(y, model.w("o", i))
    assert torch.allclose(got, want, atol=1e-5)


def plain_baseline_nll(model, idx, targets):
    """The plain baseline GPT written out layer by layer from the model's weights: residual mix with
    x0, pre-norm attention (q/k RMS norm, full RoPE, per-head q gain, causal GQA) and relu^2 MLP added
    sequentially with their gains, U-Net skips added with weights (no gates), final norm, tied head,
    softcap, per-token cross entropy."""
    F, cfg = torch.nn.functional, model.cfg
    L, H, Hkv, hd = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    B, T = idx.shape
    norm = lambda t: F.rms_norm(t, (t.size(-1),))  # noqa: E731
    ang = torch.arange(T, dtype=torch.float32)[:, None] * cfg.rope_base ** (-torch.arange(0, hd, 2) / hd)
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]

    def rope(t):
        a, b = t.chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)

    x = x0 = norm(model.tok_emb.weight[idx])
    skips = []
    for i in range(L):
        if i >= L // 2 and skips:
            x = x + model.skip_weights[i - L // 2] * skips.pop()
        if model.resid_mix is not None:
            x = model.resid_mix[i, 0] * x + model.resid_mix[i, 1] * x0
        h = norm(x)
        q = rope(norm((h @ model.w("q", i).T).view(B, T, H, hd))) * model.q_gain[i][:, None]
        k = rope(norm((h @ model.w("k", i).T).view(B, T, Hkv, hd)))
        v = (h @ model.w("v", i).T).view(B, T, Hkv, hd)
        y = reference_attention(q, k, v)
        x = x + model.attn_scale[i] * (y.reshape(B, T, H * hd) @ model.w("o", i).T)
        x = x + model.mlp_scale[i] * (torch.relu(norm(x) @ model.w("up", i).T).square() @ model.w("down", i).T)
        if i < L // 2:
            skips.append(x)
    logits = norm(x) @ model.tok_emb.weight.T
    return plain_softcap_nll(logits.view(B * T, -1), targets.reshape(-1), cfg.logit_softcap).view(B, T)


def test_features_off_is_the_plain_baseline_forward():
    """With XSA, loops, parallel residuals, skip gates, LN scale, partial RoPE and LeakyReLU off and QK
    gain 1, the model computes the plain baseline GPT (written out above), to float32 rounding; each
    feature switched back on changes the result."""
    off = dict(xsa_last_n=0, num_loops=0, parallel_residual_start=-1, skip_gates=False, ln_scale=False,
               rope_dims=0, mlp_leaky_slope=0.0, qk_gain_init=1.0, num_layers=5)
    model = randomized(small_cfg(**off))
    x, t = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        ref = plain_baseline_nll(model, x, t)
        assert torch.allclose(model(x, t, looped=False), ref, atol=1e-5, rtol=1e-5)
        for feature in (dict(xsa_last_n=2), dict(parallel_residual_start=3), dict(ln_scale=True),
                        dict(rope_dims=4), dict(mlp_leaky_slope=0.5)):
            on = randomized(small_cfg(**off | feature))  # the same weights (same seed and shapes)
            assert not torch.allclose(on(x, t, looped=False), ref, atol=1e-3), feature


@pytest.mark.parametrize("schedule,lo,hi", [("quintic", 0.6, 1.25), ("polar", 0.8, 1.2)])
def test_newton_schulz_near_orthogonal(schedule, lo, hi):
    torch.manual_seed(0)
    G = torch.randn(3, 32, 96)
    X = train_gpt.newton_schulz(G, 5, schedule)
    sv = torch.linalg.svdvals(X)
    assert sv.min() > lo and sv.max() < hi  # quintic: ~[0.68, 1.04] here; polar: ~[0.86, 1.14]
    Xt = train_gpt.newton_schulz(G.mT, 5, schedule)
    assert torch.allclose(Xt, X.mT, atol=1e-5)


def test_polar_express_is_closer_to_orthogonal_than_quintic():
    """Singular values spread over 1..0.01 (a conditioned momentum matrix): in the same five
    iterations Polar Express lifts the smallest further and halves the mean distance from 1; more
    iterations (its last polynomial repeated) settle them closer still without overshooting."""
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(128, 128))
    V, _ = torch.linalg.qr(torch.randn(128, 128))
    G = ((U * torch.logspace(0, -2, 128)) @ V.T)[None]
    sv = {s: torch.linalg.svdvals(train_gpt.newton_schulz(G, 5, s)) for s in ("quintic", "polar")}
    dist = {s: (v - 1).abs().mean() for s, v in sv.items()}
    assert sv["polar"].min() > sv["quintic"].min() + 0.1 and dist["polar"] < 0.6 * dist["quintic"], dist
    sv8 = torch.linalg.svdvals(train_gpt.newton_schulz(G, 8, "polar"))
    assert (sv8 - 1).abs().mean() < dist["polar"] and sv8.max() < 1.1


def test_muon_direction_compiled_matches_eager_without_recompiling():
    """The Trainer compiles muon_direction on CUDA; the momentum is a 0-d tensor so that its warm-up
    schedule (a new value every step) reuses one graph. Here on CPU (inductor): the compiled update and
    momentum buffer match eager for two momenta, and the second momentum builds no new graph. Two
    Newton-Schulz steps, not the default five: each step's coefficients are constants of its own kernels
    (a compile each on CPU), and two steps already take the schedule's per-step coefficients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    compiled = torch.compile(train_gpt.muon_direction, dynamic=False)
    grad = torch.randn(3, 16, 48)
    buf_eager = torch.randn(3, 16, 48)
    buf_compiled = buf_eager.clone()
    graphs = []
    for mom in (0.92, 0.95):
        m = torch.tensor(mom)
        ref = train_gpt.muon_direction(grad, buf_eager, m, 2, True, "polar")
        out = compiled(grad, buf_compiled, m, 2, True, "polar")
        graphs.append(train_gpt.compiled_graph_count())
        assert torch.allclose(out, ref, atol=1e-4) and torch.allclose(buf_compiled, buf_eager, atol=1e-6)
    assert graphs[1] == graphs[0]  # a new momentum value: no recompile
    # Zero Newton-Schulz steps leave only the Frobenius normalization (quintic: no safety factor), so
    # the Nesterov direction shows.
    buf0, m = torch.randn(3, 16, 48), 0.9
    nesterov = grad + m * (m * buf0 + grad)
    plain = train_gpt.muon_direction(grad, buf0.clone(), torch.tensor(m), 0, False, "quintic")
    assert torch.allclose(plain, nesterov / nesterov.norm(dim=(-2, -1), keepdim=True), atol=1e-6)
    rows = train_gpt.muon_direction(grad, buf0.clone(), torch.tensor(m), 0, True, "quintic")  # MuonEq-R: equal row norms
    assert torch.allclose(rows.norm(dim=-1), torch.full((3, 16), 16 ** -0.5), atol=1e-5)


def plain_softcap_nll(logits, targets, cap):
    z = cap * torch.tanh(logits.float() / cap)
    return torch.nn.functional.cross_entropy(z, targets, reduction="none")


def test_forward_returns_per_token_nll():
    model = randomized(small_cfg())
    x = torch.randint(0, 64, (2, 8))
    nll = model(x, x, looped=True)
    logits = torch.nn.functional.linear(model.hidden(x, looped=True), model.tok_emb.weight)
    ref = plain_softcap_nll(logits.view(-1, 64), x.view(-1), 30.0).view(2, 8)
    assert nll.shape == (2, 8) and torch.allclose(nll, ref, atol=1e-5)


@pytest.mark.parametrize("compiled,cap", [(False, 30.0), (True, 30.0), (False, 50.0)])
def test_softcap_cross_entropy_matches_plain_autograd(compiled, cap):
    """The recomputing loss gives the plain formula's values and logit gradients, for float32 and bf16
    logits (the training dtype: gradient returned in bf16), eager and compiled (CPU), with the one-pass
    log-sum-exp (cap <= 40) and without it."""
    torch.manual_seed(0)
    fn = train_gpt.SoftcapCrossEntropy.apply
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True)
    targets = torch.randint(0, 50, (24,))
    base = torch.randn(24, 50) * 1.3 * cap  # well past the cap, where tanh bends
    base[0] = -5 * cap  # a row pinned at -cap: the one-pass log-sum-exp must not underflow
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-5)):
        logits = base.to(dtype, copy=True).requires_grad_()
        weight = torch.rand(24)  # a non-uniform upstream gradient
        out = fn(logits, targets, cap)
        (out * weight).sum().backward()
        ref_logits = logits.detach().clone().requires_grad_()
        ref = plain_softcap_nll(ref_logits, targets, cap)
        (ref * weight).sum().backward()
        assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=tol)
        assert logits.grad.dtype == dtype
        assert torch.allclose(logits.grad.float(), ref_logits.grad.float(), atol=1e-2 if dtype == torch.bfloat16 else tol)


WARM_START = """
import sys, torch, train_gpt
train_gpt.configure_inductor()
attend = train_gpt.pinned_attention(*[getattr(torch.nn.attention.SDPBackend, n) for n in sys.argv[1].split(",")])
torch.manual_seed(0)
q, k, v = torch.randn(2, 16, 4, 8, requires_grad=True), torch.randn(2, 16, 2, 8), torch.randn(2, 16, 2, 8)
head, targets = torch.randn(32, 32), torch.randint(0, 32, (32,))
def loss(q, k, v):
    logits = attend(q, k, v).reshape(32, 32) @ head
    return train_gpt.SoftcapCrossEntropy.apply(logits, targets, 30.0).sum()
torch.compile(loss, fullgraph=True)(q, k, v).backward()
print(train_gpt.cache_counts_line(), f"grad:{q.grad.square().sum().item():.6f}",
      f"flash_after:{int(torch.backends.cuda.flash_sdp_enabled())}")
if len(sys.argv) > 2:  # then another kernel list in the same process: its counts alone on a second line
    torch._dynamo.reset()
    before = train_gpt.compile_cache_counts()
    attend = train_gpt.pinned_attention(*[getattr(torch.nn.attention.SDPBackend, n) for n in sys.argv[2].split(",")])
    torch.compile(loss, fullgraph=True)(q, k, v).backward()
    print(train_gpt.cache_counts_line(before))
"""


def test_a_warm_start_takes_the_training_graph_from_the_autograd_cache(tmp_path):
    """configure_inductor lets AOTAutograd's cache hold graphs like training's: with our autograd.Function (the
    softcap loss) and attention pinned to SDPA kernels (ATTN_BACKEND=sdpa_cudnn: sdpa_kernel()'s helpers in the
    graph). Either one alone made it skip the graph, so every start re-traced and re-partitioned it. A second
    process on the same Inductor cache folder takes the joint graph from it, with the same gradients and the
    kernel switches as they were after the call; another kernel list is another graph (a miss, never the first's:
    compiled after it in the first process)."""
    # a fresh cache folder; Inductor's scalar C++ (no probe of the CPU's vector instructions to rebuild in it)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), TORCHINDUCTOR_VEC_ISA_OK="0",
               OMP_NUM_THREADS="1")
    runs = [run_script(["-c", WARM_START, *kernels], env, timeout=300)
            for kernels in (("MATH", "MATH,FLASH_ATTENTION"), ("MATH",))]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    first, other, second = (dict(f.split(":", 1) for f in line.split())
                            for r in runs for line in r.stdout.splitlines())
    assert (first["aot_misses"], first["aot_bypasses"]) == ("1", "0"), first
    assert (second["aot_hits"], second["aot_misses"], second["aot_bypasses"]) == ("1", "0", "0"), second
    assert (other["aot_hits"], other["aot_misses"]) == ("0", "1"), other
    assert first["grad"] == second["grad"] and first["flash_after"] == second["flash_after"] == "1"


def test_residual_dtype_under_bf16_autocast():
    """RESIDUAL_DTYPE=bfloat16 keeps the stream bf16 under bf16 autocast (float32 gains must not promote
    it back), stays close to the float32 stream, and changes nothing without autocast (CPU runs)."""
    x = torch.randint(0, 64, (2, 16))
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = randomized(small_cfg(residual_dtype=dtype))
        with torch.no_grad():
            plain = model.hidden(x, looped=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert model.residual_dtype(x.device) == getattr(torch, dtype)
                out[dtype] = model.hidden(x, looped=True)
        assert plain.dtype == torch.float32
        out[dtype + "_plain"] = plain
    assert torch.equal(out["float32_plain"], out["bfloat16_plain"])
    assert out["float32"].dtype == torch.float32 and out["bfloat16"].dtype == torch.bfloat16
    err = (out["bfloat16"].float() - out["float32"]).norm() / out["float32"].norm()
    assert 0 < err < 0.05


def test_config_roundtrips_through_dict():
    cfg = small_cfg()
    assert train_gpt.ModelConfig(**dataclasses.asdict(cfg)) == cfg


def repeat_kv(t, q):
    """K or V [B,T,Hkv,hd] with its heads repeated to q's, in float32."""
    return t.repeat_interleave(q.size(2) // t.size(2), dim=2).float()


def causal_scores(q, k):
    """Scaled scores q.k [B,H,T,S] in float32, the future masked to -inf ([B,T,H,hd] layout, GQA)."""
    scores = torch.einsum("bthd,bshd->bhts", q.float(), repeat_kv(k, q)) / q.size(-1) ** 0.5
    T = q.size(1)
    return scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))


def reference_attention(q, k, v):
    """Plain causal softmax attention, K/V heads repeated to the query heads ([B,T,H,hd] layout)."""
    return torch.einsum("bhts,bshd->bthd", causal_scores(q, k).softmax(-1), repeat_kv(v, q))


@pytest.mark.parametrize("name", [*train_gpt.FLASH_KERNELS, "sdpa", "sdpa_cudnn"])
def test_attention_backends_match_reference(name):
    """Every attention kernel this machine has (cuDNN pinned alone, no fallback) against plain attention."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name in train_gpt.FLASH_KERNELS:
        attend = train_gpt.flash_attention(name) if device.type == "cuda" else None
        if attend is None:
            pytest.skip(f"{name} is not importable here (or needs CUDA)")
    elif name == "sdpa_cudnn" and device.type != "cuda":
        pytest.skip("cuDNN attention needs CUDA")
    else:  # a kernel that is here and fails is a failure, never a skip
        attend = train_gpt.cudnn_attention(fallback=False) if name == "sdpa_cudnn" else train_gpt.causal_attention
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(2, 40, 4, 16, device=device, dtype=dtype)
    k, v = (torch.randn(2, 40, 2, 16, device=device, dtype=dtype) for _ in range(2))
    out = attend(q, k, v)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), reference_attention(q, k, v), atol=tol, rtol=tol)
    if name == "fa4":  # the fake-tensor rule and backward against the real kernels
        torch.library.opcheck(train_gpt.fa4_causal, tuple(t.requires_grad_() for t in (q, k, v)))


def fake_fa4_modules() -> dict:
    """Stand-ins for flash_attn.cute.interface: FA4's forward/backward entry points as plain attention,
    with FA4's calling convention (tensors [B,T,H,hd], lse [B,H,T], extra return values)."""
    def forward(q, k, v, causal, return_lse):
        assert causal and return_lse
        scores = causal_scores(q, k)
        lse = scores.logsumexp(-1)
        out = torch.einsum("bhts,bshd->bthd", (scores - lse[..., None]).exp(), repeat_kv(v, q)).to(q.dtype)
        return out.contiguous(), lse, None, None, None  # FA4 allocates both contiguous

    def backward(q, k, v, out, dout, lse, causal):  # the textbook attention gradients, from the saved lse
        assert causal and out.shape == q.shape and lse.shape == (q.size(0), q.size(2), q.size(1))
        B, T, H, hd = q.shape
        rep, scale, kk = H // k.size(2), hd ** -0.5, repeat_kv(k, q)
        p = (causal_scores(q, k) - lse[..., None]).exp()  # masked scores are -inf: p is 0 there
        dp = torch.einsum("bthd,bshd->bhts", dout.float(), repeat_kv(v, q))
        ds = p * (dp - (dout.float() * out.float()).sum(-1).transpose(1, 2)[..., None])
        dq = torch.einsum("bhts,bshd->bthd", ds, kk) * scale
        dk = torch.einsum("bhts,bthd->bshd", ds, q.float()) * scale
        dv = torch.einsum("bhts,bthd->bshd", p, dout.float())
        dk, dv = (t.view(B, T, H // rep, rep, hd).sum(3) for t in (dk, dv))  # GQA: sum over each group
        return tuple(g.to(t.dtype).contiguous() for g, t in ((dq, q), (dk, k), (dv, v)))

    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = forward, backward
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = interface
    package = types.ModuleType("flash_attn")
    package.cute = cute
    return {"flash_attn": package, "flash_attn.cute": cute, "flash_attn.cute.interface": interface}


def test_fa4_custom_op_matches_reference_gradients_and_traces(monkeypatch):
    """The FA4 wrapper (custom op, fake tensor rule, backward), run over stand-in kernels: values and
    gradients equal plain attention's, torch's opcheck passes, and a fullgraph compile traces it."""
    for name, module in fake_fa4_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    attend = train_gpt.flash_attention("fa4")
    torch.manual_seed(0)
    q = torch.randn(2, 12, 4, 8, requires_grad=True)
    k, v = (torch.randn(2, 12, 2, 8, requires_grad=True) for _ in range(2))
    grad = torch.randn(2, 12, 4, 8)
    out = attend(q, k, v)
    torch.testing.assert_close(out, reference_attention(q, k, v))
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(reference_attention(q, k, v), (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    torch.library.opcheck(train_gpt.fa4_causal, (q, k, v))
    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    out_c = compiled(q, k, v)
    torch.testing.assert_close(out_c, out)
    for g, w in zip(torch.autograd.grad(out_c, (q, k, v), grad), got):
        torch.testing.assert_close(g, w)


def test_fa4_missing_is_none():
    """Without the flash-attn-4 package (CI), fa4 is simply unavailable."""
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("a flash_attn package is installed here")
    assert train_gpt.flash_attention("fa4") is None


def test_sdpa_kernels_that_must_run_on_cpu():
    """torch's own SDPA choice runs on CPU for real; cuDNN, which CPU lacks, raises when pinned without
    fallback and falls back to math with it."""
    q = torch.randn(1, 8, 4, 8)
    k = v = torch.randn(1, 8, 2, 8)
    ref = reference_attention(q, k, v)
    torch.testing.assert_close(train_gpt.causal_attention(q, k, v), ref)
    with pytest.raises(RuntimeError):
        train_gpt.cudnn_attention(fallback=False)(q, k, v)
    torch.testing.assert_close(train_gpt.cudnn_attention()(q, k, v), ref)


def test_pinned_sdpa_kernel_is_part_of_the_compiled_graph():
    """torch.compile must record the pinned kernel in the graph (and so in its cache key): global
    backend flags were not, and a graph cached under one kernel ran under another's name."""
    graphs = {}

    def capture(name):
        def backend(gm, example_inputs):
            graphs[name] = gm.code
            return gm.forward
        return backend

    q = torch.randn(1, 8, 4, 8)
    k = v = torch.randn(1, 8, 2, 8)
    for name, attend in (("sdpa_cudnn", train_gpt.cudnn_attention()), ("sdpa", train_gpt.causal_attention)):
        torch._dynamo.reset()
        torch.compile(attend, fullgraph=True, backend=capture(name))(q, k, v)
    entered = {n: code.split("scaled_dot_product_attention")[0] for n, code in graphs.items()}  # before the call
    assert "CUDNN_ATTENTION" in entered["sdpa_cudnn"] and "CUDNN_ATTENTION" not in entered["sdpa"]
    assert "MATH" in entered["sdpa_cudnn"]


def test_auto_attention_is_a_static_choice_by_availability(monkeypatch):
    """select_attention on CUDA with the kernels faked (no GPU needed), nothing timed: auto takes FA4
    where it imports and runs a small call, else FA3, else cuDNN SDPA; a package that raises at import
    (FA4 without its CUDA toolkit flavour) or at its first call is passed over under auto, and is a
    one-line UserError when asked for by name."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(train_gpt, "cudnn_attention", lambda fallback=True: ("sdpa_cudnn", fallback))
    available = {}
    monkeypatch.setattr(train_gpt, "flash_attention", lambda name: available.get(name))
    monkeypatch.setattr(train_gpt, "runs_on", lambda device, make: make())
    assert train_gpt.select_attention("auto", cuda) == ("sdpa_cudnn", ("sdpa_cudnn", True))
    available["fa3"] = "fa3_fn"
    assert train_gpt.select_attention("auto", cuda) == ("fa3", "fa3_fn")
    available["fa4"] = "fa4_fn"
    assert train_gpt.select_attention("auto", cuda) == ("fa4", "fa4_fn")
    assert train_gpt.select_attention("sdpa", cuda) == ("sdpa", train_gpt.causal_attention)
    assert train_gpt.select_attention("sdpa_cudnn", cuda) == ("sdpa_cudnn", ("sdpa_cudnn", True))

    def broken(name):
        raise RuntimeError("No CTK flavor installed")
    monkeypatch.setattr(train_gpt, "flash_attention", broken)
    with pytest.raises(train_gpt.UserError, match="ATTN_BACKEND=fa4: .* failed to load: RuntimeError: No CTK"):
        train_gpt.select_attention("fa4", cuda)


def test_runs_on_passes_over_kernels_that_fail():
    """runs_on: an attention that imports but fails its first call (a JIT error) is None; one that runs is
    returned; a missing package (None) stays None."""
    cpu = torch.device("cpu")

    def fails(q, k, v):
        raise RuntimeError("JIT compilation failed")
    assert train_gpt.runs_on(cpu, lambda: fails) is None
    assert train_gpt.runs_on(cpu, lambda: None) is None
    assert train_gpt.runs_on(cpu, lambda: train_gpt.causal_attention) is train_gpt.causal_attention


def test_select_attention_on_cpu_and_bad_choice():
    cpu = torch.device("cpu")
    assert train_gpt.select_attention("auto", cpu) == ("sdpa", train_gpt.causal_attention)
    with pytest.raises(train_gpt.UserError, match="ATTN_BACKEND=fa3: flash-attention 3 .* is not importable"):
        train_gpt.select_attention("fa3", cpu)
    name, attend = train_gpt.select_attention("sdpa_cudnn", cpu)  # falls back to math on CPU
    q = torch.randn(1, 8, 4, 8)
    assert name == "sdpa_cudnn"
    torch.testing.assert_close(attend(q, q[:, :, :2], q[:, :, :2]), reference_attention(q, q[:, :, :2], q[:, :, :2]))


def test_roles_name_the_bank_rows():
    """The one statement of the bank layout: Q of layer i is qo_bank[i] and its output projection
    qo_bank[L+i], K kv_bank[i] and V kv_bank[L+i]; the MLP matrices are their banks' row i. Frozen-layer
    rows and Hessian keys follow the same table."""
    cfg = small_cfg()
    model, L = randomized(cfg), cfg.num_layers
    expect = {"q": ("qo_bank", 2), "o": ("qo_bank", L + 2), "k": ("kv_bank", 2), "v": ("kv_bank", L + 2),
              "up": ("mlp_up_bank", 2), "down": ("mlp_down_bank", 2)}
    for role, (bank, row) in expect.items():
        assert model.w(role, 2).data_ptr() == getattr(model, bank)[row].data_ptr(), role
    assert train_gpt.bank_rows("qo_bank", [0, 1], L) == [0, 1, L, L + 1]
    assert train_gpt.bank_rows("mlp_down_bank", [0, 1], L) == [0, 1]
    assert train_gpt.hessian_keys("kv_bank", 2) == [("attn_in", 0), ("attn_in", 1), ("attn_in", 0), ("attn_in", 1)]
    assert train_gpt.hessian_keys("qo_bank", 2) == [("attn_in", 0), ("attn_in", 1), ("attn_out", 0), ("attn_out", 1)]
    assert train_gpt.hessian_keys("q_gain", 2) is None


def test_hessian_recorder_sees_every_matrix_input():
    """The tap records X^T X of each matrix input: every key hessian_keys asks for, summed over the
    looped layers' visits; the hidden states with a tap are the same as without."""
    cfg = small_cfg()
    model = randomized(cfg)
    x = torch.randint(0, 64, (2, 8))
    rec = train_gpt.HessianRecorder()
    with torch.no_grad():
        model.tap_inputs(x, looped=True, tap=rec)
        assert torch.equal(model.hidden(x, looped=True, tap=train_gpt.HessianRecorder()), model.hidden(x, looped=True))
    wanted = {k for name in train_gpt.BANKS + ("tok_emb.weight",) for k in train_gpt.hessian_keys(name, cfg.num_layers)}
    assert set(rec.hessians) == wanted
    h = model.hidden(x, looped=True).detach().reshape(-1, cfg.model_dim)
    torch.testing.assert_close(rec.hessians[("head_in",)], h.T @ h)


def test_attention_sees_one_dtype_whatever_autocast_does_to_rms_norm(monkeypatch):
    """From torch 2.12, CUDA autocast runs rms_norm in fp32 and returns fp32 (CPU autocast leaves it alone): q and k
    reached attention in fp32 beside a bf16 v, which FlashAttention refuses. That policy is emulated here."""
    plain = torch.nn.functional.rms_norm
    monkeypatch.setattr(train_gpt.F, "rms_norm", lambda x, shape: plain(x.float(), shape))  # fp32 out, as on CUDA
    seen = []

    def attention(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return train_gpt.causal_attention(q, k, v, *args, **kwargs)
    model = train_gpt.GPT(small_cfg(), attention)
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.hidden(x, looped=True)
    assert seen and set(seen) == {(torch.bfloat16,) * 3}, set(seen)
    assert h.dtype == torch.bfloat16


def test_hessian_recorder_sums_in_float32_under_autocast():
    """Calibration runs the model under bf16 autocast (on CUDA), which would compute and sum X^T X in bf16: a
    Hessian off by ~0.4% and no longer positive definite. CPU autocast casts matmuls the same way."""
    torch.manual_seed(0)
    xs = [torch.randn(512, 64) @ torch.randn(64, 64) for _ in range(8)]  # correlated columns, as activations are
    rec = train_gpt.HessianRecorder()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for x in xs:
            rec(("k",), x)
    ref = sum(x.double().T @ x.double() for x in xs)
    H = rec.hessians[("k",)]
    assert H.dtype == torch.float32 and rec.rows[("k",)] == 8 * 512
    assert ((H.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 tensor-core product runs on CUDA only")
def test_hessian_recorder_on_cuda_sums_bf16_inputs_in_float32():
    """On CUDA the recorder multiplies the bf16 inputs (what the matrix sees under autocast) into an fp32
    result, summed in fp32: the Hessian of those inputs well inside the error of bf16 products
    (results/2026-12-07_hessian_budget_h100/)."""
    torch.manual_seed(0)
    xs = [(torch.randn(4096, 256) @ torch.randn(256, 256)).cuda() for _ in range(8)]
    rec = train_gpt.HessianRecorder()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for x in xs:
            rec(("k",), x)
    ref = sum(x.bfloat16().double().T @ x.bfloat16().double() for x in xs)
    H = rec.hessians[("k",)]
    assert H.dtype == torch.float32 and rec.rows[("k",)] == 8 * 4096
    assert ((H.double() - ref).norm() / ref.norm()).item() < 5e-4


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs PyTorch >= 2.9")
def test_parallel_muon_quintic_matches_torch_muon():
    """An independent reference: with the quintic schedule, no MuonEq-R and one process, two steps of
    ParallelMuon on a wide and a tall bank equal torch.optim.Muon on each matrix (its momentum is an
    EMA, ours a sum: the same direction after Newton-Schulz normalizes). Torch iterates in bf16, ours on
    CPU in float32, hence the 1.5% tolerance; a wrong Nesterov, shape scale or decay is far outside it."""
    torch.manual_seed(0)
    shapes, lr, wd, mom = ((2, 16, 48), (2, 48, 16)), 0.1, 0.5, 0.9
    banks = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    mats = [torch.nn.Parameter(b.detach()[i].clone()) for b in banks for i in range(b.size(0))]
    ours = train_gpt.ParallelMuon(banks, lr=lr, momentum=mom, backend_steps=5, row_normalize=False,
                                  ns_schedule="quintic", weight_decay=wd, direction=train_gpt.muon_direction,
                                  dctx=train_gpt.Dist())
    ref = torch.optim.Muon(mats, lr=lr, weight_decay=wd, momentum=mom, nesterov=True, ns_steps=5)
    start = [b.detach().clone() for b in banks]
    for _ in range(2):
        grads = [torch.randn(s) for s in shapes]
        for b, g in zip(banks, grads):
            b.grad = g
        for m, g in zip(mats, (g[i] for g in grads for i in range(g.size(0)))):
            m.grad = g.clone()
        ours.reduce_scatter()
        ours.step()
        ref.step()
    moved = torch.cat([(b.detach() - s).flatten() for b, s in zip(banks, start)])
    moved_ref = torch.cat([m.detach().flatten() for m in mats]) - torch.cat([s.flatten() for s in start])
    # 0.4% here; polar, MuonEq-R or a momentum of 0.5 instead give 4-7%
    assert (moved - moved_ref).norm() < 0.015 * moved_ref.norm()
