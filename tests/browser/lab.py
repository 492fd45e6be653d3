"""Drive JupyterLab in headless Chromium: a private server and a page helper for widget notebooks.

``LabServer`` starts ``python -m jupyter lab`` from the running interpreter's environment (so the
kernel spec ``python3`` installed into the venv's sys-prefix is the one used) on 127.0.0.1, a free
port and a random token, with a temporary root dir and private Jupyter config/runtime/data dirs,
and always stops it (REST shutdown of every session and kernel, then SIGTERM, then SIGKILL of its
process group).

``NotebookPage`` wraps a Playwright page showing one notebook: run all cells through the Run menu,
wait for the kernel to finish, find the image a widget draws, fingerprint it, and change a slider
(keyboard on the noUiSlider handle) or a dropdown (``<select>``). Selectors are those of
JupyterLab 4 (lumino ``lm-*`` classes, ``data-command`` on menu items) and ipywidgets 8.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

# Chromium flags for a root user on a closed network: no sandbox (root), no GPU, and nothing that
# phones home (QUIC, background networking, component updates, sync).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Cells' output images that belong to a widget view: an ipywidgets.Output holding a displayed
# figure (``.widget-output img``) or an ipywidgets.Image (``img.widget-image``).
WIDGET_IMAGE = ".jp-Cell .jupyter-widgets img, .jp-Cell img.jupyter-widgets"
# JupyterLab 4 renders a cell's error (traceback) as a stderr output; older ones used the error
# mime type. A stderr output is an error when it holds a traceback (tqdm bars are stderr too).
ERROR_OUTPUT = ('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"], '
                '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\S*(Error|Exception)\b", re.M)

# Returns a SHA-256 of the image's bytes (data: and blob: URLs alike), or null while the image is
# being replaced (a revoked blob URL); identical pixels give identical fingerprints.
_FINGERPRINT_JS = """async (img) => {
  try {
    const buf = await (await fetch(img.src)).arrayBuffer();
    if (buf.byteLength === 0) return null;
    const h = await crypto.subtle.digest('SHA-256', buf);
    return Array.from(new Uint8Array(h)).map(x => x.toString(16).padStart(2, '0')).join('');
  } catch (e) { return null; }
}"""


class HarnessError(AssertionError):
    """A wait that ran out or a page state that means the demo is broken (message says which)."""


def wait_for(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.25):
    """Poll ``pred`` until it returns something truthy (returned) or ``timeout`` s pass (raise)."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except HarnessError:
            raise
        except Exception as exc:  # noqa: BLE001 - transient page/REST errors while polling
            last_exc = exc
        if time.monotonic() > deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            raise HarnessError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """A private JupyterLab server rooted at ``root``; use as a context manager.

    Jupyter's config, runtime and user-data dirs point into ``state`` so no user setting, saved
    workspace or stray kernel spec leaks in; the venv's ``share/jupyter`` (kernel spec ``python3``,
    the widgets lab extension) stays on the data path because it is found through sys.prefix.
    """

    def __init__(self, root: Path, state: Path, python: str = sys.executable,
                 start_timeout: float = 60.0):
        self.root, self.state, self.python = Path(root), Path(state), python
        self.start_timeout = start_timeout
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = self.state / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None
        self.forced_kills: list[int] = []  # pids that needed SIGKILL after the server stopped

    # --- lifecycle -------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for name, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                          ("JUPYTER_DATA_DIR", "data"), ("IPYTHONDIR", "ipython"),
                          ("MPLCONFIGDIR", "matplotlib")]:
            (self.state / sub).mkdir(parents=True, exist_ok=True)
            env[name] = str(self.state / sub)
        # The kernel must show figures the way a user's does (matplotlib-inline), not the
        # headless Agg backend a test runner may have exported.
        env.pop("MPLBACKEND", None)
        env.pop("JUPYTER_PATH", None)
        env.pop("JUPYTER_TOKEN", None)
        return env

    def _write_lab_config(self):
        # The announcements plugin would pop a "receive news?" toast over the notebook and try
        # the network; switch it off in this private config dir.
        labconfig = self.state / "config" / "labconfig"
        labconfig.mkdir(parents=True, exist_ok=True)
        (labconfig / "page_config.json").write_text(json.dumps(
            {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))

    def start(self) -> "LabServer":
        self.state.mkdir(parents=True, exist_ok=True)
        env = self._env()
        self._write_lab_config()
        cmd = [self.python, "-m", "jupyter", "lab", "--no-browser",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root}", "--ServerApp.allow_root=True",
               "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        log = open(self.log_path, "w")
        try:
            # Own process group: whatever happens, the server and its kernels can be killed by id.
            self.proc = subprocess.Popen(cmd, env=env, cwd=self.root, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()

        def up():
            if self.proc.poll() is not None:
                raise HarnessError(f"JupyterLab exited with code {self.proc.returncode} before "
                                   f"answering; log tail:\n{self.log_tail()}")
            return self.api("GET", "/api/status", timeout=2)

        try:
            wait_for(up, self.start_timeout, f"JupyterLab to answer on {self.base}/api/status")
        except HarnessError as exc:
            raise HarnessError(f"{exc}\nlog tail:\n{self.log_tail()}") from None
        return self

    def stop(self):
        """Shut down every session and kernel through the REST API, then stop the server."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                for s in self.api("GET", "/api/sessions", timeout=5) or []:
                    self.api("DELETE", f"/api/sessions/{s['id']}", timeout=15)
                for k in self.api("GET", "/api/kernels", timeout=5) or []:
                    self.api("DELETE", f"/api/kernels/{k['id']}", timeout=15)
        except Exception:  # noqa: BLE001 - best effort; the signals below still stop everything
            pass
        finally:
            self._terminate()

    def _terminate(self):
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the server shuts its kernels down on SIGTERM
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        # Anything left in the server's own process group, then any kernel of this server that
        # survived (kernels run in process groups of their own; they are found by their
        # connection file, which lives in this server's private runtime dir).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc.poll() is None:
            proc.wait(timeout=10)
        self.forced_kills = self.leftover_processes()
        for pid in self.forced_kills:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def leftover_processes(self) -> list[int]:
        """Pids of live processes started for this server: their command line names its private
        runtime dir (kernels: ``-f RUNTIME/kernel-*.json``) or its token."""
        marks = (str(self.state / "runtime") + os.sep, self.token)
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and any(m in cmd for m in marks):
                found.append(int(entry.name))
        return found

    def __enter__(self) -> "LabServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()

    # --- helpers ---------------------------------------------------------------------------
    def api(self, method: str, path: str, timeout: float = 10):
        req = urllib.request.Request(f"{self.base}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def url(self, notebook: str) -> str:
        # ?reset: start from an empty workspace (no restored tabs/layout).
        return f"{self.base}/lab/tree/{notebook}?token={self.token}&reset"

    def kernel_state(self, notebook: str) -> str | None:
        for s in self.api("GET", "/api/sessions", timeout=5):
            if s["path"] == notebook and s.get("kernel"):
                return s["kernel"]["execution_state"]
        return None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


class NotebookPage:
    """One notebook open in JupyterLab (``page`` already created; ``lab`` serving it)."""

    def __init__(self, page, lab: LabServer, notebook: str):
        self.page, self.lab, self.notebook = page, lab, notebook
        self.js_errors: list[str] = []
        page.on("pageerror", lambda e: self.js_errors.append(str(e)))

    def open(self, timeout: float = 90):
        self.page.goto(self.lab.url(self.notebook), timeout=timeout * 1000)
        self.page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(
            timeout=timeout * 1000)
        # The kernel named in the notebook's metadata starts on its own; wait until it is idle
        # (the server's view, from the kernel's own status messages).
        wait_for(lambda: self.lab.kernel_state(self.notebook) == "idle", timeout,
                 f"kernel for {self.notebook} to start (server log tail:\n{self.lab.log_tail()})")
        return self

    def hide_left_sidebar(self):
        """View → File Browser (a toggle; the file browser is the open left panel): more room
        for the notebook in screenshots. Cosmetic, so best effort."""
        page = self.page
        if not page.locator("#jp-left-stack").is_visible():
            return
        try:
            page.locator(".lm-MenuBar-item", has_text=re.compile(r"^View$")).click(timeout=5000)
            page.locator('.lm-Menu-item[data-command="filebrowser:toggle-main"]').click(
                timeout=5000)
        except Exception:  # noqa: BLE001 - cosmetic only
            page.keyboard.press("Escape")

    def run_all(self):
        """Run → Run All Cells, through the menu bar as a person would."""
        page = self.page
        # Make sure the notebook is the current widget: click its tab (not the notebook body,
        # where a click could land on a cell's collapser or enter edit mode).
        page.locator("#jp-main-dock-panel .lm-TabBar-tab", has_text=self.notebook).first.click()
        page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
        item = page.locator('.lm-Menu-item[data-command="runmenu:run-all"]')
        if not item.count():  # other JupyterLab versions label the same command differently
            item = page.get_by_role("menuitem", name=re.compile(r"^Run All Cells"))
        item.first.click()

    def code_prompts(self) -> list[str]:
        return self.page.eval_on_selector_all(
            ".jp-Notebook .jp-CodeCell .jp-InputArea-prompt",
            "els => els.map(e => e.textContent.trim())")

    def raise_on_errors(self):
        for text in self.page.locator(ERROR_OUTPUT).all_inner_texts():
            if TRACEBACK.search(text):
                raise HarnessError(f"a cell raised an error in the browser:\n{text[-2000:]}")
        broken = self.page.get_by_text(re.compile(r"Error displaying widget|Failed to load model"))
        if broken.count():
            raise HarnessError("a widget failed to render in the browser: "
                               f"{broken.first.inner_text()!r}; JS errors: {self.js_errors[-3:]}")

    def wait_until_executed(self, timeout: float):
        """Every code cell has run (``[n]:`` prompt, none ``[*]``) and the kernel is idle."""
        def done():
            self.raise_on_errors()
            prompts = self.code_prompts()
            if not prompts or not all(re.fullmatch(r"\[\d+\]:", p) for p in prompts):
                return False
            return self.lab.kernel_state(self.notebook) == "idle"
        try:
            wait_for(done, timeout, "all cells to finish running")
        except HarnessError as exc:
            try:
                state = f"code cell prompts {self.code_prompts()}, kernel " \
                        f"{self.lab.kernel_state(self.notebook)!r}"
            except Exception as e:  # noqa: BLE001
                state = f"(page state unavailable: {e!r})"
            raise HarnessError(f"{exc}; {state}") from None

    # --- the widget's image ----------------------------------------------------------------
    def widget_image(self):
        return self.page.locator(WIDGET_IMAGE).last

    def fingerprint(self) -> str | None:
        img = self.page.locator(WIDGET_IMAGE)
        if not img.count():
            return None
        return img.last.evaluate(_FINGERPRINT_JS)

    def settled_fingerprint(self, timeout: float, settle: float = 1.5,
                            different_from: str | None = None) -> str:
        """The widget image's fingerprint once it is present (and differs from
        ``different_from`` when given), the kernel is idle, and it has not changed for ``settle`` s."""
        state = {"fp": None, "since": time.monotonic(), "logs": self.log_count()}

        def stable():
            self.raise_on_errors()
            # A widget callback's exception (or print) goes to JupyterLab's Log Console, not to
            # the cell: when the status bar's log count goes up, read the console and fail on a
            # traceback at once.
            logs = self.log_count()
            if logs > state["logs"]:
                state["logs"] = logs
                text = self.log_console_text()
                if TRACEBACK.search(text):
                    raise HarnessError(f"a widget callback raised (JupyterLab Log Console):\n"
                                       f"{text[-3000:]}")
            fp = self.fingerprint()
            now = time.monotonic()
            if fp != state["fp"]:
                state.update(fp=fp, since=now)
                return False
            if fp is None or fp == different_from:
                return False
            if self.lab.kernel_state(self.notebook) != "idle":
                state["since"] = now
                return False
            return fp if now - state["since"] >= settle else False

        what = ("the widget image to appear and settle" if different_from is None
                else "the widget image to change after the widget change")
        return wait_for(stable, timeout, what)

    def log_count(self) -> int:
        """The Log Console's message count shown in the status bar (0 when none)."""
        item = self.page.locator(".jp-LogConsoleStatusItem")
        text = item.first.inner_text() if item.count() else ""
        m = re.search(r"\d+", text)
        return int(m.group()) if m else 0

    def log_console_text(self) -> str:
        """Open View → Show Log Console, read it, close it again; its text ('' if unavailable)."""
        page = self.page
        try:
            page.locator(".lm-MenuBar-item", has_text=re.compile(r"^View$")).click(timeout=5000)
            page.locator('.lm-Menu-item[data-command="logconsole:open"]').click(timeout=5000)
            panel = page.locator(".jp-LogConsolePanel").first
            panel.wait_for(timeout=5000)
            page.wait_for_timeout(500)
            text = panel.inner_text()
            tab = page.locator(".lm-TabBar-tab", has_text="Log Console").first
            tab.locator(".lm-TabBar-tabCloseIcon").click(timeout=5000)
            return text
        except Exception:  # noqa: BLE001 - diagnostics only
            page.keyboard.press("Escape")
            return ""

    # --- widgets ---------------------------------------------------------------------------
    def _labelled(self, kind: str, description: str):
        """The ipywidgets view of class ``kind`` whose description label is ``description``."""
        label = self.page.locator(".widget-label", has_text=re.compile(
            rf"^\s*{re.escape(description)}\s*:?\s*$", re.I))
        return self.page.locator(f".jp-Notebook .{kind}", has=label).last

    def slider_value(self, description: str) -> str:
        return self._labelled("widget-slider", description).locator(".widget-readout").inner_text()

    def nudge_slider(self, description: str, presses: int = 1, key: str = "ArrowRight") -> str:
        """Focus the slider's handle and press ``key``; returns the new readout text."""
        slider = self._labelled("widget-slider", description)
        slider.scroll_into_view_if_needed()
        before = slider.locator(".widget-readout").inner_text()
        handle = slider.locator(".noUi-handle").first
        handle.focus()
        for _ in range(presses):
            handle.press(key)
        return wait_for(lambda: (v := slider.locator(".widget-readout").inner_text()) != before
                        and v, 10, f"slider {description!r} to move off {before}")

    def dropdown(self, description: str):
        return self._labelled("widget-dropdown", description).locator("select")

    def choose_other(self, description: str, avoid: tuple[str, ...] = ()) -> str:
        """Select another option of dropdown ``description``: the first after the current one
        (cyclically) whose value is not also the current value of a dropdown in ``avoid`` (e.g.
        a DINO source other than the text source); returns the chosen option's label."""
        select = self.dropdown(description)
        select.scroll_into_view_if_needed()
        current = select.input_value()
        taken = {current} | {self.dropdown(d).input_value() for d in avoid if self.dropdown(d).count()}
        values = select.locator("option").evaluate_all("os => os.map(o => o.value)")
        i = values.index(current)
        others = [v for v in values[i + 1:] + values[:i] if v not in taken]
        if not others:
            raise HarnessError(f"dropdown {description!r} has no option besides {sorted(taken)}")
        select.select_option(others[0])
        return select.locator("option:checked").inner_text()
