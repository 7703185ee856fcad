"""Real servers for tests and benchmarks: a WSGI app in a thread, gunicorn in a
subprocess, Chromium.

One place for the start / wait-until-ready / terminate pattern the multi-process tests
(and ``benchmarks/bench_flask.py``) share. Waiting polls a port or a URL with a deadline
(an external process becoming ready), never a state change inside the test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    """A free TCP port on loopback. (``tests.conftest`` has the same; this module is also
    used by the benchmarks, which must not need pytest.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Serve the WSGI ``app`` on a free loopback port (werkzeug, threaded) and yield its
    base URL; shut down on exit."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="test-wsgi", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass
class Gunicorn:
    """A gunicorn serving ``target`` (``module:callable``) with ``workers`` processes.

    ``ready_path`` is polled (HTTP 200) once every worker has logged its boot (``None``:
    until the port accepts connections, for an app with no route to spare); the log is
    kept in ``log`` for failure messages. ``env`` is added to this process's environment
    (a ``None`` value removes the variable).
    """

    target: str
    workers: int = 2
    env: Mapping[str, str | None] = field(default_factory=dict)
    ready_path: str | None = "/"
    worker_class: str = "sync"
    extra_args: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path, *, timeout: float = 30.0) -> None:
        self.log = log_dir / f"gunicorn-{self.port}.log"
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(self.workers),
            # Sync workers take one connection at a time, so concurrent clients reach
            # every worker (a gthread worker may accept them all itself).
            "--worker-class",
            self.worker_class,
            "--bind",
            f"127.0.0.1:{self.port}",
            "--timeout",
            "30",
            "--graceful-timeout",
            "5",
            "--chdir",
            str(ROOT),
            *_no_control_socket(),
            *self.extra_args,
            self.target,
        ]
        # Unbuffered: log lines (access lines included) reach the log file as written.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        for name, value in self.env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        with self.log.open("wb") as log_file:
            self.process = subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            self._wait_until_serving(timeout)
        except BaseException:
            self.stop()
            raise

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def _wait_until_serving(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited early:\n{self.log_text()}")
            if self.log_text().count("Booting worker") >= self.workers and self._answers():
                return
            time.sleep(0.05)  # waiting for an external process to start listening
        raise RuntimeError(f"gunicorn did not start within {timeout:g} s:\n{self.log_text()}")

    def _answers(self) -> bool:
        try:
            if self.ready_path is None:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            return requests.get(self.url + self.ready_path, timeout=2).status_code == 200
        except OSError:  # not listening yet (requests' errors are OSErrors too)
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


def _no_control_socket() -> list[str]:
    """Recent gunicorns open a control socket at one fixed path in ``$HOME``: two servers
    of one test run would fight over it, and a test needs none."""
    from gunicorn.config import KNOWN_SETTINGS

    if any(setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS):
        return ["--no-control-socket"]
    return []


@contextmanager
def gunicorn(target: str, **options: Any) -> Iterator[Gunicorn]:
    """Start :class:`Gunicorn` for the block (its log in a temporary directory)."""
    server = Gunicorn(target, **options)
    with tempfile.TemporaryDirectory() as tmp:
        server.start(Path(tmp))
        try:
            yield server
        finally:
            server.stop()


def chromium_binary() -> str:
    """The Chromium executable (fails in CI, skips loudly elsewhere, when missing)."""
    override = os.environ.get("AI_GUARD_CHROMIUM_BINARY")
    for candidate in (override,) if override else CHROMIUM_CANDIDATES:
        found = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if found and os.access(found, os.X_OK):
            return found
    from tests.conftest import require_component  # pytest only here: benchmarks import us

    require_component("AI_GUARD_REQUIRE_BROWSER", "Chromium is not installed")
    raise AssertionError("unreachable")


def run_chromium(
    binary: str, profile: Path, args: Sequence[str], *, timeout: float = 60.0
) -> subprocess.CompletedProcess[bytes]:
    """Headless Chromium with a throw-away profile, no network services of its own."""
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, timeout=timeout, check=False)
