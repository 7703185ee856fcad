"""Shared fixtures: a real redis-server on a free loopback port, stores, a fake clock.

Redis and Chromium tests *fail* when ``AI_GUARD_REQUIRE_REDIS=1`` /
``AI_GUARD_REQUIRE_BROWSER=1`` (set by ``.ci/run``) and the component is missing; on a
developer machine without them they skip with a loud reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import settings

from ai_guard.clock import set_testing
from ai_guard.stores import MemoryStore, RedisStore, Store
from ai_guard.testing import FakeClock

# CI explores the same examples on every run (HYPOTHESIS_PROFILE=ci, set by .ci/run), so
# that a red build always means a change broke something; a developer's run explores new
# ones, and what it finds becomes an @example.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_component(env_var: str, message: str) -> None:
    """Fail when CI requires the component, skip loudly otherwise."""
    if os.environ.get(env_var) == "1":
        pytest.fail(f"{message} ({env_var}=1: this component is required here)")
    pytest.skip(f"SKIPPED, NOT TESTED: {message} (set {env_var}=1 to make this a failure)")


class RedisServer:
    """A redis-server process of our own, on a free loopback port."""

    def __init__(self, binary: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._binary = binary
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self._binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--maxclients",
                "2000",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"redis-server did not start on port {self.port}"
                        ) from None
                    time.sleep(0.02)  # waiting for an external process to listen
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the whole session (``AI_GUARD_REDIS_BINARY`` overrides the
    binary looked up on PATH)."""
    binary = os.environ.get("AI_GUARD_REDIS_BINARY") or shutil.which("redis-server")
    if not binary or not os.path.exists(binary):
        require_component("AI_GUARD_REQUIRE_REDIS", "redis-server is not installed")
        raise AssertionError("unreachable")
    server = RedisServer(binary)
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        server.stop()
        require_component("AI_GUARD_REQUIRE_REDIS", f"redis-server could not start: {exc}")
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def redis_store(redis_url: str) -> Iterator[RedisStore]:
    """A Redis store with a key prefix of its own, cleared afterwards."""
    store = RedisStore(redis_url, key_prefix=f"test:{uuid.uuid4().hex[:12]}:")
    yield store
    store.clear()
    store.close()


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, fake_clock: FakeClock) -> Store:
    """Every backend, for the shared store suite. The memory store runs on the fake
    clock; Redis keeps real time for TTLs."""
    if request.param == "memory":
        return MemoryStore(clock=fake_clock)
    redis_store: Store = request.getfixturevalue("redis_store")
    return redis_store


@pytest.fixture(autouse=True)
def _no_testing_mode_leak() -> Iterator[None]:
    yield
    set_testing(False)
