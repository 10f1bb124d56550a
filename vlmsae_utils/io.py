"""Atomic writes, JSON and hashing: every file a run leaves behind is either complete or absent."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "LOCK_FILE",
    "FolderLockedError",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_writable",
    "folder_lock",
    "library_versions",
    "read_json",
    "read_yaml",
    "remove_entry",
    "sha256_file",
    "sha256_json",
]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write through ``write(handle)`` into a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, _default_file_mode())  # mkstemp makes 0600; results are shared like any file
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_umask() -> int:
    """The process umask (read once at import: setting it to read it is not thread-safe)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _default_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the process umask."""
    return 0o666 & ~_UMASK


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically replace ``path`` by ``data``."""
    return atomic_write(path, lambda stream: stream.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def read_yaml(text: str) -> Any:
    """YAML without anchors and aliases (``&a`` / ``*a``): safe types only, and no "billion laughs"
    document that is a few lines on disk and gigabytes once its aliases are expanded.

    Raises ``yaml.YAMLError`` (an alias names its line) like any other malformed document."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(
                    None, None, f"aliases (*name) are not allowed, line {mark.line + 1}", mark
                )
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliasLoader)  # a SafeLoader: safe types only


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of a JSON-serialisable object in canonical form."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def remove_entry(path: Path) -> None:
    """Delete a file, a link (never what it points to) or a folder tree; nothing when it is absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove it is writable, before any long work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(f"out_dir {folder} is not writable: {err.strerror or err}") from None
    return folder


def library_versions() -> dict[str, str]:
    """Versions of the libraries that determine the numbers in a run's outputs."""
    import importlib.metadata as md

    names = ("torch", "transformers", "open_clip_torch", "numpy", "pillow", "vlmsae-utils")
    versions = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """Atomically write a ``torch.save`` checkpoint (tensors and plain containers only)."""
    import torch

    return atomic_write(path, lambda stream: torch.save(obj, stream))


LOCK_FILE = ".lock"  # in a locked folder: names the process holding it


class FolderLockedError(RuntimeError):
    """Another process is writing the same folder."""


_HELD: dict[Path, int] = {}  # folders this process holds, with how many nested holders


@contextlib.contextmanager
def folder_lock(
    folder: str | os.PathLike,
    what: str = "folder",
    error: type[FolderLockedError] = FolderLockedError,
    *,
    blocking: bool = False,
) -> Iterator[None]:
    """Hold an advisory lock on ``folder`` (created if needed) for one process at a time; the lock
    dies with its process, so a killed run never leaves it behind. A second writer gets
    ``error`` (a ``FolderLockedError``) naming the holder (host and pid), never a silent
    interleaving; ``blocking=True`` waits for it instead (tasks of one job taking turns). Nested
    holds in the same process (a sweep cell running its notebook) are allowed."""
    import fcntl

    folder = Path(folder).resolve()
    if folder in _HELD:
        _HELD[folder] += 1
        try:
            yield
        finally:
            _HELD[folder] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the lock's lifetime
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise error(f"{what} {folder.name} is being written by {holder}; wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        _HELD[folder] = 1
        try:
            yield
        finally:
            del _HELD[folder]
    finally:
        handle.close()
