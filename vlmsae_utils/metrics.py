"""Stage 3 metrics: the Monosemanticity Score (MS) in closed form and user-study agreement (codes: :mod:`.sparse_codes`).

MS of neuron k (Pach et al. 2025): with per-neuron min–max normalised activations ã_kn and
cosine similarities s_nm of scorer embeddings,

    MS_k = Σ_{n<m} ã_kn ã_km s_nm / Σ_{n<m} ã_kn ã_km.

With unit-normalised embeddings ê_n and q_n = ||ê_n||² (1 up to rounding):

    Σ_{n<m} ã_n ã_m s_nm = (||Σ_n ã_n ê_n||² − Σ_n ã_n² q_n) / 2
    Σ_{n<m} ã_n ã_m      = ((Σ_n ã_n)² − Σ_n ã_n²) / 2

so all neurons cost one (K×N)·(N×D) product, streamed over row batches and accumulated
in float64.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .device import resolve_device
from .sparse_codes import (
    _DEFAULT_BATCH,
    SparseCodes,
    _as_dense_2d,
    _check_finite,
    encode_to_sparse,
    iter_dense_batches,
    rows_and_dim,
)

__all__ = [
    "DEFAULT_GAP_BINS",
    "SparseCodes",
    "encode_to_sparse",
    "iter_dense_batches",
    "monosemanticity_score",
    "ms_brute_force",
    "ms_user_agreement",
    "rows_and_dim",
    "summarize_ms",
]


# ----------------------------------------------------------------------------- MS


def _unit_embeddings(
    embeddings: Any, n: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-normalised embeddings in `dtype` and q_n = ||ê_n||² of those stored values in float64."""
    e = _as_dense_2d(embeddings, "embeddings")
    if e.shape[0] != n:
        raise ValueError(
            f"embeddings have {e.shape[0]} rows but activations have {n}; MS needs one embedding "
            "per activation row (pool per-token rows to one row per image first)"
        )
    norms = torch.linalg.vector_norm(e, dim=1, dtype=torch.float64)  # NaN/inf propagate
    if not torch.isfinite(norms).all():
        _check_finite(e, "embeddings")
    zero = (norms == 0).nonzero()
    if zero.numel():
        raise ValueError(f"embedding row {int(zero[0])} has zero norm: cosine similarity is undefined")
    if dtype == torch.float64:
        e_hat = e.to(torch.float64) / norms[:, None]
    else:
        e_hat = e.to(dtype) * (1.0 / norms).to(dtype)[:, None]
    q = torch.linalg.vector_norm(e_hat, dim=1, dtype=torch.float64) ** 2
    return e_hat.to(device), q.to(device)


def _minmax_dense(acts: Any, k: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.full((k,), float("inf"), dtype=torch.float64)
    hi = torch.full((k,), float("-inf"), dtype=torch.float64)
    rows = 0
    for b in iter_dense_batches(acts, batch):
        if b.ndim != 2 or b.shape[1] != k:
            raise ValueError(f"activation batch has shape {tuple(b.shape)}, expected [B, {k}]")
        if not b.is_floating_point():
            b = b.float()
        # min/max are exact in the input dtype and propagate NaN/inf, so no separate finiteness pass.
        b_lo, b_hi = b.amin(0), b.amax(0)  # (faster than torch.aminmax on CPU)
        if not (torch.isfinite(b_lo).all() and torch.isfinite(b_hi).all()):
            _check_finite(b, f"activations (batch starting at row {rows})")
        lo = torch.minimum(lo, b_lo.to(torch.float64))
        hi = torch.maximum(hi, b_hi.to(torch.float64))
        rows += b.shape[0]
    return lo, hi


def _minmax_sparse(codes: SparseCodes) -> tuple[torch.Tensor, torch.Tensor]:
    k, n = codes.num_latents, len(codes)
    v = codes.values.to(torch.float64)
    _check_finite(v, "sparse code values")
    lo = torch.full((k,), float("inf"), dtype=torch.float64)
    hi = torch.full((k,), float("-inf"), dtype=torch.float64)
    if codes.nnz:
        lo = lo.scatter_reduce(0, codes.indices, v, reduce="amin")
        hi = hi.scatter_reduce(0, codes.indices, v, reduce="amax")
    # Implicit zeros: a latent stored on fewer than N rows also takes the value 0
    # (duplicates within a row are not expected; counting occurrences is an upper bound).
    counts = torch.bincount(codes.indices, minlength=k)
    has_zero = counts < n
    lo = torch.where(has_zero, torch.minimum(lo, torch.zeros_like(lo)), lo)
    hi = torch.where(has_zero, torch.maximum(hi, torch.zeros_like(hi)), hi)
    return lo, hi


def _finish(sum_a, sum_a2, sum_a2q, sq_norm, rng) -> torch.Tensor:
    num = (sq_norm - sum_a2q) / 2.0
    den = (sum_a * sum_a - sum_a2) / 2.0
    dead = (rng <= 0) | ~torch.isfinite(rng) | (den <= 0)
    # Relative floor: a denominator at rounding level of (Σã)² is a single active image.
    dead |= den <= 1e-12 * sum_a * sum_a
    ms = torch.where(dead, torch.full_like(num, float("nan")), num / torch.where(dead, 1.0, den))
    return ms


def _check_ms_shape(n: int, k: int, chunk_size: int | None) -> int:
    """The rows per streamed batch, after refusing fewer than 2 images, no neuron or a bad chunk size."""
    if n < 2:
        raise ValueError(f"MS needs at least 2 images (pairs), got N={n}")
    if k < 1:
        raise ValueError(f"activations must have at least one neuron, got K={k}")
    batch = int(chunk_size or _DEFAULT_BATCH)
    if batch < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return batch


def monosemanticity_score(
    activations: Any,
    embeddings: Any,
    *,
    chunk_size: int | None = None,
    device: str | torch.device | None = "auto",
    neuron_chunk: int | None = None,
    matmul_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """MS of every neuron ([K] float64, NaN for dead neurons), exactly Pach et al. 2025 via the closed form.

    `activations`: Tensor/ndarray [N, K], `SparseCodes`, or a store with `iter_batches`/`len`/`dim`
    (streamed in two passes: min/max, then accumulators). `embeddings`: [N, D] (or a store).
    `chunk_size`: rows per streamed batch (default 2048; float32 rounding grows with it). `neuron_chunk`: neurons per pass-2
    sweep to bound the K×D float64 accumulator (each sweep re-reads a store).
    `matmul_dtype`: dtype of each batch product (float32 default; sums accumulate in float64).
    """
    n, k = rows_and_dim(activations)
    batch = _check_ms_shape(n, k, chunk_size)
    dev = resolve_device(device)
    acc_dev = dev if dev.type != "mps" else torch.device("cpu")  # no float64 on MPS
    sparse = isinstance(activations, SparseCodes)
    e_dtype = torch.float64 if sparse else matmul_dtype
    e_hat, q = _unit_embeddings(embeddings, n, acc_dev if sparse else dev, e_dtype)
    q = q.to(acc_dev)

    if sparse:
        return _ms_sparse(activations, e_hat, q, batch)

    lo, hi = _minmax_dense(activations, k, batch)
    rng = hi - lo
    step = int(neuron_chunk or k)
    if step < 1:
        raise ValueError(f"neuron_chunk must be >= 1, got {neuron_chunk}")
    out = torch.empty(k, dtype=torch.float64)
    for k0 in range(0, k, step):
        k1 = min(k, k0 + step)
        kk = k1 - k0
        # Range in the working dtype from the same subtraction as the data, so the maximum maps
        # to exactly 1 and the minimum to exactly 0 (a one-image neuron then has weight sum 0).
        lo_c = lo[k0:k1].to(dev, matmul_dtype)
        rng_c = hi[k0:k1].to(dev, matmul_dtype) - lo_c
        rng_c = torch.where(rng_c > 0, rng_c, torch.ones_like(rng_c))
        s_acc = torch.zeros(kk, e_hat.shape[1], dtype=torch.float64, device=acc_dev)
        sum_a = torch.zeros(kk, dtype=torch.float64, device=acc_dev)
        sum_a2 = torch.zeros_like(sum_a)
        sum_a2q = torch.zeros_like(sum_a)
        row = 0
        a_buf: torch.Tensor | None = None  # reused work buffers: elementwise ops without fresh allocations
        a2_buf: torch.Tensor | None = None
        for b in iter_dense_batches(activations, batch):
            nb = b.shape[0]
            if row + nb > n:
                raise ValueError(f"activations yielded more rows than len()={n}")
            if a_buf is None or a2_buf is None or a_buf.shape[0] < nb:
                a_buf = torch.empty(max(nb, batch), kk, dtype=matmul_dtype, device=dev)
                a2_buf = torch.empty_like(a_buf)
            a = torch.sub(b[:, k0:k1].to(dev), lo_c, out=a_buf[:nb]).div_(rng_c)  # ã in [0, 1]
            a2 = torch.mul(a, a, out=a2_buf[:nb])
            e_b = e_hat[row : row + nb].to(matmul_dtype)
            s_acc += (a.T @ e_b).to(acc_dev, torch.float64)
            # Σ ã, Σ ã² and Σ ã² (q_n − 1) as small products; per-batch sums, accumulated in float64.
            w = torch.stack(
                [torch.ones(nb, dtype=matmul_dtype, device=dev), (q[row : row + nb] - 1.0).to(dev, matmul_dtype)]
            )
            sum_a += (w[0] @ a).to(acc_dev, torch.float64)
            sq_terms = (w @ a2).to(acc_dev, torch.float64)
            sum_a2 += sq_terms[0]
            sum_a2q += sq_terms[0] + sq_terms[1]
            row += nb
        if row != n:
            raise ValueError(f"activations yielded {row} rows but len()={n}")
        sq = s_acc.pow(2).sum(1)
        out[k0:k1] = _finish(sum_a, sum_a2, sum_a2q, sq, rng[k0:k1].to(acc_dev)).cpu()
    return out


def _ms_sparse(codes: SparseCodes, e64: torch.Tensor, q: torch.Tensor, batch: int) -> torch.Tensor:
    """MS for sparse codes: ã_kn = c_k + v_kn/r_k with c_k = −min_k/r_k (0 for non-negative codes)."""
    k, n = codes.num_latents, len(codes)
    dev = e64.device
    lo, hi = _minmax_sparse(codes)
    rng = hi - lo
    safe = torch.where(rng > 0, rng, torch.ones_like(rng)).to(dev)
    c = -lo.to(dev) / safe
    c = torch.where(rng.to(dev) > 0, c, torch.zeros_like(c))
    d_acc = torch.zeros(k, e64.shape[1], dtype=torch.float64, device=dev)  # Σ d_kn ê_n
    sum_d = torch.zeros(k, dtype=torch.float64, device=dev)
    sum_d2 = torch.zeros_like(sum_d)
    sum_dq = torch.zeros_like(sum_d)
    sum_d2q = torch.zeros_like(sum_d)
    for s in range(0, n, batch):
        part = codes.slice_rows(s, s + batch)
        if part.nnz == 0:
            continue
        rows = part.row_ids().to(dev)
        lat = part.indices.to(dev)
        d = part.values.to(dev, torch.float64) / safe[lat]
        sp = torch.sparse_coo_tensor(torch.stack([lat, rows]), d, (k, len(part)), check_invariants=False)
        d_acc += torch.sparse.mm(sp, e64[s : s + len(part)])
        qn = q[s + rows]
        sum_d.index_add_(0, lat, d)
        sum_d2.index_add_(0, lat, d * d)
        sum_dq.index_add_(0, lat, d * qn)
        sum_d2q.index_add_(0, lat, d * d * qn)
    e_sum = e64.sum(0)  # Σ ê_n
    q_sum = q.sum()
    s_vec = d_acc + c[:, None] * e_sum[None, :]
    sum_a = c * n + sum_d
    sum_a2 = c * c * n + 2 * c * sum_d + sum_d2
    sum_a2q = c * c * q_sum + 2 * c * sum_dq + sum_d2q
    return _finish(sum_a, sum_a2, sum_a2q, s_vec.pow(2).sum(1), rng.to(dev)).cpu()


def ms_brute_force(activations: Any, embeddings: Any) -> torch.Tensor:
    """Literal O(N²·K) float64 MS over all pairs n < m (reference for tests; small N only)."""
    a = _as_dense_2d(activations, "activations").to(torch.float64)
    e = _as_dense_2d(embeddings, "embeddings").to(torch.float64)
    if a.shape[0] != e.shape[0]:
        raise ValueError(f"activations have {a.shape[0]} rows, embeddings {e.shape[0]}")
    if a.shape[0] < 2:
        raise ValueError(f"MS needs at least 2 images, got N={a.shape[0]}")
    _check_finite(a, "activations")
    _check_finite(e, "embeddings")
    n = a.shape[0]
    iu, ju = torch.triu_indices(n, n, offset=1)
    e_n = e[iu]
    e_m = e[ju]
    sim = (e_n * e_m).sum(1) / (e_n.norm(dim=1) * e_m.norm(dim=1))  # s_nm for n < m
    out = torch.full((a.shape[1],), float("nan"), dtype=torch.float64)
    for k in range(a.shape[1]):
        col = a[:, k]
        lo, hi = col.min(), col.max()
        if hi <= lo:
            continue
        t = (col - lo) / (hi - lo)
        w = t[iu] * t[ju]
        den = w.sum()
        if den <= 0:
            continue
        out[k] = (w * sim).sum() / den
    return out


def summarize_ms(scores: torch.Tensor | np.ndarray, top: int = 10) -> dict:
    """Mean ± std over live neurons, dead count (NaN) and the top / bottom neuron ids."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    live = ~torch.isnan(s)
    vals = s[live]
    ids = torch.nonzero(live).flatten()
    order = torch.argsort(vals, descending=True)
    t = min(int(top), int(vals.numel()))
    return {
        "num_neurons": int(s.numel()),
        "num_dead": int((~live).sum()),
        "mean": float(vals.mean()) if vals.numel() else float("nan"),
        "std": float(vals.std(unbiased=False)) if vals.numel() else float("nan"),
        "max": float(vals.max()) if vals.numel() else float("nan"),
        "min": float(vals.min()) if vals.numel() else float("nan"),
        "top_ids": ids[order[:t]].tolist(),
        "top_scores": vals[order[:t]].tolist(),
        "bottom_ids": ids[order.flip(0)[:t]].tolist(),
        "bottom_scores": vals[order.flip(0)[:t]].tolist(),
    }


# ----------------------------------------------------------------------------- user study

DEFAULT_GAP_BINS: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
_PAIR_COLUMNS = ("k_x", "k_y", "R_user", "MS_x_dino", "MS_y_dino", "MS_x_clip", "MS_y_clip")


def _user_pairs(pairs: Any, scorer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(R_user, MS_x, MS_y)`` of a user-study pairs table (a DataFrame or a CSV path), checked."""
    import pandas as pd

    if isinstance(pairs, (str, os.PathLike)):
        p = Path(pairs)
        if not p.is_file():
            raise FileNotFoundError(f"pairs table not found: {p}")
        pairs = pd.read_csv(p)
    if not isinstance(pairs, pd.DataFrame):
        raise ValueError(f"pairs must be a pandas DataFrame or a CSV path, got {type(pairs).__name__}")
    cx, cy = f"MS_x_{scorer}", f"MS_y_{scorer}"
    missing = [c for c in ("R_user", cx, cy) if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs table lacks columns {missing}; expected {list(_PAIR_COLUMNS)} (scorer={scorer!r})")
    r = pd.to_numeric(pairs["R_user"], errors="coerce").to_numpy(float)
    mx = pd.to_numeric(pairs[cx], errors="coerce").to_numpy(float)
    my = pd.to_numeric(pairs[cy], errors="coerce").to_numpy(float)
    if np.isnan(r).any() or np.isnan(mx).any() or np.isnan(my).any():
        raise ValueError("pairs table has missing/non-numeric R_user or MS values")
    if (r < 0).any() or (r > 1).any():
        raise ValueError("R_user must be the share of raters preferring x, in [0, 1]")
    return r, mx, my


def ms_user_agreement(
    pairs: Any,
    *,
    scorer: str = "dino",
    bins: Sequence[float] = DEFAULT_GAP_BINS,
):
    """Agreement of the MS order with the human choice per bin of the MS gap (absolute MS_x − MS_y), plus overall
    (pair-weighted) and uniform-over-bins rows, like the paper's Table A1.

    `pairs`: DataFrame or path to the benchmark `pairs.csv` (k_x, k_y, R_user, MS_x_<scorer>,
    MS_y_<scorer>). `R_user` is the share of raters preferring x (0..1; > 0.5 means x);
    exact ties (0.5) and equal MS values carry no order and are dropped.
    """
    import pandas as pd

    r, mx, my = _user_pairs(pairs, scorer)
    edges = np.asarray(bins, dtype=float)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bins must be increasing edges with at least 2 values, got {list(bins)}")
    keep = (r != 0.5) & (mx != my)
    gap = np.abs(mx - my)[keep]
    agree = ((r[keep] > 0.5) == (mx[keep] > my[keep])).astype(float)
    # Bins are (lo, hi]; the first also takes gap == lo.
    which = np.searchsorted(edges, gap, side="left") - 1
    which[gap == edges[0]] = 0
    rows = []
    per_bin = []
    for i in range(edges.size - 1):
        m = which == i
        cnt = int(m.sum())
        acc = float(agree[m].mean()) if cnt else float("nan")
        if cnt:
            per_bin.append(acc)
        rows.append(
            {
                "bin": f"({edges[i]:.2g}, {edges[i + 1]:.2g}]",
                "gap_lo": edges[i],
                "gap_hi": edges[i + 1],
                "n_pairs": cnt,
                "agreement": acc,
            }
        )
    out_of_range = int(((which < 0) | (which >= edges.size - 1)).sum())
    if out_of_range:
        raise ValueError(f"{out_of_range} MS gaps fall outside the bins {list(edges)}")
    rows.append(
        {
            "bin": "overall",
            "gap_lo": edges[0],
            "gap_hi": edges[-1],
            "n_pairs": int(keep.sum()),
            "agreement": float(agree.mean()) if agree.size else float("nan"),
        }
    )
    rows.append(
        {
            "bin": "uniform over bins",
            "gap_lo": edges[0],
            "gap_hi": edges[-1],
            "n_pairs": int(keep.sum()),
            "agreement": float(np.mean(per_bin)) if per_bin else float("nan"),
        }
    )
    return pd.DataFrame(rows)
