"""Proactive pacing: the shared budget, its atomic reserve/observe on memory and Redis,
and the decorator that waits for the reset instead of earning a 429."""

from __future__ import annotations

import json
import logging
import math
import random
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
import requests

from ai_guard.context import close_call, open_call
from ai_guard.errors import ConfigError, UpstreamError
from ai_guard.pacing import RateLimitBudget, Reservation
from ai_guard.ratelimit import rate_limited
from ai_guard.stores import MemoryStore, RedisStore, Store
from ai_guard.testing import FakeClock, FakeUpstream
from tests.conftest import free_port


def window_headers(
    *,
    limit: int = 10,
    remaining: int,
    reset: str = "2s",
    limit_tokens: int | None = None,
    remaining_tokens: int | None = None,
    reset_tokens: str = "2s",
) -> dict[str, str]:
    headers = {
        "x-ratelimit-limit-requests": str(limit),
        "x-ratelimit-remaining-requests": str(remaining),
        "x-ratelimit-reset-requests": reset,
    }
    if remaining_tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(limit_tokens or remaining_tokens)
        headers["x-ratelimit-remaining-tokens"] = str(remaining_tokens)
        headers["x-ratelimit-reset-tokens"] = reset_tokens
    return headers


@pytest.fixture
def budget(store: Store, fake_clock: FakeClock) -> RateLimitBudget:
    """A budget on every backend (memory and a real Redis), on the fake clock."""
    return RateLimitBudget(store, key="https://api.example/v1|gpt-4o-mini", clock=fake_clock)


def reserve_all(budget: RateLimitBudget, tokens: int = 0, limit: int = 1000) -> list[Reservation]:
    granted = []
    for _ in range(limit):
        reservation = budget.reserve(tokens)
        if not reservation.reserved:
            break
        granted.append(reservation)
    return granted


# -- the budget's arithmetic, on both backends -------------------------------------------


def test_with_nothing_known_calls_go_but_are_counted_in_flight(budget: RateLimitBudget) -> None:
    assert budget.acquire() == 0.0
    assert budget.acquire() == 0.0
    assert budget.snapshot().requests.in_flight == 2
    assert budget.snapshot().requests.remaining is None


def test_known_remaining_admits_exactly_that_many_then_waits_for_the_reset(
    budget: RateLimitBudget, fake_clock: FakeClock
) -> None:
    budget.observe(window_headers(remaining=3, reset="2s"))
    assert len(reserve_all(budget)) == 3
    wait = budget.acquire()
    assert wait == pytest.approx(2.0, abs=0.01)
    assert wait >= 2.0
    fake_clock.advance(wait)
    assert len(reserve_all(budget)) == 10  # the window refilled to its limit


def test_remaining_zero_waits_until_the_reset(budget: RateLimitBudget) -> None:
    budget.observe(window_headers(remaining=0, reset="1.5s"))
    reservation = budget.reserve()
    assert not reservation.reserved
    assert reservation.wait == pytest.approx(1.5, abs=0.01)


def test_available_is_the_upstream_word_minus_what_is_in_flight(budget: RateLimitBudget) -> None:
    budget.observe(window_headers(remaining=5))
    first, second, third = budget.reserve(), budget.reserve(), budget.reserve()
    assert budget.snapshot().requests.available == 2
    # the upstream counted the first call: 4 left, and two of ours are still in flight
    budget.observe(window_headers(remaining=4), reservation=first)
    assert budget.snapshot().requests.available == 2
    # the other two landed too: 2 left, none in flight
    budget.observe(window_headers(remaining=3), reservation=second)
    budget.observe(window_headers(remaining=2), reservation=third)
    snapshot = budget.snapshot().requests
    assert (snapshot.remaining, snapshot.in_flight, snapshot.available) == (2, 0, 2)
    assert len(reserve_all(budget)) == 2


def test_a_call_without_an_answer_still_ends_its_flight(budget: RateLimitBudget) -> None:
    budget.observe(window_headers(remaining=2))
    reservation = budget.reserve()
    assert budget.snapshot().requests.in_flight == 1
    budget.release(reservation)
    assert budget.snapshot().requests.in_flight == 0
    budget.release(Reservation(wait=1.0))  # not reserved: nothing to end
    assert budget.snapshot().requests.in_flight == 0


def test_tokens_are_reserved_by_estimate(budget: RateLimitBudget) -> None:
    budget.observe(window_headers(remaining=50, remaining_tokens=100, limit_tokens=1000))
    assert budget.acquire(60) == 0.0
    assert budget.acquire(60) > 0.0
    assert budget.acquire(30) == 0.0
    assert budget.snapshot().tokens.in_flight == 90


def test_a_call_larger_than_a_whole_window_goes_alone_at_its_start(
    budget: RateLimitBudget,
) -> None:
    budget.observe(window_headers(remaining=50, remaining_tokens=1000, limit_tokens=1000))
    assert budget.acquire(5000) == 0.0
    assert budget.acquire(10) > 0.0  # the window is spent


def test_safety_margin_keeps_part_of_the_window_unused(store: Store, fake_clock: FakeClock) -> None:
    budget = RateLimitBudget(store, key="margin", clock=fake_clock, safety_margin=0.2)
    budget.observe(window_headers(limit=10, remaining=5))
    assert len(reserve_all(budget)) == 3  # 2 of 10 are kept back


def test_a_retry_after_holds_every_caller_back(
    budget: RateLimitBudget, fake_clock: FakeClock
) -> None:
    budget.observe(window_headers(remaining=8))
    budget.observe({"retry-after": "3"})
    assert budget.acquire() == pytest.approx(3.0, abs=0.01)
    fake_clock.advance(3.01)
    assert budget.acquire() == 0.0


@pytest.mark.parametrize("corrupted", [b"1 2 3", b"x" * 14, b" ".join([b"1"] * 13 + [b"oops"])])
def test_a_corrupted_state_starts_afresh(budget: RateLimitBudget, corrupted: bytes) -> None:
    budget.store.set(f"ratelimit:budget:{budget.key}", corrupted)
    assert budget.acquire() == 0.0
    snapshot = budget.snapshot().requests
    assert (snapshot.remaining, snapshot.in_flight) == (None, 1)


# -- news arriving out of order ------------------------------------------------------------


def test_an_older_report_of_the_same_window_does_not_raise_remaining(
    budget: RateLimitBudget, fake_clock: FakeClock
) -> None:
    budget.observe(window_headers(remaining=2, reset="1000ms"))
    fake_clock.advance(0.01)
    # a slow thread reports what the upstream said earlier in the same window
    budget.observe(window_headers(remaining=9, reset="990ms"))
    assert budget.snapshot().requests.remaining == 2
    assert len(reserve_all(budget)) == 2


def test_a_report_of_an_older_window_is_ignored(
    budget: RateLimitBudget, fake_clock: FakeClock
) -> None:
    budget.observe(window_headers(remaining=1, reset="1s"))
    fake_clock.advance(0.9)
    budget.observe(window_headers(remaining=9, reset="2s"))  # a new window: later deadline
    assert budget.snapshot().requests.remaining == 9
    # the old window's last word (deadline ~0.1 s from now) arrives late
    budget.observe(window_headers(remaining=0, reset="100ms"))
    assert budget.snapshot().requests.remaining == 9
    assert len(reserve_all(budget)) == 9


def test_answers_to_calls_reserved_before_the_refill_are_stale(
    budget: RateLimitBudget, fake_clock: FakeClock
) -> None:
    budget.observe(window_headers(limit=4, remaining=2, reset="1s"))
    old = budget.reserve()
    fake_clock.advance(1.01)  # the window ends: refilled to 4, provisionally
    new = budget.reserve()
    assert budget.snapshot().requests.provisional
    assert budget.snapshot().requests.in_flight == 1
    # the old call's answer speaks of the old window: it neither ends a new flight nor counts
    budget.observe(window_headers(limit=4, remaining=0, reset="10ms"), reservation=old)
    snapshot = budget.snapshot().requests
    assert (snapshot.remaining, snapshot.in_flight) == (4, 1)
    # the new call's answer confirms the new window
    budget.observe(window_headers(limit=4, remaining=3, reset="990ms"), reservation=new)
    snapshot = budget.snapshot().requests
    assert (snapshot.remaining, snapshot.in_flight, snapshot.provisional) == (3, 0, False)


def test_a_refilled_window_that_is_spent_before_any_answer_waits_for_the_guessed_reset(
    budget: RateLimitBudget, fake_clock: FakeClock
) -> None:
    budget.observe(window_headers(limit=2, remaining=0, reset="2s"))
    fake_clock.advance(2.01)
    assert len(reserve_all(budget)) == 2
    # no answer yet: the next window is guessed to be as long as the longest reset seen
    assert budget.acquire() == pytest.approx(1.99, abs=0.02)


# -- concurrency: exact counts -----------------------------------------------------------


def test_fifty_threads_seeing_three_remaining_let_exactly_three_go(
    budget: RateLimitBudget,
) -> None:
    budget.observe(window_headers(limit=100, remaining=3))
    threads = 50
    barrier = threading.Barrier(threads)
    outcomes: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        wait = budget.acquire(10)
        with lock:
            outcomes.append(wait)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert len(outcomes) == threads
    assert sum(1 for w in outcomes if w == 0.0) == 3
    assert all(w > 1.9 for w in outcomes if w != 0.0)
    assert budget.snapshot().requests.in_flight == 3


def test_many_threads_reserving_tokens_never_overdraw(budget: RateLimitBudget) -> None:
    budget.observe(window_headers(limit=10_000, remaining=10_000, remaining_tokens=1000))
    threads, per_thread = 20, 30
    granted: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        for _ in range(per_thread):
            tokens = rng.randint(1, 40)
            if budget.acquire(tokens) == 0.0:
                with lock:
                    granted.append(tokens)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert sum(granted) <= 1000
    assert sum(granted) > 1000 - 40  # and the budget was used up, not wasted
    assert budget.snapshot().tokens.in_flight == sum(granted)
    assert budget.snapshot().requests.in_flight == len(granted)


# -- memory and Redis run the same arithmetic ----------------------------------------------


def _random_headers(rng: random.Random) -> dict[str, str]:
    headers: dict[str, str] = {}
    if rng.random() < 0.8:
        headers.update(
            window_headers(
                limit=rng.choice([5, 10]),
                remaining=rng.randint(0, 10),
                reset=f"{rng.randint(0, 2500)}ms",
            )
        )
    if rng.random() < 0.5:
        headers["x-ratelimit-limit-tokens"] = "500"
        headers["x-ratelimit-remaining-tokens"] = str(rng.randint(0, 500))
        headers["x-ratelimit-reset-tokens"] = f"{rng.randint(0, 3000)}ms"
    if rng.random() < 0.1:
        headers["retry-after-ms"] = str(rng.randint(0, 3000))
    return headers


def test_redis_and_memory_budgets_agree_on_a_random_history(redis_store: RedisStore) -> None:
    clock = FakeClock()
    memory = RateLimitBudget(MemoryStore(clock=clock), key="parity", clock=clock)
    redis_budget = RateLimitBudget(redis_store, key="parity", clock=clock)
    rng = random.Random(20240718)
    in_flight: list[tuple[Reservation, Reservation]] = []
    for step in range(400):
        action = rng.random()
        if action < 0.45:
            tokens = rng.randint(0, 120)
            ours, theirs = memory.reserve(tokens), redis_budget.reserve(tokens)
            assert ours.wait == pytest.approx(theirs.wait, abs=1e-9), step
            assert (ours.requests_epoch, ours.tokens_epoch) == (
                theirs.requests_epoch,
                theirs.tokens_epoch,
            ), step
            if ours.reserved:
                in_flight.append((ours, theirs))
        elif action < 0.85:
            headers = _random_headers(rng)
            pair = in_flight.pop(rng.randrange(len(in_flight))) if in_flight else None
            memory.observe(headers, reservation=pair[0] if pair else None)
            redis_budget.observe(headers, reservation=pair[1] if pair else None)
        else:
            clock.advance(rng.choice([0.05, 0.3, 1.0, 2.6]))
        assert memory.snapshot() == redis_budget.snapshot(), step


# -- the decorator with a budget ---------------------------------------------------------


class FixedWindowServer:
    """A tiny upstream on the fake clock: ``quota`` requests per ``window`` seconds, real
    headers on every answer, 429 with retry-after beyond the quota."""

    def __init__(self, clock: FakeClock, quota: int, window: float) -> None:
        self.clock, self.quota, self.window = clock, quota, window
        self.origin = clock.monotonic()
        self.counts: dict[int, int] = {}
        self.statuses: list[int] = []

    def __call__(self, *, messages: list[dict[str, str]]) -> requests.Response:
        elapsed = self.clock.monotonic() - self.origin
        index = int(elapsed // self.window)
        reset = (index + 1) * self.window - elapsed
        used = self.counts.get(index, 0)
        status = 200 if used < self.quota else 429
        if status == 200:
            self.counts[index] = used + 1
        self.statuses.append(status)
        response = requests.Response()
        response.status_code = status
        response.headers.update(
            window_headers(
                limit=self.quota,
                remaining=self.quota - self.counts.get(index, 0),
                reset=f"{math.ceil(reset * 1000)}ms",
            )
        )
        if status == 429:
            response.headers["retry-after-ms"] = str(math.ceil(reset * 1000))
        return response


def test_paced_calls_fill_each_window_without_a_single_429(fake_clock: FakeClock) -> None:
    server = FixedWindowServer(fake_clock, quota=10, window=1.0)
    budget = RateLimitBudget(MemoryStore(clock=fake_clock), key="sim", clock=fake_clock)
    ask = rate_limited(budget=budget, clock=fake_clock)(server)
    for _ in range(100):
        assert ask(messages=[{"role": "user", "content": "hi"}]).status_code == 200
    assert server.statuses.count(429) == 0
    assert server.counts == dict.fromkeys(range(10), 10)
    assert fake_clock.total_slept == pytest.approx(9.0, abs=0.05)


def test_without_a_budget_the_same_load_earns_429s(fake_clock: FakeClock) -> None:
    server = FixedWindowServer(fake_clock, quota=10, window=1.0)
    ask = rate_limited(clock=fake_clock)(server)
    for _ in range(100):
        assert ask(messages=[{"role": "user", "content": "hi"}]).status_code == 200
    assert server.statuses.count(429) == 9  # one per exhausted window


def test_pacing_waits_are_written_into_the_call_context(fake_clock: FakeClock) -> None:
    budget = RateLimitBudget(MemoryStore(clock=fake_clock), key="ctx", clock=fake_clock)
    budget.observe(window_headers(remaining=0, reset="1.5s"))
    ask = rate_limited(budget=budget, clock=fake_clock)(lambda: "ok")
    ctx, token = open_call(fake_clock)
    ctx.operation = "chat"
    try:
        assert ask() == "ok"
    finally:
        close_call(ctx, token, fake_clock, result=None)
    assert ctx.rate_limit_wait_s == pytest.approx(1.501, abs=0.01)
    assert ctx.retries == 0


def test_a_pacing_wait_longer_than_max_delay_goes_anyway_after_max_delay(
    fake_clock: FakeClock,
) -> None:
    budget = RateLimitBudget(MemoryStore(clock=fake_clock), key="long", clock=fake_clock)
    budget.observe(window_headers(remaining=0, reset="6m0s"))
    calls: list[int] = []
    ask = rate_limited(budget=budget, clock=fake_clock, max_delay=5.0)(lambda: calls.append(1))
    ask()
    assert calls == [1]
    assert fake_clock.sleeps == [5.0]


def test_token_estimates_come_from_messages_or_the_callers_estimator(
    fake_clock: FakeClock,
) -> None:
    budget = RateLimitBudget(MemoryStore(clock=fake_clock), key="tokens", clock=fake_clock)
    budget.observe(window_headers(remaining=100, remaining_tokens=10_000))
    seen: list[int] = []

    def observe_flight(**_: Any) -> str:
        seen.append(int(budget.snapshot().tokens.in_flight))
        return "ok"

    by_messages = rate_limited(budget=budget, clock=fake_clock)(observe_flight)
    by_messages(messages=[{"role": "user", "content": "x" * 400}], max_tokens=50)
    by_estimator = rate_limited(
        budget=budget, clock=fake_clock, estimate_tokens=lambda *a, **kw: 777
    )(observe_flight)
    by_estimator(messages=[])
    assert seen == [150, 777]
    assert budget.snapshot().tokens.in_flight == 0  # both flights ended


def test_a_failed_call_ends_its_flight_and_its_429_updates_the_budget(
    fake_clock: FakeClock,
) -> None:
    budget = RateLimitBudget(MemoryStore(clock=fake_clock), key="fail", clock=fake_clock)
    budget.observe(window_headers(remaining=5))
    boom = rate_limited(budget=budget, clock=fake_clock)(_raise(ValueError("bad")))
    with pytest.raises(ValueError, match="bad"):
        boom()
    assert budget.snapshot().requests.in_flight == 0
    limited = UpstreamError("429", status=429, headers=window_headers(remaining=0, reset="3s"))
    outcomes: list[Exception | str] = [limited, "ok"]

    def flaky() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert rate_limited(budget=budget, clock=fake_clock, jitter=False)(flaky)() == "ok"
    assert fake_clock.sleeps[0] == pytest.approx(3.0)
    assert budget.snapshot().requests.in_flight == 0


def _raise(exc: Exception) -> Any:
    def fail() -> None:
        raise exc

    return fail


def test_a_key_template_keeps_one_budget_per_model(fake_clock: FakeClock) -> None:
    store = MemoryStore(clock=fake_clock)
    budget = RateLimitBudget(store, key="openai:{model}", clock=fake_clock)
    assert budget.is_template
    budget.bind(model="gpt-4o").observe(window_headers(remaining=1))

    @rate_limited(budget=budget, clock=fake_clock, max_delay=0.5)
    def ask(*, model: str) -> str:
        return model

    ask(model="gpt-4o")
    ask(model="gpt-4o")  # the gpt-4o window is spent: waits (up to max_delay)
    ask(model="gpt-4o-mini")
    assert fake_clock.sleeps == [0.5]
    assert budget.bind(model="gpt-4o") is budget.bind(model="gpt-4o")
    assert budget.bind(model="gpt-4o").key == "openai:gpt-4o"
    assert budget.bind_call({}).key == "openai:-"


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"key": ""}, "key"),
        ({"key": "openai:{model"}, "key"),
        ({"safety_margin": 1.0}, "safety_margin"),
        ({"safety_margin": -0.1}, "safety_margin"),
        ({"window_tolerance": -1}, "window_tolerance"),
        ({"default_reset": 0}, "default_reset"),
        ({"ttl": float("inf")}, "ttl"),
        ({"clock": "now"}, "clock"),
        ({"store": "memcached://x"}, "url"),
    ],
)
def test_bad_budget_settings_are_rejected(options: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as raised:
        RateLimitBudget(**options)
    assert raised.value.setting == setting


# -- the store fails: pacing turns off, calls go through ----------------------------------


def test_an_unreachable_store_turns_pacing_off_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2)
    budget = RateLimitBudget(store, key="down")
    caplog.set_level(logging.WARNING, logger="ai_guard.ratelimit")
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        return "ok"

    ask = rate_limited(budget=budget)(call)
    assert ask() == "ok"
    assert ask() == "ok"
    budget.observe(window_headers(remaining=0))
    assert budget.acquire() == 0.0
    assert calls == [1, 1]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "pacing is off" in warnings[0].getMessage()
    assert warnings[0].budget == "down"  # type: ignore[attr-defined]


# -- across processes through Redis ------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, sys, threading
    from ai_guard.pacing import RateLimitBudget
    from ai_guard.stores import RedisStore

    url, prefix = sys.argv[1], sys.argv[2]
    head_start, threads = int(sys.argv[3]), int(sys.argv[4])
    budget = RateLimitBudget(RedisStore(url, key_prefix=prefix), key="shared")
    # Taken before the parent takes any: this process surely gets some of the budget.
    ahead = sum(1 for _ in range(head_start) if budget.acquire() == 0)
    print(json.dumps({"ahead": ahead}), flush=True)
    granted = []
    lock = threading.Lock()

    def worker():
        for _ in range(200):
            if budget.acquire() > 0:
                return
            with lock:
                granted.append(1)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    sys.stdin.readline()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(json.dumps({"granted": ahead + len(granted)}), flush=True)
    """
)


@pytest.mark.slow
def test_a_redis_budget_is_shared_exactly_with_another_process(redis_store: RedisStore) -> None:
    budget = RateLimitBudget(redis_store, key="shared")
    budget.observe(window_headers(limit=1000, remaining=60, reset="30s"))
    head_start = 10
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD,
            redis_store.url,
            redis_store.key_prefix,
            str(head_start),
            "8",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdin is not None
            assert json.loads(child.stdout.readline()) == {"ahead": head_start}
            # What the other process took is already gone from this one's budget.
            assert budget.snapshot().requests.in_flight == head_start
            granted: list[int] = []
            lock = threading.Lock()

            def worker() -> None:
                for _ in range(200):
                    if budget.acquire() > 0:
                        return
                    with lock:
                        granted.append(1)

            workers = [threading.Thread(target=worker) for _ in range(8)]
            # Both processes now race for the other 50, 8 threads each.
            child.stdin.write("go\n")
            child.stdin.flush()
            for w in workers:
                w.start()
            for w in workers:
                w.join(timeout=30)
            child_granted = json.loads(child.stdout.readline())["granted"]
            assert child.wait(timeout=30) == 0
        finally:
            if child.poll() is None:
                child.kill()
    assert child_granted >= head_start
    assert len(granted) + child_granted == 60  # not one grant more, in either process
    assert budget.snapshot().requests.in_flight == 60


_LOAD_CHILD = textwrap.dedent(
    """
    import sys, threading, time
    import requests
    from ai_guard.pacing import RateLimitBudget
    from ai_guard.ratelimit import rate_limited
    from ai_guard.stores import RedisStore

    url, redis_url, prefix = sys.argv[1], sys.argv[2], sys.argv[3]
    budget = RateLimitBudget(RedisStore(redis_url, key_prefix=prefix), key="upstream")
    print("ready", flush=True)
    until = float(sys.stdin.readline())

    def worker():
        session = requests.Session()

        @rate_limited(max_retries=5, budget=budget)
        def post(*, messages):
            return session.post(
                url + "/chat/completions",
                json={"model": "gpt-4o-mini", "messages": messages, "max_tokens": 8},
                headers={"x-process": "child"},
                timeout=10,
            )

        while time.time() < until:
            post(messages=[{"role": "user", "content": "hello"}])

    workers = [threading.Thread(target=worker) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    """
)


@pytest.mark.slow
def test_two_processes_pacing_through_redis_stay_within_the_quota(
    redis_store: RedisStore,
) -> None:
    window, quota, windows = 0.5, 10, 4
    with FakeUpstream(quota_requests=quota, quota_window=window) as upstream:
        budget = RateLimitBudget(redis_store, key="upstream")
        command = [sys.executable, "-c", _LOAD_CHILD, upstream.url, redis_store.url]
        with subprocess.Popen(
            [*command, redis_store.key_prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as child:
            try:
                assert child.stdin is not None
                assert child.stdout is not None
                assert child.stdout.readline().strip() == "ready"

                @rate_limited(max_retries=5, budget=budget)
                def post(
                    session: requests.Session, *, messages: list[dict[str, str]]
                ) -> requests.Response:
                    return session.post(
                        f"{upstream.url}/chat/completions",
                        json={"model": "gpt-4o-mini", "messages": messages, "max_tokens": 8},
                        headers={"x-process": "parent"},
                        timeout=10,
                    )

                upstream.reset()
                started = time.time()
                until = started + windows * window
                child.stdin.write(f"{until!r}\n")
                child.stdin.flush()

                def worker() -> None:
                    with requests.Session() as session:
                        while time.time() < until:
                            post(session, messages=[{"role": "user", "content": "hello"}])

                workers = [threading.Thread(target=worker) for _ in range(3)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join(timeout=30)
                assert child.wait(timeout=30) == 0
            finally:
                if child.poll() is None:
                    child.kill()
        records = [r for r in upstream.requests if started <= r.received_at < until]
    statuses = [r.status for r in records]
    assert statuses.count(429) <= max(1, len(statuses) // 100)
    # most of the quota was used, by both processes together
    assert statuses.count(200) >= 0.8 * quota * windows
    served = {r.headers.get("x-process") for r in records if r.status == 200}
    assert served == {"parent", "child"}
