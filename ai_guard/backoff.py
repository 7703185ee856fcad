"""Backoff arithmetic and jitter strategies: pure, small, injectable.

Two kinds of wait come out of a rate-limited call, and jitter treats them differently:

- a *computed* wait (exponential backoff when the server said nothing) is a guess, so the
  jitter may shorten it: :meth:`Jitter.spread` draws from a range below the delay;
- a *server-given* wait (``retry-after``, the reset of an exhausted window) is a floor:
  sending earlier earns another 429, so :meth:`Jitter.extend` only adds a bounded amount on
  top of it.

Strategies, after Marc Brooker's "Exponential Backoff and Jitter" (AWS Architecture Blog,
2015):

- :class:`FullJitter` (the default): ``uniform(0, delay)``;
- :class:`EqualJitter`: ``delay / 2 + uniform(0, delay / 2)``;
- :class:`NoJitter`: the delay itself (for tests and for callers that jitter elsewhere).

Each takes ``rng=`` (a :class:`random.Random`) so tests can fix the draws::

    jitter = FullJitter(rng=random.Random(7))
    compute_rate_limit_sleep({}, attempt=3, jitter=jitter)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from ai_guard.errors import ConfigError

__all__ = [
    "DEFAULT_JITTER",
    "EqualJitter",
    "FullJitter",
    "Jitter",
    "NoJitter",
    "exponential_delay",
    "resolve_jitter",
]

# 2 ** 64 * any sane base delay is far above any cap; beyond it float pow overflows.
_MAX_EXPONENT = 64


def exponential_delay(attempt: int, base_delay: float, max_delay: float) -> float:
    """``base_delay * 2 ** attempt``, capped at ``max_delay`` (attempt 0 is the first
    retry). Never overflows, whatever ``attempt``."""
    if attempt <= 0:
        return min(base_delay, max_delay)
    return min(base_delay * 2.0 ** min(attempt, _MAX_EXPONENT), max_delay)


@runtime_checkable
class Jitter(Protocol):
    """What a jitter strategy does to the two kinds of wait (see the module docstring)."""

    def spread(self, delay: float) -> float:
        """A randomised wait in ``[0, delay]`` for a computed (exponential) delay."""
        ...

    def extend(self, delay: float, ceiling: float) -> float:
        """A randomised wait in ``[delay, max(delay, ceiling)]`` for a server-given delay:
        never shorter than the server asked, at most a bounded amount longer."""
        ...


class _RandomJitter:
    """Shared plumbing: the random source and the bounded extension of server waits."""

    __slots__ = ("_random",)

    #: A server-given wait is lengthened by up to this fraction of itself ...
    EXTEND_FRACTION = 0.1
    #: ... at least this many seconds (so "retry-after: 0" still spreads the herd) ...
    EXTEND_MIN = 0.05
    #: ... and at most this many seconds (a 30 s wait does not grow by 3 s).
    EXTEND_MAX = 1.0

    def __init__(self, rng: random.Random | None = None) -> None:
        # The module-level generator by default: thread-safe, and reseeded in every child
        # after fork (os.register_at_fork), so gunicorn workers do not jitter in lockstep.
        self._random: Callable[[], float] = rng.random if rng is not None else random.random

    def extend(self, delay: float, ceiling: float) -> float:
        room = min(max(delay * self.EXTEND_FRACTION, self.EXTEND_MIN), self.EXTEND_MAX)
        room = min(room, max(0.0, ceiling - delay))
        return delay + room * self._random()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FullJitter(_RandomJitter):
    """``uniform(0, delay)`` for computed waits: the default.

    In Brooker's simulation of clients contending for one resource, full jitter needs the
    fewest calls to get everyone through (the least work for a server that is already
    rationing us) and finishes about as fast as the best alternative; equal jitter does
    more work for no gain. A 429 is exactly that contention, and when the server does say
    how long to wait (the usual case for LLM APIs) that wait is honoured as a floor anyway.
    """

    __slots__ = ()

    def spread(self, delay: float) -> float:
        return delay * self._random()


class EqualJitter(_RandomJitter):
    """``delay / 2 + uniform(0, delay / 2)``: never retries sooner than half the delay.

    Worth it when every attempt is expensive and a near-immediate retry would be wasted.
    """

    __slots__ = ()

    def spread(self, delay: float) -> float:
        half = delay / 2.0
        return half + half * self._random()


class NoJitter:
    """No randomness: computed and server-given waits are used as they are."""

    __slots__ = ()

    def spread(self, delay: float) -> float:
        return delay

    def extend(self, delay: float, ceiling: float) -> float:
        return delay

    def __repr__(self) -> str:
        return "NoJitter()"


DEFAULT_JITTER: Jitter = FullJitter()
"""The jitter ``jitter=True`` means."""

_NO_JITTER: Jitter = NoJitter()


def resolve_jitter(jitter: bool | Jitter) -> Jitter:
    """``jitter=`` as the guards accept it: ``True`` (the default strategy), ``False``
    (none) or a strategy object."""
    if jitter is True:
        return DEFAULT_JITTER
    if jitter is False:
        return _NO_JITTER
    if isinstance(jitter, Jitter):
        return jitter
    raise ConfigError("jitter", jitter, "must be True, False or a jitter strategy (FullJitter())")
