"""Build the Jupyter Book from notebooks the runner has already executed.

``python -m vlmsae_utils.book`` checks that every chapter in ``book/_toc.yml`` exists as
an executed notebook, then runs Jupyter Book 1 with warnings as errors, so a broken
reference or a missing page fails the build.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from .paths import repo_root


def book_dir() -> Path:
    """The ``book/`` folder of the source checkout."""
    root = repo_root()
    if root is None:
        raise FileNotFoundError("book/ not found: run from a source checkout (pip install -e .)")
    return root / "book"


def toc_files(book: Path) -> list[str]:
    """Every file named in ``_toc.yml`` (root and chapters), without suffix."""
    toc = yaml.safe_load((book / "_toc.yml").read_text())
    files = [toc["root"]]
    for entry in toc.get("chapters", []) + [c for part in toc.get("parts", []) for c in part["chapters"]]:
        files.append(entry["file"])
    return files


def missing_pages(book: Path) -> list[str]:
    """Table-of-contents entries with no ``.md`` or ``.ipynb`` file behind them."""
    return [f for f in toc_files(book) if not any((book / f"{f}{s}").is_file() for s in (".md", ".ipynb"))]


def build(book: Path | None = None, *, builder: str = "html") -> Path:
    """Run ``jupyter-book build`` with warnings as errors; returns the output folder."""
    book = book or book_dir()
    missing = missing_pages(book)
    if missing:
        raise FileNotFoundError(f"book pages missing: {missing}; run `python -m vlmsae_utils.run --all "
                                f"--out {book / 'chapters'}` first (or `make notebooks`)")
    command = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(book),
               "--builder", builder, "-W", "-n", "--keep-going"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return book / "_build" / builder


def main() -> int:
    """Entry point; prints where the book is."""
    try:
        out = build()
    except (FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"book: {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
