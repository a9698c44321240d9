"""Helpers of the real-browser test: a private JupyterLab server and a headless Chromium.

:class:`JupyterLab` starts ``jupyter lab`` from this virtual environment on 127.0.0.1 (a
free port, a random token, a temporary root directory and temporary Jupyter config, data
and runtime directories, so nothing of the user's set-up leaks in) and stops it again
through its REST API, killing its process group only if that fails. :func:`launch_chromium`
starts Debian's ``/usr/bin/chromium`` through playwright with a fresh profile.

Nothing here skips: a missing browser or playwright is an error with the command that
installs it (the test runs in ``make test`` and in CI).
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
    "The browser test needs Debian's chromium and the playwright Python package: run "
    "`apt-get install -y chromium` (as root) and `.venv/bin/pip install -e '.[dev]'` "
    "(`bash .ci/run` does both). Set LANDSCAPE_SKIP_BROWSER=1 to skip it knowingly."
)

# JupyterLab settings for the test profile: no news or update checks (no network).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False,
    },
}


def require_browser():
    """``playwright.sync_api.sync_playwright``; fails with :data:`INSTALL_HINT` if missing."""
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} not found. {INSTALL_HINT}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        raise RuntimeError(f"playwright is not importable ({err}). {INSTALL_HINT}") from None
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
    """``jupyter lab`` serving ``root`` on 127.0.0.1; use as a context manager.

    Args:
        root: The server's root directory (holds the notebook).
        home: A scratch directory for Jupyter's config, data, runtime and settings.
        log: Where the server's output goes.
    """

    def __init__(self, root: Path, home: Path, log: Path):
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
        cmd = [
            sys.executable, "-m", "jupyterlab",
            "--allow-root", "--no-browser",
            "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={self.root}",
            f"--ServerApp.token={self.token}",
            "--ServerApp.disable_check_xsrf=True",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.news_url=None",
        ]
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
