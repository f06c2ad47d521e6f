"""Do the XSA triton kernels of the packed code (scripts/pack_code.py: comments and docstrings dropped, the source
unparsed from its tree) compile to the same code as train_gpt.py's? Compiled for sm_90 without a GPU (triton's
front end and LLVM back end run on CPU); debug locations (file, line) are left out of the comparison.

usage (repository root): python3 scripts/pack_code.py -o /tmp/packed/train_gpt.py && \
    python3 results/2026-12-06_packed_code/kernels_same.py /tmp/packed/train_gpt.py
"""
import importlib.util
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def without_locations(text: str) -> list[str]:
    text = re.sub(r" loc\([^)]*\)", "", text)
    keep = [ln for ln in text.splitlines() if not ln.startswith("#loc") and ".loc" not in ln and "!DI" not in ln
            and not re.match(r"^!\d+ = ", ln) and ".file" not in ln]
    return [re.sub(r", !dbg !\d+", "", ln) for ln in keep]


KERNELS = {
    "_xsa_fwd_kernel": {"Y": "*bf16", "V": "*bf16", "O": "*bf16", "n_rows": "i32", "v_token_stride": "i32"},
    "_xsa_bwd_kernel": {"GR": "*bf16", "Y": "*bf16", "V": "*bf16", "DY": "*bf16", "DV": "*bf16", "n_rows": "i32",
                        "v_token_stride": "i32"},
}
CONSTS = {"HKV": 4, "G": 2, "HD": 64, "BLOCK": 32, "EPS": 1e-6}

sys.argv = sys.argv[:2]
modules = [load("train_gpt.py", "readable"), load(sys.argv[1], "packed")]
print(f"triton:{triton.__version__} target:sm_90")
for name, signature in KERNELS.items():
    asm = []
    for module in modules:
        src = ASTSource(fn=getattr(module, name), signature=signature | {k: "constexpr" for k in CONSTS},
                        constexprs=CONSTS)
        asm.append(triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm)
    same = {stage: without_locations(asm[0][stage]) == without_locations(asm[1][stage])
            for stage in ("ttir", "ttgir", "llir")}
    print(f"kernel:{name} " + " ".join(f"{stage}_same:{int(v)}" for stage, v in same.items()))
