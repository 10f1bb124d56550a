"""Stage 3 metrics: the Monosemanticity Score (MS) in closed form and user-study agreement (codes: :mod:`.sparse_codes`).

MS of neuron k (Pach et al. 2025): with per-neuron min–max normalised activations ã_kn and
cosine similarities s_nm of scorer embeddings,

    MS_k = Σ_{n<m} ã_kn ã_km s_nm / Σ_{n<m} ã_kn ã_km.

With unit-normalised embeddings ê_n and q_n = ||ê_n||² (1 up to rounding):

    Σ_{n<m} ã_n ã_m s_nm = (||Σ_n ã_n ê_n||² − Σ_n ã_n² q_n) / 2
    Σ_{n<m} ã_n ã_m      = ((Σ_n ã_n)² − Σ_n ã_n²) / 2

so all neurons cost one (K×N)·(N×D) product, streamed over row batches and accumulated
in float64, in the same pass as the top-k images (:mod:`.neuron_pass`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import pandas as pd

from .neuron_pass import scan_neurons
from .sparse_codes import SparseCodes, _as_dense_2d, _check_finite, encode_to_sparse, iter_dense_batches, rows_and_dim

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
    (read once: :func:`.neuron_pass.scan_neurons`, which also gives the top-k images in the same pass).
    `embeddings`: [N, D] (or a store). `chunk_size`: rows per streamed batch (default 2048; float32
    rounding grows with it). `neuron_chunk`: neurons per pass to bound the K×D float64 sums (each
    pass re-reads a store). `matmul_dtype`: dtype of each batch product (sums accumulate in float64).
    """
    if embeddings is None:
        raise ValueError("MS needs the scorer's embeddings of the same images (one row per activation row)")
    scan = scan_neurons(
        activations,
        embeddings,
        top_k=0,
        chunk_size=chunk_size,
        device=device,
        neuron_chunk=neuron_chunk,
        matmul_dtype=matmul_dtype,
    )
    return scan.ms  # type: ignore[return-value]  # not None: embeddings were given


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
) -> pd.DataFrame:
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
