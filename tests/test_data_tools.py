"""Tests of data/shards.py, data/cached_challenge_fineweb.py and data/tokenize_jsonl.py (no network, CPU only).

The download tests run the real script, and so the real huggingface_hub.hf_hub_download, against a
small Hub imitation served on 127.0.0.1 (HF_ENDPOINT) from a temporary folder.
"""
import hashlib
import http.server
import json
import lzma
import os
import random
import re
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import train_gpt
from conftest import CORPUS, ROOT, bos_as_text_piece, corpus_docs
from data import tokenize_jsonl
from data.shards import ShardError, ShardWriter, read_header, read_shard, write_shard

DATA = ROOT / "data"


def read_checked(path: Path) -> np.ndarray:
    """read_shard, plus what version 1 also fixes: header words 3-255 are zero."""
    assert not np.fromfile(path, dtype="<i4", count=256)[3:].any()
    return np.asarray(read_shard(path))


def files_under(path: Path):
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


# ---------------------------------------------------------------- shards.py

def test_shard_round_trip_and_train_gpt_reads_it(tmp_path):
    """write_shard's bytes are the documented layout, and read_shard and train_gpt.open_shard (the
    training script's own reader) both read back exactly the tokens written, for any uint16 value."""
    toks = np.concatenate([[0, 1, 65535, 65534], np.random.default_rng(0).integers(0, 65536, 5000)])
    path = tmp_path / "fineweb_val_000000.bin"
    assert write_shard(path, toks) == len(toks)  # int64 in, uint16 out
    raw = path.read_bytes()
    assert raw[:12] == (20240520).to_bytes(4, "little") + (1).to_bytes(4, "little") + len(toks).to_bytes(4, "little")
    assert raw[12:1024] == bytes(1012) and raw[1024:] == toks.astype("<u2").tobytes()
    assert read_header(path) == len(toks)
    for got in (read_shard(path), train_gpt.open_shard(path)):
        assert got.dtype == np.dtype("<u2") and np.array_equal(got, toks)
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary file left behind
    empty = tmp_path / "empty.bin"
    assert write_shard(empty, []) == 0 and empty.stat().st_size == 1024 and len(read_shard(empty)) == 0


@pytest.mark.parametrize("corrupt,ours,theirs", [
    (lambda b: b[:100], "not a shard (100 bytes, shorter than the 1024-byte header)", "shorter than"),
    (lambda b: b"\x00\x00\x00\x00" + b[4:], "not a shard (magic 0, expected 20240520)", "bad magic"),
    (lambda b: b[:4] + (2).to_bytes(4, "little") + b[8:], "unsupported shard version 2 (expected 1)",
     "unsupported version 2"),
    (lambda b: b[:-2], "2022 bytes, expected 2024 for the 500 tokens its header counts (truncated or corrupt)",
     "size 2022 != 1024"),
    (lambda b: b + b"\x00\x00", "2026 bytes, expected 2024", "size 2026 != 1024"),
])
def test_corrupt_shards_are_refused_by_both_readers(tmp_path, corrupt, ours, theirs):
    good = tmp_path / "good.bin"
    write_shard(good, np.arange(500))
    bad = tmp_path / "fineweb_val_000000.bin"
    bad.write_bytes(corrupt(good.read_bytes()))
    with pytest.raises(ShardError) as e:
        read_shard(bad)
    assert str(e.value).startswith(f"{bad}: ") and ours in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(train_gpt.UserError, match=re.escape(theirs)) as e:
        train_gpt.open_shard(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(ShardError, match="cannot read"):
        read_shard(tmp_path / "missing.bin")


def test_a_folder_named_like_a_shard_is_refused(tmp_path):
    folder = tmp_path / "fineweb_val_000000.bin"
    folder.mkdir()
    with pytest.raises(train_gpt.UserError, match=re.escape(f"shard {folder}: not a file")):
        train_gpt.open_shard(folder)


@pytest.mark.parametrize("tokens,msg", [
    ([1, 2, 65536], "token 65536 at offset 2 does not fit uint16"),
    (np.array([5, -1]), "token -1 at offset 1 does not fit uint16"),
    (np.array([1.0, 2.0]), "tokens must be integers, got dtype float64"),
    (np.zeros((2, 2), dtype=np.uint16), "expected a 1-D token array, got shape (2, 2)"),
])
def test_write_shard_refuses_tokens_that_do_not_fit_and_keeps_the_old_file(tmp_path, tokens, msg):
    path = tmp_path / "s.bin"
    write_shard(path, [7, 8, 9])
    before = path.read_bytes()
    with pytest.raises(ShardError, match=re.escape(f"{path}: {msg}")):
        write_shard(path, tokens)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["s.bin"]


def test_shard_writer_cuts_a_stream_into_complete_shards(tmp_path):
    w = ShardWriter(tmp_path, "fineweb_train", 1000)
    stream = np.random.default_rng(1).integers(0, 65536, 2500)
    for part in np.split(stream, [7, 1500, 1999]):
        w.write(part)
    assert w.files == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == w.files[:2]  # 3rd unfinished
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == w.files and w.tokens == 2500
    assert [read_header(tmp_path / f) for f in w.files] == [1000, 1000, 500]
    assert np.array_equal(np.concatenate([train_gpt.open_shard(tmp_path / f) for f in w.files]), stream)
    (tmp_path / "sub").mkdir()
    w = ShardWriter(tmp_path / "sub", "x", 10)
    w.write(np.arange(5))
    w.discard()  # after a failure: the unfinished shard is dropped
    assert list((tmp_path / "sub").iterdir()) == []


# ---------------------------------------------------------------- cached_challenge_fineweb.py

class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers hf_hub_download's HEAD and GET on /datasets/OWNER/NAME/resolve/REV/PATH like the Hub."""
    timeout = 10  # seconds per connection, so a stuck client cannot hang the server thread

    def log_message(self, *args):
        pass

    def _answer(self, body: bool):
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
        repo = self.server.root / m.group(1) if m else None
        if repo is None or not repo.is_dir():
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        # Like a git commit, the revision changes whenever any file of the repo changes.
        commit = hashlib.sha1(b"".join(p.relative_to(repo).as_posix().encode() + p.read_bytes()
                                       for p in sorted(repo.rglob("*")) if p.is_file())).hexdigest()
        file = repo / m.group(2)
        if not file.is_file():
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)


@pytest.fixture
def hub(tmp_path):
    """A fake Hub with dataset repo test/pg: 3 sp1024 train shards, 1 val shard, tokenizer files."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.root = tmp_path / "hub"
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    repo = server.root / "test" / "pg" / "datasets"
    ds = repo / "datasets" / "fineweb10B_sp1024"
    ds.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [("fineweb_val_000000.bin", 500), *((f"fineweb_train_{i:06d}.bin", 1000 + i) for i in range(3))]:
        write_shard(ds / name, rng.integers(0, 1024, n))
    (repo / "tokenizers").mkdir()
    (repo / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"model bytes")
    (repo / "tokenizers" / "fineweb_1024_bpe.vocab").write_bytes(b"vocab bytes")
    set_manifest(repo, 3, 1)
    yield repo, hub_env(server, tmp_path), tmp_path / "local"
    server.shutdown()
    server.server_close()


def hub_env(server, tmp_path: Path) -> dict:
    """The environment of a download from the local fake hub: none of the caller's hub settings or proxies."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("HF_", "HUGGINGFACE_", "MATCHED_FINEWEB_")) or k.lower().endswith("_proxy"))}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1")
    return env


def set_manifest(repo: Path, train: int, val: int, published_schema: bool = False):
    if published_schema:  # the layout of the published manifest.json
        manifest = {"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                                  "stats": {"files_train": train, "files_val": val}}],
                    "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                                    "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}]}
    else:
        manifest = {"datasets": [{"name": "fineweb10B_sp1024", "train_shards": train, "val_shards": val,
                                  "tokenizer": "fineweb_1024_bpe.model"}]}
    (repo / "manifest.json").write_text(json.dumps(manifest))


def download(env, local: Path, *args, extra_env=None):
    cmd = [sys.executable, str(DATA / "cached_challenge_fineweb.py"), "--repo-id", "test/pg",
           "--local-dir", str(local), *args]
    return subprocess.run(cmd, env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("published_schema", [False, True])
def test_download_two_of_three_train_shards(hub, published_schema):
    repo, env, local = hub
    set_manifest(repo, 3, 1, published_schema)
    r = download(env, local, "--train-shards", "2")
    assert r.returncode == 0, r.stderr
    ds = local / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in ds.iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    for p in ds.iterdir():
        assert p.read_bytes() == (repo / "datasets" / "fineweb10B_sp1024" / p.name).read_bytes()
    for name in ("fineweb_1024_bpe.model", "fineweb_1024_bpe.vocab"):
        assert (local / "tokenizers" / name).read_bytes() == (repo / "tokenizers" / name).read_bytes()
    assert json.loads((local / "manifest.json").read_text()) == json.loads((repo / "manifest.json").read_text())
    assert "2 train shards (2,001 tokens) and 1 val shard(s) (500 tokens) OK" in r.stdout

    # Offline, everything comes from the Hugging Face cache.
    r = download(env, local, "--train-shards", "2", extra_env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr


def test_train_shards_zero_and_more_than_available(hub):
    repo, env, local = hub
    r = download(env, local, "--train-shards", "0")
    assert r.returncode == 0, r.stderr
    ds = local / "datasets" / "fineweb10B_sp1024"
    assert [p.name for p in ds.iterdir()] == ["fineweb_val_000000.bin"]
    assert (local / "tokenizers" / "fineweb_1024_bpe.model").is_file()
    r = download(env, local, "--train-shards", "5")
    assert r.returncode == 0, r.stderr
    assert "has only 3 train shards" in r.stdout
    assert len(list(ds.glob("fineweb_train_*.bin"))) == 3


def test_a_val_shard_left_by_an_earlier_run_is_refused(hub):
    """train_gpt.py scores every val shard in DATA_PATH: a leftover one would pass as part of the val split."""
    repo, env, local = hub
    ds = local / "datasets" / "fineweb10B_sp1024"
    ds.mkdir(parents=True)
    write_shard(ds / "fineweb_val_000001.bin", [1, 5, 6, 7])
    r = download(env, local, "--train-shards", "1")
    assert r.returncode != 0 and "fineweb_val_000001.bin" in r.stderr and "delete them" in r.stderr, r.stderr
    (ds / "fineweb_val_000001.bin").unlink()
    r = download(env, local, "--train-shards", "1")
    assert r.returncode == 0, r.stderr


def test_missing_val_shard(hub):
    repo, env, local = hub
    (repo / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin").unlink()
    r = download(env, local, "--train-shards", "1")
    assert r.returncode != 0
    assert "fineweb10B_sp1024/fineweb_val_000000.bin" in r.stderr and "EntryNotFound" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_variant_missing_from_manifest(hub):
    repo, env, local = hub
    r = download(env, local, "--variant", "sp8192")
    assert r.returncode != 0
    assert "fineweb10B_sp8192" in r.stderr and "--repo-id kevclark/parameter-golf" in r.stderr
    assert "delete the stale local manifest" in r.stderr
    # The manifest is fetched fresh: once the repo lists the variant, it is found.
    (repo / "manifest.json").write_text(json.dumps({"datasets": [
        {"name": "fineweb10B_sp8192", "train_shards": 1, "val_shards": 1}]}))
    ds = repo / "datasets" / "fineweb10B_sp8192"
    ds.mkdir()
    write_shard(ds / "fineweb_val_000000.bin", [1, 2, 3])
    write_shard(ds / "fineweb_train_000000.bin", [1, 4, 5, 6])
    for ext in ("model", "vocab"):
        (repo / "tokenizers" / f"fineweb_8192_bpe.{ext}").write_bytes(b"x")
    r = download(env, local, "--variant", "sp8192")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("damage", ["bad magic", "truncated"])
def test_corrupt_shard(hub, damage):
    repo, env, local = hub
    bad = repo / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin"
    raw = bad.read_bytes()
    bad.write_bytes(b"\0\0\0\0" + raw[4:] if damage == "bad magic" else raw[:-6])
    r = download(env, local, "--train-shards", "2")
    assert r.returncode != 0
    assert str(local / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin") in r.stderr
    assert ("not a shard" if damage == "bad magic" else "truncated or corrupt") in r.stderr


def test_download_bad_arguments(hub):
    repo, env, local = hub
    r = download(env, local, "--train-shards", "-1")
    assert r.returncode == 2 and "--train-shards must be >= 0" in r.stderr
    r = subprocess.run([sys.executable, str(DATA / "cached_challenge_fineweb.py"), "--repo-id", "nobody/none",
                        "--local-dir", str(local)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "nobody/none" in r.stderr and "RepositoryNotFoundError" in r.stderr


# ---------------------------------------------------------------- tokenize_jsonl.py

def tokenize(*args):
    return subprocess.run([sys.executable, str(DATA / "tokenize_jsonl.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def small_corpus(n=300, seed=0):
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "über", "naïve", "日本", "and", "dog", "ran", "far"]
    return [" ".join(rng.choice(words) if rng.random() < 0.8 else str(rng.randrange(10**6))
                     for _ in range(rng.randrange(1, 30))) + ("\n\n  tail" if i % 7 == 0 else "")
            for i in range(n)]


def write_jsonl(path: Path, texts, compress=False):
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
    path.write_bytes(lzma.compress(lines.encode()) if compress else lines.encode())
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tokenizer of ~300 pieces trained by tokenize_jsonl on a few hundred short docs, and its run."""
    tmp = tmp_path_factory.mktemp("tiny")
    texts = small_corpus()
    src = write_jsonl(tmp / "docs.jsonl.xz", texts, compress=True)
    tokenize_jsonl.main([str(src), "--out-dir", str(tmp / "out"), "--vocab-size", "300", "--val-docs", "20",
                         "--workers", "2"])
    return texts, tmp / "out"


def test_matches_reference_shards(tokenizer, tmp_path):
    """With a given model, the shards are byte-identical to the bench corpus's make_shards.py layout,
    built here by hand: each document as BOS (1) + its ids, one shard per split, a 256-word header
    (20240520, 1, token count, zeros), uint16 tokens. 300 val docs span two encoding batches of 256,
    and 2 workers encode them."""
    model = tokenizer(8192)
    n, n_val = 350, 300
    tokenize_jsonl.main([str(CORPUS), "--out-dir", str(tmp_path / "out"), "--tokenizer", str(model),
                         "--val-docs", str(n_val), "--max-docs", str(n), "--workers", "2"])
    ids = spm.SentencePieceProcessor(model_file=str(model)).encode(list(corpus_docs()[:n]))

    def reference(docs) -> bytes:
        toks = [t for x in docs for t in [1, *x]]
        return np.array([20240520, 1, len(toks)] + [0] * 253, dtype="<i4").tobytes() + \
            np.array(toks, dtype="<u2").tobytes()

    out = tmp_path / "out" / "datasets" / "custom_sp8192"
    assert sorted(p.name for p in out.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin",
                                                     "split.json"]
    assert (out / "fineweb_val_000000.bin").read_bytes() == reference(ids[:n_val])
    assert (out / "fineweb_train_000000.bin").read_bytes() == reference(ids[n_val:])
    assert (tmp_path / "out" / "tokenizers" / model.name).read_bytes() == model.read_bytes()


def test_trained_tokenizer_and_round_trip(tiny):
    texts, out = tiny
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizers" / "custom_sp300_bpe.model"))
    assert (out / "tokenizers" / "custom_sp300_bpe.vocab").is_file()
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert 260 < sp.vocab_size() <= 300
    assert sp.id_to_piece(4) == "<0x00>" and sp.id_to_piece(259) == "<0xFF>" and sp.is_byte(4)
    assert not sp.encode("cat", out_type=str)[0].startswith("\u2581")  # add_dummy_prefix=False
    assert sp.encode("2024", out_type=str) == ["2", "0", "2", "4"]  # split_digits
    assert sp.encode("\U0001F600") == [4 + b for b in "\U0001F600".encode()]  # byte fallback

    ds = out / "datasets" / "custom_sp300"
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin", "split.json"]
    for name, split_texts in [("val", texts[:20]), ("train", texts[20:])]:
        toks = read_checked(ds / f"fineweb_{name}_000000.bin").tolist()
        starts = [i for i, t in enumerate(toks) if t == 1]
        assert starts[0] == 0 and len(starts) == len(split_texts)
        docs = [toks[a + 1:b] for a, b in zip(starts, starts[1:] + [len(toks)])]
        for ids, text in zip(docs, split_texts):
            assert ids == sp.encode(text)
            assert sp.decode(ids) == sp.decode(sp.encode(text))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # staging folder removed
    split = json.loads((ds / "split.json").read_text())
    src = out.parent / "docs.jsonl.xz"
    assert split == dict(input="docs.jsonl.xz", input_sha256=hashlib.sha256(src.read_bytes()).hexdigest(),
                         val_docs=20, train_docs=len(texts) - 20, max_docs=None, caseops=False, lossless=False,
                         tokenizer="custom_sp300_bpe.model")


def test_shard_splitting(tiny, tmp_path):
    texts, out = tiny
    model = out / "tokenizers" / "custom_sp300_bpe.model"
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    r = tokenize(src, "--out-dir", tmp_path / "split", "--tokenizer", model, "--val-docs", 20,
                 "--shard-tokens", 500, "--workers", 1)
    assert r.returncode == 0, r.stderr
    ds, whole = tmp_path / "split" / "datasets" / "custom_sp300", out / "datasets" / "custom_sp300"
    for split in ("val", "train"):
        shards = sorted(ds.glob(f"fineweb_{split}_*.bin"))
        assert [p.name for p in shards] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(shards))]
        parts = [read_checked(p) for p in shards]
        assert all(len(p) == 500 for p in parts[:-1]) and 0 < len(parts[-1]) <= 500
        unsplit = read_checked(whole / f"fineweb_{split}_000000.bin")
        assert len(parts) == -(-len(unsplit) // 500) and len(parts) >= 2
        assert np.array_equal(np.concatenate(parts), unsplit)

    # A rerun with bigger shards replaces the earlier shards, leaving none behind.
    r = tokenize(src, "--out-dir", tmp_path / "split", "--tokenizer", model, "--val-docs", 20, "--workers", 1)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin", "split.json"]


NO_TEXT = 'expected a JSON object with a "text" string'


@pytest.mark.parametrize("bad, message", [('{"txt": "no text key"}', NO_TEXT), ("not json", NO_TEXT),
                                          ('{"text": 5}', NO_TEXT), ('["text"]', NO_TEXT),
                                          ('{"text": "a\\ud800b"}', '"text" is not encodable as UTF-8 '
                                                                     '(surrogates not allowed: \\ud800)')])
def test_bad_line_leaves_nothing(tiny, tmp_path, bad, message):
    texts, out = tiny
    lines = [json.dumps({"text": t}) for t in texts] + [bad]
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    dest = tmp_path / "out" / "nested"
    r = tokenize(src, "--out-dir", dest, "--tokenizer", out / "tokenizers" / "custom_sp300_bpe.model",
                 "--val-docs", 20, "--shard-tokens", 300, "--workers", 2)
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: {src}:{len(lines)}: {message}"
    assert not (tmp_path / "out").exists()

    # A bad line inside the train split also stops tokenizer training, with the same message.
    r = tokenize(src, "--out-dir", dest, "--vocab-size", 300, "--val-docs", 20, "--workers", 1)
    assert r.returncode == 1 and f"{src}:{len(lines)}:" in r.stderr
    assert not (tmp_path / "out").exists()


def test_documents_left_out_of_tokenizer_training_are_counted(tmp_path):
    """SentencePiece skips training documents over its max_sentence_length without a word: the count is told."""
    texts = small_corpus(120)
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    over = sum(len(t.encode()) > 100 for t in texts[20:])
    assert 0 < over < 100
    for limit, note in ((100, f"note: {over:,} of 100 tokenizer-training documents are over --max-doc-bytes=100"),
                        (10_000, None)):
        r = tokenize(src, "--out-dir", tmp_path / f"o{limit}", "--vocab-size", 300, "--val-docs", 20, "--workers", 1,
                     "--max-doc-bytes", limit)
        assert r.returncode == 0, r.stderr
        assert (note in r.stdout) if note else "--max-doc-bytes" not in r.stdout, r.stdout


def test_tokenize_bad_arguments(tiny, tmp_path):
    texts, out = tiny
    src = write_jsonl(tmp_path / "docs.jsonl", texts[:10])
    r = tokenize(src, "--out-dir", tmp_path / "o", "--vocab-size", 70000)
    assert r.returncode == 2 and "--vocab-size must be <= 65536" in r.stderr
    r = tokenize(src, "--out-dir", tmp_path / "o", "--tokenizer", src)
    assert r.returncode == 1 and "--tokenizer" in r.stderr and "SentencePiece" in r.stderr
    r = tokenize(src, "--out-dir", tmp_path / "o", "--tokenizer", out / "tokenizers" / "custom_sp300_bpe.model")
    assert r.returncode == 1 and "need more than --val-docs=400" in r.stderr
    bos_text = bos_as_text_piece(out / "tokenizers" / "custom_sp300_bpe.model", tmp_path / "bos_text.model")
    r = tokenize(src, "--out-dir", tmp_path / "o", "--tokenizer", bos_text, "--val-docs", 2)
    assert r.returncode == 1 and "id 1 must be a control piece (the document separator, BOS), got '<s>'" in r.stderr
    r = tokenize(tmp_path / "missing.jsonl", "--out-dir", tmp_path / "o", "--vocab-size", 300)
    assert r.returncode == 1 and "missing.jsonl: no such file" in r.stderr
    assert files_under(tmp_path / "o") == []
