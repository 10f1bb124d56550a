"""The activation store on disk: format version, dtypes, file names, the plan of one extraction and
the checks a shard and a plan get before they are read or reused."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .io import read_json, sha256_file, sha256_json
from .paths import moved_home_path

__all__ = [
    "DTYPES",
    "MANIFEST_DIGEST_KEY",
    "MANIFEST_FILE",
    "PLAN_FILE",
    "SHARD_DIR",
    "STORE_FORMAT",
    "StoreError",
    "StorePlan",
    "check_dtype",
    "load_shard",
    "manifest_digest",
    "needs_verification",
    "shard_name",
    "verify_shard_once",
]


STORE_FORMAT = 1
DTYPES = {"float16": np.float16, "float32": np.float32}
PLAN_FILE, MANIFEST_FILE, SHARD_DIR = "plan.json", "manifest.json", "shards"


class StoreError(ValueError):
    """A store folder that is incomplete, inconsistent, or was made with other parameters."""


def check_dtype(dtype: str) -> str:
    """Validate a storage dtype name."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return dtype


def shard_name(index: int) -> str:
    """File stem of shard ``index``."""
    return f"shard-{index:05d}"


@dataclass(frozen=True)
class StorePlan:
    """What one extraction writes: parameters (the fingerprint), the image list and the sharding."""

    params: dict[str, Any]
    image_ids: list[str]
    class_names: list[str]
    dim: int
    dtype: str
    rows_per_image: int
    shard_images: int

    @property
    def num_shards(self) -> int:
        """Number of shards the image list is cut into."""
        return max(1, -(-len(self.image_ids) // self.shard_images))

    def shard_range(self, shard: int) -> range:
        """Dataset image indices of one shard."""
        start = shard * self.shard_images
        return range(start, min(start + self.shard_images, len(self.image_ids)))

    def to_json(self) -> dict[str, Any]:
        """The plan as written to ``plan.json``."""
        return {
            "format": STORE_FORMAT,
            "params": self.params,
            "image_ids": self.image_ids,
            "class_names": self.class_names,
            "dim": self.dim,
            "dtype": self.dtype,
            "rows_per_image": self.rows_per_image,
            "shard_images": self.shard_images,
            "fingerprint": self.fingerprint(),
        }

    def fingerprint(self) -> str:
        """Hash of everything that determines the store's content."""
        return sha256_json(
            {
                "params": self.params,
                "image_ids": self.image_ids,
                "dim": self.dim,
                "dtype": self.dtype,
                "rows_per_image": self.rows_per_image,
                "shard_images": self.shard_images,
            }
        )


def _content_hash(shards: list[dict[str, Any]], image_ids: list[str]) -> str:
    """The store's identity: its shards' SHA-256 in order and its image ids in order."""
    return sha256_json({"shards": [s["sha256"] for s in shards], "image_ids": image_ids})


#: The manifest key holding the SHA-256 of the rest of the manifest (stores written before it lack it).
MANIFEST_DIGEST_KEY = "manifest_sha256"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of a manifest without its own digest: a hand edit (labels, parameters, image order,
    class names) after the store was written shows as a mismatch."""
    return sha256_json({key: value for key, value in manifest.items() if key != MANIFEST_DIGEST_KEY})


#: Shards whose bytes matched their manifest's SHA-256 in this process, by (path, size, mtime, digest).
_VERIFIED: set[tuple[str, int, int, str]] = set()


def _verified_key(file: Path, expected: str) -> tuple[str, int, int, str]:
    info = file.stat()
    return (str(file), info.st_size, info.st_mtime_ns, expected)


def needs_verification(file: Path, expected: str) -> bool:
    """Whether this process has not yet checked ``file`` (as it is now) against ``expected``."""
    return _verified_key(file, expected) not in _VERIFIED


def verify_shard_once(file: Path, expected: str, computed: str | None = None) -> None:
    """Refuse a shard whose bytes differ from the SHA-256 its manifest records. Each file is hashed
    once per process (again when its size or modification time changes); ``computed`` is a digest
    already taken while reading it, which saves a second pass over the file."""
    key = _verified_key(file, expected)
    if key in _VERIFIED:
        return
    if (computed if computed is not None else sha256_file(file)) != expected:
        raise StoreError(
            f"shard {file} does not match the SHA-256 in its manifest (corrupted or replaced); extract the store again"
        )
    _VERIFIED.add(key)


def load_shard(file: Path) -> np.ndarray:
    """A shard's rows, memory-mapped; a truncated or unreadable file is a `StoreError` naming it
    (numpy's own message, "mmap length is greater than file size", names no file)."""
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise StoreError(f"shard {file} is truncated or unreadable ({err})") from None


def _same_store_in_a_moved_home(old: dict[str, Any], plan: StorePlan) -> bool:
    """A store recorded with the absolute data root of a data home that has since moved or been
    copied (before roots were recorded as ``$VLMSAE_HOME/…``) is the same store when that root is
    the only difference: its shards' file stamps still decide what is read again."""
    recorded, now = old.get("params", {}).get("data_root"), plan.params.get("data_root")
    if not isinstance(recorded, str) or not isinstance(now, str) or not moved_home_path(recorded, now):
        return False
    as_recorded = StorePlan(**{**plan.__dict__, "params": {**plan.params, "data_root": recorded}})
    return bool(old.get("fingerprint") == as_recorded.fingerprint())


def _refuse_if_different(existing: Path, plan: StorePlan) -> None:
    """Refuse to write into a folder that holds a store made with other parameters."""
    old = read_json(existing)
    if old.get("fingerprint") == plan.fingerprint() or _same_store_in_a_moved_home(old, plan):
        return
    new = plan.to_json()
    changed = sorted(
        k for k in set(old.get("params", {})) | set(plan.params) if old.get("params", {}).get(k) != plan.params.get(k)
    )
    changed += [k for k in ("dim", "dtype", "rows_per_image", "shard_images", "image_ids") if old.get(k) != new[k]]
    raise StoreError(
        f"{existing.parent} already holds a store made with different parameters "
        f"(differs in: {', '.join(changed) or 'format'}). Use another out_dir or delete that folder."
    )


def _as_storage(rows: np.ndarray, dtype: type, what: str) -> np.ndarray:
    """``rows`` in the storage dtype; values finite before but not after (beyond float16's ±65,504)
    are an error, never stored as inf."""
    with np.errstate(over="ignore"):  # an overflow is reported below, naming the shard
        stored: np.ndarray = np.ascontiguousarray(rows, dtype=dtype)
    if stored.dtype != rows.dtype and not np.isfinite(stored).all():
        overflow = np.isfinite(rows) & ~np.isfinite(stored)
        if overflow.any():
            largest = float(np.abs(rows[overflow]).max())
            raise ValueError(
                f"{what}: values up to {largest:.4g} overflow {np.dtype(dtype).name} (max "
                f"{float(np.finfo(dtype).max):.6g}); store this layer as float32"
            )
    return stored


def _read_npy_into(path: Path, target: np.ndarray, digest: bool = False) -> str | None:
    """Read the rows of a C-ordered ``.npy`` file into ``target`` (same shape and dtype) without a
    temporary; with ``digest``, return the file's SHA-256 taken on the way (no second read)."""
    with open(path, "rb") as stream:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
        if shape != target.shape or fortran or dtype != target.dtype:
            raise StoreError(f"{path}: holds {shape} {dtype}, expected {target.shape} {target.dtype}")
        header_end = stream.tell()
        if target.size and stream.readinto(memoryview(target.data).cast("B")) != target.nbytes:
            raise StoreError(f"{path} is truncated")
        if not digest:
            return None
        hasher = hashlib.sha256()
        stream.seek(0)
        hasher.update(stream.read(header_end))
        if target.size:
            hasher.update(memoryview(target.data).cast("B"))
        stream.seek(header_end + target.nbytes)
        hasher.update(stream.read())  # bytes past the rows (none in a shard written here) count too
        return hasher.hexdigest()
