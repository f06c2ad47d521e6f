#!/usr/bin/env python3
"""Tokenize a JSONL corpus of {"text": ...} documents into parameter-golf shards.

usage:
  # with an existing SentencePiece model (byte-identical to ../shared/bench/make_shards.py):
  python data/tokenize_jsonl.py ../shared/bench/docs.jsonl.xz --out-dir /tmp/data \\
      --tokenizer ../shared/bench/tokenizers/bench_8192_bpe.model --name bench_sp8192
  # training a SentencePiece BPE tokenizer on the train split first:
  python data/tokenize_jsonl.py docs.jsonl --out-dir /tmp/data --vocab-size 4096 --val-docs 50000
  # CaseOps (data/caseops.py): transform each document, train a lossless tokenizer with the four
  # operators reserved, and write per-token byte sidecars beside the val shards:
  python data/tokenize_jsonl.py docs.jsonl --out-dir /tmp/data --caseops --vocab-size 8192 --val-docs 50000

INPUT is JSONL, plain or compressed (.xz, .gz), one {"text": "..."} object per line. The first
--val-docs documents are the validation split, the rest the train split. Writes
  OUT/datasets/NAME/fineweb_{val,train}_NNNNNN.bin   and   OUT/tokenizers/MODEL (.vocab too when trained)
Each document becomes BOS (id 1) + its SentencePiece ids (no EOS); each split's token stream is cut
into shards of --shard-tokens tokens, so documents may straddle two shards. A shard is 256
little-endian int32 header words (20240520, 1, token count, zeros) followed by the tokens as
little-endian uint16 (written by data/shards.py). All output is staged in a temporary folder under
OUT and moved into place only when everything succeeded; shards (and sidecars) of an earlier run in
OUT/datasets/NAME are replaced. OUT/datasets/NAME/split.json records the split (val_docs,
train_docs, the input's name and sha256) so that a later reader can check which documents are val.

Leak guard: the FineWeb challenge's val split is the first 50,000 documents of docs_selected.jsonl.
With an input of that name, --val-docs below 50000 is refused (it would train on val documents)
unless --allow-small-val is given.

--caseops: each document is CaseOps-encoded (data/caseops.py) before tokenization. A trained
tokenizer (--vocab-size) reserves the operators U+E001..U+E004 as user_defined_symbols (ids 4..7)
and is lossless: identity normalization, no whitespace removal, no dummy prefix, byte fallback,
split digits, pad 0 / bos 1 / eos 2 / unk 3; its pieces concatenate to exactly the transformed text
(spaces as U+2581). A --tokenizer without the four operators as single pieces, or whose pieces do
not reproduce a document's transformed text, is refused. Beside each val shard
fineweb_val_NNNNNN.bin goes fineweb_val_bytes_NNNNNN.bin: same header and length, entry i = the
ORIGINAL UTF-8 bytes of token i (BOS and operators 0, a byte-fallback piece 1, any other piece the
bytes of the characters it covers; see data/caseops.byte_weights), so that a document's entries sum
to len(text.encode("utf-8")) exactly. sp.decode + caseops.decode gives each document back, except
that SentencePiece decodes a literal U+2581 of the text as a space (its bytes are still counted).

--lossless: the same lossless tokenizer and byte sidecars without the CaseOps transform (no operators
reserved): the plain counterpart of --caseops, scored over the same original bytes, so that the two
differ only by the case operators (the default tokenizer normalizes with nmt_nfkc, which collapses
whitespace runs and maps some characters, so its bpb counts the bytes of the normalized text).
"""
import argparse
import gzip
import hashlib
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
from data import caseops  # noqa: E402
from data.shards import MAX_TOKENS, ShardWriter  # noqa: E402

BOS = 1
MAX_VOCAB = 1 << 16  # token ids are stored as uint16
BATCH_DOCS = 256
CANONICAL_VAL_DOCS = 50_000  # the FineWeb challenge's val split: the first 50,000 docs of docs_selected.jsonl
# A string a lossless CaseOps tokenizer must reproduce piece for piece: leading, repeated and odd
# whitespace, characters NFKC would change, a character only byte fallback can spell, operators.
PROBE = " Two  spaces,\ttab\n\n  newline; \ufb01 \uff21 \u2460 x\u00b2\u00a0\u00e9 \U0001F600 McDONALD \ue001 "


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
                try:
                    text.encode("utf-8")  # JSON may escape a lone surrogate, which no UTF-8 byte count can hold
                except UnicodeEncodeError as e:
                    raise SystemExit(f'error: {path}:{lineno}: "text" is not encodable as UTF-8 ({e.reason}: '
                                     f'{text[e.start:e.end].encode("unicode_escape").decode()})') from None
                n += 1
                yield text
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path}: cannot read ({e})") from None


def is_fineweb_docs(path: Path) -> bool:
    """The FineWeb challenge corpus, by name: docs_selected.jsonl (plain or compressed)."""
    return path.name.startswith("docs_selected") and ".jsonl" in path.name


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- CaseOps pieces and byte counts

class NotLossless(Exception):
    """A document whose transformed text the tokenizer's pieces do not reproduce (args: index, detail)."""


def piece_bytes(sp) -> list:
    """Per id, the UTF-8 bytes the piece spells in the tokenizer's own text (a space stays U+2581): a
    byte-fallback piece its byte, control/unknown/unused pieces nothing."""
    table = []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            table.append(bytes([int(piece[3:5], 16)]))
        elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            table.append(b"")
        else:
            table.append(piece.encode("utf-8"))
    return table


def mismatch(text: str, got: bytes) -> str:
    """Where the pieces' bytes first differ from the text (spaces as U+2581), in words."""
    want = text.replace(" ", "\u2581").encode("utf-8")
    k = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    at = len(want[:k].decode("utf-8", errors="ignore"))
    return (f"at character {at} the text has {text[at:at + 12]!r} but its pieces spell "
            f"{got[k:k + 12].decode('utf-8', errors='replace').replace(chr(0x2581), ' ')!r}")


def char_weights(text: str, use_caseops: bool) -> np.ndarray:
    """The original UTF-8 bytes each character of the tokenizer's text stands for."""
    return caseops.byte_weights(text) if use_caseops else caseops.utf8_lengths(caseops.codepoints(text))


def token_bytes(text: str, ids, table, lengths: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The original UTF-8 bytes of each token of one document `text` as the tokenizer sees it (CaseOps-
    transformed or not) encoded as `ids` (no BOS), as int64, given each character's original bytes `w`
    (char_weights). Raises NotLossless(None, detail) if the pieces do not spell the text.

    Every byte of the text as the tokenizer spells it (a space as the 3 bytes of U+2581) gets a weight:
    byte k of a character of original weight w counts 1 if k < w, else 0. A
    space (w 1) is 1,0,0; an acting operator 0,0,0; a literal operator after ESC 1,1,1; any other
    character 1 per byte, so each byte-fallback piece of it counts 1. A token gets the weights of the
    bytes it spells."""
    got = b"".join(map(table.__getitem__, ids))
    cps = caseops.codepoints(text)
    spelled = np.where(cps == 0x20, 0x2581, cps)
    lens = caseops.utf8_lengths(spelled)
    if len(got) != int(lens.sum()) or got != text.replace(" ", "\u2581").encode("utf-8"):
        raise NotLossless(None, mismatch(text, got))
    starts = np.cumsum(lens) - lens
    k = np.arange(int(lens.sum())) - np.repeat(starts, lens)
    per_byte = np.concatenate([[0], np.cumsum(k < np.repeat(w, lens))])
    spans = lengths[np.asarray(ids, dtype=np.int64)]
    ends = np.cumsum(spans)
    return per_byte[ends] - per_byte[ends - spans]


def caseops_model_problem(sp, use_caseops: bool = True) -> str | None:
    """Why a SentencePiece model cannot be used for CaseOps data (or, use_caseops False, for lossless
    plain data), or None."""
    unk = sp.unk_id()
    flag = "--caseops" if use_caseops else "--lossless"
    for op in caseops.OPERATORS if use_caseops else ():
        pid = sp.piece_to_id(op)
        if pid == unk or sp.id_to_piece(pid) != op or sp.encode(op) != [pid]:
            return (f"lacks the CaseOps operator U+{ord(op):04X} ({caseops.NAMES[op]}) as a single piece "
                    f"(a CaseOps tokenizer reserves U+E001..U+E004 as user_defined_symbols; train one with "
                    f"--caseops --vocab-size V)")
    table = piece_bytes(sp)
    lengths = np.array([len(b) for b in table], dtype=np.int64)
    probe = caseops.encode(PROBE) if use_caseops else PROBE
    try:
        token_bytes(probe, sp.encode(probe), table, lengths, char_weights(probe, use_caseops))
    except NotLossless as e:
        return (f"is not lossless ({e.args[1]}): {'CaseOps' if use_caseops else flag} needs identity "
                f"normalization, no whitespace "
                f"removal, no dummy prefix and byte fallback (train one with {flag} --vocab-size V)")
    return None


# ---------------------------------------------------------------- encoding

_sp = _table = _lengths = None
_caseops = _lossless = False


def _load(model: str, use_caseops: bool = False, lossless: bool = False) -> None:
    global _sp, _table, _lengths, _caseops, _lossless
    _sp = spm.SentencePieceProcessor(model_file=model)
    _caseops, _lossless = use_caseops, lossless or use_caseops
    if _lossless:
        _table = piece_bytes(_sp)
        _lengths = np.array([len(b) for b in _table], dtype=np.int64)


def _encode(batch):
    """(split, first doc index, texts) -> (split, number of docs, concatenated BOS + ids of every doc as
    uint16, and with a lossless tokenizer for val the matching original byte counts (BOS 0), else None)."""
    split, first, texts = batch
    if _caseops:
        texts = [caseops.encode(t) for t in texts]
    ids = _sp.encode(texts)
    out = np.empty(sum(len(x) for x in ids) + len(ids), dtype="<u2")
    side = np.zeros(len(out), dtype=np.int64) if _lossless and split == "val" else None
    i = 0
    for k, x in enumerate(ids):
        out[i] = BOS
        out[i + 1:i + 1 + len(x)] = x
        if _lossless:
            try:
                if side is not None:
                    w = char_weights(texts[k], _caseops)
                    side[i + 1:i + 1 + len(x)] = token_bytes(texts[k], x, _table, _lengths, w)
                elif b"".join(map(_table.__getitem__, x)) != texts[k].replace(" ", "\u2581").encode("utf-8"):
                    raise NotLossless(None, mismatch(texts[k], b"".join(map(_table.__getitem__, x))))
            except NotLossless as e:
                raise NotLossless(first + k, e.args[1]) from None
        i += len(x) + 1
    return split, len(texts), out, side


def batches(docs, val_docs: int):
    """Group docs into (split, index of the first doc, texts) batches that never straddle the val/train
    boundary."""
    buf, split, first = [], "val", 0
    for i, text in enumerate(docs):
        s = "val" if i < val_docs else "train"
        if buf and (s != split or len(buf) == BATCH_DOCS):
            yield split, first, buf
            buf, first = [], i
        split = s
        buf.append(text)
    if buf:
        yield split, first, buf


def encoded(batch_iter, model: str, workers: int, use_caseops: bool = False, lossless: bool = False):
    """Encode batches in order; input is read here in the main process, a bounded window at a time."""
    if workers <= 1:
        _load(model, use_caseops, lossless)
        yield from map(_encode, batch_iter)
        return
    with Pool(workers, _load, (model, use_caseops, lossless)) as pool:
        while window := list(itertools.islice(batch_iter, 4 * workers)):
            yield from pool.imap(_encode, window)


def train_tokenizer(args, prefix: Path, vocab: int) -> None:
    """Train a SentencePiece BPE model on the train split (docs after the first --val-docs); with
    --caseops on the transformed docs, lossless and with the four operators reserved (ids 4..7); with
    --lossless on the docs as they are, lossless."""
    stop = None if args.tokenizer_train_docs is None else args.val_docs + args.tokenizer_train_docs
    source = itertools.islice(read_docs(args.input, args.max_docs), args.val_docs, stop)
    if args.caseops:
        source = map(caseops.encode, source)
        text_options = dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                            user_defined_symbols=list(caseops.OPERATORS))
    elif args.lossless:
        text_options = dict(normalization_rule_name="identity", remove_extra_whitespaces=False)
    else:
        text_options = dict(normalization_rule_name="nmt_nfkc")
    seen, failure, long = [0], [], [0]

    def texts():  # sentencepiece wraps exceptions of the iterator: keep ours to re-raise it
        try:
            for t in source:
                seen[0] += 1
                long[0] += len(t.encode("utf-8")) > args.max_doc_bytes
                yield t
        except BaseException as e:
            failure.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=texts(), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab,
            byte_fallback=True, add_dummy_prefix=False, split_digits=True, **text_options,
            character_coverage=0.999, hard_vocab_limit=False,
            max_sentence_length=args.max_doc_bytes, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            num_threads=max(1, args.workers), minloglevel=2)
    except RuntimeError as e:
        if failure:
            raise failure[0] from None
        if seen[0] == 0:
            raise SystemExit(f"error: {args.input}: no train documents after the first "
                             f"--val-docs={args.val_docs} to train a tokenizer on") from None
        raise SystemExit(f"error: SentencePiece training with --vocab-size {vocab} failed: "
                         f"{' '.join(str(e).split())}") from None
    if long[0]:
        print(f"note: {long[0]:,} of {seen[0]:,} tokenizer-training documents are over --max-doc-bytes="
              f"{args.max_doc_bytes}: the tokenizer was trained without them (the shards hold them all)")


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
    p.add_argument("--max-doc-bytes", type=positive, default=4192, metavar="N",
                   help="with --vocab-size: documents longer than N UTF-8 bytes are left out of tokenizer training "
                        "(SentencePiece's max_sentence_length; default 4192, its own, as the bench tokenizers)")
    p.add_argument("--val-docs", type=positive, default=400, metavar="N",
                   help="the first N documents are the val split (default: 400 as in the bench corpus; "
                        "the FineWeb challenge split uses 50000)")
    p.add_argument("--shard-tokens", type=positive, default=100_000_000, metavar="N",
                   help="tokens per shard; documents run on across shard boundaries (default: 100000000)")
    p.add_argument("--workers", type=positive, default=os.cpu_count() or 1, metavar="N",
                   help="encoding processes (default: all CPUs)")
    p.add_argument("--max-docs", type=positive, metavar="N",
                   help="use only the first N documents of INPUT (default: all)")
    p.add_argument("--caseops", action="store_true",
                   help="CaseOps-encode the documents (data/caseops.py), use a lossless tokenizer with the four "
                        "operators reserved, and write fineweb_val_bytes_NNNNNN.bin byte sidecars")
    p.add_argument("--lossless", action="store_true",
                   help="a lossless tokenizer and byte sidecars as with --caseops, without the CaseOps transform")
    p.add_argument("--allow-small-val", action="store_true",
                   help=f"allow --val-docs below {CANONICAL_VAL_DOCS} on the FineWeb docs_selected.jsonl "
                        f"(refused by default: its canonical val split is the first {CANONICAL_VAL_DOCS} docs)")
    args = p.parse_args(argv)
    if args.vocab_size is not None and args.vocab_size > MAX_VOCAB:
        p.error(f"--vocab-size must be <= {MAX_VOCAB} (token ids are stored as uint16), got {args.vocab_size}")
    if args.shard_tokens > MAX_TOKENS:
        p.error(f"--shard-tokens must be < 2**31 (the header stores it as int32), got {args.shard_tokens}")
    if args.name is not None and (not args.name or "/" in args.name or args.name in (".", "..")):
        p.error(f"--name must be a plain folder name, got {args.name!r}")
    if args.tokenizer_train_docs is not None and args.vocab_size is None:
        p.error("--tokenizer-train-docs only applies with --vocab-size")
    if args.caseops and args.lossless:
        p.error("--caseops already implies a lossless tokenizer: pass one of --caseops and --lossless")
    return args


def run(args, stage: Path) -> None:
    if not args.input.is_file():
        raise SystemExit(f"error: INPUT {args.input}: no such file")
    if args.tokenizer is not None:
        try:
            sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer))
        except (OSError, RuntimeError) as e:
            raise SystemExit(f"error: --tokenizer {args.tokenizer}: expected a SentencePiece .model file "
                             f"({' '.join(str(e).split())})") from None
        vocab = sp.vocab_size()
        if vocab <= BOS or not sp.is_control(BOS):  # a text piece would be counted as bytes and split documents
            raise SystemExit(f"error: --tokenizer {args.tokenizer}: id {BOS} must be a control piece (the document "
                             f"separator, BOS), got {sp.id_to_piece(BOS) if vocab > BOS else None!r}")
        if vocab > MAX_VOCAB:
            raise SystemExit(f"error: --tokenizer {args.tokenizer}: {vocab} pieces, at most {MAX_VOCAB} fit uint16")
        name = args.name or f"custom_sp{vocab}"
        tok_files = [args.tokenizer.name]
        shutil.copyfile(args.tokenizer, stage / tok_files[0])
    else:
        name = args.name or f"custom_sp{args.vocab_size}"
        train_tokenizer(args, stage / f"{name}_bpe", args.vocab_size)
        tok_files = [f"{name}_bpe.model", f"{name}_bpe.vocab"]
    model = stage / tok_files[0]
    label = f"--tokenizer {args.tokenizer}" if args.tokenizer is not None else f"the trained tokenizer {tok_files[0]}"
    sidecars = args.caseops or args.lossless
    if sidecars:
        problem = caseops_model_problem(spm.SentencePieceProcessor(model_file=str(model)), args.caseops)
        if problem:
            raise SystemExit(f"error: {label} {problem}")
    input_sha256 = sha256_of(args.input)

    writers = {s: ShardWriter(stage, f"fineweb_{s}", args.shard_tokens) for s in ("val", "train")}
    if sidecars:
        writers["val_bytes"] = ShardWriter(stage, "fineweb_val_bytes", args.shard_tokens)
    n_docs = dict(val=0, train=0)
    val_bytes = 0
    docs = read_docs(args.input, args.max_docs)
    try:
        for split, n, toks, side in encoded(batches(docs, args.val_docs), str(model), args.workers, args.caseops,
                                              args.lossless):
            writers[split].write(toks)
            if side is not None:
                writers["val_bytes"].write(side)
                val_bytes += int(side.sum())
            n_docs[split] += n
    except NotLossless as e:
        for w in writers.values():
            w.discard()
        raise SystemExit(f"error: {label} is not lossless on document {e.args[0]} of {args.input} "
                         f"(0-based): {e.args[1]}") from None
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    for w in writers.values():
        w.close()
    if n_docs["train"] == 0:
        raise SystemExit(f"error: {args.input}: {n_docs['val']} documents, need more than "
                         f"--val-docs={args.val_docs} to leave a train split")
    split_info = dict(input=args.input.name, input_sha256=input_sha256, val_docs=n_docs["val"],
                      train_docs=n_docs["train"], max_docs=args.max_docs, caseops=args.caseops, lossless=sidecars,
                      tokenizer=tok_files[0])
    (stage / "split.json").write_text(json.dumps(split_info, indent=1) + "\n", encoding="utf-8")

    # Everything succeeded: move it into place and drop shards an earlier run left behind.
    ds_dir, tok_dir = args.out_dir / "datasets" / name, args.out_dir / "tokenizers"
    ds_dir.mkdir(parents=True, exist_ok=True)
    tok_dir.mkdir(parents=True, exist_ok=True)
    new = [f for w in writers.values() for f in w.files]
    for f in new + ["split.json"]:
        os.replace(stage / f, ds_dir / f)
    for f in tok_files:
        os.replace(stage / f, tok_dir / f)
    for old in sorted(ds_dir.glob("fineweb_*_*.bin")):
        if old.name not in new:
            old.unlink()
            print(f"removed stale {old}")
    for split in ("val", "train"):
        w = writers[split]
        print(f"{ds_dir}: {split} {n_docs[split]:,} docs, {w.tokens:,} tokens in {len(w.files)} shard(s)")
    if sidecars:
        print(f"{ds_dir}: val byte sidecars: {val_bytes:,} original UTF-8 bytes in "
              f"{len(writers['val_bytes'].files)} fineweb_val_bytes_*.bin")
    print(f"tokenizer: {tok_dir / tok_files[0]}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if is_fineweb_docs(args.input) and args.val_docs < CANONICAL_VAL_DOCS and not args.allow_small_val:
        raise SystemExit(f"error: {args.input.name} is the FineWeb challenge corpus, whose val split is its first "
                         f"{CANONICAL_VAL_DOCS} documents: --val-docs {args.val_docs} would train on val documents "
                         f"{args.val_docs}..{CANONICAL_VAL_DOCS - 1}; pass --val-docs {CANONICAL_VAL_DOCS} "
                         f"(or --allow-small-val for a deliberately different split)")
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
