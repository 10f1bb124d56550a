"""Sparse SAE codes (:class:`SparseCodes`, CSR on the device) and the activation inputs every metric
accepts: tensors, arrays, SparseCodes and activation stores, read in row batches."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "SparseCodes",
    "encode_to_sparse",
    "iter_dense_batches",
    "rows_and_dim",
]


_DEFAULT_BATCH = 2048  # rows per float32 product; float64 error ≈3e-7 at N=50k (grows with it)

# ----------------------------------------------------------------------------- sparse codes


@dataclass
class SparseCodes:
    """CSR-like sparse code matrix [N, num_latents]: row n holds `values[indptr[n]:indptr[n+1]]`
    at latent ids `indices[...]`; absent entries are exactly 0 (SAE codes of a store)."""

    indptr: torch.Tensor  # [N+1] int64
    indices: torch.Tensor  # [nnz] int64
    values: torch.Tensor  # [nnz] float32
    num_latents: int

    def __post_init__(self) -> None:
        self.indptr = torch.as_tensor(self.indptr, dtype=torch.int64)
        self.indices = torch.as_tensor(self.indices, dtype=torch.int64)
        self.values = torch.as_tensor(self.values)
        if not self.values.is_floating_point():
            self.values = self.values.float()
        self.num_latents = int(self.num_latents)
        if self.indptr.ndim != 1 or self.indptr.numel() < 1 or int(self.indptr[0]) != 0:
            raise ValueError("SparseCodes.indptr must be 1-D, start at 0 and have N+1 entries")
        if self.indices.shape != self.values.shape or self.indices.ndim != 1:
            raise ValueError(
                f"SparseCodes.indices {tuple(self.indices.shape)} and values "
                f"{tuple(self.values.shape)} must be 1-D of equal length"
            )
        if int(self.indptr[-1]) != self.indices.numel():
            raise ValueError(f"SparseCodes.indptr[-1]={int(self.indptr[-1])} must equal nnz={self.indices.numel()}")
        if self.indptr.numel() > 1 and bool((self.indptr[1:] < self.indptr[:-1]).any()):
            raise ValueError("SparseCodes.indptr must be non-decreasing")
        if self.num_latents < 1:
            raise ValueError(f"SparseCodes.num_latents must be >= 1, got {self.num_latents}")
        if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= self.num_latents):
            raise ValueError(f"SparseCodes.indices must lie in [0, {self.num_latents})")

    def __len__(self) -> int:
        return self.indptr.numel() - 1

    @property
    def dim(self) -> int:
        return self.num_latents

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.num_latents)

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    def row_ids(self) -> torch.Tensor:
        """Row index of every stored entry ([nnz] int64)."""
        counts = self.indptr[1:] - self.indptr[:-1]
        return torch.repeat_interleave(torch.arange(len(self)), counts)

    def slice_rows(self, start: int, stop: int) -> SparseCodes:
        """Rows [start, stop) as a new SparseCodes (views, no copy of the big arrays)."""
        start, stop = max(0, int(start)), min(len(self), int(stop))
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        return SparseCodes(
            self.indptr[start : stop + 1] - lo,
            self.indices[lo:hi],
            self.values[lo:hi],
            self.num_latents,
        )

    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[SparseCodes]:
        """Consecutive row batches as SparseCodes (shuffle is not supported: row order matters)."""
        if shuffle:
            raise ValueError("SparseCodes.iter_batches supports shuffle=False only")
        for s in range(0, len(self), int(batch_size)):
            yield self.slice_rows(s, s + int(batch_size))

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense [N, num_latents] tensor (only for small inputs and tests)."""
        out = torch.zeros(len(self), self.num_latents, dtype=dtype)
        if self.nnz:
            out[self.row_ids(), self.indices] = self.values.to(dtype)
        return out

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> SparseCodes:
        """CSR of the non-zero entries of a dense [N, K] tensor."""
        dense = torch.as_tensor(dense)
        if dense.ndim != 2:
            raise ValueError(f"from_dense expects a 2-D tensor, got shape {tuple(dense.shape)}")
        rows, cols = torch.nonzero(dense, as_tuple=True)
        counts = torch.bincount(rows, minlength=dense.shape[0])
        indptr = torch.zeros(dense.shape[0] + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(counts, 0)
        vals = dense[rows, cols]
        return cls(indptr, cols, vals.float() if not vals.is_floating_point() else vals, dense.shape[1])

    def save(self, path: str | os.PathLike) -> Path:
        """Write to an `.npz` file atomically (temp file + os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    indptr=self.indptr.numpy(),
                    indices=self.indices.numpy(),
                    values=self.values.numpy(),
                    num_latents=np.int64(self.num_latents),
                )
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseCodes:
        """Read a file written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sparse codes file not found: {path}")
        with np.load(path) as z:
            return cls(
                torch.from_numpy(z["indptr"]),
                torch.from_numpy(z["indices"]),
                torch.from_numpy(z["values"]),
                int(z["num_latents"]),
            )


def encode_to_sparse(
    sae_encode_fn: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    num_latents: int,
    *,
    device: str | torch.device | None = "cpu",
) -> SparseCodes:
    """Encode dense activation batches (e.g. `store.iter_batches(b)`) into SparseCodes,
    keeping only non-zeros so 50,000 × 65,536 codes with L0≈20 take a few MB."""
    indptr_parts = [torch.zeros(1, dtype=torch.int64)]
    idx_parts: list[torch.Tensor] = []
    val_parts: list[torch.Tensor] = []
    offset = 0
    with torch.no_grad():
        for x in batches:
            f = sae_encode_fn(torch.as_tensor(x).to(device, non_blocking=True).float())
            if f.ndim != 2 or f.shape[1] != num_latents:
                raise ValueError(f"encode function returned shape {tuple(f.shape)}, expected [B, {num_latents}]")
            f = f.detach().float().cpu()
            if not torch.isfinite(f).all():
                raise ValueError("encode function returned non-finite codes")
            rows, cols = torch.nonzero(f, as_tuple=True)
            counts = torch.bincount(rows, minlength=f.shape[0])
            indptr_parts.append(offset + torch.cumsum(counts, 0))
            offset += int(rows.numel())
            idx_parts.append(cols)
            val_parts.append(f[rows, cols])
    indices = torch.cat(idx_parts) if idx_parts else torch.zeros(0, dtype=torch.int64)
    values = torch.cat(val_parts) if val_parts else torch.zeros(0)
    return SparseCodes(torch.cat(indptr_parts), indices, values, num_latents)


# ----------------------------------------------------------------------------- input helpers


def _is_store_like(x: Any) -> bool:
    return (
        hasattr(x, "iter_batches")
        and hasattr(x, "__len__")
        and not isinstance(x, (torch.Tensor, np.ndarray, SparseCodes))
    )


def _as_dense_2d(x: Any, name: str) -> torch.Tensor:
    """Tensor / array / store-like → 2-D tensor (stores via `to_tensor` or concatenated batches)."""
    if isinstance(x, SparseCodes):
        return x.to_dense()
    if _is_store_like(x):
        x = x.to_tensor() if hasattr(x, "to_tensor") else torch.cat(list(x.iter_batches(_DEFAULT_BATCH)))
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, ·], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    return t


def rows_and_dim(acts: Any) -> tuple[int, int]:
    """``(N, K)`` of activations given as a tensor/array, SparseCodes or a store (shared with exemplars)."""
    if isinstance(acts, (torch.Tensor, np.ndarray)):
        if acts.ndim != 2:
            raise ValueError(f"activations must be 2-D [N, K], got shape {tuple(acts.shape)}")
        return int(acts.shape[0]), int(acts.shape[1])
    if isinstance(acts, SparseCodes):
        return len(acts), acts.num_latents
    if _is_store_like(acts):
        if not hasattr(acts, "dim"):
            raise ValueError("a store-like activations object needs a `.dim` attribute")
        return len(acts), int(acts.dim)
    raise ValueError(
        f"activations must be a Tensor/ndarray [N, K], SparseCodes or a store with iter_batches; "
        f"got {type(acts).__name__}"
    )


def iter_dense_batches(acts: Any, batch: int) -> Iterator[torch.Tensor]:
    """Row batches of a dense tensor/array or of a store, in order (shared with exemplars)."""
    if isinstance(acts, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(acts)
        for s in range(0, t.shape[0], batch):
            yield t[s : s + batch]
    else:
        for b in acts.iter_batches(batch, shuffle=False):
            yield torch.as_tensor(b)


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{what} contains NaN/inf (first at index {bad})")
