"""The book builds offline from executed notebooks and fails on missing pages."""

from __future__ import annotations

import json
import shutil

import nbformat
import pandas as pd
import pytest
import yaml

from vlmsae_utils import book


@pytest.fixture()
def book_copy(tmp_path):
    """A copy of book/ sources (config, toc, pages) without any build output."""
    target = tmp_path / "book"
    shutil.copytree(book.book_dir(), target, ignore=shutil.ignore_patterns("_build", "chapters"))
    return target


def test_missing_chapter_fails_with_a_hint(book_copy):
    with pytest.raises(FileNotFoundError, match="run --all"):
        book.build(book_copy)


@pytest.mark.slow
def test_book_builds_from_every_executed_chapter(book_copy, executed_chapters, built_book):
    toc = yaml.safe_load((book_copy / "_toc.yml").read_text())
    listed = [entry["file"].split("/")[-1] for entry in toc["chapters"] if entry["file"].startswith("chapters/")]
    executed = sorted(p.stem for p in executed_chapters.glob("*.ipynb"))
    assert listed == executed  # every notebook is a chapter and every chapter has a notebook
    html = built_book
    assert (html / "index.html").is_file()
    for stem in listed:
        page = (html / "chapters" / f"{stem}.html").read_text()
        assert "Traceback" not in page, stem
        assert ("<table" in page) if stem.startswith("07") else ("<img" in page), stem  # 07 is tables only
    assert "Data and models" in (html / "chapters" / "00_data_and_models.html").read_text()
    api = (html / "api.html").read_text()
    assert "monosemanticity_score" in api and "extract_activations" in api


def test_scrub_replaces_every_machine_folder_and_leaves_images(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMSAE_OUTPUTS", str(tmp_path / "out"))
    monkeypatch.setenv("VLMSAE_RESULTS", str(tmp_path / "out" / "res"))  # nested: its own name wins
    text = f"store {tmp_path}/out/extract/a and table {tmp_path}/out/res/x.csv"
    assert book.scrub_text(text) == "store <outputs>/extract/a and table <results>/x.csv"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f'path = "{tmp_path}/out/s"')])
    notebook.cells[0].outputs = [
        nbformat.v4.new_output("stream", name="stdout", text=f"wrote {tmp_path}/out/s\n"),
        nbformat.v4.new_output("display_data", data={"text/plain": f"{tmp_path}/out", "image/png": "iVBORw0KGgo="}),
    ]
    nbformat.write(notebook, tmp_path / "n.ipynb")
    cell = nbformat.read(book.scrub_notebook(tmp_path / "n.ipynb"), as_version=4).cells[0]
    assert cell.source == 'path = "<outputs>/s"' and cell.outputs[0].text == "wrote <outputs>/s\n"
    assert cell.outputs[1].data == {"text/plain": "<outputs>", "image/png": "iVBORw0KGgo="}


def test_each_chapter_shows_the_first_run_of_its_notebook(tmp_path):
    runs = [
        book.ExecutedRun(n, r, tmp_path / f"{n}.ipynb", "ran")
        for n, r in [
            ("01", "embed/scorer/val"),  # a scorer's embeddings come first in a sweep
            ("01", "extract/m/L2/train"),
            ("01", "extract/m/L2/val"),
            ("02", "train/a"),
            ("02", "train/b"),
            ("06", "results"),
        ]
    ]
    assert [r.run_id for r in book.representatives(runs)] == ["extract/m/L2/train", "train/a", "results"]


def test_a_book_of_nothing_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no sweep 'nope'.*run it first"):
        book.sweep_runs("nope")
    with pytest.raises(FileNotFoundError, match="holds no executed chapter"):
        book.folder_runs(tmp_path)


@pytest.mark.slow
def test_book_of_the_fixture_sweep_travels(fixture_results, tmp_path):
    from vlmsae_utils import sweep
    from vlmsae_utils.paths import outputs_root, repo_root

    sweep.execute_results_chapter("fixture")
    html = book.build_from_sweep("fixture", tmp_path / "sweep-book")
    chapters = sorted(p.stem for p in (html / "chapters").glob("*.html"))
    assert chapters == ["01_extract", "02_train", "03_monosemanticity", "04_hierarchy", "05_steer", "06_results"]
    results = (html / "chapters" / "06_results.html").read_text()
    assert "sweep fixture: 8 SAE runs" in results  # its own results tables, not the demo's
    status = pd.read_csv(sweep.sweep_dir("fixture") / sweep.RUNS_FILE)
    runs_page = (html / "runs.html").read_text()
    assert all(run in runs_page for run in status.run)
    manifest = json.loads((sweep.sweep_dir("fixture") / status.run[1] / "activations" / "manifest.json").read_text())
    assert manifest["content_hash"][:16] in (html / "intro.html").read_text()  # intro: what was run
    machine = [str(outputs_root().parent), str(repo_root())]
    for page in html.rglob("*.html"):
        text = page.read_text()
        assert not any(folder in text for folder in machine), page  # no machine path on any page
    if book.find_chromium() is not None:
        for page in [html / "intro.html", *sorted((html / "chapters").glob("*.html"))]:
            report = book.browser_check(page)
            assert report["broken"] == [] and report["errors"] == [] and report["raw_math"] == 0, report


def test_assemble_never_deletes_a_folder_it_did_not_make(tmp_path):
    executed = tmp_path / "runs" / "01_extract.ipynb"
    executed.parent.mkdir()
    nbformat.write(nbformat.v4.new_notebook(), executed)
    runs = [book.ExecutedRun("01", "01_extract", executed, "ran")]
    with pytest.raises(ValueError, match="holds the book's sources or an executed run"):
        book.assemble(runs, tmp_path / "runs", "t")  # --out pointing at its own input
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="is not a book assembled here"):
        book.assemble(runs, keep, "t")
    assert (keep / "thesis.tex").is_file() and executed.is_file()
    first = book.assemble(runs, tmp_path / "book", "t")
    (first / "CNAME").write_text("book.example.org\n")  # added by the user for their site: kept
    (first / "chapters" / "stale.ipynb").write_text("{}")  # an earlier assembly's chapter: gone
    assert book.assemble(runs, first, "again") == first  # its own earlier book is replaced
    assert "again" in (first / "intro.md").read_text() and (first / "CNAME").read_text() == "book.example.org\n"
    assert sorted(p.name for p in (first / "chapters").iterdir()) == ["01_extract.ipynb"]
    assert book.main(["--from-dir", str(tmp_path / "runs"), "--out", str(keep)]) == 1  # one line, no traceback


def test_scrub_reaches_papermill_metadata_and_pages_show_placeholders(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMSAE_OUTPUTS", str(tmp_path / "out"))
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["papermill"] = {
        "parameters": {"out_dir": f"{tmp_path}/out/x"},
        "input_path": "/tmp/tmpk2x9/01_extract.ipynb",  # papermill's temporary copy: no machine folder named
        "output_path": f"{tmp_path}/out/n",
    }
    nbformat.write(notebook, tmp_path / "n.ipynb")
    scrubbed = (book.scrub_notebook(tmp_path / "n.ipynb")).read_text()
    assert str(tmp_path) not in scrubbed and "tmpk2x9" not in scrubbed
    run = book.ExecutedRun("01", "extract/a", tmp_path / "n.ipynb", "ran", {"out_dir": f"{tmp_path}/out/x"})
    page = book._runs_page([run])
    assert "`out_dir=<outputs>/x`" in page  # a code span: MyST would read a bare <outputs> as an HTML tag


def test_a_failed_run_never_stands_for_a_chapter(tmp_path):
    runs = [
        book.ExecutedRun("02", "train/a", tmp_path / "a.ipynb", "failed"),
        book.ExecutedRun("02", "train/b", tmp_path / "b.ipynb", "done earlier"),
    ]
    assert [r.run_id for r in book.representatives(runs)] == ["train/b"]
