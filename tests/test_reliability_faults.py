"""Reliability: every fault FakeUpstream can inject, through the guarded AIClient.

For each fault (5xx bursts, read timeouts, connection resets, truncated streams, error
events and malformed data mid-stream, 429 storms, slow responses) the tests check the four
promises of the reliability suite (issue 9):

- the caller gets a result or a *typed* error (an :class:`~ai_guard.errors.AIGuardError`),
  never a raw ``requests``/``urllib3`` exception or a bare ``Exception``;
- the circuit breaker opens and heals as specified (5 failures by default, open 30 s on
  the FakeClock, half-open, closed after 2 successful trial calls, re-opened by a failed
  trial);
- the metrics count every logical call exactly once (the collector's totals equal the
  calls made, its errors the failures seen, its retries what the upstream received);
- no thread is left behind (the autouse fixture below compares ``threading.enumerate()``
  before and after, joining the upstream's handler threads with a bound).

Time never really passes for the retries and the breaker: the client and the upstream run
on a :class:`~ai_guard.testing.FakeClock` (or on the system clock in testing mode). The
only real waits are read timeouts of a fraction of a second and a 50 ms upstream latency.
"""

from __future__ import annotations

import collections
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
import urllib3

from ai_guard.breaker import BreakerRegistry, CircuitBreaker
from ai_guard.client import AIClient
from ai_guard.clock import set_testing
from ai_guard.errors import (
    AIGuardError,
    CircuitOpenError,
    RateLimitExceeded,
    StreamError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamTimeoutError,
)
from ai_guard.metrics import MetricsCollector
from ai_guard.testing import FakeClock, FakeUpstream
from ai_guard.types import ChatResult, StreamEvent
from tests.test_client import HELLO, MODEL, forget_default_breakers, make_client

__all__ = [
    "KEEPER_THREADS",
    "Ledger",
    "assert_typed",
    "forget_default_breakers",
    "no_thread_left_behind",
    "threads_left_behind",
]

pytestmark = pytest.mark.timeout(60)

#: Process-wide daemon threads ai_guard starts once and keeps on purpose.
KEEPER_THREADS = frozenset({"ai_guard-idempotency-keeper"})


def threads_left_behind(before: set[threading.Thread], *, timeout: float = 5.0) -> list[str]:
    """The threads started since ``before`` that are still alive after joining each one
    for what is left of ``timeout`` seconds (a bounded wait, not a sleep).

    A garbage collection first: an error the test kept holds, through its traceback, the
    ``requests`` response of its attempt, and with urllib3 2 that keeps the connection's
    pool (and its keep-alive socket, and the server thread reading it) alive until the
    cycle is collected, even after ``client.close()``."""
    gc.collect()
    deadline = time.monotonic() + timeout
    new = [t for t in threading.enumerate() if t not in before and t.name not in KEEPER_THREADS]
    for thread in new:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in new if t.is_alive()]


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    """Autouse, so it is set up before (and torn down after) the upstream and client
    fixtures: the upstream is closed when it checks."""
    before = set(threading.enumerate())
    yield
    assert threads_left_behind(before) == []


_TRANSPORT = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


def assert_typed(exc: BaseException) -> None:
    """``exc`` is one of ai_guard's errors and not a transport exception in disguise."""
    assert isinstance(exc, AIGuardError), f"untyped {type(exc).__module__}.{exc!r}"
    assert not isinstance(exc, _TRANSPORT), repr(exc)
    assert str(exc)  # says what happened


class Ledger:
    """What the test saw, call by call, to hold the metrics and the upstream to."""

    def __init__(self) -> None:
        self.calls = 0
        self.successes = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def rejected(self) -> int:
        """Calls refused by an open circuit: no request reached the upstream."""
        return self.failures["CircuitOpenError"]

    def _count(self, kind: str | None) -> None:
        with self.lock:
            self.calls += 1
            if kind is None:
                self.successes += 1
            else:
                self.failures[kind] += 1

    def chat(self, client: AIClient, **kwargs: Any) -> ChatResult | AIGuardError:
        """One logical call: its result, or its typed error (anything else propagates)."""
        try:
            result = client.chat(kwargs.pop("messages", HELLO), **kwargs)
        except AIGuardError as exc:
            assert_typed(exc)
            self._count(type(exc).__name__)
            return exc
        self._count(None)
        return result

    def stream(self, client: AIClient, **kwargs: Any) -> list[StreamEvent] | AIGuardError:
        """One streamed call: its events (a broken stream ends with an ``error`` event,
        counted as a failure), or the typed error raised before the first byte."""
        events: list[StreamEvent] = []
        try:
            for event in client.stream_chat(kwargs.pop("messages", HELLO), **kwargs):
                events.append(event)
        except AIGuardError as exc:
            assert_typed(exc)
            self._count(type(exc).__name__)
            return exc
        errors = [e for e in events if e.type == "error"]
        assert len(errors) <= 1
        if errors:
            assert events[-1] is errors[0]  # the error event is the last one
            assert isinstance(errors[0].error, StreamError)
            assert_typed(errors[0].error)
            self._count("StreamError")
        else:
            assert events[-1].type == "usage"
            self._count(None)
        return events

    def assert_counted(self, collector: MetricsCollector, upstream: FakeUpstream) -> None:
        """Every logical call counted once; the upstream got one request per attempt."""
        report = collector.report()
        assert report["total_requests"] == self.calls
        assert report["error_count"] == self.failed
        # An open circuit sends nothing; every other call sent 1 + its retries.
        assert upstream.stats().get("total", 0) == self.calls - self.rejected + report["retries"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def upstream(clock: FakeClock) -> Iterator[FakeUpstream]:
    with FakeUpstream(clock=clock) as server:
        yield server


@pytest.fixture
def collector(clock: FakeClock) -> MetricsCollector:
    return MetricsCollector(clock=clock)


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


def guarded(
    upstream: FakeUpstream, clock: FakeClock, collector: MetricsCollector, **options: Any
) -> AIClient:
    """A client on the fake clock with a breaker registry of its own."""
    breaker = {"registry": BreakerRegistry(), **options.pop("breaker", {})}
    return make_client(upstream, clock=clock, collector=collector, breaker=breaker, **options)


def breaker_of(client: AIClient, model: str = MODEL) -> CircuitBreaker:
    breaker = client.breaker_for(model)
    assert breaker is not None
    return breaker


def heal_and_close(
    client: AIClient,
    clock: FakeClock,
    ledger: Ledger,
    heal: Callable[[], None],
    call: Callable[[], object] | None = None,
) -> None:
    """The breaker's second half: still open just before its 30 s timeout, half-open at
    it, closed after two successful trial calls once the upstream is healthy again."""
    breaker = breaker_of(client)
    assert breaker.state == "open"
    clock.advance(breaker.retry_after - 0.001)
    assert breaker.state == "open"
    rejected = ledger.chat(client)
    assert isinstance(rejected, CircuitOpenError)
    assert 0.0 < rejected.retry_after <= 0.01
    heal()
    clock.advance(0.001)
    assert breaker.state == "half_open"
    call = call or (lambda: ledger.chat(client))
    for trial in range(2):
        outcome = call()
        assert not isinstance(outcome, AIGuardError), outcome
        assert breaker.state == ("half_open" if trial == 0 else "closed")
    assert isinstance(ledger.chat(client), ChatResult)  # closed: calls flow again


# -- 5xx bursts --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_5xx_burst_opens_the_breaker_after_five_calls_and_it_heals_after_30s(
    status: int,
    upstream: FakeUpstream,
    clock: FakeClock,
    collector: MetricsCollector,
    ledger: Ledger,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ai_guard")
    with guarded(upstream, clock, collector, retries=2) as client:
        upstream.configure(error_rate=1.0, error_statuses=(status,))
        for _ in range(5):
            assert breaker_of(client).state == "closed"
            error = ledger.chat(client)
            assert type(error) is UpstreamError  # the last answer, after the retries
            assert error.status == status
            assert error.request_id == upstream.requests[-1].request_id
        assert breaker_of(client).state == "open"
        assert upstream.stats() == {str(status): 15, "total": 15}  # 5 calls x 3 attempts
        refused = ledger.chat(client)
        assert isinstance(refused, CircuitOpenError)
        assert refused.name == f"openai:{MODEL}"
        assert refused.retry_after == pytest.approx(30.0)
        assert upstream.stats()["total"] == 15  # refused without a request

        heal_and_close(client, clock, ledger, lambda: upstream.configure(error_rate=0.0))
        metrics = breaker_of(client).metrics()
    assert ledger.successes == 3
    assert ledger.failures == {"UpstreamError": 5, "CircuitOpenError": 2}
    assert metrics.failures == 5
    assert metrics.rejected == 2
    ledger.assert_counted(collector, upstream)
    assert collector.report()["retries"] == 10
    # one log line per logical call, with the circuit state the call met
    states = [
        r.circuit_state  # type: ignore[attr-defined]  # a field of the log line (extra=)
        for r in caplog.records
        if getattr(r, "event", None) == "ai_call"
    ]
    assert states == ["closed"] * 5 + ["open"] * 2 + ["half_open"] * 2 + ["closed"]


class HealingClock(FakeClock):
    """A FakeClock that runs ``on_sleep(n)`` after the n-th sleep: the upstream heals at
    a chosen retry, so a burst of exactly n failed attempts is deterministic."""

    def __init__(self) -> None:
        super().__init__()
        self.on_sleep: Callable[[int], None] = lambda n: None

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        self.on_sleep(len(self.sleeps))


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_5xx_burst_shorter_than_the_retries_is_one_successful_call(status: int) -> None:
    clock = HealingClock()
    collector = MetricsCollector(clock=clock)
    ledger = Ledger()
    with FakeUpstream(clock=clock, error_rate=1.0, error_statuses=(status,)) as upstream:
        clock.on_sleep = lambda n: upstream.configure(error_rate=0.0) if n == 3 else None
        with guarded(upstream, clock, collector, retries=5) as client:
            result = ledger.chat(client)
            breaker = breaker_of(client)
            assert isinstance(result, ChatResult)
            assert result.content
            assert breaker.state == "closed"
            assert breaker.metrics().failures == 0  # one outcome per logical call
        assert [r.status for r in upstream.requests] == [status] * 3 + [200]
        assert len({r.idempotency_key for r in upstream.requests}) == 1
        assert collector.report()["retries"] == 3
        ledger.assert_counted(collector, upstream)
    assert ledger.failed == 0


# -- timeouts ----------------------------------------------------------------------------


def test_read_timeouts_are_typed_errors_that_open_the_breaker_and_it_heals(
    clock: FakeClock, collector: MetricsCollector, ledger: Ledger
) -> None:
    # The upstream hangs for 30 s (until it is closed); the client waits 0.2 s per attempt.
    with FakeUpstream(clock=clock, timeout_rate=1.0, hang_seconds=30) as upstream:
        with guarded(
            upstream,
            clock,
            collector,
            retries=1,
            timeout=(2.0, 0.2),
            breaker={"failure_threshold": 2},
        ) as client:
            for _ in range(2):
                error = ledger.chat(client)
                assert type(error) is UpstreamTimeoutError
                assert error.status is None
                assert "read timeout of 0.2s" in str(error)
            assert breaker_of(client).state == "open"
            assert upstream.stats() == {"timeout": 4, "total": 4}

            def answer_in_time() -> object:
                return ledger.chat(client, timeout=(2.0, 10.0))

            heal_and_close(
                client, clock, ledger, lambda: upstream.configure(timeout_rate=0.0), answer_in_time
            )
        ledger.assert_counted(collector, upstream)
    assert ledger.failures == {"UpstreamTimeoutError": 2, "CircuitOpenError": 1}
    assert ledger.successes == 3


# -- connection resets -------------------------------------------------------------------


def test_connection_resets_are_typed_a_failed_trial_reopens_and_successes_close(
    upstream: FakeUpstream, clock: FakeClock, collector: MetricsCollector, ledger: Ledger
) -> None:
    upstream.configure(reset_rate=1.0)
    with guarded(upstream, clock, collector, retries=2, breaker={"failure_threshold": 3}) as client:
        breaker = breaker_of(client)
        for _ in range(3):
            error = ledger.chat(client)
            assert type(error) is UpstreamConnectionError
            assert error.status is None
        assert breaker.state == "open"
        # Still resetting when the timeout ends: the trial fails and re-opens it, for a
        # fresh 30 s.
        clock.advance(30.0)
        assert breaker.state == "half_open"
        assert type(ledger.chat(client)) is UpstreamConnectionError
        assert breaker.state == "open"
        assert breaker.retry_after == pytest.approx(30.0)
        heal_and_close(client, clock, ledger, lambda: upstream.configure(reset_rate=0.0))
    assert upstream.stats()["reset"] == 12  # 4 calls x 3 attempts
    assert ledger.failures == {"UpstreamConnectionError": 4, "CircuitOpenError": 1}
    ledger.assert_counted(collector, upstream)


# -- streams that break ------------------------------------------------------------------

BROKEN_STREAMS: dict[str, tuple[dict[str, object], str]] = {
    "truncated": ({"stream_drop_after": 3}, "the connection dropped mid-stream"),
    "error-event": ({"stream_error_after": 3}, "server had an error"),
    "malformed": ({"malformed_sse": True}, "malformed stream data"),
}


@pytest.mark.parametrize("fault", BROKEN_STREAMS, ids=list(BROKEN_STREAMS))
def test_a_broken_stream_ends_in_one_typed_error_event_and_opens_the_breaker(
    fault: str,
    upstream: FakeUpstream,
    clock: FakeClock,
    collector: MetricsCollector,
    ledger: Ledger,
) -> None:
    setting, says = BROKEN_STREAMS[fault]
    upstream.configure(**setting)
    with guarded(upstream, clock, collector, breaker={"failure_threshold": 2}) as client:
        for _ in range(2):
            events = ledger.stream(client)
            assert isinstance(events, list)
            error = events[-1].error
            assert isinstance(error, StreamError)
            assert says in str(error)
            assert error.partial_content == "".join(e.content for e in events[:-1])
            if fault != "malformed":
                assert error.partial_content  # what arrived before the break is kept
        assert breaker_of(client).state == "open"
        assert isinstance(ledger.stream(client), CircuitOpenError)  # raised before a byte

        def whole_stream() -> object:
            events = ledger.stream(client)
            assert isinstance(events, list)
            return events[-1].error or events[-1]

        clean = dict.fromkeys(setting, None if fault != "malformed" else False)
        heal_and_close(client, clock, ledger, lambda: upstream.configure(**clean), whole_stream)
    assert upstream.stats()["total"] == 5  # broken streams are not retried
    assert ledger.failures == {"StreamError": 2, "CircuitOpenError": 2}
    ledger.assert_counted(collector, upstream)


# -- 429 storms --------------------------------------------------------------------------


def test_a_429_storm_inside_the_quota_is_absorbed_by_the_retries_without_tripping(
    clock: FakeClock, collector: MetricsCollector, ledger: Ledger
) -> None:
    # Three requests per 10 s window, on the client's clock: each retry waits for the
    # window the upstream names in retry-after, which is what moves time forward.
    with FakeUpstream(clock=clock, quota_requests=3, quota_window=10.0) as upstream:
        with guarded(
            upstream, clock, collector, budget=False, breaker={"failure_threshold": 1}
        ) as client:
            for _ in range(12):
                assert isinstance(ledger.chat(client), ChatResult)
            breaker = breaker_of(client)
            assert breaker.state == "closed"
            assert breaker.metrics().failures == 0
        stats = upstream.stats()
        assert stats["200"] == 12
        assert stats["429"] == collector.report()["retries"] > 0
        ledger.assert_counted(collector, upstream)
    assert all(0.0 < wait <= 10.0 + 1.0 for wait in clock.sleeps)  # the asked wait + jitter


def test_429s_beyond_the_retries_are_rate_limit_exceeded_and_count_for_the_breaker(
    upstream: FakeUpstream, clock: FakeClock, collector: MetricsCollector, ledger: Ledger
) -> None:
    upstream.configure(error_rate=1.0, error_statuses=(429,))  # no retry-after: backoff
    with guarded(
        upstream, clock, collector, budget=False, retries=3, breaker={"failure_threshold": 2}
    ) as client:
        for _ in range(2):
            error = ledger.chat(client)
            assert type(error) is RateLimitExceeded
            assert error.attempts == 4
            assert error.status == 429
            assert isinstance(error.__cause__, UpstreamError)
        assert breaker_of(client).state == "open"
        heal_and_close(client, clock, ledger, lambda: upstream.configure(error_rate=0.0))
    assert upstream.stats()["429"] == 8
    ledger.assert_counted(collector, upstream)


@pytest.mark.timeout(90)
def test_a_429_storm_from_16_threads_ends_in_results_or_typed_errors_only(
    clock: FakeClock, collector: MetricsCollector, ledger: Ledger
) -> None:
    # 16 threads share a quota of 5 requests per 2 s window, pacing on; every thread's
    # retry sleeps move the one fake clock, which is also the upstream's.
    with FakeUpstream(clock=clock, quota_requests=5, quota_window=2.0) as upstream:
        with guarded(upstream, clock, collector, retries=8) as client:

            def work(worker: int) -> None:
                for i in range(10):
                    ledger.chat(client, messages=[{"role": "user", "content": f"{worker}/{i}"}])

            with ThreadPoolExecutor(max_workers=16) as pool:
                futures = [pool.submit(work, n) for n in range(16)]
                deadline = time.monotonic() + 60
                for future in futures:  # the watchdog: a deadlock fails here
                    future.result(timeout=max(0.1, deadline - time.monotonic()))
        assert ledger.calls == 160
        assert set(ledger.failures) <= {"RateLimitExceeded", "CircuitOpenError"}
        assert upstream.stats()["200"] == ledger.successes > 0
        ledger.assert_counted(collector, upstream)


# -- slow responses ----------------------------------------------------------------------


def test_slow_responses_succeed_and_their_latency_is_measured(ledger: Ledger) -> None:
    set_testing(True)  # the system clock, so that latency is real; retries would not wait
    collector = MetricsCollector()
    with (
        FakeUpstream(latency=0.05) as upstream,
        make_client(upstream, collector=collector, timeout=(2.0, 5.0)) as client,
    ):
        for _ in range(3):
            assert isinstance(ledger.chat(client), ChatResult)
        ledger.assert_counted(collector, upstream)
    latency = collector.report()["latency_ms"]["mini"]
    assert latency["count"] == 3
    assert latency["p50"] >= 50.0 * 0.99  # the histogram's error bound


def test_slow_calls_count_as_failures_and_open_the_breaker(
    clock: FakeClock, collector: MetricsCollector, ledger: Ledger
) -> None:
    # Each answer takes 3 s on the fake clock (the reply advances it while the upstream
    # builds the answer); the breaker calls anything over 2 s slow.
    slow = {"on": True}

    def reply(body: object) -> str:
        if slow["on"]:
            clock.advance(3.0)
        return "a slow but correct answer"

    with FakeUpstream(clock=clock, reply=reply) as upstream:
        options = {"failure_threshold": 3, "slow_call_duration": 2.0}
        with guarded(upstream, clock, collector, breaker=options) as client:
            for _ in range(3):
                result = ledger.chat(client)
                assert isinstance(result, ChatResult)  # the caller still gets its answer
                assert result.content == "a slow but correct answer"
            breaker = breaker_of(client)
            assert breaker.state == "open"
            assert breaker.metrics().failures == 3
            heal_and_close(client, clock, ledger, lambda: slow.update(on=False))
        ledger.assert_counted(collector, upstream)
    assert ledger.failures == {"CircuitOpenError": 1}


# -- every fault at once -----------------------------------------------------------------


def test_a_seeded_mix_of_every_fault_gives_only_results_or_typed_errors(
    upstream: FakeUpstream, clock: FakeClock, collector: MetricsCollector, ledger: Ledger
) -> None:
    upstream.configure(
        seed=9,
        error_rate=0.25,
        error_statuses=(429, 500, 502, 503, 504),
        reset_rate=0.08,
        timeout_rate=0.02,
        hang_seconds=30,
    )
    with guarded(upstream, clock, collector, retries=2, timeout=(2.0, 0.15)) as client:
        outcomes = [
            ledger.chat(client, messages=[{"role": "user", "content": f"q{i}"}]) for i in range(150)
        ]
        for _ in range(15):
            ledger.stream(client)
    kinds = {type(o).__name__ for o in outcomes}
    assert "ChatResult" in kinds
    assert kinds - {"ChatResult"} <= {
        "UpstreamError",
        "UpstreamTimeoutError",
        "UpstreamConnectionError",
        "RateLimitExceeded",
        "CircuitOpenError",
    }
    assert ledger.failed > 0  # the mix is harsh enough for some calls to fail
    ledger.assert_counted(collector, upstream)
    assert upstream.server_errors == []
