"""Every Python snippet in README.md runs, each in a fresh interpreter, as a reader would
paste it. A snippet that needs Redis gets the test redis-server's URL instead of
``redis://127.0.0.1:6379/0``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_REDIS_URL = "redis://127.0.0.1:6379/0"

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _snippets() -> list[tuple[int, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in _BLOCK.finditer(text)]


SNIPPETS = _snippets()


def test_the_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 15


@pytest.mark.slow
@pytest.mark.parametrize(("line", "code"), SNIPPETS, ids=[f"line{n}" for n, _ in SNIPPETS])
def test_readme_snippet_runs(
    line: int, code: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if README_REDIS_URL in code:
        redis_url: str = request.getfixturevalue("redis_url")
        code = code.replace(README_REDIS_URL, redis_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        f"README.md snippet at line {line} failed:\n{result.stdout}\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr
