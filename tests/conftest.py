"""Shared fixtures: tiny shard sets cut from the bench corpus (or synthetic text without it)."""
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402
from data.shards import write_shard  # noqa: E402
from scripts.runlog import read_log  # noqa: E402

BENCH = ROOT.parent / "shared" / "bench"


def bench_docs(n: int) -> list[str]:
    if not (BENCH / "docs.jsonl.xz").exists():
        pytest.skip("../shared/bench corpus not present")
    out = []
    with lzma.open(BENCH / "docs.jsonl.xz", "rt") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if len(out) == n:
                break
    return out


def bench_tokenizer(vocab: int) -> Path:
    path = BENCH / "tokenizers" / f"bench_{vocab}_bpe.model"
    if not path.exists():
        pytest.skip("../shared/bench tokenizers not present")
    return path


def docs_to_stream(ids: list[list[int]]) -> np.ndarray:
    return np.concatenate([np.concatenate([[1], x]) for x in ids]).astype(np.uint16)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """sp1024 shards: 30 val docs, 300 train docs of the bench corpus."""
    tok = bench_tokenizer(1024)
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    ids = sp.encode(bench_docs(330))
    d = tmp_path_factory.mktemp("sp1024")
    write_shard(d / "fineweb_val_000000.bin", docs_to_stream(ids[:30]))
    write_shard(d / "fineweb_train_000000.bin", docs_to_stream(ids[30:]))
    return d, tok


TINY_ENV = dict(VOCAB_SIZE="1024", NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2",
                MLP_MULT="2", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="1024", ITERATIONS="6",
                WARMUP_STEPS="1", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1", VAL_MAX_TOKENS="4096",
                MAX_WALLCLOCK_SECONDS="0", EMA_DECAY="0", XSA_LAST_N="4", NUM_LOOPS="1",
                LOOP_START="1", LOOP_END="2", PARALLEL_RESIDUAL_START="3", ROPE_DIMS="8",
                MUON_MOMENTUM_WARMUP_STEPS="3", EVAL_SEQ_LEN="64", EVAL_STRIDE="32", TTT_CHUNK_TOKENS="1024",
                GPTQ_CALIBRATION_BATCHES="2")


def tiny_env(tiny_data, tmp_path, **overrides) -> dict:
    data, tok = tiny_data
    env = {k: v for k, v in os.environ.items() if not k.startswith(train_gpt.KNOB_PREFIXES)}
    env.update(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=str(tok), LOG_DIR=str(tmp_path / "logs"),
               ARTIFACT_DIR=str(tmp_path / "art"), DEVICE="cpu", OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_script(args: list[str], env: dict, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def parse_log(path: Path) -> dict:
    """The final summary block of a run log (scripts/runlog.py): {key: value string}."""
    return read_log(path).summary
