"""The book builds offline from executed notebooks and fails on missing pages."""

from __future__ import annotations

import shutil

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
