"""Metrics: recording one call beside the usual do-it-yourself prometheus_client pair, and
memory after ten thousand vs ten million records.

- ``cases()``: ns per record, from 1 thread and from 8 threads. ``ai_guard`` is
  ``MetricsCollector.record_request(model, input/output/cached tokens, latency)`` (it
  also keeps tokens, cost, errors, a 1,794-bucket latency histogram and the sliding
  windows); the anchor ``prometheus_client`` is what people write by hand: a labelled
  ``Counter(...).labels(model, tier).inc()`` plus a ``Histogram(...).labels(model,
  tier).observe(seconds)`` on a fresh private registry. Target: our overhead <= 0.3x.
  ``ai_guard record_call`` is the sink form (reads a ``CallContext``), for information.
- ``results()``: the collector's retained bytes (every object reachable from it) after
  10^4 and after 10^7 records (10^6 with ``--quick``), the growth of the process's
  allocated blocks over the same records, and tracemalloc's traced bytes from 10^4 to
  10^5 records (tracemalloc slows every allocation about tenfold).
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
import types
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram

from ai_guard.context import CallContext
from ai_guard.metrics import MetricsCollector
from ai_guard.testing import FakeClock
from ai_guard.types import Usage
from benchmarks._harness import Case, Result

GROUP = "metrics"


def _nothing() -> None:
    return None


def _ours() -> tuple[Callable[[], None], Callable[[int], None]]:
    collector = MetricsCollector()
    record = collector.record_request

    def fn() -> None:
        record(
            "gpt-4o-mini", input_tokens=1200, output_tokens=80, cached_tokens=1024, latency_ms=412.5
        )

    def check(calls: int) -> None:
        report = collector.report()
        # The harness does not count its calibration calls, so at least ``calls``.
        assert report["total_requests"] >= calls, (report["total_requests"], calls)
        assert report["input_tokens"] == 1200 * report["total_requests"]

    return fn, check


def _ours_sink() -> Callable[[], None]:
    collector = MetricsCollector()
    ctx = CallContext(0.0)
    ctx.operation = "chat"
    ctx.request_model = "gpt-4o-mini"
    ctx.observe_usage(Usage(prompt_tokens=1200, completion_tokens=80, cached_tokens=1024))
    ctx.cost_usd = 0.0002
    ctx.latency_ms = 412.5
    record_call = collector.record_call

    def fn() -> None:
        record_call(ctx)

    return fn


def _prometheus() -> Callable[[], None]:
    registry = CollectorRegistry()
    requests = Counter("llm_requests", "AI calls", ["model", "tier"], registry=registry)
    latency = Histogram("llm_latency_seconds", "AI latency", ["model", "tier"], registry=registry)

    def fn() -> None:
        requests.labels("gpt-4o-mini", "mini").inc()
        latency.labels("gpt-4o-mini", "mini").observe(0.4125)

    return fn


def cases() -> list[Case]:
    out: list[Case] = []
    for threads in (1, 8):
        ours, check = _ours()
        out += [
            Case(GROUP, "bare", _nothing, threads=threads),
            Case(
                GROUP,
                "ai_guard record_request",
                ours,
                anchor="prometheus_client",
                target=0.3,
                threads=threads,
                check=check,
            ),
            Case(GROUP, "ai_guard record_call", _ours_sink(), threads=threads),
            Case(GROUP, "prometheus_client", _prometheus(), threads=threads),
        ]
    return out


# -- memory --------------------------------------------------------------------------------


def record_load(collector: MetricsCollector, clock: FakeClock, start: int, n: int) -> None:
    """Records ``start`` to ``start + n`` of a fixed mix of calls (two models, errors, cache
    hits), the clock stepped so that the records span hours: every ring wraps."""
    rec = collector.record_request
    advance = clock.advance
    for i in range(start, start + n):
        rec(
            "gpt-4o-mini" if i % 8 else "gpt-4o",
            input_tokens=i % 3000,
            output_tokens=i % 700,
            cached_tokens=i % 1000 if i % 3000 >= 1000 else 0,
            latency_ms=20.0 + (i * 7919) % 4000,
            error=i % 97 == 0,
        )
        if i % 100 == 0:
            advance(7.3)  # the records span hours to months: every ring wraps


def retained_size(root: object) -> int:
    """Bytes of every object reachable from ``root``, classes, modules and functions
    aside."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


def results(quick: bool) -> list[Result]:
    many = 1_000_000 if quick else 10_000_000
    clock = FakeClock()
    collector = MetricsCollector(clock=clock)
    record_load(collector, clock, 0, 10_000)
    collector.report()
    gc.collect()
    small = retained_size(collector)
    blocks_small = sys.getallocatedblocks()
    began = time.perf_counter()
    record_load(collector, clock, 10_000, many - 10_000)
    elapsed = time.perf_counter() - began
    collector.report()
    gc.collect()
    large = retained_size(collector)
    blocks_large = sys.getallocatedblocks()
    assert collector.report()["total_requests"] == many

    traced_clock = FakeClock()
    gc.collect()
    tracemalloc.start()
    try:
        traced = MetricsCollector(clock=traced_clock)
        record_load(traced, traced_clock, 0, 10_000)
        gc.collect()
        traced_small = tracemalloc.get_traced_memory()[0]
        record_load(traced, traced_clock, 10_000, 90_000)
        gc.collect()
        traced_large = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()

    label = f"{many:.0e}".replace("+0", "")
    return [
        Result(GROUP, "retained bytes after 1e4 records", small, "bytes", higher_is_better=False),
        Result(
            GROUP, f"retained bytes after {label} records", large, "bytes", higher_is_better=False
        ),
        Result(
            GROUP,
            f"retained bytes {label} / 1e4",
            round(large / small, 4),
            "ratio",
            target=1.01,
            higher_is_better=False,
        ),
        Result(
            GROUP,
            f"allocated blocks growth 1e4 -> {label}",
            blocks_large - blocks_small,
            "blocks",
            target=2000,
            higher_is_better=False,
        ),
        Result(
            GROUP,
            "tracemalloc bytes 1e5 / 1e4",
            round(traced_large / traced_small, 4),
            "ratio",
            target=1.01,
            higher_is_better=False,
            detail={"traced_1e4": traced_small, "traced_1e5": traced_large},
        ),
        Result(
            GROUP,
            f"ns per record over {label} (fake clock)",
            round(elapsed / (many - 10_000) * 1e9, 1),
            "ns",
            higher_is_better=False,
        ),
    ]
