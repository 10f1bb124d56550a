"""Training and validation batches: which rows form each batch (a function of the seed, the step and
the batch order only) and how they reach the device (resident, or streamed in pinned chunks)."""

from __future__ import annotations

import os
import threading
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..store import TrainingData
from ..train_config import (
    BATCH_ORDERS,
    DATA_MEMORY_FRACTION,
)

__all__ = [
    "CHUNK_BATCHES",
    "CHUNK_MAX_BYTES",
    "data_fingerprint",
    "free_device_memory",
    "training_batch_rows",
]

# ----- data ---------------------------------------------------------------------------------
#
# Which rows form training batch ``s`` is a pure function of ``(seed, s, batch_order)``: by default
# the authors' one seeded permutation, cut into batches and replayed every epoch (see _IndexStream).
# How the rows reach the device — a resident copy on the device, or chunks streamed from RAM / a
# memory map — does not change them, so both paths train bit-identically and a resumed run only
# needs the step count.

#: Batches gathered at once when streaming (fewer when a chunk would exceed :data:`CHUNK_MAX_BYTES`).
CHUNK_BATCHES = 64
CHUNK_MAX_BYTES = 1 << 30


def _first_bad_rows(x: torch.Tensor, offset: int = 0, n: int = 5) -> list[int]:
    bad = (~torch.isfinite(x).all(dim=-1)).nonzero().flatten()[:n]
    return [int(i) + offset for i in bad]


def _check_finite(
    x: torch.Tensor, what: str, offset: int = 0, rows: np.ndarray | None = None, piece: int = 65536
) -> None:
    """Raise with the first bad row indices (``rows[i]`` when given, else ``offset + i``); checks in pieces."""
    for start in range(0, x.shape[0], piece):
        part = x[start : start + piece]
        if bool(torch.isfinite(part).all()):
            continue
        bad = _first_bad_rows(part, start)
        if rows is not None:
            bad = [int(rows[i]) for i in bad]
        else:
            bad = [i + offset for i in bad]
        raise ValueError(f"{what} contains NaN/inf values; first bad rows: {bad}")


def data_fingerprint(data: TrainingData) -> str:
    """Content hash of the training data: a store's manifest hash, or SHA-256 of a tensor's bytes.
    Checkpoints record it, so a run is never resumed (or a finished one reused) on other data."""
    import hashlib

    manifest = getattr(data, "manifest", None)
    if isinstance(manifest, dict) and "content_hash" in manifest:
        return "store:" + str(manifest["content_hash"])
    batches = [data] if isinstance(data, torch.Tensor) else data.iter_batches(65536)
    digest = hashlib.sha256(str((len(data), _data_dim(data))).encode())
    for batch in batches:  # a tensor, or a store-like object without a manifest: hash the rows in order
        array = torch.as_tensor(batch).detach().cpu().float().contiguous()
        digest.update(array.view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    return "rows:" + digest.hexdigest()


def _data_dim(data: TrainingData) -> int:
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise ValueError(f"data tensor must be [N, d], got shape {tuple(data.shape)}")
        return int(data.shape[1])
    if hasattr(data, "dim") and hasattr(data, "iter_batches"):
        return int(data.dim)
    raise ValueError(f"data must be a torch.Tensor [N, d] or an ActivationStore, got {type(data).__name__}")


def _available_ram() -> int:
    """Bytes of RAM available to this process without swapping."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def free_device_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA's free memory, or the RAM available for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return _available_ram()


class _RowSource:
    """Random row access, in the storage dtype, to a tensor ``[N, d]`` or an ActivationStore.

    Stores are read through their shard memory maps (``arrays()``); a duck-typed store without
    them is read into RAM once with ``to_tensor()``."""

    def __init__(self, data: TrainingData) -> None:
        self.dim = _data_dim(data)
        self.arrays: list[np.ndarray] = []  # the shards' memory maps, when read from a store
        self.tensor: torch.Tensor | None
        storage = getattr(data, "dtype", None)  # an ActivationStore's on-disk dtype name
        if isinstance(data, torch.Tensor):
            self.tensor = data
        elif hasattr(data, "arrays") and isinstance(storage, str):
            self.tensor = None
            self.arrays = data.arrays()
            self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
            self.np_dtype = np.dtype(storage)
        else:
            self.tensor = data.to_tensor()
        if self.tensor is not None:
            self.dtype = self.tensor.dtype
            self.n_rows = int(self.tensor.shape[0])
        else:
            self.dtype = torch.from_numpy(np.empty(0, self.np_dtype)).dtype
            self.n_rows = int(self.offsets[-1])
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.dim * self.itemsize

    def gather(self, rows: np.ndarray, pin: bool = False) -> torch.Tensor:
        """Rows ``rows`` (sorted ascending for memory-map locality) as a CPU tensor in the storage dtype."""
        out = torch.empty((len(rows), self.dim), dtype=self.dtype, pin_memory=pin)
        if self.tensor is not None:
            idx = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
            if self.tensor.device.type == "cpu":
                torch.index_select(self.tensor, 0, idx, out=out)
            else:
                out.copy_(self.tensor.index_select(0, idx.to(self.tensor.device)))
            return out
        view = out.numpy()
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        bounds = np.searchsorted(shard, np.arange(len(self.arrays) + 1))
        for s, array in enumerate(self.arrays):
            a, b = int(bounds[s]), int(bounds[s + 1])
            if a == b:
                continue
            local = rows[a:b] - self.offsets[s]
            if int(local[-1]) - int(local[0]) == b - a - 1:  # a contiguous range: plain slice
                view[a:b] = array[int(local[0]) : int(local[-1]) + 1]
            else:
                np.take(array, local, axis=0, out=view[a:b], mode="clip")  # indices are valid; "clip" avoids a buffer
        return out

    def load(self, device: torch.device, what: str) -> torch.Tensor:
        """All rows on ``device`` in the storage dtype (the tensor itself when it is already there);
        a store is copied in pieces through pinned memory and checked for NaN/inf on the way."""
        if self.tensor is not None:
            return self.tensor.to(device)
        pin = device.type == "cuda"
        out = torch.empty((self.n_rows, self.dim), dtype=self.dtype, device=device)
        piece = max(1, (256 << 20) // max(1, self.dim * self.itemsize))
        for start in range(0, self.n_rows, piece):
            stop = min(self.n_rows, start + piece)
            out[start:stop].copy_(self.gather(np.arange(start, stop), pin=pin), non_blocking=pin)
            _check_finite(out[start:stop], what, offset=start)  # on the device (fast on a GPU)
        return out


class _IndexStream:
    """Rows of training batches, a function of ``(seed, step)`` only (see :data:`BATCH_ORDERS`).

    ``"cycled"`` (the authors'): one permutation ``numpy.random.default_rng([seed, 0, 0]).permutation(N)``
    cut into ``ceil(N / B)`` batches, the last one short, replayed every epoch (``itertools.cycle``
    over a shuffled ``DataLoader`` replays its first pass). ``"reshuffled"``: batch ``s`` is positions
    ``[s·B, (s+1)·B)`` of the concatenated per-epoch permutations ``default_rng([seed, 0, e])``, every
    batch full."""

    def __init__(self, n_rows: int, batch_size: int, seed: int, order: str = "cycled"):
        if order not in BATCH_ORDERS:
            raise ValueError(f"batch_order must be one of {BATCH_ORDERS}, got {order!r}")
        self.n_rows, self.batch_size, self.seed = int(n_rows), int(batch_size), int(seed) % 2**63
        self.order = order
        self.batches_per_epoch = -(-self.n_rows // self.batch_size)
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = np.random.default_rng([self.seed, 0, epoch]).permutation(self.n_rows)
        return self._cache[epoch]

    def offsets(self, start_step: int, n_steps: int) -> np.ndarray:
        """Where each batch of :meth:`rows` starts in their concatenation (``n_steps + 1`` offsets)."""
        if self.order == "reshuffled":
            return np.arange(n_steps + 1, dtype=np.int64) * self.batch_size
        j = np.arange(start_step, start_step + n_steps) % self.batches_per_epoch
        sizes = np.minimum(self.batch_size, self.n_rows - j * self.batch_size)
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def rows(self, start_step: int, n_steps: int) -> np.ndarray:
        """Row indices of batches ``start_step … start_step + n_steps − 1``, concatenated (int64)."""
        with self._lock:
            if self.order == "cycled":
                perm, B = self._perm(0), self.batch_size
                j = np.arange(start_step, start_step + n_steps) % self.batches_per_epoch
                parts = [perm[i * B : (i + 1) * B] for i in j]
            else:
                p, stop = start_step * self.batch_size, (start_step + n_steps) * self.batch_size
                parts = []
                while p < stop:
                    epoch, off = divmod(p, self.n_rows)
                    take = min(stop - p, self.n_rows - off)
                    parts.append(self._perm(epoch)[off : off + take])
                    p += take
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


def training_batch_rows(n_rows: int, batch_size: int, seed: int, step: int, order: str = "cycled") -> np.ndarray:
    """Row indices of training batch ``step`` (0-based) as :func:`train_sae` draws them in batch
    order ``order`` (:data:`BATCH_ORDERS`), whatever the data path."""
    return _IndexStream(n_rows, batch_size, seed, order).rows(step, 1)


def _resolve_data_on_device(data_on_device: bool | str, src: _RowSource, device: torch.device, fraction: float) -> bool:
    if data_on_device not in ("auto", True, False):
        raise ValueError(f"data_on_device must be 'auto', True or False, got {data_on_device!r}")
    if not (0 < float(fraction) <= 1):
        raise ValueError(f"memory_fraction must be in (0, 1], got {fraction!r}")
    if data_on_device != "auto":
        return bool(data_on_device)
    if src.tensor is not None and (
        src.tensor.device == device or (device.type == "cpu" and src.tensor.device.type == "cpu")
    ):
        return True  # already there: no copy
    return src.nbytes <= float(fraction) * free_device_memory(device)


class _TrainingStream:
    """Training batches (float32, on ``device``) for steps ``start … end − 1``.

    Resident: the data is put on the device once (storage dtype, e.g. float16), each batch is an
    ``index_select`` there, converted to float32 on the device. Streaming: chunks of
    :data:`CHUNK_BATCHES` batches are gathered (sorted rows, one read per chunk) into pinned host
    memory by a background thread while the previous chunk trains, copied with ``non_blocking``,
    and batches are drawn from the chunk on the device. Both give the same batches."""

    def __init__(
        self,
        data: TrainingData,
        batch_size: int,
        seed: int,
        device: torch.device,
        data_on_device: bool | str = "auto",
        memory_fraction: float = DATA_MEMORY_FRACTION,
        what: str = "training data",
        order: str = "cycled",
    ):
        self.src = data if isinstance(data, _RowSource) else _RowSource(data)
        self.batch_size, self.device, self.what = int(batch_size), device, what
        self.index = _IndexStream(self.src.n_rows, batch_size, seed, order)
        self.resident = _resolve_data_on_device(data_on_device, self.src, device, memory_fraction)
        batch_bytes = self.batch_size * self.src.dim * self.src.itemsize
        self.chunk_batches = max(1, min(CHUNK_BATCHES, CHUNK_MAX_BYTES // max(1, batch_bytes)))
        self._data: torch.Tensor | None = None

    def first_batch(self) -> torch.Tensor:
        """Batch 0 as a float32 CPU tensor (for the geometric-median ``b_dec``)."""
        rows = self.index.rows(0, 1)
        order = np.argsort(rows, kind="stable")
        out = torch.empty((len(rows), self.src.dim), dtype=self.src.dtype)
        out[torch.from_numpy(order)] = self.src.gather(rows[order])
        return out.float()

    def _resident_data(self) -> torch.Tensor:
        if self._data is None:
            self._data = self.src.load(self.device, self.what)
        return self._data

    def _chunk(self, c0: int, n: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(distinct sorted rows of the chunk gathered on the host, position of each batch row in them, the rows)."""
        rows = self.index.rows(c0, n)
        uniq, inv = np.unique(rows, return_inverse=True)
        pin = self.device.type == "cuda"
        block = self.src.gather(uniq, pin=pin)
        inv_t = torch.from_numpy(inv.astype(np.int64).reshape(-1))
        return block, (inv_t.pin_memory() if pin else inv_t), uniq

    def batches(self, start: int, end: int) -> Generator[torch.Tensor, None, None]:
        C = self.chunk_batches
        if self.resident:
            data = self._resident_data()
            for c0 in range(start, end, C):
                n = min(C, end - c0)
                rows = torch.from_numpy(self.index.rows(c0, n)).to(self.device)
                at = self.index.offsets(c0, n)
                for i in range(n):
                    yield data.index_select(0, rows[at[i] : at[i + 1]]).float()
            return
        if start >= end:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sae-prefetch") as pool:
            pending = pool.submit(self._chunk, start, min(C, end - start))
            c0 = start
            while c0 < end:
                n = min(C, end - c0)
                block, inv, uniq = pending.result()
                if c0 + n < end:  # gather the next chunk while this one trains
                    pending = pool.submit(self._chunk, c0 + n, min(C, end - c0 - n))
                block = block.to(self.device, non_blocking=True)
                inv = inv.to(self.device, non_blocking=True)
                _check_finite(block, self.what, rows=uniq)
                at = self.index.offsets(c0, n)
                for i in range(n):
                    yield block.index_select(0, inv[at[i] : at[i + 1]]).float()
                c0 += n


def _eval_batches(data: TrainingData, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Every row once, in store order (class-sorted for an extracted store, as the authors' unshuffled
    validation loader reads it), in batches of ``batch_size`` (the last may be short), float32 on ``device``.
    A NaN/inf row is an error naming it (it would turn R² into NaN without a word)."""
    src = data if isinstance(data, _RowSource) else _RowSource(data)
    tensor = src.tensor
    resident = tensor if tensor is not None and (tensor.device == device or tensor.device.type == "cpu") else None
    chunk = batch_size * max(1, min(CHUNK_BATCHES, CHUNK_MAX_BYTES // max(1, batch_size * src.dim * src.itemsize)))
    for c0 in range(0, src.n_rows, chunk):
        rows = np.arange(c0, min(c0 + chunk, src.n_rows))
        if resident is not None:
            block = resident[c0 : c0 + len(rows)]
        else:
            block = src.gather(rows, pin=device.type == "cuda")
        block = block.to(device, non_blocking=True)
        _check_finite(block, "evaluation data", offset=c0)
        for i in range(0, len(rows), batch_size):
            yield block[i : i + batch_size].float()
