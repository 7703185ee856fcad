"""The suite must fail, not skip, when CI requires a component that is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_store_test(env_overrides: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_overrides}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_stores.py",
            "-k",
            "test_ping and redis",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_redis_tests_fail_when_required_and_redis_cannot_start() -> None:
    result = _run_store_test(
        {"AI_GUARD_REQUIRE_REDIS": "1", "AI_GUARD_REDIS_BINARY": "/nonexistent/redis-server"}
    )
    assert result.returncode == 1, result.stdout
    assert "redis-server is not installed" in result.stdout
    assert "1 error" in result.stdout


@pytest.mark.slow
def test_redis_tests_skip_loudly_on_a_developer_machine_without_redis() -> None:
    result = _run_store_test(
        {"AI_GUARD_REQUIRE_REDIS": "0", "AI_GUARD_REDIS_BINARY": "/nonexistent/redis-server"}
    )
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout
