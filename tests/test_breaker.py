"""The circuit breaker: state machine, windows, concurrency, registry, templates, hooks.

Every timing test runs on FakeClock; concurrency is proven with events and barriers.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Generator
from typing import Any

import pytest

from ai_guard._breaker_shared import SharedCircuit
from ai_guard.breaker import (
    BreakerEvent,
    BreakerRegistry,
    BreakerTemplate,
    CircuitBreaker,
    CircuitState,
    all_breakers,
    circuit_breaker,
    default_registry,
    get_breaker,
)
from ai_guard.clock import SYSTEM_CLOCK, SystemClock
from ai_guard.context import close_call, current_call, open_call
from ai_guard.errors import CircuitOpenError, ConfigError
from ai_guard.stores import MemoryStore, Store
from ai_guard.testing import FakeClock

WAIT = 10.0  # seconds a test waits for another thread before it fails (never reached)


class Boom(Exception):
    """The upstream failed."""


class Harmless(Exception):
    """An exception the breakers below ignore."""


class NotOurs(Exception):
    """An exception outside ``record`` (a caller error): counts as a success."""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry() -> BreakerRegistry:
    return BreakerRegistry()


def make(clock: FakeClock, **options: Any) -> CircuitBreaker:
    options.setdefault("registry", None)
    options.setdefault("ignore", Harmless)
    return CircuitBreaker("svc", clock=clock, **options)


def boom() -> None:
    raise Boom("upstream down")


def trip(breaker: CircuitBreaker, times: int = 5) -> None:
    for _ in range(times):
        with pytest.raises(Boom):
            breaker.call(boom)


def record_transitions(breaker: CircuitBreaker) -> list[str]:
    seen: list[str] = []
    breaker.add_listener(lambda e: seen.append(f"{e.from_state.value}>{e.to_state.value}"))
    return seen


# -- the state machine, table-driven ------------------------------------------------------
#
# Steps: F a recorded failure, S a success, I an ignored exception, V an exception outside
# `record` (record=(Boom,) in those cases), W a call slower than slow_call_duration,
# P a result failure_predicate rejects, +N the clock moves N seconds.
# Outcomes: "." returned, "x" raised the function's exception, "r" rejected (open).


def _step(breaker: CircuitBreaker, clock: FakeClock, step: str) -> str:
    def body() -> Any:
        if step == "F":
            raise Boom
        if step == "I":
            raise Harmless
        if step == "V":
            raise NotOurs
        if step == "W":
            clock.advance(3.0)
        if step == "P":
            return {"status": 503}
        return {"status": 200}

    try:
        breaker.call(body)
    except CircuitOpenError:
        return "r"
    except (Boom, Harmless, NotOurs):
        return "x"
    return "."


def run_steps(breaker: CircuitBreaker, clock: FakeClock, steps: str) -> str:
    outcomes: list[str] = []
    for token in steps.split():
        if token.startswith("+"):
            clock.advance(float(token[1:]))
            continue
        outcomes.extend(_step(breaker, clock, step) for step in token)
    return "".join(outcomes)


def _is_5xx(result: Any) -> bool:
    return bool(result["status"] >= 500)


TRANSITIONS: list[tuple[str, dict[str, Any], str, str, str, list[str]]] = [
    # (id, options, steps, expected outcomes, final state, transitions)
    ("four_failures_stay_closed", {}, "FFFF", "xxxx", "closed", []),
    ("five_failures_in_window_open", {}, "FFFFF", "xxxxx", "open", ["closed>open"]),
    ("successes_do_not_reset_the_count", {}, "FSFSFSFSF", "x.x.x.x.x", "open", ["closed>open"]),
    ("failures_older_than_the_window_drop_out", {}, "FF +61 FFF", "xxxxx", "closed", []),
    ("failures_inside_the_window_count", {}, "FF +59 FFF", "xxxxx", "open", ["closed>open"]),
    ("open_rejects_until_the_timeout", {}, "FFFFF +29.9 S", "xxxxxr", "open", ["closed>open"]),
    (
        "open_reads_half_open_after_the_timeout",
        {},
        "FFFFF +30",
        "xxxxx",
        "half_open",
        ["closed>open"],
    ),
    (
        "half_open_closes_after_two_successes",
        {},
        "FFFFF +30 SS",
        "xxxxx..",
        "closed",
        ["closed>open", "open>half_open", "half_open>closed"],
    ),
    (
        "half_open_stays_after_one_success",
        {},
        "FFFFF +30 S",
        "xxxxx.",
        "half_open",
        ["closed>open", "open>half_open"],
    ),
    (
        "half_open_failure_reopens",
        {},
        "FFFFF +30 F",
        "xxxxxx",
        "open",
        ["closed>open", "open>half_open", "half_open>open"],
    ),
    (
        "half_open_success_then_failure_reopens",
        {},
        "FFFFF +30 SF",
        "xxxxx.x",
        "open",
        ["closed>open", "open>half_open", "half_open>open"],
    ),
    (
        "reopened_circuit_waits_a_fresh_timeout",
        {},
        "FFFFF +30 F +29 S",
        "xxxxxxr",
        "open",
        ["closed>open", "open>half_open", "half_open>open"],
    ),
    (
        "reopened_circuit_tries_again_after_the_fresh_timeout",
        {},
        "FFFFF +30 F +30 SS",
        "xxxxxx..",
        "closed",
        ["closed>open", "open>half_open", "half_open>open", "open>half_open", "half_open>closed"],
    ),
    (
        "ignored_exceptions_count_as_nothing_in_half_open",
        {},
        "FFFFF +30 IIS IS",
        "xxxxxxx.x.",
        "closed",
        ["closed>open", "open>half_open", "half_open>closed"],
    ),
    ("ignored_exceptions_never_open", {}, "IIIIIIIIII", "xxxxxxxxxx", "closed", []),
    (
        "exceptions_outside_record_are_successes",
        {"record": (Boom,)},
        "FFFFF +30 VV",
        "xxxxxxx",
        "closed",
        ["closed>open", "open>half_open", "half_open>closed"],
    ),
    ("exceptions_outside_record_never_open", {"record": (Boom,)}, "VVVVVV", "xxxxxx", "closed", []),
    (
        "slow_calls_count_as_failures",
        {"slow_call_duration": 2.0},
        "WWWWW",
        ".....",
        "open",
        ["closed>open"],
    ),
    (
        "a_slow_trial_call_reopens",
        {"slow_call_duration": 2.0},
        "FFFFF +30 W",
        "xxxxx.",
        "open",
        ["closed>open", "open>half_open", "half_open>open"],
    ),
    ("fast_calls_are_not_slow", {"slow_call_duration": 2.0}, "SSSSSS", "......", "closed", []),
    (
        "predicate_failures_open",
        {"failure_predicate": _is_5xx},
        "PPPPP",
        ".....",
        "open",
        ["closed>open"],
    ),
    (
        "custom_thresholds",
        {"failure_threshold": 2, "success_threshold": 1, "timeout": 5.0},
        "FF +5 S",
        "xx.",
        "closed",
        ["closed>open", "open>half_open", "half_open>closed"],
    ),
    (
        "rate_below_minimum_calls_stays_closed",
        {"failure_rate_threshold": 0.5, "minimum_calls": 10},
        "FFFFFFFFF",
        "xxxxxxxxx",
        "closed",
        [],
    ),
    (
        "rate_reached_at_minimum_calls_opens",
        {"failure_rate_threshold": 0.5, "minimum_calls": 10},
        "SSSSSFFFFF",
        ".....xxxxx",
        "open",
        ["closed>open"],
    ),
    (
        "rate_below_threshold_stays_closed",
        {"failure_rate_threshold": 0.5, "minimum_calls": 10},
        "SSSSSSFFFF",
        "......xxxx",
        "closed",
        [],
    ),
    (
        "a_success_that_reaches_minimum_calls_opens_on_the_rate",
        {"failure_rate_threshold": 0.5, "minimum_calls": 10},
        "FFFFFFFFF S",
        "xxxxxxxxx.",
        "open",
        ["closed>open"],
    ),
    (
        "rate_rises_as_old_successes_leave_the_window",
        {"failure_rate_threshold": 0.5, "minimum_calls": 4},
        "SSSSSSSS +30 FFF +31 F",
        "........xxxx",
        "open",
        ["closed>open"],
    ),
]


@pytest.mark.parametrize(
    ("options", "steps", "outcomes", "final_state", "transitions"),
    [pytest.param(*case[1:], id=case[0]) for case in TRANSITIONS],
)
def test_state_machine_transitions(
    clock: FakeClock,
    options: dict[str, Any],
    steps: str,
    outcomes: str,
    final_state: str,
    transitions: list[str],
) -> None:
    breaker = make(clock, **options)
    seen = record_transitions(breaker)
    assert run_steps(breaker, clock, steps) == outcomes
    assert breaker.state == final_state
    assert seen == transitions


def test_open_error_names_the_breaker_and_the_time_until_the_next_trial(
    clock: FakeClock,
) -> None:
    breaker = make(clock)
    trip(breaker)
    clock.advance(10)
    with pytest.raises(CircuitOpenError) as caught:
        breaker.call(lambda: "never")
    assert caught.value.name == "svc"
    assert caught.value.retry_after == pytest.approx(20.0)
    assert breaker.retry_after == pytest.approx(20.0)


def test_retry_after_is_zero_unless_open(clock: FakeClock) -> None:
    breaker = make(clock)
    assert breaker.retry_after == 0.0
    trip(breaker)
    clock.advance(30)
    assert breaker.state == "half_open"
    assert breaker.retry_after == 0.0


def test_open_circuit_does_not_call_the_function(clock: FakeClock) -> None:
    breaker = make(clock)
    trip(breaker)
    called: list[int] = []
    for _ in range(20):
        with pytest.raises(CircuitOpenError):
            breaker.call(called.append, 1)
    assert called == []
    assert breaker.metrics().rejected == 20


def test_state_is_a_str_enum(clock: FakeClock) -> None:
    breaker = make(clock)
    assert isinstance(breaker.state, CircuitState)
    assert isinstance(breaker.state, str)
    assert breaker.state == "closed"
    assert str(CircuitState.HALF_OPEN) == "half_open"


def test_reset_closes_and_forgets_counts(clock: FakeClock) -> None:
    breaker = make(clock)
    seen: list[BreakerEvent] = []
    breaker.add_listener(seen.append)
    trip(breaker)
    breaker.reset()
    assert breaker.state == "closed"
    assert seen[-1].to_state == "closed"
    assert seen[-1].reason == "reset"
    metrics = breaker.metrics()
    assert (metrics.failures, metrics.failures_in_window, metrics.rejected) == (0, 0, 0)
    trip(breaker, 4)
    assert breaker.state == "closed"  # the old failures are gone


def test_outcome_of_a_call_admitted_before_a_transition_does_not_move_the_state(
    clock: FakeClock,
) -> None:
    breaker = make(clock)
    inside = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    def old_call() -> None:
        inside.set()
        assert release.wait(WAIT)
        raise Boom("late failure of a call admitted while closed")

    def run_old_call() -> None:
        try:
            breaker.call(old_call)
        except Boom as exc:
            errors.append(exc)

    thread = threading.Thread(target=run_old_call)
    thread.start()
    assert inside.wait(WAIT)
    trip(breaker)
    clock.advance(30)
    assert run_steps(breaker, clock, "S") == "."  # half-open, one trial success
    release.set()
    thread.join(WAIT)
    assert len(errors) == 1
    assert breaker.state == "half_open"  # the stale failure did not re-open it
    assert run_steps(breaker, clock, "S") == "."
    assert breaker.state == "closed"


# -- the sliding window ------------------------------------------------------------------


def test_window_counts_an_outcome_for_at_least_window_and_at_most_one_bucket_more(
    clock: FakeClock,
) -> None:
    breaker = make(clock, window=10.0, window_buckets=10, failure_threshold=100)
    clock.advance(0.5)
    trip(breaker, 1)
    run_steps(breaker, clock, "SS")
    clock.advance(9.9)  # 9.9 s later: inside the window
    metrics = breaker.metrics()
    assert (metrics.failures_in_window, metrics.successes_in_window) == (1, 2)
    assert metrics.calls_in_window == 3
    assert metrics.failure_rate == pytest.approx(1 / 3)
    clock.advance(0.6)  # 10.5 s later: the granularity is 1 s, so it is gone
    metrics = breaker.metrics()
    assert (metrics.failures_in_window, metrics.successes_in_window) == (0, 0)
    assert (metrics.failures, metrics.successes) == (1, 2)  # totals keep them


def test_window_slides_bucket_by_bucket(clock: FakeClock) -> None:
    breaker = make(clock, window=5.0, window_buckets=5, failure_threshold=100)
    for _ in range(10):
        trip(breaker, 1)
        clock.advance(1.0)
    # failures happened at t=0..9; at t=10 the window holds t=5..9 (and t=10's bucket)
    assert breaker.metrics().failures_in_window == 5
    clock.advance(100)
    assert breaker.metrics().failures_in_window == 0


def test_slow_calls_are_counted_separately(clock: FakeClock) -> None:
    breaker = make(clock, slow_call_duration=2.0, failure_threshold=100)
    run_steps(breaker, clock, "WWS")
    metrics = breaker.metrics()
    assert metrics.slow_calls_in_window == 2
    assert metrics.failures_in_window == 2
    assert metrics.successes_in_window == 1


def test_slow_failure_is_one_failure(clock: FakeClock) -> None:
    breaker = make(clock, slow_call_duration=2.0, failure_threshold=100)

    def slow_boom() -> None:
        clock.advance(3.0)
        raise Boom

    with pytest.raises(Boom):
        breaker.call(slow_boom)
    metrics = breaker.metrics()
    assert (metrics.failures_in_window, metrics.slow_calls_in_window) == (1, 1)


def test_failure_predicate_result_is_still_returned(clock: FakeClock) -> None:
    breaker = make(clock, failure_predicate=_is_5xx)
    assert breaker.call(lambda: {"status": 503}) == {"status": 503}
    assert breaker.metrics().failures_in_window == 1


def test_failure_predicate_that_raises_is_logged_and_counts_as_nothing(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(result: Any) -> bool:
        raise KeyError("status")

    breaker = make(clock, failure_predicate=broken)
    with caplog.at_level(logging.ERROR, logger="ai_guard.breaker"):
        assert breaker.call(lambda: "fine") == "fine"
    metrics = breaker.metrics()
    assert (metrics.failures, metrics.successes, metrics.ignored) == (0, 0, 1)
    assert "failure_predicate" in caplog.text


def test_ignore_takes_precedence_over_record(clock: FakeClock) -> None:
    breaker = make(clock, record=(Exception,), ignore=(Harmless,))
    assert run_steps(breaker, clock, "IIIIII") == "xxxxxx"
    metrics = breaker.metrics()
    assert (metrics.failures, metrics.ignored, breaker.state) == (0, 6, "closed")


def test_keyboard_interrupt_counts_as_nothing(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1)

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        breaker.call(interrupted)
    assert breaker.state == "closed"
    assert breaker.metrics().ignored == 1


def test_ignored_exception_gives_the_trial_permit_back(clock: FakeClock) -> None:
    breaker = make(clock, half_open_max_calls=1, success_threshold=1)
    trip(breaker)
    clock.advance(30)
    assert run_steps(breaker, clock, "III") == "xxx"  # each ignored trial released its permit
    assert breaker.state == "half_open"
    assert run_steps(breaker, clock, "S") == "."
    assert breaker.state == "closed"


# -- fallback ----------------------------------------------------------------------------


def test_fallback_is_called_instead_of_raising_when_open(clock: FakeClock) -> None:
    received: list[tuple[Any, ...]] = []

    def fallback(exc: CircuitOpenError, *args: Any, **kwargs: Any) -> str:
        received.append((exc.name, exc.retry_after, args, kwargs))
        return "cached answer"

    breaker = make(clock, fallback=fallback)

    @breaker
    def ask(prompt: str, *, model: str) -> str:
        if prompt == "fail":
            raise Boom
        return "live answer"

    for _ in range(5):
        with pytest.raises(Boom):  # the function's own errors still propagate
            ask("fail", model="m")
    assert ask("hi", model="gpt-4o") == "cached answer"
    assert received == [("svc", 30.0, ("hi",), {"model": "gpt-4o"})]


def test_fallback_also_serves_calls_rejected_in_a_full_half_open(clock: FakeClock) -> None:
    breaker = make(clock, half_open_max_calls=1, fallback=lambda exc, *a, **k: exc.retry_after)
    trip(breaker)
    clock.advance(30)
    inner: list[Any] = []

    def trial() -> str:
        inner.append(breaker.call(lambda: "second trial"))  # no permit left: fallback
        return "first trial"

    assert breaker.call(trial) == "first trial"
    assert inner == [0.0]


# -- concurrency -------------------------------------------------------------------------


def _hammer_half_open(breaker: CircuitBreaker, threads: int) -> tuple[int, list[str]]:
    """``threads`` threads call a half-open breaker at once; trial calls block until every
    thread is either inside the function or rejected. Returns (entered, results)."""
    condition = threading.Condition()
    entered = 0
    results: list[str] = []
    release = threading.Event()
    start = threading.Barrier(threads)

    def trial() -> str:
        nonlocal entered
        with condition:
            entered += 1
            condition.notify_all()
        assert release.wait(WAIT)
        return "ok"

    def worker() -> None:
        start.wait(WAIT)
        try:
            outcome = breaker.call(trial)
        except CircuitOpenError:
            outcome = "rejected"
        with condition:
            results.append(outcome)
            condition.notify_all()

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in workers:
        thread.start()
    with condition:
        assert condition.wait_for(lambda: entered + len(results) == threads, timeout=WAIT)
        entered_while_blocked = entered
        rejected_at_once = list(results)
    release.set()
    for thread in workers:
        thread.join(WAIT)
    assert rejected_at_once == ["rejected"] * (threads - entered_while_blocked)
    return entered_while_blocked, results


def test_sixteen_threads_on_a_half_open_breaker_let_exactly_max_calls_through(
    clock: FakeClock,
) -> None:
    breaker = make(clock, half_open_max_calls=3, success_threshold=3)
    for _ in range(5):  # several rounds, each from a freshly half-open circuit
        trip(breaker)
        clock.advance(30)
        entered, results = _hammer_half_open(breaker, 16)
        assert entered == 3
        assert results.count("rejected") == 13  # rejected at once, not queued
        assert results.count("ok") == 3
        assert breaker.state == "closed"


def test_a_slow_call_in_one_thread_does_not_block_other_threads(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=100)
    inside = threading.Event()
    release = threading.Event()
    slow_result: list[str] = []

    def slow() -> str:
        inside.set()
        assert release.wait(WAIT)
        return "slow"

    slow_thread = threading.Thread(target=lambda: slow_result.append(breaker.call(slow)))
    slow_thread.start()
    assert inside.wait(WAIT)
    others: list[Any] = []

    def other_calls() -> None:
        others.append(breaker.call(lambda: "fast"))
        with pytest.raises(Boom):
            breaker.call(boom)
        others.append(breaker.metrics().failures_in_window)
        others.append(breaker.state)

    other_thread = threading.Thread(target=other_calls)
    other_thread.start()
    other_thread.join(WAIT)
    # The other thread finished while the slow call is provably still inside.
    assert not other_thread.is_alive()
    assert others == ["fast", 1, "closed"]
    assert slow_thread.is_alive()
    assert slow_result == []
    release.set()
    slow_thread.join(WAIT)
    assert slow_result == ["slow"]


@pytest.mark.parametrize("state", ["closed", "half_open"])
def test_calls_through_one_breaker_run_at_the_same_time(clock: FakeClock, state: str) -> None:
    breaker = make(clock, half_open_max_calls=8, success_threshold=8)
    if state == "half_open":
        trip(breaker)
        clock.advance(30)
    # Passes only if all eight calls are inside the function at once.
    together = threading.Barrier(8, timeout=WAIT)
    results: list[int] = []

    def work() -> int:
        return together.wait()

    threads = [
        threading.Thread(target=lambda: results.append(breaker.call(work))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert sorted(results) == list(range(8))
    assert breaker.state == "closed"


def _hammer(breaker: CircuitBreaker, threads: int, calls: int) -> None:
    start = threading.Barrier(threads)

    def worker() -> None:
        start.wait(WAIT)
        for i in range(calls):
            kind = i % 6
            try:
                if kind == 0:
                    breaker.call(boom)
                elif kind == 1:
                    breaker.call(_raise_harmless)
                else:
                    breaker.call(int, "1")
            except (Boom, Harmless):
                pass

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(WAIT * 6)


def _raise_harmless() -> None:
    raise Harmless


def test_many_threads_recording_outcomes_give_exact_counts(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=10**6)
    _hammer(breaker, threads=16, calls=600)
    metrics = breaker.metrics()
    assert metrics.successes_in_window == 16 * 400
    assert metrics.failures_in_window == 16 * 100
    assert metrics.calls_in_window == 16 * 500
    assert (metrics.successes, metrics.failures, metrics.ignored) == (6400, 1600, 1600)
    assert metrics.failure_rate == pytest.approx(0.2)


def test_exact_counts_while_the_window_rolls_under_the_threads(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=10**6, window=60.0, window_buckets=60)
    stop = threading.Event()

    def move_time() -> None:
        for _ in range(2000):  # at most 20 s of fake time: everything stays in the window
            if stop.is_set():
                return
            clock.advance(0.01)

    mover = threading.Thread(target=move_time)
    mover.start()
    _hammer(breaker, threads=8, calls=600)
    stop.set()
    mover.join(WAIT)
    metrics = breaker.metrics()
    assert (metrics.successes, metrics.failures, metrics.ignored) == (3200, 800, 800)
    assert metrics.successes_in_window == 3200
    assert metrics.failures_in_window == 800


def test_failures_from_many_threads_open_the_circuit_exactly_once(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=50)
    seen = record_transitions(breaker)
    rejected = 0
    lock = threading.Lock()
    start = threading.Barrier(16)

    def worker() -> None:
        nonlocal rejected
        start.wait(WAIT)
        for _ in range(10):
            try:
                breaker.call(boom)
            except Boom:
                pass
            except CircuitOpenError:
                with lock:
                    rejected += 1

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert seen == ["closed>open"]
    metrics = breaker.metrics()
    assert metrics.failures + rejected == 160
    assert metrics.failures >= 50
    assert metrics.rejected == rejected


# -- streams -----------------------------------------------------------------------------


def _stream(parts: list[str], fail_after: int | None = None) -> Generator[str, None, None]:
    for index, part in enumerate(parts):
        if fail_after is not None and index == fail_after:
            raise Boom("connection dropped mid-stream")
        yield part


def test_a_stream_is_settled_when_it_ends(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1)
    stream = breaker.call(_stream, ["a", "b"])
    assert breaker.metrics().successes == 0  # nothing known until the stream ends
    assert list(stream) == ["a", "b"]
    assert breaker.metrics().successes == 1


def test_a_stream_that_breaks_mid_way_counts_as_a_failure(clock: FakeClock) -> None:
    breaker = make(clock, failure_threshold=1)
    stream = breaker.call(_stream, ["a", "b", "c"], fail_after=2)
    assert next(stream) == "a"
    assert next(stream) == "b"
    with pytest.raises(Boom):
        next(stream)
    assert breaker.state == "open"


def test_a_stream_closed_early_counts_as_nothing(clock: FakeClock) -> None:
    breaker = make(clock)
    stream = breaker.call(_stream, ["a", "b", "c"])
    assert next(stream) == "a"
    stream.close()
    metrics = breaker.metrics()
    assert (metrics.successes, metrics.failures, metrics.ignored) == (0, 0, 1)


def test_a_trial_stream_holds_its_permit_until_it_ends(clock: FakeClock) -> None:
    breaker = make(clock, half_open_max_calls=1, success_threshold=1)
    trip(breaker)
    clock.advance(30)
    stream = breaker.call(_stream, ["a"])
    assert next(stream) == "a"
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: "second trial")
    assert list(stream) == []
    assert breaker.state == "closed"


def test_a_trial_permit_whose_stream_is_never_read_is_given_back_after_the_lease(
    clock: FakeClock,
) -> None:
    breaker = make(clock, half_open_max_calls=1, trial_lease=10.0)
    trip(breaker)
    clock.advance(30)
    breaker.call(_stream, ["never read"])
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: "blocked")
    clock.advance(10)
    assert breaker.call(lambda: "admitted") == "admitted"


# -- listeners and logs ------------------------------------------------------------------


def test_listeners_receive_every_state_change(clock: FakeClock) -> None:
    breaker = make(clock)
    events: list[BreakerEvent] = []
    breaker.add_listener(events.append)
    trip(breaker)
    clock.advance(30)
    run_steps(breaker, clock, "SS")
    assert [(e.from_state, e.to_state) for e in events] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    opened = events[0]
    assert opened.breaker == "svc"
    assert opened.at == pytest.approx(clock.time() - 30)
    assert opened.reason == "5 failures in 60s"
    assert (opened.failures, opened.failure_rate, opened.retry_after) == (5, 1.0, 30.0)
    assert opened.source == "local"
    assert events[1].reason == "open timeout elapsed"
    assert events[2].reason == "2 successful trial calls"


def test_a_removed_listener_hears_nothing(clock: FakeClock) -> None:
    breaker = make(clock)
    events: list[BreakerEvent] = []
    breaker.add_listener(events.append)
    breaker.add_listener(events.append)  # added once
    breaker.remove_listener(events.append)
    trip(breaker)
    assert events == []


def test_a_failing_listener_never_breaks_the_call(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    breaker = make(clock)
    heard: list[BreakerEvent] = []

    def broken(event: BreakerEvent) -> None:
        raise RuntimeError("listener bug")

    breaker.add_listener(broken)
    breaker.add_listener(heard.append)
    with caplog.at_level(logging.ERROR, logger="ai_guard.breaker"):
        trip(breaker)
    assert breaker.state == "open"
    assert len(heard) == 1  # the next listener still ran
    assert "listener bug" in caplog.text


def test_registry_listeners_hear_every_breaker(clock: FakeClock, registry: BreakerRegistry) -> None:
    events: list[str] = []
    registry.add_listener(lambda e: events.append(f"{e.breaker}:{e.to_state.value}"))
    first = CircuitBreaker("first", clock=clock, registry=registry, failure_threshold=1)
    second = registry.get_or_create("second", clock=clock, failure_threshold=1)
    trip(first, 1)
    trip(second, 1)
    assert events == ["first:open", "second:open"]


def test_opening_logs_one_structured_warning(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    breaker = make(clock)
    with caplog.at_level(logging.INFO, logger="ai_guard.breaker"):
        trip(breaker)
        clock.advance(30)
        run_steps(breaker, clock, "SS")
    records = [r for r in caplog.records if r.name == "ai_guard.breaker"]
    assert [r.levelname for r in records] == ["WARNING", "INFO", "INFO"]
    opened = records[0]
    assert opened.breaker == "svc"  # type: ignore[attr-defined]
    assert opened.from_state == "closed"  # type: ignore[attr-defined]
    assert opened.to_state == "open"  # type: ignore[attr-defined]
    assert opened.failures == 5  # type: ignore[attr-defined]
    assert opened.retry_after == 30.0  # type: ignore[attr-defined]
    assert records[1].to_state == "half_open"  # type: ignore[attr-defined]
    assert records[2].to_state == "closed"  # type: ignore[attr-defined]


# -- the per-call context ----------------------------------------------------------------


def test_breaker_writes_its_name_and_the_admission_state_into_the_call(
    clock: FakeClock,
) -> None:
    breaker = make(clock, success_threshold=1)

    def in_call(fn: Callable[[], Any]) -> tuple[str | None, str | None]:
        ctx, token = open_call(clock)
        ctx.operation = "chat"
        try:
            fn()
        except (Boom, CircuitOpenError):
            pass
        close_call(ctx, token, clock)
        return ctx.breaker, ctx.circuit_state

    assert in_call(lambda: breaker.call(int)) == ("svc", "closed")
    trip(breaker)
    assert in_call(lambda: breaker.call(int)) == ("svc", "open")
    clock.advance(30)
    assert in_call(lambda: breaker.call(int)) == ("svc", "half_open")
    assert breaker.state == "closed"


def test_breaker_alone_opens_no_context(clock: FakeClock) -> None:
    breaker = make(clock)
    seen: list[Any] = []
    breaker.call(lambda: seen.append(current_call()))
    assert seen == [None]
    assert current_call() is None


# -- decorator, typing, registry, templates ----------------------------------------------


def test_decorated_function_keeps_name_doc_and_wrapped(clock: FakeClock) -> None:
    breaker = make(clock)

    def ask(prompt: str, *, model: str = "m") -> str:
        """Ask the model."""
        return prompt + model

    guarded = breaker(ask)
    assert guarded.__name__ == "ask"
    assert guarded.__doc__ == "Ask the model."
    assert guarded.__wrapped__ is ask  # type: ignore[attr-defined]
    assert guarded("a", model="b") == "ab"


def test_async_functions_are_refused(clock: FakeClock) -> None:
    async def ask() -> str:
        return "x"

    with pytest.raises(TypeError, match="async"):
        make(clock)(ask)


def test_same_name_gives_the_same_breaker(registry: BreakerRegistry) -> None:
    first = circuit_breaker("openai", registry=registry, timeout=10)
    assert circuit_breaker("openai", registry=registry) is first  # no options: the existing one
    assert circuit_breaker("openai", registry=registry, timeout=10.0) is first  # equal options
    assert registry.get("openai") is first


def test_same_name_with_different_options_is_a_config_error(registry: BreakerRegistry) -> None:
    circuit_breaker("openai", registry=registry, timeout=10)
    with pytest.raises(ConfigError) as caught:
        circuit_breaker("openai", registry=registry, timeout=20)
    assert caught.value.setting == "timeout"
    assert caught.value.value == 20
    assert "already exists with timeout=10.0" in str(caught.value)


def test_circuit_breaker_accepts_a_breaker_object(clock: FakeClock) -> None:
    breaker = make(clock)
    assert circuit_breaker(breaker) is breaker
    with pytest.raises(ConfigError):
        circuit_breaker(breaker, timeout=3)


def test_decorator_form_shares_state_between_functions(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    @circuit_breaker("db", registry=registry, clock=clock, failure_threshold=2)
    def read() -> str:
        raise Boom

    @circuit_breaker("db", registry=registry)
    def write() -> str:
        return "written"

    for _ in range(2):
        with pytest.raises(Boom):
            read()
    with pytest.raises(CircuitOpenError):
        write()


def test_constructed_breakers_join_the_default_registry() -> None:
    breaker = CircuitBreaker("test-breaker:default-registry")
    try:
        assert get_breaker("test-breaker:default-registry") is breaker
        assert breaker in all_breakers()
        replacement = CircuitBreaker("test-breaker:default-registry")
        assert get_breaker("test-breaker:default-registry") is replacement
        assert CircuitBreaker("test-breaker:unregistered", registry=None) not in all_breakers()
    finally:
        default_registry().remove("test-breaker:default-registry")
    assert get_breaker("test-breaker:default-registry") is None


def test_registry_lists_breakers_by_name(clock: FakeClock, registry: BreakerRegistry) -> None:
    for name in ("b", "c", "a"):
        registry.get_or_create(name, clock=clock)
    assert [b.name for b in registry.all()] == ["a", "b", "c"]
    assert set(registry.metrics()) == {"a", "b", "c"}
    assert "a" in registry
    assert len(registry) == 3
    assert registry.remove("a")
    assert not registry.remove("a")


def test_registry_is_safe_under_many_threads(clock: FakeClock, registry: BreakerRegistry) -> None:
    start = threading.Barrier(16)
    got: list[CircuitBreaker] = []
    lock = threading.Lock()

    def worker() -> None:
        start.wait(WAIT)
        for i in range(50):
            breaker = registry.get_or_create(f"svc-{i % 5}", clock=clock)
            with lock:
                got.append(breaker)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert len(got) == 800
    assert len({id(b) for b in got}) == 5


def test_same_options_compare_clocks_by_identity_but_every_system_clock_alike(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    first = circuit_breaker("db", registry=registry, clock=SYSTEM_CLOCK)
    assert circuit_breaker("db", registry=registry, clock=SystemClock()) is first
    circuit_breaker("cache", registry=registry, clock=clock)
    with pytest.raises(ConfigError) as caught:
        circuit_breaker("cache", registry=registry, clock=FakeClock())  # another timeline
    assert caught.value.setting == "clock"


def test_same_options_tell_two_memory_stores_apart(registry: BreakerRegistry) -> None:
    """Two memory stores are two separate states: not the same breaker configuration."""
    mine = MemoryStore()
    first = circuit_breaker("openai:{model}", registry=registry, store=mine)
    assert circuit_breaker("openai:{model}", registry=registry, store=mine) is first
    with pytest.raises(ConfigError) as caught:
        circuit_breaker("openai:{model}", registry=registry, store=MemoryStore())
    assert caught.value.setting == "store"
    with pytest.raises(ConfigError):
        circuit_breaker("openai:{model}", registry=registry, store="memory://")


def test_removing_a_breaker_also_drops_it_from_its_template(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    template = circuit_breaker(
        "openai:{model}", registry=registry, clock=clock, failure_threshold=1
    )
    assert isinstance(template, BreakerTemplate)

    @template
    def ask(*, model: str) -> str:
        if model == "gpt-4o":
            raise Boom
        return model

    with pytest.raises(Boom):
        ask(model="gpt-4o")
    old = registry.get("openai:gpt-4o")
    assert old is not None
    assert old.state == "open"
    assert registry.remove("openai:gpt-4o")
    assert [b.name for b in template.breakers()] == []
    # The next call gets a new, closed breaker, registered again under the same name.
    with pytest.raises(Boom):
        ask(model="gpt-4o")
    new = registry.get("openai:gpt-4o")
    assert new is not None
    assert new is not old
    assert template.breaker(model="gpt-4o") is new
    assert not registry.remove("openai:never-created")


def test_remove_template_forgets_the_template_and_its_breakers(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    template = circuit_breaker("openai:{model}", registry=registry, clock=clock, timeout=10)
    assert isinstance(template, BreakerTemplate)
    template.breaker(model="gpt-4o")
    template.breaker(model="gpt-4o-mini")
    registry.get_or_create("unrelated", clock=clock)
    assert registry.templates() == [template]

    assert registry.remove_template(template)
    assert registry.templates() == []
    assert [b.name for b in registry.all()] == ["unrelated"]
    assert not registry.remove_template(template)
    # Asked again, with other options: a new template, no ConfigError.
    again = circuit_breaker("openai:{model}", registry=registry, clock=clock, timeout=20)
    assert isinstance(again, BreakerTemplate)
    assert again is not template
    assert again.breaker(model="gpt-4o").config.timeout == 20
    # A stale template object does not remove the registered one; its text does.
    assert not registry.remove_template(template)
    assert registry.templates() == [again]
    assert registry.remove_template("openai:{model}")
    assert registry.get("openai:gpt-4o") is None


def test_template_keeps_one_breaker_per_model(clock: FakeClock, registry: BreakerRegistry) -> None:
    template = circuit_breaker(
        "openai:{model}", registry=registry, clock=clock, failure_threshold=2
    )
    assert isinstance(template, BreakerTemplate)
    calls: list[str] = []

    @template
    def ask(prompt: str, *, model: str) -> str:
        calls.append(model)
        if model == "gpt-4o":
            raise Boom
        return f"{model}: {prompt}"

    for _ in range(2):
        with pytest.raises(Boom):
            ask("hi", model="gpt-4o")
    with pytest.raises(CircuitOpenError) as caught:
        ask("hi", model="gpt-4o")
    assert caught.value.name == "openai:gpt-4o"
    # a failing gpt-4o does not stop gpt-4o-mini
    assert ask("hi", model="gpt-4o-mini") == "gpt-4o-mini: hi"
    assert calls == ["gpt-4o", "gpt-4o", "gpt-4o-mini"]
    assert registry.get("openai:gpt-4o").state == "open"  # type: ignore[union-attr]
    assert registry.get("openai:gpt-4o-mini").state == "closed"  # type: ignore[union-attr]
    assert [b.name for b in template.breakers()] == ["openai:gpt-4o", "openai:gpt-4o-mini"]
    assert template.breaker(model="gpt-4o") is registry.get("openai:gpt-4o")
    assert circuit_breaker("openai:{model}", registry=registry) is template


def test_template_reads_a_positional_or_default_model(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    template = circuit_breaker("llm:{model}", registry=registry, clock=clock)
    assert isinstance(template, BreakerTemplate)

    @template
    def ask(prompt: str, model: str = "mini") -> str:
        return model

    assert ask("a", "full") == "full"
    assert ask("a") == "mini"
    assert ask("a", model="other") == "other"
    names = sorted(b.name for b in template.breakers())
    assert names == ["llm:full", "llm:mini", "llm:other"]


def test_template_call_without_model_is_a_type_error(
    clock: FakeClock, registry: BreakerRegistry
) -> None:
    @circuit_breaker("openai:{model}", registry=registry, clock=clock)
    def ask(prompt: str, **params: Any) -> str:
        return prompt

    with pytest.raises(TypeError, match=r"without model=.*'openai:\{model\}'"):
        ask("hi")
    with pytest.raises(TypeError, match="without model="):
        ask("hi", model=None)


def test_template_on_a_function_without_that_parameter_is_a_config_error(
    registry: BreakerRegistry,
) -> None:
    template = circuit_breaker("openai:{model}", registry=registry)

    def ask(prompt: str) -> str:
        return prompt

    with pytest.raises(ConfigError, match="no 'model' parameter"):
        template(ask)


def test_template_with_two_fields(clock: FakeClock, registry: BreakerRegistry) -> None:
    @circuit_breaker("{provider}:{model}", registry=registry, clock=clock)
    def ask(*, provider: str, model: str) -> str:
        return f"{provider}/{model}"

    assert ask(provider="azure", model="gpt-4o") == "azure/gpt-4o"
    assert registry.get("azure:gpt-4o") is not None


@pytest.mark.parametrize(
    "template",
    ["openai:{}", "openai:{0}", "openai:{model.name}", "openai:{model!r}", "openai:{model"],
)
def test_bad_templates_are_config_errors(template: str, registry: BreakerRegistry) -> None:
    with pytest.raises(ConfigError) as caught:
        circuit_breaker(template, registry=registry)
    assert caught.value.setting == "name"


def test_template_options_are_validated_at_decoration(registry: BreakerRegistry) -> None:
    with pytest.raises(ConfigError) as caught:
        circuit_breaker("openai:{model}", registry=registry, timeout=-1)
    assert caught.value.setting == "timeout"


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("failure_threshold", 0),
        ("failure_threshold", -1),
        ("failure_threshold", True),
        ("success_threshold", 0),
        ("timeout", -1.0),
        ("timeout", 0),
        ("timeout", math.nan),
        ("timeout", math.inf),
        ("timeout", "soon"),
        ("window", 0),
        ("failure_rate_threshold", 0.0),
        ("failure_rate_threshold", 1.5),
        ("failure_rate_threshold", 50),
        ("failure_rate_threshold", -0.1),
        ("minimum_calls", 0),
        ("slow_call_duration", 0),
        ("slow_call_duration", -2.0),
        ("half_open_max_calls", 0),
        ("record", (int,)),
        ("ignore", "ValueError"),
        ("store", 42),
        ("clock", object()),
        ("window_buckets", 0),
        ("sync_interval", -1),
        ("on_store_error", "explode"),
        ("store_retry_interval", 0),
        ("trial_lease", -1),
    ],
)
def test_bad_settings_raise_config_error_naming_them(setting: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        CircuitBreaker("svc", registry=None, **{setting: value})
    assert caught.value.setting.split(".")[0] == setting
    assert setting in str(caught.value)


def test_empty_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        CircuitBreaker("", registry=None)
    assert caught.value.setting == "name"


def test_failure_threshold_with_a_rate_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        CircuitBreaker("svc", registry=None, failure_rate_threshold=0.5, failure_threshold=3)
    assert caught.value.setting == "failure_threshold"
    assert "has no effect" in str(caught.value)


def test_unknown_option_is_a_config_error(registry: BreakerRegistry) -> None:
    with pytest.raises(ConfigError) as caught:
        circuit_breaker("svc", registry=registry, timout=3)
    assert caught.value.setting == "timout"


def test_half_open_max_calls_defaults_to_success_threshold(clock: FakeClock) -> None:
    assert make(clock, success_threshold=4).config.max_trial_calls == 4
    assert make(clock, success_threshold=4, half_open_max_calls=1).config.max_trial_calls == 1


def test_a_single_exception_class_is_accepted_for_record_and_ignore(clock: FakeClock) -> None:
    breaker = make(clock, record=Boom, ignore=Harmless)
    assert breaker.config.record == (Boom,)
    assert breaker.config.ignore == (Harmless,)


# -- metrics -----------------------------------------------------------------------------


def test_metrics_of_an_open_breaker(clock: FakeClock) -> None:
    breaker = make(clock)
    run_steps(breaker, clock, "SS")
    trip(breaker)
    clock.advance(12)
    with pytest.raises(CircuitOpenError):
        breaker.call(int)
    metrics = breaker.metrics()
    assert metrics.state == "open"
    assert (metrics.successes, metrics.failures, metrics.rejected) == (2, 5, 1)
    assert metrics.opened_at == pytest.approx(clock.time() - 12)
    assert metrics.next_trial_at == pytest.approx(clock.time() + 18)
    assert metrics.retry_after == pytest.approx(18)
    assert metrics.failures_in_window == 0  # the window starts afresh in every state
    data = metrics.as_dict()
    assert data["state"] == "open"
    json.dumps(data)


def test_metrics_in_half_open_show_the_trials(clock: FakeClock) -> None:
    breaker = make(clock, success_threshold=3)
    trip(breaker)
    clock.advance(30)
    assert breaker.metrics().state == "half_open"
    run_steps(breaker, clock, "S")
    snapshots: list[Any] = []
    breaker.call(lambda: snapshots.append(breaker.metrics()))
    assert snapshots[0].trial_calls_in_flight == 1
    assert snapshots[0].trial_successes == 1
    assert breaker.metrics().trial_successes == 2


def test_metrics_of_a_closed_breaker_have_no_open_times(clock: FakeClock) -> None:
    metrics = make(clock).metrics()
    assert (metrics.opened_at, metrics.next_trial_at, metrics.retry_after) == (None, None, 0.0)
    assert metrics.shared is False
    assert metrics.store_available is None


# -- shared state through a store (memory and a real redis-server) ------------------------
#
# Two breaker objects with the same name and store stand for two processes here;
# tests/test_breaker_redis.py does it with real processes.


def shared(store: Store, clock: FakeClock, **options: Any) -> CircuitBreaker:
    options.setdefault("registry", None)
    return CircuitBreaker("shared-svc", store=store, clock=clock, **options)


def test_shared_open_state_stops_another_worker_from_calling(
    store: Store, fake_clock: FakeClock
) -> None:
    first = shared(store, fake_clock)
    second = shared(store, fake_clock)
    trip(first)
    called: list[int] = []
    with pytest.raises(CircuitOpenError) as caught:
        second.call(called.append, 1)
    assert called == []
    assert caught.value.retry_after == pytest.approx(30.0)
    assert second.state == "open"
    assert second.retry_after == pytest.approx(30.0)


def test_failures_are_counted_across_workers(store: Store, fake_clock: FakeClock) -> None:
    first = shared(store, fake_clock)
    second = shared(store, fake_clock)
    trip(first, 3)
    trip(second, 2)  # the fifth failure, counted in the store
    assert second.state == "open"
    fake_clock.advance(1.0)  # the first worker's next read of the shared state
    assert first.state == "open"


def test_shared_failures_older_than_the_window_drop_out(
    store: Store, fake_clock: FakeClock
) -> None:
    first = shared(store, fake_clock)
    second = shared(store, fake_clock)
    trip(first, 3)
    fake_clock.advance(60.5)
    trip(second, 2)
    assert second.state == "closed"
    assert second.metrics().shared_failures_in_window == 2


def test_trial_calls_are_bounded_across_workers(store: Store, fake_clock: FakeClock) -> None:
    first = shared(store, fake_clock, half_open_max_calls=2)
    second = shared(store, fake_clock, half_open_max_calls=2)
    trip(first)
    fake_clock.advance(30)
    rejected: list[float] = []

    def third_trial() -> str:
        return "not admitted"

    def second_trial() -> str:
        with pytest.raises(CircuitOpenError) as caught:
            first.call(third_trial)  # two permits are taken, by two workers
        rejected.append(caught.value.retry_after)
        assert first.metrics().trial_calls_in_flight == 2
        return "second"

    def first_trial() -> str:
        return second.call(second_trial)

    assert first.call(first_trial) == "second"
    assert rejected == [0.0]
    assert first.state == "closed"  # two successful trials closed it for everyone
    fake_clock.advance(1.0)
    assert second.state == "closed"


def test_a_failed_trial_reopens_the_shared_circuit(store: Store, fake_clock: FakeClock) -> None:
    first = shared(store, fake_clock)
    second = shared(store, fake_clock)
    trip(first)
    fake_clock.advance(30)
    with pytest.raises(Boom):
        second.call(boom)
    assert second.state == "open"
    assert second.retry_after == pytest.approx(30.0)
    with pytest.raises(CircuitOpenError):
        first.call(int)


def test_a_worker_reads_the_shared_state_once_per_sync_interval(
    store: Store, fake_clock: FakeClock
) -> None:
    first = shared(store, fake_clock)
    second = shared(store, fake_clock, sync_interval=5.0)
    assert second.call(int, "1") == 1  # reads the shared state: closed
    trip(first)
    assert second.call(int, "2") == 2  # still within its sync interval: calls go through
    fake_clock.advance(5.0)
    with pytest.raises(CircuitOpenError):
        second.call(int, "3")


def test_sync_interval_zero_reads_the_shared_state_on_every_call(
    store: Store, fake_clock: FakeClock
) -> None:
    first = shared(store, fake_clock)
    second = shared(store, fake_clock, sync_interval=0)
    assert second.call(int, "1") == 1
    trip(first)
    with pytest.raises(CircuitOpenError):
        second.call(int, "2")


def test_a_worker_observing_a_shared_change_tells_its_listeners(
    store: Store, fake_clock: FakeClock
) -> None:
    first = shared(store, fake_clock)
    second = shared(store, fake_clock)
    mine: list[BreakerEvent] = []
    theirs: list[BreakerEvent] = []
    first.add_listener(mine.append)
    second.add_listener(theirs.append)
    trip(first)
    assert second.state == "open"
    assert [(e.to_state, e.source) for e in mine] == [("open", "local")]
    assert [(e.to_state, e.source) for e in theirs] == [("open", "store")]
    if isinstance(store, MemoryStore):  # one process: no claim about other processes
        assert mine[0].reason == "5 failures in 60s"
        assert theirs[0].reason == (
            "shared state is open (changed by another breaker on the same memory store)"
        )
    else:
        assert mine[0].reason == "5 failures in 60s across processes"
        assert theirs[0].reason == "shared state is open (changed by another process)"


def test_a_breaker_on_a_memory_store_words_its_reasons_for_one_process(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """What ``python -m ai_guard demo`` shows: a memory store takes the shared path, but
    it is one process's, so its reasons read like a local breaker's."""
    caplog.set_level(logging.WARNING, logger="ai_guard.breaker")
    breaker = CircuitBreaker("svc", store="memory://", clock=fake_clock, registry=None)
    seen: list[BreakerEvent] = []
    breaker.add_listener(seen.append)
    trip(breaker)
    assert [(e.to_state, e.reason) for e in seen] == [("open", "5 failures in 60s")]
    assert "across processes" not in caplog.text
    assert breaker.metrics().shared


def test_a_failure_rate_trip_is_shared(store: Store, fake_clock: FakeClock) -> None:
    first = shared(store, fake_clock, failure_rate_threshold=0.5, minimum_calls=4)
    second = shared(store, fake_clock, failure_rate_threshold=0.5, minimum_calls=4)
    assert run_steps(first, fake_clock, "SSFF") == "..xx"
    with pytest.raises(CircuitOpenError):
        second.call(int)


def test_reset_clears_the_shared_state(store: Store, fake_clock: FakeClock) -> None:
    first = shared(store, fake_clock)
    second = shared(store, fake_clock)
    trip(first)
    assert second.state == "open"
    first.reset()
    assert first.state == "closed"
    fake_clock.advance(1.0)
    assert second.state == "closed"
    assert second.call(int, "7") == 7


def test_shared_metrics(store: Store, fake_clock: FakeClock) -> None:
    first = shared(store, fake_clock)
    trip(first, 2)
    metrics = first.metrics()
    assert metrics.shared is True
    assert metrics.store_available is True
    assert metrics.shared_failures_in_window == 2
    assert metrics.failures_in_window == 2


# -- the shared transitions themselves, on both backends --------------------------------


def _circuit(store: Store, **options: Any) -> SharedCircuit:
    settings: dict[str, Any] = {
        "window": 60.0,
        "failure_threshold": 3,
        "timeout": 30.0,
        "success_threshold": 2,
        "max_trials": 2,
        "lease": 45.0,
    }
    settings.update(options)
    return SharedCircuit(store, "scripts", **settings)


def test_script_record_failure_opens_at_the_threshold(store: Store) -> None:
    circuit = _circuit(store)
    now = 1_700_000_000.0
    assert not circuit.record_failure(now).transitioned
    assert not circuit.record_failure(now + 1).transitioned
    opened = circuit.record_failure(now + 2)
    assert opened.transitioned
    assert opened.view.state == "o"
    assert opened.view.deadline == pytest.approx(now + 32)
    assert opened.view.failures == ()
    assert circuit.read() == opened.view
    # failures while open change nothing
    assert circuit.record_failure(now + 3).view == opened.view


def test_script_trials_are_bounded_and_leased(store: Store) -> None:
    circuit = _circuit(store)
    now = 1_700_000_000.0
    circuit.trip(now, now + 30)
    assert not circuit.acquire_trial(now + 29).granted
    first = circuit.acquire_trial(now + 30)
    assert (first.transitioned, first.granted, first.view.state) == (True, True, "h")
    assert circuit.acquire_trial(now + 30).granted
    assert not circuit.acquire_trial(now + 31).granted
    # the holders died: after the lease the permits come back
    assert circuit.acquire_trial(now + 30 + 45).granted


def test_script_trial_results(store: Store) -> None:
    circuit = _circuit(store)
    now = 1_700_000_000.0
    circuit.trip(now, now + 30)
    epoch = circuit.acquire_trial(now + 30).view.epoch
    assert circuit.trial_result(epoch - 1, "s", now + 31).view.trial_successes == 0  # stale
    assert not circuit.trial_result(epoch, "i", now + 31).transitioned
    circuit.acquire_trial(now + 31)
    circuit.acquire_trial(now + 31)
    assert not circuit.trial_result(epoch, "s", now + 32).transitioned
    closed = circuit.trial_result(epoch, "s", now + 32)
    assert (closed.transitioned, closed.view.state) == (True, "c")
    assert closed.view.epoch > epoch
    circuit.trip(now + 40, now + 70)
    epoch = circuit.acquire_trial(now + 70).view.epoch
    reopened = circuit.trial_result(epoch, "f", now + 71)
    assert (reopened.transitioned, reopened.view.state) == (True, "o")
    assert reopened.view.deadline == pytest.approx(now + 101)


def test_script_state_survives_garbage_in_the_key(store: Store) -> None:
    circuit = _circuit(store)
    store.set(circuit.key, b"not|a|state")
    assert circuit.read().state == "c"
    assert not circuit.record_failure(1_700_000_000.0).transitioned


def test_decorated_signature_survives_for_the_type_checker(tmp_path: Any) -> None:
    mypy_api = pytest.importorskip("mypy.api")
    snippet = tmp_path / "typed_use.py"
    snippet.write_text(
        "from ai_guard.breaker import CircuitBreaker, circuit_breaker\n"
        "@circuit_breaker('typing-check')\n"
        "def ask(prompt: str, *, model: str) -> int:\n"
        "    return 1\n"
        "breaker = CircuitBreaker('typing-check-2', registry=None)\n"
        "@breaker\n"
        "def count(n: int) -> str:\n"
        "    return str(n)\n"
        "reveal_type(ask)\n"
        "reveal_type(count)\n"
        "reveal_type(breaker.call(count, 3))\n"
    )
    stdout, _, status = mypy_api.run(["--strict", "--no-error-summary", str(snippet)])
    revealed = [
        line.split("Revealed type is ", 1)[1] for line in stdout.splitlines() if "Revealed" in line
    ]
    assert revealed == [
        '"def (prompt: str, *, model: str) -> int"',
        '"def (n: int) -> str"',
        '"str"',
    ]
    assert status == 0, stdout
