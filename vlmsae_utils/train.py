"""SAE trainer faithful to the dictionary_learning reference (Pach et al. 2025), with sparse gradients.

Training tricks: input normalisation to unit mean squared norm (factor stored in
``sae.input_scale``, estimated on ~100 random batches), geometric-median ``b_dec``, tied init,
unit-norm decoder rows with gradient projection, grad-norm clip 1.0, Adam(0.9, 0.999), linear
warm-up (and an optional linear decay, off by default as in the authors' runs), auxiliary-K loss
for dead latents (weight 0.03 as the authors' scripts), threshold EMA, Matryoshka prefix losses
weighted as dictionary_learning (each prefix 1/G, then averaged over the G prefixes).
Speed: for the top-k variants only the ``B·k`` kept (plus auxiliary) entries carry gradient,
so encoder and decoder gradients are computed sparsely (sparse mm / ``embedding_bag``); the
dense encoder forward is the only ``B·d·ω`` product per step. Training data sits on the device
when it fits (``data_on_device``), else streams in large pinned chunks; bf16 autocast of the
encoder forward is an option on CUDA only (float32 by default, as the authors). Every setting, with its default, is a field of
:class:`~vlmsae_utils.train_config.TrainConfig`; what differs between SAE types (selection rule,
loss terms) is decided by the SAE class (:mod:`vlmsae_utils.sae`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .device import resolve_device
from .io import atomic_torch_save
from .sae import SAE_LABELS, SAE_TYPES, BaseSAE, MatryoshkaBatchTopKSAE, batch_topk_indices, sae_class
from .train_config import (
    BATCH_ORDERS,
    DATA_MEMORY_FRACTION,
    DECAY_LAST_20PCT,
    DEFAULT_AUX_ALPHA,
    DEFAULT_GROUP_FRACTIONS,
    TrainConfig,
    default_lr,
    grid_configs,
    group_sizes_from_fractions,
    resolve_decay_start,
)

__all__ = [
    "CHECKPOINT_FILE",
    "CHUNK_BATCHES",
    "CHUNK_MAX_BYTES",
    "DATA_MEMORY_FRACTION",
    "DECAY_LAST_20PCT",
    "DEFAULT_AUX_ALPHA",
    "DEFAULT_GROUP_FRACTIONS",
    "RUN_ONLY_SETTINGS",
    "SAE_LABELS",
    "SAE_TYPES",
    "TRAINER_VERSION",
    "BaseSAE",
    "MatryoshkaBatchTopKSAE",
    "TrainConfig",
    "batch_topk_indices",
    "checkpoint_settings",
    "data_fingerprint",
    "dead_after_batch",
    "default_lr",
    "estimate_input_scale",
    "evaluate_sae",
    "free_device_memory",
    "geometric_median",
    "grid_configs",
    "group_sizes_from_fractions",
    "lr_lambda",
    "make_config",
    "project_decoder_grad",
    "resolve_decay_start",
    "run_name",
    "sae_class",
    "sae_loss",
    "train_grid",
    "train_sae",
    "training_batch_rows",
]

CHECKPOINT_FILE = "checkpoint.pt"


# ----- parameters (the settings themselves: vlmsae_utils.train_config.TrainConfig) ----------------


def lr_lambda(step: int, steps: int, warmup_steps: int, decay_start: int | None) -> float:
    """Learning-rate multiplier: linear warm-up ``step / warmup_steps`` (dictionary_learning's: the first
    step at 0), then 1, then linear decay to 0 from ``decay_start`` (``None``: no decay)."""
    m = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    if decay_start is not None and step >= decay_start:
        m *= max(0.0, (steps - step) / max(1, steps - decay_start))
    return m


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
#: Bumped whenever a change to the loss or to the batch sampling changes what a run trains
#: (2: Matryoshka 1/G² weighting, epoch-permutation batches, sampled input scale; 3: the authors'
#: uniform init, cycled batch order and dead-latent count after the batch). Written into
#: checkpoints — one of another version is refused — and meant for keys of cached SAEs.
TRAINER_VERSION = 3


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


def data_fingerprint(data) -> str:
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


def _data_dim(data) -> int:
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

    def __init__(self, data):
        self.dim = _data_dim(data)
        self.arrays = None
        if isinstance(data, torch.Tensor):
            self.tensor = data
        elif hasattr(data, "arrays") and isinstance(getattr(data, "dtype", None), str):
            self.tensor = None
            self.arrays = data.arrays()
            self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
            self.np_dtype = np.dtype(data.dtype)
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


def _resolve_data_on_device(data_on_device, src: _RowSource, device: torch.device, fraction: float) -> bool:
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
        data,
        batch_size: int,
        seed: int,
        device: torch.device,
        data_on_device="auto",
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

    def batches(self, start: int, end: int) -> Iterator[torch.Tensor]:
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


def _eval_batches(data, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Every row once, in store order (class-sorted for an extracted store, as the authors' unshuffled
    validation loader reads it), in batches of ``batch_size`` (the last may be short), float32 on ``device``."""
    src = data if isinstance(data, _RowSource) else _RowSource(data)
    resident = src.tensor is not None and (src.tensor.device == device or src.tensor.device.type == "cpu")
    chunk = batch_size * max(1, min(CHUNK_BATCHES, CHUNK_MAX_BYTES // max(1, batch_size * src.dim * src.itemsize)))
    for c0 in range(0, src.n_rows, chunk):
        rows = np.arange(c0, min(c0 + chunk, src.n_rows))
        if resident:
            block = src.tensor[c0 : c0 + len(rows)]
        else:
            block = src.gather(rows, pin=device.type == "cuda")
        block = block.to(device, non_blocking=True)
        for i in range(0, len(rows), batch_size):
            yield block[i : i + batch_size].float()


def estimate_input_scale(
    data, n_rows: int | None = None, batch_size: int = 4096, seed: int = 0, n_batches: int = 100
) -> float:
    """Scalar ``s`` with ``E||s·x||² = 1`` (unit mean squared norm, Pach et al. 2025): ``s = 1/√mean‖x‖²``.

    As the authors (dictionary_learning's ``--normalize_activations``), the mean is taken over
    ``n_batches`` random batches: a seeded uniform sample without replacement of
    ``n_rows = n_batches · batch_size`` rows drawn across the whole data
    (``default_rng([seed, 1])``), or every row when the data has fewer — not the first rows in
    store order, which in a class-sorted store cover only a few classes."""
    src = data if isinstance(data, _RowSource) else _RowSource(data)
    N = src.n_rows
    n = min(N, int(n_rows) if n_rows is not None else int(n_batches) * int(batch_size))
    if n < 1:
        raise ValueError("cannot normalise inputs: data is empty")
    rows = (
        np.arange(N) if n >= N else np.sort(np.random.default_rng([int(seed) % 2**63, 1]).choice(N, n, replace=False))
    )
    total = 0.0
    for start in range(0, n, 8192):
        part = rows[start : start + 8192]
        b = src.gather(part)
        _check_finite(b, "data", rows=part)
        total += float(b.double().pow(2).sum())
    if total <= 0:
        raise ValueError("cannot normalise inputs: data is empty or identically zero")
    return float(1.0 / math.sqrt(total / n))


def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld iterations for the geometric median of the rows of ``points``."""
    points = points.double()
    guess = points.mean(dim=0)
    for _ in range(max_iter):
        prev = guess
        w = 1.0 / (points - guess).norm(dim=1).clamp_min(1e-12)
        guess = (w[:, None] * points).sum(0) / w.sum()
        if (guess - prev).norm() < tol:
            break
    return guess.float()


# ----- loss with sparse gradients -------------------------------------------------------------


class _SparseEncoderGrad(torch.autograd.Function):
    """Identity on gathered post-ReLU encoder values whose backward only touches the gathered entries.

    ``vals[n] = ReLU(xc[rows[n]] · W_enc[:, cols[n]] + b_enc[cols[n]])`` with ``xc = xs − b_dec``.
    """

    @staticmethod
    def forward(ctx, vals, xs, W_enc, b_enc, b_dec, rows, cols):
        ctx.save_for_backward(xs, W_enc, b_dec, rows, cols, vals)
        return vals.clone()

    @staticmethod
    def backward(ctx, g):
        xs, W_enc, b_dec, rows, cols, vals = ctx.saved_tensors
        g = (g * (vals > 0)).to(W_enc.dtype)
        omega = W_enc.shape[1]
        gb = torch.zeros(omega, dtype=W_enc.dtype, device=W_enc.device).index_add_(0, cols, g)
        gW = None
        if ctx.needs_input_grad[2]:
            xc = xs - b_dec
            G = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (omega, xs.shape[0]), check_invariants=False)
            gW = torch.sparse.mm(G, xc).T.contiguous()
        gbdec = -(W_enc @ gb) if ctx.needs_input_grad[4] else None
        return None, None, gW, gb, gbdec, None, None


def _dense_loss(sae: BaseSAE, xs: torch.Tensor, l1_coeff: float) -> dict[str, Any]:
    """Dense training loss of a type without sparse training (ReLU): ``l2 + l1_coeff · sparsity_penalty``."""
    pre = F.relu((xs - sae.b_dec) @ sae.W_enc + sae.b_enc)
    f = sae.select(pre)
    x_hat = f @ sae.W_dec + sae.b_dec
    l2 = (xs - x_hat).pow(2).sum(-1).mean()
    l1 = sae.sparsity_penalty(f)
    fired = (f > 0).any(0)
    return {
        "loss": l2 + l1_coeff * l1,
        "l2": l2.detach(),
        "aux": torch.zeros(()),
        "l1": l1.detach(),
        "l0": float((f > 0).sum()) / xs.shape[0],
        "fired": fired,
        "min_kept": None,
    }


def sae_loss(
    sae: BaseSAE,
    x: torch.Tensor,
    dead_mask: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
    aux_alpha: float = DEFAULT_AUX_ALPHA,
    k_aux: int | None = None,
    l1_coeff: float = TrainConfig.l1_coeff,
    autocast: bool = False,
) -> dict[str, Any]:
    """Training loss of the reference trainer on raw inputs ``x`` (scaled by ``sae.input_scale``).

    ``loss = l2 + aux_alpha · aux``. The SAE class decides the terms: which entries are kept
    (:meth:`~vlmsae_utils.sae.BaseSAE.select_indices`; only they carry gradient) and the
    reconstruction term (:meth:`~vlmsae_utils.sae.BaseSAE.sparse_reconstruction`). For Matryoshka
    with G groups, as dictionary_learning's ``MatryoshkaBatchTopKTrainer``: each prefix's error
    ``l2_m = mean_b ||x_b − x̂_{m,b}||²`` is weighted ``1/G`` and the weighted errors are averaged
    over the G prefixes, so ``l2 = Σ_m l2_m / G²``. Types with ``sparse_training = False`` (ReLU)
    use the dense loss ``l2 + l1_coeff · L1``. ``dead_mask`` (bool [ω]) names the latents the
    auxiliary-K loss may revive; a callable gets the batch's ``fired`` mask and returns it
    (:func:`dead_after_batch`, the trainer's rule). ``autocast`` runs the dense encoder forward in bf16
    and only applies on CUDA (ignored elsewhere).

    Returns a dict with ``loss`` (differentiable), ``l2`` (the reconstruction term of the loss),
    ``aux``, ``l0``, ``fired`` (bool [ω]), ``min_kept`` (smallest positive kept activation) and,
    for Matryoshka, ``prefix_l2`` (the unweighted ``l2_m``).
    """
    autocast = bool(autocast) and x.device.type == "cuda"
    xs = x.to(sae.W_enc.dtype) * sae.input_scale
    B, omega = xs.shape[0], sae.dict_size
    if not sae.sparse_training:
        return _dense_loss(sae, xs, l1_coeff)
    with torch.no_grad():
        with torch.autocast(device_type=xs.device.type, dtype=torch.bfloat16, enabled=autocast):
            pre = torch.addmm(sae.b_enc, xs - sae.b_dec, sae.W_enc).relu_()
        pre = pre.float()
        rows, cols = sae.select_indices(pre)
        vals = pre[rows, cols]
        pos = vals > 0
        fired = torch.zeros(omega, dtype=torch.bool, device=xs.device)
        fired[cols[pos]] = True
        min_kept = float(vals[pos].min()) if bool(pos.any()) else 0.0
        if callable(dead_mask):
            dead_mask = dead_mask(fired)
        n_dead = int(dead_mask.sum()) if dead_mask is not None and sae.uses_aux_loss else 0
        aux_rows = aux_cols = None
        if n_dead > 0:
            ka = min(k_aux if k_aux is not None else sae.activation_dim // 2, n_dead)
            dead_idx = dead_mask.nonzero().flatten()
            sub = pre[:, dead_idx].topk(ka, dim=-1, sorted=False).indices
            aux_cols = dead_idx[sub].flatten()
            aux_rows = torch.arange(B, device=xs.device).repeat_interleave(ka)
    all_rows = rows if aux_rows is None else torch.cat([rows, aux_rows])
    all_cols = cols if aux_cols is None else torch.cat([cols, aux_cols])
    all_vals = pre[all_rows, all_cols]
    g_vals = _SparseEncoderGrad.apply(all_vals, xs.detach(), sae.W_enc, sae.b_enc, sae.b_dec, all_rows, all_cols)
    n_kept = rows.shape[0]
    kv = g_vals[:n_kept]
    out: dict[str, Any] = {"l0": float(pos.sum()) / B, "fired": fired, "min_kept": min_kept}
    l2, x_hat, extra = sae.sparse_reconstruction(xs, rows, cols, kv)
    out.update(extra)
    aux = torch.zeros((), device=xs.device)
    if aux_rows is not None:
        resid = (xs - x_hat).detach()
        ka = aux_cols.shape[0] // B
        aux_rec = F.embedding_bag(
            aux_cols.view(B, ka), sae.W_dec, mode="sum", per_sample_weights=g_vals[n_kept:].view(B, ka)
        )
        l2_aux = (resid - aux_rec).pow(2).sum(-1).mean()
        denom = (resid - resid.mean(0, keepdim=True)).pow(2).sum(-1).mean()
        aux = (l2_aux / denom).nan_to_num(0.0)
    out.update(loss=l2 + aux_alpha * aux, l2=l2.detach(), aux=aux.detach())
    return out


def dead_after_batch(
    since_fired: torch.Tensor, dead_tokens: int, n_rows: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The auxiliary loss's dead latents as dictionary_learning counts them: after this batch's
    ``n_rows`` tokens are added and its firing latents reset, ``since_fired ≥ dead_tokens``."""
    return lambda fired: (since_fired + n_rows >= dead_tokens) & ~fired


def project_decoder_grad(W_dec: torch.Tensor) -> None:
    """Remove from ``W_dec.grad`` the component parallel to each (unit) decoder row."""
    if W_dec.grad is None:
        return
    w = W_dec.data
    W_dec.grad -= (W_dec.grad * w).sum(1, keepdim=True) * w


# ----- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_sae(sae: BaseSAE, data, batch_size: int = 4096, device: str | torch.device = "auto") -> dict[str, float]:
    """Reconstruction quality and sparsity of ``sae`` on ``data`` (inference encoding).

    Returns ``r2_batch_mean`` — the R² the paper reports, computed as the authors log it
    (dictionary_learning's ``frac_variance_explained``): per batch of the validation data read in
    store order (class-sorted, unshuffled; ``batch_size`` = the training batch size, the last batch
    short), ``1 − Σ_j var_b(x − x̂)_j / Σ_j var_b(x)_j``, averaged over all batches, the short last
    one included (a last batch of one row has no variance and is left out, where the authors' value
    would be NaN). Also ``fvu`` and ``r2 = 1 − FVU`` over the whole data (global: one residual sum of
    squares over one total sum of squares around the data mean; independent of batching), ``l0``,
    ``dead_frac_val`` (latents never active) and, for Matryoshka, ``r2_prefix_<m>`` per nested
    prefix (global). The SAE is moved to ``device`` (``"auto"``: CUDA if available) and back.
    """
    dev = resolve_device(device)
    was_training = sae.training
    home = sae.W_enc.device
    sae.eval()
    if home != dev:
        sae.to(dev)
    try:
        sums, sq, n, sse, l0 = None, None, 0, 0.0, 0.0
        fired = torch.zeros(sae.dict_size, dtype=torch.bool, device=dev)
        prefix_sse = None
        per_batch = []
        for x in _eval_batches(data, batch_size, dev):
            f = sae.encode(x)
            if type(sae).uses_groups:  # per-prefix R² for every type with nested groups
                recs = sae.decode_prefixes(f)
                x_hat = recs[-1]
                pe = torch.stack([(x - r).double().pow(2).sum() for r in recs])
                prefix_sse = pe if prefix_sse is None else prefix_sse + pe
            else:
                x_hat = sae.decode(f)
            resid = (x - x_hat).double()
            xd = x.double()
            sse += float(resid.pow(2).sum())
            sums = xd.sum(0) if sums is None else sums + xd.sum(0)
            sq = xd.pow(2).sum() if sq is None else sq + xd.pow(2).sum()
            n += x.shape[0]
            l0 += float((f != 0).sum())
            fired |= (f != 0).any(0)
            if x.shape[0] >= 2:
                var_x = float((xd - xd.mean(0)).pow(2).sum())
                var_r = float((resid - resid.mean(0)).pow(2).sum())
                per_batch.append(1.0 - var_r / var_x if var_x > 0 else float("nan"))
        if n == 0:
            raise ValueError("validation data is empty")
        tss = float(sq - sums.pow(2).sum() / n)
        fvu = sse / tss if tss > 0 else float("nan")
        out = {
            "fvu": fvu,
            "r2": 1.0 - fvu,
            "r2_batch_mean": float(np.mean(per_batch)) if per_batch else float("nan"),
            "l0": l0 / n,
            "dead_frac_val": float((~fired).float().mean()),
        }
        if prefix_sse is not None:
            for m, e in zip(sae.prefix_sizes, prefix_sse.tolist()):
                out[f"r2_prefix_{m}"] = 1.0 - e / tss if tss > 0 else float("nan")
        return out
    finally:
        if home != dev:
            sae.to(home)
        sae.train(was_training)


# ----- checkpoints -----------------------------------------------------------------------------

# ----- trainer ---------------------------------------------------------------------------------


def make_config(
    config: TrainConfig | str | None = None, expansion: float | None = None, **overrides: Any
) -> TrainConfig:
    """The :class:`TrainConfig` of ``train_sae(data, config, expansion, **overrides)``: ``config`` (default
    ``TrainConfig()``) with ``overrides`` applied; a string ``config`` is the ``sae_type`` (short form)."""
    if isinstance(config, str):
        if "sae_type" in overrides:
            raise TypeError(f"sae_type given twice: {config!r} and {overrides['sae_type']!r}")
        overrides["sae_type"], config = config, None
    if expansion is not None:
        if "expansion" in overrides:
            raise TypeError(f"expansion given twice: {expansion!r} and {overrides['expansion']!r}")
        overrides["expansion"] = expansion
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig or an sae_type string, got {type(config).__name__}")
    return (config or TrainConfig()).updated(**overrides)


#: TrainConfig fields that say how a training executes, not what it computes (every choice trains
#: bit-identically), so they stay out of a checkpoint's fingerprint; every other field is in it.
RUN_ONLY_SETTINGS = ("checkpoint_every", "data_on_device", "memory_fraction")


def checkpoint_settings(cfg: TrainConfig, **resolved: Any) -> dict[str, Any]:
    """Every setting of ``cfg`` that shapes the trained SAE, with the defaults ``train_sae`` resolved
    (``lr``, ``warmup_steps``, …) in ``resolved``: a checkpoint is resumed or reused only for the
    same training, however many settings TrainConfig grows."""
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in RUN_ONLY_SETTINGS}
    if settings["group_fractions"] is not None:
        settings["group_fractions"] = [float(f) for f in settings["group_fractions"]]
    return {**settings, "aux_alpha": float(cfg.aux_alpha), **resolved}


def train_sae(
    data,
    config: TrainConfig | str | None = None,
    expansion: float | None = None,
    *,
    device: str | torch.device = "auto",
    val_data=None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    resume: bool = True,
    stop_after: int | None = None,
    **overrides: Any,
) -> tuple[BaseSAE, pd.DataFrame]:
    """Train an SAE on ``data`` (tensor [N, d] or ActivationStore); return (sae, history).

    Settings: ``config`` (a :class:`TrainConfig`; default ``TrainConfig()``) with ``overrides``
    (TrainConfig fields, e.g. ``k=8, steps=600``) applied; ``train_sae(data, "top_k", 4, k=8)``
    is the short form giving ``sae_type`` and ``expansion`` positionally. The rest says where and
    how the run executes: ``device``, ``val_data``, ``checkpoint_dir``, ``progress``, ``resume``
    (continue from a checkpoint there) and ``stop_after``.

    ``history`` has one row per evaluation (every ``eval_every`` steps and at the end): step, lr,
    loss, l2, aux, train L0, dead fraction (no firing within ``dead_tokens`` tokens), threshold
    and, with ``val_data``, val FVU/R²/authors' per-batch R²/L0 (+ per-prefix R² for Matryoshka).
    With ``checkpoint_dir``, resumable checkpoints are written atomically; a rerun resumes and
    ends identically. ``stop_after`` stops early after that many total steps (for tests /
    interrupted runs).

    Defaults reproduce the authors' runs: ``aux_alpha=0.03`` (their scripts; the paper text says
    1/32), ``decay_start=None`` (no LR decay: they decay from step 109,999 of 110k and keep the
    100k checkpoint; ``decay_start=DECAY_LAST_20PCT`` (0.8) restores the former decay over the
    last 20 %, an int is a step, a float a fraction of ``steps``), input scale from ~100 random
    batches (:func:`estimate_input_scale`).

    Device and data: ``device="auto"`` is CUDA when available, else the CPU (see
    :func:`vlmsae_utils.device.resolve_device`). ``data_on_device="auto"`` puts the whole training
    data on the device (in its storage dtype; float16 stores become float32 batch by batch on the
    device) when it takes at most ``memory_fraction`` (default 0.5) of the device's free memory —
    on the CPU that means loaded into RAM, within that share of the available RAM; a tensor
    already on the device is always used in place. Otherwise it streams in chunks of up to 64
    batches gathered by a background thread into pinned memory and copied asynchronously.
    ``True``/``False`` force either path. Batches are a function of ``(seed, step, batch_order)`` only —
    by default the authors' one seeded pass replayed every epoch (:func:`training_batch_rows`) — so
    both paths train bit-identically. ``autocast=False`` (default) computes in float32 as the authors do;
    ``True`` runs the encoder forward in bf16 on CUDA, ``None`` when the GPU supports it (never on the CPU).
    """
    from tqdm.auto import tqdm

    cfg = make_config(config, expansion, **overrides)
    dev = resolve_device(device)
    d = _data_dim(data)
    dict_size, group_sizes = cfg.sizes(d)
    if val_data is not None:
        vd = _data_dim(val_data)
        if vd != d:
            raise ValueError(f"val_data has dim {vd}, training data has dim {d}")
        if isinstance(val_data, torch.Tensor):
            _check_finite(val_data, "validation data")
    n_rows = len(data)
    if n_rows < 1:
        raise ValueError("training data is empty")
    if isinstance(data, torch.Tensor):
        _check_finite(data, "training data")
    sae_type, steps, batch_size, seed, k = cfg.sae_type, cfg.steps, cfg.batch_size, cfg.seed, cfg.k
    lr = default_lr(dict_size) if cfg.lr is None else float(cfg.lr)
    warmup_steps = min(1000, max(1, steps // 20)) if cfg.warmup_steps is None else cfg.warmup_steps
    decay_start = resolve_decay_start(cfg.decay_start, steps)
    threshold_start_step = min(1000, steps // 4) if cfg.threshold_start_step is None else cfg.threshold_start_step
    eval_every = max(1, steps // 20) if cfg.eval_every is None else cfg.eval_every
    checkpoint_every = eval_every if cfg.checkpoint_every is None else cfg.checkpoint_every
    autocast, threshold_beta, dead_tokens = cfg.autocast, cfg.threshold_beta, cfg.dead_tokens
    if autocast is None:
        autocast = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    elif autocast and dev.type != "cuda":
        raise ValueError(f"autocast (bf16) is only used on CUDA; device is {dev}")

    stream = _TrainingStream(
        data, batch_size, seed, dev, cfg.data_on_device, cfg.memory_fraction, order=cfg.batch_order
    )
    cls = sae_class(sae_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = cls.create(d, dict_size, k if cls.needs_k else None, group_sizes)
        if cfg.init != "uniform":  # the constructor draws the authors' uniform directions
            sae.init_directions(cfg.init)
    sae.to(dev).train()
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, steps, warmup_steps, decay_start))
    since_fired = torch.zeros(dict_size, dtype=torch.long, device=dev)
    history: list[dict] = []
    start = 0
    run_cfg = {
        **checkpoint_settings(
            cfg,
            lr=lr,
            warmup_steps=warmup_steps,
            decay_start=decay_start,
            threshold_start_step=threshold_start_step,
            eval_every=eval_every,
            autocast=bool(autocast),
        ),
        "activation_dim": d,
        "dict_size": dict_size,
        "group_sizes": group_sizes,
        "trainer_version": TRAINER_VERSION,
        "data": data_fingerprint(data),
    }
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None

    if ckpt_path is not None and resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck["config"] != run_cfg:
            diff = {kk: (ck["config"].get(kk), v) for kk, v in run_cfg.items() if ck["config"].get(kk) != v}
            raise ValueError(f"checkpoint {ckpt_path} was written with different settings (checkpoint, now): {diff}")
        sae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        since_fired = ck["since_fired"].to(dev)
        history = list(ck["history"])
        start = int(ck["step"])
    else:
        # input normalisation from ~100 random batches, geometric-median b_dec from the first batch (on the CPU)
        scale = estimate_input_scale(stream.src, batch_size=batch_size, seed=seed)
        first = stream.first_batch()
        with torch.no_grad():
            sae.input_scale.fill_(scale)
            sae.b_dec.copy_(geometric_median(first * scale).to(dev))

    def save_ckpt(step: int) -> None:
        if ckpt_path is None:
            return
        atomic_torch_save(
            {
                "config": run_cfg,
                "step": step,
                "model": sae.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "since_fired": since_fired.cpu(),
                "history": history,
            },
            ckpt_path,
        )

    end = steps if stop_after is None else min(steps, int(stop_after))
    bar = tqdm(total=steps, initial=start, disable=not progress, desc=f"{sae_type} ε={cfg.expansion}")
    last: dict[str, Any] = {}
    batches = stream.batches(start, end)
    try:
        for step, x in zip(range(start, end), batches):
            uses_aux = sae.sparse_training and sae.uses_aux_loss
            dead = dead_after_batch(since_fired, dead_tokens, x.shape[0]) if uses_aux else None
            out = sae_loss(
                sae,
                x,
                dead_mask=dead,
                aux_alpha=cfg.aux_alpha,
                k_aux=cfg.k_aux,
                l1_coeff=cfg.l1_coeff,
                autocast=autocast,
            )
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            project_decoder_grad(sae.W_dec)
            if cfg.grad_clip is not None and cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            sae.normalize_decoder()
            with torch.no_grad():
                since_fired += x.shape[0]
                since_fired[out["fired"]] = 0
                # the inference threshold's EMA starts after threshold_start_step (dictionary_learning's `>`)
                if sae.uses_threshold and step > threshold_start_step and out["min_kept"] is not None:
                    mk = out["min_kept"]
                    th = float(sae.threshold)
                    sae.threshold.fill_(mk if th < 0 else threshold_beta * th + (1 - threshold_beta) * mk)
            last = {
                "loss": float(out["loss"].detach()),
                "l2": float(out["l2"]),
                "aux": float(out["aux"]),
                "l0": out["l0"],
            }
            if not math.isfinite(last["loss"]):
                raise FloatingPointError(f"training diverged at step {step + 1}: loss={last['loss']}")
            done = step + 1
            if done % 10 == 0 or done == end:
                bar.set_postfix(loss=f"{last['loss']:.4g}", L0=f"{last['l0']:.1f}", refresh=False)
            bar.update(1)
            if done % eval_every == 0 or done == steps:
                row = {
                    "step": done,
                    "lr": opt.param_groups[0]["lr"],
                    **last,
                    "dead_frac": float((since_fired >= dead_tokens).float().mean()),
                    "threshold": float(sae.threshold),
                }
                if val_data is not None:
                    row.update({f"val_{kk}": v for kk, v in evaluate_sae(sae, val_data, batch_size, dev).items()})
                history.append(row)
            if ckpt_path is not None and (done % checkpoint_every == 0 or done == end):
                save_ckpt(done)
    finally:
        batches.close()
        bar.close()
    sae.eval()
    frame = pd.DataFrame(history)
    frame.attrs["training"] = run_cfg  # every resolved setting, for the SAE's config.json (train_grid)
    frame.attrs.update(device=str(dev), data_on_device=stream.resident)
    return sae, frame


# ----- grids of SAEs (notebook 02 and sweeps) ---------------------------------------------------
# SAE_LABELS (type name → table label) is the registry's live view, imported from vlmsae_utils.sae.


def run_name(sae_type: str, expansion: float, k: int) -> str:
    """Folder name of one trained SAE, e.g. ``matryoshka_batch_top_k_x4_k20``."""
    return f"{sae_type}_x{expansion:g}_k{k}"


def train_grid(
    train_data,
    val_data,
    sae_types: list[str],
    expansions: list[float],
    out_dir: str | os.PathLike,
    device: str | torch.device = "auto",
    config: TrainConfig | None = None,
    progress: bool = True,
    resume: bool = True,
    stop_after: int | None = None,
    **overrides: Any,
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Train every (SAE type × expansion) on the same data, save each SAE and its history under
    ``out_dir/<run_name>/``, and return a results table ("R² %": the paper's per-batch R² of :func:`evaluate_sae`, "global R² %": 1 − FVU, L0, dead %)
    and the histories. Settings: ``config`` (default ``TrainConfig()``) with ``overrides`` (TrainConfig
    fields) applied, and each type and expansion of the grid; ``group_fractions`` only reach the
    types with latent groups. ``device`` is resolved once (``"auto"``: CUDA if available); when the
    training data goes on the device (``data_on_device``, see :func:`train_sae`) it is put there
    once for the whole grid."""
    from .sae import save_sae

    dev = resolve_device(device)
    if not sae_types or not expansions:
        raise ValueError("sae_types and expansions must each list at least one value")
    unknown = [t for t in sae_types if t not in SAE_TYPES]
    if unknown:
        raise ValueError(f"unknown sae_types {unknown}; valid: {', '.join(SAE_TYPES)}")
    configs = grid_configs(sae_types, expansions, config, **overrides)  # all validated before anything trains
    base = next(iter(configs.values()))
    out = Path(out_dir)
    _data_dim(train_data)
    src = _RowSource(train_data)
    if _resolve_data_on_device(base.data_on_device, src, dev, base.memory_fraction):
        train_data = src.load(dev, "training data")  # once for every SAE of the grid
    rows, histories = [], {}
    for sae_type in sae_types:
        for expansion in expansions:
            cfg = configs[sae_type, expansion]
            k = cfg.k
            name = run_name(sae_type, expansion, k)
            sae, history = train_sae(
                train_data,
                cfg,
                val_data=val_data,
                device=dev,
                progress=progress,
                resume=resume,
                stop_after=stop_after,
                checkpoint_dir=out / name / "checkpoint",
            )
            save_sae(sae, out / name, training=history.attrs["training"])
            history.to_csv(out / name / "history.csv", index=False)
            final = evaluate_sae(sae, val_data if val_data is not None else train_data, cfg.batch_size, dev)
            rows.append(
                {
                    "SAE": SAE_LABELS[sae_type],
                    "sae_type": sae_type,
                    "expansion": expansion,
                    "latents": sae.dict_size,
                    "k": k,
                    "R² %": 100 * final["r2_batch_mean"],
                    "global R² %": 100 * final["r2"],
                    "L0": final["l0"],
                    "dead %": 100 * final.get("dead_frac_val", float("nan")),
                    "path": str(out / name),
                }
            )
            histories[name] = history
    results = pd.DataFrame(rows)
    results.to_csv(out / "results.csv", index=False)
    return results, histories
