"""Exact byte accounting: the LUT charges each document exactly the UTF-8 bytes of its decoded text."""
import math

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt
from conftest import VAL_DOCS, bos_as_text_piece, corpus_docs, train_tokenizer

EXOTIC = [
    "naïve café — Ωmega ∑ résumé",
    "你好，世界。東京タワー 🚀🌍 emoji and CJK fall back to bytes",
    "tabs\tand  double  spaces\n\nnew lines   collapse",
    "ǅ ﬁ ½ ＡＢＣ full-width and ligatures are NFKC-normalized",
    "\u2581 a literal lower-one-eighth block",
    "   leading spaces and trailing   ",
]


def doc_bytes(lut: train_gpt.ByteLUT, ids: list[int]) -> int:
    stream = np.array([1] + ids)
    return int(lut.target_bytes(stream[:-1], stream[1:]).sum())


@pytest.mark.parametrize("vocab", [1024, 8192])
def test_corpus_docs_byte_exact(tokenizer, vocab):
    path = tokenizer(vocab)
    sp = train_gpt.load_tokenizer(str(path), vocab)
    lut = train_gpt.build_byte_lut(sp, vocab)
    docs = list(corpus_docs()) + EXOTIC
    n_byte_tokens = 0
    for text in docs:
        ids = sp.encode(text)
        n_byte_tokens += sum(sp.is_byte(i) for i in ids)
        assert doc_bytes(lut, ids) == len(sp.decode(ids).encode("utf-8")), text[:60]
    assert n_byte_tokens > 0  # the byte-fallback path was exercised


@pytest.mark.parametrize("settings,inner_space", [
    (dict(allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity"), True),
    (dict(treat_whitespace_as_suffix=True), True),
    (dict(add_dummy_prefix=True), False),
    (dict(remove_extra_whitespaces=False, normalization_rule_name="identity"), False),  # lossless: keeps a first space
], ids=["whitespace_pieces", "whitespace_suffix", "dummy_prefix", "lossless"])
def test_lut_is_byte_exact_for_other_sentencepiece_settings(tmp_path, settings, inner_space):
    """Tokenizers load_tokenizer accepts beyond the bench's: pieces with '▁' inside or at the end (one byte each,
    not three), and decoders that keep or drop a document's first space."""
    model = train_tokenizer(tmp_path / "t.model", 512, corpus_docs()[VAL_DOCS:], **settings)
    sp = train_gpt.load_tokenizer(str(model), 512)
    lut = train_gpt.build_byte_lut(sp, 512)
    assert any("\u2581" in sp.id_to_piece(i)[1:] for i in range(sp.vocab_size())) == inner_space
    for text in list(corpus_docs()[:VAL_DOCS]) + EXOTIC:
        ids = sp.encode(text)
        assert doc_bytes(lut, ids) == len(sp.decode(ids).encode("utf-8")), text[:60]


def test_lut_rules(tokenizer):
    sp = train_gpt.load_tokenizer(str(tokenizer(1024)), 1024)
    lut = train_gpt.build_byte_lut(sp, 1024)
    space = sp.piece_to_id("\u2581")
    assert lut.base_bytes[space] == 0 and lut.has_leading_space[space]
    for i in (0, 1, 2, 3):  # pad, bos, eos, unk: control/unknown pieces carry no bytes
        assert lut.base_bytes[i] == 0 and lut.is_boundary[i]
    byte_ids = [i for i in range(1024) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and all(lut.base_bytes[i] == 1 for i in byte_ids)
    # A space-led piece is charged its space except right after BOS.
    assert lut.target_bytes(np.array([1]), np.array([space])).item() == 0
    assert lut.target_bytes(np.array([200]), np.array([space])).item() == 1


def test_bpb_formula_matches_eval(tiny_data):
    """eval_tokens' bpb equals sum(NLL)/ln2/sum(bytes) computed by hand from per-token losses."""
    from test_model import randomized, small_cfg
    data, tok = tiny_data
    sp = train_gpt.load_tokenizer(str(tok), 1024)
    lut = train_gpt.build_byte_lut(sp, 1024)
    val = train_gpt.load_val_tokens(train_gpt.shard_files(str(data), "val"), 1024, 2048)
    model = randomized(small_cfg(vocab_size=1024))
    hp = train_gpt.Hyperparameters({"EVAL_BATCH_SEQS": "7"})
    phase = train_gpt.Phase("roundtrip", 64, 64)
    loss, bpb = train_gpt.eval_tokens(model, train_gpt.ValSet.from_lut(val, lut), train_gpt.Dist(), hp, phase).totals()
    x = torch.from_numpy(val[:-1].astype(np.int64)).view(-1, 64)  # 2048 targets = 32 windows of 64
    y = torch.from_numpy(val[1:].astype(np.int64)).view(-1, 64)
    with torch.no_grad():
        nll = model(x, y, looped=True).double().sum().item()
    total_bytes = lut.target_bytes(x.numpy(), y.numpy()).sum().item()
    assert math.isclose(loss, nll / y.numel(), rel_tol=1e-9)
    assert math.isclose(bpb, nll / math.log(2) / total_bytes, rel_tol=1e-9)


def test_tokenizer_errors(tokenizer, tmp_path):
    with pytest.raises(train_gpt.UserError, match="vocab 1024 != VOCAB_SIZE=8192"):
        train_gpt.load_tokenizer(str(tokenizer(1024)), 8192)
    bogus = tmp_path / "x.model"
    bogus.write_bytes(b"not a model")
    with pytest.raises(train_gpt.UserError, match="not a SentencePiece model"):
        train_gpt.load_tokenizer(str(bogus), 1024)
    with pytest.raises(train_gpt.UserError, match="file not found"):
        train_gpt.load_tokenizer(str(tmp_path / "missing.model"), 1024)


def test_tokenizer_whose_bos_is_text_rejected(tokenizer, tmp_path):
    """Shards separate documents with id 1: were it a text piece, its bytes would be counted into bpb and
    its occurrences in text would split documents."""
    bad = bos_as_text_piece(tokenizer(1024), tmp_path / "bos_text.model")
    assert not spm.SentencePieceProcessor(model_file=str(bad)).is_control(1)
    with pytest.raises(train_gpt.UserError, match="id 1 must be a control piece .* got '<s>'"):
        train_gpt.load_tokenizer(str(bad), 1024)


def test_tokenizer_without_space_piece_rejected(tokenizer, tmp_path):
    """A model whose '▁' is not a standalone piece would overcharge spaces (issue #897)."""
    blob = tokenizer(1024).read_bytes()
    # Rename the piece '▁' (protobuf: tag 0x0a, length 3, UTF-8 e2 96 81, then the score tag)
    # to '▂' of the same length, so the model stays valid but has no standalone space.
    needle = b"\x0a\x03\xe2\x96\x81\x15"
    assert blob.count(needle) == 1
    bad = tmp_path / "nospace.model"
    bad.write_bytes(blob.replace(needle, b"\x0a\x03\xe2\x96\x82\x15"))
    assert spm.SentencePieceProcessor(model_file=str(bad)).get_piece_size() == 1024
    with pytest.raises(train_gpt.UserError, match="no standalone"):
        train_gpt.load_tokenizer(str(bad), 1024)


def test_unknown_val_tokens_are_warned_of(tiny_data, tmp_path):
    """A val <unk> stands for text the shard does not hold (no byte fallback for it): it is charged 0 bytes, as
    the challenge's reference charges it, and the log says how many there are."""
    from data.shards import read_shard, write_shard
    data, tok = tiny_data
    sp = train_gpt.load_tokenizer(str(tok), 1024)
    tokens = read_shard(data / "fineweb_val_000000.bin")
    for name, ids in (("clean", tokens), ("unk", np.where(np.arange(len(tokens)) % 500 == 7, sp.unk_id(), tokens))):
        write_shard(tmp_path / f"{name}_val_000000.bin", ids)
        hp = train_gpt.Hyperparameters(dict(VAL_FILES=str(tmp_path / f"{name}_val_000000.bin"), TOKENIZER_PATH=str(tok),
                                            VOCAB_SIZE="1024", TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64"))
        lines = []
        evaluator, _ = train_gpt.load_evaluator(hp, train_gpt.Dist(), lines.append, 1024)
        warned = [line for line in lines if line.startswith("warning:val_unknown_tokens")]
        expected = int((evaluator.val.tokens[1:] == sp.unk_id()).sum())
        assert (name == "unk") == (expected > 0)
        assert warned == ([f"warning:val_unknown_tokens count:{expected} " + warned[0].split(" ", 2)[2]] if expected else [])
