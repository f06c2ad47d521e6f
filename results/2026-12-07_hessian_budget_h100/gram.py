"""x^T x for the GPTQ Hessians on CUDA: fp32 products (HessianRecorder until this study) against bf16 inputs
with an fp32 result (torch.mm out_dtype, the recorder after it) and plain bf16; time per product and error
against float64 of the same bf16 inputs. Run: python3 gram.py (one GPU, ~10 s)."""
import time

import torch


def ms_per_call(f, n=20) -> float:
    f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main():
    torch.manual_seed(0)
    print(torch.__version__, torch.cuda.get_device_name())
    for rows, cols in ((98304, 512), (98304, 2048)):  # one micro-batch of the default: attention and MLP-down inputs
        x = (torch.randn(rows, cols, device="cuda") * torch.linspace(0.1, 3, cols, device="cuda")).bfloat16()
        ref = x.double().T @ x.double()
        xf = x.float()
        err = lambda h: ((h.double() - ref).norm() / ref.norm()).item()
        fp32 = lambda: xf.T @ xf
        mixed = lambda: torch.mm(x.T, x, out_dtype=torch.float32)
        bf16 = lambda: x.T @ x
        print(f"rows:{rows} cols:{cols} fp32_ms:{ms_per_call(fp32):.2f} bf16in_fp32out_ms:{ms_per_call(mixed):.2f} "
              f"bf16_ms:{ms_per_call(bf16):.2f} relerr_fp32:{err(fp32()):.2e} relerr_bf16in_fp32out:{err(mixed()):.2e} "
              f"relerr_bf16:{err(bf16().float()):.2e} dtype:{mixed().dtype}")


if __name__ == "__main__":
    main()
