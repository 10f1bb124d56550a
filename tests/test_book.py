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
def test_book_builds_from_executed_notebooks(book_copy, executed_00):
    chapters = book_copy / "chapters"
    chapters.mkdir()
    toc = yaml.safe_load((book_copy / "_toc.yml").read_text())
    toc["chapters"] = [{"file": "chapters/00_data_and_models"}]  # only the chapter executed here
    (book_copy / "_toc.yml").write_text(yaml.safe_dump(toc))
    shutil.copy(executed_00, chapters / executed_00.name)
    html = book.build(book_copy)
    assert (html / "index.html").is_file()
    page = (html / "chapters" / "00_data_and_models.html").read_text()
    assert "<img" in page and "Traceback" not in page
    assert "Data and models" in page
