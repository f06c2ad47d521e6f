#!/usr/bin/env python3
"""Tokenize a JSONL corpus of {"text": ...} documents into parameter-golf shards.

usage:
  # with an existing SentencePiece model (byte-identical to ../shared/bench/make_shards.py):
  python data/tokenize_jsonl.py ../shared/bench/docs.jsonl.xz --out-dir /tmp/data \\
      --tokenizer ../shared/bench/tokenizers/bench_8192_bpe.model --name bench_sp8192
  # training a SentencePiece BPE tokenizer on the train split first:
  python data/tokenize_jsonl.py docs.jsonl --out-dir /tmp/data --vocab-size 4096 --val-docs 50000

INPUT is JSONL, plain or compressed (.xz, .gz), one {"text": "..."} object per line. The first
--val-docs documents are the validation split, the rest the train split. Writes
  OUT/datasets/NAME/fineweb_{val,train}_NNNNNN.bin   and   OUT/tokenizers/MODEL (.vocab too when trained)
Each document becomes BOS (id 1) + its SentencePiece ids (no EOS); each split's token stream is cut
into shards of --shard-tokens tokens, so documents may straddle two shards. A shard is 256
little-endian int32 header words (20240520, 1, token count, zeros) followed by the tokens as
little-endian uint16 (written by data/shards.py). All output is staged in a temporary folder under
OUT and moved into place only when everything succeeded; shards of an earlier run in
OUT/datasets/NAME are replaced.
"""
import argparse
import gzip
import itertools
import json
import lzma
import os
import shutil
import sys
import tempfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import sentencepiece as spm

if not __package__:  # run as a file (python3 data/tokenize_jsonl.py): import data.shards as the tests do
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.shards import MAX_TOKENS, ShardWriter  # noqa: E402

BOS = 1
MAX_VOCAB = 1 << 16  # token ids are stored as uint16
BATCH_DOCS = 256


def read_docs(path: Path, max_docs=None):
    """Yield each line's "text" (blank lines are skipped); exit naming the line if it has none."""
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    n = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if max_docs is not None and n >= max_docs:
                    return
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                text = obj.get("text") if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise SystemExit(f'error: {path}:{lineno}: expected a JSON object with a "text" string')
                n += 1
                yield text
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path}: cannot read ({e})") from None


_sp = None


def _load(model: str) -> None:
    global _sp
    _sp = spm.SentencePieceProcessor(model_file=model)


def _encode(batch):
    """(split, texts) -> (split, number of docs, concatenated BOS + ids of every doc as uint16)."""
    split, texts = batch
    ids = _sp.encode(texts)
    out = np.empty(sum(len(x) for x in ids) + len(ids), dtype="<u2")
    i = 0
    for x in ids:
        out[i] = BOS
        out[i + 1:i + 1 + len(x)] = x
        i += len(x) + 1
    return split, len(texts), out


def batches(docs, val_docs: int):
    """Group docs into (split, texts) batches that never straddle the val/train boundary."""
    buf, split = [], "val"
    for i, text in enumerate(docs):
        s = "val" if i < val_docs else "train"
        if buf and (s != split or len(buf) == BATCH_DOCS):
            yield split, buf
            buf = []
        split = s
        buf.append(text)
    if buf:
        yield split, buf


def encoded(batch_iter, model: str, workers: int):
    """Encode batches in order; input is read here in the main process, a bounded window at a time."""
    if workers <= 1:
        _load(model)
        yield from map(_encode, batch_iter)
        return
    with Pool(workers, _load, (model,)) as pool:
        while window := list(itertools.islice(batch_iter, 4 * workers)):
            yield from pool.imap(_encode, window)


def train_tokenizer(args, prefix: Path, vocab: int) -> None:
    """Train a SentencePiece BPE model on the train split (docs after the first --val-docs)."""
    stop = None if args.tokenizer_train_docs is None else args.val_docs + args.tokenizer_train_docs
    source = itertools.islice(read_docs(args.input, args.max_docs), args.val_docs, stop)
    seen, failure = [0], []

    def texts():  # sentencepiece wraps exceptions of the iterator: keep ours to re-raise it
        try:
            for t in source:
                seen[0] += 1
                yield t
        except BaseException as e:
            failure.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=texts(), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab,
            byte_fallback=True, add_dummy_prefix=False, split_digits=True,
            normalization_rule_name="nmt_nfkc", character_coverage=0.999, hard_vocab_limit=False,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=max(1, args.workers), minloglevel=2)
    except RuntimeError as e:
        if failure:
            raise failure[0] from None
        if seen[0] == 0:
            raise SystemExit(f"error: {args.input}: no train documents after the first "
                             f"--val-docs={args.val_docs} to train a tokenizer on") from None
        raise SystemExit(f"error: SentencePiece training with --vocab-size {vocab} failed: "
                         f"{' '.join(str(e).split())}") from None


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="INPUT", type=Path,
                   help='JSONL file of {"text": ...} documents; .xz and .gz are decompressed')
    p.add_argument("--out-dir", type=Path, required=True,
                   help="output root: writes OUT/datasets/NAME/ and OUT/tokenizers/")
    p.add_argument("--name", help="dataset folder name (default: custom_sp{V}, V = vocabulary size)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", type=Path, metavar="PATH.model",
                     help="encode with this SentencePiece model (copied to OUT/tokenizers/)")
    tok.add_argument("--vocab-size", type=positive, metavar="V",
                     help="train a SentencePiece BPE model of V pieces on the train split "
                          "(saved as OUT/tokenizers/NAME_bpe.model)")
    p.add_argument("--tokenizer-train-docs", type=positive, metavar="N",
                   help="with --vocab-size: train the tokenizer on the first N train docs only (default: all)")
    p.add_argument("--val-docs", type=positive, default=400, metavar="N",
                   help="the first N documents are the val split (default: 400 as in the bench corpus; "
                        "the FineWeb challenge split uses 50000)")
    p.add_argument("--shard-tokens", type=positive, default=100_000_000, metavar="N",
                   help="tokens per shard; documents run on across shard boundaries (default: 100000000)")
    p.add_argument("--workers", type=positive, default=os.cpu_count() or 1, metavar="N",
                   help="encoding processes (default: all CPUs)")
    p.add_argument("--max-docs", type=positive, metavar="N",
                   help="use only the first N documents of INPUT (default: all)")
    args = p.parse_args(argv)
    if args.vocab_size is not None and args.vocab_size > MAX_VOCAB:
        p.error(f"--vocab-size must be <= {MAX_VOCAB} (token ids are stored as uint16), got {args.vocab_size}")
    if args.shard_tokens > MAX_TOKENS:
        p.error(f"--shard-tokens must be < 2**31 (the header stores it as int32), got {args.shard_tokens}")
    if args.name is not None and (not args.name or "/" in args.name or args.name in (".", "..")):
        p.error(f"--name must be a plain folder name, got {args.name!r}")
    if args.tokenizer_train_docs is not None and args.vocab_size is None:
        p.error("--tokenizer-train-docs only applies with --vocab-size")
    return args


def run(args, stage: Path) -> None:
    if not args.input.is_file():
        raise SystemExit(f"error: INPUT {args.input}: no such file")
    if args.tokenizer is not None:
        try:
            vocab = spm.SentencePieceProcessor(model_file=str(args.tokenizer)).vocab_size()
        except (OSError, RuntimeError) as e:
            raise SystemExit(f"error: --tokenizer {args.tokenizer}: expected a SentencePiece .model file "
                             f"({' '.join(str(e).split())})") from None
        if vocab > MAX_VOCAB:
            raise SystemExit(f"error: --tokenizer {args.tokenizer}: {vocab} pieces, at most {MAX_VOCAB} fit uint16")
        name = args.name or f"custom_sp{vocab}"
        tok_files = [args.tokenizer.name]
        shutil.copyfile(args.tokenizer, stage / tok_files[0])
    else:
        name = args.name or f"custom_sp{args.vocab_size}"
        train_tokenizer(args, stage / f"{name}_bpe", args.vocab_size)
        tok_files = [f"{name}_bpe.model", f"{name}_bpe.vocab"]

    writers = {s: ShardWriter(stage, f"fineweb_{s}", args.shard_tokens) for s in ("val", "train")}
    n_docs = dict.fromkeys(writers, 0)
    docs = read_docs(args.input, args.max_docs)
    try:
        for split, n, toks in encoded(batches(docs, args.val_docs), str(stage / tok_files[0]), args.workers):
            writers[split].write(toks)
            n_docs[split] += n
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    for w in writers.values():
        w.close()
    if n_docs["train"] == 0:
        raise SystemExit(f"error: {args.input}: {n_docs['val']} documents, need more than "
                         f"--val-docs={args.val_docs} to leave a train split")

    # Everything succeeded: move it into place and drop shards an earlier run left behind.
    ds_dir, tok_dir = args.out_dir / "datasets" / name, args.out_dir / "tokenizers"
    ds_dir.mkdir(parents=True, exist_ok=True)
    tok_dir.mkdir(parents=True, exist_ok=True)
    new = [f for w in writers.values() for f in w.files]
    for f in new:
        os.replace(stage / f, ds_dir / f)
    for f in tok_files:
        os.replace(stage / f, tok_dir / f)
    for old in sorted(ds_dir.glob("fineweb_*_*.bin")):
        if old.name not in new:
            old.unlink()
            print(f"removed stale {old}")
    for split, w in writers.items():
        print(f"{ds_dir}: {split} {n_docs[split]:,} docs, {w.tokens:,} tokens in {len(w.files)} shard(s)")
    print(f"tokenizer: {tok_dir / tok_files[0]}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise SystemExit(f"error: --out-dir {args.out_dir}: expected a folder, found a file")
    made = [d for d in [args.out_dir, *args.out_dir.parents] if not d.exists()]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".tokenize_jsonl-", dir=args.out_dir))
    try:
        run(args, stage)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        for d in made:  # leave no empty folders behind after a failure
            try:
                d.rmdir()
            except OSError:
                break


if __name__ == "__main__":
    main()
