#!/usr/bin/env python3
"""Pack train_gpt.py into the self-extracting form that is shipped and counted.

usage: python3 scripts/pack_code.py [SRC=train_gpt.py] [-o OUT=build/train_gpt.py]

The source loses its comments and docstrings (ast.unparse of its syntax tree: the same program, not the same
text), is brotli-compressed and written as a latin-1 string literal, one source byte per compressed byte (base85
would add a quarter); OUT decodes it, enters it in linecache and execs it. Running OUT is running SRC (torchrun
OUT ...); train_gpt.py counts its own file, so a run from OUT logs OUT's bytes as code_bytes. Deterministic: the
same source gives the same bytes (on the same Python: pack where you run). SRC stays the canonical, readable file;
OUT is a build product (git-ignored).
"""
import argparse
import ast
import hashlib
import sys
from pathlib import Path

import brotli

# The source is compiled under a name that linecache holds (entries without an mtime are never
# evicted), so inspect.getsource works on the unpacked code: triton.jit reads each kernel's source. The name
# carries the readable source's sha256, so a run can tell whether it is the committed train_gpt.py's.
PACKED_NAME = "<packed train_gpt.py sha256:{}>"
# A str literal in a latin-1 file holds any byte but these, which take an escape.
ESCAPES = {0: b"\\x00", ord("\\"): b"\\\\", ord("'"): b"\\'", ord("\n"): b"\\n", ord("\r"): b"\\r"}


def without_docstrings(tree: ast.Module) -> ast.Module:
    """The tree with every module, class and function docstring removed (a lone one becomes `pass`)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) \
                and isinstance(node.body[0].value.value, str):
            node.body = node.body[1:] or [ast.Pass()]
    return tree


def minified(source: bytes) -> bytes:
    return ast.unparse(without_docstrings(ast.parse(source))).encode() + b"\n"


def latin1_literal(blob: bytes) -> bytes:
    """The body of a '...' str literal that, in a latin-1 source file, holds blob (one char per byte)."""
    return b"".join(ESCAPES.get(b, bytes([b])) for b in blob)


def pack(source: bytes) -> bytes:
    literal = latin1_literal(brotli.compress(minified(source), quality=11))
    name = PACKED_NAME.format(hashlib.sha256(source).hexdigest()[:16]).encode()
    return (b"# -*- coding: latin-1 -*-\nimport brotli as B,linecache as C\ns=B.decompress('" + literal
            + b"'.encode('latin-1')).decode();n='" + name + b"';C.cache[n]=(len(s),None,s.splitlines(True),n)\n"
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
    try:
        compile(source, str(src), "exec")  # refuse to pack a file that does not even parse
    except (SyntaxError, ValueError) as e:
        print(f"error: {src}: does not compile ({getattr(e, 'msg', e)}, line {getattr(e, 'lineno', '?')})",
              file=sys.stderr)
        return 2
    try:
        same = ast.dump(ast.parse(minified(source))) == ast.dump(without_docstrings(ast.parse(source)))
    except SyntaxError:
        same = False
    if not same:
        print(f"error: {src}: ast.unparse did not give back the same program on this Python", file=sys.stderr)
        return 2
    out = Path(args.out)
    packed = pack(source)
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(packed)
        tmp.replace(out)
    except OSError as e:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)  # no half-written file beside the output
        print(f"error: {out}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"packed {src} ({len(source)} bytes) -> {out} ({len(packed)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
