"""A sharded, resumable, memory-mapped on-disk store of activation rows.

Layout of a store folder::

    plan.json                 what is being extracted (parameters, image list) — written first
    shards/shard-00000.npy    rows of one shard (float16/float32), written atomically
    shards/shard-00000.json   the shard's metadata (images kept and skipped, rows, sha256) —
                              written after the rows, so its presence marks a complete shard
    manifest.json             written last, once every shard is complete: the store's contract

A shard holds a fixed number of *dataset images* (``shard_images``, a multiple of the batch
size), so its rows are ``kept images × rows_per_image``: batches never straddle shards and a
resumed or multi-process run sees exactly the batches of an uninterrupted one, which is what
makes it bit-identical.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .io import atomic_write, atomic_write_json, library_versions, read_json, sha256_file
from .store_format import (
    DTYPES,
    MANIFEST_DIGEST_KEY,
    MANIFEST_FILE,
    PLAN_FILE,
    SHARD_DIR,
    STORE_FORMAT,
    StoreError,
    StorePlan,
    _as_storage,
    _content_hash,
    _read_npy_into,
    _refuse_if_different,
    check_dtype,
    load_shard,
    manifest_digest,
    needs_verification,
    shard_name,
    verify_shard_once,
)

__all__ = [
    "DTYPES",
    "STORE_FORMAT",
    "ActivationStore",
    "RowStore",
    "StoreError",
    "StorePlan",
    "StoreWriter",
    "TrainingData",
    "check_dtype",
    "image_list_changed",
    "images_changed",
    "load_shard",
    "rows_writer",
    "shard_name",
    "write_rows",
]


class StoreWriter:
    """Writes shards of one :class:`StorePlan` into a folder; resumable and shareable between processes."""

    def __init__(self, path: str | os.PathLike, plan: StorePlan):
        self.path = Path(path)
        self.plan = plan
        check_dtype(plan.dtype)

    def begin(self) -> None:
        """Create the folder and ``plan.json``, or check that an existing one has the same parameters."""
        (self.path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        for name in (MANIFEST_FILE, PLAN_FILE):
            existing = self.path / name
            if existing.is_file():
                _refuse_if_different(existing, self.plan)
        if not (self.path / PLAN_FILE).is_file():
            atomic_write_json(self.path / PLAN_FILE, self.plan.to_json())

    def _meta_path(self, shard: int) -> Path:
        """A shard's metadata file, written after its rows: its presence marks the shard done."""
        return self.path / SHARD_DIR / f"{shard_name(shard)}.json"

    def is_complete(self) -> bool:
        """Whether ``manifest.json`` exists (the store is finished)."""
        return (self.path / MANIFEST_FILE).is_file()

    def shard_done(self, shard: int) -> bool:
        """A shard is done when its metadata (written after its rows) exists."""
        return self._meta_path(shard).is_file()

    def write_shard(
        self,
        shard: int,
        rows: np.ndarray,
        kept: Sequence[int],
        skipped: Sequence[tuple[str, str]],
        stamps: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Write one shard's rows, then its metadata (both atomically); ``stamps`` (size and mtime of
        each of the shard's image files as read) let a rerun see files replaced since."""
        expected = len(kept) * self.plan.rows_per_image
        if rows.shape != (expected, self.plan.dim):
            raise ValueError(f"shard {shard}: rows have shape {rows.shape}, expected ({expected}, {self.plan.dim})")
        rows = _as_storage(rows, DTYPES[self.plan.dtype], f"shard {shard}")
        array_path = self.path / SHARD_DIR / f"{shard_name(shard)}.npy"
        atomic_write(array_path, lambda stream: np.save(stream, rows, allow_pickle=False))
        meta = {
            "shard": shard,
            "kept": [int(i) for i in kept],
            "skipped": [list(s) for s in skipped],
            "rows": int(rows.shape[0]),
            "sha256": sha256_file(array_path),
        }
        if stamps is not None:
            meta["stamps"] = [list(stamp) for stamp in stamps]
        atomic_write_json(self._meta_path(shard), meta)

    def changed_shards(self, shards: Iterable[int], stamps: Callable[[range], list[list[int]]]) -> list[int]:
        """Written shards whose image files changed since they were read (``stamps(range)`` gives the
        current ones); shards written before stamps were recorded are trusted."""
        changed = []
        for shard in shards:
            if self.shard_done(shard):
                recorded = read_json(self._meta_path(shard)).get("stamps")
                if recorded is not None and recorded != stamps(self.plan.shard_range(shard)):
                    changed.append(shard)
        return changed

    def forget_shards(self, shards: Iterable[int]) -> None:
        """Drop shards (and the manifest built on them) so that they are extracted again."""
        shards = list(shards)
        if shards:
            (self.path / MANIFEST_FILE).unlink(missing_ok=True)
        for shard in shards:
            self._meta_path(shard).unlink(missing_ok=True)

    def all_shards_done(self) -> bool:
        """Every shard of the plan has been written (by any process)."""
        return all(self.shard_done(s) for s in range(self.plan.num_shards))

    def _refuse_unreadable_shard(self, meta: dict[str, Any]) -> None:
        """A shard whose rows do not load as written is forgotten (rerun to write it again) and refused."""
        stem = self.path / SHARD_DIR / shard_name(meta["shard"])
        try:
            rows = load_shard(stem.with_suffix(".npy"))
            if rows.shape != (meta["rows"], self.plan.dim):
                raise StoreError(
                    f"shard {stem.with_suffix('.npy')} has shape {rows.shape}, written as "
                    f"({meta['rows']}, {self.plan.dim})"
                )
        except StoreError as err:
            stem.with_suffix(".json").unlink(missing_ok=True)  # so a rerun extracts this shard again
            raise StoreError(f"{err}; rerun the extraction with the same parameters to write it again") from None

    def finalize(self) -> ActivationStore:
        """Assemble ``manifest.json`` from the shard metadata, in dataset order, and open the store."""
        if not self.all_shards_done():
            missing = [s for s in range(self.plan.num_shards) if not self.shard_done(s)]
            raise StoreError(f"{self.path}: shards {missing[:5]} are not written yet")
        metas = [read_json(self._meta_path(s)) for s in range(self.plan.num_shards)]
        for meta in metas:
            self._refuse_unreadable_shard(meta)
        kept = [i for meta in metas for i in meta["kept"]]
        if not kept:
            raise StoreError(f"{self.path}: no image could be used; skipped: {metas[0]['skipped'][:3]}")
        shards = [
            {"file": f"{SHARD_DIR}/{shard_name(m['shard'])}.npy", "rows": m["rows"], "sha256": m["sha256"]}
            for m in metas
        ]
        image_ids = [self.plan.image_ids[i] for i in kept]
        manifest = self.plan.to_json() | {
            "image_ids": image_ids,
            "class_names": [self.plan.class_names[i] for i in kept],
            "num_images_planned": len(self.plan.image_ids),
            "skipped": [s for m in metas for s in m["skipped"]],
            "shards": shards,
            "rows": sum(s["rows"] for s in shards),
            "versions": library_versions(),
            "content_hash": _content_hash(shards, image_ids),
        }
        manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)
        atomic_write_json(self.path / MANIFEST_FILE, manifest)
        return ActivationStore.open(self.path)


def image_list_changed(path: str | os.PathLike, image_ids: Sequence[str]) -> str:
    """Why the store at ``path`` was planned for another image list than ``image_ids`` (the folder's
    list now: images added or removed), or "" when the lists agree."""
    planned = read_json(Path(path) / PLAN_FILE)["image_ids"]
    if list(planned) == list(image_ids):
        return ""
    added, removed = len(set(image_ids) - set(planned)), len(set(planned) - set(image_ids))
    return f"the image folder changed ({added} images added, {removed} removed)"


def images_changed(
    path: str | os.PathLike, image_ids: Sequence[str], stamps: Callable[[range], list[list[int]]]
) -> str:
    """Why the store at ``path`` no longer describes the image folder it was extracted from ("" when it
    still does): images added or removed (:func:`image_list_changed`), or a file replaced since its
    shard was written (``stamps(range)``: the files' current ``[size, mtime_ns]``), the test a rerun
    of the extraction makes before it reuses a shard."""
    listed = image_list_changed(path, image_ids)
    if listed:
        return listed
    plan = read_json(Path(path) / PLAN_FILE)
    writer = StoreWriter(path, StorePlan(**{k: plan[k] for k in StorePlan.__dataclass_fields__}))
    changed = writer.changed_shards(range(writer.plan.num_shards), stamps)
    return f"image files of shard(s) {changed[:5]} were replaced since they were read" if changed else ""


def rows_writer(
    path: str | os.PathLike,
    rows: np.ndarray,
    class_names: Sequence[str],
    *,
    params: dict[str, Any],
    dtype: str = "float32",
    shard_images: int = 4096,
) -> StoreWriter:
    """A writer at ``path`` with every shard of ``rows`` (one row per image, computed elsewhere) written
    but the manifest not yet: `write_rows` finishes it. ``params`` say what the rows are (fingerprint)."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or len(class_names) != len(rows):
        raise ValueError(f"need a [images, dim] array and one class per row, got {rows.shape} and {len(class_names)}")
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if bad.size:
        raise ValueError(f"rows contain NaN/inf values; first bad rows: {bad[:5].tolist()}")
    plan = StorePlan(
        params=dict(params),
        image_ids=[f"row{i:07d}" for i in range(len(rows))],
        class_names=list(class_names),
        dim=int(rows.shape[1]),
        dtype=check_dtype(dtype),
        rows_per_image=1,
        shard_images=shard_images,
    )
    writer = StoreWriter(path, plan)
    writer.begin()
    for shard in range(plan.num_shards):
        span = plan.shard_range(shard)
        writer.write_shard(shard, rows[span.start : span.stop], list(span), [])
    return writer


def write_rows(
    path: str | os.PathLike, rows: np.ndarray, class_names: Sequence[str], **options: Any
) -> ActivationStore:
    """A finished store of rows computed elsewhere (e.g. `hierarchy.nested_activations`), one per
    image, so every function that reads extracted activations reads them too (options: `rows_writer`)."""
    return rows_writer(path, rows, class_names, **options).finalize()


class RowStore(Protocol):
    """What training, evaluation and scoring read from a store (an :class:`ActivationStore`, or any
    object offering the same): its width, its row count, its rows in batches and all at once."""

    @property
    def dim(self) -> int: ...

    def __len__(self) -> int: ...

    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[torch.Tensor]: ...

    def to_tensor(self) -> torch.Tensor: ...


#: Rows an SAE trains or is evaluated on: a tensor ``[N, d]`` or a store.
TrainingData = torch.Tensor | RowStore


class ActivationStore:
    """Read side of a finished store: rows memory-mapped from the shards, in dataset order."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self._arrays: list[np.ndarray] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = False) -> ActivationStore:
        """Open a finished store: its manifest is checked against its own digest and its shards'
        shapes; each shard's SHA-256 is checked when its rows are first read in this process
        (``verify=True``: every shard now, and the manifest's ``content_hash``)."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"activation store {path} does not exist")
        if not (path / MANIFEST_FILE).is_file():
            if (path / PLAN_FILE).is_file():
                raise StoreError(
                    f"{path}: extraction is incomplete (no manifest.json); rerun it with the same parameters to resume"
                )
            raise FileNotFoundError(f"{path} is not an activation store (no manifest.json)")
        store = cls(path, read_json(path / MANIFEST_FILE))
        store._check(verify)
        return store

    def _check(self, verify: bool) -> None:
        """Refuse a folder whose manifest and shards disagree, or whose manifest was edited."""
        m = self.manifest
        for key in ("shards", "image_ids", "class_names", "dim", "dtype", "rows_per_image", "rows"):
            if key not in m:
                raise StoreError(f"{self.path}/manifest.json lacks {key!r}")
        if m["rows"] != len(m["image_ids"]) * m["rows_per_image"] or m["rows"] != sum(s["rows"] for s in m["shards"]):
            raise StoreError(f"{self.path}: manifest row count {m['rows']} disagrees with its images and shards")
        if len(m["class_names"]) != len(m["image_ids"]) or len(set(m["image_ids"])) != len(m["image_ids"]):
            raise StoreError(f"{self.path}: manifest image ids are repeated or do not match its class names")
        if verify and m.get("content_hash") != _content_hash(m["shards"], m["image_ids"]):
            raise StoreError(f"{self.path}: manifest content_hash disagrees with its shards and image ids (edited?)")
        for shard in m["shards"]:
            file = self._shard_file(shard["file"])
            if not file.is_file():
                raise StoreError(f"{self.path}: shard {shard['file']} is missing")
            array = load_shard(file)
            if array.shape != (shard["rows"], m["dim"]) or array.dtype != DTYPES[m["dtype"]]:
                raise StoreError(
                    f"{self.path}: shard {shard['file']} has shape {array.shape} {array.dtype}, "
                    f"manifest says ({shard['rows']}, {m['dim']}) {m['dtype']}"
                )
            if verify and sha256_file(file) != shard["sha256"]:
                raise StoreError(f"{self.path}: shard {shard['file']} does not match its SHA-256 (corrupted)")
        recorded = m.get(MANIFEST_DIGEST_KEY)
        if recorded is not None and recorded != manifest_digest(m):
            raise StoreError(
                f"{self.path}/manifest.json was edited after the store was written (its {MANIFEST_DIGEST_KEY} "
                "disagrees); extract the store again"
            )

    def _shard_file(self, name: str) -> Path:
        """A manifest's shard file, which must lie in the store's ``shards/`` folder (never ``../x``
        or an absolute path: a manifest names files of its own store only)."""
        file = (self.path / str(name)).resolve()
        if Path(str(name)).is_absolute() or file.parent != (self.path / SHARD_DIR).resolve():
            raise StoreError(f"{self.path}: shard file {name!r} lies outside the store's {SHARD_DIR}/ folder")
        return file

    # --- the contract of CONTRIBUTING.md
    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def __repr__(self) -> str:
        return f"ActivationStore({self.path}, rows={len(self)}, dim={self.dim}, dtype={self.dtype})"

    @property
    def dim(self) -> int:
        """Width of each row."""
        return int(self.manifest["dim"])

    @property
    def dtype(self) -> str:
        """Storage dtype name (``float16`` or ``float32``)."""
        return str(self.manifest["dtype"])

    @property
    def image_ids(self) -> list[str]:
        """Id of each stored image (path relative to the data root), dataset order."""
        return list(self.manifest["image_ids"])

    @property
    def class_names(self) -> list[str]:
        """Class of each stored image."""
        return list(self.manifest["class_names"])

    @property
    def rows_per_image(self) -> int:
        """Rows per image (1 for cls/mean/projection, k for random_k, T for all)."""
        return int(self.manifest["rows_per_image"])

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(image id, reason)`` for every file that could not be used."""
        return [tuple(s) for s in self.manifest["skipped"]]

    @property
    def params(self) -> dict[str, Any]:
        """The extraction parameters (encoder, hook, layer, tokens, …)."""
        return dict(self.manifest["params"])

    @property
    def nbytes(self) -> int:
        """Size of the rows in bytes."""
        return len(self) * self.dim * np.dtype(DTYPES[self.dtype]).itemsize

    def row_image_index(self) -> np.ndarray:
        """Index into :attr:`image_ids` of every row."""
        return np.repeat(np.arange(len(self.manifest["image_ids"])), self.rows_per_image)

    def arrays(self) -> list[np.ndarray]:
        """The shards as read-only memory maps."""
        if self._arrays is None:
            arrays = []
            for shard in self.manifest["shards"]:
                file = self._shard_file(shard["file"])
                verify_shard_once(file, shard["sha256"])
                arrays.append(load_shard(file))
            self._arrays = arrays
        return self._arrays

    def to_numpy(self) -> np.ndarray:
        """All rows as one in-memory array in the storage dtype."""
        return np.concatenate([np.asarray(a) for a in self.arrays()], axis=0)

    def to_tensor(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All rows as one tensor ``[N, dim]``: each shard is read straight into place (one copy)."""
        storage = torch.from_numpy(np.empty(0, DTYPES[self.dtype])).dtype
        out = torch.empty((len(self), self.dim), dtype=storage)
        start = 0
        for shard in self.manifest["shards"]:
            stop = start + shard["rows"]
            file = self._shard_file(shard["file"])
            digest = _read_npy_into(file, out[start:stop].numpy(), needs_verification(file, shard["sha256"]))
            verify_shard_once(file, shard["sha256"], digest)
            start = stop
        return out if dtype == storage else out.to(dtype)

    def iter_batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        drop_last: bool = False,
    ) -> Iterator[torch.Tensor]:
        """Batches of rows: in order (streamed shard by shard), or shuffled with a seeded permutation."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if shuffle:
            yield from self._shuffled(batch_size, seed, dtype, drop_last)
            return
        pending: list[np.ndarray] = []
        pending_rows = 0
        for array in self.arrays():
            start = 0
            while start < len(array):
                take = min(batch_size - pending_rows, len(array) - start)
                pending.append(array[start : start + take])
                pending_rows += take
                start += take
                if pending_rows == batch_size:
                    yield _to_tensor(pending, dtype)
                    pending, pending_rows = [], 0
        if pending_rows and not drop_last:
            yield _to_tensor(pending, dtype)

    def _shuffled(self, batch_size: int, seed: int, dtype: torch.dtype, drop_last: bool) -> Iterator[torch.Tensor]:
        """Seeded global permutation; each batch gathers its rows from the memory maps shard by shard."""
        order = np.random.default_rng(seed).permutation(len(self))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            if drop_last and len(rows) < batch_size:
                return
            yield torch.from_numpy(self.rows_at(rows)).to(dtype)

    def rows_at(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """The rows at global ``positions`` (any order), read from the memory maps without loading the store."""
        rows = np.asarray(positions, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row positions must lie in 0..{len(self) - 1}")
        offsets = np.cumsum([0] + [len(a) for a in self.arrays()])
        out = np.empty((len(rows), self.dim), dtype=DTYPES[self.dtype])
        shard_of = np.searchsorted(offsets, rows, side="right") - 1
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            out[mask] = self.arrays()[shard][rows[mask] - offsets[shard]]
        return out

    def sample_rows(self, max_rows: int = 20_000, seed: int = 0) -> np.ndarray:
        """Every row when the store holds at most ``max_rows``, else a seeded uniform sample of that many
        (for statistics and plots that must not load 10⁹ values)."""
        if len(self) <= max_rows:
            return self.to_numpy()
        picks = np.sort(np.random.default_rng(seed).choice(len(self), size=max_rows, replace=False))
        return self.rows_at(picks)


def _to_tensor(parts: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    """Concatenate row blocks into one tensor."""
    array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return torch.from_numpy(np.array(array, copy=True)).to(dtype)
