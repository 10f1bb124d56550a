"""JupyterLab from this environment opens the MyST chapters as notebooks, with the project's kernel."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import jupytext
import pytest

from vlmsae_utils import run
from vlmsae_utils.paths import repo_root

log = logging.getLogger(__name__)
OVERRIDES = repo_root() / "configs" / "jupyterlab-overrides.json"
VIEWER = "Jupytext Notebook"  # the document factory jupytext's JupyterLab extension registers


def test_markdown_and_myst_open_with_the_jupytext_notebook_viewer():
    viewers = json.loads(OVERRIDES.read_text())["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]
    assert viewers == {"markdown": VIEWER, "myst": VIEWER}


def test_the_viewer_named_is_the_one_jupytext_registers():
    extension = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "jupyterlab-jupytext" / "static"
    if not extension.is_dir():
        pytest.skip(f"jupytext's JupyterLab extension is not installed under {sys.prefix}")
    assert any(VIEWER in p.read_text(errors="ignore") for p in extension.glob("*.js"))


def test_make_install_put_the_setting_where_this_jupyterlab_reads_it():
    installed = Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    if not installed.is_file():
        log.warning("%s missing: environment not made by `make install`", installed)
        pytest.skip("environment not made by `make install` (run `make jupyter-setup`)")
    assert json.loads(installed.read_text()) == json.loads(OVERRIDES.read_text())


@pytest.mark.parametrize("source", run.all_notebooks(), ids=lambda p: p.stem)
def test_chapters_ask_for_the_project_kernel_and_run_headless_on_this_python(source, tmp_path):
    assert jupytext.read(source).metadata["kernelspec"]["name"] == "vlmsae"
    headless = json.loads(run.to_ipynb(source, tmp_path / f"{source.stem}.ipynb").read_text())
    assert headless["metadata"]["kernelspec"]["name"] == run.KERNEL_NAME  # papermill runs in this environment
