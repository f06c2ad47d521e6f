#!/usr/bin/env python3
"""Pack train_gpt.py into the self-extracting form that is shipped and counted.

usage: python3 scripts/pack_code.py [SRC=train_gpt.py] [-o OUT=build/train_gpt.py]

OUT is three lines: the imports, the lzma-compressed (xz, preset 9e), base85-encoded source decoded and
entered in linecache, and its exec. Running OUT is running SRC (torchrun OUT ...); train_gpt.py counts its own
file, so a run from OUT logs OUT's bytes as code_bytes. Deterministic: the same source gives the
same bytes. SRC stays the canonical, readable file; OUT is a build product (git-ignored).
"""
import argparse
import base64
import lzma
import sys
from pathlib import Path


# The source is compiled under a name that linecache holds (entries without an mtime are never
# evicted), so inspect.getsource works on the unpacked code: triton.jit reads each kernel's source.
PACKED_NAME = b"<packed train_gpt.py>"


def pack(source: bytes) -> bytes:
    blob = lzma.compress(source, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=9 | lzma.PRESET_EXTREME)
    return (b"import lzma as L,base64 as B,linecache as C\ns=L.decompress(B.b85decode(b'" + base64.b85encode(blob)
            + b"')).decode();n='" + PACKED_NAME + b"';C.cache[n]=(len(s),None,s.splitlines(True),n)\n"
            b"exec(compile(s,n,'exec'))\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", default="train_gpt.py", help="readable source (default train_gpt.py)")
    ap.add_argument("-o", "--out", default="build/train_gpt.py", help="packed output path")
    args = ap.parse_args(argv)
    src = Path(args.src)
    if not src.is_file():
        print(f"error: {src}: source not found", file=sys.stderr)
        return 2
    source = src.read_bytes()
    compile(source, str(src), "exec")  # refuse to pack a file that does not even parse
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    packed = pack(source)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(packed)
    tmp.replace(out)
    print(f"packed {src} ({len(source)} bytes) -> {out} ({len(packed)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
