"""Helpers for testing code that uses ai_guard (and ai_guard itself).

- :class:`FakeClock`: time that moves only when told, for breakers, backoff and TTLs.
- :func:`set_testing`: zero every real wait of the system clock, process-wide.
"""

from __future__ import annotations

from ai_guard.clock import is_testing, set_testing
from ai_guard.testing._clock import FakeClock

__all__ = ["FakeClock", "is_testing", "set_testing"]
