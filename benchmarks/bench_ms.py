"""Benchmark of stage 3: closed-form MS and streaming top-k against baselines measured in the same run.

(a) our MS vs the reference's literal pairwise algorithm (for each image, all later images in
    batches of 100) at N = 2,000; (b) our MS at N = 50,000, D = 768 vs one [K,N]×[N,D] float32
    matmul; (c) top_k_images vs a full argsort per neuron, and MS + top-k in one pass
    (scan_neurons) against the same matmul; (d) uniqueness (Jaccard overlap of
    top-16 sets) by the sparse inverted index vs our former dense-in-chunks incidence product
    (kept below as the baseline) on random top-16 sets over N = 10,000 images (1 % planted
    near-duplicates), and the sparse
    method alone at K = 65,536 with its peak resident memory measured in a child process.

    python benchmarks/bench_ms.py                   # issue sizes (N=2000,K=1024 | N=50000,K=8192 | uniqueness)
    python benchmarks/bench_ms.py --quick           # smaller sizes, a few seconds
    python benchmarks/bench_ms.py --only uniqueness # section (d) alone
    python benchmarks/bench_ms.py --only ms --full-width [--device cuda]   # (b)+(c) at N=10,000, K=65,536, D=1024
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from vlmsae_utils.exemplars import top_k_images, uniqueness
from vlmsae_utils.metrics import monosemanticity_score
from vlmsae_utils.neuron_pass import scan_neurons


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
    print(
        f"(a) N={n} K={k} D={d}: reference pairwise {t_ref:.2f} s, ours {t_our * 1e3:.1f} ms, "
        f"speed-up {t_ref / t_our:.0f}x, max |diff| {err:.1e}"
    )


def time_ms_topk(n: int, k: int, d: int, device: str = "cpu", top_k: int = 16) -> dict:
    """Seconds of one [K,N]x[N,D] GEMM, MS alone, top-``top_k`` alone and both in one pass
    (`scan_neurons`) on random activations, with the results of each (for the same-results check)."""
    from vlmsae_utils.device import cuda_synchronize, resolve_device

    dev = resolve_device(device)
    g = torch.Generator().manual_seed(1)
    a = torch.rand(n, k, generator=g)
    e = torch.randn(n, d, generator=g)
    operands = {"a_t": a.T.contiguous().to(dev), "e": e.to(dev)}  # dropped after the baseline, freeing a_t

    def gemm():
        out = operands["a_t"] @ operands["e"]
        cuda_synchronize(dev)
        return out

    t_mm, _ = _timed(gemm, repeat=2)
    operands.clear()
    t_ms, ms = _timed(lambda: monosemanticity_score(a, e, device=dev), repeat=1)
    t_top, top = _timed(lambda: top_k_images(a, top_k=top_k, device=dev), repeat=1)
    t_both, both = _timed(lambda: scan_neurons(a, e, top_k=top_k, device=dev), repeat=1)
    same = bool(torch.equal(both.top.values, top.values)) and bool(torch.equal(both.ms.isnan(), ms.isnan()))
    ms_diff = (both.ms - ms).abs().nan_to_num().max().item()
    return {
        "device": str(dev), "a": a, "ms": ms, "top": top, "gemm_s": t_mm, "ms_s": t_ms, "top_s": t_top,
        "both_s": t_both, "same": same, "ms_diff": ms_diff,
    }  # fmt: skip


def bench_large(n: int, k: int, d: int, device: str = "cpu") -> None:
    """(b) MS alone, (c) top-16 alone and (b+c) both in one pass, each against one [K,N]x[N,D] GEMM."""
    r = time_ms_topk(n, k, d, device)
    t_mm, t_ms, t_top, t_both, a, top = r["gemm_s"], r["ms_s"], r["top_s"], r["both_s"], r["a"], r["top"]
    print(
        f"(b) N={n} K={k} D={d}: MS {t_ms:.2f} s, one [K,N]x[N,D] float32 matmul {t_mm:.2f} s, "
        f"ratio {t_ms / t_mm:.2f}x (live neurons {int((~r['ms'].isnan()).sum())})"
    )
    kk = top.top_k
    t_sort, idx = _timed(lambda: torch.argsort(a.T, dim=1, descending=True)[:, :kk], repeat=1)
    same = bool(torch.equal(top.values, torch.gather(a.T, 1, idx)))  # values: ties may swap indices
    del idx
    print(
        f"(c) top-{kk} N={n} K={k}: top_k_images {t_top:.2f} s, full argsort per neuron {t_sort:.2f} s, "
        f"speed-up {t_sort / t_top:.1f}x (same values: {same}); {t_top / t_mm:.2f}x one GEMM"
    )
    print(
        f"(b+c) MS and top-{kk} in one pass (scan_neurons) on {r['device']}: {t_both:.2f} s = {t_both / t_mm:.2f}x "
        f"one [K,N]x[N,D] GEMM; the two separately {t_ms + t_top:.2f} s = {(t_ms + t_top) / t_mm:.2f}x "
        f"(same results: {r['same']}, max |MS diff| {r['ms_diff']:.1e})"
    )


# ----------------------------------------------------------------------------- (d) uniqueness


def uniqueness_dense_chunks(
    indices: torch.Tensor, thresholds=(0.5, 0.8, 1.0), *, top: int = 10, chunk: int = 256
) -> dict:
    """The former ``exemplars.uniqueness`` (our own code, kept here as the baseline): a sparse
    [K, N'] incidence matrix times a dense [N', chunk] block of neurons, so every chunk forms
    dense [K, chunk] intersection and Jaccard blocks over all K² pairs."""
    ind = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
    ths = [float(t) for t in thresholds]
    kdim = ind.shape[0]
    rows = torch.arange(kdim)[:, None].expand_as(ind)
    valid = ind >= 0
    r, c = rows[valid], ind[valid]
    uimg, c = torch.unique(c, return_inverse=True)
    pair = torch.unique(r * max(1, uimg.numel()) + c)
    nimg = max(1, uimg.numel())
    r, c = pair // nimg, pair % nimg
    sizes = torch.bincount(r, minlength=kdim).to(torch.float32)
    ones = torch.ones(r.numel(), dtype=torch.float32)
    m = torch.sparse_coo_tensor(torch.stack([r, c]), ones, (kdim, nimg), check_invariants=False).coalesce()
    counts = {t: 0 for t in ths}
    n_over = 0
    max_j = torch.zeros(kdim, dtype=torch.float32)
    cand_v, cand_i, cand_j = [], [], []
    step = max(1, int(chunk))
    for c0 in range(0, kdim, step):
        c1 = min(kdim, c0 + step)
        sel = (r >= c0) & (r < c1)
        block = torch.zeros(nimg, c1 - c0)
        block[c[sel], r[sel] - c0] = 1.0
        inter = torch.sparse.mm(m, block)
        union = sizes[:, None] + sizes[None, c0:c1] - inter
        jac = torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))
        gi = torch.arange(kdim)[:, None]
        gj = torch.arange(c0, c1)[None, :]
        off_diag = gi != gj
        max_j[c0:c1] = torch.maximum(max_j[c0:c1], torch.where(off_diag, jac, 0.0).amax(0))
        upper = gi < gj
        ju = torch.where(upper, jac, torch.zeros_like(jac))
        n_over += int((ju > 0).sum())
        for t in ths:
            counts[t] += int(((ju >= t) & upper & (ju > 0)).sum())
        if top > 0:
            flat = ju.flatten()
            v, p = torch.topk(flat, min(int(top), flat.numel()))
            keep = v > 0
            cand_v.append(v[keep])
            cand_i.append(p[keep] // (c1 - c0))
            cand_j.append(p[keep] % (c1 - c0) + c0)
    top_pairs = []
    if cand_v and top > 0:
        v, i, j = torch.cat(cand_v), torch.cat(cand_i), torch.cat(cand_j)
        order = torch.argsort(v, descending=True, stable=True)[: int(top)]
        top_pairs = [(int(i[o]), int(j[o]), float(v[o])) for o in order]
    return {
        "num_neurons": kdim,
        "num_pairs": kdim * (kdim - 1) // 2,
        "num_overlapping": n_over,
        "counts": counts,
        "top_pairs": top_pairs,
        "max_jaccard": max_j,
    }


def random_top_sets(
    k: int, n: int, size: int = 16, seed: int = 0, block: int = 1024, planted: float = 0.01
) -> torch.Tensor:
    """[k, size] random sets of distinct image ids in [0, n) (seeded), built in row blocks; a
    fraction ``planted`` of the rows are near-copies of another row (0–8 of its ids redrawn) so
    that the J ≥ 0.5 / 0.8 / 1 counts are not all zero."""
    g = torch.Generator().manual_seed(seed)
    sets = torch.cat(
        [torch.rand(min(block, k - s), n, generator=g).topk(size, dim=1).indices for s in range(0, k, block)]
    )
    m = int(planted * k)
    rows = torch.randperm(k, generator=g)[: 2 * m]
    dst, src = rows[:m], rows[m:]
    copies = sets[src].clone()
    redraw = torch.rand(m, size, generator=g).argsort(1) < torch.randint(0, 9, (m, 1), generator=g)
    copies[redraw] = torch.randint(0, n, (int(redraw.sum()),), generator=g)
    sets[dst] = copies
    return sets


def _peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB: VmHWM from /proc (Linux; reset by exec, unlike
    ru_maxrss, which keeps the parent's peak across fork + exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _uniqueness_child(path: str) -> None:
    """Run in a fresh process: load the sets, time the sparse method, report peak RSS (MiB)."""
    ind = torch.load(path)
    before = _peak_rss_mib()
    t0 = time.perf_counter()
    out = uniqueness(ind)
    dt = time.perf_counter() - t0
    after = _peak_rss_mib()
    print(
        json.dumps(
            {
                "seconds": dt,
                "rss_before_mib": before,
                "rss_peak_mib": after,
                "overlapping": out["num_overlapping"],
                "counts": {str(t): v for t, v in out["counts"].items()},
            }
        )
    )


def bench_uniqueness(k_both: int, k_large: int, n: int, threads: int) -> None:
    ind = random_top_sets(k_both, n)
    t_old, old = _timed(lambda: uniqueness_dense_chunks(ind), repeat=1)
    t_new, new = _timed(lambda: uniqueness(ind), repeat=3)
    top_old, top_new = [p[2] for p in old["top_pairs"]], [p[2] for p in new["top_pairs"]]
    same = (
        old["counts"] == new["counts"]
        and old["num_overlapping"] == new["num_overlapping"]
        and torch.allclose(old["max_jaccard"], new["max_jaccard"], atol=1e-6)
        and len(top_old) == len(top_new)
        and all(abs(a - b) <= 1e-6 for a, b in zip(top_old, top_new))
    )
    print(
        f"(d) uniqueness, top-16 sets over N={n} images, K={k_both}: dense-in-chunks (former) {t_old:.2f} s, "
        f"sparse inverted index {t_new:.3f} s, speed-up {t_old / t_new:.0f}x "
        f"(same counts: {same}; {new['num_overlapping']} overlapping of {new['num_pairs']} pairs, {new['counts']})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sets.pt")
        torch.save(random_top_sets(k_large, n), path)
        cmd = [sys.executable, __file__, "--uniqueness-child", path, "--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    child = json.loads(res.stdout.strip().splitlines()[-1])
    print(
        f"(d) uniqueness K={k_large}: sparse {child['seconds']:.2f} s in a fresh process; peak resident memory "
        f"{child['rss_peak_mib']:.0f} MiB (VmHWM of the whole process: {child['rss_before_mib']:.0f} MiB after "
        f"importing torch and loading the {k_large}x16 sets, so the call added "
        f"{child['rss_peak_mib'] - child['rss_before_mib']:.0f} MiB); {child['overlapping']} overlapping of "
        f"{k_large * (k_large - 1) // 2} pairs, J>=t counts {child['counts']}"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--uniqueness-child":
        if "--threads" in sys.argv and int(sys.argv[sys.argv.index("--threads") + 1]):
            torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
        _uniqueness_child(sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (a few seconds)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--only", choices=("ms", "uniqueness"), default=None, help="run one part only")
    p.add_argument(
        "--full-width",
        action="store_true",
        help="(b)+(c) at the paper's width: N=10,000 images, K=65,536 latents, D=1024 (about 8 GB RAM)",
    )
    p.add_argument("--device", default="cpu", help="device of (b)+(c): cpu, cuda, auto")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.only != "uniqueness":
        if args.quick:
            bench_vs_reference(600, 64, 64)
            bench_large(10_000, 512, 768)
        elif args.full_width:
            bench_large(10_000, 65_536, 1_024, args.device)
        else:
            bench_vs_reference(2_000, 1_024, 768)
            bench_large(50_000, 8_192, 768, args.device)
    if args.only != "ms":
        if args.quick:
            bench_uniqueness(1_024, 8_192, 10_000, args.threads)
        else:
            bench_uniqueness(8_192, 65_536, 10_000, args.threads)


if __name__ == "__main__":
    main()
