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
connection per request, as a sync worker closes them), after a warm-up. The four apps are
served side by side for the whole run and measured in short bursts, in turn, round after
round (each round in another order). The fake AI call returns at once, so this measures the guards'
own cost per request: a real upstream's hundreds of milliseconds would hide it entirely.

Two figures per app and round:

- **worker CPU per request**: the CPU time the gunicorn worker (all its threads) spent,
  divided by the requests; its inverse is the requests/s one saturated worker serves.
  The ratios guarded / bare (target >= 0.85) are taken from it: on a shared machine
  (this one has 2 cores, and others run things) the wall-clock rate of one round can be
  half or twice that of the next, while the CPU a request costs stays put.
- **wall-clock requests/s**, as the load generator saw it, with its ratios beside (no
  target), and the load generator's own CPU per request: when it comes near the worker's,
  the generator, not the server, sets the pace (``generator_bound`` in the detail).

The ``detail`` keeps every round.

``cases()`` also measures the same requests in process (straight into the WSGI callable,
no server): the guards' cost per request in microseconds, without the noise of a shared
machine's scheduler.

Run alone: ``python -m benchmarks -k flask``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
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
    cpu_started = time.process_time()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    sent = per_thread * concurrency
    return {
        "requests": sent,
        "seconds": elapsed,
        "rps": sent / elapsed,
        "client_cpu_us": cpu / sent * 1e6,
        "failures": failures,
    }


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


def _cpu_seconds(pid: int) -> float | None:
    """CPU time the threads of process ``pid`` have used (Linux ``schedstat``, ns
    resolution); ``None`` where ``/proc`` does not tell."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                total += int(stat.read().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that has just ended
            continue
    return total / 1e9


def _worker_pid(master: int) -> int | None:
    """The pid of the one worker of the gunicorn ``master`` (``None`` off Linux)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == master:
            return int(entry)
    return None


class _Served:
    """One app under gunicorn, started once for every round: its port and its worker."""

    def __init__(self, port: int, worker: int | None) -> None:
        self.port = port
        self.worker = worker

    def measure(self, requests: int) -> dict[str, float]:
        """One burst: wall-clock req/s, and the worker's and the load generator's CPU per
        request (µs; ``nan`` where it cannot be read)."""
        cpu_before = None if self.worker is None else _cpu_seconds(self.worker)
        figures = _run_load(self.port, requests)
        cpu_after = None if self.worker is None else _cpu_seconds(self.worker)
        worker_us = float("nan")
        if cpu_before is not None and cpu_after is not None:
            worker_us = (cpu_after - cpu_before) / figures["requests"] * 1e6
        return {
            "rps": float(figures["rps"]),
            "worker_cpu_us": worker_us,
            "client_cpu_us": float(figures["client_cpu_us"]),
        }


@contextlib.contextmanager
def _serve(guarded: bool, spans: bool, warmup: int) -> Iterator[_Served]:
    from tests._servers import gunicorn

    target = f"benchmarks.bench_flask:make_app(guarded={guarded}, spans={spans})"
    with gunicorn(target, workers=1, ready_path="/ping") as server:
        assert server.process is not None
        _run_load(server.port, warmup)
        yield _Served(server.port, _worker_pid(server.process.pid))


#: (name, guarded, request spans)
VARIANTS = (
    ("bare", False, False),
    ("guarded", True, False),
    ("bare + spans", False, True),
    ("guarded + spans", True, True),
)


def _rounded(values: list[float]) -> list[int | None]:
    return [None if math.isnan(value) else round(value) for value in values]


def results(quick: bool) -> list[Result]:
    rounds = 2 if quick else 12
    requests = 300 if quick else 600
    warmup = 300
    names = [name for name, _, _ in VARIANTS]
    rounds_of: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        # The four apps are served side by side for the whole run, and the rounds are
        # short bursts in turn (each round in another order): the figures a ratio pairs
        # were taken a second or two apart, so the machine's other load weighs alike.
        served = {
            name: stack.enter_context(_serve(guarded, spans, warmup))
            for name, guarded, spans in VARIANTS
        }
        for round_ in range(rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                rounds_of[name].append(served[name].measure(requests))

    def series(name: str, figure: str) -> list[float]:
        return [round_[figure] for round_ in rounds_of[name]]

    def median(name: str, figure: str) -> float:
        return statistics.median(series(name, figure))

    def ratio(numerator: str, denominator: str, figure: str) -> float:
        # Per round, then the median: each round's apps ran a few seconds apart.
        pairs = zip(series(numerator, figure), series(denominator, figure), strict=True)
        if figure == "rps":
            return round(statistics.median(a / b for a, b in pairs), 3)
        # CPU per request: the cheaper request serves more requests/s.
        return round(statistics.median(b / a for a, b in pairs), 3)

    detail: dict[str, Any] = {
        "workers": 1,
        "load_threads": CONCURRENCY,
        "requests_per_burst": requests,
        "warmup_requests": warmup,
        "rounds": rounds,
        "generator_bound": median("bare", "client_cpu_us") >= 0.8 * median("bare", "worker_cpu_us"),
    }
    for name in names:
        detail[f"{name} req/s"] = _rounded(series(name, "rps"))
        detail[f"{name} worker CPU us/request"] = _rounded(series(name, "worker_cpu_us"))
        detail[f"{name} load generator CPU us/request"] = _rounded(series(name, "client_cpu_us"))
    rows = [
        Result("flask", f"{name} view", round(median(name, "rps"), 1), "req/s", detail=detail)
        for name in names
    ]
    rows += [
        Result(
            "flask",
            f"{name} view, worker CPU per request",
            round(median(name, "worker_cpu_us"), 1),
            "us",
            higher_is_better=False,
            detail=detail,
        )
        for name in names
    ]
    rows.append(
        Result(
            "flask",
            "load generator CPU per request (bare)",
            round(median("bare", "client_cpu_us"), 1),
            "us",
            higher_is_better=False,
            detail=detail,
        )
    )
    pairs = (
        ("guarded / bare", "guarded", "bare", TARGET),
        ("guarded / bare, both with spans", "guarded + spans", "bare + spans", TARGET),
        ("request spans alone (no SDK)", "bare + spans", "bare", None),
        ("all on (guards + spans) / bare", "guarded + spans", "bare", None),
    )
    for label, numerator, denominator, target in pairs:
        rows.append(
            Result(
                "flask",
                label,
                ratio(numerator, denominator, "worker_cpu_us"),
                "ratio (CPU)",
                target=target,
                detail=detail,
            )
        )
        rows.append(
            Result(
                "flask",
                f"{label}, wall clock",
                ratio(numerator, denominator, "rps"),
                "ratio",
                detail=detail,
            )
        )
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
