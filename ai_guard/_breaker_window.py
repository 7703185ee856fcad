"""The breaker's counting machinery: a lock-free tally and a time-bucketed sliding window.

Private to :mod:`ai_guard.breaker`. Two ideas keep the closed-state hot path cheap:

- Successes are counted with ``next()`` on an :func:`itertools.count`: one C call, atomic
  under the GIL, no lock and no allocation for counts below 2**62 (the value returned is
  discarded). Reading such a counter also goes through ``next()``, so reads are counted
  and subtracted (:class:`Tally`).
- The window (Resilience4j's time-based sliding window) is a ring of ``buckets + 1``
  buckets of ``window / buckets`` seconds each. Failures are rare, so they are added to
  their bucket under the breaker's lock. Successes are not counted per bucket at all:
  each bucket remembers the success tally at the moment it became current, so "successes
  in the window" is the tally now minus the value remembered by the oldest bucket. The
  hot path only compares the clock with the end of the current bucket, and takes the lock
  once per bucket to roll the ring forward.

Granularity: an outcome stays in the window for at least ``window`` seconds and at most
``window + window / buckets`` seconds (the current, partial bucket plus ``buckets`` full
ones). A success that completes while another thread rolls the ring may be attributed to
the neighbouring bucket; totals are always exact.
"""

from __future__ import annotations

import itertools

__all__ = ["SlidingWindow", "Tally"]


class Tally:
    """A counter that many threads increment without a lock.

    Increment with ``next(tally.counter)`` (the hot path binds ``counter`` once);
    read with :meth:`value` while holding the owner's lock, since reads advance the
    underlying counter too and must not race each other.
    """

    __slots__ = ("_reads", "counter")

    def __init__(self) -> None:
        self.counter = itertools.count()
        self._reads = 0

    def value(self) -> int:
        """How many times ``next(counter)`` was called by incrementers. Caller holds the lock."""
        # next() returns increments + earlier reads; this read is then counted as well.
        current = next(self.counter) - self._reads
        self._reads += 1
        return current


class SlidingWindow:
    """Failures, slow calls and successes over the last ``window`` seconds.

    Not thread-safe by itself: every method is called with the breaker's lock held.
    ``successes_now`` arguments are the breaker's success :class:`Tally` value.
    """

    __slots__ = (
        "_bases",
        "_failures",
        "_slow",
        "failures",
        "granularity",
        "head",
        "size",
        "slow",
    )

    def __init__(self, window: float, buckets: int) -> None:
        self.granularity = window / buckets
        self.size = buckets + 1
        self.head = 0  # absolute index of the current bucket
        self.failures = 0  # running sums over the ring
        self.slow = 0
        self._failures = [0] * self.size
        self._slow = [0] * self.size
        self._bases = [0] * self.size  # success tally when each bucket became current

    def bucket_of(self, now: float) -> int:
        return int(now // self.granularity)

    def bucket_end(self) -> float:
        """When the current bucket ends (on the breaker's monotonic clock)."""
        return (self.head + 1) * self.granularity

    def reset(self, now: float, successes_now: int) -> None:
        """Forget everything: the window starts empty at ``now``."""
        self.head = self.bucket_of(now)
        self.failures = 0
        self.slow = 0
        size = self.size
        self._failures = [0] * size
        self._slow = [0] * size
        self._bases = [successes_now] * size

    def advance(self, now: float, successes_now: int) -> None:
        """Make the bucket of ``now`` current, dropping the buckets that leave the window."""
        target = self.bucket_of(now)
        head = self.head
        if target <= head:
            return  # another thread already rolled the ring past this time
        if target - head >= self.size:
            self.reset(now, successes_now)
            return
        failures, slow, bases, size = self._failures, self._slow, self._bases, self.size
        for index in range(head + 1, target + 1):
            slot = index % size
            self.failures -= failures[slot]
            self.slow -= slow[slot]
            failures[slot] = 0
            slow[slot] = 0
            bases[slot] = successes_now
        self.head = target

    def add_failure(self, slow: bool) -> None:
        """Count one failure in the current bucket (call :meth:`advance` first)."""
        slot = self.head % self.size
        self._failures[slot] += 1
        self.failures += 1
        if slow:
            self._slow[slot] += 1
            self.slow += 1

    def successes(self, successes_now: int) -> int:
        """Successes inside the window (call :meth:`advance` first)."""
        return successes_now - self._bases[(self.head + 1) % self.size]
