"""Time as an injectable dependency.

Every time-dependent part of ai_guard (breaker windows and timeouts, backoff sleeps, TTLs,
metric windows) asks a :class:`Clock` for the time and for sleeps instead of calling the
:mod:`time` module, so tests can run on :class:`ai_guard.testing.FakeClock` and take
milliseconds.

``monotonic()`` is for durations and deadlines inside one process; ``time()`` is wall-clock
seconds since the epoch, for deadlines that other processes must read (values kept in
Redis). The testing switch (:func:`set_testing`), in the spirit of stamina's, turns every
real sleep of :data:`SYSTEM_CLOCK` into a no-op so that test suites exercising retries do
not wait.
"""

from __future__ import annotations

import time as _time
from typing import Protocol, runtime_checkable

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock", "is_testing", "set_testing"]


@runtime_checkable
class Clock(Protocol):
    """What ai_guard needs from time: a monotonic reading, a wall-clock reading, a sleep."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes backwards."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch (shared between processes and hosts)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for ``seconds`` (negative values sleep zero)."""
        ...


class _TestingSwitch:
    # A tiny object rather than a bare module global so that the flag is a registry-like
    # singleton with one documented writer (set_testing).
    __slots__ = ("enabled",)

    def __init__(self) -> None:
        self.enabled = False


_TESTING = _TestingSwitch()


def set_testing(enabled: bool = True) -> None:
    """Turn the testing mode on or off, process-wide.

    In testing mode the system clock's ``sleep`` returns at once: retries and backoff still
    happen (and are counted), but no real time is spent waiting. Meant for the test suites
    of applications that use ai_guard::

        # conftest.py
        import ai_guard.testing
        ai_guard.testing.set_testing(True)
    """
    _TESTING.enabled = bool(enabled)


def is_testing() -> bool:
    """Whether :func:`set_testing` turned the testing mode on."""
    return _TESTING.enabled


class SystemClock:
    """The real clock: :func:`time.monotonic`, :func:`time.time` and :func:`time.sleep`.

    Honors the testing switch: with :func:`set_testing` on, ``sleep`` does not wait.
    """

    __slots__ = ()

    # Bound straight to the C functions: the hot path pays one attribute lookup, no frame.
    monotonic = staticmethod(_time.monotonic)
    time = staticmethod(_time.time)

    def sleep(self, seconds: float) -> None:
        if _TESTING.enabled or seconds <= 0:
            return
        _time.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK: Clock = SystemClock()
"""The process-wide real clock; the default of every ``clock=`` parameter."""
