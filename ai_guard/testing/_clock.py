"""A clock whose time only moves when told to."""

from __future__ import annotations

import threading

__all__ = ["FakeClock"]


class FakeClock:
    """A :class:`~ai_guard.clock.Clock` for tests: ``sleep`` advances time instead of
    waiting, so a 30 s breaker timeout or a 24 h TTL takes microseconds to test.

    ``sleeps`` records every requested sleep (tenacity-style), so a test can assert the
    backoff schedule. Thread-safe: many threads may sleep and read at once.

    Example::

        clock = FakeClock()
        breaker = CircuitBreaker("openai", timeout=30, clock=clock)
        ...
        clock.advance(30)          # the breaker is now half-open
    """

    def __init__(self, start: float = 1_000.0, *, wall_start: float = 1_700_000_000.0) -> None:
        self._lock = threading.Lock()
        self._monotonic = float(start)
        self._wall_offset = float(wall_start) - float(start)
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self._monotonic

    def time(self) -> float:
        return self._monotonic + self._wall_offset

    def sleep(self, seconds: float) -> None:
        seconds = max(0.0, float(seconds))
        with self._lock:
            self.sleeps.append(seconds)
            self._monotonic += seconds

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` without recording a sleep."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        with self._lock:
            self._monotonic += seconds

    @property
    def total_slept(self) -> float:
        with self._lock:
            return sum(self.sleeps)

    def __repr__(self) -> str:
        return f"FakeClock(monotonic={self._monotonic:.6f})"
