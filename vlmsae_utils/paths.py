"""Where the embedded fixture and run outputs live on disk."""
from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    """Data home of the fixtures: ``$VLMSAE_HOME`` or ``~/.cache/vlmsae``."""
    return Path(os.environ.get("VLMSAE_HOME", Path.home() / ".cache" / "vlmsae")).expanduser()


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
