"""AsymLogit: two softcaps (positive, negative logits) that start at LOGIT_SOFTCAP, stay fixed in
training and move only under TTT."""
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

import train_gpt
from test_eval import EVAL_ENV, setup
from test_model import randomized, small_cfg


def test_equal_caps_are_the_plain_softcap_and_unequal_ones_split_by_sign():
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 7, 64) * 40, torch.randint(0, 64, (5, 7))
    same = train_gpt.asym_softcap_nll(logits, targets, torch.tensor([30.0, 30.0]))
    ref = train_gpt.SoftcapCrossEntropy.apply(logits.view(-1, 64), targets.reshape(-1), 30.0).view_as(targets)
    torch.testing.assert_close(same, ref)
    z = torch.where(logits >= 0, 20 * torch.tanh(logits / 20), 45 * torch.tanh(logits / 45))
    want = F.cross_entropy(z.view(-1, 64), targets.reshape(-1), reduction="none").view_as(targets)
    torch.testing.assert_close(train_gpt.asym_softcap_nll(logits, targets, torch.tensor([20.0, 45.0])), want)


def test_a_new_model_scores_as_without_it():
    cfg = small_cfg(asym_logit=True)
    model = randomized(cfg)
    with torch.no_grad():
        model.logit_caps.fill_(cfg.logit_softcap)
    plain = train_gpt.GPT(dataclasses.replace(cfg, asym_logit=False))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "logit_caps"})
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, :-1], x[:, 1:], looped=True), plain(x[:, :-1], x[:, 1:], looped=True))


def test_training_leaves_the_caps_and_ttt_moves_them():
    hp = train_gpt.Hyperparameters(dict(VOCAB_SIZE="64", NUM_LAYERS="6", MODEL_DIM="32", NUM_HEADS="4",
                                        NUM_KV_HEADS="2", ROPE_DIMS="4", ASYM_LOGIT="1", TRAIN_SEQ_LEN="16",
                                        TRAIN_BATCH_TOKENS="64", EVAL_SEQ_LEN="16", EVAL_STRIDE="8",
                                        TTT_CHUNK_TOKENS="64", TTT_BATCH_SEQS="2", TTT_EPOCHS="1", TTT_LR="0.5",
                                        TTT_LORA_RANK="0"))
    model = randomized(small_cfg(asym_logit=True))
    with torch.no_grad():
        model.logit_caps.fill_(30.0)
    adam, muon = train_gpt.build_optimizers(model, hp, train_gpt.Dist())
    assert id(model.logit_caps) not in {id(p) for opt in (adam, muon) for g in opt.param_groups for p in g["params"]}
    x = torch.randint(0, 64, (4, 17))
    model(x[:, :-1], x[:, 1:], looped=True, fixed_cap=True).mean().backward()
    assert model.logit_caps.grad is None  # the training loss does not use them
    tokens = np.random.default_rng(0).integers(2, 64, size=129).astype(np.uint16)
    val = train_gpt.ValSet(tokens, np.ones(128, dtype=np.int32), "tokenizer")
    ttt = randomized(small_cfg(asym_logit=True))
    with torch.no_grad():
        ttt.logit_caps.fill_(30.0)
    train_gpt.eval_tokens(ttt, val, train_gpt.Dist(), hp, train_gpt.Phase("ttt", 16, 8, ttt=True))
    assert not torch.equal(ttt.logit_caps.detach(), torch.full((2,), 30.0))


def test_legacy_artifact_and_legality(tmp_path):
    _, model, _, val = setup(161, cfg=small_cfg(asym_logit=True))
    hp = train_gpt.Hyperparameters(EVAL_ENV | dict(TTT_EPOCHS="1"))
    assert train_gpt.legality_check(model, val, train_gpt.Dist(), hp, train_gpt.Phase("t", 32, 8, ttt=True))
    cfg = small_cfg()
    qstate = train_gpt.quantize_state(train_gpt.GPT(cfg).state_dict(), None, cfg.num_layers, 6, 12.85, 8, 20.0)
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "asym_logit"}
    path = tmp_path / "old.br"
    path.write_bytes(train_gpt.pack_artifact(qstate, dict(model=fields)))
    back = train_gpt.artifact_model(*train_gpt.read_artifact(path), path, torch.device("cpu"), train_gpt.causal_attention)
    assert back.logit_caps is None


def test_the_tilt_reads_the_asym_caps():
    """nll_of_ids (the n-gram tilt's head pass) gives the same NLL as nll_from_hidden under AsymLogit."""
    model = randomized(small_cfg(asym_logit=True))
    with torch.no_grad():
        model.logit_caps.copy_(torch.tensor([12.0, 40.0]))
        h, y = torch.randn(2, 5, 32), torch.randint(0, 64, (2, 5))
        torch.testing.assert_close(model.nll_of_ids(h, torch.stack((y, y), -1))[..., 0], model.nll_from_hidden(h, y))


def test_the_caps_ttt_ends_with_are_logged():
    _, model, _, val = setup(161, cfg=small_cfg(asym_logit=True))
    hp = train_gpt.Hyperparameters(EVAL_ENV | dict(TTT_EPOCHS="1", TTT_LR="0.5", EVAL_SLIDING="0"))
    lines = []
    train_gpt.score_phases(model, 32, val, train_gpt.Dist(), hp, lines.append)
    caps = [line for line in lines if line.startswith("ttt_logit_caps:")]
    logged = [float(c) for c in caps[0].split(":")[1].split(",")] if len(caps) == 1 else None
    assert logged is not None and logged != [round(c, 4) for c in model.logit_caps.tolist()]  # TTT moved them


def test_the_fused_loss_has_the_formula_gradients():
    """AsymSoftcapCrossEntropy against autograd through the formula, for the logits and both caps."""
    torch.manual_seed(1)
    logits = (torch.randn(6, 50, dtype=torch.float64) * 30).requires_grad_()
    targets = torch.randint(0, 50, (6,))
    caps = torch.tensor([20.0, 35.0], dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64)
    (train_gpt.AsymSoftcapCrossEntropy.apply(logits, targets, caps) * w).sum().backward()
    fused = (logits.grad.clone(), caps.grad.clone())
    logits.grad, caps.grad = None, None
    z = torch.where(logits >= 0, caps[0] * torch.tanh(logits / caps[0]), caps[1] * torch.tanh(logits / caps[1]))
    (F.cross_entropy(z, targets, reduction="none") * w).sum().backward()
    torch.testing.assert_close(fused[0], logits.grad)
    torch.testing.assert_close(fused[1], caps.grad)
