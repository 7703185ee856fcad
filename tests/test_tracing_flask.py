"""AI spans nest under the request span of opentelemetry-instrumentation-flask: in-process,
and across a real gunicorn with several workers (each with its own global provider)."""

from __future__ import annotations

import json
import logging
import os
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask, jsonify
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from ai_guard.errors import UpstreamError
from ai_guard.tracing import traced_ai
from ai_guard.types import ChatResult, Usage
from tests._servers import ROOT, gunicorn

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def app(exporter: InMemorySpanExporter) -> Iterator[Flask]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    @traced_ai(operation="chat", tracer_provider=provider)
    def ask(prompt: str, *, model: str) -> ChatResult:
        if prompt == "fail":
            raise UpstreamError("upstream unavailable", status=503)
        return ChatResult(content="ok", model=model, usage=Usage(12, 3, 15, 0))

    app = Flask(__name__)

    @app.post("/ask")
    def ask_view() -> Any:
        prompt = "fail" if "fail" in (app.config.get("MODE") or "") else "hello"
        try:
            result = ask(prompt, model="gpt-4o-mini")
        except UpstreamError as exc:
            return jsonify({"error": str(exc)}), 502
        return jsonify({"content": result.content})

    instrumentor = FlaskInstrumentor()
    instrumentor.instrument_app(app, tracer_provider=provider)  # type: ignore[no-untyped-call]
    yield app
    instrumentor.uninstrument_app(app)  # type: ignore[no-untyped-call]
    provider.shutdown()


def _by_kind(spans: tuple[ReadableSpan, ...]) -> tuple[ReadableSpan, ReadableSpan]:
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    (client,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    return server, client


def test_ai_span_is_a_child_of_the_flask_request_span(
    app: Flask, exporter: InMemorySpanExporter
) -> None:
    response = app.test_client().post("/ask")
    assert response.status_code == 200
    server, ai = _by_kind(exporter.get_finished_spans())
    assert server.name == "POST /ask"
    assert ai.name == "chat gpt-4o-mini"
    assert ai.context.trace_id == server.context.trace_id
    assert ai.parent is not None
    assert ai.parent.span_id == server.context.span_id
    assert ai.end_time is not None
    assert server.end_time is not None
    assert ai.end_time <= server.end_time


def test_incoming_traceparent_continues_into_the_ai_span(
    app: Flask, exporter: InMemorySpanExporter
) -> None:
    app.test_client().post("/ask", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    server, ai = _by_kind(exporter.get_finished_spans())
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert format(ai.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == PARENT_ID


def test_failed_ai_call_inside_a_request_is_an_error_span_under_it(
    app: Flask, exporter: InMemorySpanExporter
) -> None:
    app.config["MODE"] = "fail"
    response = app.test_client().post("/ask")
    assert response.status_code == 502
    server, ai = _by_kind(exporter.get_finished_spans())
    assert ai.parent is not None
    assert ai.parent.span_id == server.context.span_id
    assert ai.status.status_code is StatusCode.ERROR
    assert dict(ai.attributes or {})["error.type"] == "503"


def test_the_call_log_line_of_a_request_carries_the_ai_span_ids(
    app: Flask, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    import ai_guard.logs  # noqa: F401  (registers the call-log sink)

    caplog.set_level(logging.INFO, logger="ai_guard")
    app.test_client().post("/ask")
    _, ai = _by_kind(exporter.get_finished_spans())
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "ai_call"]
    assert record.trace_id == format(ai.context.trace_id, "032x")  # type: ignore[attr-defined]
    assert record.span_id == format(ai.context.span_id, "016x")  # type: ignore[attr-defined]


# -- a real gunicorn, several workers ---------------------------------------------------

APP_SOURCE = textwrap.dedent(
    '''
    """A Flask app as a user would write it: the SDK is the *global* provider of each
    worker, Flask is instrumented without an explicit provider, @traced_ai has none."""
    import json
    import os

    from flask import Flask, jsonify
    from opentelemetry import trace
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    from ai_guard.tracing import traced_ai
    from ai_guard.types import ChatResult, Usage


    class FileExporter(SpanExporter):
        """One JSON line per span, appended (a line is written in one call)."""

        def export(self, spans):
            for span in spans:
                line = json.dumps({
                    "name": span.name,
                    "kind": span.kind.name,
                    "trace_id": format(span.context.trace_id, "032x"),
                    "span_id": format(span.context.span_id, "016x"),
                    "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
                    "pid": os.getpid(),
                    "attributes": {k: v for k, v in (span.attributes or {}).items()
                                   if isinstance(v, (str, int, float, bool))},
                })
                with open(os.environ["AI_GUARD_TEST_SPANS"], "a") as out:
                    out.write(line + "\\n")
            return SpanExportResult.SUCCESS


    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    trace.set_tracer_provider(provider)


    @traced_ai(operation="chat")
    def ask(prompt, *, model):
        return ChatResult(content="ok", model=model, usage=Usage(10, 2, 12, 0))


    app = Flask(__name__)
    FlaskInstrumentor().instrument_app(app)


    @app.post("/ask")
    def ask_view():
        ask("hello", model="gpt-4o-mini")
        return jsonify({"pid": os.getpid()})
    '''
)

WORKERS = 2
REQUESTS = 12


@pytest.mark.slow
def test_under_gunicorn_every_ai_span_nests_under_its_request_span(tmp_path: Path) -> None:
    (tmp_path / "traced_app.py").write_text(APP_SOURCE)
    spans_file = tmp_path / "spans.jsonl"
    env = {
        "AI_GUARD_TEST_SPANS": str(spans_file),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": None,
    }
    trace_ids = [f"{i + 1:032x}" for i in range(REQUESTS)]
    # No readiness route: a request to one would add a request span of its own.
    with gunicorn("traced_app:app", workers=WORKERS, env=env, ready_path=None) as server:

        def send(trace_id: str) -> requests.Response:
            return requests.post(
                f"{server.url}/ask",
                headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"},
                timeout=30,
            )

        with ThreadPoolExecutor(max_workers=4) as pool:
            responses = list(pool.map(send, trace_ids))
    assert [r.status_code for r in responses] == [200] * REQUESTS
    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    servers = {s["trace_id"]: s for s in spans if s["kind"] == "SERVER"}
    clients = {s["trace_id"]: s for s in spans if s["kind"] == "CLIENT"}
    assert sorted(servers) == sorted(clients) == sorted(trace_ids)
    for trace_id in trace_ids:
        server, client = servers[trace_id], clients[trace_id]
        assert server["parent_id"] == PARENT_ID
        assert client["parent_id"] == server["span_id"]
        assert client["pid"] == server["pid"]
        assert client["name"] == "chat gpt-4o-mini"
        assert client["attributes"]["gen_ai.usage.input_tokens"] == 10
    assert {r.json()["pid"] for r in responses} == {s["pid"] for s in servers.values()}
