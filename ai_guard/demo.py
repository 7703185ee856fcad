"""``python -m ai_guard demo``: the example Flask app against the embedded fake upstream.

What it does, offline, in well under a minute:

1. starts :class:`~ai_guard.testing.FakeUpstream` (an OpenAI-compatible server on
   loopback, with latency, prompt caching and, later, a quota and an outage) and the
   example app (``examples/flask_app.py``: the guarded client, the hand-stacked decorators,
   the ``AIGuard`` extension and its dashboard) in a werkzeug server thread;
2. drives a scripted scenario over HTTP, with a progress bar on stderr: normal traffic
   (a realistic task mix, routed to the mini or the full model), a burst that meets the
   upstream's quota and is paced, an outage that trips the breakers and heals them,
   idempotent replays, a stream and a structured output;
3. prints a report on stdout, read from the app's own endpoints (``/ai-guard/metrics``,
   ``/ai-guard/slo``, ``/ai-guard/health``) and from the upstream's counts.

``--serve`` then keeps the app running (with a trickle of traffic) and prints the
dashboard's URL until Ctrl-C; ``--quick`` runs a shorter scenario; ``--json PATH`` writes
the figures as JSON. The exit status is 0 when the scenario behaved as the guards promise
(no 429 reached through pacing, the breakers opened and closed again, replays were
served), 1 otherwise, with the reason on stderr.

The example app lives in the source tree (``examples/flask_app.py``), so the demo runs from
a checkout (``pip install -e .``), as the README's first command does.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import random
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import requests

from ai_guard.routing import RouteRequest, sample_traffic
from ai_guard.testing import FakeUpstream

__all__ = ["DemoPlan", "Progress", "load_example_app", "run_demo"]

EXAMPLE_APP = Path(__file__).resolve().parent.parent / "examples" / "flask_app.py"
BREAKERS = ("openai:gpt-4o", "openai:gpt-4o-mini")

#: A long, shared system prompt (about 1,300 tokens): the upstream caches its prefix, so
#: most prompt tokens of every call after the first are billed at the cached rate.
SYSTEM_PROMPT = " ".join(
    [
        "You are the support assistant of Spoke & Chain, a bicycle shop with a workshop.",
        "Answer in at most three sentences, in the customer's language, and be practical.",
        *(
            f"Policy {n}: {rule}"
            for n, rule in enumerate(
                [
                    "repairs are quoted before work starts and never exceed the quote by more "
                    "than ten percent without the customer's written consent",
                    "returns are accepted within thirty days with the receipt, except for "
                    "custom-built wheels, fitted saddles and used parts",
                    "the workshop is open from eight to six on weekdays and from nine to one "
                    "on Saturdays; express service costs fifteen euros more",
                    "warranty claims need the frame number, the purchase date and photos of "
                    "the damage, and are answered within five working days",
                    "never give medical advice; for an injury, tell the customer to see a "
                    "doctor and offer to check the bicycle for free",
                    "electric bicycles are serviced only by certified mechanics; battery "
                    "questions go to the manufacturer's hotline",
                ]
                * 6,
                start=1,
            )
        ),
    ]
)

QUESTIONS = (
    "My rear brake squeaks when it rains, what should I do?",
    "Can I return a helmet I bought three weeks ago?",
    "How much does a full service cost for a city bike?",
    "The chain keeps jumping on the smallest sprocket.",
    "Do you fit child seats on cargo bikes?",
    "My e-bike battery drains overnight, is that normal?",
    "What tyre pressure for a 28 mm road tyre at 70 kg?",
    "Is the workshop open on Saturday afternoon?",
    "I was charged twice for my last repair.",
    "Which lock do you recommend for a city centre?",
    "The frame has a crack near the bottom bracket.",
    "Can you true a wheel while I wait?",
)


@dataclass(frozen=True)
class DemoPlan:
    """How much of each phase the demo runs."""

    normal: int = 300  # requests of normal traffic
    threads: int = 6  # concurrent clients
    burst: int = 60  # requests of the burst
    quota: int = 20  # requests per second the upstream admits during the burst
    breaker_timeout: float = 2.0  # seconds a breaker stays open
    outage_rejections: int = 12  # calls rejected by the open circuits, at once
    replays: int = 5  # idempotency keys, each sent twice

    @classmethod
    def for_run(cls, quick: bool) -> DemoPlan:
        if quick:
            return cls(
                normal=50,
                threads=4,
                burst=30,
                quota=15,
                breaker_timeout=1.0,
                outage_rejections=6,
                replays=3,
            )
        return cls()


# -- the progress bar ----------------------------------------------------------------------


class Progress:
    """A progress bar on ``stream`` (stderr): redrawn in place on a terminal, one line per
    phase otherwise (a log file or a CI job gets readable lines, no carriage returns)."""

    WIDTH = 28

    def __init__(
        self, stream: TextIO, phases: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stream = stream
        self.clock = clock
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.phases = phases
        self.index = 0
        self.name = ""
        self.total = 1
        self.done = 0
        self.note = ""
        self.started = 0.0
        self._drawn_at = 0.0
        self._lock = threading.Lock()

    def start(self, name: str, total: int) -> None:
        with self._lock:
            self.index += 1
            self.name, self.total, self.done, self.note = name, max(total, 1), 0, ""
            self.started = self.clock()
            if self.tty:
                self._draw(force=True)

    def advance(self, steps: int = 1, note: str | None = None) -> None:
        with self._lock:
            self.done = min(self.total, self.done + steps)
            if note is not None:
                self.note = note
            if self.tty:
                self._draw()

    def set_note(self, note: str) -> None:
        with self._lock:
            self.note = note
            if self.tty:
                self._draw()

    def finish(self, summary: str) -> None:
        with self._lock:
            self.done = self.total
            elapsed = self.clock() - self.started
            line = f"[{self.index}/{self.phases}] {self.name:<18} {summary} ({elapsed:.1f} s)"
            if self.tty:
                self.stream.write("\r\x1b[K" + line + "\n")
            else:
                self.stream.write(line + "\n")
            self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        now = self.clock()
        # At most 20 redraws a second: a terminal is slow, the requests are not.
        if not force and now - self._drawn_at < 0.05:
            return
        self._drawn_at = now
        filled = round(self.WIDTH * self.done / self.total)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        percent = 100 * self.done / self.total
        self.stream.write(
            f"\r\x1b[K[{self.index}/{self.phases}] {self.name:<18} [{bar}] {percent:3.0f}%"
            f"  {self.note}"
        )
        self.stream.flush()


# -- the example app -----------------------------------------------------------------------


def load_example_app(path: Path = EXAMPLE_APP) -> ModuleType:
    """Import ``examples/flask_app.py`` from the source tree."""
    if not path.exists():
        raise RuntimeError(
            f"the demo runs the example app {path}, which is not there: run it from a "
            "source checkout (git clone ...; pip install -e '.[all]')"
        )
    name = "ai_guard_demo_flask_app"
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has one
        raise RuntimeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _quiet_handler() -> type[Any]:
    """werkzeug's request handler without the per-request log line."""
    from werkzeug.serving import WSGIRequestHandler

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            return

    return QuietHandler


@contextmanager
def _serve(app: Any, port: int) -> Iterator[str]:
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=_quiet_handler())
    thread = threading.Thread(target=server.serve_forever, name="ai_guard-demo", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """The guards log breaker openings at WARNING: the report tells that story instead."""
    logger = logging.getLogger("ai_guard")
    handler = logging.NullHandler()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


# -- the scenario --------------------------------------------------------------------------


@dataclass
class Figures:
    """What the scenario saw from the client's side."""

    statuses: Counter[str] = field(default_factory=Counter)
    burst: dict[str, Any] = field(default_factory=dict)
    outage: dict[str, Any] = field(default_factory=dict)
    replays: dict[str, Any] = field(default_factory=dict)
    stream: dict[str, Any] = field(default_factory=dict)
    structured: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class _Scenario:
    def __init__(
        self, url: str, upstream: FakeUpstream, plan: DemoPlan, progress: Progress
    ) -> None:
        self.url = url
        self.upstream = upstream
        self.plan = plan
        self.progress = progress
        self.figures = Figures()
        self._local = threading.local()

    # -- HTTP ---------------------------------------------------------------------------------

    def session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
        return session

    def ask(self, route: RouteRequest, index: int, **headers: str) -> requests.Response:
        body = {
            "question": QUESTIONS[index % len(QUESTIONS)],
            "task": route.task_type,
            "complexity": route.complexity_score,
            "critical": route.is_critical,
            "output": route.output_length,
        }
        return self.session().post(f"{self.url}/answers", json=body, headers=headers, timeout=30)

    def classify(self, index: int) -> requests.Response:
        text = QUESTIONS[index % len(QUESTIONS)]
        return self.session().post(f"{self.url}/classify", json={"text": text}, timeout=30)

    def health(self) -> dict[str, str]:
        body = self.session().get(f"{self.url}/ai-guard/health", timeout=10).json()
        return {b["name"]: b["state"] for b in body["breakers"]}

    def parallel(
        self, jobs: Sequence[Callable[[], requests.Response]], *, steps: bool = True
    ) -> list[int]:
        """Run ``jobs`` on the plan's threads; each one is a step of the progress bar
        unless ``steps`` is false (a phase that counts its own steps)."""

        def run(job: Callable[[], requests.Response]) -> int:
            status = job().status_code
            if steps:
                self.progress.advance()
            return status

        with ThreadPoolExecutor(max_workers=self.plan.threads) as pool:
            statuses = list(pool.map(run, jobs))
        self.figures.statuses.update(str(s) for s in statuses)
        return statuses

    def upstream_count(self, status: str) -> int:
        return self.upstream.stats().get(status, 0)

    # -- phases --------------------------------------------------------------------------------

    def normal_traffic(self) -> None:
        plan = self.plan
        self.progress.start("normal traffic", plan.normal)
        routes = sample_traffic(plan.normal, seed=7)
        jobs: list[Callable[[], requests.Response]] = []
        for index, route in enumerate(routes):
            if index % 5 == 4:  # the hand-stacked decorators take a share of the traffic
                jobs.append(functools.partial(self.classify, index))
            else:
                jobs.append(functools.partial(self.ask, route, index))
        statuses = self.parallel(jobs)
        ok = sum(1 for s in statuses if s == 200)
        if ok != len(statuses):
            self.figures.problems.append(f"normal traffic: {len(statuses) - ok} requests failed")
        self.progress.finish(f"{ok}/{len(statuses)} answered")

    def burst(self) -> None:
        plan = self.plan
        self.progress.start("burst (paced)", 2 * plan.burst)
        # The quota applies from now on; windows are one second long.
        self.upstream.configure(quota_requests=plan.quota, quota_window=1.0)
        before = self.upstream_count("429")
        started = time.monotonic()
        route = RouteRequest("classification", 2, False, "short")
        statuses = self.parallel([functools.partial(self.ask, route, i) for i in range(plan.burst)])
        paced_seconds = time.monotonic() - started
        paced_429 = self.upstream_count("429") - before
        # The same burst straight at the upstream, unpaced: what pacing saved us from.
        self.progress.set_note("the same burst, unpaced")
        unpaced_429 = self._unpaced_burst(plan.burst)
        self._wait_for_next_window()
        self.upstream.configure(quota_requests=None)
        ok = sum(1 for s in statuses if s == 200)
        self.figures.burst = {
            "requests": plan.burst,
            "answered": ok,
            "quota_per_second": plan.quota,
            "seconds": round(paced_seconds, 2),
            "paced_429": paced_429,
            "unpaced_429": unpaced_429,
            "avoided_429": max(0, unpaced_429 - paced_429),
        }
        if ok != plan.burst:
            self.figures.problems.append(f"burst: {plan.burst - ok} requests failed")
        if paced_429 > max(2, plan.burst // 20):
            self.figures.problems.append(f"burst: pacing let {paced_429} requests meet a 429")
        self.progress.finish(
            f"{ok}/{plan.burst} answered in {paced_seconds:.1f} s at {plan.quota}/s, "
            f"{paced_429} x 429 (unpaced: {unpaced_429} x 429)"
        )

    def _unpaced_burst(self, count: int) -> int:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

        def send(_: int) -> int:
            response = self.session().post(
                f"{self.upstream.url}/chat/completions", json=body, timeout=30
            )
            self.progress.advance()
            return response.status_code

        with ThreadPoolExecutor(max_workers=self.plan.threads) as pool:
            return sum(1 for status in pool.map(send, range(count)) if status == 429)

    def _wait_for_next_window(self) -> None:
        # Let the quota window the unpaced burst exhausted end before the next phase.
        time.sleep(1.05)

    def outage(self) -> None:
        plan = self.plan
        self.progress.start("outage", 4)
        self.upstream.configure(error_rate=1.0, error_statuses=(503,))
        mini = RouteRequest("classification", 1, False, "short")
        full = RouteRequest("chat", 9, True, "long")
        failed = 0
        deadline = time.monotonic() + 20
        self.progress.set_note("upstream answers 503 to everything")
        while time.monotonic() < deadline:
            states = self.health()
            if all(states.get(name) == "open" for name in BREAKERS):
                break
            statuses = self.parallel(
                [functools.partial(self.ask, mini if i % 2 else full, i) for i in range(4)],
                steps=False,
            )
            failed += sum(1 for s in statuses if s != 200)
        self.progress.advance(note="both circuits open")
        before = self.upstream_count("total")
        started = time.monotonic()
        rejected = self.parallel(
            [
                functools.partial(self.ask, mini if i % 2 else full, i)
                for i in range(plan.outage_rejections)
            ],
            steps=False,
        )
        rejected_seconds = time.monotonic() - started
        reached_upstream = self.upstream_count("total") - before
        self.progress.advance(note="upstream healed; waiting for the trial calls")
        self.upstream.configure(error_rate=0.0)
        healed_at = time.monotonic()
        deadline = healed_at + plan.breaker_timeout + 15
        states = self.health()
        while time.monotonic() < deadline and any(
            states.get(name) != "closed" for name in BREAKERS
        ):
            opened = [n for n in BREAKERS if states.get(n) == "open"]
            if opened:
                time.sleep(0.1)  # the breakers' open time runs out on its own
            else:
                self.parallel(
                    [functools.partial(self.ask, mini, 0), functools.partial(self.ask, full, 1)],
                    steps=False,
                )
            states = self.health()
        self.progress.advance(note="circuits closed")
        closed = all(states.get(name) == "closed" for name in BREAKERS)
        self.figures.outage = {
            "failed_while_tripping": failed,
            "rejected_fast": sum(1 for s in rejected if s == 503),
            "rejected_requests": len(rejected),
            "rejected_seconds": round(rejected_seconds, 3),
            "reached_upstream_while_open": reached_upstream,
            "healed_in_seconds": round(time.monotonic() - healed_at, 2),
            "final_states": states,
        }
        if not closed:
            self.figures.problems.append(f"outage: the breakers did not close again: {states}")
        if reached_upstream:
            self.figures.problems.append(
                f"outage: {reached_upstream} calls reached the upstream while both circuits "
                "were open"
            )
        self.progress.finish(
            f"circuits opened after {failed} failed calls, rejected {len(rejected)} calls "
            f"in {rejected_seconds * 1000:.0f} ms, closed again "
            f"{self.figures.outage['healed_in_seconds']:.1f} s after the upstream healed"
        )

    def replays(self) -> None:
        plan = self.plan
        self.progress.start("idempotent replays", 2 * plan.replays)
        route = RouteRequest("short_answer", 2, False, "short")
        before = self.upstream_count("total")
        replayed = 0
        for index in range(plan.replays):
            key = f"demo-{uuid.uuid4().hex}"
            first = self.ask(route, index, **{"Idempotency-Key": key})
            self.progress.advance()
            again = self.ask(route, index, **{"Idempotency-Key": key})
            self.progress.advance()
            if (
                first.status_code == again.status_code == 200
                and again.headers.get("Idempotent-Replayed") == "true"
                and again.json() == first.json()
            ):
                replayed += 1
        calls = self.upstream_count("total") - before
        self.figures.replays = {
            "keys": plan.replays,
            "requests": 2 * plan.replays,
            "replayed": replayed,
            "upstream_calls": calls,
        }
        if replayed != plan.replays or calls != plan.replays:
            self.figures.problems.append(
                f"replays: {replayed}/{plan.replays} replayed, {calls} upstream calls"
            )
        self.progress.finish(
            f"{2 * plan.replays} requests, {replayed} replayed, {calls} upstream calls"
        )

    def stream(self) -> None:
        self.upstream.configure(stream_chunk_delay=0.02)
        self.progress.start("stream", 30)
        deltas = 0
        text: list[str] = []
        usage: dict[str, Any] | None = None
        event = "message"
        with self.session().get(
            f"{self.url}/stream",
            params={"question": "Explain, step by step, how to fix a flat tyre."},
            stream=True,
            timeout=30,
        ) as response:
            status = response.status_code
            for line in response.iter_lines(decode_unicode=True):
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    payload = json.loads(data)
                    if event == "usage":
                        usage = payload
                    elif event == "message":
                        deltas += 1
                        text.append(payload["delta"])
                        self.progress.advance()
                    event = "message"
        self.upstream.configure(stream_chunk_delay=0.0)
        self.figures.stream = {
            "status": status,
            "deltas": deltas,
            "usage": usage,
            "text": "".join(text),
        }
        if status != 200 or not deltas or usage is None:
            self.figures.problems.append(f"stream: status {status}, {deltas} deltas, {usage=}")
        self.progress.finish(f"{deltas} deltas, then usage {usage}")

    def structured(self) -> None:
        self.progress.start("structured output", 1)
        message = (
            "Hello, this is Ana Souza. Since yesterday the app crashes whenever I open the "
            "booking page, and my bike is due for its service tomorrow. Please help!"
        )
        response = self.session().post(f"{self.url}/extract", json={"text": message}, timeout=30)
        ticket = response.json()
        self.progress.advance()
        self.figures.structured = {"status": response.status_code, "ticket": ticket}
        if response.status_code != 200:
            self.figures.problems.append(f"structured output: status {response.status_code}")
        self.progress.finish(f"ticket {ticket}")

    # -- the trickle of --serve ------------------------------------------------------------------

    def trickle(self, stop: threading.Event) -> None:
        routes = sample_traffic(10_000, seed=11)
        index = 0
        while not stop.wait(0.4):
            try:
                if index % 5 == 4:
                    self.classify(index)
                else:
                    self.ask(routes[index % len(routes)], index)
            except requests.RequestException:
                pass
            index += 1


# -- the report ----------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f} %"


def _slo_value(value: float | None, unit: str) -> str:
    if value is None:
        return "no data"
    if unit == "ms":
        return _ms(value)
    if unit == "ratio":
        return _pct(value, 2)
    if unit == "percent":
        return f"{value:.1f} %"
    if unit == "USD":
        return f"${value:,.2f}"
    return f"{value:g}"


def _table(rows: Iterable[Sequence[str]], indent: str = "  ") -> list[str]:
    rows = [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]


def build_report(
    report: dict[str, Any],
    slos: dict[str, Any],
    transitions: list[dict[str, Any]],
    figures: Figures,
    elapsed: float,
) -> tuple[str, dict[str, Any]]:
    """The report table (text) and the same figures as a JSON-ready dict."""
    latency = report["latency_ms"]
    total = report["total_requests"]
    lines = [
        "",
        f"ai_guard demo: {total} AI calls through the example Flask app, against the fake "
        f"upstream, in {elapsed:.1f} s",
        "",
    ]
    burst, outage, replays = figures.burst, figures.outage, figures.replays
    stream, structured = figures.stream, figures.structured
    rows = [
        (
            "requests by tier",
            f"mini {report['mini_requests']}, full {report['full_requests']}"
            f", mini share {report['mini_percentage'] or 0:.1f} %",
        ),
        (
            "latency p95",
            f"mini {_ms(latency['mini']['p95'])}, full {_ms(latency['full']['p95'])}",
        ),
        ("cache hit rate", f"{_pct(report['cache_hit_rate'])} of prompt tokens served cached"),
        (
            "cost",
            f"${report['total_cost_usd']:.4f}  (${report['avg_cost_per_request'] or 0:.6f}"
            " per call)",
        ),
        (
            "errors",
            f"{report['error_count']} calls failed (the outage), "
            f"{report['fallbacks']} fell back to another model",
        ),
        (
            "burst",
            f"{burst.get('requests', 0)} requests against a quota of "
            f"{burst.get('quota_per_second', 0)}/s: {burst.get('paced_429', 0)} x 429 with pacing"
            f"; sent unpaced, the same burst met {burst.get('unpaced_429', 0)} x 429",
        ),
        ("429s avoided", f"{burst.get('avoided_429', 0)}"),
        (
            "outage",
            f"{outage.get('rejected_requests', 0)} calls rejected by the open circuits "
            f"in {outage.get('rejected_seconds', 0) * 1000:.0f} ms, "
            f"{outage.get('reached_upstream_while_open', 0)} reached the upstream",
        ),
        (
            "replays",
            f"{replays.get('requests', 0)} POSTs with {replays.get('keys', 0)} "
            f"Idempotency-Keys: {replays.get('replayed', 0)} replayed, "
            f"{replays.get('upstream_calls', 0)} upstream calls",
        ),
        (
            "stream",
            f"{stream.get('deltas', 0)} deltas, then usage "
            f"{(stream.get('usage') or {}).get('total_tokens', '-')} tokens",
        ),
        ("structured output", json.dumps(structured.get("ticket"))),
    ]
    lines += _table(rows)
    lines += ["", "  breaker transitions"]
    chronological = list(reversed(transitions))
    transition_rows = [
        (
            time.strftime("%H:%M:%S", time.localtime(t["at"])),
            t["breaker"],
            f"{t['from_state']} -> {t['to_state']}",
            t["reason"],
        )
        for t in chronological
    ]
    lines += _table(transition_rows, indent="    ") if transition_rows else ["    (none)"]
    lines += ["", "  SLOs (since start)"]
    slo_rows = [("slo", "target", "actual", "status", "alert")]
    symbols = {"<=": "<=", ">=": ">="}
    for slo in slos["slos"]:
        status = "no data" if slo["met"] is None else "met" if slo["met"] else "NOT MET"
        slo_rows.append(
            (
                slo["name"],
                f"{symbols[slo['objective']]} {_slo_value(slo['target'], slo['unit'])}",
                _slo_value(slo["actual"], slo["unit"]),
                status,
                slo["alert"],
            )
        )
    lines += _table(slo_rows, indent="    ")
    lines.append("")
    figures_json = {
        "elapsed_seconds": round(elapsed, 2),
        "requests": total,
        "mini_requests": report["mini_requests"],
        "full_requests": report["full_requests"],
        "mini_percentage": report["mini_percentage"],
        "errors": report["error_count"],
        "fallbacks": report["fallbacks"],
        "p95_ms": {tier: latency[tier]["p95"] for tier in ("mini", "full")},
        "cache_hit_rate": report["cache_hit_rate"],
        "cost_usd": report["total_cost_usd"],
        "slos": {slo["name"]: slo["met"] for slo in slos["slos"]},
        "transitions": [
            {k: t[k] for k in ("breaker", "from_state", "to_state", "reason")}
            for t in chronological
        ],
        "burst": burst,
        "outage": outage,
        "replays": replays,
        "stream": {k: v for k, v in stream.items() if k != "text"},
        "structured": structured,
        "http_statuses": dict(figures.statuses),
        "problems": figures.problems,
    }
    return "\n".join(lines), figures_json


# -- the command ---------------------------------------------------------------------------


def _latency(rng: random.Random, lock: threading.Lock) -> Callable[[], float]:
    def draw() -> float:
        with lock:
            # Median 35 ms with a realistic right tail.
            return min(rng.lognormvariate(math.log(0.035), 0.45), 0.5)

    return draw


def run_demo(
    *,
    quick: bool = False,
    serve: bool = False,
    port: int = 0,
    json_path: str | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    plan: DemoPlan | None = None,
) -> int:
    """Run the scenario and print the report; returns the process exit status."""
    plan = plan or DemoPlan.for_run(quick)
    module = load_example_app()
    phases = 6
    progress = Progress(err, phases)
    started = time.monotonic()
    with ExitStack() as stack:
        stack.enter_context(_quiet_logs())
        rng_lock = threading.Lock()
        upstream = stack.enter_context(
            FakeUpstream(latency=_latency(random.Random(7), rng_lock), seed=7)
        )
        app = module.create_app(
            {
                "OPENAI_BASE_URL": upstream.url,
                "OPENAI_API_KEY": "sk-demo-not-a-real-key",
                "AI_SYSTEM_PROMPT": SYSTEM_PROMPT,
                "AI_TIMEOUT": (5.0, 30.0),
                "AI_BREAKER": {"failure_threshold": 5, "timeout": plan.breaker_timeout},
                "AI_RETRIES": 2,
                "AI_RATE_LIMIT": {"base_delay": 0.02, "max_delay": 2.0, "max_total_wait": 5.0},
                "AI_GUARD_DASHBOARD_REFRESH": 2,
                "AI_GUARD_DASHBOARD_WINDOW": 300,
                "AI_GUARD_METRICS_RESOLUTION": 1,
                "AI_GUARD_CRITICAL_BREAKERS": [],
                # The demo lasts seconds, not the minute a projection waits for by
                # default: project the month from its own (bursty) spend rate.
                "AI_GUARD_SLOS": {"cost_projection_min_seconds": 5.0},
            }
        )
        url = stack.enter_context(_serve(app, port))
        dashboard = f"{url}/ai-guard/?window=300"
        err.write(
            f"ai_guard demo: fake upstream at {upstream.url}, example app at {url}\n"
            f"               dashboard (live): {dashboard}\n"
        )
        scenario = _Scenario(url, upstream, plan, progress)
        for phase in (
            scenario.normal_traffic,
            scenario.burst,
            scenario.outage,
            scenario.replays,
            scenario.stream,
            scenario.structured,
        ):
            phase()
        elapsed = time.monotonic() - started
        session = scenario.session()
        report = session.get(f"{url}/ai-guard/metrics", timeout=10).json()
        slos = session.get(f"{url}/ai-guard/slo", timeout=10).json()
        from ai_guard.flask import current_state

        transitions = current_state(app).recent_transitions()
        text, figures = build_report(report, slos, transitions, scenario.figures, elapsed)
        out.write(text + "\n")
        out.flush()
        if json_path is not None:
            Path(json_path).write_text(json.dumps(figures, indent=2, default=str))
        for problem in scenario.figures.problems:
            err.write(f"demo: unexpected: {problem}\n")
        if server_errors := upstream.server_errors:
            err.write(f"demo: the fake upstream failed: {server_errors[0]}\n")
            scenario.figures.problems.append("fake upstream errors")
        if serve:
            stack.callback(_restore_sigint, _serve_forever(scenario, dashboard, err))
    return 1 if scenario.figures.problems else 0


def _serve_forever(scenario: _Scenario, dashboard: str, err: TextIO) -> Any:
    """Serve until Ctrl-C; returns the SIGINT handler to restore once everything is shut
    down (a second Ctrl-C meanwhile is ignored, so the shutdown is not cut short)."""
    err.write(f"\nServing the dashboard at {dashboard}  (a trickle of traffic; Ctrl-C to stop)\n")
    err.flush()
    stop = threading.Event()
    trickle = threading.Thread(target=scenario.trickle, args=(stop,), daemon=True)
    trickle.start()
    previous: Any = None
    try:
        while not stop.wait(3600):
            pass
    except KeyboardInterrupt:
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        err.write("\nstopping\n")
    finally:
        stop.set()
        trickle.join(timeout=5)
    return previous


def _restore_sigint(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)
