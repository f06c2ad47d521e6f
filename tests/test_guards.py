"""Small guards: knob typos, the auto tri-state, no-clobber writes where hard links are missing, and
artifacts whose model config lacks a field, has a retired one or is one no run could train."""
import dataclasses
import errno
import re

import pytest
import torch

import train_gpt
from conftest import untrained_artifact
from test_model import small_cfg


@pytest.mark.parametrize("name,warned", [
    ("SEDD", True), ("SEED", False), ("ITERATINS", True), ("MODEL_DIMM", True), ("TTT_LRR", True),
    ("HOME", False), ("PATH", False), ("LOG_LEVEL", False), ("OMP_NUM_THREADS", False), ("CUDA_VISIBLE_DEVICES", False), ("RUN_MODE", False),
])
def test_typo_warnings(name, warned):
    hp = train_gpt.Hyperparameters({name: "1"})
    assert hp.warnings == ([f"env {name} is set but no knob reads it (typo?)"] if warned else [])


def test_an_auto_knob_has_no_truth_value():
    hp = train_gpt.Hyperparameters({})
    assert hp.eval_compile == train_gpt.AUTO
    with pytest.raises(TypeError, match="compare it with AUTO"):
        bool(hp.eval_compile)


def test_no_clobber_write_without_hard_links(tmp_path, monkeypatch):
    """Where link(2) is not supported the name is claimed with O_EXCL: still written whole, still
    never over an existing file, and no temp file is left behind."""
    def no_links(*_):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(train_gpt.os, "link", no_links)
    target = tmp_path / "final_model_x.int6.br"
    train_gpt.write_atomic(target, b"model bytes", overwrite=False)
    assert target.read_bytes() == b"model bytes"
    with pytest.raises(train_gpt.UserError, match="already exists: it is never overwritten"):
        train_gpt.write_atomic(target, b"other bytes", overwrite=False)
    assert target.read_bytes() == b"model bytes" and [p.name for p in tmp_path.iterdir()] == [target.name]


def artifact(cfg, drop: str, tmp_path, **extra):
    """An untrained artifact of cfg whose model config lacks the field `drop` and records `extra` besides."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != drop} | extra
    path = untrained_artifact(cfg, tmp_path / "a.br", model=fields)
    return train_gpt.read_artifact(path) + (path,)


def test_artifact_lacking_a_model_field_is_refused(tmp_path):
    qstate, meta, path = artifact(small_cfg(), "num_loops", tmp_path)
    with pytest.raises(train_gpt.UserError, match="its model config lacks num_loops"):
        train_gpt.artifact_model(qstate, meta, path, torch.device("cpu"), train_gpt.causal_attention)


def test_artifact_from_before_a_legacy_field_gets_its_old_default(tmp_path):
    qstate, meta, path = artifact(small_cfg(residual_dtype="float32"), "residual_dtype", tmp_path)
    model = train_gpt.artifact_model(qstate, meta, path, torch.device("cpu"), train_gpt.causal_attention)
    assert model.cfg.residual_dtype == "float32"


def test_a_retired_model_field_loads_only_where_it_was_off(tmp_path):
    """Files written while DOC_ATTENTION existed record doc_attention: off, the artifact and the PREQUANT_SAVE file
    load as before; on, both are refused (this version cannot run the model they trained), as is a field no
    version had."""
    qstate, meta, path = artifact(small_cfg(), "", tmp_path, doc_attention=False)
    model = train_gpt.artifact_model(qstate, meta, path, torch.device("cpu"), train_gpt.causal_attention)
    assert model.cfg == small_cfg()
    for name, extra, message in (("on", dict(doc_attention=True), "trained with DOC_ATTENTION, which this version of "
                                                                  "the script no longer has"),
                                 ("new", dict(no_such_field=1), "its model config does not fit this version of the script")):
        (tmp_path / name).mkdir()
        qstate, meta, path = artifact(small_cfg(), "", tmp_path / name, **extra)
        with pytest.raises(train_gpt.UserError, match=f"artifact {path}: {message}"):
            train_gpt.artifact_model(qstate, meta, path, torch.device("cpu"), train_gpt.causal_attention)
    saved = dict.fromkeys(train_gpt.PREQUANT_FIELDS, 0) | dict(model=dataclasses.asdict(small_cfg()))
    for on in (False, True):
        torch.save(saved | dict(model=saved["model"] | dict(doc_attention=on)), tmp_path / f"pre{on}.pt")
    assert train_gpt.load_prequant(str(tmp_path / "preFalse.pt"))["model"] == small_cfg()
    with pytest.raises(train_gpt.UserError, match="preTrue.pt: trained with DOC_ATTENTION"):
        train_gpt.load_prequant(str(tmp_path / "preTrue.pt"))


@pytest.mark.parametrize("fields,message", [
    (dict(num_heads=0), "NUM_HEADS='0': expected a value >= 1"),
    (dict(num_loops=2 ** 40), "NUM_LOOPS='1099511627776': expected a value in [0, 64]"),
    (dict(num_kv_heads=3), "NUM_KV_HEADS=3: must divide NUM_HEADS=4"),
    (dict(num_layers=6.5), "NUM_LAYERS='6.5': expected int"),
    (dict(residual_dtype="float8"), "RESIDUAL_DTYPE='float8': expected one of float32|bfloat16"),
])
def test_an_artifact_config_no_run_could_train_is_refused_before_a_model_is_built(tmp_path, fields, message):
    """The artifact's model fields pass the knobs' types, bounds and rules, as a training run's would: a forged
    one was a ZeroDivisionError, a MemoryError in building the layer order, or a model that failed mid-scoring."""
    qstate, meta, path = artifact(small_cfg(), "", tmp_path, **fields)
    with pytest.raises(train_gpt.UserError, match=re.escape(f"artifact {path}: its model config is not one a run "
                                                            f"could train ({message}")):
        train_gpt.artifact_model(qstate, meta, path, torch.device("cpu"), train_gpt.causal_attention)


def test_an_artifact_whose_tensors_do_not_fit_its_config_is_refused(tmp_path):
    qstate, meta, path = artifact(small_cfg(), "", tmp_path, mlp_mult=3)
    with pytest.raises(train_gpt.UserError, match=re.escape(f"artifact {path}: tensors do not match its model config")):
        train_gpt.artifact_model(qstate, meta, path, torch.device("cpu"), train_gpt.causal_attention)


def test_a_failed_rename_after_the_claim_leaves_nothing(tmp_path, monkeypatch):
    """Without hard links the name is claimed first; if the rename then fails, the empty claim is
    removed too, so a rerun is not blocked by an empty 'existing' artifact."""
    def no_links(*_):
        raise OSError(errno.EPERM, "Operation not permitted")

    def full_disk(*_):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train_gpt.os, "link", no_links)
    monkeypatch.setattr(train_gpt.os, "replace", full_disk)
    with pytest.raises(train_gpt.UserError, match="write failed \\(No space left on device\\); nothing was written"):
        train_gpt.write_atomic(tmp_path / "final_model_x.int6.br", b"model bytes", overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_a_tilt_with_no_phase_to_tilt_is_refused():
    with pytest.raises(train_gpt.UserError, match="NGRAM_TILT=1: no phase to tilt"):
        train_gpt.Hyperparameters(dict(NGRAM_TILT="1", TTT_ENABLED="0", EVAL_STRIDE="0"))
    assert train_gpt.Hyperparameters(dict(NGRAM_TILT="1", TTT_ENABLED="0")).ngram_tilt
    assert not train_gpt.Hyperparameters(dict(TTT_ENABLED="0", EVAL_STRIDE="0")).ngram_tilt  # the default: nothing to tilt, off


def test_replace_makes_a_changed_copy_of_known_knobs():
    hp = train_gpt.Hyperparameters(dict(SEED="7"))
    other = hp.replace(seed=8, eval_compile=False)
    assert (hp.seed, other.seed, other.eval_compile) == (7, 8, False) and other.explicit == hp.explicit == ["SEED"]
    with pytest.raises(AttributeError, match="no knob sedd"):
        hp.replace(sedd=1)
