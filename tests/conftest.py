"""Shared fixtures. Everything the tests need ships in the repository: the corpus is
tests/fixtures/corpus.jsonl.xz (English prose from Python's stdlib docstrings, made by
tests/fixtures/make_corpus.py), SentencePiece tokenizers are trained on it once per session, and the
tiny shard set is cut from it. No test reads ../shared."""
import dataclasses
import functools
import io
import json
import lzma
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402
from data.shards import write_shard  # noqa: E402
from scripts.runlog import read_log  # noqa: E402
import forkserver  # noqa: E402  (tests/ is on sys.path: pytest puts a rootless conftest's folder there)

# The in-process tests run torch on one thread, as the tiny runs do (tiny_env's OMP_NUM_THREADS=1): their
# tensors are too small for a second one to help, and on a 2-core machine it spun against the runs.
torch.set_num_threads(1)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CORPUS = FIXTURES / "corpus.jsonl.xz"
FORKSERVER = Path(__file__).resolve().parent / "forkserver.py"
VAL_DOCS = 12  # the corpus's first documents are the val split (5,000+ tokens at sp1024), the rest train


@functools.cache
def corpus_docs() -> tuple[str, ...]:
    """The texts of the shipped corpus, in file order (359 documents, ~480,000 characters)."""
    with lzma.open(CORPUS, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line)["text"] for line in f)


def train_tokenizer(path: Path, vocab: int, texts, **settings) -> Path:
    """A SentencePiece BPE model of exactly `vocab` pieces, trained as the bench tokenizers were: byte
    fallback, no dummy prefix, split digits, nmt_nfkc normalization, pad 0 / bos 1 / eos 2 / unk 3;
    `settings` (SentencePiece's trainer options) change any of them."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(**dict(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab,
        byte_fallback=True, add_dummy_prefix=False, split_digits=True, normalization_rule_name="nmt_nfkc",
        character_coverage=0.9995, hard_vocab_limit=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        num_threads=1, minloglevel=2) | settings)
    path.write_bytes(model.getvalue())
    got = spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
    assert got == vocab, f"{path}: the corpus gave {got} pieces, not {vocab}"
    return path


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """tokenizer(vocab) -> path of a model trained on the corpus's train split (once per vocab and session)."""
    folder = tmp_path_factory.mktemp("tokenizers")

    @functools.cache
    def get(vocab: int) -> Path:
        return train_tokenizer(folder / f"test_{vocab}_bpe.model", vocab, corpus_docs()[VAL_DOCS:])

    return get


def docs_to_stream(ids: list[list[int]]) -> np.ndarray:
    """Each document as BOS (1) + its ids, concatenated: the layout of data/tokenize_jsonl.py's shards."""
    return np.concatenate([np.concatenate([[1], x]) for x in ids]).astype(np.uint16)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tokenizer):
    """sp1024 shards of the corpus: val = its first VAL_DOCS documents (more than the 4096 tokens
    TINY_ENV scores), train = the other 347 (~170,000 tokens)."""
    tok = tokenizer(1024)
    ids = spm.SentencePieceProcessor(model_file=str(tok)).encode(list(corpus_docs()))
    d = tmp_path_factory.mktemp("sp1024")
    n_val = write_shard(d / "fineweb_val_000000.bin", docs_to_stream(ids[:VAL_DOCS]))
    write_shard(d / "fineweb_train_000000.bin", docs_to_stream(ids[VAL_DOCS:]))
    assert n_val > int(TINY_ENV["VAL_MAX_TOKENS"]) + 1
    return d, tok


TINY_ENV = dict(VOCAB_SIZE="1024", NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2",
                MLP_MULT="2", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="1024", ITERATIONS="6",
                WARMUP_STEPS="1", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1", VAL_MAX_TOKENS="4096",
                MAX_WALLCLOCK_SECONDS="0", EMA_DECAY="0", XSA_LAST_N="4", NUM_LOOPS="1",
                LOOP_START="1", LOOP_END="2", PARALLEL_RESIDUAL_START="3", ROPE_DIMS="8",
                MUON_MOMENTUM_WARMUP_STEPS="3", EVAL_SEQ_LEN="64", EVAL_STRIDE="32", TTT_CHUNK_TOKENS="1024",
                GPTQ_CALIBRATION_BATCHES="2", CLIP_SEARCH_STEPS="0", TTT_EPOCHS="1", TTT_LORA_RANK="0")
# CLIP_SEARCH_STEPS=0, TTT_EPOCHS=1 and windowed TTT (TTT_LORA_RANK=0): the clip search (more brotli
# packs), the 2nd-3rd TTT epochs and LoRA's many small steps are beside the point of most tiny
# runs; test_end_to_end_run puts all three back to their defaults, tests/test_quant.py tests the search
# itself and tests/test_lora_ttt.py the LoRA phase.


def tiny_env(tiny_data, tmp_path, **overrides) -> dict:
    data, tok = tiny_data
    env = {k: v for k, v in os.environ.items() if not k.startswith(train_gpt.KNOB_PREFIXES)}
    env.update(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=str(tok), LOG_DIR=str(tmp_path / "logs"),
               ARTIFACT_DIR=str(tmp_path / "art"), DEVICE="cpu", OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def random_artifact(env: dict, path: Path) -> Path:
    """An artifact of an untrained model of env's config (no training run): for tests of what scores a file."""
    hp = train_gpt.Hyperparameters(env)
    return untrained_artifact(hp.model_config(), path, train_seq_len=hp.train_seq_len)


def untrained_artifact(cfg, path: Path, model: dict | None = None, **config) -> Path:
    """An artifact of GPT(cfg) untrained, its config recording `model` as the model's fields (default: cfg's)
    beside `config`: a file as a run writes it, or one with a field missing, retired or unknown."""
    qstate = train_gpt.quantize_state(train_gpt.GPT(cfg).state_dict(), None, cfg.num_layers, 6, 12.85, 8, 20.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(train_gpt.pack_artifact(qstate, dict(model=dataclasses.asdict(cfg) if model is None else model)
                                             | config))
    return path


def run_script(args: list[str], env: dict, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


class Launcher:
    """tests/forkserver.py, started once per session: runs train_gpt.py (or another script of the
    repository) as a forked process of a server that has already imported torch and train_gpt, ~4 s
    sooner than run_script([script], env) and otherwise alike (its own environment, output, exit status)."""

    def __init__(self, folder: Path):
        self.socket, self.log = folder / "socket", folder / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(train_gpt.KNOB_PREFIXES)}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(FORKSERVER), "serve", str(self.socket)], cwd=ROOT,
                                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        self.argv = [sys.executable, str(FORKSERVER), "run", str(self.socket)]  # + [SCRIPT, ARGS...]: a launcher
        self.command = " ".join(self.argv)  # for run_seeds.sh's LAUNCH

    def ready(self):
        while not self.socket.exists():  # the server is still importing
            assert self.proc.poll() is None, f"tests/forkserver.py exited: {self.log.read_text()[-2000:]}"
            time.sleep(0.05)

    def run(self, env: dict, script="train_gpt.py", args=(), nproc=1, timeout=300) -> subprocess.CompletedProcess:
        """As run_script([script, *args], env, timeout); nproc > 1: as torchrun --standalone --nproc_per_node."""
        self.ready()
        return forkserver.run(str(self.socket), script, list(args), env, str(ROOT), nproc, timeout)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def launcher(tmp_path_factory):
    server = Launcher(tmp_path_factory.mktemp("forkserver"))
    yield server
    server.close()


def parse_log(path: Path) -> dict:
    """The final summary block of a run log (scripts/runlog.py): {key: value string}."""
    return read_log(path).summary


def bos_as_text_piece(model: Path, out: Path) -> Path:
    """A copy of the model whose id 1 ('<s>') is a NORMAL piece instead of CONTROL (protobuf: the piece
    entry's type field 0x18 goes 3 -> 1), as in a tokenizer trained without BOS: the model stays valid."""
    blob = model.read_bytes()
    found = re.findall(rb"\x0a\x03<s>\x15.{4}\x18\x03", blob, re.S)
    assert len(found) == 1
    out.write_bytes(blob.replace(found[0], found[0][:-1] + b"\x01"))
    return out
