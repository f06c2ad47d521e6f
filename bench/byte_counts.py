#!/usr/bin/env python3
"""Which bytes does val_bpb divide by? The plain SentencePiece path against the CaseOps byte sidecar.

usage: python3 bench/byte_counts.py --caseops-data OUT/datasets/bench_sp8192_caseops
           [--docs ../shared/bench/docs.jsonl.xz] [--val-docs 400]
           [--tokenizer ../shared/bench/tokenizers/bench_8192_bpe.model]

For the first --val-docs documents (the val split) prints key:value lines:
  raw_utf8_bytes         UTF-8 bytes of the original texts
  plain_tokens           tokens of the plain tokenizer (no BOS)
  plain_lut_bytes        bytes the plain path charges (train_gpt.build_byte_lut over the stream BOS +
                         ids of each document: a piece's UTF-8 bytes, its leading U+2581 one space
                         byte except right after BOS, byte fallback 1, control/unknown 0)
  plain_decoded_bytes    UTF-8 bytes of sp.decode(ids): the normalized text the plain path models
  plain_docs_changed     documents whose decoded text differs from the original (normalization)
  plain_surface_bytes    bytes of the original text the pieces' spans cover (what a sidecar built from
                         piece surfaces of this normalizing tokenizer would charge; needs
                         sentencepiece's offset_mapping)
  caseops_docs, caseops_tokens, caseops_operator_tokens, caseops_sidecar_bytes
                         from the CaseOps val shards and fineweb_val_bytes_* sidecars of --caseops-data
  ratios of each byte count to raw_utf8_bytes
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402
from data.shards import read_shard, read_sidecar, token_shards  # noqa: E402
from data.tokenize_jsonl import read_docs  # noqa: E402

BOS = 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=Path, default=ROOT.parent / "shared" / "bench" / "docs.jsonl.xz")
    p.add_argument("--val-docs", type=int, default=400)
    p.add_argument("--tokenizer", type=Path,
                   default=ROOT.parent / "shared" / "bench" / "tokenizers" / "bench_8192_bpe.model")
    p.add_argument("--caseops-data", type=Path, required=True,
                   help="folder with the CaseOps fineweb_val_*.bin and fineweb_val_bytes_*.bin")
    args = p.parse_args(argv)

    texts = list(read_docs(args.docs, args.val_docs))  # plain, .gz or .xz; a bad line is an error naming it
    raw = sum(len(t.encode("utf-8")) for t in texts)

    sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer))
    ids = sp.encode(texts)
    stream = np.concatenate([np.concatenate([[BOS], x]) for x in ids]).astype(np.int64)
    plain_lut = int(train_gpt.build_byte_lut(sp, sp.vocab_size()).target_bytes(stream[:-1], stream[1:]).sum())
    decoded = [sp.decode(x) for x in ids]
    plain_decoded = sum(len(d.encode("utf-8")) for d in decoded)
    changed = sum(d != t for d, t in zip(decoded, texts))
    try:
        spans = sp.encode(texts, out_type="offset_mapping")
        surface = str(sum(len(t[a:b].encode("utf-8")) for t, r in zip(texts, spans) for a, b in r["offsets"]))
    except (ValueError, TypeError, RuntimeError) as e:
        surface = f"unavailable (sentencepiece {spm.__version__}: {e})"

    toks, nbytes = [], []
    for f in token_shards(args.caseops_data, "val"):
        toks.append(np.asarray(read_shard(f)))
        nbytes.append(np.asarray(read_sidecar(f)))
    if not toks:
        raise SystemExit(f"error: --caseops-data {args.caseops_data}: no fineweb_val_*.bin shards")
    toks, nbytes = np.concatenate(toks), np.concatenate(nbytes).astype(np.int64)
    side = int(nbytes.sum())
    docs = int((toks == BOS).sum())
    if docs != len(texts):  # the ratios below compare one set of documents
        raise SystemExit(f"error: --caseops-data {args.caseops_data} holds {docs} val documents, "
                         f"--docs/--val-docs gave {len(texts)}: not the same split")
    if side != raw:  # the sidecar charges each document its original bytes: equal on the same documents
        raise SystemExit(f"error: --caseops-data {args.caseops_data}: its sidecar holds {side} bytes, the "
                         f"--docs/--val-docs documents {raw}: not the same documents")

    out = dict(val_docs=len(texts), raw_utf8_bytes=raw, plain_tokens=sum(map(len, ids)),
               plain_lut_bytes=plain_lut, plain_decoded_bytes=plain_decoded, plain_docs_changed=changed,
               plain_surface_bytes=surface, caseops_docs=docs,
               caseops_tokens=int((toks != BOS).sum()), caseops_operator_tokens=int(((toks >= 4) & (toks <= 7)).sum()),
               caseops_sidecar_bytes=side,
               plain_lut_over_raw=f"{plain_lut / raw:.5f}", caseops_sidecar_over_raw=f"{side / raw:.5f}",
               caseops_sidecar_over_plain_lut=f"{side / plain_lut:.5f}")
    for k, v in out.items():
        print(f"{k}:{v}")


if __name__ == "__main__":
    main()
