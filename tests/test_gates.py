"""SmearGate (with the BOS mask) and SparseGate (per-head attention output gates): what they compute,
that the model stays causal and legal with them, that they train, and that they survive the artifact."""
import dataclasses

import pytest
import torch

import train_gpt
from test_eval import EVAL_ENV, setup
from test_lora_ttt import LORA_ENV
from test_model import randomized, small_cfg

GATES = dict(smear_gate=True, attn_gate=True)
BOS = train_gpt.BOS_ID


def test_smear_mixes_the_previous_token_except_at_bos():
    torch.manual_seed(0)
    e = torch.randn(2, 6, 16)
    idx = torch.tensor([[5, 7, BOS, 9, 9, BOS], [BOS, 3, 4, 5, 6, 7]])
    w, lam = torch.randn(train_gpt.GATE_WINDOW), torch.tensor([0.7])
    out = train_gpt.smear(e, idx, w, lam)
    for b in range(2):
        for t in range(6):
            want = e[b, t].clone()
            if t > 0 and idx[b, t] != BOS:
                want += 0.7 * torch.sigmoid(e[b, t, :12] @ w) * e[b, t - 1]
            torch.testing.assert_close(out[b, t], want)
    # at init (lam 0) it is the identity
    assert torch.equal(train_gpt.smear(e, idx, torch.zeros(12), torch.zeros(1)), e)


def test_a_document_start_does_not_see_the_previous_document_through_the_smear():
    model = randomized(small_cfg(smear_gate=True))

    def embed(t):
        with torch.no_grad():
            return train_gpt.smear(model.tok_emb(t), t, model.smear_w, model.smear_lambda)
    x = torch.randint(10, 64, (1, 12))
    x[0, 6] = BOS
    y = x.clone()
    y[0, 5] = 9  # the last token of the previous document
    assert torch.equal(embed(x)[0, 6], embed(y)[0, 6]) and not torch.equal(embed(x)[0, 5], embed(y)[0, 5])
    x[0, 6] = y[0, 6] = 8  # not a BOS: the change reaches the next position
    assert not torch.equal(embed(x)[0, 6], embed(y)[0, 6])


def test_attention_gate_scales_each_head_by_its_sigmoid():
    """With every weight random the gated model's attention output equals the ungated one's, head by
    head, times sigmoid(W_h . x[:12]) of the block input."""
    cfg = small_cfg(attn_gate=True, xsa_last_n=0)
    gated = randomized(cfg)
    plain = train_gpt.GPT(dataclasses.replace(cfg, attn_gate=False))
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "attn_gate"})
    x = torch.randn(2, 10, cfg.model_dim)
    freqs = torch.outer(torch.arange(10, dtype=torch.float32), gated.inv_freq)
    cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
    H, hd = cfg.num_heads, cfg.head_dim
    seen = {}
    with torch.no_grad():
        gated._attention(1, x, cos, sin, lambda k, t: seen.__setitem__(("g",) + k, t))
        plain._attention(1, x, cos, sin, lambda k, t: seen.__setitem__(("p",) + k, t))
    g = torch.sigmoid(x[..., :12] @ gated.attn_gate[1].view(H, 12).T)
    want = seen[("p", "attn_out", 1)].view(2, 10, H, hd) * g[..., None]
    torch.testing.assert_close(seen[("g", "attn_out", 1)], want.reshape(2, 10, H * hd))


@pytest.mark.parametrize("looped", [False, True])
def test_causal_with_the_gates(looped):
    model = randomized(small_cfg(**GATES))
    x = torch.randint(0, 64, (2, 24))
    x[:, 7] = BOS
    y = x.clone()
    y[:, 12:] = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        hx, hy = model.hidden(x, looped), model.hidden(y, looped)
    assert torch.equal(hx[:, :12], hy[:, :12]) and not torch.allclose(hx[:, 12:], hy[:, 12:])


@pytest.mark.parametrize("ttt,lora", [(False, False), (True, False), (True, True)])
def test_eval_with_the_gates_passes_the_perturbation_check(ttt, lora):
    """Sliding windows, windowed TTT and per-document LoRA TTT (the default), each with both gates on."""
    _, model, _, val = setup(161, cfg=small_cfg(**GATES))
    hp = train_gpt.Hyperparameters((LORA_ENV if lora else EVAL_ENV) | dict(TTT_EPOCHS="1"))
    phase = train_gpt.Phase("t", 32, 8, ttt=ttt, lora=lora)
    assert train_gpt.legality_check(model, val, train_gpt.Dist(), hp, phase)


def test_gates_are_trained_by_adam():
    """The gate parameters are in the Adam group and get gradients (at init the zero output
    projections and lambda hold them at zero: random weights stand for a model in training)."""
    hp = train_gpt.Hyperparameters(dict(VOCAB_SIZE="64", NUM_LAYERS="6", MODEL_DIM="32", NUM_HEADS="4",
                                        NUM_KV_HEADS="2", ROPE_DIMS="4", SMEAR_GATE="1", ATTN_GATE="1"))
    model = randomized(small_cfg(**GATES))
    adam, _ = train_gpt.build_optimizers(model, hp, train_gpt.Dist())
    in_adam = {id(p) for g in adam.param_groups for p in g["params"]}
    assert {id(model.smear_w), id(model.smear_lambda), id(model.attn_gate)} <= in_adam
    x = torch.randint(0, 64, (2, 16))
    model(x[:, :-1], x[:, 1:], looped=True).mean().backward()
    for p in (model.smear_w, model.smear_lambda, model.attn_gate):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_gates_survive_the_artifact(tmp_path):
    cfg = small_cfg(**GATES)
    model = randomized(cfg)
    qstate = train_gpt.quantize_state(model.state_dict(), None, cfg.num_layers, 6, 12.85, 8, 20.0)
    path = tmp_path / "a.br"
    path.write_bytes(train_gpt.pack_artifact(qstate, dict(model=dataclasses.asdict(cfg))))
    back = train_gpt.artifact_model(*train_gpt.read_artifact(path), path, torch.device("cpu"),
                                    train_gpt.causal_attention)
    assert back.cfg.smear_gate and back.cfg.attn_gate
    for name in ("smear_w", "smear_lambda", "attn_gate"):  # small: stored as fp16
        torch.testing.assert_close(getattr(back, name), getattr(model, name).half().float())


def test_an_artifact_from_before_the_gates_loads_without_them(tmp_path):
    cfg = small_cfg()
    model = train_gpt.GPT(cfg)
    qstate = train_gpt.quantize_state(model.state_dict(), None, cfg.num_layers, 6, 12.85, 8, 20.0)
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("smear_gate", "attn_gate")}
    path = tmp_path / "old.br"
    path.write_bytes(train_gpt.pack_artifact(qstate, dict(model=fields)))
    back = train_gpt.artifact_model(*train_gpt.read_artifact(path), path, torch.device("cpu"),
                                    train_gpt.causal_attention)
    assert back.smear_w is None and back.attn_gate is None


def test_gates_need_twelve_channels():
    with pytest.raises(train_gpt.UserError, match="MODEL_DIM=8: SMEAR_GATE and ATTN_GATE read 12 channels"):
        train_gpt.Hyperparameters(dict(MODEL_DIM="8", NUM_HEADS="2", NUM_KV_HEADS="1", ROPE_DIMS="2",
                                       SMEAR_GATE="1"))
