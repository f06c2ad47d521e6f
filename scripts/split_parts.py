#!/usr/bin/env python3
"""Move a folder bigger than one upload's size limit to the benchmark machine in checked parts.

usage: python3 scripts/split_parts.py split SRC OUT [--max-mib 56]
       python3 scripts/split_parts.py gather PART STASH --into DEST

split (here): packs the files of SRC (e.g. FlashAttention 4's wheels, whose CUDA 13 DSL library alone
is 92 MB) into one tar stream cut into parts of at most --max-mib, as OUT/1, OUT/2, ... (OUT new or empty): each folder
holds its part and the manifest (every part's sha256, the whole stream's sha256 and size).
gather (on the benchmark machine, once per uploaded part OUT/k): checks part k against the manifest
and copies it into STASH (e.g. /tmp/parts, which must survive until the last part is there); once
every part is there, joins them, checks the whole and unpacks the files into DEST.
It prints `parts:HAVE/ALL` and, when complete, `unpacked:N dest:DEST`.

A part that is missing, corrupt or from another split is a one-line error and exit code 2; nothing is
unpacked until the whole stream checks out.
"""
import argparse
import hashlib
import io
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

MANIFEST = "manifest.json"


class PartsError(Exception):
    pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(src: Path, out: Path, max_bytes: int) -> list[Path]:
    """Tar the files directly in src (sorted, no compression: wheels are zips already) and cut the
    stream into parts; returns the part folders."""
    files = sorted(p for p in src.iterdir() if p.is_file()) if src.is_dir() else []
    if not files:
        raise PartsError(f"{src}: no files to split")
    if max_bytes < 1:
        raise PartsError(f"a part of {max_bytes} bytes: expected at least one byte")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # an earlier split's parts would stay beside
        raise PartsError(f"{out}: not an empty folder (remove it or pick another)")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            tar.add(f, arcname=f.name)
    stream = buf.getvalue()
    parts = [stream[i:i + max_bytes] for i in range(0, len(stream), max_bytes)]
    manifest = dict(total_sha256=sha256(stream), total_bytes=len(stream), files=[f.name for f in files],
                    parts=[sha256(p) for p in parts])
    dirs = []
    for k, part in enumerate(parts, 1):
        d = out / str(k)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"part_{k}.bin").write_bytes(part)
        (d / MANIFEST).write_text(json.dumps(manifest, indent=1))
        dirs.append(d)
    return dirs


def read_manifest(folder: Path) -> dict:
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise PartsError(f"{folder / MANIFEST}: missing or unreadable ({e.__class__.__name__})") from None
    if not (isinstance(m, dict) and isinstance(m.get("parts"), list) and isinstance(m.get("files"), list)
            and isinstance(m.get("total_bytes"), int) and isinstance(m.get("total_sha256"), str)):
        raise PartsError(f"{folder / MANIFEST}: not a manifest of this tool")
    return m


def gather(part_dir: Path, stash: Path, dest: Path) -> tuple[int, int, int]:
    """Stash the part in part_dir; unpack into dest once all are stashed. (have, all, unpacked files)."""
    manifest = read_manifest(part_dir)
    found = sorted(p for p in part_dir.glob("part_*.bin") if re.fullmatch(r"part_\d+\.bin", p.name))
    if len(found) != 1:
        raise PartsError(f"{part_dir}: expected one part_K.bin, found {len(found)}")
    k = int(found[0].stem.split("_")[1])
    if not 1 <= k <= len(manifest["parts"]) or sha256(found[0].read_bytes()) != manifest["parts"][k - 1]:
        raise PartsError(f"{found[0]}: does not match its manifest (corrupt, or from another split)")
    stash.mkdir(parents=True, exist_ok=True)
    if (stash / MANIFEST).exists() and read_manifest(stash) != manifest:
        raise PartsError(f"{stash}: holds parts of another split; empty it first")
    shutil.copyfile(found[0], stash / found[0].name)
    (stash / MANIFEST).write_text(json.dumps(manifest, indent=1))
    n = len(manifest["parts"])
    have = [i for i in range(1, n + 1) if (stash / f"part_{i}.bin").exists()]
    if len(have) < n:
        return len(have), n, 0
    stream = b"".join((stash / f"part_{i}.bin").read_bytes() for i in range(1, n + 1))
    if len(stream) != manifest["total_bytes"] or sha256(stream) != manifest["total_sha256"]:
        raise PartsError(f"{stash}: the joined parts do not match the manifest")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r") as tar:
        tar.extractall(dest, filter="data")
    return n, n, len(manifest["files"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("split")
    sp.add_argument("src", type=Path)
    sp.add_argument("out", type=Path)
    sp.add_argument("--max-mib", type=float, default=56.0, help="largest part in MiB (below the upload limit)")
    gp = sub.add_parser("gather")
    gp.add_argument("part", type=Path)
    gp.add_argument("stash", type=Path)
    gp.add_argument("--into", type=Path, required=True, dest="dest")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "split":
            if args.max_mib <= 0:
                raise PartsError(f"--max-mib {args.max_mib}: expected a positive size")
            for d in split(args.src, args.out, int(args.max_mib * 2**20)):
                print(f"part:{d} bytes:{sum(f.stat().st_size for f in d.iterdir())}")
        else:
            have, n, unpacked = gather(args.part, args.stash, args.dest)
            print(f"parts:{have}/{n}" + (f" unpacked:{unpacked} dest:{args.dest}" if unpacked else ""))
    except PartsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
