"""The default model (random weights, std 0.02) and knobs at a given window length, on CPU with EVAL_COMPILE=1."""
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
