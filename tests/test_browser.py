"""The layer explorer in a real JupyterLab: headless Chromium runs notebook 05 and moves the slider.

Opt-in (it needs Chromium and Playwright, and takes minutes on 2 CPU cores):

    make browser-test                  # = scripts/browser_setup.sh, then this file with MIRLAB_BROWSER_TESTS=1
    MIRLAB_BROWSER_TESTS=1 .venv/bin/python -m pytest -q -m browser tests/test_browser.py

What it does:

1. copies notebooks/05_layer_explorer.ipynb (outputs cleared, fewer pairs) into a temporary root and appends a
   probe cell that appends every slider move seen by the kernel (layer, SHA-256 of the PNG it rendered, panel
   title) to a JSON-lines file;
2. starts `jupyter lab` headless on a free localhost port with a token, with every Jupyter config, data,
   runtime, settings and workspace directory inside the temporary root;
3. opens the notebook in headless Chromium (Playwright, the system Chromium, no downloaded browser), clicks
   Run > Run All Cells and waits for the probe's output and for the explorer's slider;
4. moves the slider with the keyboard (focused handle, ArrowRight) and then with the mouse (drag to the left
   end of the track), and checks after each move that the slider's readout shows the new layer, that the kernel received that
   layer and re-rendered, and that the browser now displays exactly the PNG bytes the kernel rendered for it
   (and not the previous picture).

Screenshots (whole page and the explorer alone, before and after each move) go to $MIRLAB_BROWSER_SCREENSHOTS
(default: out/browser/). Environment: MIRLAB_CHROMIUM (default /usr/bin/chromium), MIRLAB_BROWSER_HEADED=1 to
watch it on a display.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_layer_explorer.ipynb"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(os.environ.get("MIRLAB_BROWSER_TESTS") != "1",
                       reason="browser test: opt in with MIRLAB_BROWSER_TESTS=1 (make browser-test)"),
]

SERVER_TIMEOUT = 240         # s until `jupyter lab` answers
RUN_ALL_TIMEOUT = 1200       # s for the whole notebook (model load + extraction + snapshots) on a busy machine
MOVE_TIMEOUT = 180           # s for one slider move to round-trip through the kernel
PARAMETERS = {"n_samples": 8}  # smaller than the notebook's default: the test is about the widget, not the numbers

PROBE = '''\
# --- added by tests/test_browser.py (not part of the course notebook) ---
import hashlib as _hashlib, json as _json
_moves = Path({moves!r})

def _record(change=None):
    entry = {{"event": "move" if change else "start", "layer": explorer.layer,
             "layers": explorer.layers, "png_sha256": _hashlib.sha256(explorer.image.value).hexdigest(),
             "title": explorer.axes["pca"].get_title()}}
    with _moves.open("a") as f:
        f.write(_json.dumps(entry) + "\\n")

_record()
explorer.slider.observe(_record, names="value")  # after the explorer's own observer: sees the new picture
print("browser probe ready at layer", explorer.layer)
'''


def _screenshot_dir() -> Path:
    path = Path(os.environ.get("MIRLAB_BROWSER_SCREENSHOTS") or ROOT / "out" / "browser")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_notebook(target: Path, moves: Path) -> None:
    nb = json.loads(NOTEBOOK.read_text())
    nb["metadata"].pop("widgets", None)
    cells = []
    for cell in nb["cells"]:
        cell = copy.deepcopy(cell)
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source = "".join(f"{k} = {v!r}\n" for k, v in PARAMETERS.items())
            cells.append({"cell_type": "code", "execution_count": None, "id": "browser-test-parameters",
                          "metadata": {"tags": ["injected-parameters"]}, "outputs": [], "source": source})
    assert any(c.get("id") == "browser-test-parameters" for c in cells), "no parameters cell in notebook 05"
    cells.append({"cell_type": "code", "execution_count": None, "id": "browser-test-probe", "metadata": {},
                  "outputs": [], "source": PROBE.format(moves=str(moves))})
    nb["cells"] = cells
    target.write_text(json.dumps(nb, indent=1))


def _lab_settings(settings_dir: Path) -> None:
    """Every cell attached to the DOM; no news/update pop-ups (nothing leaves localhost)."""
    settings = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                             "checkForUpdates": False},
    }
    for name, value in settings.items():
        path = settings_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A running `jupyter lab` serving a temporary root that holds the prepared notebook 05."""
    tmp = tmp_path_factory.mktemp("lab")
    root, home = tmp / "root", tmp / "jupyter"
    root.mkdir()
    moves = tmp / "moves.jsonl"
    _prepare_notebook(root / NOTEBOOK.name, moves)
    _lab_settings(home / "settings")
    port, token = _free_port(), base64.b32encode(os.urandom(15)).decode().lower()
    env = dict(os.environ,
               JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), IPYTHONDIR=str(home / "ipython"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
               JUPYTER_PLATFORM_DIRS="1", PYTHONUNBUFFERED="1")
    env.pop("MPLBACKEND", None)  # the notebook picks its own (%matplotlib inline)
    log = (tmp / "jupyter.log").open("w")
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--ServerApp.open_browser=False", "--ServerApp.terminals_enabled=False"]
    if os.geteuid() == 0:  # containers / CI
        cmd.append("--allow-root")
    server = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"jupyter lab exited ({server.returncode}):\n{(tmp / 'jupyter.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyter lab not up after {SERVER_TIMEOUT} s:\n{(tmp / 'jupyter.log').read_text()}")
            time.sleep(1)
        yield {"url": url, "token": token, "root": root, "moves": moves, "log": tmp / "jupyter.log"}
    finally:
        _shut_down_kernels(url, token)  # kernels run in their own sessions: ask the server to stop them
        server.terminate()  # SIGTERM: jupyter server stops cleanly (and stops any kernel still running)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:  # anything left in the server's own process group (start_new_session above)
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


def _shut_down_kernels(url: str, token: str) -> None:
    headers = {"Authorization": f"token {token}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/api/kernels", headers=headers), timeout=10) as r:
            kernels = json.load(r)
        for kernel in kernels:
            request = urllib.request.Request(f"{url}/api/kernels/{kernel['id']}", headers=headers, method="DELETE")
            urllib.request.urlopen(request, timeout=60).close()
    except OSError:
        pass


def _moves(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _displayed_png(image) -> bytes:
    """The bytes behind the <img> the widget shows (a blob: or data: URL), read inside the page."""
    encoded = image.evaluate("""async (img) => {
        const buffer = await (await fetch(img.src)).arrayBuffer();
        let binary = ""; const bytes = new Uint8Array(buffer);
        for (let i = 0; i < bytes.length; i += 8192) binary += String.fromCharCode(...bytes.subarray(i, i + 8192));
        return btoa(binary);
    }""")
    return base64.b64decode(encoded)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_layer_explorer_slider_in_jupyterlab(lab):
    from playwright.sync_api import expect, sync_playwright

    shots = _screenshot_dir()
    for old in [*shots.glob("*.png"), shots / "failure.html", shots / "jupyter.log"]:
        old.unlink(missing_ok=True)
    executable = os.environ.get("MIRLAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    started = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable,
                                    headless=os.environ.get("MIRLAB_BROWSER_HEADED") != "1",
                                    args=["--disable-dev-shm-usage", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.set_default_timeout(120_000)
        try:
            _run(page, lab, shots, expect)
        except BaseException:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
            (shots / "failure.html").write_text(page.content())
            print("jupyter log:\n", lab["log"].read_text()[-5000:])
            raise
        finally:
            browser.close()
            shutil.copyfile(lab["log"], shots / "jupyter.log")
    print(f"browser test: {time.monotonic() - started:.0f} s; screenshots in {shots}")


def _run(page, lab, shots: Path, expect) -> None:
    page.goto(f"{lab['url']}/lab/tree/{NOTEBOOK.name}?token={lab['token']}", timeout=180_000)
    notebook = page.locator(".jp-NotebookPanel")
    expect(notebook).to_be_visible(timeout=180_000)
    # the kernel must be connected (status bar / toolbar indicator) before "Run All" means anything
    expect(page.locator(".jp-NotebookPanel-toolbar .jp-Toolbar-kernelName")).to_contain_text("Python",
                                                                                              timeout=180_000)

    # Run > Run All Cells, through the menu bar as a user would
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    page.locator(".lm-Menu-item").filter(
        has=page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^\s*Run All Cells\s*$"))).first.click()
    probe_output = page.locator(".jp-OutputArea-output", has_text="browser probe ready at layer")
    expect(probe_output).to_be_visible(timeout=RUN_ALL_TIMEOUT * 1000)
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    tracebacks = [t for t in errors.all_inner_texts() if "Traceback" in t or "Error" in t]
    assert not tracebacks, f"the notebook raised: {tracebacks}"

    start = _moves(lab["moves"])
    assert [m["event"] for m in start] == ["start"], start
    layers, layer0 = start[0]["layers"], start[0]["layer"]
    assert len(layers) >= 3, layers
    key, step = ("ArrowRight", 1) if layer0 != layers[-1] else ("ArrowLeft", -1)
    layer1 = layers[layers.index(layer0) + step]
    end = 0 if layer1 != layers[0] else -1  # the drag goes to the end of the track the slider is not at

    # the live explorer: the cell output that holds the slider
    explorer = page.locator(".jp-OutputArea-output").filter(has=page.locator(".widget-slider")).first
    explorer.scroll_into_view_if_needed()
    slider = explorer.locator(".widget-slider")
    readout = slider.locator(".widget-readout")
    handle = slider.locator(".noUi-handle")
    image = explorer.locator(".widget-image, img").first
    expect(slider).to_be_visible()
    expect(image).to_be_visible()
    expect(readout).to_have_text(str(layer0))
    before = _displayed_png(image)
    assert before[:8] == b"\x89PNG\r\n\x1a\n"
    assert _sha(before) == start[0]["png_sha256"], "the browser does not show the kernel's current picture"
    page.screenshot(path=str(shots / "1_before_page.png"))
    explorer.screenshot(path=str(shots / "1_before_explorer.png"))

    def moved_to(expected_layer: int, previous_png: bytes, name: str) -> bytes:
        expect(readout).to_have_text(str(expected_layer), timeout=MOVE_TIMEOUT * 1000)
        entry = _wait_for(lambda: next((m for m in _moves(lab["moves"])
                                        if m["event"] == "move" and m["layer"] == expected_layer), None),
                          MOVE_TIMEOUT, f"the kernel to see layer {expected_layer}")
        assert entry["title"].startswith(f"layer {expected_layer}:"), entry
        shown = _wait_for(lambda: (png := _displayed_png(image)) and _sha(png) == entry["png_sha256"] and png,
                          MOVE_TIMEOUT, f"the browser to show the kernel's picture of layer {expected_layer}")
        assert shown != previous_png, "the displayed picture did not change"
        page.screenshot(path=str(shots / f"{name}_page.png"))
        explorer.screenshot(path=str(shots / f"{name}_explorer.png"))
        return shown

    # 1. keyboard: focus the slider handle, one step (right, unless the slider starts at the last layer)
    handle.focus()
    page.keyboard.press(key)
    after_key = moved_to(layer1, before, f"2_after_{key}")
    assert after_key != before

    # 2. mouse: drag the handle past one end of the track (the start, normally) -> the first (last) layer
    box, track = handle.bounding_box(), slider.locator(".noUi-target").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(track["x"] - 40 if end == 0 else track["x"] + track["width"] + 40, y, steps=12)
    page.mouse.up()
    after_drag = moved_to(layers[end], after_key, f"3_after_drag_to_{'start' if end == 0 else 'end'}")
    assert after_drag not in (before, after_key)
    assert [m["layer"] for m in _moves(lab["moves"])] == [layer0, layer1, layers[end]]
