"""Benchmark of stage 3: closed-form MS and streaming top-k against baselines measured in the same run.

(a) our MS vs the reference's literal pairwise algorithm (for each image, all later images in
    batches of 100) at N = 2,000; (b) our MS at N = 50,000, D = 768 vs one [K,N]×[N,D] float32
    matmul; (c) top_k_images vs a full argsort per neuron.

    python benchmarks/bench_ms.py            # issue sizes (N=2000,K=1024 | N=50000,K=8192)
    python benchmarks/bench_ms.py --quick    # smaller sizes, a few seconds
"""
from __future__ import annotations

import argparse
import time

import torch

from vlmsae_utils.exemplars import top_k_images
from vlmsae_utils.metrics import monosemanticity_score


def ms_reference_pairwise(activations: torch.Tensor, embeddings: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """The reference algorithm: min–max normalise, then for each image n the later images m > n in
    batches of `batch`, accumulating Σ ã_n ã_m s_nm and Σ ã_n ã_m for all neurons (float64)."""
    a = activations.double()
    lo, hi = a.min(0).values, a.max(0).values
    a = (a - lo) / (hi - lo)
    e = embeddings.double()
    e = e / e.norm(dim=1, keepdim=True)
    n, k = a.shape
    num = torch.zeros(k, dtype=torch.float64)
    den = torch.zeros(k, dtype=torch.float64)
    for i in range(n - 1):
        for s in range(i + 1, n, batch):
            sim = e[s : s + batch] @ e[i]  # [b]
            w = a[i][:, None] * a[s : s + batch].T  # [K, b]
            num += w @ sim
            den += w.sum(1)
    return num / den


def _timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_vs_reference(n: int, k: int, d: int) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(n, k, generator=g) ** 3
    e = torch.randn(n, d, generator=g) + 0.5
    t_ref, ref = _timed(lambda: ms_reference_pairwise(a, e))
    t_our, ours = _timed(lambda: monosemanticity_score(a, e), repeat=3)
    err = (ours - ref).abs().max().item()
    print(f"(a) N={n} K={k} D={d}: reference pairwise {t_ref:.2f} s, ours {t_our * 1e3:.1f} ms, "
          f"speed-up {t_ref / t_our:.0f}x, max |diff| {err:.1e}")


def bench_large(n: int, k: int, d: int) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.rand(n, k, generator=g)
    e = torch.randn(n, d, generator=g)
    a_t = a.T.contiguous()
    t_mm, _ = _timed(lambda: a_t @ e, repeat=2)
    t_our, ms = _timed(lambda: monosemanticity_score(a, e), repeat=1)
    print(f"(b) N={n} K={k} D={d}: ours {t_our:.2f} s, one [K,N]x[N,D] float32 matmul {t_mm:.2f} s, "
          f"ratio {t_our / t_mm:.2f}x (live neurons {int((~ms.isnan()).sum())})")
    kk = 16
    t_top, top = _timed(lambda: top_k_images(a, k=kk), repeat=1)
    t_sort, idx = _timed(lambda: torch.argsort(a.T, dim=1, descending=True)[:, :kk], repeat=1)
    same = bool(torch.equal(top.values, torch.gather(a.T, 1, idx)))  # values: ties may swap indices
    print(f"(c) top-{kk} N={n} K={k}: top_k_images {t_top:.2f} s, full argsort per neuron {t_sort:.2f} s, "
          f"speed-up {t_sort / t_top:.1f}x (same values: {same})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (a few seconds)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.quick:
        bench_vs_reference(600, 64, 64)
        bench_large(10_000, 512, 768)
    else:
        bench_vs_reference(2_000, 1_024, 768)
        bench_large(50_000, 8_192, 768)


if __name__ == "__main__":
    main()
