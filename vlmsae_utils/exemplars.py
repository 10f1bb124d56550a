"""Stage 3 exemplars: top activating images per neuron (streaming), image grids, uniqueness.

PAPER.md §5: the 16 highest-activating images of a neuron; a neuron that fires on fewer
than 16 images is flagged and its non-positive slots are marked absent (index −1, value
NaN) so they are never shown as exemplars.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from .metrics import SparseCodes, iter_dense_batches, rows_and_dim

__all__ = ["TopK", "top_k_images", "image_grid", "uniqueness"]

_DEFAULT_BATCH = 4096
_MAX_DENSE_ELEMS = 1 << 24  # dense batch bound when densifying sparse codes


class TopK(NamedTuple):
    """Top-k exemplars: `values` [K,k] (descending, NaN where absent), `indices` [K,k]
    (image index, −1 where absent), `count_positive` [K] (images with activation > 0)."""

    values: torch.Tensor
    indices: torch.Tensor
    count_positive: torch.Tensor

    @property
    def flagged(self) -> torch.Tensor:
        """True for neurons with fewer than k positive images (some slots absent)."""
        return self.count_positive < self.values.shape[1]

    @property
    def k(self) -> int:
        return int(self.values.shape[1])


# ----------------------------------------------------------------------------- top-k


def _check_row_index(row_image_index: Any, n: int) -> torch.Tensor:
    idx = torch.as_tensor(np.asarray(row_image_index), dtype=torch.int64).flatten()
    if idx.numel() != n:
        raise ValueError(f"row_image_index has {idx.numel()} entries, activations have {n} rows")
    if n and (int(idx.min()) < 0 or bool((idx[1:] < idx[:-1]).any())):
        raise ValueError("row_image_index must be non-negative and non-decreasing (image-major rows)")
    return idx


def _per_image_max(b: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over the rows of each image in a batch: ([n_img, K], image ids)."""
    ids, inv = torch.unique_consecutive(img, return_inverse=True)
    out = torch.full((ids.numel(), b.shape[1]), float("-inf"), dtype=b.dtype)
    out.scatter_reduce_(0, inv[:, None].expand_as(b), b, reduce="amax", include_self=True)
    return out, ids


def top_k_images(
    activations: Any,
    k: int = 16,
    *,
    row_image_index: Any = None,
    batch_size: int | None = None,
) -> TopK:
    """Top-k images per neuron in one streaming pass, O(K·k) state, sorted descending.

    `activations`: Tensor/ndarray [N, K], SparseCodes, or a store (`iter_batches`, `len`, `dim`).
    `row_image_index`: image index per row when there are several rows per image (e.g.
    `store.row_image_index()`); the maximum over an image's rows is used. Activations ≤ 0
    never count as exemplars: such slots get index −1 and value NaN.
    """
    n, kdim = rows_and_dim(activations)
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = int(k)
    img_idx = _check_row_index(row_image_index, n) if row_image_index is not None else None
    if isinstance(activations, SparseCodes):
        return _top_k_sparse(activations, k, img_idx)
    batch = int(batch_size or _DEFAULT_BATCH)
    if batch < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    vals = torch.full((kdim, k), float("-inf"), dtype=torch.float32)
    idx = torch.full((kdim, k), -1, dtype=torch.int64)
    count = torch.zeros(kdim, dtype=torch.int64)

    def merge(block: torch.Tensor, ids: torch.Tensor) -> None:
        nonlocal vals, idx
        if not torch.isfinite(block).all():
            raise ValueError("activations contain NaN/inf")
        pos = block > 0
        count.add_(pos.sum(0))
        cand = torch.where(pos, block.float(), torch.tensor(float("-inf"))).T  # [K, B]
        all_v = torch.cat([vals, cand], dim=1)
        all_i = torch.cat([idx, ids[None, :].expand(kdim, -1)], dim=1)
        top_v, pos_i = torch.topk(all_v, k, dim=1, largest=True, sorted=True)
        vals = top_v
        idx = torch.gather(all_i, 1, pos_i)

    row = 0
    carry_b: torch.Tensor | None = None
    carry_img: torch.Tensor | None = None
    for b in iter_dense_batches(activations, batch):
        if b.ndim != 2 or b.shape[1] != kdim:
            raise ValueError(f"activation batch has shape {tuple(b.shape)}, expected [B, {kdim}]")
        nb = b.shape[0]
        if row + nb > n:
            raise ValueError(f"activations yielded more rows than len()={n}")
        if img_idx is None:
            merge(b, torch.arange(row, row + nb))
        else:
            im = img_idx[row : row + nb]
            if carry_b is not None:
                b, im = torch.cat([carry_b, b.to(carry_b.dtype)]), torch.cat([carry_img, im])
            last = im[-1]
            tail = im == last  # rows of the last image may continue in the next batch
            carry_b, carry_img = b[tail], im[tail]
            if (~tail).any():
                block, ids = _per_image_max(b[~tail], im[~tail])
                merge(block, ids)
        row += nb
    if row != n:
        raise ValueError(f"activations yielded {row} rows but len()={n}")
    if carry_b is not None and carry_b.numel():
        block, ids = _per_image_max(carry_b, carry_img)
        merge(block, ids)
    absent = ~torch.isfinite(vals)
    vals = vals.masked_fill(absent, float("nan"))
    idx = idx.masked_fill(absent, -1)
    return TopK(vals, idx, count)


def _top_k_sparse(codes: SparseCodes, k: int, img_idx: torch.Tensor | None) -> TopK:
    """Top-k for sparse codes by sorting the positive stored entries (latent asc, value desc)."""
    kdim = codes.num_latents
    v = codes.values.float()
    if not torch.isfinite(v).all():
        raise ValueError("sparse code values contain NaN/inf")
    img = codes.row_ids()
    if img_idx is not None:
        img = img_idx[img]
    lat = codes.indices
    pos = v > 0
    v, img, lat = v[pos], img[pos], lat[pos]
    if img_idx is not None and v.numel():
        # Max per (image, latent) pair.
        key = img * kdim + lat
        ukey, inv = torch.unique(key, return_inverse=True)
        mv = torch.full((ukey.numel(),), float("-inf"))
        mv.scatter_reduce_(0, inv, v, reduce="amax")
        v, img, lat = mv, ukey // kdim, ukey % kdim
    count = torch.bincount(lat, minlength=kdim)
    vals = torch.full((kdim, k), float("nan"))
    idx = torch.full((kdim, k), -1, dtype=torch.int64)
    if v.numel():
        order = torch.argsort(v, descending=True, stable=True)
        order = order[torch.argsort(lat[order], stable=True)]
        lat_s = lat[order]
        starts = torch.zeros(kdim + 1, dtype=torch.int64)
        starts[1:] = torch.cumsum(count, 0)
        rank = torch.arange(lat_s.numel()) - starts[lat_s]
        keep = rank < k
        sel = order[keep]
        vals[lat_s[keep], rank[keep]] = v[sel]
        idx[lat_s[keep], rank[keep]] = img[sel]
    return TopK(vals, idx, count)


# ----------------------------------------------------------------------------- grid


def image_grid(
    images: Sequence[Any],
    values: Sequence[float] | torch.Tensor | None = None,
    title: str | None = None,
    *,
    ncols: int = 4,
    labels: Sequence[str] | None = None,
    cell_size: float = 1.8,
):
    """Matplotlib figure of a neuron's exemplars (PIL images, arrays or paths) with the
    activation value in each caption; `None`/NaN slots are drawn as empty 'absent' cells."""
    import matplotlib.pyplot as plt
    from PIL import Image

    images = list(images)
    if not images:
        raise ValueError("image_grid needs at least one image slot")
    vals = None if values is None else [float(x) for x in torch.as_tensor(values).flatten().tolist()]
    if vals is not None and len(vals) != len(images):
        raise ValueError(f"{len(vals)} values for {len(images)} images")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    ncols = max(1, min(int(ncols), len(images)))
    nrows = (len(images) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell_size * ncols, cell_size * nrows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(images):
            ax.axis("off")
            continue
        im = images[i]
        absent = im is None or (vals is not None and not np.isfinite(vals[i]))
        if absent:
            ax.set_facecolor("#eeeeee")
            ax.text(0.5, 0.5, "absent", ha="center", va="center", transform=ax.transAxes, color="#888888")
            ax.set_title("—", fontsize=8)
            continue
        if isinstance(im, (str, bytes)) or hasattr(im, "__fspath__"):
            im = Image.open(im).convert("RGB")
        ax.imshow(np.asarray(im))
        cap = [] if labels is None else [str(labels[i])]
        if vals is not None:
            cap.append(f"{vals[i]:.3g}")
        ax.set_title(" · ".join(cap), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- uniqueness


def _incidence(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Sparse 0/1 incidence [K, N'] of top-k sets over the compacted used image ids."""
    kdim = indices.shape[0]
    rows = torch.arange(kdim)[:, None].expand_as(indices)
    valid = indices >= 0
    r, c = rows[valid], indices[valid]
    uimg, c = torch.unique(c, return_inverse=True)
    pair = torch.unique(r * max(1, uimg.numel()) + c)  # set semantics: drop duplicates
    nimg = max(1, uimg.numel())
    r, c = pair // nimg, pair % nimg
    sizes = torch.bincount(r, minlength=kdim).to(torch.float32)
    return r, c, sizes, nimg


def uniqueness(
    indices: torch.Tensor | np.ndarray,
    thresholds: Sequence[float] = (0.5, 0.8, 1.0),
    *,
    top: int = 10,
    chunk: int = 256,
) -> dict:
    """Jaccard overlap J(i, j) of top-k image sets over all neuron pairs i < j, computed as a
    sparse incidence product in neuron chunks (no Python loop over pairs); −1 entries ignored.

    Returns num_pairs, num_overlapping (J > 0), counts {t: pairs with J ≥ t},
    top_pairs [(i, j, J)] (most similar first) and max_jaccard [K] (per neuron, vs any other).
    """
    ind = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
    if ind.ndim != 2:
        raise ValueError(f"indices must be 2-D [K, k], got shape {tuple(ind.shape)}")
    if (ind < -1).any():
        raise ValueError("indices must be image ids >= 0 or -1 for absent")
    ths = [float(t) for t in thresholds]
    if any(not (0.0 <= t <= 1.0) for t in ths):
        raise ValueError(f"thresholds must lie in [0, 1], got {ths}")
    kdim = ind.shape[0]
    r, c, sizes, nimg = _incidence(ind)
    ones = torch.ones(r.numel(), dtype=torch.float32)
    m = torch.sparse_coo_tensor(torch.stack([r, c]), ones, (kdim, nimg), check_invariants=False).coalesce()
    counts = {t: 0 for t in ths}
    n_over = 0
    max_j = torch.zeros(kdim, dtype=torch.float32)
    cand_v: list[torch.Tensor] = []
    cand_i: list[torch.Tensor] = []
    cand_j: list[torch.Tensor] = []
    step = max(1, int(chunk))
    for c0 in range(0, kdim, step):
        c1 = min(kdim, c0 + step)
        sel = (r >= c0) & (r < c1)
        block = torch.zeros(nimg, c1 - c0)
        block[c[sel], r[sel] - c0] = 1.0
        inter = torch.sparse.mm(m, block)  # [K, c] intersections
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
            t_k = min(int(top), flat.numel())
            v, p = torch.topk(flat, t_k)
            keep = v > 0
            cand_v.append(v[keep])
            cand_i.append((p[keep] // (c1 - c0)))
            cand_j.append((p[keep] % (c1 - c0)) + c0)
    top_pairs: list[tuple[int, int, float]] = []
    if cand_v and top > 0:
        v = torch.cat(cand_v)
        i = torch.cat(cand_i)
        j = torch.cat(cand_j)
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
