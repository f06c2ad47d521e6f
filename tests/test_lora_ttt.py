"""Per-document LoRA TTT (TTT_LORA_RANK): documents split at BOS, every target scored once with its own
document's context only, adapters trained only on scored chunks, rows of a batch independent."""
import os

import numpy as np
import pytest
import torch

import train_gpt
from conftest import parse_log, tiny_env
from data.shards import write_shard
from test_eval import COMPILE_CFG, EVAL_ENV, setup
from test_model import randomized, small_cfg

LORA_ENV = EVAL_ENV | dict(TTT_LORA_RANK="4", TTT_LORA_LR="0.01", TTT_LORA_CHUNK="8", TTT_LORA_DOCS="3",
                           TTT_LORA_PHASE_TOKENS="64")


def lora_phase():
    return train_gpt.Phase("ttt", 32, 8, ttt=True, lora=True)


def doc_stream(lengths: list[int]) -> np.ndarray:
    """Random tokens in documents of these lengths (each from its BOS to the next), and a last token."""
    tokens = np.random.default_rng(3).integers(4, 64, size=sum(lengths) + 1).astype(np.uint16)
    tokens[np.cumsum([0] + lengths[:-1])] = 1
    return tokens


def lora_setup(**env):
    _, model, tokens, val = setup()
    return train_gpt.Hyperparameters(LORA_ENV | env), model, tokens, val


def test_doc_spans_hold_every_target_once():
    tokens = np.array([5, 1, 7, 8, 1, 9, 1, 1, 4, 1])
    starts, ends = train_gpt.doc_spans(tokens)
    assert starts.tolist() == [0, 1, 4, 6, 7] and ends.tolist() == [1, 4, 6, 7, 9]
    owned = np.concatenate([np.arange(s + 1, e + 1) for s, e in zip(starts, ends)])
    assert np.array_equal(owned, np.arange(1, len(tokens)))  # targets 1..N-1, each once, in order


def test_doc_chunks_group_documents_by_start():
    starts, ends = np.array([0, 10, 70, 75, 200]), np.array([10, 70, 75, 200, 260])
    chunks = train_gpt.doc_chunks(starts, ends, 64)
    assert [(d.tolist(), lo, hi) for d, lo, hi in chunks] == [([0, 1], 0, 70), ([2, 3], 70, 200), ([4], 200, 260)]


def test_chunks_grow_with_what_a_document_has_scored_never_with_its_length():
    hp = train_gpt.Hyperparameters(LORA_ENV | dict(TTT_LORA_STEPS="4"))
    assert train_gpt.chunk_bounds(100, hp, True, 64).tolist() == [0, 8, 16, 24, 32, 40, 50, 63, 79, 99, 100]
    long = train_gpt.chunk_bounds(5000, hp, True, 64)
    assert np.diff(long).max() == 32 and len(long) < 5000 // 16  # half a window at most, far fewer steps
    for n in range(1, 400):  # a shorter document walks the same chunks, cut where it ends
        b = train_gpt.chunk_bounds(n, hp, True, 64)
        assert b[-1] == n and np.array_equal(b[:-1], long[:len(b) - 1])
    assert np.diff(train_gpt.chunk_bounds(100, hp, False, 64)).tolist() == [32, 32, 32, 4]


def test_a_chunk_is_at_most_half_a_window():
    """Each target keeps half a window of its document's context: a TTT_LORA_CHUNK set above half of EVAL_SEQ_LEN
    is refused, the default is cut to half a short window, and a chunk grown past TTT_LORA_STEPS chunks stops there."""
    for chunk in ("17", "32"):
        with pytest.raises(train_gpt.UserError, match=f"TTT_LORA_CHUNK={chunk}: .* needs it <= EVAL_SEQ_LEN/2=16 "):
            train_gpt.Hyperparameters(LORA_ENV | dict(TTT_LORA_CHUNK=chunk, EVAL_SEQ_LEN="32"))
    hp = train_gpt.Hyperparameters(LORA_ENV | dict(TTT_LORA_CHUNK="16", EVAL_SEQ_LEN="32"))
    assert np.diff(train_gpt.chunk_bounds(100, hp, True, 32)).tolist() == [16] * 6 + [4]
    unset = {k: v for k, v in LORA_ENV.items() if k != "TTT_LORA_CHUNK"}
    default = train_gpt.Hyperparameters(unset | dict(EVAL_SEQ_LEN="32"))
    assert default.ttt_lora_chunk > 16  # not asked for: cut to half the window
    assert np.diff(train_gpt.chunk_bounds(100, default, True, 32)).tolist() == [16] * 6 + [4]
    hp = train_gpt.Hyperparameters(LORA_ENV | dict(TTT_LORA_CHUNK="4", TTT_LORA_STEPS="2", EVAL_SEQ_LEN="32"))
    assert max(np.diff(train_gpt.chunk_bounds(200, hp, True, 32))) == 16  # grown to half the window, no further


def test_a_batch_drops_each_document_once_it_is_scored(monkeypatch):
    """Each step runs only the documents that still score (a batch's longest ones: rows i keep adapter i),
    and at least two rows where the batch has them (a batch of one is a graph of its own)."""
    hp, model, _, _ = lora_setup(TTT_LORA_STEPS="2", TTT_LORA_PHASE_TOKENS="100000")
    lengths = [70, 25, 15, 40, 12, 30, 9, 5]  # documents of unequal lengths: batches that thin out to one
    tokens = doc_stream(lengths)
    val = train_gpt.ValSet.from_lut(tokens, train_gpt.ByteLUT(np.ones(64, np.int32), np.zeros(64, bool),
                                                                np.arange(64) < 4))
    rows, real = [], train_gpt.score_doc_chunk

    def counted(*args, **kwargs):
        rows.append(len(args[3]))
        return real(*args, **kwargs)
    monkeypatch.setattr(train_gpt, "score_doc_chunk", counted)
    scores = train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, lora_phase())
    assert (scores.count == 1).all()
    starts, ends = train_gpt.doc_spans(tokens)
    expected, alone = [], 0
    for batch in train_gpt.even_batches(np.argsort(starts - ends, kind="stable"), 3):
        steps = [len(train_gpt.chunk_bounds(int(n), hp, True, 32)) - 1 for n in ends[batch] - starts[batch]]
        live = [sum(s > j for s in steps) for j in range(max(steps))]
        expected += [max(n, min(2, len(batch))) for n in live]
        alone += live.count(1)
    assert rows == expected and min(rows) < 3 and alone > 0  # steps with one live document run two rows


def test_aligned_rows_are_multiples_of_the_alignment_within_the_batch():
    assert [train_gpt.aligned_rows(n, cap, a) for n, cap, a in
            [(1, 64, 1), (5, 64, 1), (5, 64, 8), (64, 64, 8), (57, 60, 8), (3, 4, 4), (1, 4, 4)]] == [2, 5, 8, 64, 60, 4, 4]


def test_row_alignment_pads_steps_with_rows_that_score_nothing(monkeypatch):
    """TTT_LORA_ROW_ALIGN runs every step of a batch at a multiple of its rows (fewer shapes for the
    attention kernels to plan): the padding rows score nothing and every document scores as without it."""
    lengths = [70, 25, 15, 40, 12, 30, 9]  # 7 documents: batches of 4 and 3, thinning out to one live row
    tokens = doc_stream(lengths)
    val = train_gpt.ValSet.from_lut(tokens, train_gpt.ByteLUT(np.ones(64, np.int32), np.zeros(64, bool),
                                                                np.arange(64) < 4))
    real, runs = train_gpt.score_doc_chunk, {}
    for align in (1, 4):
        hp, model, _, _ = lora_setup(TTT_LORA_STEPS="2", TTT_LORA_PHASE_TOKENS="100000", TTT_LORA_DOCS="4",
                                     TTT_LORA_ROW_ALIGN=str(align))
        rows = []

        def counted(*args, **kwargs):
            rows.append(len(args[3]))
            return real(*args, **kwargs)
        monkeypatch.setattr(train_gpt, "score_doc_chunk", counted)
        runs[align] = rows, train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, lora_phase())
    (rows1, plain), (rows4, padded) = runs[1], runs[4]
    assert set(rows1) == {2, 3, 4} and set(rows4) == {4} and len(rows1) == len(rows4)
    assert (plain.count == 1).all() and (padded.count == 1).all()
    torch.testing.assert_close(padded.nll, plain.nll, rtol=0, atol=1e-5)


def test_a_batchs_last_step_scores_without_grad(monkeypatch):
    """No update follows a batch's last step: its pass keeps no graph for a backward."""
    hp, model, tokens, _ = lora_setup(TTT_LORA_GRAD_CONTEXT="0")
    starts, ends = train_gpt.doc_spans(tokens)
    grads, real = [], train_gpt.chunk_nll
    monkeypatch.setattr(train_gpt, "chunk_nll", lambda *a: grads.append(a[-1]) or real(*a))
    cpu, s, e = torch.device("cpu"), starts[1:4], ends[1:4]
    train_gpt.score_docs(model, train_gpt.eval_forward(model, hp, cpu, True), torch.from_numpy(tokens.astype(np.int64)),
                         s, e, lora_phase(), train_gpt.TokenScores.zeros(len(tokens) - 1, cpu), hp, None,
                         train_gpt.LoRA(model.cfg, 3, 4, cpu))
    n_steps = len(list(train_gpt.step_plan(s, e, hp, True, 32)))
    assert n_steps > 2 and grads == [True] * (n_steps - 1) + [False]


def test_a_score_does_not_know_where_its_document_ends(monkeypatch):
    """Two streams equal up to the first one's BOS at 70: every target before it scores alike (up to the
    rounding of other batch shapes), the last chunk's too. A chunk size read from the document's length
    would not, nor a window that starts from where a cut chunk ends."""
    hp, model, _, _ = lora_setup(TTT_LR="0", TTT_LORA_STEPS="4", TTT_LORA_PHASE_TOKENS="1024")
    base = np.random.default_rng(0).integers(4, 64, size=300).astype(np.uint16)
    base[0] = 1
    lut = train_gpt.ByteLUT(np.ones(64, dtype=np.int32), np.zeros(64, bool), np.arange(64) < 4)

    def scores():
        out = []
        for next_bos in (70, 250):
            t = base.copy()
            t[next_bos] = 1
            out.append(train_gpt.eval_tokens(randomized(small_cfg()), train_gpt.ValSet.from_lut(t, lut),
                                             train_gpt.Dist(), hp, lora_phase()).nll[:69])
        return (out[0] - out[1]).abs().max().item()
    assert scores() < 1e-5
    by_length = lambda n, hp, adapting, seq_len: np.unique(np.append(np.arange(  # noqa: E731
        0, n, min(max(hp.ttt_lora_chunk, -(-n // hp.ttt_lora_steps)), seq_len)), n))
    monkeypatch.setattr(train_gpt, "chunk_bounds", by_length)
    assert scores() > 1e-3  # sizes from the length: caught


def test_a_global_update_does_not_know_where_later_documents_start():
    """Two streams of one length, equal up to target 449: the second starts a document at 450 too, so a document
    starts in global chunk 3 of 128 tokens as well (5 global chunks hold a start, not 4). The base model's global
    updates take their rate from where their global chunk starts in the stream, so every earlier target scores
    alike; a rate from the count of global chunks (those that hold a start, which later BOS decide) moved earlier
    scores by up to 1.7 nats."""
    hp, _, _, _ = lora_setup(TTT_LR="0.05", TTT_LORA_STEPS="4", TTT_LORA_PHASE_TOKENS="128")
    a = doc_stream([30, 75, 12, 50, 9, 90, 40, 3, 60, 200, 50])
    b = a.copy()
    b[450] = 1  # one more BOS, after every target compared
    lut = train_gpt.ByteLUT(np.ones(64, dtype=np.int32), np.zeros(64, bool), np.arange(64) < 4)
    nll = [train_gpt.eval_tokens(randomized(small_cfg()), train_gpt.ValSet.from_lut(t, lut), train_gpt.Dist(), hp,
                                 lora_phase()).nll[:449] for t in (a, b)]
    assert (nll[0] - nll[1]).abs().max().item() < 1e-5


def test_untrained_adapters_score_each_target_with_its_documents_context():
    """lr 0 and no global updates: an adapter stays the identity (B = 0), so each target's NLL is the
    model's with the tokens of its own document before it, from where its chunk's window starts: an
    EVAL_SEQ_LEN back from where the chunk ends uncut."""
    hp, model, tokens, val = lora_setup(TTT_LORA_LR="0", TTT_LR="0")
    scores = train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, lora_phase())
    assert (scores.count == 1).all()
    starts, ends = train_gpt.doc_spans(tokens)
    for t in (3, 40, 74, 75, 111, 300):
        d = np.searchsorted(ends, t)  # the document holding target t
        s, bounds = int(starts[d]), train_gpt.chunk_bounds(int(ends[d] - starts[d]), hp, True, 32)
        done = bounds[np.searchsorted(s + bounds, t) - 1]  # its chunk: targets s+done+1 ..
        a = max(s, s + done + int(train_gpt.chunk_size(done, hp, True, 32)) - 32)
        x = torch.from_numpy(tokens[a:t].astype(np.int64))[None]
        y = torch.from_numpy(tokens[a + 1:t + 1].astype(np.int64))[None]
        with torch.no_grad():
            direct = model(x, y, looped=True)[0, -1].item()
        assert abs(scores.nll[t - 1].item() - direct) < 1e-4, t


def test_a_reset_gives_every_row_the_same_start_whatever_the_batch():
    """LoRA.reset after adapters have moved: every row's A is the one drawn from the fixed seed (the same for a
    batch of another size), every B zero: a document's adapter starts alike in any batch and row."""
    cfg = small_cfg()
    lora, other = train_gpt.LoRA(cfg, 3, 4, torch.device("cpu")), train_gpt.LoRA(cfg, 5, 4, torch.device("cpu"))
    with torch.no_grad():
        for p in lora.parameters():
            p.add_(torch.randn_like(p))
    lora.reset()
    for key, a in lora.a.items():
        assert torch.equal(a, other.a[key][:3]) and torch.equal(a[0], a[2]) and a.abs().sum() > 0
        assert not lora.b[key].any()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the fused CUDA kernel needs a GPU"))])
def test_row_adamw_steps_the_live_rows_as_torch_adamw_does_and_leaves_the_rest(device):
    """RowAdamW's steps of rows 0..n-1 (n shrinking as documents finish) move those rows of each weight as torch's
    AdamW moves them stepping every row, and leave the finished rows where they stopped; each weight keeps its
    own step count (bias correction), and a reset starts them and the moments over. Its gradients come
    transposed, as autograd.grad may return them: torch 2.13's fused step on CPU, given such a gradient as it
    came, reads it as if laid out like the weight and moves the wrong elements."""
    torch.manual_seed(0)
    starts = [torch.randn(4, 5, 3, device=device), torch.randn(4, 2, 6, device=device)]
    grads = [[torch.randn(4, *w.shape[:0:-1], device=device).transpose(1, 2) for w in starts]
             for _ in range(4)]  # not in the weight's layout
    assert not grads[0][0].is_contiguous()
    rows = (4, 3, 3, 1)
    ws = [torch.nn.Parameter(w.clone()) for w in starts]
    opt = train_gpt.RowAdamW(ws, lr=0.01)
    for rep in range(2):  # the second pass after a reset: as from fresh moments and counts
        with torch.no_grad():
            for w, start in zip(ws, starts):
                w.copy_(start)
        opt.reset()
        for g, n in zip(grads, rows):
            opt.step(tuple(g), n)
    for i, (w, start) in enumerate(zip(ws, starts)):
        for r in range(4):
            ref = torch.nn.Parameter(start[r].clone())
            torch_opt = torch.optim.AdamW([ref], lr=0.01, betas=train_gpt.LORA_BETAS, eps=train_gpt.LORA_EPS,
                                          weight_decay=train_gpt.LORA_WD, foreach=True)
            for g, n in zip(grads, rows):
                if r < n:  # a live row
                    ref.grad = g[i][r]
                    torch_opt.step()
            torch.testing.assert_close(w[r].detach(), ref.detach(), rtol=1e-6, atol=1e-7)
        assert not torch.equal(w[3], start[3]) and not torch.equal(w[3], w[0])  # row 3 stepped once, then left


def test_adapters_move_the_scores_and_learn_a_repeated_document():
    """One long document repeating a short phrase: the adapters, trained on the scored chunks, make the
    later repeats cheaper than a frozen model finds them."""
    hp, model, _, _ = lora_setup(TTT_LR="0", TTT_LORA_LR="0.02")
    tokens = np.concatenate(([1], np.tile(np.array([9, 33, 17, 52, 41, 8, 60]), 40))).astype(np.uint16)
    lut = train_gpt.ByteLUT(np.ones(64, dtype=np.int32), np.zeros(64, bool), np.arange(64) < 4)
    val = train_gpt.ValSet.from_lut(tokens, lut)
    frozen = train_gpt.eval_tokens(model, val, train_gpt.Dist(), train_gpt.Hyperparameters(
        LORA_ENV | dict(TTT_LR="0", TTT_LORA_LR="0")), lora_phase()).nll
    adapted = train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, lora_phase()).nll
    assert torch.equal(adapted[:8], frozen[:8])  # the first chunk is scored before any step
    assert adapted[-100:].mean() < frozen[-100:].mean() - 0.05


def test_compiled_lora_scoring_takes_every_window_length_in_one_dynamic_graph(monkeypatch):
    """EVAL_COMPILE=1 (inductor, here on CPU): windows of four padded lengths build no graph per length (each
    would cost a GPU about a minute of compiling; what window_len's fine padding relies on), and the
    compiled adapted forward and backward score like the eager ones, with the update in the scoring pass or
    (TTT_LORA_GRAD_CONTEXT) in one of its own: first chunks alike, later ones apart by the steps' rounding."""
    from torch._dynamo.utils import counters
    lengths = [300, 260, 200, 150, 90, 40]
    tokens = doc_stream(lengths)
    starts, ends = train_gpt.doc_spans(tokens)
    first = np.concatenate([np.arange(s, min(s + 16, e)) for s, e in zip(starts, ends)])  # before any step
    _, model, _, _ = setup(cfg=COMPILE_CFG)
    cpu, n, ph = torch.device("cpu"), len(tokens) - 1, train_gpt.Phase("ttt", 256, 64, ttt=True, lora=True)
    seen, window_len = set(), train_gpt.window_len
    monkeypatch.setattr(train_gpt, "window_len", lambda *a: seen.add(window_len(*a)) or window_len(*a))
    outs, graphs = {}, []
    torch._dynamo.reset()
    for ctx in ("0", "32"):
        for flag in ("0", "1"):
            hp = train_gpt.Hyperparameters(LORA_ENV | dict(EVAL_COMPILE=flag, TTT_LORA_CHUNK="16", TTT_LORA_STEPS="2",
                                                           TTT_LORA_GRAD_CONTEXT=ctx))
            out = outs[ctx, flag] = train_gpt.TokenScores.zeros(n, cpu)
            counters.clear()
            train_gpt.score_docs(model, train_gpt.eval_forward(model, hp, cpu, True), torch.from_numpy(tokens.astype(np.int64)),
                                 starts, ends, ph, out, hp, None, train_gpt.LoRA(model.cfg, 3, 4, cpu))
            graphs.append(counters["stats"]["unique_graphs"])
    assert sorted(seen) == [64, 128, 192, 256]
    # a size guard may split small from large batches; a batch's last step (no update after it) runs the adapted
    # forward without grad, as every scoring pass does where the update has a pass of its own: no graph new there
    assert graphs[0] == graphs[2] == 0 and 2 <= graphs[1] <= 3 and graphs[3] <= 1
    for ctx, atol in (("0", 2e-4), ("32", 2e-3)):
        assert (outs[ctx, "1"].count == 1).all()
        torch.testing.assert_close(outs[ctx, "1"].nll[first], outs[ctx, "0"].nll[first], rtol=0, atol=1e-5)
        torch.testing.assert_close(outs[ctx, "1"].nll, outs[ctx, "0"].nll, rtol=0, atol=atol)


def test_documents_score_the_same_alone_or_in_a_batch():
    """Each document's adapter trains on its own row only and starts like every other: batching
    documents together changes no score (up to float rounding of the different shapes). A document alone
    runs beside a row without targets: no pass has a batch of one."""
    hp, model, tokens, val = lora_setup(TTT_LR="0")
    starts, ends = train_gpt.doc_spans(tokens)
    n, cpu = len(tokens) - 1, torch.device("cpu")
    together, alone = train_gpt.TokenScores.zeros(n, cpu), train_gpt.TokenScores.zeros(n, cpu)
    rows, hidden = [], train_gpt.eval_forward(model, hp, cpu, True)
    args = (model, lambda x, lora: rows.append(len(x)) or hidden(x, lora), torch.from_numpy(tokens.astype(np.int64)))
    lora = train_gpt.LoRA(model.cfg, 3, 4, cpu)
    train_gpt.score_docs(*args, starts[1:4], ends[1:4], lora_phase(), together, hp, None, lora)
    for d in range(1, 4):
        train_gpt.score_docs(*args, starts[d:d + 1], ends[d:d + 1], lora_phase(), alone, hp, None, lora)
    t = slice(int(starts[1]), int(ends[3]))
    assert (together.count[t] == 1).all() and (alone.count[t] == 1).all() and min(rows) == 2
    torch.testing.assert_close(together.nll[t], alone.nll[t], rtol=0, atol=1e-5)
    frozen = train_gpt.TokenScores.zeros(n, cpu)
    train_gpt.score_docs(*args, starts[1:4], ends[1:4], lora_phase(), frozen,
                         train_gpt.Hyperparameters(LORA_ENV | dict(TTT_LORA_LR="0")), None, lora)
    assert (together.nll[t] - frozen.nll[t]).abs().max() > 1e-3  # the adapters did train


@pytest.mark.parametrize("tilt,grad_context", [(False, 0), (True, 5), (False, 8), (False, 20)])
def test_lora_ttt_passes_the_future_perturbation_check(tilt, grad_context):
    hp, model, tokens, val = lora_setup(NGRAM_TILT=str(int(tilt)), NGRAM_ORDER="3", NGRAM_THRESHOLD="0.3",
                                        TTT_LORA_GRAD_CONTEXT=str(grad_context))
    ph = train_gpt.Phase("ttt", 32, 8, ttt=True, lora=True, tilt=tilt)
    assert train_gpt.legality_check(model, val, train_gpt.Dist(), hp, ph)


def test_the_check_reaches_a_long_documents_late_chunks_where_the_window_has_slid(monkeypatch):
    """A document longer than the window gets a point in a late chunk, where the window has slid: LoRA TTT passes
    there, and an adapter step on a chunk before scoring it, only where its window has slid (every earlier chunk
    scored legally), fails the check."""
    tokens = doc_stream([30, 90, 20])
    val = train_gpt.ValSet(tokens, np.ones(len(tokens) - 1, dtype=np.int32), "test")
    hp = train_gpt.Hyperparameters(LORA_ENV | dict(TTT_LORA_GRAD_CONTEXT="12"))
    model, phase = setup()[1], lora_phase()
    points = train_gpt.perturbation_points(tokens, phase, train_gpt.check_knobs(hp, 1), 1)
    late = [p for p in points if 30 + phase.seq_len < p < 120]  # inside the long document, past a window
    assert late, points
    assert train_gpt.legality_check(model, val, train_gpt.Dist(), hp, phase)
    real = train_gpt.score_doc_chunk

    def peek_once_slid(model, hidden, tokens, begin, prev, last, phase, out, hp, hints, lora, grad):
        if lora is not None and bool((tokens[torch.from_numpy(begin)] != train_gpt.BOS_ID).any()):
            scratch = train_gpt.TokenScores.zeros(len(out.nll), out.nll.device)
            nll, scored = real(model, hidden, tokens, begin, prev, last, phase, scratch, hp, hints, lora, grad=True)
            params = list(lora.parameters())
            for p, g in zip(params, torch.autograd.grad((nll * scored).sum(), params)):
                p.data -= 0.1 * g  # at 1.0 the softcapped logits saturate: scores alike whatever the targets
        return real(model, hidden, tokens, begin, prev, last, phase, out, hp, hints, lora, grad)
    monkeypatch.setattr(train_gpt, "score_doc_chunk", peek_once_slid)
    monkeypatch.setattr(train_gpt, "perturbation_points", lambda *args: late)  # the one that can see it
    assert train_gpt.legality_check(model, val, train_gpt.Dist(), hp, phase) is False


def test_an_update_with_less_context_scores_first_chunks_alike_and_still_trains():
    """TTT_LORA_GRAD_CONTEXT: a step's update reads at most that many tokens before its chunk, in a pass of
    its own; the score still reads the whole window. Documents' first chunks (scored before any step) score
    as with the update in the scoring pass, later ones differ, and the adapters still learn. A context as long
    as the window is the one-pass default exactly."""
    assert train_gpt.grad_window(np.array([0, 10, 50]), np.array([4, 40, 90]),
                                 train_gpt.Hyperparameters(LORA_ENV | dict(TTT_LORA_GRAD_CONTEXT="16"))).tolist() == [0, 24, 74]
    for ctx in ("0", "40"):  # off, or no chunk with more context before it: the scoring pass steps
        assert train_gpt.grad_window(np.array([0, 10, 50]), np.array([4, 40, 90]),
                                     train_gpt.Hyperparameters(LORA_ENV | dict(TTT_LORA_GRAD_CONTEXT=ctx))) is None
    _, model, tokens, val = lora_setup()
    starts, ends = train_gpt.doc_spans(tokens)
    first = np.concatenate([np.arange(s, min(s + 8, e)) for s, e in zip(starts, ends)])  # targets s+1..s+8 (a chunk)
    runs = {}
    for name, ctx, lr in (("all", 0, "0.01"), ("short", 2, "0.01"), ("window", 32, "0.01"), ("frozen", 0, "0")):
        hp = train_gpt.Hyperparameters(LORA_ENV | dict(TTT_LR="0", TTT_LORA_GRAD_CONTEXT=str(ctx), TTT_LORA_LR=lr))
        runs[name] = train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, lora_phase())
    assert all(bool((r.count == 1).all()) for r in runs.values())
    assert torch.equal(runs["window"].nll, runs["all"].nll)
    still = {ctx: train_gpt.eval_tokens(model, val, train_gpt.Dist(), train_gpt.Hyperparameters(
        LORA_ENV | dict(TTT_LR="0", TTT_LORA_LR="0", TTT_LORA_GRAD_CONTEXT=ctx)), lora_phase()).nll for ctx in ("0", "2")}
    assert torch.equal(still["0"], still["2"])  # adapters that do not move: the score reads the whole window
    torch.testing.assert_close(runs["short"].nll[first], runs["all"].nll[first], rtol=0, atol=1e-6)
    later = (runs["short"].nll - runs["all"].nll).abs()
    later[first] = 0
    assert later.max() > 1e-4
    assert (runs["short"].nll - runs["frozen"].nll).abs().max() > 1e-3


def test_a_leaky_adapter_step_fails_the_check(monkeypatch):
    """Stepping the adapters on a chunk before scoring it must be caught."""
    hp, model, tokens, val = lora_setup(TTT_LR="0")
    real = train_gpt.score_doc_chunk

    def peek_then_score(model, hidden, tokens, begin, prev, last, phase, out, hp, hints, lora, grad):
        if lora is not None:
            scratch = train_gpt.TokenScores.zeros(len(out.nll), out.nll.device)
            nll, scored = real(model, hidden, tokens, begin, prev, last, phase, scratch, hp, hints, lora, grad=True)
            params = list(lora.parameters())
            for p, g in zip(params, torch.autograd.grad((nll * scored).sum(), params)):
                p.data -= 1.0 * g
        return real(model, hidden, tokens, begin, prev, last, phase, out, hp, hints, lora, grad)
    monkeypatch.setattr(train_gpt, "score_doc_chunk", peek_then_score)
    assert train_gpt.legality_check(model, val, train_gpt.Dist(), hp, lora_phase()) is False


@pytest.mark.parametrize("grad_context,leaky", [("0", "every step"), ("5", "own pass"), ("8", "own pass"),
                                                 ("20", "own pass")])
def test_an_update_that_reads_past_its_chunk_fails_the_check(monkeypatch, grad_context, leaky):
    """An adapter step that reads two targets past the chunk it has scored must be caught, in the scoring
    pass (TTT_LORA_GRAD_CONTEXT=0) or only where the update has a pass of its own: at 5 (below
    TTT_LORA_CHUNK) from a document's second step, at 8 and 20 from a later one, which the check perturbs
    after too. Only the NLL that steps read reads ahead (a score that did would count targets twice)."""
    # unmutated, LoRA TTT at these GRAD_CONTEXTs passes: test_lora_ttt_passes_the_future_perturbation_check
    hp, model, tokens, val = lora_setup(TTT_LR="0", TTT_LORA_GRAD_CONTEXT=grad_context)
    real_score, real_nll, scoring = train_gpt.score_doc_chunk, train_gpt.chunk_nll, []

    def ahead(model, hidden, tokens, begin, prev, last, seq_len, lora):  # the NLL of the chunk and 2 targets more
        return real_nll(model, hidden, tokens, begin, prev, np.minimum(last + 2, len(tokens) - 1), seq_len, lora, True)

    def score(model, hidden, tokens, begin, prev, last, phase, out, hp, hints, lora, grad):
        scoring.append(1)
        try:
            res = real_score(model, hidden, tokens, begin, prev, last, phase, out, hp, hints, lora, grad)
        finally:
            scoring.pop()
        if leaky == "every step" and grad and (begin < prev).all():  # the step takes this NLL: one reading ahead
            return ahead(model, hidden, tokens, begin, prev, last, phase.seq_len, lora)[:2]
        return res

    def own_pass(model, hidden, tokens, begin, prev, last, seq_len, lora, grad):
        if grad and not scoring:
            return ahead(model, hidden, tokens, begin, prev, last, seq_len, lora)
        return real_nll(model, hidden, tokens, begin, prev, last, seq_len, lora, grad)
    monkeypatch.setattr(train_gpt, "score_doc_chunk", score)
    monkeypatch.setattr(train_gpt, "chunk_nll", own_pass)
    assert train_gpt.legality_check(model, val, train_gpt.Dist(), hp, lora_phase()) is False


@pytest.mark.parametrize("lora,seq_len,ahead", [(False, 32, 2), (False, 36, 6), (True, 32, 2)])
def test_a_global_update_that_reads_two_targets_past_its_chunk_fails_the_check(monkeypatch, lora, seq_len, ahead):
    """Windowed TTT's update, or LoRA TTT's global one, reading targets up to two past its chunk: the check
    perturbs after the first target past an update (a read of one past is the state tests' to catch). Where
    EVAL_SEQ_LEN is no multiple of the stride, a chunk's windows score 4 targets past its end (36 = 4.5 strides of
    8): reading 6 past it reads 2 unscored ones, after the first window of the next chunk, not at a multiple of
    TTT_CHUNK_TOKENS. Unmutated, both pass it: test_legal_modes_pass_... (test_eval.py) and test_lora_ttt_passes_..."""
    env = LORA_ENV | dict(TTT_LORA_LR="0") if lora else EVAL_ENV | dict(EVAL_SEQ_LEN=str(seq_len))
    _, model, tokens, val = setup()
    hp, checked = train_gpt.Hyperparameters(env), train_gpt.Phase("ttt", seq_len, 8, ttt=True, lora=lora)
    real = train_gpt.TTTUpdater._step
    monkeypatch.setattr(train_gpt.TTTUpdater, "_step",  # each segment `ahead` targets later
                        lambda self, tokens, starts, hi: real(self, tokens, [s + ahead for s in starts], hi + ahead))
    assert train_gpt.legality_check(model, val, train_gpt.Dist(), hp, checked) is False


def test_a_chunk_scored_in_two_parts_around_a_peek_fails_the_check(monkeypatch):
    """A leak inside one chunk: its first target scored cleanly, then a step on the whole chunk, then the
    rest scored. The check's mid-chunk point sees it (its first-target point alone would not)."""
    hp, model, tokens, val = lora_setup(TTT_LR="0")
    real = train_gpt.score_doc_chunk

    def first_then_peek(model, hidden, tokens, begin, prev, last, phase, out, hp, hints, lora, grad):
        if lora is None or (last - prev).min() < 2:
            return real(model, hidden, tokens, begin, prev, last, phase, out, hp, hints, lora, grad)
        real(model, hidden, tokens, begin, prev, prev + 1, phase, out, hp, hints, lora, False)
        scratch = train_gpt.TokenScores.zeros(len(out.nll), out.nll.device)
        nll, scored = real(model, hidden, tokens, begin, prev, last, phase, scratch, hp, hints, lora, True)
        params = list(lora.parameters())
        for p, g in zip(params, torch.autograd.grad((nll * scored).sum(), params)):
            p.data -= 1.0 * g
        return real(model, hidden, tokens, begin, prev + 1, last, phase, out, hp, hints, lora, grad)
    monkeypatch.setattr(train_gpt, "score_doc_chunk", first_then_peek)
    assert train_gpt.legality_check(model, val, train_gpt.Dist(), hp, lora_phase()) is False


def test_asym_logit_caps_move_at_their_own_rate():
    cfg = small_cfg(asym_logit=True)
    _, _, _, val = setup(cfg=cfg)
    moved = {}
    for lr in ("0", "5"):
        m = randomized(cfg)
        with torch.no_grad():
            m.logit_caps.fill_(cfg.logit_softcap)
        train_gpt.eval_tokens(m, val, train_gpt.Dist(), train_gpt.Hyperparameters(EVAL_ENV | dict(ASYM_LOGIT_LR=lr)),
                              train_gpt.Phase("test", 32, 8, ttt=True))
        moved[lr] = (m.logit_caps.detach() - cfg.logit_softcap).abs().max().item()
    assert moved["0"] == 0 and moved["5"] > 1e-3


def test_score_phases_runs_lora_ttt_and_checks_it():
    hp, model, tokens, val = lora_setup(LEGALITY_CHECK="1", NGRAM_TILT="1", NGRAM_ORDER="3")
    assert [(p.name, p.lora) for p in train_gpt.plan_phases(hp, 32)] == [
        ("roundtrip", False), ("ttt", True), ("sliding", False)]
    lines = []
    out = train_gpt.score_phases(model, 32, val, train_gpt.Dist(), hp, lines.append)
    text = "\n".join(lines)
    docs = len(train_gpt.doc_spans(tokens)[0])
    points = train_gpt.perturbation_points(val.prefix(4 * 64 + 1).tokens, train_gpt.plan_phases(hp, 32)[1],
                                           train_gpt.check_knobs(hp, 1), 1)
    for key in ("legality_check tokens:", f"legality_check phase:ttt points:{','.join(map(str, points))}\n",
                "legality_check phase:ttt passed:1", f"ttt_lora rank:4 targets:q,k,v,o,mlp,head lr:0.01 chunk:8 steps:{hp.ttt_lora_steps} batch_docs:3 docs:{docs} ",
                "ngram_tilt:ttt ", "ttt val_loss:"):
        assert key in text, key
    assert out["final_phase"] == "ttt" and out["final_val_bpb"] == out["ttt_val_bpb"]


def test_lora_ttt_stopped_by_the_budget_scores_the_rest_unadapted(monkeypatch):
    """Past the budget neither the adapters nor the global weights train; every target is still scored."""
    hp, model, tokens, val = lora_setup(TTT_LORA_PHASE_TOKENS="64")
    monkeypatch.setattr(train_gpt.Pace, "projected", lambda self, c: None if c == 0 else 1e9)
    lines = []
    scores = train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, lora_phase(), lines.append, time_left=10.0)
    assert (scores.count == 1).all()
    assert any(line.startswith("ttt:updates_stopped after_chunk:2/") for line in lines)


def test_lora_knobs_are_checked():
    assert [p.lora for p in train_gpt.plan_phases(train_gpt.Hyperparameters({}), 2048) if p.ttt] == [True]  # default
    off = train_gpt.Hyperparameters(dict(TTT_LORA_RANK="8", TTT_ENABLED="0"))  # TTT_ENABLED=0 turns off LoRA TTT too
    assert not any(p.ttt or p.lora for p in train_gpt.plan_phases(off, 64))
    with pytest.raises(train_gpt.UserError, match=r"TTT_LORA_CHUNK=4096: LoRA TTT \(TTT_LORA_RANK=8\) needs it <= "
                       r"EVAL_SEQ_LEN/2=1024 \(each target keeps half a window of context\), or TTT_LORA_RANK=0"):
        train_gpt.Hyperparameters(dict(TTT_LORA_RANK="8", TTT_LORA_CHUNK="4096"))
    train_gpt.Hyperparameters(dict(TTT_LORA_RANK="0", TTT_LORA_CHUNK="4096"))  # unused: windowed TTT


def test_lora_targets_adapt_only_the_matrices_named():
    """TTT_LORA_TARGETS: only the named roles get adapters; a head-only LoRA leaves the hidden states as
    they were and moves the logits, a V-only one moves the hidden states."""
    hp, model, tokens, val = lora_setup(TTT_LORA_TARGETS="head, v")
    assert train_gpt.lora_targets(hp) == ("v", "head")
    cpu, x = torch.device("cpu"), torch.from_numpy(tokens[:33].astype(np.int64))[None]
    for targets, moves_hidden in ((("head",), False), (("v",), True)):
        lora = train_gpt.LoRA(model.cfg, 1, 4, cpu, targets)
        assert {k.rstrip("0123456789") for k in lora.a} == set(targets)
        with torch.no_grad():
            for b in lora.b.values():
                b.normal_()
            base, adapted = model.hidden(x, looped=True), model.hidden(x, looped=True, lora=lora)
            assert torch.equal(base, adapted) != moves_hidden
            moved = (model.logits(adapted, lora) - model.logits(adapted)).abs().max()
            assert (moved > 0) == ("head" in targets)
    # the phase builds its adapters from the knob: a head-only LoRA scores differently from the full set
    full = train_gpt.eval_tokens(model, val, train_gpt.Dist(), train_gpt.Hyperparameters(LORA_ENV | dict(TTT_LR="0")),
                                 lora_phase()).nll
    head = train_gpt.eval_tokens(model, val, train_gpt.Dist(), train_gpt.Hyperparameters(
        LORA_ENV | dict(TTT_LR="0", TTT_LORA_TARGETS="head")), lora_phase()).nll
    assert (full - head).abs().max() > 1e-4
    for bad in ("", "q,x", "mlp,,heads"):
        with pytest.raises(train_gpt.UserError, match="TTT_LORA_TARGETS"):
            train_gpt.Hyperparameters(dict(TTT_LORA_TARGETS=bad))


@pytest.mark.parametrize("nproc", [2, 8])
def test_lora_ttt_on_several_ranks_scores_like_one_process(tiny_data, tmp_path, launcher, nproc):
    """Several GPUs split each group's documents between ranks and all-reduce the global update: an
    artifact scored on two ranks, or on eight (the real run's count: most ranks then have no document in
    a global chunk and must still join every collective), gets one process's score (rows are independent;
    float rounding apart).
    The rate must keep this tiny model from diverging: AdamW with beta1 0 and a tiny eps takes a full
    step of either sign on a gradient of rounding noise, so a diverging run amplifies the all-reduce's
    last bits into visible differences. Half of TINY_ENV's val tokens: 5 documents in two global TTT
    chunks of 1024 tokens (2 + 3), so on two ranks each scores documents of both; every rank all-reduces
    two updates. The global chunk is each rank's TTT_LORA_PHASE_TOKENS times the ranks: divided by the ranks here."""
    env = tiny_env(tiny_data, tmp_path, RUN_ID="one", TTT_LORA_RANK=4, TTT_LORA_CHUNK=16, TTT_LORA_DOCS=4,
                   TTT_LORA_LR="0.001", TTT_LORA_STEPS=8, EVAL_SLIDING=0, VAL_MAX_TOKENS=2048,
                   TTT_LORA_PHASE_TOKENS=1024, TTT_CHUNK_TOKENS=4096)  # the windowed chunk: not LoRA's
    one = launcher.run(env)
    assert one.returncode == 0, one.stderr[-2000:]
    art = tmp_path / "art" / "final_model_one.int6.br"
    many = launcher.run(env | dict(RUN_ID="many", EVAL_ONLY=str(art), TTT_LORA_PHASE_TOKENS=str(1024 // nproc)),
                        nproc=nproc)
    assert many.returncode == 0, many.stderr[-2000:]
    a, b = parse_log(tmp_path / "logs" / "one.txt"), parse_log(tmp_path / "logs" / "many.txt")
    assert f"world_size:{nproc}" in (tmp_path / "logs" / "many.txt").read_text()
    assert a["final_phase"] == b["final_phase"] == "ttt"
    for run in ("one", "many"):
        assert "global_chunks:2 global_chunk_tokens:1024" in (tmp_path / "logs" / f"{run}.txt").read_text()
    assert abs(float(a["ttt_val_bpb"]) - float(b["ttt_val_bpb"])) < 1e-5, (a["ttt_val_bpb"], b["ttt_val_bpb"])
    assert float(a["ttt_val_bpb"]) < float(a["roundtrip_val_bpb"]) - 0.01  # the adapters did work


def test_two_ranks_prime_the_compiled_eval_and_score_like_eager(tiny_data, tmp_path, launcher):
    """EVAL_COMPILE=1 (inductor on CPU) on two ranks: each compiles the eval graphs on its share of the priming
    stream (eval_prime), the phases then compile nothing more, and the score is the eager one's, LoRA updates
    in passes of their own included. The model is COMPILE_CFG's shape (less to compile)."""
    env = tiny_env(tiny_data, tmp_path, RUN_ID="one", TTT_LORA_RANK=4, TTT_LORA_CHUNK=16, TTT_LORA_DOCS=4,
                   TTT_LORA_LR="0.001", TTT_LORA_STEPS=8, TTT_LORA_GRAD_CONTEXT=16, EVAL_SLIDING=0,
                   VAL_MAX_TOKENS=2048, TTT_LORA_PHASE_TOKENS=512, TTT_ENABLED=0, NUM_LAYERS=2, XSA_LAST_N=2,
                   LOOP_START=1, LOOP_END=1, PARALLEL_RESIDUAL_START=1)
    assert launcher.run(env).returncode == 0
    scored = env | dict(EVAL_ONLY=str(tmp_path / "art" / "final_model_one.int6.br"), TTT_ENABLED="1")
    for run, flag in (("eager", "0"), ("compiled", "1")):
        res = launcher.run(scored | dict(RUN_ID=run, EVAL_COMPILE=flag), nproc=2)
        assert res.returncode == 0, res.stderr[-2000:]
    log = (tmp_path / "logs" / "compiled.txt").read_text().splitlines()
    primed = [line for line in log if line.startswith("eval_prime ")]
    assert len(primed) == 1 and int(primed[0].split("graphs:")[1].split()[0]) >= 2, primed
    assert " aot_bypasses:0 " in primed[0] + " ", primed  # the eval graphs (the loss outside them) stay cacheable
    phases = [line for line in log if " val_bpb:" in line]
    assert [line.split()[0] for line in phases] == ["roundtrip", "ttt"]
    assert all(line.endswith("new_graphs:0") for line in phases), phases
    a, b = parse_log(tmp_path / "logs" / "eager.txt"), parse_log(tmp_path / "logs" / "compiled.txt")
    assert not any(line.startswith("eval_prime ") for line in (tmp_path / "logs" / "eager.txt").read_text().splitlines())
    assert abs(float(a["ttt_val_bpb"]) - float(b["ttt_val_bpb"])) < 1e-4, (a["ttt_val_bpb"], b["ttt_val_bpb"])


def test_lora_cost_counts_the_work_that_scoring_does(tmp_path, launcher, monkeypatch):
    """bench/lora_cost.py counts, without a model, the scoring steps, forward passes, adapter updates and
    padded tokens that the LoRA phase really runs (here counted inside eval_tokens) on the same val stream,
    with the update in the scoring pass or (TTT_LORA_GRAD_CONTEXT) in a shorter pass of its own, and the shapes
    its attention meets."""
    knobs = dict(a="TTT_LORA_CHUNK=16 TTT_LORA_STEPS=4 TTT_LORA_GRAD_CONTEXT=0",
                 c="TTT_LORA_CHUNK=16 TTT_LORA_STEPS=4 TTT_LORA_GRAD_CONTEXT=40")
    real_score, real_nll, real_step = train_gpt.score_doc_chunk, train_gpt.chunk_nll, train_gpt.RowAdamW.step
    rng = np.random.default_rng(5)
    tokens = rng.integers(4, 64, size=1201).astype(np.uint16)
    tokens[::300] = 1  # documents long enough for windows of several padded lengths (EVAL_SEQ_LEN=256)
    val = train_gpt.ValSet.from_lut(tokens, train_gpt.ByteLUT(np.ones(64, np.int32), np.zeros(64, bool),
                                                              np.arange(64) < 4))
    model, env, seen = setup()[1], dict(TTT_LR="0", TTT_LORA_PHASE_TOKENS="600", EVAL_SEQ_LEN="256"), {}
    attended, hps = {}, {}  # the shapes themselves; each variant's knobs
    for name in knobs:
        hp = hps[name] = train_gpt.Hyperparameters(LORA_ENV | env | dict(kv.split("=") for kv in knobs[name].split()))
        count = seen[name] = dict.fromkeys(("steps", "passes", "forward_tokens", "backward_tokens", "updates"), 0)
        grad_work = []  # the latest pass with grad: the one an update backpropagates through
        shapes = set()  # the attention's (rows, length, grad)

        def score(*args, **kwargs):
            count["steps"] += 1
            return real_score(*args, **kwargs)

        def nll(model, hidden, tokens, begin, prev, last, seq_len, lora, grad):
            count["passes"] += 1
            length = train_gpt.window_len(begin, last, seq_len)
            count["forward_tokens"] += len(begin) * length
            grad_work[:] = [len(begin) * length] if grad else grad_work
            shapes.add((len(begin), length, grad))
            return real_nll(model, hidden, tokens, begin, prev, last, seq_len, lora, grad)

        def step(opt, *args, **kwargs):
            count["updates"] += 1
            count["backward_tokens"] += grad_work[0]
            return real_step(opt, *args, **kwargs)
        monkeypatch.setattr(train_gpt, "score_doc_chunk", score)
        monkeypatch.setattr(train_gpt, "chunk_nll", nll)
        monkeypatch.setattr(train_gpt.RowAdamW, "step", step)
        phase = train_gpt.plan_phases(hp, 32)[1]
        assert phase.lora and phase.seq_len == hp.eval_seq_len == 256
        train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, phase)
        monkeypatch.undo()
        count["shapes"], attended[name] = len(shapes), shapes
    assert seen["a"]["steps"] > seen["a"]["updates"] > 10 and seen["a"]["passes"] == seen["a"]["steps"]
    assert seen["c"]["passes"] > seen["c"]["steps"] == seen["a"]["steps"]  # some updates read less context
    assert seen["c"]["backward_tokens"] < seen["a"]["backward_tokens"]
    assert seen["c"]["shapes"] > seen["a"]["shapes"] > 3  # the update passes add shapes of their own
    write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    env = {k: v for k, v in os.environ.items() if not k.startswith(train_gpt.KNOB_PREFIXES)} | LORA_ENV | env
    env |= dict(DATA_PATH=str(tmp_path), VOCAB_SIZE="64")
    res = launcher.run(env, "bench/lora_cost.py", [f"{k} {v}" for k, v in knobs.items()] + ["b TTT_LORA_CHUNK=32 TTT_LORA_STEPS=4"])
    assert res.returncode == 0, res.stderr[-2000:]
    lines = {ln.split()[0]: dict(kv.split(":") for kv in ln.split()[1:]) for ln in res.stdout.splitlines()}
    for name in knobs:
        assert {k: int(lines[f"variant:{name}"][k]) for k in seen[name]} == seen[name]
    from bench.lora_cost import lora_cost  # the shapes themselves, not only their number
    for name in knobs:
        assert lora_cost(tokens, hps[name])[1] == [attended[name]], name
    a, b = lines["variant:a"], lines["variant:b"]
    assert int(a["scored"]) == len(tokens) - 1 and int(a["docs"]) == len(train_gpt.doc_spans(tokens)[0])
    assert int(b["steps"]) < int(a["steps"])  # larger chunks: fewer steps


def test_ranks_share_a_chunk_evenly_and_the_lora_chunk_grows_with_them():
    """window_share partitions a chunk's windows in order, counts within one of each other; doc_share deals
    documents (given their lengths) longest first, back and forth, so that ranks get alike lengths: the longest
    ones on different ranks, totals within the longest document of each other. LoRA's global chunk is
    each rank's TTT_LORA_PHASE_TOKENS (a rank's steps follow its longest documents, not its tokens)."""
    items = np.arange(11)
    lengths = np.random.default_rng(0).integers(1, 3000, size=11)
    for world in (1, 2, 3, 8, 16):
        shares = [train_gpt.window_share(items, r, world) for r in range(world)]
        assert np.array_equal(np.concatenate(shares), items)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        docs = [train_gpt.doc_share(items + 100, lengths, r, world) for r in range(world)]
        assert np.array_equal(np.sort(np.concatenate(docs)), items + 100)
        assert all(np.array_equal(d, np.sort(d)) for d in docs) and max(map(len, docs)) - min(map(len, docs)) <= 1
        longest = np.argsort(-lengths, kind="stable")[:world] + 100
        assert sorted(next(r for r, d in enumerate(docs) if i in d) for i in longest) == list(range(min(world, 11)))
        totals = [lengths[d - 100].sum() for d in docs if len(d)]
        assert max(totals) - min(totals) <= lengths.max()
    dealt = [train_gpt.doc_share(np.arange(7), np.array([9, 8, 7, 6, 5, 4, 3]), r, 2).tolist() for r in (0, 1)]
    assert dealt == [[0, 3, 4], [1, 2, 5, 6]]  # longest first: ranks 0, 1, 1, 0, 0, 1, 1
    hp = train_gpt.Hyperparameters(LORA_ENV | dict(TTT_LORA_PHASE_TOKENS="1000"))
    assert [train_gpt.global_chunk_tokens(hp, w) for w in (1, 8)] == [1000, 8000]


def test_the_legality_check_scores_small_chunks_eagerly():
    """The check's knobs: chunks of at most LEGALITY_CHUNK_TOKENS in both modes (a global chunk across 8 ranks
    too), eager; the run's own knobs untouched. Smaller chunks stay as set."""
    hp = train_gpt.Hyperparameters({})
    check = train_gpt.check_knobs(hp, 8)
    assert (check.ttt_chunk_tokens, train_gpt.global_chunk_tokens(check, 8)) == (8192, 8192)
    assert check.eval_compile is False and hp.eval_compile == train_gpt.AUTO and hp.ttt_lora_phase_tokens == 131072
    small = train_gpt.check_knobs(train_gpt.Hyperparameters(LORA_ENV), 1)
    assert (small.ttt_chunk_tokens, small.ttt_lora_phase_tokens) == (64, 64)
    odd = train_gpt.check_knobs(train_gpt.Hyperparameters(dict(EVAL_STRIDE="48", TTT_CHUNK_TOKENS="48000")), 1)
    assert odd.ttt_chunk_tokens == 8160 and odd.ttt_chunk_tokens % 48 == 0


def test_lora_cost_counts_the_busiest_rank_of_each_chunk(tmp_path, launcher):
    """WORLD_SIZE=N counts N ranks' critical path: per global chunk the busiest rank's work, not the sum.
    Three documents (200, 10 and 10 targets) in one chunk, two per batch: one process takes the long one
    with a short one, then the other short one (beside a row without targets); two ranks take the long one
    and the two short ones, and the long one is the critical path."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(4, 64, size=221).astype(np.uint16)
    tokens[[0, 200, 210]] = 1
    streams = dict(both=tokens, long=tokens[:201], short=tokens[210:])
    env = {k: v for k, v in os.environ.items() if not k.startswith(train_gpt.KNOB_PREFIXES)}
    env |= LORA_ENV | dict(TTT_LORA_PHASE_TOKENS="4096", TTT_LORA_DOCS="2", VOCAB_SIZE="64")
    counts = {}
    for name, world in (("both", "1"), ("both", "2"), ("long", "1"), ("short", "1")):
        folder = tmp_path / f"{name}{world}"
        folder.mkdir()
        write_shard(folder / "fineweb_val_000000.bin", streams[name])
        res = launcher.run(env | dict(WORLD_SIZE=world, DATA_PATH=str(folder)), "bench/lora_cost.py", ["a"])
        assert res.returncode == 0, res.stderr[-2000:]
        counts[name + world] = {k: int(v) for k, v in (kv.split(":") for kv in res.stdout.split()[1:])}
    one, two, long, short = counts["both1"], counts["both2"], counts["long1"], counts["short1"]
    assert one["scored"] == two["scored"] == len(tokens) - 1 and one["global_chunks"] == two["global_chunks"] == 1
    for k in ("steps", "forward_tokens", "updates"):
        assert one[k] == long[k] + short[k] and two[k] == long[k] > short[k] > 0, k
    bad = launcher.run(env | dict(WORLD_SIZE="0", DATA_PATH=str(tmp_path / "both1")), "bench/lora_cost.py", ["a"])
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: WORLD_SIZE='0'")
    bad = launcher.run(env | dict(DATA_PATH=str(tmp_path / "both1")), "bench/lora_cost.py", ["a", "b TTT_LORA_DOC=4"])
    assert bad.returncode == 2 and bad.stderr.strip() == "error: variant 'b TTT_LORA_DOC=4': TTT_LORA_DOC is not a knob (TTT_LORA_DOCS?)"


def test_chunk_lines_count_the_graphs_compiled_since_the_phase_began(monkeypatch):
    """Each ttt_chunk line says how many graphs torch.compile built since its phase began (a run stopped mid-phase
    still shows whether its time went on compiling): here a graph count that grows by one at every reading."""
    readings = iter(range(100, 10_000))
    monkeypatch.setattr(train_gpt, "compiled_graph_count", lambda: next(readings))
    tokens = doc_stream([40, 70, 30, 90, 50, 60])
    val = train_gpt.ValSet(tokens, np.ones(len(tokens) - 1, dtype=np.int32), "test")
    hp = train_gpt.Hyperparameters(LORA_ENV | dict(TTT_LORA_PHASE_TOKENS="80"))
    lines = []
    train_gpt.eval_tokens(randomized(small_cfg()), val, train_gpt.Dist(), hp, train_gpt.plan_phases(hp, 64)[1],
                          lines.append)
    chunk_lines = [line for line in lines if line.startswith("ttt_chunk:")]
    assert len(chunk_lines) >= 2, lines
    assert [int(line.rsplit("new_graphs:", 1)[1]) for line in chunk_lines] == list(range(1, len(chunk_lines) + 1))


def test_primed_eval_compiles_nothing_after_training():
    """prime_eval (EVAL_COMPILE=1, inductor on CPU) scores a made-up stream with a copy of one model; every
    phase of another model's eval (roundtrip, LoRA TTT with its own update passes, the sliding reference; LoRA TTT
    scoring on after the budget stopped its adapting) builds no graph: on a GPU that is the compile time taken off
    the eval clock. The primed model and the RNG are left as they were."""
    lengths = [400, 300, 260, 200, 150, 90, 40]  # the sliding phase's pace chunks: two windows or more each
    tokens = doc_stream(lengths)
    val = train_gpt.ValSet(tokens, np.ones(len(tokens) - 1, dtype=np.int32), "test")
    hp = train_gpt.Hyperparameters(LORA_ENV | dict(EVAL_COMPILE="1", EVAL_SEQ_LEN="256", EVAL_STRIDE="64",
                                                   TTT_LORA_CHUNK="16", TTT_LORA_STEPS="2", TTT_LORA_GRAD_CONTEXT="32",
                                                   NGRAM_TILT="1"))
    primed, scored = randomized(COMPILE_CFG), randomized(COMPILE_CFG)
    with torch.no_grad():
        for p in scored.parameters():
            p.mul_(0.9)
    torch._dynamo.reset()
    before, rng = {k: v.clone() for k, v in primed.state_dict().items()}, torch.get_rng_state()
    lines = []
    assert train_gpt.prime_eval(primed, 256, train_gpt.Dist(), hp, lines.append) > 0
    # three graphs: windows and budget-stopped documents share the one without the LoRA; with it, grad and none
    assert int(lines[0].split("graphs:")[1].split()[0]) == 3 and torch.equal(torch.get_rng_state(), rng)
    priming_s, compile_ms = float(lines[0].split()[1][5:-1]), int(lines[0].split("compile_ms:")[1].split()[0])
    assert 0 < compile_ms <= 1000 * priming_s  # its graph builds, inside the priming's time
    assert all(torch.equal(v, before[k]) for k, v in primed.state_dict().items())
    lines = []
    train_gpt.score_phases(scored, 256, val, train_gpt.Dist(), hp, lines.append)
    phases = [line for line in lines if " val_bpb:" in line]
    assert [line.split()[0] for line in phases] == ["roundtrip", "ttt", "sliding"]
    assert all(line.endswith("new_graphs:0") for line in phases), phases
    chunk_lines = [line for line in lines if line.startswith("ttt_chunk:")]
    assert chunk_lines and all(line.endswith(" new_graphs:0") for line in chunk_lines), chunk_lines
    graphs, lines = train_gpt.compiled_graph_count(), []  # and TTT scoring on after the budget stopped it
    train_gpt.eval_tokens(scored, val, train_gpt.Dist(), hp, train_gpt.plan_phases(hp, 256)[1], lines.append, 0.0)
    assert any(line.startswith("ttt:updates_stopped after_chunk:2/") for line in lines), lines
    assert train_gpt.compiled_graph_count() == graphs
