"""The built book in a real browser: headless Chromium loads every page's images, no error outputs."""

from __future__ import annotations

import logging

import pytest

from vlmsae_utils import book

log = logging.getLogger(__name__)


@pytest.mark.slow
def test_every_page_renders_in_chromium(built_book):
    if book.find_chromium() is None:
        log.warning("chromium not installed (apt-get install chromium): browser check skipped")
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    pages = [built_book / "intro.html", built_book / "api.html", *sorted((built_book / "chapters").glob("*.html"))]
    reports = {page: book.browser_check(page) for page in pages}  # one chromium run per page
    for report in reports.values():
        assert report["broken"] == [] and report["errors"] == [], report
        assert report["raw_math"] == 0, report  # every equation typeset by the bundled MathJax, offline
    figures = {p.name: report["images"] for p, report in reports.items() if p.parent.name == "chapters"}
    assert all(count >= 1 for name, count in figures.items() if not name.startswith("07")), figures
    assert reports[built_book / "chapters" / "03_monosemanticity.html"]["math"] >= 2  # the MS equations


def test_probe_detects_a_broken_image_and_a_traceback(tmp_path):
    if book.find_chromium() is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    page = tmp_path / "page.html"
    page.write_text(
        '<html><body><img src="missing.png"><div class="output traceback">'
        "Traceback (most recent call last)</div>"
        '<div class="math notranslate">\\[a = b\\]</div></body></html>'
    )
    report = book.browser_check(page)
    assert report["images"] == 1 and len(report["broken"]) == 1 and report["errors"]
    assert report["raw_math"] == 1 and report["math"] == 0  # no MathJax on this page: the LaTeX shows raw
