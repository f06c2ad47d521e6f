"""CaseOps (data/caseops.py): the transform, tokenize_jsonl.py --caseops with its byte sidecars, the
leak guards of tokenize_jsonl.py and cached_challenge_fineweb.py. CPU only, no network."""
import hashlib
import http.server
import io
import json
import lzma
import os
import random
import subprocess
import sys
import threading

import numpy as np
import pytest
import sentencepiece as spm

import train_gpt
from conftest import CORPUS, ROOT, corpus_docs
from data import caseops, tokenize_jsonl
from data.caseops import ALLCAPS, CAPNEXT, ESC, TITLE
from data.shards import (ShardError, is_sidecar, read_header, read_shard, read_sidecar, sidecar_path,
                         token_shards, write_shard)
from test_data_tools import FakeHub, hub_env

TRICKY = [
    "", "a", "A", "I", "Hello", "hello", "HELLO", "HeLLo", "hELLO", "iPhone", "McDonald", "ABc", "aB", "AB",
    "OK!", "x1Y2Z3", "snake_Case_WORD", "ABC_DEF", "A_B", "x\u00c9T\u00e9", "\u00c9MILE \u00e9mile", "STRASSE stra\u00dfe",
    "\u0130stanbul", "\ufb01ne \uff21BC", "\U0001F600Smile\U0001F600", "tab\tNew\nLine  two  SPACES ",
    TITLE, ALLCAPS + "x", ESC + ESC, "a" + CAPNEXT + "B", TITLE + "Word" + ESC, "NASA" + TITLE + "NASA",
    "\u2581lead \u2581 Under\u2581Score", "\x00NUL", "Z" * 40, "zZ" * 20,
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_and_original_bytes(text):
    t = caseops.encode(text)
    assert caseops.decode(t) == text
    assert not any("A" <= c <= "Z" for c in t)
    w = caseops.byte_weights(t)
    assert w.shape == (len(t),) and int(w.sum()) == len(text.encode("utf-8"))


def test_the_transform_as_specified():
    """The exact outputs the module docstring specifies."""
    cases = {
        "Hello": TITLE + "hello", "NASA": ALLCAPS + "nasa", "A": TITLE + "a", "I am": TITLE + "i am",
        "iPhone": "i" + CAPNEXT + "phone", "McDonald": TITLE + "mc" + CAPNEXT + "donald",
        "ABc": TITLE + "a" + CAPNEXT + "bc", "ABC_DEF": ALLCAPS + "abc_" + ALLCAPS + "def",
        "x1Y2": "x1" + TITLE + "y2", "\u00c9MILE": "\u00c9" + ALLCAPS + "mile", "\u00e9T\u00e9": "\u00e9" + TITLE + "t\u00e9",
        TITLE + "A": ESC + TITLE + TITLE + "a", ESC: ESC + ESC, "plain words": "plain words", "": "",
    }
    for text, want in cases.items():
        assert caseops.encode(text) == want, text
    t = caseops.encode(ESC + "Ab")  # ESC literal, then a word
    assert t == ESC + ESC + TITLE + "ab" and caseops.byte_weights(t).tolist() == [0, 3, 0, 1, 1]
    assert caseops.byte_weights(" \u00e9\U0001F600").tolist() == [1, 2, 4]


def test_round_trip_random():
    rng = random.Random(0)
    alphabet = "aAbBzZ _1\u00e9\u00c9\u2581\U0001F600\n" + TITLE + ALLCAPS + CAPNEXT + ESC
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(16)))
        t = caseops.encode(text)
        assert caseops.decode(t) == text
        assert int(caseops.byte_weights(t).sum()) == len(text.encode("utf-8"))


@pytest.mark.parametrize("bad", [TITLE, "a" + TITLE + "b", TITLE + " x", CAPNEXT + ESC + TITLE, ESC + "a",
                                 ESC, "Abc", ALLCAPS + TITLE + "a",
                                 CAPNEXT + "a", ALLCAPS + "a", TITLE + "a" + CAPNEXT + "b", CAPNEXT + "a" + CAPNEXT + "b"])
def test_decode_refuses_what_encode_cannot_produce(bad):
    with pytest.raises(caseops.CaseOpsError):
        caseops.decode(bad)


# ---------------------------------------------------------------- tokenize_jsonl.py --caseops

EXTRA = [  # val documents that exercise the sidecar: operators, byte fallback, whitespace, a literal U+2581
    "The NASA iPhone McDonald's ABC_DEF x1Y2 OK.",
    "Literal operators " + TITLE + ALLCAPS + CAPNEXT + ESC + ESC + ESC + " Here, and \U0001F600\U0001F9E0 emoji.",
    "  Leading spaces,\ttabs\t\tand\n\n\n   blank LINES   \n",
    "Unicode \u00c9MILE \u00e9cole \u65e5\u672c\u8a9e \ufb01 \uff21 \u2460 x\u00b2\u00a0y",
    "A literal \u2581 (U+2581) Decodes As A Space.",
]


def write_jsonl(path, texts):
    path.write_bytes(lzma.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode()))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """CaseOps shards of the corpus with the EXTRA docs first: val = 17 docs cut into 2,000-token shards
    (so documents straddle shards), a trained lossless tokenizer of 1024 pieces."""
    tmp = tmp_path_factory.mktemp("caseops")
    texts = list(EXTRA) + list(corpus_docs())
    src = write_jsonl(tmp / "docs.jsonl.xz", texts)
    tokenize_jsonl.main([str(src), "--out-dir", str(tmp / "out"), "--caseops", "--vocab-size", "1024",
                         "--val-docs", "17", "--shard-tokens", "2000", "--workers", "2", "--name", "co"])
    return texts, src, tmp / "out"


def docs_of(tokens: np.ndarray):
    starts = np.flatnonzero(tokens == 1).tolist()
    assert starts[0] == 0
    return list(zip(starts, starts[1:] + [len(tokens)]))


def test_tokenizer_is_lossless_with_reserved_operators(built):
    texts, src, out = built
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizers" / "co_bpe.model"))
    assert sp.vocab_size() == 1024 and (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4, 8)] == [TITLE, ALLCAPS, CAPNEXT, ESC]
    assert tokenize_jsonl.caseops_model_problem(sp) is None
    assert sp.encode("2024", out_type=str) == ["2", "0", "2", "4"]
    probe = "  two\t\tspaces \ufb01\n"
    assert sp.decode(sp.encode(probe)) == probe  # identity normalization, nothing collapsed


def test_sidecar_counts_original_bytes_per_document(built):
    """Every val doc: its sidecar entries sum to its original UTF-8 bytes, and sp.decode + caseops.decode
    gives it back (a literal U+2581 comes back as a space, its 3 bytes still counted)."""
    texts, src, out = built
    ds = out / "datasets" / "co"
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizers" / "co_bpe.model"))
    shards = token_shards(ds, "val")
    assert len(shards) >= 3  # 17 docs in 2,000-token shards
    toks = np.concatenate([np.asarray(read_shard(f)) for f in shards])
    nbytes = np.concatenate([np.asarray(read_sidecar(f)) for f in shards]).astype(np.int64)
    spans = docs_of(toks)
    assert len(spans) == 17
    for (a, b), text in zip(spans, texts):
        assert nbytes[a] == 0  # BOS
        assert int(nbytes[a:b].sum()) == len(text.encode("utf-8"))
        back = caseops.decode(sp.decode(toks[a + 1:b].tolist()))
        assert back == (text.replace("\u2581", " ") if "\u2581" in text else text)
    assert int(nbytes.sum()) == sum(len(t.encode()) for t in texts[:17])

    # Per token: an acting operator 0, a literal one (after an acting ESC) 3, a byte-fallback piece 1.
    literal = False
    for t, n in zip(toks.tolist(), nbytes.tolist()):
        if 4 <= t <= 7:
            assert n == (3 if literal else 0)
            literal = t == 7 and not literal
        else:
            literal = False
            if sp.is_byte(t):
                assert n == 1
    assert set(np.unique(toks[nbytes == 0]).tolist()) <= {1, 4, 5, 6, 7}


def test_sidecars_line_up_with_token_shards(built):
    texts, src, out = built
    ds = out / "datasets" / "co"
    val = token_shards(ds, "val")
    sides = sorted(ds.glob("fineweb_val_bytes_*.bin"))
    assert [sidecar_path(f).name for f in val] == [f.name for f in sides]
    assert [f.name for f in sides] == [f"fineweb_val_bytes_{i:06d}.bin" for i in range(len(val))]
    for f, s in zip(val, sides):
        assert read_header(f) == read_header(s)
        assert s.read_bytes()[:1024] == f.read_bytes()[:1024]  # the same header: magic, version, count
        assert np.array_equal(train_gpt.open_shard(s), read_shard(s))  # train_gpt's reader reads it too
    assert all(read_header(f) == 2000 for f in val[:-1])
    assert not list(ds.glob("fineweb_train_bytes_*"))  # sidecars are for val only
    split = json.loads((ds / "split.json").read_text())
    assert split == dict(input="docs.jsonl.xz", input_sha256=hashlib.sha256(src.read_bytes()).hexdigest(),
                         val_docs=17, train_docs=len(texts) - 17, max_docs=None, caseops=True, lossless=True,
                         tokenizer="co_bpe.model")


def test_glob_trap(built):
    """fineweb_val_*.bin also matches the sidecars: token_shards and train_gpt.shard_files leave them out."""
    texts, src, out = built
    ds = out / "datasets" / "co"
    matched = sorted(ds.glob("fineweb_val_*.bin"))
    assert any(is_sidecar(p) for p in matched) and not all(is_sidecar(p) for p in matched)
    want = [p for p in matched if "_bytes_" not in p.name]
    assert token_shards(ds, "val") == want
    assert [os.path.basename(f) for f in train_gpt.shard_files(str(ds), "val")] == [p.name for p in want]
    assert sidecar_path(ds / "fineweb_val_000012.bin") == ds / "fineweb_val_bytes_000012.bin"


@pytest.mark.parametrize("damage", ["count", "header", "missing"])
def test_mismatched_sidecar_is_refused(built, tmp_path, damage):
    texts, src, out = built
    tok = tmp_path / "fineweb_val_000000.bin"
    write_shard(tok, [1, 5, 9, 9, 1, 9])
    side = sidecar_path(tok)
    if damage == "count":
        write_shard(side, [0, 0, 1, 1, 0])
        msg = f"{side}: 5 byte counts, but its token shard fineweb_val_000000.bin has 6 tokens"
    elif damage == "header":
        write_shard(side, [0, 0, 1, 1, 0, 1])
        side.write_bytes((7).to_bytes(4, "little") + side.read_bytes()[4:])
        msg = f"{side}: not a shard (magic 7, expected 20240520)"
    else:
        msg = f"{side}: missing, the byte sidecar of fineweb_val_000000.bin"
    with pytest.raises(ShardError) as e:
        read_sidecar(tok)
    assert str(e.value) == msg


def tokenize(*args):
    return subprocess.run([sys.executable, str(ROOT / "data" / "tokenize_jsonl.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_refuses_a_tokenizer_without_the_operators(tokenizer, tmp_path):
    model = tokenizer(1024)  # the plain (nmt_nfkc) test tokenizer
    r = tokenize(CORPUS, "--out-dir", tmp_path / "o", "--caseops", "--tokenizer", model, "--val-docs", 12)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == (
        f"error: --tokenizer {model} lacks the CaseOps operator U+E001 (TITLE) as a single piece (a CaseOps "
        f"tokenizer reserves U+E001..U+E004 as user_defined_symbols; train one with --caseops --vocab-size V)")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def nfkc_caseops_model(tmp_path_factory):
    """Operators reserved but nmt_nfkc normalization: not lossless."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(caseops.encode(t) for t in corpus_docs()[12:60]), model_writer=model,
        model_type="bpe", vocab_size=400, byte_fallback=True, add_dummy_prefix=False,
        normalization_rule_name="nmt_nfkc", user_defined_symbols=list(caseops.OPERATORS),
        hard_vocab_limit=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("nfkc") / "nfkc.model"
    path.write_bytes(model.getvalue())
    return path


def test_refuses_a_tokenizer_that_is_not_lossless(nfkc_caseops_model, tmp_path, monkeypatch):
    r = tokenize(CORPUS, "--out-dir", tmp_path / "o", "--caseops", "--tokenizer", nfkc_caseops_model,
                 "--val-docs", 12)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"error: --tokenizer {nfkc_caseops_model} is not lossless (at character 0 ")
    assert "CaseOps needs identity normalization" in r.stderr
    assert not (tmp_path / "o").exists()

    # Past the model check (an empty probe), the first document it does not reproduce is named.
    monkeypatch.setattr(tokenize_jsonl, "PROBE", "")
    src = write_jsonl(tmp_path / "d.jsonl.xz", ["fine", "also fine", "the \ufb01 ligature", "x", "y"])
    with pytest.raises(SystemExit) as e:
        tokenize_jsonl.main([str(src), "--out-dir", str(tmp_path / "o"), "--caseops", "--tokenizer",
                             str(nfkc_caseops_model), "--val-docs", "2", "--workers", "1"])
    msg = str(e.value)
    assert msg.startswith(f"error: --tokenizer {nfkc_caseops_model} is not lossless on document 2 of {src} "
                          f"(0-based): at character 4 the text has '\ufb01 ligature'")
    assert "\n" not in msg and not (tmp_path / "o").exists()


def test_leaky_fineweb_split_is_refused(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "docs_selected.jsonl.xz", corpus_docs()[:20])
    model = tokenizer(1024)
    r = tokenize(src, "--out-dir", tmp_path / "o", "--tokenizer", model, "--val-docs", 10000)
    assert r.returncode == 1 and r.stderr.strip() == (
        "error: docs_selected.jsonl.xz is the FineWeb challenge corpus, whose val split is its first 50000 "
        "documents: --val-docs 10000 would train on val documents 10000..49999; pass --val-docs 50000 "
        "(or --allow-small-val for a deliberately different split)")
    assert not (tmp_path / "o").exists()
    r = tokenize(src, "--out-dir", tmp_path / "o", "--tokenizer", model, "--val-docs", 10, "--allow-small-val",
                 "--workers", 1)
    assert r.returncode == 0, r.stderr
    split = json.loads((tmp_path / "o" / "datasets" / "custom_sp1024" / "split.json").read_text())
    assert (split["input"], split["val_docs"], split["train_docs"]) == ("docs_selected.jsonl.xz", 10, 10)


def test_rerun_without_caseops_removes_stale_sidecars(built, tokenizer, tmp_path):
    texts, src, out = built
    args = [src, "--out-dir", tmp_path / "o", "--val-docs", 17, "--name", "x", "--workers", 1]
    r = tokenize(*args, "--caseops", "--tokenizer", out / "tokenizers" / "co_bpe.model", "--shard-tokens", 2000)
    assert r.returncode == 0, r.stderr
    ds = tmp_path / "o" / "datasets" / "x"
    assert len(list(ds.glob("fineweb_val_bytes_*.bin"))) >= 3
    r = tokenize(*args, "--tokenizer", tokenizer(1024))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin", "split.json"]
    assert json.loads((ds / "split.json").read_text())["caseops"] is False


# ---------------------------------------------------------------- cached_challenge_fineweb.py, CaseOps variant

VARIANT = "sp8192_lossless_caps_caseops_v1_reserved"
CASEOPS_REPO = "romeerp/parameter-golf-caseops-v1"


def caseops_val(docs: int):
    """A val stream of `docs` two-token documents and its byte sidecar."""
    toks = np.tile([1, 300], docs)
    return toks, np.tile([0, 4], docs)


@pytest.fixture
def caseops_hub(tmp_path):
    """A fake Hub holding romeerp/parameter-golf-caseops-v1: a manifest that does not list the CaseOps
    dataset (so the published layout is used), 3 train shards, 1 val shard of 50,000 docs, its sidecar."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.root = tmp_path / "hub"
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    repo = server.root / CASEOPS_REPO / "datasets"
    ds = repo / "datasets" / f"fineweb10B_{VARIANT}"
    ds.mkdir(parents=True)
    toks, nbytes = caseops_val(50_000)
    write_shard(ds / "fineweb_val_000000.bin", toks)
    write_shard(ds / "fineweb_val_bytes_000000.bin", nbytes)
    for i in range(3):
        write_shard(ds / f"fineweb_train_{i:06d}.bin", np.tile([1, 9, 10], 10 + i))
    (repo / "tokenizers").mkdir()
    (repo / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model").write_bytes(b"model")
    (repo / "manifest.json").write_text(json.dumps({"datasets": [{"name": "fineweb10B_sp1024", "train_shards": 1,
                                                                  "val_shards": 1}]}))
    yield ds, hub_env(server, tmp_path), tmp_path / "local"
    server.shutdown()
    server.server_close()


def fetch_caseops(env, local, *args):
    cmd = [sys.executable, str(ROOT / "data" / "cached_challenge_fineweb.py"), "--variant", VARIANT,
           "--local-dir", str(local), "--train-shards", "2", *args]  # no --repo-id: the variant's own repo
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_caseops_download(caseops_hub):
    ds, env, local = caseops_hub
    r = fetch_caseops(env, local)
    assert r.returncode == 0, r.stderr
    got = local / "datasets" / f"fineweb10B_{VARIANT}"
    assert sorted(p.name for p in got.iterdir()) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                     "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"]
    assert (local / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model").read_bytes() == b"model"
    assert "using the published CaseOps layout (80 train shards, 1 val shard and its byte sidecar)" in r.stdout
    assert "2 train shards (63 tokens) and 1 val shard(s) (100,000 tokens) OK" in r.stdout

    # A rerun with fewer train shards keeps the earlier ones: not a mix.
    r = fetch_caseops(env, local, "--train-shards", "1")
    assert r.returncode == 0, r.stderr
    assert f"note: {got} holds 2 train shards, 1 fetched now (the rest from an earlier run)" in r.stdout
    # A train shard beyond the export's 80 (a local prep's 1499 shards, say) is refused.
    write_shard(got / "fineweb_train_000080.bin", [1, 2, 3])
    r = fetch_caseops(env, local)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {got} holds 3 train shards, e.g. fineweb_train_000080.bin, but the export has 80: shards of "
        f"another export are mixed in (a local prep?); delete the folder and rerun")


@pytest.mark.parametrize("damage", ["leaky val", "sidecar count", "sidecar header", "no sidecar"])
def test_caseops_download_refuses(caseops_hub, damage):
    ds, env, local = caseops_hub
    got = local / "datasets" / f"fineweb10B_{VARIANT}"
    side = ds / "fineweb_val_bytes_000000.bin"
    if damage == "leaky val":  # prepare_caseops_data.py's default: 10,000 val docs
        toks, nbytes = caseops_val(10_000)
        write_shard(ds / "fineweb_val_000000.bin", toks)
        write_shard(side, nbytes)
        want = (f"error: {got}: the val shards hold 10,000 documents (BOS tokens), the canonical FineWeb val "
                f"split is 50,000: not the canonical CaseOps export (with fewer val docs, the rest of the val "
                f"split is in train)")
    elif damage == "sidecar count":
        write_shard(side, caseops_val(50_000)[1][:-1])
        want = (f"error: {got / side.name}: 99999 byte counts, but its token shard fineweb_val_000000.bin has "
                f"100000 tokens; the CaseOps val bytes sidecar must match its val shard")
    elif damage == "sidecar header":
        side.write_bytes(side.read_bytes()[:4] + (2).to_bytes(4, "little") + side.read_bytes()[8:])
        want = (f"error: {got / side.name}: unsupported shard version 2 (expected 1); delete it (and its "
                f"Hugging Face cache entry) and rerun")
    else:
        side.unlink()
        want = f"error: cannot fetch datasets/datasets/fineweb10B_{VARIANT}/{side.name} from dataset repo {CASEOPS_REPO}"
    r = fetch_caseops(env, local)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.strip().startswith(want), r.stderr


def test_byte_counts_compares_one_split_and_refuses_another(built, tokenizer, tmp_path):
    """bench/byte_counts.py: the sidecar charges the val documents' original bytes (raw = sidecar) and the plain
    path its pieces' bytes; --val-docs other than the CaseOps data's split is refused, not a ratio over two sets."""
    texts, src, out = built
    data = out / "datasets" / "co"
    args = [sys.executable, "bench/byte_counts.py", "--docs", str(src), "--tokenizer", str(tokenizer(1024)),
            "--caseops-data", str(data)]
    res = subprocess.run(args + ["--val-docs", "17"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = dict(line.split(":", 1) for line in res.stdout.splitlines())
    assert int(got["raw_utf8_bytes"]) == sum(len(t.encode()) for t in texts[:17]) == int(got["caseops_sidecar_bytes"])
    assert got["caseops_docs"] == got["val_docs"] == "17"
    res = subprocess.run(args + ["--val-docs", "40"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.strip() == (
        f"error: --caseops-data {data} holds 17 val documents, --docs/--val-docs gave 40: not the same split")
    other = write_jsonl(tmp_path / "other.jsonl.xz", texts[17:34])  # as many documents, other ones
    res = subprocess.run(args[:3] + [str(other)] + args[4:] + ["--val-docs", "17"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    raw = sum(len(t.encode()) for t in texts[17:34])
    assert res.returncode == 1 and res.stderr.strip() == (
        f"error: --caseops-data {data}: its sidecar holds {got['caseops_sidecar_bytes']} bytes, the --docs/--val-docs "
        f"documents {raw}: not the same documents")
