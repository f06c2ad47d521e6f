"""GPTQ Hessians summed in bf16 (what collect_hessians did on CUDA before b414e40: its model runs under bf16
autocast, which computes X^T X in bf16, and the running sum stayed bf16) against the fp32 sum HessianRecorder
makes now. Inputs: correlated columns with uneven scales, as activations are. Quality is measured by GPTQ's own
objective tr(E H E^T) under the fp32 Hessian.

usage: python3 results/2026-12-07_hessian_precision_cpu/hessian_precision.py   (from the repository root)
"""
import sys

import torch

sys.path.insert(0, ".")
import train_gpt  # noqa: E402


def inputs(cols: int, adds: int, rows: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    return [(torch.randn(rows, cols, generator=g) @ mix) * torch.linspace(0.2, 3, cols) for _ in range(adds)]


def bf16_sum(xs: list[torch.Tensor]) -> torch.Tensor:
    H = None
    for x in xs:
        p = x.bfloat16().T @ x.bfloat16()  # autocast's matmul: bf16 in, bf16 out
        H = p if H is None else H + p
    return H.float()


def gptq_error(W: torch.Tensor, q: torch.Tensor, s: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - train_gpt.dequantize_rows(q, s)).double()
    return torch.einsum("brc,cd,brd->", D, H.double(), D).item()


def main():
    print("cols adds rows | rel_err diag_err | min_eig fp32 bf16 | damp gptq_err_ratio codes_differ")
    for cols, adds, rows in ((512, 16, 4096), (512, 48, 4096), (2048, 16, 2048)):
        xs = inputs(cols, adds, rows, seed=cols + adds)
        rec = train_gpt.HessianRecorder()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for x in xs:
                rec(("k",), x)
        H32, Hbf = rec.hessians[("k",)] / rec.rows[("k",)], bf16_sum(xs) / rec.rows[("k",)]
        rel = ((Hbf - H32).norm() / H32.norm()).item()
        diag = ((Hbf.diagonal() - H32.diagonal()).abs() / H32.diagonal()).max().item()
        eig32, eigbf = (torch.linalg.eigvalsh(h.double()).min().item() for h in (H32, Hbf))
        W = torch.randn(2, 256, cols, generator=torch.Generator().manual_seed(1)) * 0.02
        for damp in (0.01, 0.005):
            q32, s = train_gpt.gptq_quantize(W, H32.expand(2, cols, cols), 6, 12.35, damp=damp)
            qbf, _ = train_gpt.gptq_quantize(W, Hbf.expand(2, cols, cols), 6, 12.35, damp=damp)
            ratio = gptq_error(W, qbf, s, H32) / gptq_error(W, q32, s, H32)
            print(f"{cols} {adds} {rows} | {rel:.2e} {diag:.2e} | {eig32:.2e} {eigbf:.2e} | {damp} {ratio:.4f} "
                  f"{(q32 != qbf).float().mean().item():.1%}")


if __name__ == "__main__":
    main()
