"""Shared test set-up: an isolated data home and output root for the whole session."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from phases import phase, record_report, summary_lines

# Isolate from the user's cache before any project module reads the environment.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="vlmsae-test-home-"))
os.environ.setdefault("VLMSAE_HOME", str(_SESSION_HOME / "home"))
os.environ.setdefault("VLMSAE_OUTPUTS", str(_SESSION_HOME / "outputs"))
os.environ.setdefault("VLMSAE_RESULTS", str(_SESSION_HOME / "results"))
os.environ.setdefault("MPLBACKEND", "Agg")
# One torch thread in this process and in every process it starts (kernels, jobs, the background
# set-up): two of them share the 2 cores without oversubscribing, and all compute alike.
os.environ.update(OMP_NUM_THREADS="1", VLMSAE_TRAIN_THREADS="1")
torch.set_num_threads(1)


#: Session fixtures by the stage of the shared set-up they need. Tests run cheapest stage first, so
#: the quick tests run while a background process trains the fixture models, and the tests of the
#: trained models run while it runs the fixture sweep (`pytest_collection_finish`).
STAGES = {"trained_models": 1, "fixture_results": 2, "executed_chapters": 3, "built_book": 3}
#: What the background process builds, in order: the three trained models, then the fixture sweep.
BACKGROUND_SETUP = (
    "from vlmsae_utils.fixtures import ensure_fixture, training; "
    "from vlmsae_utils.sweep import ensure_fixture_results; "
    "training.ensure_all(ensure_fixture()); ensure_fixture_results()"
)
BACKGROUND_LOG = _SESSION_HOME / "background-setup.log"
_background: dict[str, subprocess.Popen] = {}


def _stage(item) -> int:
    """0: needs no trained model; 1: slow (trained models); 2: the fixture sweep; 3: the chapters."""
    needed = [STAGES.get(name, 0) for name in item.fixturenames]
    return max([*needed, 1 if item.get_closest_marker("slow") else 0])


def pytest_collection_modifyitems(items):
    items.sort(key=_stage)  # stable: the file order holds within a stage


def pytest_collection_finish(session):
    """When slow tests are selected, start the background set-up (one torch thread, as everything
    in this session); `trained_models` and `fixture_results` wait for their part of it."""
    if session.config.option.collectonly or not any(_stage(item) for item in session.items):
        return
    from vlmsae_utils.fixtures import ensure_fixture

    ensure_fixture()  # built here first, so the two processes never build it side by side
    log = open(BACKGROUND_LOG, "w")  # noqa: SIM115 - closed by the child's exit
    command = [sys.executable, "-c", BACKGROUND_SETUP]
    _background["setup"] = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1]
    )


def _background_finished() -> None:
    """Wait for the background set-up; fail (with its log) if it failed."""
    process = _background.pop("setup", None)
    if process is not None and process.wait() != 0:
        pytest.fail(f"the background set-up failed:\n{BACKGROUND_LOG.read_text()[-3000:]}")


def pytest_sessionfinish():
    for process in _background.values():
        if process.poll() is None:
            process.terminate()


def pytest_runtest_logreport(report):
    record_report(report)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.section("time of the shared set-up, phase by phase")
    for line in summary_lines():
        terminalreporter.write_line(line)


@pytest.fixture(scope="session", autouse=True)
def warm_kernels():
    """Every notebook of the session takes a kernel started (and warmed up) during the one before."""
    from vlmsae_utils import kernels

    with kernels.warm_kernels():
        yield


@pytest.fixture(scope="session")
def fixture():
    """The embedded fixture (built once per test session)."""
    from vlmsae_utils.fixtures import ensure_fixture

    with phase("fixture: images and tiny models"):
        return ensure_fixture()


@pytest.fixture(scope="session")
def trained_models(fixture):
    """The three trained fixture models (mini_clip, scorer, mini_llava), trained once per session."""
    from vlmsae_utils.fixtures import training

    with phase("fixture models: wait for the background training"):
        return training.ensure_all(fixture)  # waits on the lock the background training holds


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
    with phase("notebook 00 with overrides"):
        return run.run_notebook("00", {"images_per_class": 2, "random_k": 3}, out)


@pytest.fixture(scope="session")
def executed_chapters(tmp_path_factory, trained_models, fixture_results):
    """Every notebook executed on its defaults, in order, as `make demo` does (chapter and book tests)."""
    from vlmsae_utils import run

    out = tmp_path_factory.mktemp("chapters")
    for source in run.all_notebooks():
        with phase(f"chapter {Path(source).stem} on its defaults"):
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
    with phase("book of the chapters"):
        return book.build(target)


@pytest.fixture(scope="session")
def fixture_results(trained_models):
    """Results tables of the fixture sweep (configs/fixture.yaml), run once per session."""
    from vlmsae_utils.sweep import ensure_fixture_results

    with phase("fixture sweep (configs/fixture.yaml): wait for the background run"):
        _background_finished()
        return ensure_fixture_results()  # complete by now: seconds
