"""Build the Jupyter Book from notebooks the runner has already executed.

``python -m vlmsae_utils.book`` checks that every chapter in ``book/_toc.yml`` exists as
an executed notebook, then runs Jupyter Book 1 with warnings as errors, so a broken
reference or a missing page fails the build. ``--from-sweep NAME`` builds a book of a sweep's
own executed runs and results, ``--from-dir DIR`` one of notebooks executed by hand
(``python -m vlmsae_utils.run ... --out DIR``); neither executes anything. Every page is scrubbed
of machine paths (outputs, results, data home, checkout, home folder), so the site travels;
``--publish`` pushes it to a ``gh-pages`` branch with ``ghp-import``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import nbformat
import pandas as pd
import yaml

from .io import remove_entry
from .paths import data_home, outputs_root, repo_root, results_root
from .stages import book_rank, chapter_of

__all__ = [
    "ERROR_MARKERS",
    "PROBE",
    "ExecutedRun",
    "assemble",
    "book_dir",
    "browser_check",
    "build",
    "build_from_dir",
    "build_from_sweep",
    "build_parser",
    "find_chromium",
    "folder_runs",
    "machine_paths",
    "main",
    "missing_pages",
    "publish",
    "representatives",
    "screenshot",
    "scrub_notebook",
    "scrub_text",
    "sweep_runs",
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
    for chapter in sorted((book / "chapters").glob("*.ipynb")):
        scrub_notebook(chapter)  # no machine path on any page
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


# ----------------------------------------------------------------------------- pages that travel


BOOK_MARKER = ".vlmsae-book"  # in every assembled book folder: only such a folder is replaced
USABLE_STATES = ("ran", "done earlier", "done")  # runs whose notebook may stand for a chapter


def machine_paths() -> dict[str, str]:
    """Absolute folders of this machine and the placeholder each becomes on a page (longest first,
    so a folder inside another gets its own name)."""
    named = {outputs_root(): "<outputs>", results_root(): "<results>", data_home(): "<data home>", Path.home(): "~"}
    repo = repo_root()
    if repo is not None:
        named[repo] = "<repo>"
    pairs = {}
    for folder, name in named.items():
        for form in {str(folder), str(Path(folder).resolve())}:
            if len(form) > 1:
                pairs[form] = name
    return dict(sorted(pairs.items(), key=lambda item: -len(item[0])))


def scrub_text(text: str, paths: dict[str, str] | None = None) -> str:
    """``text`` with every machine folder replaced by its placeholder."""
    for folder, name in (paths or machine_paths()).items():
        text = text.replace(folder, name)
    return text


def _scrub_value(value, paths: dict[str, str]):
    """A notebook field (text, list of lines, or nested dict) with machine folders replaced."""
    if isinstance(value, str):
        return scrub_text(value, paths)
    if isinstance(value, list):
        return [_scrub_value(v, paths) for v in value]
    if isinstance(value, dict):
        return {k: (v if k.startswith("image/") else _scrub_value(v, paths)) for k, v in value.items()}
    return value


def scrub_notebook(path: Path) -> Path:
    """Rewrite an executed notebook so no metadata, cell source or text output names a machine
    folder (images untouched); returns the path."""
    notebook = nbformat.read(path, as_version=4)
    paths = machine_paths()
    papermill = notebook.metadata.get("papermill")
    if isinstance(papermill, dict):  # its temporary input and the output path say nothing to a reader
        for key in ("input_path", "output_path"):
            if papermill.get(key):
                papermill[key] = Path(str(papermill[key])).name
    notebook.metadata = nbformat.from_dict(_scrub_value(dict(notebook.metadata), paths))  # papermill's paths
    for cell in notebook.cells:
        cell.source = scrub_text(cell.source, paths)
        cell.metadata = nbformat.from_dict(_scrub_value(dict(cell.metadata), paths))
        for output in cell.get("outputs", []):
            for key in ("text", "data", "traceback", "evalue"):
                if key in output:
                    output[key] = _scrub_value(output[key], paths)
    nbformat.write(notebook, path)
    return path


# ----------------------------------------------------------------------------- a book of your own runs


@dataclass
class ExecutedRun:
    """One executed notebook of a sweep or a folder: which chapter, where, with what."""

    notebook: str  # "01" … "06"
    run_id: str  # the run's folder under the sweep (or the file name for --from-dir)
    executed: Path  # the executed .ipynb
    state: str = ""  # the sweep's status of the run
    parameters: dict | None = None


def _executed_notebook(folder: Path, notebook: str) -> Path | None:
    """The executed ``NN_*.ipynb`` of a run folder (``notebook`` a number or a notebook's path), if any."""
    return next(iter(sorted(folder.glob(f"{chapter_of(notebook)}_*.ipynb"))), None)


def sweep_runs(name: str) -> list[ExecutedRun]:
    """Every run of sweep ``name`` in its order (``runs.csv`` of its last run), with its executed
    notebook, then its results chapter; runs without an executed notebook are left out."""
    from .sweep import DONE_FILE, RESULTS_NOTEBOOK, RUNS_FILE, sweep_dir

    root = sweep_dir(name)
    if not (root / RUNS_FILE).is_file():
        raise FileNotFoundError(
            f"no sweep {name!r} under {root.parent}: run it first "
            f"(python -m vlmsae_utils.run --config configs/{name}.yaml)"
        )
    runs = []
    for row in pd.read_csv(root / RUNS_FILE, dtype=str).fillna("").itertuples():
        executed = _executed_notebook(root / row.run, row.notebook)
        if executed is not None:
            marker = root / row.run / DONE_FILE
            parameters = json.loads(marker.read_text())["parameters"] if marker.is_file() else None
            runs.append(ExecutedRun(chapter_of(row.notebook), row.run, executed, row.status, parameters))
    results = _executed_notebook(root / "results", RESULTS_NOTEBOOK)
    if results is None and not (results_root() / name / "sae.csv").is_file():
        return runs  # no SAE table (a steering-only sweep): no results chapter to show
    if results is None:
        raise FileNotFoundError(
            f"sweep {name!r} has no executed results chapter: rerun "
            f"`python -m vlmsae_utils.run --config <its config>` (finished runs are skipped)"
        )
    return [*runs, ExecutedRun(RESULTS_NOTEBOOK, "results", results, "ran")]


def folder_runs(folder: Path) -> list[ExecutedRun]:
    """Notebooks executed by hand into ``folder`` (``NN_name.ipynb``), in chapter order."""
    executed = sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb"))
    if not executed:
        raise FileNotFoundError(
            f"{folder} holds no executed chapter (NN_name.ipynb); write them with "
            f"python -m vlmsae_utils.run NOTEBOOK --out {folder}"
        )
    return [ExecutedRun(p.name[:2], p.stem, p, "ran") for p in executed]


def representatives(runs: list[ExecutedRun]) -> list[ExecutedRun]:
    """One run per chapter: the first of its notebook in the sweep's order (the config's first model,
    layer, SAE type and expansion), by its stage's ``book_rank`` first (a model's extraction before a
    scorer's embeddings), among the runs that finished — the rule a sweep book states on its front page."""
    chosen: dict[str, ExecutedRun] = {}
    usable = [r for r in runs if r.state in USABLE_STATES]  # never a failed run's page
    for run in sorted(usable, key=lambda r: book_rank(r.run_id)):  # stable: keeps the sweep's order
        chosen.setdefault(run.notebook, run)
    return [chosen[n] for n in sorted(chosen)]


def _cell(value) -> str:
    """A table cell: text as is, anything with a placeholder or markup characters as a code span
    (``<outputs>`` would otherwise be read as an HTML tag and vanish)."""
    text = str(value).replace("|", "\\|")
    return f"`{text}`" if any(c in text for c in "<>*_[]`") and "`" not in text else text


def _markdown_table(rows: list[dict]) -> str:
    """A pipe table of dicts with the same keys."""
    if not rows:
        return "(none)\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _versions() -> list[dict]:
    """Versions of the packages a reader needs to reproduce the pages."""
    rows = [{"package": "python", "version": platform.python_version()}]
    for package in ("vlmsae-utils", "torch", "transformers", "open_clip_torch", "jupyter-book"):
        try:
            rows.append({"package": package, "version": metadata.version(package)})
        except metadata.PackageNotFoundError:
            rows.append({"package": package, "version": "not installed"})
    return rows


def _store_hashes(runs: list[ExecutedRun], root: Path) -> list[dict]:
    """Content hashes of the activation stores the runs wrote (from their manifests)."""
    rows = []
    for run in runs:
        manifest = root / run.run_id / "activations" / "manifest.json"
        if manifest.is_file():
            content = json.loads(manifest.read_text())
            rows.append(
                {
                    "store": run.run_id,
                    "rows": content.get("rows", ""),
                    "dim": content.get("dim", ""),
                    "content hash": str(content.get("content_hash", ""))[:16],
                }
            )
    return rows


def _front_page(title: str, runs: list[ExecutedRun], chosen: list[ExecutedRun], root: Path | None) -> str:
    """The intro page of a book of one's own runs: what was run, the chapter rule, versions, hashes."""
    chapters = [{"chapter": r.executed.stem, "run shown": r.run_id} for r in chosen]
    models = sorted({str((r.parameters or {}).get("model", "")) for r in runs if r.notebook == "01"} - {""})
    text = [
        f"# {title}\n",
        "This book shows executed notebooks of one set of runs; nothing was re-executed to "
        "build it. Each chapter is the first run of its notebook in the sweep's order (its config's first "
        "model, layer, SAE type and expansion; for chapter 1 a model's extraction rather than a scorer's "
        "embeddings); [all runs](runs.md) lists the others.\n",
        f"**Runs:** {len(runs)} executed notebooks.",
        f"**Models and scorers:** {', '.join(models) or '—'}.\n",
        "## Chapters\n",
        _markdown_table(chapters),
        "## Versions\n",
        _markdown_table(_versions()),
    ]
    if root is not None:
        text += ["## Activation stores\n", _markdown_table(_store_hashes(runs, root))]
    text += ["```{tableofcontents}\n```\n"]
    return scrub_text("\n".join(text))


def _runs_page(runs: list[ExecutedRun]) -> str:
    """Every run with its state and parameters (the index of runs not shown as chapters)."""
    rows = [
        {
            "run": r.run_id,
            "notebook": r.notebook,
            "state": r.state,
            "parameters": ", ".join(f"{k}={v}" for k, v in (r.parameters or {}).items()),
        }
        for r in runs
    ]
    return scrub_text("# All runs\n\n" + _markdown_table(rows))


def assemble(runs: list[ExecutedRun], target: Path, title: str, root: Path | None = None) -> Path:
    """A book folder at ``target``: this book's configuration and API page, the chosen executed
    notebooks as chapters (`build` scrubs them), a front page and a runs page; returns ``target``."""
    chosen = representatives(runs)
    _clear_book_folder(target, runs)
    shutil.copytree(
        book_dir(), target, ignore=shutil.ignore_patterns(*_ASSEMBLED, "_build", "chapters"), dirs_exist_ok=True
    )
    (target / "chapters").mkdir()
    for run in chosen:
        shutil.copy2(run.executed, target / "chapters" / run.executed.name)
    (target / "intro.md").write_text(_front_page(title, runs, chosen, root))
    (target / "runs.md").write_text(_runs_page(runs))
    toc = {
        "format": "jb-book",
        "root": "intro",
        "chapters": [{"file": f"chapters/{r.executed.stem}"} for r in chosen] + [{"file": "runs"}, {"file": "api"}],
    }
    (target / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    (target / BOOK_MARKER).write_text("assembled by python -m vlmsae_utils.book; safe to delete\n")
    return target


#: What assembling writes at the top of a book folder besides the book's own files (``book/``).
_ASSEMBLED = ("intro.md", "runs.md", "_toc.yml", BOOK_MARKER)


def _clear_book_folder(target: Path, runs: list[ExecutedRun]) -> None:
    """Remove what an earlier assembly wrote at ``target`` (the book's files, chapters, build) and
    keep what a user added there (a ``CNAME``, notes); refuse any other existing folder, and any
    target that holds this book's sources or an executed run (``--out`` must not eat its input)."""
    target = Path(target).resolve()
    protected = [book_dir().resolve(), *(r.executed.resolve().parent for r in runs)]
    if any(p == target or target in p.parents for p in protected):
        raise ValueError(f"--out {target} holds the book's sources or an executed run; choose an empty folder")
    if not target.exists():
        return
    if not (target / BOOK_MARKER).is_file() and any(target.iterdir()):
        raise ValueError(f"--out {target} exists and is not a book assembled here; choose an empty folder")
    for name in {*_ASSEMBLED, "_build", "chapters", *(p.name for p in book_dir().iterdir())}:
        remove_entry(target / name)


def build_from_sweep(name: str, target: Path | None = None) -> Path:
    """Assemble and build the book of sweep ``name``; returns the HTML folder."""
    from .sweep import sweep_dir

    target = target or outputs_root() / "books" / name
    return build(assemble(sweep_runs(name), target, f"Sweep {name}", sweep_dir(name)))


def build_from_dir(folder: Path, target: Path | None = None) -> Path:
    """Assemble and build the book of notebooks executed by hand into ``folder``; returns the HTML folder."""
    folder = Path(folder)
    target = target or outputs_root() / "books" / folder.name
    return build(assemble(folder_runs(folder), target, f"Runs in {folder.name}"))


def publish(html: Path) -> None:
    """Push a built site to the ``gh-pages`` branch of the current repository (ghp-import)."""
    ghp = shutil.which("ghp-import") or str(Path(sys.executable).with_name("ghp-import"))
    if not Path(ghp).exists():
        raise FileNotFoundError("ghp-import not found: pip install ghp-import (or the book extra)")
    subprocess.run([ghp, "--no-jekyll", "--push", "--force", str(html)], check=True)


def build_parser() -> argparse.ArgumentParser:
    """Command line of ``python -m vlmsae_utils.book``."""
    parser = argparse.ArgumentParser(prog="python -m vlmsae_utils.book", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--from-sweep", metavar="NAME", help="a book of the sweep's executed runs and results")
    source.add_argument("--from-dir", metavar="DIR", type=Path, help="a book of notebooks executed by hand into DIR")
    parser.add_argument("--out", type=Path, help="where the book folder goes (default <outputs>/books/<name>)")
    parser.add_argument("--publish", action="store_true", help="push the built site to gh-pages with ghp-import")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints where the book is."""
    args = build_parser().parse_args(argv)
    try:
        if args.from_sweep:
            out = build_from_sweep(args.from_sweep, args.out)
        elif args.from_dir:
            out = build_from_dir(args.from_dir, args.out)
        else:
            out = build()
        if args.publish:
            publish(out)
    except (FileNotFoundError, ValueError, RuntimeError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"book: {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
