"""One streaming pass over a set of neurons' activations: the MS sums and the running top-k images
are updated from the same batch, so scoring a model reads its codes once (dense or sparse).

MS (Pach et al. 2025, closed form; see :mod:`.metrics`) needs each neuron's minimum and maximum
before it can normalise. A dense batch is therefore shifted by each neuron's *running* minimum,
and when a later batch lowers it the sums so far are rebased exactly in float64
(Σ(v + δ)² = Σv² + 2δΣv + δ²n, all terms non-negative), so no second pass is needed. Sparse
codes keep their values in memory, so their minimum and maximum come from the stored values
first (:func:`_minmax_sparse`, O(nnz)). The top-k images of every neuron are kept in a
``[K, k]`` buffer; a batch contributes only the entries above each neuron's current k-th value,
and the first rows are taken in doubling chunks so that even the first batch yields about k
candidates per neuron instead of all of its entries (:mod:`.running_topk`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from .device import resolve_device
from .running_topk import RunningTopK, TopK, WorkBuffers, batch_buffer, concat_tops
from .sparse_codes import _DEFAULT_BATCH, SparseCodes, _as_dense_2d, _check_finite, iter_dense_batches, rows_and_dim

__all__ = ["NeuronPass", "RunningTopK", "TopK", "scan_neurons"]


class NeuronPass(NamedTuple):
    """What one pass over a set of neurons gives: MS ([K] float64, NaN = dead; None without
    embeddings) and the top-k images (None when ``top_k=0``)."""

    ms: torch.Tensor | None
    top: TopK | None

    def both(self) -> tuple[torch.Tensor, TopK]:
        """MS and top images, for callers that asked for both (embeddings given, ``top_k >= 1``)."""
        if self.ms is None or self.top is None:
            raise ValueError("this pass was run without embeddings or with top_k=0; MS and top images both needed")
        return self.ms, self.top

    def top_images(self) -> TopK:
        """The top images, for callers that need them (``top_k >= 1``)."""
        if self.top is None:
            raise ValueError("this pass was run with top_k=0: no top images")
        return self.top


# ----------------------------------------------------------------------------- MS sums


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


def _finish(sum_a, sum_a2, sum_a2q, sq_norm, rng) -> torch.Tensor:
    """MS from the sums of ã, ã², ã²·q and ||Σ ã ê||²; NaN for a dead neuron (no range, no pair)."""
    num = (sq_norm - sum_a2q) / 2.0
    den = (sum_a * sum_a - sum_a2) / 2.0
    dead = (rng <= 0) | ~torch.isfinite(rng) | (den <= 0)
    # Relative floor: a denominator at rounding level of (Σã)² is a single active image.
    dead |= den <= 1e-12 * sum_a * sum_a
    return torch.where(dead, torch.full_like(num, float("nan")), num / torch.where(dead, 1.0, den))


class _DenseMSSums:
    """MS sums of dense batches for ``width`` neurons in one pass: v = a − (running minimum), the
    product Σ v ê and the moments Σv, Σv·q', Σv², Σv²·q' (q' = q − 1), rebased when the minimum falls."""

    _MAX_SHIFTS = 16  # rebases of the K×D product collected before they are applied

    def __init__(
        self,
        e_hat: torch.Tensor,
        q: torch.Tensor,
        width: int,
        acc_dev: torch.device,
        buffers: WorkBuffers | None = None,
    ) -> None:
        self.e_hat, self.q_minus_1 = e_hat, (q - 1.0).to(e_hat.device, e_hat.dtype)
        self.acc_dev, self.dtype = acc_dev, e_hat.dtype
        f64: dict[str, Any] = {"dtype": torch.float64, "device": acc_dev}
        self.lo = torch.full((width,), float("inf"), **f64)
        self.hi = torch.full((width,), float("-inf"), **f64)
        self._buffers = buffers or WorkBuffers()
        self.s = self._buffers.get("sums", (width, e_hat.shape[1]), torch.float64, acc_dev).zero_()
        self.moments = torch.zeros(4, width, **f64)  # Σv, Σv·q', Σv², Σv²·q'
        self.seen_e = torch.zeros(e_hat.shape[1], **f64)  # Σ ê and Σ q' of the rows so far
        self.seen_q = 0.0
        self.seen_n = 0
        self._shifts: list[tuple[torch.Tensor, torch.Tensor]] = []  # rank-1 rebases of s, not yet applied

    def add(self, b: torch.Tensor, lo_b: torch.Tensor, hi_b: torch.Tensor, row: int) -> None:
        """Fold a batch ``[nb, width]`` (images ``row`` … ``row + nb − 1``) into the sums."""
        nb, dev = b.shape[0], b.device
        lo_new = torch.minimum(self.lo, lo_b.to(self.acc_dev, torch.float64))
        if self.seen_n:
            self._rebase(self.lo - lo_new)
        self.lo, self.hi = lo_new, torch.maximum(self.hi, hi_b.to(self.acc_dev, torch.float64))
        v = torch.sub(
            b,
            lo_new.to(dev, self.dtype),
            out=self._buffers.get(batch_buffer(self.dtype), tuple(b.shape), self.dtype, dev),
        )
        e_b = self.e_hat[row : row + nb]
        prod = self._buffers.get("prod", tuple(self.s.shape), self.dtype, dev)
        torch.matmul(v.T, e_b, out=prod)
        self._fold(prod)
        w = torch.stack([torch.ones(nb, dtype=self.dtype, device=dev), self.q_minus_1[row : row + nb]])
        first = w @ v  # Σv, Σv·q' of the batch
        second = w @ v.mul_(v)  # Σv², Σv²·q'
        self.moments += torch.cat([first, second]).to(self.acc_dev, torch.float64)
        self.seen_e += e_b.sum(0, dtype=torch.float64).to(self.acc_dev)
        self.seen_q += float(self.q_minus_1[row : row + nb].sum(dtype=torch.float64))
        self.seen_n += nb

    def _fold(self, prod: torch.Tensor, rows: int = 2048) -> None:
        """s += prod in float64, through a small staging block (a mixed-dtype add is several times
        slower, and a full-size float64 copy costs its page faults on every call)."""
        if prod.dtype == torch.float64 and prod.device == self.acc_dev:
            self.s += prod
            return
        for r0 in range(0, prod.shape[0], rows):
            block = prod[r0 : r0 + rows]
            stage = self._buffers.get("stage", tuple(block.shape), torch.float64, self.acc_dev)
            self.s[r0 : r0 + rows] += stage.copy_(block)

    def _rebase(self, delta: torch.Tensor) -> None:
        """Shift the sums of the neurons whose minimum fell by ``delta`` > 0 (exact in float64)."""
        moved = torch.nonzero(delta > 0).flatten()
        if moved.numel() == 0:
            return
        d = delta[moved]
        s1, s1q, s2, s2q = self.moments[:, moved]
        n, q = float(self.seen_n), self.seen_q
        self.moments[:, moved] = torch.stack(
            [s1 + d * n, s1q + d * q, s2 + 2 * d * s1 + d * d * n, s2q + 2 * d * s1q + d * d * q]
        )
        # s gains δ ⊗ (Σ ê so far); such rank-1 terms are collected and applied as one product.
        self._shifts.append((torch.zeros_like(delta).index_copy_(0, moved, d), self.seen_e.clone()))
        if len(self._shifts) >= self._MAX_SHIFTS:
            self._apply_shifts()

    def _apply_shifts(self) -> None:
        """Add the collected rebases δ_j ⊗ E_j to s as one [width, J]·[J, D] float64 product."""
        if self._shifts:
            deltas = torch.stack([d for d, _ in self._shifts], dim=1)
            sums = torch.stack([e for _, e in self._shifts])
            self.s.addmm_(deltas, sums)
            self._shifts.clear()

    def finish(self) -> torch.Tensor:
        """MS of the ``width`` neurons ([width] float64, on the CPU)."""
        self._apply_shifts()
        rng = self.hi - self.lo
        # Range in the data's working dtype, from the same subtraction as v: the maximum maps to 1.
        scale = (self.hi.to(self.dtype) - self.lo.to(self.dtype)).to(torch.float64)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        s1, _, s2, s2q = self.moments  # Σv·q' is needed only to rebase Σv²·q'
        sq = torch.linalg.vector_norm(self.s, dim=1).square() / scale**2
        return _finish(s1 / scale, s2 / scale**2, (s2 + s2q) / scale**2, sq, rng).cpu()


def _minmax_sparse(codes: SparseCodes) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-latent min and max of sparse codes, the implicit zeros included (float64)."""
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
    has_zero = torch.bincount(codes.indices, minlength=k) < n
    lo = torch.where(has_zero, torch.minimum(lo, torch.zeros_like(lo)), lo)
    hi = torch.where(has_zero, torch.maximum(hi, torch.zeros_like(hi)), hi)
    return lo, hi


class _SparseMSSums:
    """MS sums of sparse codes: ã_kn = c_k + d_kn with d = v/r_k and c_k = −min_k/r_k (0 for
    non-negative codes), so only stored entries are touched (float64 throughout)."""

    def __init__(self, codes: SparseCodes, e64: torch.Tensor, q: torch.Tensor) -> None:
        dev = e64.device
        self.num_latents, self.n, self.e64, self.q = codes.num_latents, len(codes), e64, q
        lo, hi = _minmax_sparse(codes)
        self.rng = (hi - lo).to(dev)
        self.safe = torch.where(self.rng > 0, self.rng, torch.ones_like(self.rng))
        self.c = torch.where(self.rng > 0, -lo.to(dev) / self.safe, torch.zeros_like(self.safe))
        self.d_acc = torch.zeros(self.num_latents, e64.shape[1], dtype=torch.float64, device=dev)  # Σ d_kn ê_n
        self.moments = torch.zeros(4, self.num_latents, dtype=torch.float64, device=dev)  # Σd, Σd², Σd·q, Σd²·q

    def add(self, rows: torch.Tensor, lat: torch.Tensor, values: torch.Tensor, row: int, nb: int) -> None:
        """Fold the stored entries of images ``row`` … ``row + nb − 1`` (local ``rows``) into the sums."""
        d = values.to(torch.float64) / self.safe[lat]
        sp = torch.sparse_coo_tensor(torch.stack([lat, rows]), d, (self.num_latents, nb), check_invariants=False)
        self.d_acc += torch.sparse.mm(sp, self.e64[row : row + nb])
        qn = self.q[row + rows]
        for i, term in enumerate((d, d * d, d * qn, d * d * qn)):
            self.moments[i].index_add_(0, lat, term)

    def finish(self) -> torch.Tensor:
        """MS of every latent ([K] float64, on the CPU)."""
        c, n = self.c, self.n
        sum_d, sum_d2, sum_dq, sum_d2q = self.moments
        s_vec = self.d_acc + c[:, None] * self.e64.sum(0)[None, :]
        sum_a = c * n + sum_d
        sum_a2 = c * c * n + 2 * c * sum_d + sum_d2
        sum_a2q = c * c * self.q.sum() + 2 * c * sum_dq + sum_d2q
        return _finish(sum_a, sum_a2, sum_a2q, s_vec.pow(2).sum(1), self.rng).cpu()


# ----------------------------------------------------------------------------- the pass


def _check_pass_args(n: int, num_neurons: int, top_k: int, chunk_size: int | None, with_ms: bool) -> int:
    """The rows per streamed batch, after refusing bad shapes and sizes."""
    if with_ms and n < 2:
        raise ValueError(f"MS needs at least 2 images (pairs), got N={n}")
    if num_neurons < 1:
        raise ValueError(f"activations must have at least one neuron, got K={num_neurons}")
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0 (0: no exemplars), got {top_k}")
    batch = _DEFAULT_BATCH if chunk_size is None else int(chunk_size)
    if batch < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return batch


def scan_neurons(
    activations: Any,
    embeddings: Any = None,
    *,
    top_k: int = 16,
    chunk_size: int | None = None,
    device: str | torch.device | None = "auto",
    neuron_chunk: int | None = None,
    matmul_dtype: torch.dtype = torch.float32,
) -> NeuronPass:
    """MS (when ``embeddings`` are given) and the top-``top_k`` images of every neuron, from one
    pass over ``activations`` (Tensor/ndarray [N, K], :class:`SparseCodes`, or a store with
    ``iter_batches``/``len``/``dim``; one row per image). ``chunk_size``: rows per batch (default
    2048; float32 rounding grows with it). ``neuron_chunk``: neurons per pass, bounding the K×D
    float64 sums (each pass re-reads a store). ``matmul_dtype``: dtype of each batch product
    (sums accumulate in float64). Work runs on ``device``; results come back on the CPU."""
    n, num_neurons = rows_and_dim(activations)
    with_ms = embeddings is not None
    batch = _check_pass_args(n, num_neurons, top_k, chunk_size, with_ms)
    dev = resolve_device(device)
    acc_dev = dev if dev.type != "mps" else torch.device("cpu")  # no float64 on MPS
    if isinstance(activations, SparseCodes):
        e_hat, q = _unit_embeddings(embeddings, n, acc_dev, torch.float64) if with_ms else (None, None)
        return _scan_sparse(activations, e_hat, q, int(top_k), batch, acc_dev)
    e_hat, q = _unit_embeddings(embeddings, n, dev, matmul_dtype) if with_ms else (None, None)
    step = _neuron_block(activations, num_neurons, neuron_chunk)
    buffers = WorkBuffers()  # shared by the column blocks: allocated (and page-faulted) once
    parts = [
        _scan_dense_columns(
            activations, (k0, min(num_neurons, k0 + step)), e_hat, q, int(top_k), batch, (dev, acc_dev), buffers
        )
        for k0 in range(0, num_neurons, step)
    ]
    ms = torch.cat([p.ms for p in parts]) if with_ms else None  # type: ignore[misc]
    top = concat_tops([p.top for p in parts]) if top_k else None  # type: ignore[misc]
    return NeuronPass(ms, top)


_MEMORY_BLOCK = 8192  # neurons per block of an in-memory tensor: small reused buffers, same single read


def _neuron_block(activations: Any, num_neurons: int, neuron_chunk: int | None) -> int:
    """Neurons per column block: ``neuron_chunk`` if given; else blocks of an in-memory tensor (each
    element is still read once, its block's buffers stay small) and all neurons for a store (one read)."""
    if neuron_chunk is not None:
        if int(neuron_chunk) < 1:
            raise ValueError(f"neuron_chunk must be >= 1, got {neuron_chunk}")
        return int(neuron_chunk)
    in_memory = isinstance(activations, torch.Tensor) or (
        isinstance(activations, np.ndarray) and not isinstance(activations, np.memmap)
    )
    return min(num_neurons, _MEMORY_BLOCK) if in_memory else num_neurons


def _scan_dense_columns(
    activations: Any,
    columns: tuple[int, int],
    e_hat: torch.Tensor | None,
    q: torch.Tensor | None,
    top_k: int,
    batch: int,
    devices: tuple[torch.device, torch.device],
    buffers: WorkBuffers,
) -> NeuronPass:
    """One pass over the neurons ``columns`` = [k0, k1) of dense activations (``devices``: where the
    work runs, where the float64 sums live)."""
    n, k = rows_and_dim(activations)
    k0, k1 = columns
    dev, acc_dev = devices
    sums = _DenseMSSums(e_hat, q, k1 - k0, acc_dev, buffers) if e_hat is not None and q is not None else None
    top = RunningTopK(k1 - k0, top_k, dev, buffers) if top_k else None
    row = 0
    for b in iter_dense_batches(activations, batch):
        if b.ndim != 2 or b.shape[1] != k:
            raise ValueError(f"activation batch has shape {tuple(b.shape)}, expected [B, {k}]")
        nb = b.shape[0]
        if row + nb > n:
            raise ValueError(f"activations yielded more rows than len()={n}")
        part = b[:, k0:k1].to(dev, non_blocking=True)  # only this block's columns go to the device
        part = part if part.is_floating_point() else part.float()
        # min/max are exact in the input dtype and propagate NaN/inf: the batch's finiteness check.
        lo_b, hi_b = part.amin(0), part.amax(0)
        if not (torch.isfinite(lo_b).all() and torch.isfinite(hi_b).all()):
            _check_finite(part, f"activations (batch starting at row {row})")
        if sums is not None:
            sums.add(part, lo_b, hi_b, row)
        if top is not None:
            top.add_dense(part, torch.arange(row, row + nb, device=dev))
        row += nb
    if row != n:
        raise ValueError(f"activations yielded {row} rows but len()={n}")
    return NeuronPass(sums.finish() if sums is not None else None, top.result() if top is not None else None)


def _scan_sparse(
    codes: SparseCodes, e64: torch.Tensor | None, q: torch.Tensor | None, top_k: int, batch: int, dev: torch.device
) -> NeuronPass:
    """One pass over the row slices of sparse codes (values checked finite first)."""
    sums = _SparseMSSums(codes, e64, q) if e64 is not None and q is not None else None
    if sums is None:
        _check_finite(codes.values, "sparse code values")
    top = RunningTopK(codes.num_latents, top_k, dev) if top_k else None
    for s in range(0, len(codes), batch):
        part = codes.slice_rows(s, s + batch)
        if part.nnz == 0:
            continue
        rows, lat, values = part.row_ids().to(dev), part.indices.to(dev), part.values.to(dev)
        if sums is not None:
            sums.add(rows, lat, values, s, len(part))
        if top is not None:
            top.add_entries(lat, rows + s, values)
    return NeuronPass(sums.finish() if sums is not None else None, top.result() if top is not None else None)
