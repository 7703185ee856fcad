"""Helpers for testing code that uses ai_guard (and ai_guard itself).

- :class:`FakeClock`: time that moves only when told, for breakers, backoff and TTLs.
- :func:`set_testing`: zero every real wait of the system clock, process-wide.
- :class:`FakeUpstream`: an OpenAI-compatible API on loopback (quota, faults, streams).
"""

from __future__ import annotations

from ai_guard.clock import is_testing, set_testing
from ai_guard.testing._clock import FakeClock
from ai_guard.testing._upstream import FakeUpstream, UpstreamRequest
from ai_guard.testing._upstream_behaviour import UpstreamBehaviour

__all__ = [
    "FakeClock",
    "FakeUpstream",
    "UpstreamBehaviour",
    "UpstreamRequest",
    "is_testing",
    "set_testing",
]
