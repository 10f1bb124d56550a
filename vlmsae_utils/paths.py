"""Where the embedded fixture and run outputs live on disk."""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path

__all__ = [
    "HOME_TOKEN",
    "data_home",
    "expand_home",
    "moved_home_path",
    "outputs_root",
    "portable_path",
    "repo_root",
    "resolve_out_dir",
    "results_root",
    "safe_stem",
]


def data_home() -> Path:
    """Data home of the fixtures: ``$VLMSAE_HOME`` or ``~/.cache/vlmsae``."""
    return Path(os.environ.get("VLMSAE_HOME", Path.home() / ".cache" / "vlmsae")).expanduser()


#: How a recorded path inside the data home names it, so the record survives a moved or copied home.
HOME_TOKEN = "$VLMSAE_HOME"


def portable_path(path: Path) -> str:
    """``path`` as a record keeps it: inside the data home as ``$VLMSAE_HOME/<relative>`` (valid after
    the home is moved or copied to another machine), anywhere else as the absolute path."""
    home, path = data_home().resolve(), path.resolve()
    return f"{HOME_TOKEN}/{path.relative_to(home).as_posix()}" if path.is_relative_to(home) else str(path)


def expand_home(recorded: str) -> Path:
    """The folder a recorded path names here (``$VLMSAE_HOME/…`` under this machine's data home)."""
    if recorded == HOME_TOKEN or recorded.startswith(HOME_TOKEN + "/"):
        return data_home() / recorded[len(HOME_TOKEN) :].lstrip("/")
    return Path(recorded)


def moved_home_path(recorded: str, portable: str) -> bool:
    """Whether an absolute path recorded before data-home paths were portable names the same place as
    ``portable`` (``$VLMSAE_HOME/<relative>``) in a home that has since moved: same trailing folders."""
    if not portable.startswith(HOME_TOKEN + "/") or not Path(recorded).is_absolute():
        return False
    tail = Path(portable[len(HOME_TOKEN) + 1 :]).parts
    return Path(recorded).parts[-len(tail) :] == tail


def repo_root() -> Path | None:
    """The source checkout this package was installed from (editable install), if any."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir() else None


def outputs_root() -> Path:
    """Root of run outputs: ``$VLMSAE_OUTPUTS``, else ``<repo>/outputs``, else ``<data home>/outputs``."""
    if "VLMSAE_OUTPUTS" in os.environ:
        return Path(os.environ["VLMSAE_OUTPUTS"]).expanduser()
    root = repo_root()
    return (root / "outputs") if root is not None else data_home() / "outputs"


def resolve_out_dir(out_dir: str | os.PathLike) -> Path:
    """Absolute output folder: relative names are placed under :func:`outputs_root`."""
    path = Path(out_dir).expanduser()
    return path if path.is_absolute() else outputs_root() / path


def results_root() -> Path:
    """Root of gathered sweep tables: ``$VLMSAE_RESULTS``, else ``<repo>/results``, else ``<data home>/results``."""
    if "VLMSAE_RESULTS" in os.environ:
        return Path(os.environ["VLMSAE_RESULTS"]).expanduser()
    root = repo_root()
    return (root / "results") if root is not None else data_home() / "results"


_STEM_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def safe_stem(name: str, *, max_len: int = 100) -> str:
    """A safe, readable, unique file stem for a user-supplied name (model, hub id, folder, label).

    The stem uses only ``[A-Za-z0-9._-]``: accents are folded to ASCII (``é`` → ``e``), every
    run of other characters (``/``, ``:``, spaces, …) becomes one ``_``, and leading or trailing
    ``.``, ``_`` and ``-`` are stripped (so never a hidden file, ``.`` or ``..``). A name that is
    already safe (and at most ``max_len`` long) is returned unchanged; any other name gets
    ``-`` and the first 8 hex digits of the SHA-1 of its UTF-8 text appended, so two different
    names never share a stem even when their readable parts agree (``a/b`` and ``a_b``). The
    result is never empty and at most ``max_len`` characters long::

        safe_stem("fixture_mini_clip")                   # 'fixture_mini_clip'
        safe_stem("openai/clip-vit-large-patch14-336")   # 'openai_clip-vit-large-patch14-336-<hash>'
        safe_stem("/data/models/clip")                   # 'data_models_clip-<hash>'
        safe_stem("..")                                  # 'name-<hash>'

    Keep the real name beside the file (a manifest field or a table column): the stem is for
    the file system only. Names differing only in case stay distinct stems, which a
    case-insensitive file system may still merge.
    """
    name = str(name)
    if max_len < 16:
        raise ValueError(f"max_len must be >= 16, got {max_len}")
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    slug = _STEM_UNSAFE.sub("_", ascii_name).strip("._-")
    if slug and slug == name and len(slug) <= max_len and slug.split(".")[0].upper() not in _WINDOWS_RESERVED:
        return slug
    digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    slug = slug[: max_len - len(digest) - 1].rstrip("._-") or "name"
    return f"{slug}-{digest}"
