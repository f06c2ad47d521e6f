"""AWQ-lite: the most salient groups of input columns rounded on the int8 grid inside GPTQ, and the artifact."""
import pytest
import torch

import train_gpt
from test_lqer import hessians, quick_pack, random_state, small_cfg  # noqa: F401 (quick_pack is a fixture)
from test_quant import correlated_hessian, hessian_error

G = train_gpt.AWQ_GROUP_COLS


def loud(hess, key, cols, factor=100.0):
    """The Hessians with the inputs `cols` of `key` `factor` times louder (x scaled by sqrt(factor))."""
    out = dict(hess)
    s = torch.ones(out[key].size(0))
    s[cols] = factor ** 0.5
    out[key] = out[key] * s[:, None] * s[None, :]
    return out


def test_selection_ranks_groups_by_input_rms_times_weight():
    """The group of loud inputs wins; with equal inputs, the group of larger weights; matrices at 8 bits or more
    (here the embedding) are never chosen; top_k 0 or no Hessians choose nothing."""
    cfg = small_cfg()
    state, hess = random_state(cfg), hessians(cfg)
    key = ("mlp_act", 1)  # the input of down.1
    masks = train_gpt.awq_select(state, loud(hess, key, slice(G, 2 * G)), cfg.num_layers, 1, lambda name: 6)
    k = train_gpt.hessian_keys("mlp_down_bank", cfg.num_layers).index(key)
    assert list(masks) == ["mlp_down_bank"] and masks["mlp_down_bank"].sum() == G
    assert masks["mlp_down_bank"][k, G:2 * G].all()
    # rms, not the mean square: inputs 100x louder in power (10x in rms) lose to weights 20x larger
    down = train_gpt.hessian_keys("mlp_down_bank", cfg.num_layers)
    flat_h = {k: torch.eye(h.size(0)) for k, h in hess.items()}
    heavy = dict(state, mlp_down_bank=state["mlp_down_bank"].clone())
    heavy["mlp_down_bank"][down.index(("mlp_act", 0)), :, 2 * G:3 * G] *= 20
    masks = train_gpt.awq_select(heavy, loud(flat_h, ("mlp_act", 1), slice(0, G)), cfg.num_layers, 1, lambda name: 6)
    assert list(masks) == ["mlp_down_bank"] and masks["mlp_down_bank"][down.index(("mlp_act", 0)), 2 * G:3 * G].all()
    flat = {("head_in",): torch.eye(cfg.model_dim)} | {k: torch.eye(h.size(0)) for k, h in hess.items() if k != ("head_in",)}
    big = dict(state, **{"tok_emb.weight": state["tok_emb.weight"].clone()})
    big["tok_emb.weight"][:, 2 * G:3 * G] *= 50
    masks = train_gpt.awq_select(big, flat, cfg.num_layers, 1, lambda name: 6)
    assert list(masks) == ["tok_emb.weight"] and masks["tok_emb.weight"][0, 2 * G:3 * G].all()
    bits = {"tok_emb.weight": 8}
    masks = train_gpt.awq_select(big, flat, cfg.num_layers, 2, lambda name: bits.get(name, 6))
    assert "tok_emb.weight" not in masks and sum(m.sum() for m in masks.values()) == 2 * G
    assert train_gpt.awq_select(state, hess, cfg.num_layers, 0, lambda name: 6) == {}
    assert train_gpt.awq_select(state, {}, cfg.num_layers, 3, lambda name: 6) == {}


def test_fine_columns_round_on_the_int8_grid_in_the_same_solve():
    """Columns marked fine take int8 codes at the int8 row scale and come out closer; the others stay on the
    int6 grid. No column marked is today's GPTQ, bit for bit."""
    torch.manual_seed(0)
    W, H = torch.randn(2, 48, 256), torch.stack([correlated_hessian(256, 1024, seed=s) for s in (1, 2)])
    fine = torch.zeros(2, 256, dtype=torch.bool)
    fine[1, G:2 * G] = True
    q, s = train_gpt.gptq_quantize(W, H, 6, 12.85, fine=fine)
    q0, s0 = train_gpt.gptq_quantize(W, H, 6, 12.85)
    assert torch.equal(s, s0) and torch.equal(q[0], q0[0])  # slice 0 has no fine column: untouched
    assert q[1][:, ~fine[1]].abs().max() <= 31 < q[1][:, fine[1]].abs().max() <= 127
    fine_scale = train_gpt.row_scale(W, 12.85, 8)
    deq = torch.where(fine[:, None, :], q.float() * fine_scale[..., None], q.float() * s.float()[..., None])
    err_fine = hessian_error(W[1], deq[1], H[1])  # what GPTQ minimizes: the layer's output error
    err_base = hessian_error(W[1], train_gpt.dequantize_rows(q0, s0)[1], H[1])
    assert err_fine < 0.9 * err_base, (err_fine, err_base)
    q_none, _ = train_gpt.gptq_quantize(W, H, 6, 12.85, fine=torch.zeros_like(fine))
    assert torch.equal(q_none, q0)


def test_awq_survives_the_artifact_and_lqer_fits_the_mixed_error(quick_pack):  # noqa: F811
    """quantize_state stores the chosen groups and their row scales (zero in slices without a group), the
    artifact carries them, loading dequantizes those columns at the int8 scale, and LQER's error is that of
    the mixed result."""
    cfg = small_cfg()
    state, hess = random_state(cfg), hessians(cfg)
    hess = loud(hess, ("attn_in", 0), slice(0, G))
    q = train_gpt.quantize_state(state, hess, cfg.num_layers, 6, 12.85, 7, 14.0, awq_groups=2)
    chosen = {n: e for n, e in q.items() if "awq.cols" in e}
    assert chosen and sum(int(e["awq.cols"].sum()) for e in chosen.values()) == 2 * G
    for e in chosen.values():
        cols = e["awq.cols"].reshape(-1, e["awq.cols"].size(-1)).bool()
        scale = e["awq.scale"].reshape(cols.size(0), -1)
        assert (scale[~cols.any(1)] == 0).all() and (scale[cols.any(1)] > 0).all()
    blob = train_gpt.pack_artifact(q, {"model": {}})
    back, _ = train_gpt.unpack_artifact(blob)
    deq, direct = train_gpt.dequantize_state(back), train_gpt.dequantize_state(q)
    assert all(torch.equal(deq[n], direct[n]) for n in q)
    name = next(iter(chosen))
    plain = train_gpt.dequantize_rows(q[name]["q"], q[name]["scale"])
    assert not torch.equal(direct[name], plain)
    errors = {(n, k): v for v, n, k in train_gpt.gptq_errors(state, q)}
    rows, cols = state[name].shape[-2:]
    k = int(chosen[name]["awq.cols"].reshape(-1, cols).any(1).nonzero()[0])
    E = state[name].reshape(-1, rows, cols)[k] - direct[name].reshape(-1, rows, cols)[k]
    assert errors[(name, k)] == pytest.approx(torch.linalg.matrix_norm(E).item(), rel=1e-5)
    line = train_gpt.awq_line(q, cfg.num_layers)
    assert line.startswith("awq: groups:2 bits:8 cols:64 ") and int(line.rsplit("field_bytes:", 1)[1]) > 0
    # LQER corrects the mixed error: each correction's reported error is the loaded matrix's
    report = train_gpt.apply_lqer(state, q, 13, 4, 64, cfg.num_layers)
    assert any(r["name"] == name and r["slice"] == k and r["kept"] for r in report)
    loaded = train_gpt.dequantize_state(q)
    for r in report:
        W = state[r["name"]]
        rows, cols = W.shape[-2:]
        err = W.reshape(-1, rows, cols)[r["slice"]] - loaded[r["name"]].reshape(-1, rows, cols)[r["slice"]]
        assert r["after"] == pytest.approx(torch.linalg.matrix_norm(err).item(), rel=1e-4), r


@pytest.mark.parametrize("field,value,problem", [
    ("awq.cols", 2, "0/1 mask"), ("awq.scale", float("inf"), "does not match"), ("awq.scale", None, "belong together")])
def test_a_corrupted_awq_entry_is_a_one_line_error(quick_pack, field, value, problem):  # noqa: F811
    cfg = small_cfg()
    state, hess = random_state(cfg), hessians(cfg)
    q = train_gpt.quantize_state(state, hess, cfg.num_layers, 6, 12.85, 7, 14.0, awq_groups=1)
    name = next(n for n, e in q.items() if "awq.cols" in e)
    if value is None:
        del q[name][field]
    else:
        q[name][field] = q[name][field].clone()
        q[name][field].view(-1)[0] = value
    with pytest.raises(train_gpt.UserError, match=f"corrupted AWQ entry {name}: .*{problem}"):
        train_gpt.unpack_artifact(train_gpt.pack_artifact(q, {"model": {}}))


def test_knob_off_writes_no_fields_and_needs_hessians_when_on():
    """AWQ_GROUPS=0 (the default): no awq field anywhere. On, it needs the GPTQ Hessians it ranks by."""
    cfg = small_cfg()
    state, hess = random_state(cfg), hessians(cfg)
    off = train_gpt.quantize_state(state, hess, cfg.num_layers, 6, 12.85, 7, 14.0)
    assert not any(f.startswith("awq") for e in off.values() for f in e)
    assert train_gpt.Hyperparameters({}).awq_groups == 0
    with pytest.raises(train_gpt.UserError, match="AWQ_GROUPS=2: .* needs GPTQ_CALIBRATION_BATCHES > 0"):
        train_gpt.Hyperparameters({"AWQ_GROUPS": "2", "GPTQ_CALIBRATION_BATCHES": "0"})
    with pytest.raises(train_gpt.UserError, match="PREQUANT_SAVE=x.pt: an EVAL_ONLY run exports nothing"):
        train_gpt.Hyperparameters({"PREQUANT_SAVE": "x.pt", "EVAL_ONLY": "a.br"})


def test_gptq_is_blind_to_the_hessians_scale_dead_columns_included():
    """Means or sums of x x^T give the same codes: a dead input's filled diagonal follows the Hessian's scale (a
    power-of-two scale keeps every float operation exact)."""
    torch.manual_seed(0)
    W, H = torch.randn(2, 32, 128), torch.stack([correlated_hessian(128, 512, seed=s) for s in (3, 4)])
    H[:, 5, :] = H[:, :, 5] = 0  # input 5 never fires
    q, s = train_gpt.gptq_quantize(W, H, 6, 12.85)
    q_small, s_small = train_gpt.gptq_quantize(W, H * 2.0 ** -12, 6, 12.85)
    assert torch.equal(q, q_small) and torch.equal(s, s_small) and (q[:, :, 5] == 0).all()


def calibration_setup(tiny_data, batches: int):
    """A two-layer model whose layers 0-1 loop once more, knobs for `batches` calibration batches, the train shards."""
    data, _ = tiny_data
    cfg = train_gpt.ModelConfig(**{**small_cfg().__dict__, "vocab_size": 1024, "num_loops": 1, "loop_start": 0,
                                   "loop_end": 1})
    hp = train_gpt.Hyperparameters({"GPTQ_CALIBRATION_BATCHES": str(batches), "TRAIN_SEQ_LEN": "32",
                                    "VOCAB_SIZE": "1024"})
    return cfg, train_gpt.GPT(cfg), hp, train_gpt.shard_files(str(data), "train")


def test_hessians_are_means_over_every_input_row(tiny_data):
    """collect_hessians divides each key's X^T X by the rows it saw (a looped layer's inputs count per visit),
    so that AWQ-lite's input rms means the same thing in every matrix."""
    cfg, model, hp, files = calibration_setup(tiny_data, 2)
    means = train_gpt.collect_hessians(model, files, hp, (3, 1), train_gpt.Dist())
    stream, rec = train_gpt.TrainStream(files, 32, hp.seed + 1, 1024), train_gpt.HessianRecorder()
    for _ in range(2):
        batch = torch.from_numpy(stream.next_batch(3, slice(0, 3)))
        model.tap_inputs(batch[:, :-1], looped=True, tap=rec)
    visits = {("attn_in", 0): 2, ("attn_in", 1): 2, ("head_in",): 1}  # layers 0-1 loop once more
    for key, n in visits.items():
        assert rec.rows[key] == n * 2 * 3 * 32
        torch.testing.assert_close(means[key], rec.hessians[key] / rec.rows[key])


def test_the_compiled_calibration_forward_gives_the_eager_hessians_in_one_graph(tiny_data):
    """Trainer.matrix_inputs compiles the calibration forward (fullgraph, static shape) where training compiles:
    one graph for every batch, no break where the tap collects the inputs, the Hessians those of the eager forward."""
    cfg, model, hp, files = calibration_setup(tiny_data, 3)
    torch._dynamo.reset()
    graphs = train_gpt.compiled_graph_count()
    compiled = torch.compile(train_gpt.matrix_inputs, fullgraph=True, dynamic=False, backend="aot_eager")
    means = train_gpt.collect_hessians(model, files, hp, (3, 1), train_gpt.Dist(), compiled)
    assert train_gpt.compiled_graph_count() - graphs == 1
    eager = train_gpt.collect_hessians(model, files, hp, (3, 1), train_gpt.Dist())
    assert means.keys() == eager.keys() and len(means) == 4 * cfg.num_layers + 1
    for key, H in eager.items():
        torch.testing.assert_close(means[key], H)


def test_hessians_that_overflowed_are_a_clear_error(tiny_data):
    """A model whose activations overflow on the calibration batches (an inf weight here) gets one error naming
    the Hessians, not GPTQ's bare failure after its damping retries."""
    data, _ = tiny_data
    cfg = small_cfg()
    cfg = train_gpt.ModelConfig(**{**cfg.__dict__, "vocab_size": 1024, "num_loops": 0})
    model = train_gpt.GPT(cfg)
    with torch.no_grad():
        model.mlp_up_bank[0, 0, 0] = float("inf")
    hp = train_gpt.Hyperparameters({"GPTQ_CALIBRATION_BATCHES": "1", "TRAIN_SEQ_LEN": "32", "VOCAB_SIZE": "1024"})
    files = train_gpt.shard_files(str(data), "train")
    with pytest.raises(train_gpt.UserError,
                       match=r"GPTQ Hessians not finite for \('\w+', \d\).*: the model's activations overflow"):
        train_gpt.collect_hessians(model, files, hp, (3, 1), train_gpt.Dist())


def test_the_export_logs_the_groups_and_packs_them(quick_pack):  # noqa: F811
    """quantize_within_budget with AWQ_GROUPS: one `awq:` line per try naming each group, and the blob whose size
    the cap is checked on carries them."""
    cfg = small_cfg()
    state, hess = random_state(cfg), loud(hessians(cfg), ("mlp_in", 0), slice(G, 2 * G))
    lines = []
    hp = train_gpt.Hyperparameters({"CLIP_SEARCH_STEPS": "0", "LQER_TOP_K": "0", "AWQ_GROUPS": "1"})
    blob, _ = train_gpt.quantize_within_budget(state, hess, cfg, hp, 0, lines.append)
    awq = [line for line in lines if line.startswith("awq:")]
    assert len(awq) == 1 and f" up.0:{G} " in awq[0], awq
    q, _ = train_gpt.unpack_artifact(blob)
    assert q["mlp_up_bank"]["awq.cols"][0, G:2 * G].all() and int(q["mlp_up_bank"]["awq.cols"].sum()) == G


def test_hessians_under_the_gpus_autocast_are_float32_and_positive_semidefinite(tiny_data, monkeypatch):
    """On CUDA collect_hessians runs the model under bf16 autocast (autocast_ctx); emulated here with CPU autocast,
    which recasts matmuls the same way: every Hessian is float32, symmetric and positive semidefinite, the sum of
    the rows the tap saw in fp32 (a bf16 sum was neither: results/2026-12-07_hessian_precision_cpu)."""
    data, _ = tiny_data
    cfg = train_gpt.ModelConfig(**{**small_cfg().__dict__, "vocab_size": 1024})
    model = train_gpt.GPT(cfg)
    hp = train_gpt.Hyperparameters({"GPTQ_CALIBRATION_BATCHES": "4", "TRAIN_SEQ_LEN": "32", "VOCAB_SIZE": "1024"})
    files = train_gpt.shard_files(str(data), "train")
    seen = {}

    class Keeping(train_gpt.HessianRecorder):
        def __call__(self, key, x):
            seen.setdefault(key, []).append(x.detach().reshape(-1, x.size(-1)).double())
            super().__call__(key, x)
    monkeypatch.setattr(train_gpt, "HessianRecorder", Keeping)
    monkeypatch.setattr(train_gpt, "autocast_ctx", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    means = train_gpt.collect_hessians(model, files, hp, (3, 1), train_gpt.Dist())
    assert set(means) == set(seen)
    for key, H in means.items():
        xs = torch.cat(seen[key])
        ref = xs.T @ xs / len(xs)
        assert H.dtype == torch.float32, key
        assert ((H.double() - ref).norm() / ref.norm()).item() < 1e-5, key
        assert torch.linalg.eigvalsh(H.double()).min().item() >= -1e-6 * ref.diagonal().max().item(), key
