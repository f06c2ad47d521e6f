"""Scoring with byte sidecars (CaseOps data): train_gpt charges each val target the original bytes its
sidecar records, refuses a CaseOps tokenizer without sidecars and sidecars that do not match their
token shards, and logs which byte source a score used."""
import shutil

import numpy as np
import pytest
import torch

import train_gpt
from conftest import VAL_DOCS, corpus_docs, parse_log, tiny_env
from data import tokenize_jsonl
from data.shards import read_shard, read_sidecar, sidecar_path, token_shards, write_shard
from test_caseops import write_jsonl
from test_model import randomized, small_cfg


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    """CaseOps shards of the shipped corpus (val = its first VAL_DOCS documents, cut into 2,000-token
    shards so that documents straddle sidecars), with a trained lossless tokenizer of 1024 pieces."""
    tmp = tmp_path_factory.mktemp("caseops_score")
    src = write_jsonl(tmp / "docs.jsonl.xz", corpus_docs())
    tokenize_jsonl.main([str(src), "--out-dir", str(tmp / "out"), "--caseops", "--vocab-size", "1024",
                         "--val-docs", str(VAL_DOCS), "--shard-tokens", "2000", "--workers", "2", "--name", "co"])
    return tmp / "out" / "datasets" / "co", tmp / "out" / "tokenizers" / "co_bpe.model"


def hp_for(data, tok, **env):
    return train_gpt.Hyperparameters(dict(DATA_PATH=str(data), TOKENIZER_PATH=str(tok), VOCAB_SIZE="1024",
                                          TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64") | env)


def original_val_bytes() -> int:
    return sum(len(t.encode("utf-8")) for t in corpus_docs()[:VAL_DOCS])


def test_targets_are_charged_the_original_bytes(caseops_data):
    data, tok = caseops_data
    sp = train_gpt.load_tokenizer(str(tok), 1024)
    assert train_gpt.is_caseops(sp)
    val, files = train_gpt.load_val(hp_for(data, tok, VAL_MAX_TOKENS="0"), 1024, sp)
    assert len(files) >= 3 and val.byte_source == "sidecar"
    assert len(val.target_bytes) == len(val.tokens) - 1
    # BOS (token 0) carries no bytes, so the targets carry every byte of the val documents
    assert int(val.target_bytes.sum()) == original_val_bytes()
    # a cut val set is charged exactly the bytes of the tokens it keeps
    cut, _ = train_gpt.load_val(hp_for(data, tok, VAL_MAX_TOKENS="4000"), 1024, sp)
    side = np.concatenate([np.asarray(read_sidecar(f)) for f in token_shards(data, "val")]).astype(np.int64)
    assert len(cut.tokens) == 4001 and np.array_equal(cut.target_bytes, side[1:4001])


def test_the_score_divides_by_the_sidecar_bytes(caseops_data):
    """The same tokens under two byte sources: the NLL is the same, the bytes are each source's."""
    data, tok = caseops_data
    sp = train_gpt.load_tokenizer(str(tok), 1024)
    val, _ = train_gpt.load_val(hp_for(data, tok, VAL_MAX_TOKENS="512"), 1024, sp)
    model = randomized(small_cfg(vocab_size=1024))
    hp = train_gpt.Hyperparameters(dict(EVAL_SEQ_LEN="64", EVAL_STRIDE="64", EVAL_BATCH_SEQS="8"))
    phase = train_gpt.Phase("roundtrip", 64, 64)
    scores = train_gpt.eval_tokens(model, val, train_gpt.Dist(), hp, phase)
    loss, bpb = scores.totals()
    assert torch.equal(scores.nbytes, torch.from_numpy(val.target_bytes).to(torch.int32))
    assert bpb == pytest.approx(loss * len(val.target_bytes) / (np.log(2) * val.target_bytes.sum()), rel=1e-12)
    pieces = train_gpt.ValSet.from_lut(val.tokens, train_gpt.build_byte_lut(sp, 1024))
    assert pieces.target_bytes.sum() != val.target_bytes.sum()  # operators and case make them differ
    loss2, bpb2 = train_gpt.eval_tokens(model, pieces, train_gpt.Dist(), hp, phase).totals()
    assert loss2 == loss
    assert bpb2 / bpb == pytest.approx(val.target_bytes.sum() / pieces.target_bytes.sum(), rel=1e-12)


def copy_val(data, dest, with_sidecars):
    dest.mkdir()
    for f in token_shards(data, "val"):
        shutil.copy(f, dest / f.name)
        if with_sidecars:
            shutil.copy(sidecar_path(f), dest / sidecar_path(f).name)
    return dest


def test_caseops_tokenizer_without_sidecars_is_refused(caseops_data, tmp_path):
    data, tok = caseops_data
    bare = copy_val(data, tmp_path / "bare", with_sidecars=False)
    sp = train_gpt.load_tokenizer(str(tok), 1024)
    with pytest.raises(train_gpt.UserError, match="is a CaseOps tokenizer, but the val shards have no byte "
                                                  "sidecars \\(fineweb_val_bytes_NNNNNN.bin beside each"):
        train_gpt.load_val(hp_for(bare, tok), 1024, sp)
    # a val file named without the _NNNNNN.bin ending has no sidecar (it is never its own)
    one = tmp_path / "val.bin"
    shutil.copy(data / "fineweb_val_000000.bin", one)
    shutil.copy(data / "fineweb_val_bytes_000000.bin", tmp_path / "val_bytes.bin")
    assert train_gpt.sidecar_path(str(one)) is None
    with pytest.raises(train_gpt.UserError, match="is a CaseOps tokenizer, but the val shards have no byte"):
        train_gpt.load_val(hp_for(tmp_path, tok, VAL_FILES=str(one)), 1024, sp)


def test_plain_tokenizer_counts_its_pieces(tiny_data):
    data, tok = tiny_data
    sp = train_gpt.load_tokenizer(str(tok), 1024)
    assert not train_gpt.is_caseops(sp)
    val, _ = train_gpt.load_val(hp_for(data, tok, VAL_MAX_TOKENS="0"), 1024, sp)
    assert val.byte_source == "tokenizer"
    lut = train_gpt.build_byte_lut(sp, 1024)
    assert np.array_equal(val.target_bytes, lut.target_bytes(val.tokens[:-1], val.tokens[1:]))


@pytest.mark.parametrize("damage", ["one_missing", "count", "shifted", "zeros"])
def test_sidecars_that_do_not_match_are_refused(caseops_data, tmp_path, damage):
    data, tok = caseops_data
    d = copy_val(data, tmp_path / "val", with_sidecars=True)
    side = d / "fineweb_val_bytes_000001.bin"
    if damage == "one_missing":
        side.unlink()
        msg = f"byte sidecar {side}: missing, but other val shards have one (all or none)"
    elif damage == "count":
        counts = np.asarray(read_shard(side))
        write_shard(side, counts[:-1])
        msg = (f"byte sidecar {side}: {len(counts) - 1} entries, but {d / 'fineweb_val_000001.bin'} holds "
               f"{len(counts)} tokens")
    elif damage == "shifted":  # one position late: a BOS is charged its document's first bytes
        write_shard(side, np.roll(np.asarray(read_shard(side)), 1))
        msg = f"byte sidecars of {d} do not match the tokens or TOKENIZER_PATH: token "
    else:
        for f in d.glob("fineweb_val_bytes_*.bin"):
            write_shard(f, np.zeros(len(read_shard(f)), dtype=np.uint16))
        msg = f"byte sidecars of {d}: 0 bytes in total"
    sp = train_gpt.load_tokenizer(str(tok), 1024)
    with pytest.raises(train_gpt.UserError) as e:
        train_gpt.load_val(hp_for(d, tok), 1024, sp)
    assert str(e.value).startswith(msg) if damage == "shifted" else str(e.value) == msg


def test_sidecars_of_another_tokenizer_are_refused(caseops_data, tokenizer):
    """A plain tokenizer of the same vocab size with CaseOps shards and their sidecars: its pieces cannot
    spell the bytes the sidecars charge."""
    data, _ = caseops_data
    plain = tokenizer(1024)
    sp = train_gpt.load_tokenizer(str(plain), 1024)
    with pytest.raises(train_gpt.UserError, match="do not match the tokens or TOKENIZER_PATH"):
        train_gpt.load_val(hp_for(data, plain), 1024, sp)


def test_a_run_on_caseops_data_logs_its_byte_source(caseops_data, tiny_data, tmp_path, launcher):
    data, tok = caseops_data
    env = tiny_env(tiny_data, tmp_path, DATA_PATH=data, TOKENIZER_PATH=tok, RUN_ID="co", ITERATIONS=2,
                   TTT_ENABLED=0, EVAL_STRIDE=0)
    res = launcher.run(env)
    assert res.returncode == 0, res.stderr[-2000:]
    log = (tmp_path / "logs" / "co.txt").read_text()
    side = np.concatenate([np.asarray(read_sidecar(f)) for f in token_shards(data, "val")]).astype(np.int64)
    assert f"val_tokens:4096 val_bytes:{side[1:4097].sum()} val_byte_source:sidecar " in log
    assert parse_log(tmp_path / "logs" / "co.txt")["final_val_bpb"]


@pytest.fixture(scope="module")
def lossless_data(tmp_path_factory):
    """--lossless shards of the shipped corpus: a lossless tokenizer without case operators, sidecars."""
    tmp = tmp_path_factory.mktemp("lossless")
    src = write_jsonl(tmp / "docs.jsonl.xz", corpus_docs())
    tokenize_jsonl.main([str(src), "--out-dir", str(tmp / "out"), "--lossless", "--vocab-size", "1024",
                         "--val-docs", str(VAL_DOCS), "--workers", "2", "--name", "ll"])
    return tmp / "out" / "datasets" / "ll", tmp / "out" / "tokenizers" / "ll_bpe.model", src


def test_lossless_plain_data_is_scored_over_the_original_bytes(lossless_data):
    """The plain counterpart of CaseOps: same original bytes, no operators, and the tokenizer's own
    piece count agrees with the sidecar (a lossless tokenizer keeps a document's leading space)."""
    data, tok, _ = lossless_data
    sp = train_gpt.load_tokenizer(str(tok), 1024)
    assert not train_gpt.is_caseops(sp) and tokenize_jsonl.caseops_model_problem(sp, use_caseops=False) is None
    val, _ = train_gpt.load_val(hp_for(data, tok, VAL_MAX_TOKENS="0"), 1024, sp)
    docs = corpus_docs()[:VAL_DOCS]
    assert val.byte_source == "sidecar" and int(val.target_bytes.sum()) == original_val_bytes()
    starts = np.flatnonzero(val.tokens == 1).tolist() + [len(val.tokens)]
    assert [sp.decode(val.tokens[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])] == list(docs)
    pieces = train_gpt.build_byte_lut(sp, 1024).target_bytes(val.tokens[:-1], val.tokens[1:])
    assert int(pieces.sum()) == original_val_bytes()  # a document led by a space: test_bpb's lossless case


def test_lossless_refuses_a_normalizing_tokenizer_and_caseops_together(lossless_data, tokenizer, tmp_path, capsys):
    _, _, src = lossless_data
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="is not lossless .*--lossless needs identity normalization"):
        tokenize_jsonl.main([str(src), "--out-dir", str(out), "--lossless", "--tokenizer", str(tokenizer(1024)),
                             "--val-docs", str(VAL_DOCS), "--workers", "1"])
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        tokenize_jsonl.main([str(src), "--out-dir", str(out), "--lossless", "--caseops", "--vocab-size", "1024"])
    assert e.value.code == 2 and "--caseops already implies a lossless tokenizer" in capsys.readouterr().err
