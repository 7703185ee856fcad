"""Goodput under a quota: proactive pacing vs plain retry-on-429.

A :class:`~ai_guard.testing.FakeUpstream` enforces a fixed-window quota (requests, or
tokens) with real ``x-ratelimit-*`` headers and answers 429 with ``retry-after-ms`` /
``retry-after`` beyond it. N threads POST ``/chat/completions`` with ``requests`` as fast
as they can for a whole number of windows, through:

- ``ai_guard``: ``@rate_limited(max_retries=5, budget=RateLimitBudget(...))``, one budget
  shared by the threads (proactive pacing, then header-driven retry);
- ``peer``: openai-python's retry policy on the same HTTP stack (2 retries; the server's
  ``retry-after-ms`` / ``retry-after`` when it gives one up to 60 s, else 0.5 s doubling to
  8 s with 75-100 % jitter): plain retry on 429, no pacing. A call that still gets 429
  after its retries fails and the thread moves on to the next call.

Figures, counted by the upstream over the measured windows: goodput (200 answers as % of
what the quota admits in those windows; target >= 95 % for ai_guard) and the share of
requests answered 429 (target <= 1 % for ai_guard).

Run alone: ``python -m benchmarks -k goodput``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from ai_guard.errors import RateLimitExceeded
from ai_guard.pacing import RateLimitBudget
from ai_guard.ratelimit import parse_rate_limit_headers, rate_limited
from ai_guard.stores import MemoryStore
from ai_guard.testing import FakeUpstream
from benchmarks._harness import Result

THREADS = 8
WINDOW = 2.0
QUOTA_REQUESTS = 40
MODEL = "gpt-4o-mini"
MAX_TOKENS = 16
# 30 characters: 8 prompt tokens + 16 max_tokens = 24 tokens a call.
PROMPT = "How many moons does Mars have?"
TOKENS_PER_CALL = 8 + MAX_TOKENS
# Token-bound scenario: the token quota admits 30 calls a window, the request quota 1000.
QUOTA_TOKENS = 30 * TOKENS_PER_CALL


@dataclass
class Scenario:
    name: str
    quota_requests: int
    quota_tokens: int | None
    #: Calls the binding quota admits per window.
    admitted_per_window: int


REQUEST_BOUND = Scenario("requests", QUOTA_REQUESTS, None, QUOTA_REQUESTS)
TOKEN_BOUND = Scenario("tokens", 1000, QUOTA_TOKENS, QUOTA_TOKENS // TOKENS_PER_CALL)


def _body() -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
    }


# -- the two client policies -------------------------------------------------------------


def _ai_guard_caller(url: str) -> Callable[[requests.Session], object]:
    budget = RateLimitBudget(MemoryStore(), key=f"{url}|{MODEL}")

    @rate_limited(max_retries=5, budget=budget)
    def post(
        session: requests.Session, *, messages: list[dict[str, str]], max_tokens: int
    ) -> requests.Response:
        return session.post(
            f"{url}/chat/completions",
            json={"model": MODEL, "messages": messages, "max_tokens": max_tokens},
            timeout=10,
        )

    def call(session: requests.Session) -> object:
        body = _body()
        return post(session, messages=body["messages"], max_tokens=body["max_tokens"])

    return call


# openai-python's constants (openai/_constants.py).
_PEER_MAX_RETRIES = 2
_PEER_INITIAL_DELAY = 0.5
_PEER_MAX_DELAY = 8.0
_PEER_MAX_RETRY_AFTER = 60.0


def _peer_timeout(retries_done: int, headers: Any) -> float:
    """openai-python's ``_calculate_retry_timeout``: the server's wait when it gives one
    (``retry-after-ms`` first, then ``retry-after``), else exponential with 75-100 %
    jitter."""
    retry_after = parse_rate_limit_headers(headers).retry_after
    if retry_after is not None and 0 < retry_after <= _PEER_MAX_RETRY_AFTER:
        return retry_after
    sleep_seconds = min(_PEER_INITIAL_DELAY * 2.0**retries_done, _PEER_MAX_DELAY)
    return sleep_seconds * (1 - 0.25 * random.random())


def _peer_caller(url: str) -> Callable[[requests.Session], object]:
    def call(session: requests.Session) -> object:
        for retries_done in range(_PEER_MAX_RETRIES + 1):
            response = session.post(f"{url}/chat/completions", json=_body(), timeout=10)
            if response.status_code != 429 or retries_done == _PEER_MAX_RETRIES:
                return response
            time.sleep(_peer_timeout(retries_done, response.headers))
        raise AssertionError("unreachable")

    return call


# -- one run -----------------------------------------------------------------------------


def _run(
    scenario: Scenario,
    make_caller: Callable[[str], Callable[[requests.Session], object]],
    windows: int,
) -> dict[str, float]:
    with FakeUpstream(
        quota_requests=scenario.quota_requests,
        quota_tokens=scenario.quota_tokens,
        quota_window=WINDOW,
        record_limit=200_000,
    ) as upstream:
        call = make_caller(upstream.url)
        sessions = [requests.Session() for _ in range(THREADS)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(THREADS + 1)
        stop = threading.Event()

        def worker(session: requests.Session) -> None:
            barrier.wait()
            try:
                while not stop.is_set():
                    try:
                        call(session)
                    except Exception as exc:  # RateLimitExceeded for a call that gave up
                        if not isinstance(exc, requests.RequestException | RateLimitExceeded):
                            errors.append(exc)
            finally:
                session.close()

        threads = [threading.Thread(target=worker, args=(s,)) for s in sessions]
        for thread in threads:
            thread.start()
        upstream.reset()  # window 0 starts now
        started = time.time()
        barrier.wait()
        measured_until = started + windows * WINDOW
        time.sleep(max(0.0, measured_until - time.time()))
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        if errors:
            raise errors[0]
        if upstream.server_errors:
            raise RuntimeError(upstream.server_errors[0])
        records = [r for r in upstream.requests if started <= r.received_at < measured_until]
    ok = sum(1 for r in records if r.status == 200)
    limited = sum(1 for r in records if r.status == 429)
    total = max(1, len(records))
    return {
        "goodput_pct": 100.0 * ok / (scenario.admitted_per_window * windows),
        "rate_limited_pct": 100.0 * limited / total,
        "ok": ok,
        "429": limited,
        "requests": len(records),
        "windows": windows,
    }


def results(quick: bool) -> list[Result]:
    windows = 2 if quick else 4
    rows: list[Result] = []
    for scenario in (REQUEST_BOUND, TOKEN_BOUND):
        quota = (
            f"{scenario.quota_requests} requests / {WINDOW:g}s"
            if scenario.quota_tokens is None
            else f"{scenario.quota_tokens} tokens / {WINDOW:g}s"
        )
        for label, make_caller, goodput_target, limited_target in (
            ("ai_guard paced", _ai_guard_caller, 95.0, 1.0),
            ("peer openai-python", _peer_caller, None, None),
        ):
            figures = _run(scenario, make_caller, windows)
            detail = {**figures, "threads": THREADS, "quota": quota}
            rows.append(
                Result(
                    "goodput",
                    f"{label} [{scenario.name}]: goodput",
                    round(figures["goodput_pct"], 2),
                    "% quota",
                    target=goodput_target,
                    detail=detail,
                )
            )
            rows.append(
                Result(
                    "goodput",
                    f"{label} [{scenario.name}]: answered 429",
                    round(figures["rate_limited_pct"], 2),
                    "% reqs",
                    target=limited_target,
                    higher_is_better=False,
                    detail=detail,
                )
            )
    return rows


if __name__ == "__main__":
    for row in results(quick=False):
        print(f"{row.name:<48}{row.value:>8.2f} {row.unit:<8} {row.detail}")
