"""Flask throughput: a guarded view against the same bare view, under gunicorn.

Four apps answer ``POST /answer`` with the same view body (read the JSON, make one fake AI
call that returns at once, answer JSON):

- ``bare``: plain Flask;
- ``guarded``: the same with :class:`~ai_guard.flask.AIGuard` (per-request sinks, the
  blueprint), the view under ``@guard.idempotent()`` (every request carries a new
  ``Idempotency-Key``: a claim and a stored response in the memory store), the AI call
  under ``@traced_ai`` (counted by the app's collector, one log record);
- ``bare + spans`` and ``guarded + spans``: the same two with request spans from
  ``opentelemetry-instrumentation-flask`` (no SDK configured). ``AIGuard`` turns them on
  by default; their cost is OpenTelemetry's, the same with or without ai_guard, so each
  guarded app is compared with the bare app that has the same request spans.

Each app runs under gunicorn (1 sync worker) and a load generator in a second process on
loopback sends a bounded number of requests from a few threads (raw sockets, one
connection per request, as a sync worker closes them). The rounds interleave the four
apps; the figures are the median requests/s and the ratios guarded / bare (target
>= 0.85). The fake AI call returns at once, so this measures the guards' own cost per
request: a real upstream's hundreds of milliseconds would hide it entirely. On a 2-core
machine the load generator and the worker share the CPU: a bare app can be limited by
the generator, which flatters the ratios a little; the ``detail`` keeps every round.

``cases()`` also measures the same requests in process (straight into the WSGI callable,
no server): the guards' cost per request in microseconds, without the noise of a shared
machine's scheduler.

Run alone: ``python -m benchmarks -k flask``.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request

from ai_guard.types import ChatResult, Usage
from benchmarks._harness import Case, Result

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 4
TARGET = 0.85
BODY = json.dumps({"question": "Which tyre pressure for a city bike?"}).encode()


def _answer(question: str, *, model: str) -> ChatResult:
    """The fake AI call: an answer with usage, at once."""
    return ChatResult(content="About 4 bar.", model=model, usage=Usage(1200, 12, 1212, 1024))


def _ping() -> str:
    return "pong"


def make_app(*, guarded: bool, spans: bool) -> Flask:
    """One of the four apps (gunicorn target ``benchmarks.bench_flask:make_app(...)``).

    ``guarded``: ``AIGuard`` + ``@guard.idempotent()`` + ``@traced_ai``; ``spans``: request
    spans by ``opentelemetry-instrumentation-flask`` (no SDK configured, as a user without
    a collector has it).
    """
    app = Flask(f"bench-{'guarded' if guarded else 'bare'}-{'spans' if spans else 'plain'}")
    app.add_url_rule("/ping", "ping", _ping)
    ask = _answer

    def answer() -> Response:
        body = request.get_json()
        result = ask(body["question"], model="gpt-4o-mini")
        return jsonify(answer=result.content, model=result.model)

    view = answer
    if guarded:
        from ai_guard.flask import AIGuard
        from ai_guard.tracing import traced_ai

        guard = AIGuard(app, tracing=spans)
        ask = traced_ai(operation="chat")(_answer)
        view = guard.idempotent()(answer)
    elif spans:
        from opentelemetry.instrumentation.flask import FlaskInstrumentor

        FlaskInstrumentor().instrument_app(app)  # type: ignore[no-untyped-call]
    app.add_url_rule("/answer", "answer", view, methods=["POST"])
    return app


# -- in process: the WSGI call alone --------------------------------------------------------


def _wsgi_call(app: Flask) -> Callable[[], object]:
    """One POST /answer straight into the app's WSGI callable (no server, no socket), with
    a new Idempotency-Key each time."""
    keys = itertools.count()
    base = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/answer",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(BODY)),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
    }

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None, /
    ) -> Callable[[bytes], object]:
        if not status.startswith("200"):
            raise RuntimeError(f"POST /answer answered {status}")
        return lambda data: None

    def call() -> object:
        environ = {
            **base,
            "wsgi.input": io.BytesIO(BODY),
            "HTTP_IDEMPOTENCY_KEY": f"k-{next(keys)}",
        }
        body = app(environ, start_response)
        try:
            return b"".join(body)
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    return call


def _counted_by_the_app(app: Flask) -> Callable[[int], None]:
    def check(calls: int) -> None:
        counted = app.extensions["ai_guard"].collector.report()["total_requests"]
        if counted != calls:
            raise AssertionError(f"{calls} requests, the app's collector counted {counted}")

    return check


def cases() -> list[Case]:
    """Per request, in process: what the guards add to a Flask request, without gunicorn's
    HTTP work around it (``overhead`` is the difference with the bare app)."""
    rows: list[Case] = []
    for group, spans in (("flask wsgi", False), ("flask wsgi + spans", True)):
        bare = make_app(guarded=False, spans=spans)
        guarded = make_app(guarded=True, spans=spans)
        rows.append(Case(group, "bare", _wsgi_call(bare)))
        rows.append(Case(group, "guarded", _wsgi_call(guarded), check=_counted_by_the_app(guarded)))
    return rows


# -- the load generator (a second process) --------------------------------------------------


def load(port: int, requests: int, concurrency: int) -> dict[str, Any]:
    """Send ``requests`` POSTs from ``concurrency`` threads; requests/s and failures.

    Raw sockets and a request prepared once (only the key changes): a lean client, so that
    the server, not the generator, sets the pace.
    """
    head = (
        b"POST /answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\nIdempotency-Key: " % len(BODY)
    )
    keys = itertools.count()
    tag = uuid.uuid4().hex[:8].encode()
    per_thread = requests // concurrency
    failures: list[str] = []
    barrier = threading.Barrier(concurrency + 1)

    def work() -> None:
        barrier.wait()
        for _ in range(per_thread):
            key = b"%s-%d" % (tag, next(keys))
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                    sock.sendall(head + key + b"\r\n\r\n" + BODY)
                    received = bytearray()
                    while chunk := sock.recv(65536):  # a sync worker closes when done
                        received += chunk
            except OSError as exc:
                failures.append(type(exc).__name__)
                continue
            status = received[9:12].decode("ascii", "replace")
            if status != "200":
                failures.append(status or "no answer")

    threads = [threading.Thread(target=work) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    sent = per_thread * concurrency
    return {"requests": sent, "seconds": elapsed, "rps": sent / elapsed, "failures": failures}


def _run_load(port: int, requests: int) -> dict[str, Any]:
    output = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_flask",
            "--load",
            str(port),
            str(requests),
            str(CONCURRENCY),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    figures: dict[str, Any] = json.loads(output.stdout)
    if figures["failures"]:
        raise RuntimeError(f"load generator saw failures: {figures['failures'][:5]}")
    return figures


def _measure(guarded: bool, spans: bool, requests: int, warmup: int) -> float:
    from tests._servers import gunicorn

    target = f"benchmarks.bench_flask:make_app(guarded={guarded}, spans={spans})"
    with gunicorn(target, workers=1, ready_path="/ping") as server:
        _run_load(server.port, warmup)
        return float(_run_load(server.port, requests)["rps"])


#: (name, guarded, request spans)
VARIANTS = (
    ("bare", False, False),
    ("guarded", True, False),
    ("bare + spans", False, True),
    ("guarded + spans", True, True),
)


def results(quick: bool) -> list[Result]:
    rounds = 1 if quick else 3
    requests = 1200 if quick else 4000
    warmup = 300
    rates: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    for _ in range(rounds):  # interleaved, so a slow minute of the machine hits all four
        for name, guarded, spans in VARIANTS:
            rates[name].append(_measure(guarded, spans, requests, warmup))
    rps = {name: statistics.median(values) for name, values in rates.items()}

    def ratio(numerator: str, denominator: str) -> float:
        # Per round, then the median: each round's apps ran a few seconds apart.
        pairs = zip(rates[numerator], rates[denominator], strict=True)
        return round(statistics.median(a / b for a, b in pairs), 3)

    detail = {
        "workers": 1,
        "load_threads": CONCURRENCY,
        "requests_per_round": requests,
        "rounds": rounds,
        **{f"{name} req/s": [round(r) for r in values] for name, values in rates.items()},
    }
    rows = [
        Result("flask", f"{name} view", round(rps[name], 1), "req/s", detail=detail)
        for name, _, _ in VARIANTS
    ]
    rows += [
        Result(
            "flask",
            "guarded / bare",
            ratio("guarded", "bare"),
            "ratio",
            target=TARGET,
            detail=detail,
        ),
        Result(
            "flask",
            "guarded / bare, both with spans",
            ratio("guarded + spans", "bare + spans"),
            "ratio",
            target=TARGET,
            detail=detail,
        ),
        Result(
            "flask",
            "request spans alone (no SDK)",
            ratio("bare + spans", "bare"),
            "ratio",
            detail=detail,
        ),
        Result(
            "flask",
            "all on (guards + spans) / bare",
            ratio("guarded + spans", "bare"),
            "ratio",
            detail=detail,
        ),
    ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_flask")
    parser.add_argument("--load", nargs=3, metavar=("PORT", "REQUESTS", "CONCURRENCY"), type=int)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.load:
        port, count, concurrency = args.load
        print(json.dumps(load(port, count, concurrency)))
        return 0
    for row in results(args.quick):
        print(f"{row.name:<20} {row.value:>10} {row.unit}  target {row.target}  ok {row.ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
