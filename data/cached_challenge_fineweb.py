#!/usr/bin/env python3
"""Download the published FineWeb challenge shards and tokenizer from a Hugging Face dataset repo.

usage:
  python data/cached_challenge_fineweb.py                     # sp1024 val + 80 train shards + tokenizer
  python data/cached_challenge_fineweb.py --train-shards 0    # val shard(s) + tokenizer only
  python data/cached_challenge_fineweb.py --variant sp8192                 # from kevclark/parameter-golf
  python data/cached_challenge_fineweb.py --variant sp8192_lossless_caps_caseops_v1_reserved  # CaseOps

Remote layout (REMOTE_ROOT is --remote-root, "datasets" by default):
  REMOTE_ROOT/manifest.json
  REMOTE_ROOT/datasets/fineweb10B_{variant}/fineweb_{train,val}_NNNNNN.bin
  REMOTE_ROOT/tokenizers/fineweb_{V}_bpe.{model,vocab}
Local layout (LOCAL_DIR is --local-dir, the folder of this script by default):
  LOCAL_DIR/manifest.json, LOCAL_DIR/datasets/fineweb10B_{variant}/..., LOCAL_DIR/tokenizers/...

manifest.json lists the datasets and their shard counts. Both of these forms are read:
  {"datasets": [{"name": "fineweb10B_sp1024", "train_shards": 195, "val_shards": 1,
                 "tokenizer": "fineweb_1024_bpe.model"}]}
  {"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp1024",
                 "stats": {"files_train": 195, "files_val": 1}}],
   "tokenizers": [{"name": "sp1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                   "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}]}

--repo-id defaults to $MATCHED_FINEWEB_REPO_ID, else the repo that publishes the variant:
  sp1024 willdepueoai/parameter-golf, sp8192 kevclark/parameter-golf,
  sp8192_lossless_caps_caseops_v1_reserved romeerp/parameter-golf-caseops-v1.

CaseOps (data/caseops.py; the export of records PR #1729/#1855). Remote layout, REMOTE_ROOT "datasets":
  REMOTE_ROOT/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved/
      fineweb_train_NNNNNN.bin (80), fineweb_val_NNNNNN.bin, fineweb_val_bytes_NNNNNN.bin (one per val shard)
  REMOTE_ROOT/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model
Shard counts and tokenizer come from the manifest when it lists the dataset; when the manifest of
romeerp/parameter-golf-caseops-v1 does not, this layout is used as written (80 train, 1 val shard).
Each val shard's byte sidecar is fetched too. After download the CaseOps data is refused (an
error line, exit 1) unless: the val shards hold exactly 50,000 documents (BOS, id 1: the canonical
split; a local prep with fewer val docs trains on val documents), every val shard has its sidecar
with a valid header and the same length, and the folder holds exactly the train shards fetched
(more, e.g. 1499 of a local prep, means another export is mixed in).

Files are fetched with huggingface_hub.hf_hub_download into the standard Hugging Face cache
(it handles retries and resumes; HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE
work as usual), then hard-linked into LOCAL_DIR, or copied where a link is not possible. The
manifest is fetched again on every run, except in offline mode. Before reporting success the
script checks every shard's header and size (1024 + 2 * token count bytes).
"""
import argparse
import filecmp
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

if not __package__:  # run as a file (python3 data/cached_challenge_fineweb.py): import data.shards
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.shards import ShardError, read_header, read_shard, read_sidecar, sidecar_path, token_shards  # noqa: E402

DEFAULT_REPO = "willdepueoai/parameter-golf"
CASEOPS = "sp8192_lossless_caps_caseops_v1_reserved"
KNOWN_REPOS = {"sp1024": DEFAULT_REPO, "sp8192": "kevclark/parameter-golf", CASEOPS: "romeerp/parameter-golf-caseops-v1"}
# The published CaseOps layout, used when its repo's manifest does not list the dataset.
CASEOPS_LAYOUT = (80, 1, ["tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"])
CANONICAL_VAL_DOCS = 50_000
BOS = 1


def is_offline() -> bool:
    check = getattr(hf_constants, "is_offline_mode", None)
    return check() if check else bool(hf_constants.HF_HUB_OFFLINE)


def fetch(args, rel: str, fresh: bool = False) -> Path:
    """Download REMOTE_ROOT/rel into the HF cache and return the cached path."""
    remote = "/".join(p for p in (args.remote_root.strip("/"), rel) if p)
    try:
        path = hf_hub_download(args.repo_id, remote, repo_type="dataset", force_download=fresh)
    except Exception as e:  # huggingface_hub has many error types (HTTP, offline, cache); report each in one line
        chain = [e]  # force_download and offline lookups wrap the real cause: show it too
        while not isinstance(chain[-1], HfHubHTTPError) and chain[-1].__cause__ is not None and len(chain) < 3:
            chain.append(chain[-1].__cause__)
        why = [f"{type(x).__name__}: {' '.join(str(x).split())[:300]}" for x in chain]
        why = "; caused by ".join(w for i, w in enumerate(why) if w not in why[:i])
        raise SystemExit(f"error: cannot fetch {remote} from dataset repo {args.repo_id}: {why}") from None
    return Path(path)


def place(src: Path, dst: Path) -> None:
    """Atomically put src at dst as a hard link (or a copy when linking fails)."""
    src = src.resolve()
    if dst.exists() and (os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=True)):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def read_plan(manifest, variant: str, manifest_path: Path, repo_id: str):
    """Return (train shards available, val shards, tokenizer paths relative to REMOTE_ROOT)."""
    name = f"fineweb10B_{variant}"
    datasets = manifest.get("datasets") if isinstance(manifest, dict) else None
    if not isinstance(datasets, list):
        raise SystemExit(f'error: {manifest_path}: expected a JSON object with a "datasets" list')
    entry = next((d for d in datasets if isinstance(d, dict) and d.get("name") == name), None)
    if entry is None:
        have = ", ".join(str(d.get("name")) for d in datasets if isinstance(d, dict)) or "none"
        raise SystemExit(
            f"error: {manifest_path}: dataset {name} is not in the manifest of {repo_id} (it has: {have}); "
            f"{variant} is published in --repo-id {KNOWN_REPOS.get(variant, '<the repo that has it>')}. "
            f"If {repo_id} should have it, delete the stale local manifest {manifest_path} and rerun "
            f"without HF_HUB_OFFLINE so that a fresh one is fetched.")
    stats = entry.get("stats") if isinstance(entry.get("stats"), dict) else {}
    counts = []
    for key, stat_key in (("train_shards", "files_train"), ("val_shards", "files_val")):
        value = entry.get(key, stats.get(stat_key))
        if not isinstance(value, int) or value < 0:
            raise SystemExit(f"error: {manifest_path}: dataset {name} needs a non-negative integer "
                             f"{key} (or stats.{stat_key}), got {value!r}")
        counts.append(value)
    tok = entry.get("tokenizer") or entry.get("tokenizer_name")
    tokenizers = manifest.get("tokenizers") if isinstance(manifest.get("tokenizers"), list) else []
    tok_entry = next((t for t in tokenizers if isinstance(t, dict) and t.get("name") == tok), None)
    if tok_entry is not None:
        files = [tok_entry[k] for k in ("model_path", "vocab_path", "path") if tok_entry.get(k)]
    elif isinstance(tok, str) and tok.endswith(".model"):
        # the CaseOps export is not known to ship a .vocab (training needs only the .model)
        files = [tok] if variant == CASEOPS else [tok, tok[: -len(".model")] + ".vocab"]
    elif variant == CASEOPS:
        files = list(CASEOPS_LAYOUT[2])
    else:
        v = variant.removeprefix("sp")
        files = [f"fineweb_{v}_bpe.model", f"fineweb_{v}_bpe.vocab"]
    files = [f if "/" in f else f"tokenizers/{f}" for f in map(str, files)]
    for f in files:
        if f.startswith("/") or ".." in f.split("/"):
            raise SystemExit(f"error: {manifest_path}: tokenizer path {f!r} must stay inside the repo folder")
    return counts[0], counts[1], files


def check_shard(path: Path) -> int:
    """Return the token count of a valid shard; exit with a message naming the file otherwise."""
    try:
        return read_header(path)
    except ShardError as e:
        raise SystemExit(f"error: {e}; delete it (and its Hugging Face cache entry) and rerun") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=sorted(KNOWN_REPOS), default="sp1024",
                   help="tokenizer family to download (default: sp1024)")
    p.add_argument("--train-shards", type=int, default=80, metavar="N",
                   help="download the first N train shards, fewer if the repo has fewer; "
                        "0 = val shard(s) and tokenizer only (default: 80)")
    p.add_argument("--repo-id", default=os.environ.get("MATCHED_FINEWEB_REPO_ID"),
                   help="Hugging Face dataset repo (default: $MATCHED_FINEWEB_REPO_ID, else the variant's: "
                        + ", ".join(f"{v} {r}" for v, r in KNOWN_REPOS.items()) + ")")
    p.add_argument("--remote-root", default=os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX") or "datasets",
                   help="folder of the repo that holds manifest.json, datasets/ and tokenizers/ "
                        "(default: $MATCHED_FINEWEB_REMOTE_ROOT_PREFIX or datasets)")
    p.add_argument("--local-dir", type=Path, default=Path(__file__).resolve().parent,
                   help="where datasets/, tokenizers/ and manifest.json go (default: the folder of this script)")
    args = p.parse_args(argv)
    if args.train_shards < 0:
        p.error(f"--train-shards must be >= 0, got {args.train_shards}")
    args.repo_id = args.repo_id or KNOWN_REPOS[args.variant]
    return args


def check_caseops(ds_dir: Path, n_train: int, n_avail: int) -> None:
    """Refuse CaseOps data that is not the canonical export (one error line each)."""
    val = token_shards(ds_dir, "val")
    docs = sum(int(np.count_nonzero(np.asarray(read_shard(f)) == BOS)) for f in val)
    if docs != CANONICAL_VAL_DOCS:
        raise SystemExit(f"error: {ds_dir}: the val shards hold {docs:,} documents (BOS tokens), the canonical "
                         f"FineWeb val split is {CANONICAL_VAL_DOCS:,}: not the canonical CaseOps export (with fewer "
                         f"val docs, the rest of the val split is in train)")
    for f in val:
        try:
            read_sidecar(f)
        except ShardError as e:
            raise SystemExit(f"error: {e}; the CaseOps val bytes sidecar must match its val shard") from None
    # Shards beyond the export's count come from elsewhere (a leaky local prep writes 1499); fewer
    # fetched this time than an earlier run left is a smaller --train-shards, not a mix.
    present = token_shards(ds_dir, "train")
    foreign = [f for f in present if shard_index(f) >= n_avail]
    if foreign or len(present) > n_avail:
        raise SystemExit(f"error: {ds_dir} holds {len(present)} train shards, e.g. {(foreign or present)[-1].name}, "
                         f"but the export has {n_avail}: shards of another export are mixed in (a local prep?); "
                         f"delete the folder and rerun")
    if len(present) > n_train:
        print(f"note: {ds_dir} holds {len(present)} train shards, {n_train} fetched now (the rest from an earlier run)")


def shard_index(path: Path) -> int:
    """fineweb_train_000012.bin -> 12 (-1 for a name without the number)."""
    digits = path.stem.rpartition("_")[2]
    return int(digits) if digits.isdigit() else -1


def main(argv=None) -> None:
    args = parse_args(argv)
    local = args.local_dir.resolve()
    if local.exists() and not local.is_dir():
        raise SystemExit(f"error: --local-dir {local}: expected a folder, found a file")

    manifest_path = local / "manifest.json"
    place(fetch(args, "manifest.json", fresh=not is_offline()), manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {manifest_path}: not valid JSON ({e})") from None
    listed = any(isinstance(d, dict) and d.get("name") == f"fineweb10B_{args.variant}"
                 for d in ((manifest.get("datasets") or []) if isinstance(manifest, dict) else []))
    if args.variant == CASEOPS and not listed and args.repo_id == KNOWN_REPOS[CASEOPS]:
        print(f"note: {manifest_path} does not list fineweb10B_{CASEOPS}; using the published CaseOps layout "
              f"({CASEOPS_LAYOUT[0]} train shards, {CASEOPS_LAYOUT[1]} val shard and its byte sidecar)")
        n_avail, n_val, tok_files = CASEOPS_LAYOUT
    else:
        n_avail, n_val, tok_files = read_plan(manifest, args.variant, manifest_path, args.repo_id)
    n_train = min(args.train_shards, n_avail)
    if args.train_shards > n_avail:
        print(f"note: {args.repo_id} has only {n_avail} train shards for {args.variant}; downloading {n_train}")
    if n_val < 1:
        raise SystemExit(f"error: {manifest_path}: fineweb10B_{args.variant} lists no val shard")

    ds_rel = f"datasets/fineweb10B_{args.variant}"
    wanted = [f"{ds_rel}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
    if args.variant == CASEOPS:
        wanted += [sidecar_path(w).as_posix() for w in wanted]
    wanted += [f"{ds_rel}/fineweb_train_{i:06d}.bin" for i in range(n_train)]
    for rel in wanted + tok_files:
        place(fetch(args, rel), local / rel)

    # Check what is on disk now: every shard the training script would read must be valid.
    ds_dir = local / ds_rel
    for rel in wanted + tok_files:
        if not (local / rel).is_file():
            raise SystemExit(f"error: {local / rel}: missing after download")
    for f in sorted(ds_dir.glob("fineweb_*.bin")):
        check_shard(f)
    # train_gpt.py scores every val shard in the folder: one left by an earlier run would count as val
    stale = sorted(set(f.name for f in token_shards(ds_dir, "val")) - set(Path(r).name for r in wanted))
    if stale:
        raise SystemExit(f"error: {ds_dir} holds val shards this download did not write ({', '.join(stale[:3])}): "
                         f"the val split is {n_val} shard(s), and training scores every one there; delete them and rerun")
    tokens = {s: sum(read_header(f) for f in token_shards(ds_dir, s)) for s in ("train", "val")}
    if args.variant == CASEOPS:
        check_caseops(ds_dir, n_train, n_avail)
    present = token_shards(ds_dir, "train")
    if len(present) != n_train:
        extra = sorted(set(p.name for p in present) - set(Path(r).name for r in wanted))
        print(f"warning: {ds_dir} holds {len(present)} train shards, {n_train} requested: {len(extra)} more "
              f"from an earlier run ({extra[0]} ...); training reads them all, delete them to use "
              f"exactly {n_train}", file=sys.stderr)
    print(f"{ds_dir}: {len(present)} train shards ({tokens['train']:,} tokens) and {n_val} val shard(s) "
          f"({tokens['val']:,} tokens) OK; tokenizer: {', '.join(str(local / t) for t in tok_files)}")


if __name__ == "__main__":
    main()
