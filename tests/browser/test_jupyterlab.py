"""Run every notebook in a real browser: JupyterLab 4 driven by the system's Chromium via Playwright.

nbval (``make test``) proves the notebooks execute; it cannot see what a student sees. This test
opens each notebook in JupyterLab like a person would, runs it from the menu bar (Run -> Run All
Cells), and then checks the page: no errors, nothing left running, plots drawn inline, ipywidgets
rendered (not the ``interactive(children=...)`` text a missing widget manager leaves behind), and,
for notebooks that call ``interact``, that moving a slider redraws the plot and that nothing but
the plot shows under the controls. An ``interact_manual`` draws only when its button is pressed:
there the test types a prompt into the interact's text box (when it has one), presses the button
("Run Interact"), and checks that a plot appears under the controls; then types a second prompt and
presses again, and checks that a new, different plot replaces it (so the typed text reached the kernel).

What it runs is each notebook's course run (tests/nbtools.py): every cell as committed, and after
each exercise's check the check again with a plausible wrong answer (it must print ✗) and with the
solution under MINIDALLE_EXERCISES=strict (it must print ✓). The saved notebook's verdicts are read
as tests/test_notebook_exercises.py reads them, which stands aside where this test runs: each notebook
is executed once under the smoke switch.

It works on those runs written to a temporary folder, so the repository's files are never
touched. It needs ``/usr/bin/chromium`` (Debian: ``apt-get install chromium``; another path can be
given in MINIDALLE_CHROMIUM) and the ``playwright`` Python package; it never downloads a browser.
Set MINIDALLE_BROWSER_SHOTS=<folder> to keep one screenshot of each whole notebook after its run.

DOM selectors were checked against JupyterLab 4.6.6 with jupyterlab_widgets 3.0.17 / ipywidgets
8.1.9 (noUiSlider sliders). Where there is something sturdier than a CSS class we use it: ARIA
roles for the menu bar and the sliders, ``data-command`` ids for menu entries, ``data-status`` on
the kernel indicator, ``data-mime-type`` on outputs, and JupyterLab's own objects (the app is
exposed as ``window.jupyterapp``, as JupyterLab's UI tests do) where the DOM cannot tell.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from nbtools import chromium_path, course_run, verdict_problems  # noqa: E402  (tests/ holds the shared notebook helpers)

NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
EXTRA_DIRS = ("solutions", "figures")  # copied beside the notebooks when present

CHROMIUM = chromium_path()
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    # Without these Chromium keeps calling Google services, which floods a closed network.
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]

try:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip("the playwright Python package is not importable (pip install -e '.[test]'; no browser "
                "download needed) -- browser test skipped", allow_module_level=True)
if not CHROMIUM or not os.path.exists(CHROMIUM):
    pytest.skip(f"no chromium at {CHROMIUM or '/usr/bin/chromium'} (Debian: apt-get install chromium, or set "
                "MINIDALLE_CHROMIUM) -- browser test skipped", allow_module_level=True)

# Time limits in seconds. Every wait is bounded by one of these: the test must never hang.
SERVER_START_S = 90
PAGE_READY_S = 120       # page load + kernel start, on 2 busy cores
RUN_ALL_S = 300          # one notebook, all cells, smoke mode (measured 5-60 s on 2 cores)
STEP_S = 30              # one UI step: a menu, a save, widgets to render, a redraw after a slider move
SHUTDOWN_S = 20
SLIDER_PRESSES = 5       # ArrowRight presses tried until the plot changes (a new seed can redraw the same picture)
MANUAL_BUTTON = "Run Interact"  # the button of ipywidgets' interact_manual (its default manual_name)
MANUAL_PROMPTS = ("a big yellow square on the left", "a small green triangle at the top")  # typed in turn
MAX_SHOT_HEIGHT = 16_000  # px; Chromium cannot capture much taller pages

INTERACT_RE = re.compile(r"\binteract(_manual)?\s*\(|\bwidgets\.interact(_manual)?\b")

# --- JavaScript run in the page ------------------------------------------------------------------
# Each page opens one notebook on a reset workspace, so ".jp-NotebookPanel" is that notebook.

# Execution prompts of the code cells ("[ ]:", "[*]:", "[3]:"), the number of cells on the page, and
# the kernel status shown by the toolbar's <div class="jp-Notebook-ExecutionIndicator" data-status=..>.
STATE_JS = """() => {
  const panel = document.querySelector('.jp-NotebookPanel');
  if (!panel) return null;
  const ind = panel.querySelector('.jp-Notebook-ExecutionIndicator');
  return {
    prompts: [...panel.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent.trim()),
    cells: panel.querySelectorAll('.jp-Notebook .jp-Cell').length,
    status: ind ? ind.dataset.status : null,
  };
}"""
RESTORED_JS = """() => { if (!window.jupyterapp) return false;
  window.jupyterapp.restored.then(() => { window.__minidalleRestored = true; }); return true; }"""
# Ready: the app has restored its layout, the notebook is the current tab with its model loaded,
# its kernel session is ready and idle (model and toolbar agree). Clicking Run All earlier can do
# nothing at all: seen once on the first, slow page load, before this wait existed.
READY_JS = f"""(nCells) => {{
  const app = window.jupyterapp;
  if (!app || !window.__minidalleRestored) return false;
  const panel = app.shell.currentWidget;
  if (!panel || !panel.node.classList.contains('jp-NotebookPanel') || !panel.context.isReady) return false;
  const sc = panel.sessionContext, kernel = sc.session && sc.session.kernel;
  const s = ({STATE_JS})();
  return sc.isReady && !!kernel && kernel.status === 'idle' && s.status === 'idle'
    && panel.model.cells.length === nCells;
}}"""
# Run All marks every queued cell "[*]" at once, and the copies start with no outputs ("[ ]"
# everywhere): "started" makes sure the click took effect before "finished" is looked for, which
# is nothing queued or running, the kernel idle, and the first cell numbered.
STARTED_JS = f"""() => {{ const s = ({STATE_JS})();
  return s && s.prompts.some(p => p.includes('*') || /\\d/.test(p)); }}"""
FINISHED_JS = f"""() => {{ const s = ({STATE_JS})();
  return s && s.status === 'idle' && !s.prompts.some(p => p.includes('*')) && /\\d/.test(s.prompts[0] || ''); }}"""
NOT_DIRTY_JS = "() => !document.querySelector('.lm-TabBar-tab.jp-mod-dirty')"

# Text of all output areas (not the cell sources, which may mention these strings on purpose).
OUTPUT_TEXT_JS = """() => [...document.querySelectorAll('.jp-NotebookPanel .jp-OutputArea')]
  .map(e => e.textContent).join('\\n')"""
PLOTS_JS = """() => document.querySelectorAll(
  '.jp-NotebookPanel .jp-OutputArea-output[data-mime-type^="image/"] img').length"""
# The outputs inside an interact's Output widget, as [mime type, text] pairs.
INTERACT_OUTPUTS_JS = """(box) => [...box.querySelectorAll('.widget-output .jp-OutputArea-output')]
  .map(e => [e.dataset.mimeType || '', e.textContent.trim().slice(0, 200)])"""
# Waits for the end of the request a slider move sends. The slider sends one comm_msg (its new
# value); the kernel runs the interact function inside that request and publishes status "idle"
# with that comm_msg as parent after everything the function displayed. The front end handles
# iopub messages strictly in order, so when kernel.iopubMessage delivers that "idle" the Output
# widget already holds the whole redraw, returned value included. (The toolbar indicator is no
# signal here: it re-renders asynchronously and can still read "idle" from before the update.)
WATCH_COMM_JS = """() => {
  const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const w = window.__minidalleWatch = {sent: null, done: false};
  const onAny = (_, args) => {
    if (args.direction === 'send' && !w.sent && args.msg.header.msg_type === 'comm_msg') w.sent = args.msg.header.msg_id;
  };
  const onIopub = (_, msg) => {
    if (w.sent && msg.header.msg_type === 'status' && msg.content.execution_state === 'idle'
        && msg.parent_header.msg_id === w.sent) {
      w.done = true; kernel.anyMessage.disconnect(onAny); kernel.iopubMessage.disconnect(onIopub);
    }
  };
  kernel.anyMessage.connect(onAny);
  kernel.iopubMessage.connect(onIopub);
}"""
COMM_DONE_JS = "() => !!(window.__minidalleWatch && window.__minidalleWatch.done)"
# The same for a button press: a Button sends its click as a comm_msg {method: "custom", content:
# {event: "click"}}, and interact_manual runs its function inside that request. Only that message is
# watched, so a value update the text box sends on the way (on blur) cannot be taken for it.
WATCH_CLICK_JS = WATCH_COMM_JS.replace(
    "args.msg.header.msg_type === 'comm_msg'",
    "args.msg.header.msg_type === 'comm_msg' && args.msg.content.data && args.msg.content.data.method === 'custom'"
    " && args.msg.content.data.content && args.msg.content.data.content.event === 'click'")
NEXT_FRAME_JS = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


class _Abort(Exception):
    """A failed step after which the remaining checks mean nothing; reported like the others."""


# --- the JupyterLab server -----------------------------------------------------------------------

class LabServer:
    """A JupyterLab server on copies of the notebooks, and its REST API."""

    def __init__(self, root: Path, port: int, token: str, proc: subprocess.Popen, log: Path):
        self.root, self.token, self.proc, self.log = root, token, proc, log
        self.base = f"http://127.0.0.1:{port}"

    def api(self, path: str, method: str = "GET", timeout: float = 10):
        req = urllib.request.Request(self.base + path, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def lab_url(self, notebook: str) -> str:
        # "reset" opens an empty workspace: the notebooks of earlier tests are not reopened
        # (each would start a kernel of its own).
        return f"{self.base}/lab/tree/{urllib.parse.quote(notebook)}?reset&token={self.token}"

    def contents(self, notebook: str, content: bool) -> dict:
        return self.api(f"/api/contents/{urllib.parse.quote(notebook)}?type=notebook&content={int(content)}")

    def shutdown_kernels(self) -> None:
        """Shut down every session and kernel, and wait (bounded) until they are gone."""
        try:
            for s in self.api("/api/sessions"):
                self.api(f"/api/sessions/{s['id']}", method="DELETE", timeout=30)
            for k in self.api("/api/kernels"):
                self.api(f"/api/kernels/{k['id']}", method="DELETE", timeout=30)
            deadline = time.monotonic() + SHUTDOWN_S
            while self.api("/api/kernels") and time.monotonic() < deadline:
                time.sleep(0.2)
        except (urllib.error.URLError, OSError):
            pass  # the server is gone; the fixture's finalizer cleans up what is left

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tagged(tag: bytes) -> None:
    """SIGKILL every process left that carries our environment tag. Kernels run in process groups
    of their own, so signalling the server's group does not reach one the server lost track of."""
    if not Path("/proc").is_dir():
        return
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if tag in (d / "environ").read_bytes().split(b"\0"):
                os.kill(int(d.name), signal.SIGKILL)
        except OSError:  # gone already, or not ours to read
            continue


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebooks")
    for name in NOTEBOOKS:   # each notebook's course run: its exercises tried unanswered, wrong, then solved
        (root / name).write_text(json.dumps(course_run(NOTEBOOK_DIR / name), indent=1), encoding="utf-8")
    for sub in EXTRA_DIRS:
        if (NOTEBOOK_DIR / sub).is_dir():
            shutil.copytree(NOTEBOOK_DIR / sub, root / sub)

    # Jupyter's state lives in a private folder: no user config, kernel specs, workspaces or IPython
    # startup files leak in, and the "get Jupyter news?" toast stays away.
    home = tmp_path_factory.mktemp("jupyter")
    settings = home / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))

    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    env.update({
        "MINIDALLE_SMOKE": "1",  # the repo-root conftest.py sets it for pytest; be explicit for the kernels
        "MINIDALLE_EXERCISES": "lenient",  # the course run's solution cells make the checks strict in turn
        # conftest.py also sets MPLBACKEND=Agg for nbval, which would keep every plot off the page:
        # the kernels must draw with the inline backend, as in a student's JupyterLab.
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTER_PREFER_ENV_PATH": "1",  # this environment's python3 kernel, not a user-wide one
        "IPYTHONDIR": str(home / "ipython"),
        "MINIDALLE_BROWSER_TEST_RUN": token,  # tags the server and its kernels for the final sweep
    })
    cmd = [
        sys.executable, "-m", "jupyterlab", "--no-browser",
        "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--ServerApp.terminals_enabled=False",
        "--LabApp.extension_manager=readonly",  # the default ("pypi") asks PyPI about extensions
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.news_url=",
        f"--LabApp.user_settings_dir={home / 'lab-settings'}",
        f"--LabApp.workspaces_dir={home / 'workspaces'}",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: see READY_JS and WATCH_COMM_JS
        "--Application.log_level=WARN",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers run as root, and Jupyter refuses to without this
    log = home / "jupyterlab.log"
    with open(log, "wb") as out:
        # A session (and process group) of its own, so the finalizer can signal the server and its children.
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = LabServer(root, port, token, proc, log)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {proc.returncode}; {log}:\n{server.log_tail()}")
            try:
                server.api("/api/status", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer in {SERVER_START_S} s; {log}:\n{server.log_tail()}")
                time.sleep(0.3)
        yield server
    finally:
        if proc.poll() is None:
            server.shutdown_kernels()
            os.killpg(proc.pid, signal.SIGTERM)  # Jupyter shuts its kernels down on SIGTERM
            try:
                proc.wait(SHUTDOWN_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(SHUTDOWN_S)
        _kill_tagged(f"MINIDALLE_BROWSER_TEST_RUN={token}".encode())


@pytest.fixture(scope="module")
def browser():
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=60_000)
    except PlaywrightError as e:
        pw.stop()
        pytest.fail(f"could not start {CHROMIUM}: {e}")
    try:
        yield b
    finally:
        b.close()
        pw.stop()


@pytest.fixture(scope="module")
def summary(request):
    """Collects one line per notebook and prints them together after the last notebook, past
    pytest's output capture, so they show in the terminal even without -s."""
    lines: list[str] = []
    yield lines
    if lines:
        text = "\n".join(["", "browser test, per notebook:", *lines])
        capman = request.config.pluginmanager.getplugin("capturemanager")
        if capman is None:
            print(text)
        else:
            with capman.global_and_fixture_disabled():
                print(text)


# --- steps ---------------------------------------------------------------------------------------

def _click_menu(page, menu: str, command: str, label: str) -> None:
    """Open a menu of the menu bar and click one entry, as a user would. Lumino menu entries
    carry their command id in data-command; the label is checked too."""
    page.get_by_role("menubar").get_by_role("menuitem", name=menu, exact=True).click()
    item = page.locator(f'.lm-Menu [role="menuitem"][data-command="{command}"]')
    item.wait_for(state="visible", timeout=STEP_S * 1000)
    if label not in item.inner_text():
        raise _Abort(f"menu {menu}: the entry for {command} reads {item.inner_text()!r}, not {label!r}")
    item.click()


def _run_all(page, n_cells: int) -> tuple[float, bool, list[str]]:
    """Run -> Run All Cells, and wait until it is over. Returns (seconds, finished, problems)."""
    page.wait_for_function(RESTORED_JS, timeout=PAGE_READY_S * 1000, polling=100)
    page.wait_for_function(READY_JS, arg=n_cells, timeout=PAGE_READY_S * 1000, polling=250)
    _click_menu(page, "Run", "runmenu:run-all", "Run All Cells")
    t0 = time.monotonic()
    try:
        page.wait_for_function(STARTED_JS, timeout=STEP_S * 1000, polling=100)
    except PlaywrightTimeout:
        raise _Abort(f"Run -> Run All Cells started no cell in {STEP_S} s") from None
    try:
        page.wait_for_function(FINISHED_JS, timeout=RUN_ALL_S * 1000, polling=250)
    except PlaywrightTimeout:
        pass  # told apart below
    seconds = time.monotonic() - t0

    state = page.evaluate(STATE_JS)
    running = [str(i) for i, p in enumerate(state["prompts"], 1) if "*" in p]
    if running:
        return seconds, False, [f"code cells {', '.join(running)} still queued or running "
                                f"{RUN_ALL_S} s after Run All Cells"]
    problems = []
    if state["status"] != "idle":
        problems.append(f"kernel status {state['status']!r} after the run, not idle")
    if state["cells"] != n_cells:  # the DOM checks below need every cell on the page
        problems.append(f"the page shows {state['cells']} cells of the notebook's {n_cells}")
    return seconds, True, problems


def _saved_errors(page, lab: LabServer, notebook: str) -> list[str]:
    """File -> Save Notebook, then read what JupyterLab wrote through the contents API.

    In the page, an error and a plain warning both render as <div data-mime-type=
    "application/vnd.jupyter.stderr">, told apart only by their text. The saved notebook keeps
    output_type "error" with its ename and evalue, which is exact; and every code cell must have
    run (Run All stops at the first error, so then the error is reported, not the cells after it)."""
    before = lab.contents(notebook, content=False)["last_modified"]
    _click_menu(page, "File", "docmanager:save", "Save Notebook")
    page.wait_for_function(NOT_DIRTY_JS, timeout=STEP_S * 1000, polling=100)
    deadline = time.monotonic() + STEP_S
    while lab.contents(notebook, content=False)["last_modified"] == before:
        if time.monotonic() > deadline:
            raise _Abort(f"File -> Save Notebook did not write the file in {STEP_S} s")
        time.sleep(0.1)
    cells = [c for c in lab.contents(notebook, content=True)["content"]["cells"] if c["cell_type"] == "code"]
    errors = []
    for n, cell in enumerate(cells, 1):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                first_line = ("".join(cell["source"]).strip().splitlines() or [""])[0][:60]
                errors.append(f"error in code cell {n} ({first_line!r}): {out.get('ename')}: {out.get('evalue')}")
    never_ran = [n for n, c in enumerate(cells, 1) if c.get("execution_count") is None]
    if never_ran and not errors:
        errors.append(f"code cells {never_ran} never ran")
    if not errors:  # the exercises' verdicts, as the headless course run reads them
        errors += verdict_problems({"cells": cells})
    return errors


def _move_slider(page, box) -> tuple[bool, int, str]:
    """Press ArrowRight on the interact's first slider until its plot changes, at most
    SLIDER_PRESSES times. Returns (changed, presses, problem)."""
    handle = box.get_by_role("slider").first  # noUiSlider's handle: <div role="slider" tabindex="0">
    handle.scroll_into_view_if_needed()
    img = box.locator(".widget-output img").first
    try:
        img.wait_for(state="attached", timeout=STEP_S * 1000)
    except PlaywrightTimeout:
        return False, 0, "no plot under the controls before the slider moved"
    before = img.get_attribute("src")  # a data:image/png;base64,... URL
    for press in range(1, SLIDER_PRESSES + 1):
        # Mark the images shown now: ipywidgets clears and redraws the Output widget, so a redraw
        # always brings a new <img> element, even when the picture happens to be the same.
        box.evaluate("b => b.querySelectorAll('.widget-output img').forEach(i => i.dataset.minidalleStale = '1')")
        value = handle.get_attribute("aria-valuenow")
        page.evaluate(WATCH_COMM_JS)
        handle.focus()
        handle.press("ArrowRight")
        moved = f"the slider moved from {value} to {handle.get_attribute('aria-valuenow')}"
        try:
            page.wait_for_function(COMM_DONE_JS, timeout=STEP_S * 1000, polling=100)
        except PlaywrightTimeout:
            return False, press, f"{moved}, but the kernel did not finish the update in {STEP_S} s"
        page.evaluate(NEXT_FRAME_JS)  # let the output area draw what it holds
        fresh = box.locator(".widget-output img:not([data-minidalle-stale])")
        if not fresh.count():
            return False, press, f"{moved}, but no new plot came: the interact shows {box.evaluate(INTERACT_OUTPUTS_JS)}"
        if fresh.first.get_attribute("src") != before:
            return True, press, ""
    return False, SLIDER_PRESSES, f"the plot stayed the same over {SLIDER_PRESSES} slider steps"


def _type_into(page, field, text: str) -> str:
    """Type `text` into an ipywidgets Text box and leave it (Tab), which commits the value; wait until
    the kernel has handled the update. Returns a problem, or ""."""
    if field.input_value() == text:
        return ""
    page.evaluate(WATCH_COMM_JS)  # the first comm_msg sent from now on: the box's new value
    field.fill(text)
    field.press("Tab")
    try:
        page.wait_for_function(COMM_DONE_JS, timeout=STEP_S * 1000, polling=100)
    except PlaywrightTimeout:
        return f"typed {text!r} into the text box, but the kernel did not take the value in {STEP_S} s"
    return ""


def _press_run(page, box) -> tuple[bool, int, str]:
    """An interact_manual: for each of MANUAL_PROMPTS, type it into the first text box (if there is
    one) and press the button; each press must bring a new plot, the second a different one.
    Returns (changed, presses, problem)."""
    button = box.get_by_role("button", name=MANUAL_BUTTON, exact=True)
    field = box.locator("input[type='text']").first
    has_field = box.locator("input[type='text']").count() > 0
    before = None
    for press, prompt in enumerate(MANUAL_PROMPTS, 1):
        if has_field:
            problem = _type_into(page, field, prompt)
            if problem:
                return False, press, problem
        box.evaluate("b => b.querySelectorAll('.widget-output img').forEach(i => i.dataset.minidalleStale = '1')")
        page.evaluate(WATCH_CLICK_JS)
        button.scroll_into_view_if_needed()
        button.click()
        what = f"pressed {MANUAL_BUTTON!r}" + (f" with {prompt!r} in the text box" if has_field else "")
        try:
            page.wait_for_function(COMM_DONE_JS, timeout=STEP_S * 1000, polling=100)
        except PlaywrightTimeout:
            return False, press, f"{what}, but the kernel did not finish in {STEP_S} s"
        page.evaluate(NEXT_FRAME_JS)
        fresh = box.locator(".widget-output img:not([data-minidalle-stale])")
        if not fresh.count():
            return False, press, f"{what}, but no plot came: the interact shows {box.evaluate(INTERACT_OUTPUTS_JS)}"
        src = fresh.first.get_attribute("src")
        if before is not None and src == before:
            return False, press, f"{what}, but the plot is the one the first press drew"
        before = src
    return True, len(MANUAL_PROMPTS), ""


def _check_interacts(page) -> tuple[int, str, list[str]]:
    """Widgets rendered, a slider visible and working, only the plot under each interact.
    Returns (sliders, changed, problems)."""
    problems = []
    boxes = page.locator(".jp-NotebookPanel .widget-interact")
    try:
        boxes.first.wait_for(state="attached", timeout=STEP_S * 1000)
    except PlaywrightTimeout:
        return 0, "n/a", ["the notebook calls interact, but no interact widget rendered"]
    sliders = page.locator(".jp-NotebookPanel .jupyter-widgets.widget-slider")
    n_sliders = sliders.count()
    if not n_sliders:
        problems.append("the notebook calls interact, but no slider rendered")
    else:
        sliders.first.scroll_into_view_if_needed()
        if not sliders.first.is_visible():
            problems.append("a slider is on the page but not visible")
    changed = "n/a"
    for i in range(boxes.count()):
        box = boxes.nth(i)
        if box.get_by_role("button", name=MANUAL_BUTTON, exact=True).count():   # interact_manual
            ok, presses, why = _press_run(page, box)
            changed = f"yes ({presses} presses of {MANUAL_BUTTON!r})" if ok else "NO"
            if not ok:
                problems.append(f"interact {i + 1}: {why}")
        elif box.get_by_role("slider").count():
            ok, presses, why = _move_slider(page, box)
            changed = f"yes ({presses} step{'s' if presses > 1 else ''})" if ok else "NO"
            if not ok:
                problems.append(f"interact {i + 1}: {why}")
        # Only the plot under the controls. Whatever the function passed to interact returns is
        # displayed there too, as text: such a function should return None.
        outputs = box.evaluate(INTERACT_OUTPUTS_JS)
        values = [text for mime, text in outputs if mime == "text/plain"]
        other = [[mime, text] for mime, text in outputs if not mime.startswith("image/") and mime != "text/plain"]
        if values:
            problems.append(f"interact {i + 1} prints {values} under its plot: the function passed to interact "
                            "returns a value, which ipywidgets displays; it should return None")
        if other:
            problems.append(f"interact {i + 1} shows more than its plot: {other}")
        if not box.locator(".widget-output img").count():
            problems.append(f"interact {i + 1} shows no plot")
    return n_sliders, changed, problems


def _check_page(page, draws: bool) -> tuple[int, list[str]]:
    """Checks over the whole page after the run. Returns (plots, problems)."""
    problems = []
    outputs = page.evaluate(OUTPUT_TEXT_JS)
    for text in ("Error displaying widget", "interactive(children="):
        if text in outputs:
            problems.append(f"{text!r} in the outputs: the ipywidgets front end is missing or broken")
    # Errors raised in widget callbacks exist only in the page (widget outputs are not saved).
    tracebacks = page.locator('.jp-NotebookPanel .widget-output [data-mime-type="application/vnd.jupyter.stderr"]',
                              has_text="Traceback")
    if tracebacks.count():
        problems.append(f"traceback in a widget output: {tracebacks.first.inner_text()[:300]}")
    n_plots = page.evaluate(PLOTS_JS)
    if draws and not n_plots:
        problems.append("the notebook draws with matplotlib, but no <img> plot is on the page "
                        "(the kernel's backend must be inline: MPLBACKEND=Agg keeps plots out)")
    if any("*" in p for p in page.evaluate(STATE_JS)["prompts"]):
        problems.append("a cell is running again after the checks")
    return n_plots, problems


def _screenshot(page, notebook: str) -> None:
    """A screenshot of the whole notebook into $MINIDALLE_BROWSER_SHOTS. JupyterLab scrolls inside
    a page of fixed height, so a plain full-page shot would hold only the viewport: scroll the
    notebook to the top and grow the viewport until the last cell fits (cells off screen have
    estimated heights until drawn, hence a few rounds)."""
    folder = os.environ.get("MINIDALLE_BROWSER_SHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    # How far the last cell reaches below the visible area (the scroller's scrollHeight would also
    # count JupyterLab's scroll-past-end padding, which grows with the viewport).
    overflow_js = """() => { const s = document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer');
      const cells = document.querySelectorAll('.jp-NotebookPanel .jp-Cell');
      if (!s || !cells.length) return 0;
      s.scrollTop = 0;
      return Math.ceil(cells[cells.length - 1].getBoundingClientRect().bottom - s.getBoundingClientRect().bottom); }"""
    for _ in range(4):
        extra = page.evaluate(overflow_js)
        width, height = page.viewport_size["width"], page.viewport_size["height"]
        if extra <= 0 or height >= MAX_SHOT_HEIGHT:
            break
        page.set_viewport_size({"width": width, "height": min(height + extra + 24, MAX_SHOT_HEIGHT)})
        page.evaluate(NEXT_FRAME_JS)
    page.screenshot(path=str(Path(folder) / f"{Path(notebook).stem}.png"), full_page=True)


# --- the test ------------------------------------------------------------------------------------

@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_in_jupyterlab(notebook, lab, browser, summary, record_property):
    # Read the copy the server serves: the repository's file may change while the tests run.
    nb = json.loads((lab.root / notebook).read_text(encoding="utf-8"))
    sources = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    n_cells = len(nb["cells"])
    uses_interact = any(INTERACT_RE.search(s) for s in sources)
    draws = any("plt.show(" in s or "show_grid(" in s for s in sources)

    problems: list[str] = []
    page_errors: list[str] = []
    seconds, n_plots, n_sliders, changed = float("nan"), 0, 0, "n/a"
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(STEP_S * 1000)
    page.on("pageerror", lambda e: page_errors.append(str(e)[:300]))
    try:
        page.goto(lab.lab_url(notebook), timeout=PAGE_READY_S * 1000)
        seconds, finished, found = _run_all(page, n_cells)
        problems += found
        if finished:
            problems += _saved_errors(page, lab, notebook)
            if uses_interact:
                n_sliders, changed, found = _check_interacts(page)
                problems += found
            n_plots, found = _check_page(page, draws)
            problems += found
        _screenshot(page, notebook)
    except (PlaywrightError, _Abort) as e:  # PlaywrightError includes Playwright's timeouts
        problems.append(str(e) if isinstance(e, _Abort) else f"browser step failed: {str(e).splitlines()[0]}")
        try:
            problems.append(f"page state: {page.evaluate(STATE_JS)}; "
                            f"dialogs: {page.locator('.jp-Dialog').all_inner_texts()}")
            _screenshot(page, notebook)
        except PlaywrightError:
            pass
    finally:
        context.close()
        lab.shutdown_kernels()  # frees the cores for the next notebook
    if page_errors:
        problems.append("JavaScript errors on the page: " + " | ".join(page_errors[:3]))

    line = (f"{notebook}: {seconds:.1f} s to run all cells, {n_cells} cells ({len(sources)} code), "
            f"{n_plots} plots, {n_sliders} sliders, controls changed plot: {changed}")
    print(line)
    summary.append(line + ("  [FAILED]" if problems else ""))
    record_property("browser_run", line)  # in the junit XML
    if problems:  # the message says it all; the test's source would only bury it
        pytest.fail(f"{notebook}:\n  " + "\n  ".join(problems), pytrace=False)
