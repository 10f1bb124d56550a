"""Running top-k images of every neuron, updated batch by batch (:class:`RunningTopK`), and the
named work buffers a streaming pass reuses across batches.

The top-k images of every neuron are kept in a ``[K, k]`` buffer; a batch contributes only the
entries above each neuron's current k-th value, and the first rows are taken in doubling chunks so
that even the first batch yields about k candidates per neuron instead of all of its entries.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["RunningTopK", "TopK", "WorkBuffers", "batch_buffer", "concat_tops"]


class TopK(NamedTuple):
    """Top-k exemplars: `values` [K,k] (descending, NaN where absent), `indices` [K,k]
    (image index, −1 where absent), `count_positive` [K] (images with activation > 0)."""

    values: torch.Tensor
    indices: torch.Tensor
    count_positive: torch.Tensor

    @property
    def flagged(self) -> torch.Tensor:
        """True for neurons with fewer than ``top_k`` positive images (some slots absent)."""
        return self.count_positive < self.values.shape[1]

    @property
    def top_k(self) -> int:
        """Top images kept per neuron (slots, present or not)."""
        return int(self.values.shape[1])


def batch_buffer(dtype: torch.dtype) -> str:
    """Name of the batch-sized work buffer of a dtype, shared in turn by the top-k count and the MS shift."""
    return f"batch-{dtype}"


class WorkBuffers:
    """Work buffers reused across batches by name: a fresh large tensor costs page faults every time."""

    def __init__(self) -> None:
        self._by_name: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A ``shape`` view of the named buffer, reallocated when too small or of another layout."""
        buf = self._by_name.get(name)
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:] or buf.dtype != dtype:
            buf = self._by_name[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf[: shape[0]]


class RunningTopK:
    """The k largest positive activations of every neuron seen so far, with their image ids.

    Only activations > 0 count (Pach et al.: a neuron firing on fewer than k images has absent
    slots). Ties keep the earlier image when they fall inside the buffer; which of several equal
    values takes the last slot is unspecified (as with ``torch.topk``).
    """

    _MAX_PAD = 64  # candidates per neuron merged by one padded top-k; more are reduced by sorting first

    def __init__(self, num_neurons: int, top_k: int, device: torch.device, buffers: WorkBuffers | None = None) -> None:
        self.top_k = int(top_k)
        self.values = torch.full((num_neurons, self.top_k), float("-inf"), device=device)
        self.indices = torch.full((num_neurons, self.top_k), -1, dtype=torch.int64, device=device)
        self.count = torch.zeros(num_neurons, dtype=torch.int64, device=device)
        self.rows_seen = 0
        self._buffers = buffers or WorkBuffers()

    def _buffer(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return self._buffers.get(name, tuple(shape), dtype, self.values.device)

    def _ones(self, n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.float32, device=self.values.device)

    def threshold(self) -> torch.Tensor:
        """Per neuron, the value a new entry must exceed to enter the buffer (0 until it is full)."""
        return self.values[:, -1].clamp_min(0.0)

    def add_dense(self, block: torch.Tensor, ids: torch.Tensor) -> None:
        """Merge a dense batch ``[B, K]`` whose rows are images ``ids`` (ascending, after all earlier
        images). Rows are taken in chunks no larger than the rows seen so far (at least k)."""
        nb = block.shape[0]
        positive = torch.gt(block, 0, out=self._buffer(batch_buffer(torch.float32), block.shape, torch.float32))
        self.count += (self._ones(nb) @ positive).to(torch.int64)  # a product: faster than a bool sum
        start = 0
        while start < nb:
            size = min(nb - start, max(self.top_k, self.rows_seen))
            part = block[start : start + size]
            above = torch.gt(part, self.threshold(), out=self._buffer("above", part.shape, torch.bool))
            rows, cols = torch.nonzero(above, as_tuple=True)
            self._merge(cols, ids[start + rows], part[rows, cols].float())
            self.rows_seen += size
            start += size

    def add_entries(self, latents: torch.Tensor, images: torch.Tensor, values: torch.Tensor) -> None:
        """Merge stored (sparse) entries ``(latent, image, value)``; an image must not repeat a
        latent it already holds (one entry per (image, latent) pair)."""
        values = values.float()
        pos = values > 0
        latents, images, values = latents[pos], images[pos], values[pos]
        self.count += torch.bincount(latents, minlength=self.count.numel())
        keep = values > self.threshold()[latents]
        self._merge(latents[keep], images[keep], values[keep])

    def _merge(self, lat: torch.Tensor, img: torch.Tensor, val: torch.Tensor) -> None:
        """Fold candidates into the buffer: the touched neurons' rows padded with their candidates,
        then one top-k per row."""
        if lat.numel() == 0:
            return
        counts = torch.bincount(lat, minlength=self.count.numel())
        if int(counts.max()) > self._MAX_PAD:
            lat, img, val = _reduce_heavy(lat, img, val, counts, self._MAX_PAD, self.top_k)
            counts = torch.bincount(lat, minlength=self.count.numel())
        order = torch.argsort(lat, stable=True)  # grouped by neuron, image order kept within
        lat, img, val = lat[order], img[order], val[order]
        touched = torch.nonzero(counts).flatten()
        slot = torch.cumsum(counts > 0, 0) - 1  # neuron → its row among the touched
        width = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        col = self.top_k + torch.arange(lat.numel(), device=lat.device) - starts[lat]
        pad_v = torch.full((touched.numel(), self.top_k + width), float("-inf"), device=val.device)
        pad_i = torch.full_like(pad_v, -1, dtype=torch.int64)
        pad_v[:, : self.top_k] = self.values[touched]
        pad_i[:, : self.top_k] = self.indices[touched]
        pad_v[slot[lat], col] = val
        pad_i[slot[lat], col] = img
        top_v, pos = torch.topk(pad_v, self.top_k, dim=1, sorted=True)
        self.values[touched] = top_v
        self.indices[touched] = torch.gather(pad_i, 1, pos)

    def result(self) -> TopK:
        """The buffer as a :class:`TopK` on the CPU, absent slots as NaN / −1."""
        absent = ~torch.isfinite(self.values)
        values = self.values.masked_fill(absent, float("nan"))
        indices = self.indices.masked_fill(absent, -1)
        return TopK(values.cpu(), indices.cpu(), self.count.cpu())


def _reduce_heavy(
    lat: torch.Tensor, img: torch.Tensor, val: torch.Tensor, counts: torch.Tensor, limit: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates with the neurons holding more than ``limit`` of them cut to their own ``top_k``
    (sorted by value, descending, stable), the others unchanged."""
    heavy = (counts > limit)[lat]
    h_lat, h_img, h_val = lat[heavy], img[heavy], val[heavy]
    order = torch.argsort(h_val, descending=True, stable=True)
    order = order[torch.argsort(h_lat[order], stable=True)]
    h_lat = h_lat[order]
    h_counts = torch.bincount(h_lat, minlength=counts.numel())
    rank = torch.arange(h_lat.numel(), device=lat.device) - (torch.cumsum(h_counts, 0) - h_counts)[h_lat]
    best = order[rank < top_k]
    light = ~heavy
    return (
        torch.cat([lat[light], lat[heavy][best]]),
        torch.cat([img[light], h_img[best]]),
        torch.cat([val[light], h_val[best]]),
    )


def concat_tops(tops: list[TopK]) -> TopK:
    """The per-column-range top-k results side by side."""
    if len(tops) == 1:
        return tops[0]
    return TopK(*(torch.cat([getattr(t, f) for t in tops]) for f in TopK._fields))
