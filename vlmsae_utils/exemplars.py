"""Stage 3 exemplars: top activating images per neuron (streaming), image grids, uniqueness.

Pach et al. 2025: the 16 highest-activating images of a neuron; a neuron that fires on fewer
than 16 images is flagged and its non-positive slots are marked absent (index −1, value
NaN) so they are never shown as exemplars.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .device import resolve_device
from .neuron_pass import scan_neurons
from .running_topk import RunningTopK, TopK
from .sparse_codes import _DEFAULT_BATCH, SparseCodes, iter_dense_batches, rows_and_dim

__all__ = ["TopK", "image_grid", "top_k_images", "uniqueness"]


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
    out = torch.full((ids.numel(), b.shape[1]), float("-inf"), dtype=b.dtype, device=b.device)
    out.scatter_reduce_(0, inv[:, None].expand_as(b), b, reduce="amax", include_self=True)
    return out, ids


def top_k_images(
    activations: Any,
    top_k: int = 16,
    *,
    row_image_index: Any = None,
    batch_size: int | None = None,
    device: str | torch.device | None = "cpu",
) -> TopK:
    """Top-k images per neuron in one streaming pass, O(K·k) state, sorted descending.

    `activations`: Tensor/ndarray [N, K], SparseCodes, or a store (`iter_batches`, `len`, `dim`).
    `row_image_index`: image index per row when there are several rows per image (e.g.
    `store.row_image_index()`); the maximum over an image's rows is used. Activations ≤ 0
    never count as exemplars: such slots get index −1 and value NaN. Batches are merged on
    ``device`` (``"auto"``: CUDA when available); the result is on the CPU. With one row per
    image this is :func:`.neuron_pass.scan_neurons` without embeddings (MS and top-k in one pass).
    """
    n, kdim = rows_and_dim(activations)
    if int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if row_image_index is None:
        return scan_neurons(activations, None, top_k=int(top_k), chunk_size=batch_size, device=device).top_images()
    img_idx = _check_row_index(row_image_index, n)
    if isinstance(activations, SparseCodes):
        return _top_k_sparse_per_image(activations, int(top_k), img_idx)
    batch = _DEFAULT_BATCH if batch_size is None else int(batch_size)
    if batch < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    top = RunningTopK(kdim, int(top_k), resolve_device(device))
    for block, ids in _per_image_blocks(activations, img_idx, n, kdim, batch, top.values.device):
        if not torch.isfinite(block).all():
            raise ValueError("activations contain NaN/inf")
        top.add_dense(block, ids)
    return top.result()


def _per_image_blocks(
    activations: Any, img_idx: torch.Tensor, n: int, kdim: int, batch: int, dev: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per-image maxima ``[n_img, K]`` and their image ids, batch by batch; an image whose rows
    continue into the next batch is carried over."""
    row = 0
    carry_b: torch.Tensor | None = None
    carry_img: torch.Tensor | None = None
    for b in iter_dense_batches(activations, batch):
        b = b.to(dev, non_blocking=True)
        if b.ndim != 2 or b.shape[1] != kdim:
            raise ValueError(f"activation batch has shape {tuple(b.shape)}, expected [B, {kdim}]")
        nb = b.shape[0]
        if row + nb > n:
            raise ValueError(f"activations yielded more rows than len()={n}")
        im = img_idx[row : row + nb].to(dev)
        if carry_b is not None and carry_img is not None:
            b, im = torch.cat([carry_b, b.to(carry_b.dtype)]), torch.cat([carry_img, im])
        tail = im == im[-1]  # rows of the last image may continue in the next batch
        carry_b, carry_img = b[tail], im[tail]
        if (~tail).any():
            yield _per_image_max(b[~tail], im[~tail])
        row += nb
    if row != n:
        raise ValueError(f"activations yielded {row} rows but len()={n}")
    if carry_b is not None and carry_img is not None and carry_b.numel():
        yield _per_image_max(carry_b, carry_img)


def _top_k_sparse_per_image(codes: SparseCodes, top_k: int, img_idx: torch.Tensor) -> TopK:
    """Top-k of sparse codes with several rows per image: the maximum per (image, latent) pair first."""
    v = codes.values.float()
    if not torch.isfinite(v).all():
        raise ValueError("sparse code values contain NaN/inf")
    kdim = codes.num_latents
    img, lat = img_idx[codes.row_ids()], codes.indices
    pos = v > 0
    v, img, lat = v[pos], img[pos], lat[pos]
    top = RunningTopK(kdim, top_k, torch.device("cpu"))
    if v.numel():
        key = img * kdim + lat
        ukey, inv = torch.unique(key, return_inverse=True)
        best = torch.full((ukey.numel(),), float("-inf")).scatter_reduce_(0, inv, v, reduce="amax")
        top.add_entries(ukey % kdim, ukey // kdim, best)
    return top.result()


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


_UNIQUENESS_CHUNK = 1 << 20  # candidate pairs formed at once (a few tens of bytes each)


def _set_entries(ind: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct (neuron, image) entries of the top-k sets, −1 dropped, sorted by neuron then image."""
    kdim = ind.shape[0]
    valid = ind >= 0
    rows = torch.arange(kdim)[:, None].expand_as(ind)[valid]
    imgs = ind[valid]
    if imgs.numel() == 0:
        return rows, imgs
    span = int(imgs.max()) + 1
    key = torch.unique(rows * span + imgs)  # set semantics: a duplicated id counts once
    return key // span, key % span


def uniqueness(
    indices: torch.Tensor | np.ndarray,
    thresholds: Sequence[float] = (0.5, 0.8, 1.0),
    *,
    top: int = 10,
    chunk: int = _UNIQUENESS_CHUNK,
    drop_partial: bool = False,
    strict: bool = False,
) -> dict:
    """Jaccard overlap ``J(i, j) = |S_i ∩ S_j| / |S_i ∪ S_j|`` of the top-k image sets of all neuron
    pairs i < j, computed only for the pairs that share an image; −1 entries are ignored and a
    repeated image id counts once.

    Sparse algorithm: an inverted index image → neurons whose top set holds it; each image
    holding c neurons contributes its c(c−1)/2 neuron pairs, and counting equal pair keys
    (i·K + j) gives every non-zero intersection. Time and memory grow with Σ_images c², not K²;
    neurons are processed in blocks of about ``chunk`` candidate pairs (a block always holds
    whole neurons, so its intersections are final), vectorised within each block (torch, and
    NumPy's in-place sort of the block's int32 pair keys). Random top-16 sets over 10,000 images
    at K = 65,536 (55 M overlapping pairs): ≈ 20 s on 2 CPU cores, ≈ 0.2 GB on top of torch
    (``benchmarks/bench_ms.py``).

    Protocol options (defaults: ours, as in chapter 3):

    - ``drop_partial`` (default False): drop neurons whose set has fewer than k distinct images
      (a −1 slot: fewer than k positive images) before counting, as the paper does; pairs are
      then counted over the kept neurons only.
    - ``strict`` (default False): count pairs with J > t (the paper's and authors' convention)
      instead of J ≥ t. Either way only overlapping pairs (J > 0) are counted, so t = 0 gives
      ``num_overlapping``.

    Returns a dict: ``num_neurons`` (K, all rows), ``num_dropped`` (neurons dropped by
    ``drop_partial``), ``num_pairs`` (pairs of kept neurons), ``num_overlapping`` (pairs with
    J > 0), ``counts`` {t: pairs with J ≥ t, or J > t if ``strict``}, ``top_pairs`` [(i, j, J)]
    (most similar first, ties by (i, j)), ``max_jaccard`` [K] float32 (per neuron vs any other
    kept neuron; 0 without overlap, NaN for a dropped neuron).
    """
    ind = _check_uniqueness_input(indices, thresholds, chunk)
    ths = [float(t) for t in thresholds]
    kdim, k = ind.shape
    rows, imgs = _set_entries(ind)
    sizes = torch.bincount(rows, minlength=kdim)
    kept = sizes >= k if drop_partial else torch.ones(kdim, dtype=torch.bool)
    if drop_partial:
        keep_entry = kept[rows]
        rows, imgs = rows[keep_entry], imgs[keep_entry]
    n_kept = int(kept.sum())
    counts = {t: 0 for t in ths}
    n_over = 0
    max_j = torch.zeros(kdim, dtype=torch.float64)
    cand: list[tuple[torch.Tensor, torch.Tensor]] = []
    for gi, gj, jac in _overlapping_pairs(rows, imgs, sizes, kdim, int(chunk)):
        n_over += jac.numel()
        for t in ths:
            counts[t] += int((jac > t).sum()) if strict else int((jac >= t).sum())
        max_j.scatter_reduce_(0, gi.long(), jac, reduce="amax")
        max_j.scatter_reduce_(0, gj.long(), jac, reduce="amax")
        if top > 0:
            floor = torch.topk(jac, min(int(top), jac.numel())).values[-1]
            near = torch.nonzero(jac >= floor).flatten()  # the block's best, with all ties
            cand.append((jac[near], gi[near].long() * kdim + gj[near].long()))
    return {
        "num_neurons": kdim,
        "num_dropped": kdim - n_kept,
        "num_pairs": n_kept * (n_kept - 1) // 2,
        "num_overlapping": n_over,
        "counts": counts,
        "top_pairs": _best_pairs(cand, int(top), kdim),
        "max_jaccard": max_j.to(torch.float32).masked_fill(~kept, float("nan")),
    }


def _check_uniqueness_input(indices, thresholds: Sequence[float], chunk: int) -> torch.Tensor:
    """The top-k ids as an int64 ``[K, k]`` tensor, after checking ids, thresholds and the block size."""
    ind = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
    if ind.ndim != 2:
        raise ValueError(f"indices must be 2-D [K, k], got shape {tuple(ind.shape)}")
    if (ind < -1).any():
        raise ValueError("indices must be image ids >= 0 or -1 for absent")
    ths = [float(t) for t in thresholds]
    if any(not (0.0 <= t <= 1.0) for t in ths):
        raise ValueError(f"thresholds must lie in [0, 1], got {ths}")
    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return ind


def _overlapping_pairs(
    rows: torch.Tensor, imgs: torch.Tensor, sizes: torch.Tensor, kdim: int, step: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(i, j, J)`` of every neuron pair i < j whose sets share an image, one block of whole neurons
    (about ``step`` candidate pairs) at a time, from the inverted index image → neurons."""
    # Inverted index: entries sorted by (image, neuron); row-major entry e sits at position pos[e].
    n_ent = rows.numel()
    by_img = torch.argsort(imgs * max(1, kdim) + rows) if n_ent else torch.zeros(0, dtype=torch.int64)
    rows_by_img = rows[by_img].to(torch.int32)
    _, group = torch.unique_consecutive(imgs[by_img], return_counts=True)
    pos = torch.empty_like(by_img)
    pos[by_img] = torch.arange(n_ent)
    del by_img
    group_end = torch.repeat_interleave(torch.cumsum(group, 0), group)  # per sorted position
    partners = group_end.sub_(1).sub_(torch.arange(n_ent))[pos]  # later neurons sharing the image, per entry
    del group, group_end
    cum_load = torch.cumsum(torch.zeros(kdim, dtype=torch.int64).index_add_(0, rows, partners), 0)
    entry_end = torch.cumsum(torch.bincount(rows, minlength=kdim), 0)  # entries of neurons < i+1
    sizes_f = sizes.to(torch.float64)
    max_rows = max(1, (2**31 - 1) // max(1, kdim))  # block-local pair keys fit in int32
    r0 = 0
    while r0 < kdim:
        done = int(cum_load[r0 - 1]) if r0 else 0
        r1 = int(torch.searchsorted(cum_load, done + step, right=True))
        r1 = min(kdim, r0 + max_rows, max(r1, r0 + 1))  # whole neurons, at least one
        e0 = int(entry_end[r0 - 1]) if r0 else 0
        e1 = int(entry_end[r1 - 1])
        p = partners[e0:e1]
        n_pairs = int(p.sum()) if p.numel() else 0
        base, r0 = r0, r1
        if n_pairs == 0:
            continue
        # Pair q of entry e (neuron i, image n) is (i, the q-th later neuron holding n), found at
        # sorted position pos[e] + 1 + q. Its block-local key (i − base)·K + j fits in int32.
        idx = torch.repeat_interleave(pos[e0:e1] + 1 - (torch.cumsum(p, 0) - p), p, output_size=n_pairs)
        j = rows_by_img[idx.add_(torch.arange(n_pairs))]
        del idx
        local = ((rows[e0:e1] - base) * kdim).to(torch.int32)
        key = torch.repeat_interleave(local, p, output_size=n_pairs).add_(j)
        del j
        key.numpy().sort()  # in place: no index array (torch.sort would add 8 bytes per pair)
        key, inter = torch.unique_consecutive(key, return_counts=True)
        gi = torch.div(key, kdim, rounding_mode="floor").add_(base)
        gj = key.remainder_(kdim)
        del key
        inter_f = inter.to(torch.float64)
        del inter
        yield gi, gj, inter_f / (sizes_f[gi] + sizes_f[gj]).sub_(inter_f)


def _best_pairs(cand: list[tuple[torch.Tensor, torch.Tensor]], top: int, kdim: int) -> list[tuple[int, int, float]]:
    """The ``top`` most similar pairs of the blocks' candidates, ties by (i, j)."""
    if not cand:
        return []
    v = torch.cat([c[0] for c in cand])
    key = torch.cat([c[1] for c in cand])
    order = torch.argsort(key, stable=True)
    v, key = v[order], key[order]
    best = torch.argsort(v, descending=True, stable=True)[:top]
    return [(int(key[b]) // kdim, int(key[b]) % kdim, float(v[b])) for b in best]
