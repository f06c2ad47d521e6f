"""LQER's low-rank fit of a GPTQ error E, plain (SVD of E, the code's) against activation-aware (SVD of E H^1/2,
which minimizes the output error tr(E H E^T) before rounding), both rounded as lqer_fit rounds (A to INT2 at the
same range, B refitted by least squares, then INT4 in groups of 64), rank 4: the output error each leaves on the
12 largest-error slices of the tiny model of ../2026-12-07_clip_search_cpu/ (trained there on first use).
Run: python3 results/2026-12-07_lqer_fit_cpu/lqer_fit.py (CPU, ~1 min)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "results" / "2026-12-07_clip_search_cpu"))
import torch  # noqa: E402

import train_gpt  # noqa: E402
from clip_search import trained  # noqa: E402

RANK, GROUP = 4, 64


def aware_factors(E: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A from the SVD of E H^1/2, rounded as lqer_fit rounds its A; B refitted to it (the least-squares B of the
    weighted problem is pinv(A) E, as in the plain one) and rounded in groups."""
    w, V = torch.linalg.eigh(H.double())
    U, S, _ = torch.linalg.svd(E.double() @ ((V * w.clamp_min(0).sqrt()) @ V.T), full_matrices=False)
    A = (U[:, :RANK] * S[:RANK]).float()
    lo, hi = -(1 << (train_gpt.LQER_A_BITS - 1)), (1 << (train_gpt.LQER_A_BITS - 1)) - 1
    scale = (A.abs().max() / train_gpt.LQER_A_RANGE).clamp_min(1e-7).half().float()
    A = torch.clamp(torch.round(A / scale), lo, hi) * scale
    B = torch.linalg.pinv(A) @ E
    codes, b_scale = train_gpt.quantize_groups(B.reshape(-1), GROUP, train_gpt.LQER_B_BITS)
    return A, (codes.float() * b_scale.float()[:, None]).reshape(-1)[:B.numel()].reshape(B.shape)


def main():
    torch.set_num_threads(2)
    saved = trained()
    state, hess, cfg = saved["state"], saved["hessians"], saved["model"]
    q = train_gpt.quantize_state(state, hess, cfg.num_layers, 6, 12.35, 7, 14.0)
    for _, name, k in train_gpt.gptq_errors(state, q)[:12]:
        rows, cols = state[name].shape[-2:]
        E = (state[name].float() - train_gpt.dequantize_gptq(q[name])).reshape(-1, rows, cols)[k]
        H = hess[train_gpt.hessian_keys(name, cfg.num_layers)[k]].float()
        error = lambda D: train_gpt.hessian_error(D, H)  # noqa: E731
        A, B = train_gpt.lqer_factors(train_gpt.lqer_fit(E, RANK, GROUP), rows, cols)
        Aw, Bw = aware_factors(E, H)
        before = error(E)
        print(f"slice:{train_gpt.slice_label(name, k, cfg.num_layers)} output_error:{before:.4e} "
              f"plain:{error(E - A @ B) / before - 1:+.2%} aware:{error(E - Aw @ Bw) / before - 1:+.2%}")


if __name__ == "__main__":
    main()
