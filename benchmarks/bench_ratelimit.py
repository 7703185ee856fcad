"""``@rate_limited`` on the success path (the function returns at once, no 429) beside
tenacity's ``@retry`` and stamina's ``@retry`` configured for the same job (6 attempts,
randomised exponential backoff, retry on the rate-limit error).

Target: our overhead <= 0.05 x tenacity's. The ``ai_guard+budget`` case adds proactive
pacing on a memory-store budget (one reserve and one release per call); it has no target
and is reported for what it costs.
"""

from __future__ import annotations

import stamina
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from ai_guard.errors import RateLimitExceeded
from ai_guard.pacing import RateLimitBudget
from ai_guard.ratelimit import rate_limited
from ai_guard.stores import MemoryStore
from benchmarks._harness import Case

GROUP = "rate_limited"


def _answer() -> int:
    return 42


def cases() -> list[Case]:
    ours = rate_limited(max_retries=5)(_answer)
    budget = RateLimitBudget(MemoryStore(), key="bench")
    # A known, generous window: the budget does its full reserve/release arithmetic.
    budget.observe(
        {
            "x-ratelimit-limit-requests": "1000000000",
            "x-ratelimit-remaining-requests": "1000000000",
            "x-ratelimit-reset-requests": "1h",
        }
    )
    ours_paced = rate_limited(max_retries=5, budget=budget)(_answer)
    tenacity_retry = retry(
        stop=stop_after_attempt(6),
        wait=wait_random_exponential(multiplier=0.5, max=60),
        retry=retry_if_exception_type(RateLimitExceeded),
        reraise=True,
    )(_answer)
    stamina_retry = stamina.retry(on=RateLimitExceeded, attempts=6)(_answer)
    return [
        Case(GROUP, "bare", _answer),
        Case(GROUP, "ai_guard", ours, anchor="tenacity", target=0.05),
        Case(GROUP, "tenacity", tenacity_retry),
        Case(GROUP, "stamina", stamina_retry, anchor="tenacity"),
        Case(GROUP, "ai_guard+budget", ours_paced, anchor="tenacity"),
    ]
