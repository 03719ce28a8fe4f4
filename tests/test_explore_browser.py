"""The explorer in a real browser: JupyterLab in headless Chromium runs notebooks/explore.ipynb, a click
adds a token, and the displayed prediction changes.

Needs Debian's ``chromium`` (``make setup`` installs it) and the ``playwright`` Python package (which
drives that system Chromium; it cannot download browsers of its own here). Without them the test is
skipped, saying what is missing. ``SPOTLIB_SCREENSHOT_DIR=docs pytest tests/test_explore_browser.py``
also writes the README's screenshots (``explorer.png``, ``explorer_added_token.png``) there.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (in spotlib[dev])")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium: apt-get install chromium")]
TOKEN = "spot-explorer-test"
KERNEL_IDLE = """() => {
  const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const kernel = panel && panel.sessionContext && panel.sessionContext.session && panel.sessionContext.session.kernel;
  return !!kernel && kernel.status === "idle";
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on 127.0.0.1 serving the repository, and a scratch copy of the notebook inside it
    (under build/, so the notebook finds the workspace and autosave never touches notebooks/)."""
    scratch = ROOT / "build" / "browser-test"
    scratch.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "notebooks" / "explore.ipynb", scratch / "explore.ipynb")
    port = free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1", "--allow-root",
         f"--ServerApp.root_dir={ROOT}", f"--IdentityProvider.token={TOKEN}", "--LabApp.expose_app_in_browser=True",
         "--ServerApp.disable_check_xsrf=True"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
            break
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail(f"JupyterLab did not start: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
    try:
        yield url, "build/browser-test/explore.ipynb"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)


def test_clicking_the_canvas_adds_a_token_and_changes_the_prediction(jupyterlab, tmp_path):
    url, notebook = jupyterlab
    shots = Path(os.environ.get("SPOTLIB_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/lab/tree/{notebook}?token={TOKEN}")
        page.wait_for_selector(".jp-Notebook", timeout=60_000)
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.commands.hasCommand('notebook:run-all-cells')",
                               timeout=60_000)
        page.wait_for_function(KERNEL_IDLE, timeout=120_000)
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        try:
            canvas = page.wait_for_selector(".spot-canvas", timeout=240_000)
        except playwright.TimeoutError:
            page.screenshot(path=str(tmp_path / "timeout.png"))
            raise AssertionError(f"the explorer never appeared; the page: {tmp_path / 'timeout.png'}") from None
        predictions = page.wait_for_selector(".spot-predictions", timeout=60_000)
        page.wait_for_timeout(500)
        before = predictions.inner_text()
        tokens_before = page.inner_text(".spot-status")
        page.locator(".jp-OutputArea-output").filter(has=page.locator(".spot-canvas")).first.screenshot(
            path=str(shots / "explorer.png"))
        box = canvas.bounding_box()
        # between the rows of the starting 6-token isotropic lattice (no window there): a click adds a token
        page.mouse.click(box["x"] + 0.66 * box["width"], box["y"] + 0.5 * box["height"])
        page.wait_for_function("(old) => document.querySelector('.spot-predictions').innerText !== old", arg=before,
                               timeout=30_000)
        page.wait_for_function("(old) => document.querySelector('.spot-status').innerText !== old",
                               arg=tokens_before, timeout=30_000)
        after = page.query_selector(".spot-predictions").inner_text()
        tokens_after = page.inner_text(".spot-status")
        page.locator(".jp-OutputArea-output").filter(has=page.locator(".spot-canvas")).first.screenshot(
            path=str(shots / "explorer_added_token.png"))
        browser.close()
    assert after != before
    count = lambda text: int(text.split("; ")[-1].split()[0])
    assert count(tokens_after) == count(tokens_before) + 1, (tokens_before, tokens_after)
    assert (shots / "explorer.png").stat().st_size > 10_000
