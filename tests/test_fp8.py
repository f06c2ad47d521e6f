"""FP8_MATMULS: the FP8 matmul and its gradients against F.linear, its scaling, its knob, and where it applies."""
import pytest
import torch
import torch.nn.functional as F

import train_gpt


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def linear_and_grads(fn, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w)
    y.backward(g)
    return y, x.grad, w.grad


@pytest.mark.parametrize("magnitude", [1e-4, 1.0, 1e4])
def test_fp8_linear_rounds_like_fp8_at_any_magnitude(magnitude):
    """Forward and both gradients land within FP8's rounding of F.linear's (e4m3: 3 mantissa bits, e5m2: 2),
    but do not equal it (the matmuls really are FP8), at every scale of the operands (one scale per tensor:
    a fixed scale would saturate at 1e4 and flush to zero at 1e-4)."""
    torch.manual_seed(0)
    x, w, g = torch.randn(3, 32, 64) * magnitude, torch.randn(48, 64) * 0.05, torch.randn(3, 32, 48) * magnitude
    y8, gx8, gw8 = linear_and_grads(train_gpt.fp8_linear, x, w, g)
    y, gx, gw = linear_and_grads(F.linear, x, w, g)
    assert y8.shape == y.shape and gx8.shape == gx.shape and gw8.shape == gw.shape
    assert 0.005 < rel(y8, y) < 0.06
    assert 0.005 < rel(gx8, gx) < 0.09 and 0.005 < rel(gw8, gw) < 0.09  # the gradient in e5m2


def test_fp8_linear_dtypes_follow_autocast_and_the_operands():
    """Under bf16 autocast the output is bf16 as F.linear's; the gradients take their operand's dtype
    (bf16 activations, float32 master weights)."""
    x = torch.randn(16, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = train_gpt.fp8_linear(x, w)
        assert y.dtype == F.linear(x, w).dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def knobs(**env) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters({k: str(v) for k, v in env.items()})


def test_fp8_knob_parses_and_refuses_what_it_cannot_run():
    assert train_gpt.fp8_roles(knobs()) == ()
    assert train_gpt.fp8_roles(knobs(FP8_MATMULS="head, mlp")) == ("mlp", "head")
    with pytest.raises(train_gpt.UserError, match="FP8_MATMULS='attn'.*mlp, head"):
        knobs(FP8_MATMULS="attn")
    with pytest.raises(train_gpt.UserError, match="multiples of 16, not MODEL_DIM=40"):
        knobs(FP8_MATMULS="mlp", MODEL_DIM=40, NUM_HEADS=2, NUM_KV_HEADS=1)
    with pytest.raises(train_gpt.UserError, match="training length 1000"):
        knobs(FP8_MATMULS="head", TRAIN_SEQ_SCHEDULE="1000@0.5")
    knobs(MODEL_DIM=40, NUM_HEADS=2, NUM_KV_HEADS=1)  # without FP8, no such rule


def perturb(model: train_gpt.GPT):
    """Noise on every weight: zero-initialised output projections would hide the MLP."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


TINY = dict(DEVICE="cpu", NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, VOCAB_SIZE=64, TRAIN_SEQ_LEN=16,
            TRAIN_BATCH_TOKENS=64, EMA_DECAY=0, NUM_LOOPS=0, SMEAR_GATE=0, ATTN_GATE=0)


@pytest.mark.parametrize("roles", ["mlp", "head", "mlp,head"])
def test_training_steps_run_fp8_and_nothing_else_does(roles):
    """The trainer's forward runs the named matmuls in FP8 (close to, not equal to, bf16's); the model's own
    forward, which validation, GPTQ's Hessians and every eval phase call, stays exact."""
    hp = knobs(**TINY, FP8_MATMULS=roles)
    dctx = train_gpt.setup_distributed(hp)
    torch.manual_seed(0)
    model = train_gpt.GPT(hp.model_config())
    perturb(model)
    trainer = train_gpt.Trainer(hp, dctx, model)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    plain = model(x, y, False, fixed_cap=True)
    fp8 = trainer.forward(x, y, False)
    assert torch.equal(model(x, y, False, fixed_cap=True), plain)
    assert not torch.equal(fp8, plain) and rel(fp8, plain) < 0.02
    fp8.mean().backward()
    grads = {"mlp": model.mlp_up_bank.grad, "head": model.tok_emb.weight.grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_fp8_training_follows_bf16_training():
    """Eight optimizer steps with every FP8 matmul on track the same steps without: the loss falls alike."""
    losses = {}
    for roles in ("", "mlp,head"):
        hp = knobs(**TINY, FP8_MATMULS=roles, MATRIX_LR=0.02)
        dctx = train_gpt.setup_distributed(hp)
        torch.manual_seed(0)
        trainer = train_gpt.Trainer(hp, dctx, train_gpt.GPT(hp.model_config()))
        gen = torch.Generator().manual_seed(2)
        batch = torch.randint(0, 8, (4, 17), generator=gen)  # a small alphabet: learnable in a few steps
        trainer._load_batch = lambda: batch  # every step trains on this batch
        out = [trainer.step(k, 1.0, False).item() for k in range(8)]
        losses[roles] = out
    plain, fp8 = losses[""], losses["mlp,head"]
    assert plain[-1] < plain[0] - 0.5 and fp8[-1] < fp8[0] - 0.5
    assert max(abs(a - b) for a, b in zip(plain, fp8)) < 0.1


def test_fp8_operands_come_out_row_major_from_any_layout():
    """A column-major view (a transposed gradient, say) is cast to a row-major FP8 tensor, as cuBLAS takes a
    first operand (elementwise ops alone would keep the view's layout; CPU's _scaled_mm would not mind)."""
    x = torch.randn(64, 32).t()  # [32, 64], column-major
    x8, scale = train_gpt.to_fp8(x, torch.float8_e4m3fn)
    assert x8.is_contiguous() and torch.equal(x8.float(), train_gpt.to_fp8(x.contiguous(), torch.float8_e4m3fn)[0].float())


def test_fp8_is_refused_on_a_gpu_without_fp8_matmuls(monkeypatch):
    hp = knobs(FP8_MATMULS="mlp")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(train_gpt.UserError, match=r"FP8_MATMULS=mlp: this GPU \(compute capability 8.0\)"):
        train_gpt.check_fp8_device(hp, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    train_gpt.check_fp8_device(hp, torch.device("cuda"))
    train_gpt.check_fp8_device(hp, torch.device("cpu"))


def test_fp8_model_compiles_in_one_graph_and_matches_eager():
    """The training forward with every FP8 matmul under torch.compile(fullgraph=True) (Dynamo + AOTAutograd:
    the tracing a GPU run does) gives eager's loss and gradients."""
    hp = knobs(**TINY)
    torch.manual_seed(0)
    model = train_gpt.GPT(hp.model_config())
    perturb(model)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    y = torch.roll(x, -1, 1)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    grads = []
    for fn in (compiled, model):
        model.zero_grad()
        loss = fn(x, y, False, fixed_cap=True, fp8=("mlp", "head")).mean()
        loss.backward()
        grads.append((loss.detach(), model.mlp_down_bank.grad.clone(), model.tok_emb.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
