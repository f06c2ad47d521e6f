#!/usr/bin/env python3
"""What each part of an artifact costs, and what each coder makes of it (CPU, no model built).

usage: python3 bench/artifact_bytes.py ARTIFACT

One line per tensor field of 64K bytes or more: its element count, brotli-11 alone (byte-shuffled, as the
artifact packs it), the order-0 entropy of its bytes (the floor of any coder of their histogram) and whether
ARTIFACT_CODER=rans codes it. Then the whole artifact repacked under each coder: bytes and pack / unpack seconds.
"""
import sys
import time
from pathlib import Path

import brotli
import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: the repository root, once
    sys.path.insert(0, str(HERE.parent))
import train_gpt  # noqa: E402


def entropy_bytes(buf: bytes) -> float:
    counts = np.bincount(np.frombuffer(buf, np.uint8), minlength=256)
    p = counts[counts > 0] / len(buf)
    return float(-(counts[counts > 0] * np.log2(p)).sum() / 8)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    path = Path(argv[0])
    try:
        qstate, config = train_gpt.read_artifact(path)
    except train_gpt.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"artifact:{path} bytes:{path.stat().st_size}")
    for name, entry in qstate.items():
        for field, t in entry.items():
            if field == "kind" or t.numel() * t.element_size() < 65536:
                continue
            raw = train_gpt.byte_shuffle(t.contiguous().numpy().tobytes(), t.element_size())
            print(f"field:{name}.{field} kind:{entry['kind']} numel:{t.numel()} "
                  f"brotli:{len(brotli.compress(raw, quality=11))} entropy:{entropy_bytes(raw):.0f} "
                  f"rans:{int(train_gpt.rans_coded(entry['kind'], field))}")
    for coder in ("brotli", "rans"):
        t0 = time.perf_counter()
        blob = train_gpt.pack_artifact(qstate, config, coder)
        t1 = time.perf_counter()
        train_gpt.unpack_artifact(blob)
        print(f"coder:{coder} model_bytes:{len(blob)} pack:{t1 - t0:.1f}s unpack:{time.perf_counter() - t1:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
