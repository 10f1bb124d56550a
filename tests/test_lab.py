"""JupyterLab in a real browser opens a MyST chapter as a live notebook, runs it, and its neuron browser reacts.

A JupyterLab server from this environment serves a copy of ``notebooks/`` (with ``jupytext.toml``);
Playwright drives Debian's chromium: double-click ``03_monosemanticity.md`` in the file browser,
check it opens as a notebook on the project's kernel, Run All, check no cell errors, then move the
neuron browser's slider and check its image grid is redrawn. Skipped, with a logged reason, only
where chromium or the ``playwright`` package is absent.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from vlmsae_utils import book
from vlmsae_utils.paths import repo_root

log = logging.getLogger(__name__)
CHAPTER = "03_monosemanticity.md"
KERNEL = "vlmsae"
KERNEL_NAMES = ("Python (vlmsae)", "Python 3 (ipykernel)")  # display names JupyterLab may show
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
BROWSER = ".vlmsae-neuron-browser"  # the class vlmsae_utils.widgets.neuron_browser puts on its box
ERRORS = (
    '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]',
    '.jp-RenderedText[data-mime-type*="error"]',
)

# True once Run All has finished: every code cell of the notebook shows an execution count and none
# is queued or running, or a cell has printed an error (Run All stops there, so later prompts stay empty).
RUN_FINISHED = """([panel, errors]) => {
  const root = document.querySelector(panel);
  if (!root) return false;
  if (errors.some(sel => [...root.querySelectorAll(sel)].some(e => /Traceback/.test(e.textContent))))
    return true;
  const prompts = [...root.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim());
  const status = root.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status');
  return prompts.length > 0 && prompts.every(p => /^\\[\\d+\\]:?$/.test(p)) && status === 'idle';
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)  # polling an HTTP endpoint: there is no selector to wait for
    raise TimeoutError(f"JupyterLab did not answer {url} within {timeout} s:\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def chapter3_inputs(fixture):
    """Build the fixture stores and train chapter 3's default SAEs here, into the session's caches, so
    the browser run measures JupyterLab and the notebook, not the first-use training (minutes on 2 cores)."""
    from vlmsae_utils import defaults

    defaults.store_or_default("", "val")
    defaults.embeddings_or_default("", "val")
    defaults.saes_or_default([])


@pytest.fixture
def lab(tmp_path, chapter3_inputs):
    """A JupyterLab server on a free loopback port serving a copy of notebooks/: (base URL, token, root)."""
    root = tmp_path / "notebooks"
    root.mkdir()
    for source in sorted((repo_root() / "notebooks").glob("*.md")):
        shutil.copy2(source, root / source.name)
    shutil.copy2(repo_root() / "notebooks" / "jupytext.toml", root / "jupytext.toml")  # pairing, as in the repository
    token = secrets.token_hex(16)
    port = _free_port()
    state = tmp_path / "lab-state"  # a fresh workspace and user settings: nothing restored from earlier sessions
    news = state / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')  # no news prompt over the screenshot
    command = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.workspaces_dir={state / 'workspaces'}",
        f"--LabApp.user_settings_dir={state / 'settings'}",
        "--LabApp.news_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]  # offline: nothing to fetch
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # containers and CI images run as root
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(state / "runtime"))  # the session's data home and outputs too
    env.pop("MPLBACKEND", None)  # conftest's Agg would stop the kernel's inline figures: a user's Lab has none
    log_path = tmp_path / "jupyterlab.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(f"{base}/api/status?token={token}", process, log_path)
        yield base, token, root
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.info("JupyterLab log: %s", log_path)


def _kernel_registered() -> bool:
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL in KernelSpecManager().find_kernel_specs()


def _save_screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path))
    artifacts = os.environ.get("VLMSAE_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(artifacts) / path.name)


def _image_sources(page) -> list[str]:
    return page.eval_on_selector_all(f"{BROWSER} img", "images => images.map(i => i.src)")


@pytest.mark.slow
def test_jupyterlab_opens_chapter_3_as_a_notebook_runs_it_and_the_neuron_browser_redraws(lab, tmp_path):
    chromium = book.find_chromium()
    if chromium is None:
        log.warning("chromium not installed (apt-get install chromium): JupyterLab browser test skipped")
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        log.warning("playwright not installed (pip install -e '.[test]'): JupyterLab browser test skipped")
        pytest.skip("playwright not installed (pip install -e '.[test]')")
    assert _kernel_registered(), f"kernel {KERNEL!r} is not registered: run `make install` (or `make jupyter-setup`)"
    base, token, _root = lab
    shot = tmp_path / "lab_chapter3.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            page.goto(f"{base}/lab?token={token}", wait_until="domcontentloaded")
            item = page.locator(".jp-DirListing-item", has=page.locator(".jp-DirListing-itemText", has_text=CHAPTER))
            item.wait_for(state="visible")
            item.dblclick()

            panel = page.locator(".jp-NotebookPanel").filter(has=page.locator(".jp-Notebook"))
            editor = page.locator(".jp-FileEditor")
            panel.or_(editor).first.wait_for(state="visible")
            assert editor.count() == 0, (
                f"{CHAPTER} opened in the text editor, not as a notebook: the "
                "defaultViewers override (make install / make jupyter-setup) is not in effect"
            )
            panel_id = panel.first.get_attribute("id")
            assert panel_id, "the notebook panel has no id"
            scope = f"#{panel_id}"

            # The kernel the front matter asks for starts without a selection dialog and becomes idle.
            dialog = page.locator(".jp-Dialog")
            page.wait_for_function(
                "([scope, names]) => !!document.querySelector('.jp-Dialog') || names.includes("
                "document.querySelector(scope + ' .jp-KernelName')?.textContent.trim())",
                arg=[scope, list(KERNEL_NAMES)],
                timeout=90_000,
                polling=250,
            )
            assert dialog.count() == 0, f"a dialog asked: {dialog.first.inner_text()!r} (kernel {KERNEL!r} expected)"
            page.locator(f'{scope} .jp-Notebook-ExecutionIndicator[data-status="idle"]').wait_for(timeout=90_000)

            # Run → Run All Cells.
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(
                ".lm-Menu-item:not(.lm-mod-disabled) .lm-Menu-itemLabel", has_text="Run All Cells"
            ).first.click()
            page.wait_for_function(RUN_FINISHED, arg=[scope, list(ERRORS)], timeout=150_000, polling=500)
            errors = [e for sel in ERRORS for e in page.locator(f"{scope} {sel}").all_inner_texts() if "Traceback" in e]
            assert not errors, "a cell failed:\n" + "\n---\n".join(t[-2000:] for t in errors)

            # The neuron browser: its figure is an <img>; moving the slider one step redraws it.
            widget = page.locator(f"{scope} {BROWSER}")
            widget.wait_for(state="visible")
            page.locator(f"{scope} {BROWSER} img").first.wait_for(state="visible")
            before = _image_sources(page)
            assert before and all(s.startswith("data:image/png") for s in before), before
            handle = page.locator(f"{scope} {BROWSER} .noUi-handle").first
            handle.scroll_into_view_if_needed()
            handle.focus()
            handle.press("ArrowRight")
            page.wait_for_function(
                "([sel, old]) => { const s = [...document.querySelectorAll(sel)].map(i => i.src);"
                " return s.length > 0 && JSON.stringify(s) !== JSON.stringify(old); }",
                arg=[f"{scope} {BROWSER} img", before],
                timeout=60_000,
                polling=250,
            )
            after = _image_sources(page)
            assert after and after != before
            assert page.locator(f"{scope} {BROWSER} .widget-readout").first.inner_text().strip() == "1"
            widget.scroll_into_view_if_needed()
        finally:
            _save_screenshot(page, shot)
            browser.close()
    assert shot.stat().st_size > 0
    log.info("screenshot: %s", shot)
