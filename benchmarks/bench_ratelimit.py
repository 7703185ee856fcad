"""``@rate_limited`` on the success path (the function returns at once, no 429) beside
tenacity's ``@retry`` and stamina's ``@retry`` configured for the same job (6 attempts,
randomised exponential backoff, retry on the rate-limit error).

Target: our overhead <= 0.05 x tenacity's, from 1 thread and from 8. Each case counts the
calls reaching its function: exactly one per call made. The ``ai_guard+budget`` case adds proactive
pacing on a memory-store budget (one reserve and one release per call); it has no target
and is reported for what it costs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import stamina
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from ai_guard.errors import RateLimitExceeded
from ai_guard.pacing import RateLimitBudget
from ai_guard.ratelimit import rate_limited
from ai_guard.stores import MemoryStore
from benchmarks._harness import CallCounter, Case

GROUP = "rate_limited"


def _counted_answer() -> tuple[Callable[[], int], CallCounter]:
    """A function that returns at once, and the exact count of the calls reaching it."""
    counter = CallCounter()
    tick = counter.tick

    def answer() -> int:
        tick()
        return 42

    return answer, counter


def _case(
    name: str,
    decorate: Callable[[Callable[[], int]], Callable[[], int]],
    threads: int,
    **options: Any,
) -> Case:
    answer, counter = _counted_answer()
    return Case(
        GROUP,
        name,
        decorate(answer),
        threads=threads,
        setup=counter.setup,
        check=counter.check,  # every call ran the function exactly once: no retry, no loss
        **options,
    )


def cases() -> list[Case]:
    budget = RateLimitBudget(MemoryStore(), key="bench")
    # A known, generous window: the budget does its full reserve/release arithmetic.
    budget.observe(
        {
            "x-ratelimit-limit-requests": "1000000000",
            "x-ratelimit-remaining-requests": "1000000000",
            "x-ratelimit-reset-requests": "1h",
        }
    )
    tenacity_retry = retry(
        stop=stop_after_attempt(6),
        wait=wait_random_exponential(multiplier=0.5, max=60),
        retry=retry_if_exception_type(RateLimitExceeded),
        reraise=True,
    )
    stamina_retry = stamina.retry(on=RateLimitExceeded, attempts=6)
    out: list[Case] = []
    for threads in (1, 8):
        out += [
            _case("bare", lambda fn: fn, threads),
            _case(
                "ai_guard",
                rate_limited(max_retries=5),
                threads,
                anchor="tenacity",
                target=0.05,
            ),
            _case("tenacity", tenacity_retry, threads),
            _case("stamina", stamina_retry, threads, anchor="tenacity"),
            _case(
                "ai_guard+budget",
                rate_limited(max_retries=5, budget=budget),
                threads,
                anchor="tenacity",
            ),
        ]
    return out
