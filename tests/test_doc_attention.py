"""DOC_ATTENTION: attention that stays inside a document (a BOS starts one), what it computes and where it runs."""
import dataclasses
import re

import pytest
import torch

import train_gpt
from conftest import tiny_env
from test_eval import EVAL_ENV, setup
from test_lora_ttt import LORA_ENV
from test_model import randomized, reference_attention, small_cfg

BOS = train_gpt.BOS_ID


def per_document_attention(q, k, v, docs):
    """reference_attention run on each document of each row alone, the outputs put back in place."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for b in range(q.size(0)):
        for d in docs[b].unique():
            at = (docs[b] == d).nonzero().squeeze(1)
            out[b, at] = reference_attention(q[b:b + 1, at], k[b:b + 1, at], v[b:b + 1, at])[0]
    return out


def qkv(B=2, T=40, H=4, Hkv=2, hd=8, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(B, T, h, hd, device=device, dtype=dtype) for h in (H, Hkv, Hkv)]


DOCS = torch.tensor([[0] * 7 + [1] * 20 + [2] * 13, [3] * 40])  # a row of three documents, a row inside one
IDX = torch.where(torch.cat((torch.ones(2, 1), DOCS.diff(dim=1)), 1) > 0, BOS, 5)  # BOS where each document starts
IDX[1, 0] = 5  # the second row starts inside a document


def test_document_mask_numbers_documents_from_the_bos():
    mask = train_gpt.document_mask(IDX)
    assert mask.shape == (2, 1, 40, 40) and mask[0, 0, 7, 6].item() is False and mask[0, 0, 8, 7].item() is True
    assert torch.equal(mask[1, 0], torch.ones(40, 40, dtype=torch.bool).tril())


@pytest.mark.parametrize("form", ["dense", "flex"])
def test_doc_attention_is_causal_attention_of_each_document_alone(form):
    """The dense mask (SDPA) and FlexAttention's block mask (eager here: its unfused reference) compute the same
    thing: every document of a row attended to as if it stood alone; a row inside one document is plain causal."""
    q, k, v = qkv()
    mask = train_gpt.document_mask(IDX) if form == "dense" else train_gpt.flex_document_mask(DOCS)
    got = train_gpt.document_attention(q, k, v, mask)
    assert torch.allclose(got, per_document_attention(q, k, v, DOCS), atol=1e-5)
    assert torch.allclose(got[1], reference_attention(q, k, v)[1], atol=1e-5)
    assert not torch.allclose(got[0], reference_attention(q, k, v)[0], atol=1e-3)  # the mask does something


@pytest.mark.parametrize("looped", [False, True])
def test_a_document_after_another_is_scored_as_if_alone(looped):
    """With DOC_ATTENTION the hidden states of a document that follows another in a row are those of the
    document alone (RoPE is relative; SmearGate already stops at the BOS); without it the earlier document
    shows through."""
    a, b = torch.randint(2, 64, (1, 15)), torch.randint(2, 64, (1, 12))
    b[0, 0] = BOS
    for doc_attention in (True, False):
        model = randomized(small_cfg(doc_attention=doc_attention, smear_gate=True, attn_gate=True))
        with torch.no_grad():
            after = model.hidden(torch.cat((a, b), 1), looped)[:, a.size(1):]
            alone = model.hidden(b, looped)
        assert torch.allclose(after, alone, atol=1e-5) == doc_attention


def test_without_doc_attention_the_given_kernel_runs():
    """DOC_ATTENTION off: the attention the model was given is what runs (the default path is untouched)."""
    calls = []

    def attend(q, k, v):
        calls.append(q.shape)
        return train_gpt.causal_attention(q, k, v)
    for on, expected in ((False, True), (True, False)):
        calls.clear()
        model = train_gpt.GPT(small_cfg(doc_attention=on), attend)
        with torch.no_grad():
            model.hidden(torch.randint(0, 64, (1, 8)), False)
        assert bool(calls) == expected


def test_doc_attention_compiles_to_the_eager_result():
    """Compiled on CPU (the dense path inside the graph), loss and gradients equal eager's."""
    model = randomized(small_cfg(doc_attention=True))
    x = torch.randint(2, 64, (2, 32))
    x[0, 10] = x[1, 3] = BOS
    results = []
    for fn in (model, torch.compile(model, fullgraph=True, dynamic=False)):
        model.zero_grad()
        loss = fn(x[:, :-1], x[:, 1:], True).mean()
        loss.backward()
        results.append((loss.detach(), model.qo_bank.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-4)


def test_the_block_mask_function_reads_inside_docs_for_padded_positions():
    """FlexAttention's fused kernel evaluates the mask function on the padding of a partial last block too
    (indices up to the next multiple of its block size): those reads must stay inside docs, or the CUDA kernel
    reads past the buffer (an illegal memory access on the GPU, an IndexError here)."""
    T = DOCS.size(1)
    mask_mod = train_gpt.flex_document_mask(DOCS).mask_mod
    q, kv = torch.tensor([T - 1, T - 1, T + 5, T + 100]), torch.tensor([30, 3, T + 27, 3])
    assert mask_mod(torch.tensor(0), torch.tensor(0), q, kv).tolist() == [True, False, False, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention's fused kernel)")
def test_flex_doc_attention_on_cuda_matches_the_reference_with_gradients():
    """FlexAttention's fused kernel (compiled, on CUDA), the path of every compiled CUDA graph: bf16 outputs and
    gradients match the float32 per-document reference, at a length that is no multiple of its 128-token blocks."""
    q, k, v = (t.requires_grad_() for t in qkv(B=2, T=200, H=8, Hkv=4, hd=64, device="cuda", dtype=torch.bfloat16))
    grad = torch.randn_like(q)
    docs = (torch.arange(200, device="cuda") >= 90).long().repeat(2, 1)
    docs[0] = 0  # row 0 inside one document, row 1 two documents
    out = torch.compile(lambda *a: train_gpt.document_attention(*a, train_gpt.flex_document_mask(docs)), fullgraph=True)(q, k, v)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = per_document_attention(*(t.cpu() for t in ref_in), docs.cpu()).cuda()
    want = torch.autograd.grad(ref, ref_in, grad.float())
    for g, w in ((out, ref), *zip(got, want)):
        assert (g.float() - w).abs().max() <= 0.02 * w.abs().max() + 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled graph's FlexAttention)")
def test_the_compiled_cuda_model_takes_the_block_mask_and_matches_eager(monkeypatch):
    """Compiled on CUDA the model builds FlexAttention's block mask (once per forward), and its bf16 loss and
    gradients match the eager model's (dense mask) on rows of several documents."""
    built = []
    real = train_gpt.flex_document_mask
    monkeypatch.setattr(train_gpt, "flex_document_mask", lambda docs: built.append(1) or real(docs))
    model = randomized(small_cfg(doc_attention=True, model_dim=128, num_heads=2, num_kv_heads=1)).cuda()
    x = torch.randint(2, 64, (2, 257), device="cuda")
    x[0, 100] = x[1, 7] = x[1, 200] = BOS
    results = []
    for fn in (model, torch.compile(model, fullgraph=True, dynamic=False)):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(x[:, :-1], x[:, 1:], True).mean()
        loss.backward()
        results.append((loss.detach().float(), model.qo_bank.grad.float().clone()))
    assert built == [1]  # traced once (the looped forward builds one mask for all its layers)
    assert (results[0][0] - results[1][0]).abs() < 2e-2
    assert (results[0][1] - results[1][1]).abs().max() <= 0.05 * results[0][1].abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention in the eval's dynamic graphs)")
def test_the_eval_graph_takes_every_window_shape_with_one_compile_on_cuda():
    """The eval forward (batch and length dynamic) with DOC_ATTENTION: windows of several lengths, a multiple of
    128 or not, and batch sizes score as eager does, from one graph (a block mask that recompiled per length
    would put LoRA TTT's hundreds of shapes past the recompile limit)."""
    model = randomized(small_cfg(doc_attention=True, model_dim=128, num_heads=2, num_kv_heads=1)).cuda()
    hp = train_gpt.Hyperparameters(dict(EVAL_COMPILE="1"))
    hidden, eager = train_gpt.eval_forward(model, hp, torch.device("cuda")), train_gpt.eval_forward(
        model, train_gpt.Hyperparameters(dict(EVAL_COMPILE="0")), torch.device("cuda"))
    torch._dynamo.reset()
    graphs = []  # graphs built so far, after each shape
    for B, T in ((4, 256), (3, 200), (6, 320), (2, 1000), (5, 2048)):
        x = torch.randint(2, 64, (B, T), device="cuda")
        x[:, T // 3] = BOS
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            got, want = hidden(x).float(), eager(x).float()
        assert (got - want).abs().max() <= 0.05 * want.abs().max(), (B, T)
        graphs.append(train_gpt.compiled_graph_count())
    assert len(set(graphs)) == 1, graphs  # no graph after the first shape's


@pytest.mark.parametrize("phase,tilt", [("sliding", False), ("windowed_ttt", False), ("lora_ttt", False),
                                        ("sliding", True), ("lora_ttt", True)])
def test_eval_with_doc_attention_passes_the_perturbation_check(phase, tilt):
    """Alone and with the other eval-time levers of the default (the gates, the n-gram tilt, LoRA TTT)."""
    _, model, _, val = setup(161, cfg=small_cfg(doc_attention=True, smear_gate=tilt, attn_gate=tilt))
    env = (LORA_ENV if phase == "lora_ttt" else EVAL_ENV) | dict(TTT_EPOCHS="1", NGRAM_TILT=str(int(tilt)),
                                                                  NGRAM_ORDER="3", NGRAM_THRESHOLD="0.3")
    ph = train_gpt.Phase("t", 32, 8, ttt=phase != "sliding", lora=phase == "lora_ttt", tilt=tilt)
    assert train_gpt.legality_check(model, val, train_gpt.Dist(), train_gpt.Hyperparameters(env), ph)


def test_the_artifact_keeps_doc_attention_and_older_ones_load_without_it(tmp_path):
    cfg = small_cfg(doc_attention=True)
    qstate = train_gpt.quantize_state(randomized(cfg).state_dict(), None, cfg.num_layers, 6, 12.85, 8, 20.0)
    for name, fields in (("new", dataclasses.asdict(cfg)),
                         ("old", {k: v for k, v in dataclasses.asdict(cfg).items() if k != "doc_attention"})):
        path = tmp_path / f"{name}.br"
        path.write_bytes(train_gpt.pack_artifact(qstate, dict(model=fields)))
        back = train_gpt.artifact_model(*train_gpt.read_artifact(path), path, torch.device("cpu"),
                                        train_gpt.causal_attention)
        assert back.cfg.doc_attention == (name == "new")
    assert train_gpt.ModelConfig().doc_attention is False  # off by default until the benchmark decides


def test_a_run_with_doc_attention_trains_exports_and_scores_it(tiny_data, tmp_path, launcher):
    """DOC_ATTENTION=1 end to end on CPU: training, GPTQ (its Hessians through the masked attention), the
    artifact (which records it), the roundtrip and LoRA TTT phases; EVAL_ONLY of that artifact logs it too."""
    env = tiny_env(tiny_data, tmp_path, RUN_ID="doc", ITERATIONS=3, DOC_ATTENTION=1, TTT_ENABLED=1,
                   TTT_LORA_RANK=4, TTT_LORA_PHASE_TOKENS=1024)
    res = launcher.run(env)
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "logs" / "doc.txt").read_text()
    assert "\nattention:document_mask\n" in text and " doc_attention:1 " in text.split("features:")[1]
    assert re.search(r"^ttt val_loss:[\d.]+ val_bpb:[\d.]+ ", text, re.M), text[-2000:]  # finite (part of val)
    art = next((tmp_path / "art").glob("final_model_doc.*.br"))
    res = launcher.run(env | dict(RUN_ID="doc_eval", EVAL_ONLY=str(art)))
    assert res.returncode == 0, res.stderr
    assert "\nattention:document_mask\n" in (tmp_path / "logs" / "doc_eval.txt").read_text()
