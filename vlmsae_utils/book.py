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

__all__ = [
    "ERROR_MARKERS",
    "PROBE",
    "book_dir",
    "browser_check",
    "build",
    "find_chromium",
    "missing_pages",
    "screenshot",
    "toc_files",
]


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
        raise FileNotFoundError(
            f"book pages missing: {missing}; run `python -m vlmsae_utils.run --all "
            f"--out {book / 'chapters'}` first (or `make notebooks`)"
        )
    command = [
        str(Path(sys.executable).with_name("jupyter-book")),
        "build",
        str(book),
        "--builder",
        builder,
        "-W",
        "-n",
        "--keep-going",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return book / "_build" / builder


# ----------------------------------------------------------------------------- browser check

PROBE = """<script>window.addEventListener("load", () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src);
  document.body.setAttribute("data-images", String(document.images.length));
  document.body.setAttribute("data-broken", broken.join(" "));
});</script>"""
ERROR_MARKERS = ("Traceback (most recent call last)", 'class="output traceback', 'class="output stderr')


def find_chromium() -> str | None:
    """Path of a Chromium binary (Debian ``chromium``), or ``None``."""
    import shutil

    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _headless(chromium: str, *arguments: str) -> str:
    """Run headless Chromium with the flags that work in containers; returns stdout."""
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--allow-file-access-from-files",
        "--virtual-time-budget=5000",
        *arguments,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout


def browser_check(page: Path, chromium: str | None = None) -> dict:
    """Render one built page in headless Chromium: how many images it shows, which failed to load,
    and whether it contains an error output or traceback."""
    import re

    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium not found (Debian: apt-get install chromium)")
    probe = page.with_name(f".probe-{page.name}")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    try:
        dom = _headless(chromium, "--dump-dom", probe.resolve().as_uri())
    finally:
        probe.unlink(missing_ok=True)
    body = re.search(r'<body[^>]*data-images="(\d+)"[^>]*data-broken="([^"]*)"', dom)
    if body is None:
        raise RuntimeError(f"{page}: the page did not finish loading in Chromium")
    return {
        "page": page.name,
        "images": int(body.group(1)),
        "broken": body.group(2).split(),
        "errors": [m for m in ERROR_MARKERS if m in dom],
        "math": dom.count("<mjx-container"),
        "raw_math": len(re.findall(r"\\\[|\\begin\{", _visible_text(dom))),
    }


def _visible_text(dom: str) -> str:
    """The page's text outside scripts and MathJax's own markup: LaTeX left here was not typeset."""
    import re

    dom = re.sub(r"<(script|style|mjx-container|mjx-assistive-mml)\b.*?</\1>", "", dom, flags=re.S)
    return re.sub(r"<[^>]+>", "", dom)


def screenshot(page: Path, target: Path, size: str = "1280,900", chromium: str | None = None) -> Path:
    """A PNG of a built page as headless Chromium draws it (for the README)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium not found (Debian: apt-get install chromium)")
    _headless(
        chromium,
        f"--screenshot={target.resolve()}",
        f"--window-size={size}",
        "--hide-scrollbars",
        page.resolve().as_uri(),
    )
    return target


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
