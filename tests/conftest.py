"""Shared test set-up: an isolated data home and output root for the whole session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Isolate from the user's cache before any project module reads the environment.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="vlmsae-test-home-"))
os.environ.setdefault("VLMSAE_HOME", str(_SESSION_HOME / "home"))
os.environ.setdefault("VLMSAE_OUTPUTS", str(_SESSION_HOME / "outputs"))
os.environ.setdefault("VLMSAE_RESULTS", str(_SESSION_HOME / "results"))
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def fixture():
    """The embedded fixture (built once per test session)."""
    from vlmsae_utils.fixtures import ensure_fixture

    return ensure_fixture()


@pytest.fixture(scope="session")
def val_images(fixture):
    """A few fixture validation images as PIL images, from different classes."""
    from PIL import Image

    paths = sorted((fixture.images / "val").rglob("*.png"))
    return [Image.open(p).convert("RGB") for p in paths[:: max(1, len(paths) // 5)][:5]]


@pytest.fixture(scope="session")
def executed_00(tmp_path_factory, fixture):
    """Notebook 00 executed through the runner with a parameter override (run and book tests)."""
    from vlmsae_utils import run

    out = tmp_path_factory.mktemp("run00")
    return run.run_notebook("00", {"images_per_class": 2, "random_k": 3}, out)


@pytest.fixture(scope="session")
def executed_chapters(tmp_path_factory, fixture):
    """Every notebook executed on its defaults, in order, as `make demo` does (chapter and book tests)."""
    from vlmsae_utils import run

    out = tmp_path_factory.mktemp("chapters")
    for source in run.all_notebooks():
        run.run_notebook(source, {}, out)
    return out


@pytest.fixture(scope="session")
def built_book(tmp_path_factory, executed_chapters):
    """The book built once from the executed chapters (book and browser tests): its HTML folder."""
    import shutil

    from vlmsae_utils import book

    target = tmp_path_factory.mktemp("built") / "book"
    shutil.copytree(book.book_dir(), target, ignore=shutil.ignore_patterns("_build", "chapters"))
    shutil.copytree(executed_chapters, target / "chapters", ignore=shutil.ignore_patterns("*.log"))
    return book.build(target)


@pytest.fixture(scope="session")
def fixture_results(fixture):
    """Results tables of the fixture sweep (configs/fixture.yaml), run once per session."""
    from vlmsae_utils.sweep import ensure_fixture_results

    return ensure_fixture_results()
