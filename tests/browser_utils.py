"""Helpers of the real-browser tests: private Jupyter servers and a headless Chromium.

:class:`JupyterLab` starts ``jupyter lab`` (or, with ``app="notebook"``, Notebook 7) from
this virtual environment on 127.0.0.1 (its own free port, a random token, a temporary root
directory and temporary Jupyter config, data and runtime directories, so nothing of the
user's set-up leaks in) and stops it again through its REST API, killing its process group
only if that fails. :func:`launch_chromium` starts Debian's ``/usr/bin/chromium`` through
playwright with a fresh profile.

:func:`missing` says what of the browser tests' needs is absent (chromium, playwright,
axe-core); ``make test`` installs them first where it can (``.ci/browser-deps``). In CI
(``CI=true``) a missing piece fails the tests; elsewhere they are reported as not run, with
the reason and the fix, in the test summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM = Path(os.environ.get("LANDSCAPE_CHROMIUM", "/usr/bin/chromium"))
AXE = Path(__file__).resolve().parent.parent / "js" / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
INSTALL_HINT = (
    "The browser tests need Debian's chromium, the playwright Python package and axe-core "
    "from npm: run `sudo apt-get install -y chromium` (or as root), `.venv/bin/pip install "
    "-e '.[dev]'` and `cd js && npm ci` (`make test` does all three where it can: as root or "
    "with passwordless sudo, and with npm)."
)

# JupyterLab settings for the test profile: no news or update checks (no network).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False,
    },
}


def missing() -> list[str]:
    """What the browser tests need and do not find (empty when all is there)."""
    out = []
    if not CHROMIUM.exists():
        out.append(f"no browser: {CHROMIUM} not found")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as err:
        out.append(f"playwright is not importable ({err})")
    if not AXE.exists():
        out.append(f"axe-core is not installed ({AXE.relative_to(AXE.parents[3])} not found)")
    return out


def in_ci() -> bool:
    """Whether this runs in CI, where the browser tests must run (``CI=true``)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_playwright():
    """``sync_playwright``; in CI a missing piece fails, elsewhere it is reported, not run."""
    import pytest
    from conftest import not_run

    lacking = missing()
    if lacking:
        why = "; ".join(lacking)
        if in_ci():
            pytest.fail(f"CI=true and the browser tests cannot run: {why}. {INSTALL_HINT}")
        not_run(f"THE BROWSER TESTS DID NOT RUN: {why}. {INSTALL_HINT}")
        pytest.skip(f"browser tests not run: {why} (see the summary)")
    from playwright.sync_api import sync_playwright
    return sync_playwright


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_chromium(playwright, profile: Path):
    """A headless Chromium (Debian's) with a fresh profile; returns the browser context."""
    return playwright.chromium.launch_persistent_context(
        str(profile),
        executable_path=str(CHROMIUM),
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 900},
        timeout=120_000,
    )


class JupyterLab:
    """``jupyter lab`` (or Notebook 7) serving ``root`` on 127.0.0.1; a context manager.

    Args:
        root: The server's root directory (holds the notebook).
        home: A scratch directory for Jupyter's config, data, runtime and settings.
        log: Where the server's output goes.
        app: ``"lab"`` (JupyterLab) or ``"notebook"`` (Notebook 7).
    """

    def __init__(self, root: Path, home: Path, log: Path, app: str = "lab"):
        if app not in ("lab", "notebook"):
            raise ValueError(f"app must be 'lab' or 'notebook', got {app!r}")
        self.app = app
        self.root, self.home, self.log_path = Path(root), Path(home), Path(log)
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # the server's process (and session) id, kept after stop
        self._log = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str, query: str = "") -> str:
        """``path`` on the server with the token (and ``query``, e.g. ``"reset"``)."""
        q = f"{query}&" if query else ""
        return f"{self.base}{path}?{q}token={self.token}"

    def api(self, method: str, path: str, timeout: float = 10.0):
        """A REST call with the token; returns the decoded JSON (or ``None``)."""
        req = urllib.request.Request(self.base + path, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def start(self, timeout: float = 120.0) -> JupyterLab:
        """Start the server and wait until its API answers."""
        env = dict(os.environ)
        settings = self.home / "lab-settings"
        for name, value in LAB_SETTINGS.items():
            path = settings / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        env.update(
            JUPYTER_CONFIG_DIR=str(self.home / "config"),
            JUPYTER_DATA_DIR=str(self.home / "data"),
            JUPYTER_RUNTIME_DIR=str(self.home / "runtime"),
            JUPYTERLAB_SETTINGS_DIR=str(settings),
            JUPYTERLAB_WORKSPACES_DIR=str(self.home / "workspaces"),
            IPYTHONDIR=str(self.home / "ipython"),
            JUPYTER_PLATFORM_DIRS="1",
            PYTHONUNBUFFERED="1",
        )
        env.pop("JUPYTER_PATH", None)
        app = "LabApp" if self.app == "lab" else "JupyterNotebookApp"
        cmd = [
            sys.executable, "-m", "jupyterlab" if self.app == "lab" else "notebook",
            "--no-browser",
            "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={self.root}",
            f"--ServerApp.token={self.token}",
            "--ServerApp.disable_check_xsrf=True",
            f"--{app}.expose_app_in_browser=True",
        ]
        if self.app == "lab":
            cmd.append("--LabApp.news_url=None")
        if os.getuid() == 0:  # a container or a CI runner: Jupyter refuses root without it
            cmd.append("--allow-root")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                self.api("GET", "/api/status", timeout=2)
                return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyter lab did not answer in {timeout} s:\n{self.tail()}")
            time.sleep(0.25)

    def tail(self, lines: int = 40) -> str:
        """The end of the server log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """Shut down kernels and server (``POST /api/shutdown``), then its process group."""
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                try:
                    self.api("POST", "/api/shutdown", timeout=10)
                except (urllib.error.URLError, OSError):
                    pass
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            # Anything left in the server's session (a kernel that outlived it) is killed
            # by its process id.
            for sig in (signal.SIGTERM, signal.SIGKILL):
                left = session_pids(proc.pid)
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                if not left:
                    break
                time.sleep(1.0)
            if proc.poll() is None:
                proc.wait(10)
        finally:
            self.proc = None
            if self._log is not None:
                self._log.close()

    def __enter__(self) -> JupyterLab:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the server started with ``start_new_session``)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields: state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(entry.name))
    return out
