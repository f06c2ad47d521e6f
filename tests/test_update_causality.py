"""What each eval-time update may read, checked on the state it leaves: the weights after a TTT update, a
document's adapter row after its step and a window's SLOT delta must be the same on two streams that agree up
to the last target that update may read. The future-perturbation check compares scores, so it cannot see an
update that reads the very next target (only that target's own score would move, and it is never perturbed);
these tests can. Each also checks that a later update does see the perturbation (the comparison has teeth)."""
import numpy as np
import torch

import train_gpt
from test_eval import EVAL_ENV, setup
from test_lora_ttt import LORA_ENV
from test_model import randomized, small_cfg

VAL = setup()[3]  # test_eval's stream (random tokens, a BOS every 37) and its bytes per target


def perturbed_after(tokens: np.ndarray, p: int) -> np.ndarray:
    """The LoRA legality check's perturbation (document boundaries kept, target p + 1 surely different)."""
    return train_gpt.perturbed_after(tokens, p, True, small_cfg().vocab_size)


def score(tokens: np.ndarray, env: dict, phase: train_gpt.Phase):
    train_gpt.eval_tokens(randomized(small_cfg()), VAL.with_tokens(tokens), train_gpt.Dist(),
                          train_gpt.Hyperparameters(env), phase)


def weights_after_updates(tokens, env, phase, monkeypatch) -> list[torch.Tensor]:
    """The whole model's weights after each global update (windowed TTT, LoRA TTT's global phase)."""
    real, seen = train_gpt.TTTUpdater.update, []

    def update(self, *args):
        real(self, *args)
        seen.append(torch.cat([p.detach().reshape(-1).clone() for p in self.model.parameters()]))
    with monkeypatch.context() as m:  # undone on return: the next call wraps the real one again
        m.setattr(train_gpt.TTTUpdater, "update", update)
        score(tokens, env, phase)
    return seen


def test_a_windowed_ttt_update_reads_only_its_scored_chunk(monkeypatch):
    """Update c trains on targets up to (c + 1) * TTT_CHUNK_TOKENS (64), every one scored before it."""
    env, phase, tokens = EVAL_ENV | dict(TTT_LORA_RANK="0"), train_gpt.Phase("ttt", 32, 8, ttt=True), VAL.tokens
    a = weights_after_updates(tokens, env, phase, monkeypatch)
    for c in (0, 1):
        hi = (c + 1) * 64
        b = weights_after_updates(perturbed_after(tokens, hi), env, phase, monkeypatch)
        assert torch.equal(a[c], b[c]) and not torch.equal(a[c + 1], b[c + 1]), c


def test_a_lora_global_update_reads_only_its_scored_documents(monkeypatch):
    """LoRA TTT's global update c trains on its chunk's documents, whose targets end at the next chunk's
    first document start (doc_chunks' hi)."""
    env = LORA_ENV | dict(TTT_LORA_LR="0")  # the base model's global update alone
    phase, tokens = train_gpt.Phase("ttt", 32, 8, ttt=True, lora=True), VAL.tokens
    chunks = train_gpt.doc_chunks(*train_gpt.doc_spans(tokens), train_gpt.global_chunk_tokens(
        train_gpt.Hyperparameters(env), 1))
    a = weights_after_updates(tokens, env, phase, monkeypatch)
    for c in (0, 1):
        hi = chunks[c][2]
        b = weights_after_updates(perturbed_after(tokens, hi), env, phase, monkeypatch)
        assert torch.equal(a[c], b[c]) and not torch.equal(a[c + 1], b[c + 1]), c


def adapter_steps(tokens, env, monkeypatch) -> dict[tuple[int, int, int], torch.Tensor]:
    """{(step, row, last target read): that row's adapters after the step} for every adapter step."""
    real_plan, real_step, plan, out = train_gpt.step_plan, train_gpt.RowAdamW.step, [], {}

    def step_plan(*args):
        for st in real_plan(*args):
            plan.append(st)
            yield st

    def step(opt, *args, **kwargs):
        res = real_step(opt, *args, **kwargs)
        _, prev, last, _, _ = plan[-1]
        for row in np.flatnonzero(last > prev):
            out[(len(plan) - 1, int(row), int(last[row]))] = torch.cat(
                [p.detach()[row].reshape(-1).clone() for p in opt.params])
        return res
    with monkeypatch.context() as m:
        m.setattr(train_gpt, "step_plan", step_plan)
        m.setattr(train_gpt.RowAdamW, "step", step)
        score(tokens, env, train_gpt.Phase("ttt", 32, 8, ttt=True, lora=True))
    return out


def test_an_adapter_step_reads_only_its_documents_scored_chunk(monkeypatch):
    """A document's adapter row after its step j depends on the targets it has scored (up to `last`) only."""
    env, tokens = LORA_ENV | dict(TTT_LR="0"), VAL.tokens  # adapters alone: the base model stays put
    steps = adapter_steps(tokens, env, monkeypatch)
    keys = [k for k in sorted(steps) if k[2] + 1 < len(tokens) and tokens[k[2] + 1] != train_gpt.BOS_ID]  # not its end
    for key in (keys[1], keys[len(keys) // 2]):
        other = adapter_steps(perturbed_after(tokens, key[2]), env, monkeypatch)
        assert torch.equal(steps[key], other[key]), key
        later = [k for k in keys if k[0] > key[0] and k[1] == key[1]]
        assert later and not torch.equal(steps[later[0]], other[later[0]]), key


def slot_deltas(tokens, env, monkeypatch) -> dict[int, torch.Tensor]:
    """{a window's previous end: its fitted SLOT delta}."""
    real_windows, real_fit, current, out = train_gpt.score_windows, train_gpt.fit_slot_delta, [], {}

    def score_windows(model, hidden, tokens, ends, prev_ends, *args, **kwargs):
        current[:] = [prev_ends]
        return real_windows(model, hidden, tokens, ends, prev_ends, *args, **kwargs)

    def fit(model, h, y, mask, hp):
        fitted = real_fit(model, h, y, mask, hp)
        for row, prev in enumerate(current[0]):
            out[int(prev)] = (fitted[row, 0] - h[row, 0].float()).detach().clone()
        return fitted
    with monkeypatch.context() as m:
        m.setattr(train_gpt, "score_windows", score_windows)
        m.setattr(train_gpt, "fit_slot_delta", fit)
        score(tokens, env, train_gpt.Phase("slot", 32, 8, slot="context"))
    return out


def test_a_slot_context_delta_reads_only_its_windows_context(monkeypatch):
    """SLOT=context fits a window's delta on its context targets, scored by earlier windows (up to prev)."""
    env, tokens = EVAL_ENV | dict(TTT_ENABLED="0", SLOT="context", SLOT_STEPS="3", SLOT_LR="0.1"), VAL.tokens
    a = slot_deltas(tokens, env, monkeypatch)
    for prev in (32, 144):
        b = slot_deltas(perturbed_after(tokens, prev), env, monkeypatch)
        assert torch.equal(a[prev], b[prev]) and not torch.equal(a[prev + 8], b[prev + 8]), prev


def test_the_checks_perturbation_changes_the_next_target_where_a_shuffle_would_not():
    """A tail of one token shuffles to itself: the check's stream must still differ at p + 1 (an update that read
    two targets ahead shows only there), and only after p; the document boundaries stay where asked."""
    tokens = np.array([1, 7, 9, 5, 5, 1, 5, 5, 5], dtype=np.uint16)
    for keep_bos in (True, False):
        other = train_gpt.perturbed_after(tokens, 2, keep_bos, 64)
        assert np.array_equal(other[:3], tokens[:3]) and other[3] != tokens[3]
        assert other[3] != train_gpt.BOS_ID or not keep_bos  # kept boundaries: none made
    kept = train_gpt.perturbed_after(tokens, 2, True, 64) == train_gpt.BOS_ID
    assert np.array_equal(kept, tokens == train_gpt.BOS_ID)
    pad = np.array([1, 7, 0, 0], dtype=np.uint16)  # the next id would be BOS: a boundary is never made
    assert train_gpt.perturbed_after(pad, 1, True, 64)[2] not in (0, train_gpt.BOS_ID)


def test_the_check_perturbs_after_a_global_update_where_the_next_target_can_change():
    """The point after a global update (p = its chunk's last target + 1) is one whose p + 1 is no BOS where one
    exists: a BOS stays in place, so a read two targets past the update would not show there (here the update
    nearest the middle, 128, is followed by a document of two targets)."""
    from test_lora_ttt import doc_stream
    tokens = doc_stream([64, 2, 62, 2, 70, 90])
    hp = train_gpt.Hyperparameters(LORA_ENV | dict(TTT_LORA_PHASE_TOKENS="64"))
    points = train_gpt.lora_points(tokens, train_gpt.Phase("ttt", 32, 8, ttt=True, lora=True), hp, 1)
    assert 201 in points and all(tokens[p + 1] != train_gpt.BOS_ID for p in points), points
