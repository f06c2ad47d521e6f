"""The default model (random weights, std 0.02) and knobs at a given window length, on CPU with EVAL_COMPILE=1."""
import time

import torch

import train_gpt


def default_model(seq_len: int):
    hp = train_gpt.Hyperparameters(dict(EVAL_COMPILE="1", TRAIN_SEQ_LEN=str(seq_len), EVAL_SEQ_LEN=str(seq_len),
                                        DEVICE="cpu"))
    cfg = hp.model_config()
    torch.manual_seed(0)
    model = train_gpt.GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) * 0.02)
    return hp, cfg, model


def time_training_loss(fn, model, x, y, looped: bool) -> str:
    """The training loss's forward + backward through fn (compiled) twice: the first call (compile + run) and the
    second (run) in seconds, its loss and the eager model's, as key:value fields."""
    ref = model(x, y, looped, fixed_cap=True).mean().item()
    secs = []
    for _ in range(2):
        t = time.perf_counter()
        loss = fn(x, y, looped, fixed_cap=True).mean()
        loss.backward()
        secs.append(time.perf_counter() - t)
    return f"first_s:{secs[0]:.1f} second_s:{secs[1]:.2f} loss:{loss.item():.6f} eager:{ref:.6f}"
