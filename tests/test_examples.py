"""The scripts in examples/ run as a user would run them (``python examples/x.py``), in a
fresh interpreter, offline against the fake upstream they start, and print what they
promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ai_guard.testing import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name: str, **openai_env: str) -> str:
    # No OPENAI_API_KEY (or any OPENAI_*) unless given: the script must then choose the
    # fake upstream it starts itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(openai_env)
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / name)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def test_the_script_examples_exist() -> None:
    scripts = {"script_chat.py", "script_stream.py", "structured_output.py"}
    assert scripts <= {p.name for p in EXAMPLES.glob("*.py")}


def test_script_chat_answers_and_reads_the_cached_prompt() -> None:
    out = run_example("script_chat.py")
    assert "Asking the fake upstream at http://127.0.0.1:" in out
    answers = re.findall(r"^A: (.+)$", out, re.MULTILINE)
    assert len(answers) == 2
    assert all(answers)
    figures = re.findall(r"(\d+) prompt tokens \((\d+) cached\)", out)
    assert len(figures) == 2
    (first_prompt, first_cached), (second_prompt, second_cached) = (
        (int(p), int(c)) for p, c in figures
    )
    assert first_prompt >= 1024
    assert first_cached == 0
    assert 1024 <= second_cached <= second_prompt  # the long system prompt was cached
    summary = re.search(r"^2 calls, (\d+) tokens, cost \$(\d+\.\d+), cache hit rate", out, re.M)
    assert summary is not None
    assert int(summary.group(1)) > first_prompt + second_prompt
    assert float(summary.group(2)) > 0


def test_script_stream_prints_the_stream_its_usage_and_a_cut_stream() -> None:
    out = run_example("script_stream.py")
    complete, cut = out.split("A stream whose connection drops mid-way:")
    usage = re.search(r"usage: (\d+) prompt \+ (\d+) completion = (\d+) tokens", complete)
    assert usage is not None
    prompt, completion, total = (int(g) for g in usage.groups())
    assert prompt + completion == total
    assert completion > 0
    assert "stream cut: the connection dropped mid-stream" in cut
    kept = re.search(r"^kept: '(.+)'$", cut, re.MULTILINE)
    assert kept is not None
    # the text kept is exactly what was printed before the cut
    assert cut.lstrip("\n").startswith(kept.group(1))


def test_structured_output_prints_a_validated_object_and_a_refusal() -> None:
    out = run_example("structured_output.py")
    assert re.search(r"^Bike: \{'name': '.*', 'kind': '(city|road|mountain|cargo)'", out, re.M)
    assert "refused: I can't help with that request." in out


@pytest.mark.parametrize("name", ["script_chat.py", "script_stream.py", "structured_output.py"])
def test_examples_are_short_and_use_the_client(name: str) -> None:
    source = (EXAMPLES / name).read_text(encoding="utf-8")
    assert "AIClient(" in source
    assert "OPENAI_API_KEY" in source  # each says how to run it against the real API
    assert len(source.splitlines()) <= 100


@pytest.mark.parametrize("name", ["script_chat.py", "script_stream.py", "structured_output.py"])
def test_with_an_api_key_the_examples_use_the_configured_api(name: str) -> None:
    # Stands in for the real API: the environment names it, and it insists on the key.
    with FakeUpstream(require_api_key="sk-example-key-0000") as api:
        out = run_example(name, OPENAI_API_KEY="sk-example-key-0000", OPENAI_BASE_URL=api.url)
        requests = api.requests
    assert requests
    assert all(r.status == 200 for r in requests)
    assert "fake upstream" not in out
    assert "stream cut" not in out  # the offline-only demonstrations are skipped
    assert "refused" not in out
