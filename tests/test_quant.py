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


def test_quantize_state_routes_tensors():
    L = 4
    state = {"qo_bank": torch.randn(2 * L, 128, 128), "kv_bank": torch.randn(2 * L, 96, 128),
             "mlp_up_bank": torch.randn(L, 256, 128), "mlp_down_bank": torch.randn(L, 128, 256),
             "tok_emb.weight": torch.randn(1100, 128), "q_gain": torch.randn(L, 4)}
    cols = {"attn": 128, "proj": 128, "up": 128, "down": 256}
    hess = {(kind, i): correlated_hessian(c, 512, seed=i) for kind, c in cols.items() for i in range(L)}
    hess[("head",)] = correlated_hessian(128, 512)
    q = train_gpt.quantize_state(state, hess, L, 6, 12.85, 8, 20.0)
    assert {k: v["kind"] for k, v in q.items()} == {
        "qo_bank": "int6_rows", "kv_bank": "int6_rows", "mlp_up_bank": "int6_rows", "mlp_down_bank": "int6_rows",
        "tok_emb.weight": "int8_rows", "q_gain": "fp16"}
    assert q["tok_emb.weight"]["q"].abs().max() <= 127 and q["qo_bank"]["q"].abs().max() <= 31
    deq = train_gpt.dequantize_state(q)
    assert all(deq[k].shape == state[k].shape for k in state)
    # the banks were quantized with their own layer's Hessian: equal to quantizing that slice alone
    alone, _ = train_gpt.gptq_quantize(state["kv_bank"][L + 1], hess[("attn", 1)], 6, 12.85)
    assert torch.equal(alone, q["kv_bank"]["q"][L + 1])
