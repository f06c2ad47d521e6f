"""Compile time of the default model's looped training graph (forward + backward), whole or with each block as a
torch.compiler.nested_compile_region (traced and compiled once, stamped out for all 17 virtual layers).

usage: python3 regional.py orig|eager_block|region aot_eager|inductor

orig = train_gpt's GPT as it is; eager_block = the block rewritten as a function of its tensors (the same math,
checked against orig's loss); region = that function marked as a nested compile region (one for the parallel-residual
blocks, one for the others). CPU, window 256, batch 2; prints the first call (compile + run) and the second (run).
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent / "2026-12-06_eval_compile_cpu")]
import train_gpt as tg  # noqa: E402
from default_model import default_model  # noqa: E402

mode, backend = sys.argv[1], sys.argv[2]
hp, cfg, MODEL = default_model(256)
LN = torch.tensor(MODEL.ln_scales)


def block_math(x, x0, cos, sin, qo, kv, w_up, w_down, mix, attn_scale, mlp_scale, q_gain, gate_w, ln_s, parallel):
    """GPT._block for the default (XSA and SparseGate on every layer, no tap, no LoRA) from tensors only; qo and kv
    are the layer's (q, o) and (k, v) as one strided view each (two views of one bank as two inputs alias, which
    nested_compile_region refuses)."""
    c, (B, T, _) = MODEL.cfg, x.shape
    H, Hkv, hd = c.num_heads, c.num_kv_heads, c.head_dim
    mix, attn_scale, mlp_scale = mix.to(x.dtype), attn_scale.to(x.dtype), mlp_scale.to(x.dtype)
    x = mix[0] * x + mix[1] * x0
    a_in = tg.rms_norm(x) * ln_s.to(x.dtype)
    q = F.linear(a_in, qo[0]).view(B, T, H, hd)
    k = F.linear(a_in, kv[0]).view(B, T, Hkv, hd)
    v = F.linear(a_in, kv[1]).view(B, T, Hkv, hd)
    cs, sn = cos.to(q.dtype), sin.to(q.dtype)
    q = tg.apply_rope(tg.rms_norm(q), cs, sn, MODEL.rope_dims) * q_gain.to(q.dtype)[:, None]
    k = tg.apply_rope(tg.rms_norm(k), cs, sn, MODEL.rope_dims)
    y = tg.xsa(MODEL.attention(q, k, v).reshape(B, T, Hkv, H // Hkv, hd), v)
    gate = torch.sigmoid(a_in[..., :tg.GATE_WINDOW] @ gate_w.view(H, tg.GATE_WINDOW).T.to(a_in.dtype))
    y = (y.reshape(B, T, H, hd) * gate[..., None].to(y.dtype)).reshape(B, T, H * hd)
    x = x + attn_scale * F.linear(y, qo[1])
    mlp_in = a_in if parallel else tg.rms_norm(x) * ln_s.to(x.dtype)
    h = F.leaky_relu(F.linear(mlp_in, w_up), c.mlp_leaky_slope).square()
    return x + mlp_scale * F.linear(h, w_down)


def parallel_block(*a):  # a region takes no functools.partial: one plain function per kind of block
    return block_math(*a, parallel=True)


def serial_block(*a):
    return block_math(*a, parallel=False)


if mode == "region":
    parallel_block = torch.compiler.nested_compile_region(parallel_block)
    serial_block = torch.compiler.nested_compile_region(serial_block)


def block(self, i, x, x0, cos, sin, tap, lora=None, slot=0):
    assert tap is None and lora is None
    # Layer 0 gets x0 itself as x: a region first traced with one tensor in two slots is reused wrongly for two
    # (IndexError inside the stamped-out graph, torch 2.13), so the first block gets a copy.
    x = x * 1.0 if x is x0 else x
    L = self.cfg.num_layers
    fn = parallel_block if 0 <= self.cfg.parallel_residual_start <= i else serial_block
    return fn(x, x0, cos, sin, self.qo_bank[i::L], self.kv_bank[i::L], self.w("up", i), self.w("down", i),
              self.resid_mix[i], self.attn_scale[i], self.mlp_scale[i], self.q_gain[i], self.attn_gate[i], LN[i])


torch.manual_seed(0)
x, y = (torch.randint(0, cfg.vocab_size, (2, 256)) for _ in range(2))
ref = MODEL(x, y, True, fixed_cap=True).mean().item()
if mode != "orig":
    tg.GPT._block = block
fn = torch.compile(MODEL, fullgraph=True, dynamic=False, backend=backend)
times = []
for _ in range(2):
    t = time.perf_counter()
    loss = fn(x, y, True, fixed_cap=True).mean()
    loss.backward()
    times.append(time.perf_counter() - t)
print(f"mode:{mode} backend:{backend} first_s:{times[0]:.1f} second_s:{times[1]:.2f} loss:{loss.item():.6f} "
      f"orig_eager_loss:{ref:.6f} torch:{torch.__version__}")
