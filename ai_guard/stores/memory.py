"""In-process store: a bounded, thread-safe dict with per-key TTLs.

Why not ``cachetools.TTLCache``: it keeps one TTL for the whole cache (we need one per
key: an in-flight claim lives seconds, a stored response a day) and its Python-level
bookkeeping costs about three times a dict under a lock (measured in
``benchmarks/bench_idempotency.py``). Here an ``OrderedDict`` (C-implemented) holds
``key -> (value, expires_at)``; expiry is checked on read, and a write beyond ``maxsize``
first drops expired keys from the oldest end, then the least recently written key. Memory
is therefore bounded by ``maxsize`` whatever the key flood.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TypeVar

from ai_guard.clock import SYSTEM_CLOCK, Clock
from ai_guard.errors import ConfigError
from ai_guard.stores.base import Script, Store, StoreValue, script_arg

__all__ = ["MemoryStore"]

T = TypeVar("T")

# How many entries from the oldest end one overflowing write inspects for expiry before it
# evicts by age. Bounded so a write never scans the whole store.
_EXPIRY_SCAN = 8


class MemoryStore(Store):
    """The embedded default store (``memory://``), for one process.

    ``maxsize`` bounds the number of keys (default 100,000); ``default_ttl`` is the TTL of a
    key written without one (24 h). ``clock`` is injectable so TTL tests run on
    :class:`~ai_guard.testing.FakeClock`.

    Example::

        store = MemoryStore(maxsize=10_000)
        assert store.add("job:42", b"running", ttl=30)
        assert not store.add("job:42", b"running", ttl=30)   # someone holds it
    """

    def __init__(
        self,
        *,
        maxsize: int = 100_000,
        default_ttl: float = 86400.0,
        clock: Clock = SYSTEM_CLOCK,
        url: str = "memory://",
    ) -> None:
        if maxsize <= 0:
            raise ConfigError("maxsize", maxsize, "must be greater than 0")
        if default_ttl <= 0:
            raise ConfigError("default_ttl", default_ttl, "must be greater than 0")
        self.url = url
        self.maxsize = maxsize
        self.default_ttl = float(default_ttl)
        self._clock = clock
        self._now = clock.monotonic
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._lock = threading.Lock()

    # -- primitives, called with the lock held -------------------------------------------

    def _get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= self._now():
            del self._data[key]
            return None
        return item[0]

    def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        data = self._data
        data[key] = (value, self._now() + (self.default_ttl if ttl is None else ttl))
        data.move_to_end(key)
        if len(data) > self.maxsize:
            self._evict()

    def _evict(self) -> None:
        data = self._data
        now = self._now()
        # Drop expired entries near the old end first; fall back to the oldest write.
        for _ in range(_EXPIRY_SCAN):
            oldest_key, (_, expires_at) = next(iter(data.items()))
            if expires_at > now or len(data) <= self.maxsize:
                break
            del data[oldest_key]
        while len(data) > self.maxsize:
            data.popitem(last=False)

    def _delete(self, key: str) -> bool:
        item = self._data.pop(key, None)
        return item is not None and item[1] > self._now()

    def _ttl(self, key: str) -> float | None:
        item = self._data.get(key)
        if item is None:
            return None
        remaining = item[1] - self._now()
        if remaining <= 0:
            del self._data[key]
            return None
        return remaining

    # -- the Store interface --------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._get(key)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        with self._lock:
            self._set(key, value, ttl)

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        with self._lock:
            if self._get(key) is not None:
                return False
            self._set(key, value, ttl)
            return True

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._delete(key)

    def compare_and_set(
        self, key: str, expected: bytes | None, value: bytes, ttl: float | None = None
    ) -> bool:
        with self._lock:
            if self._get(key) != expected:
                return False
            self._set(key, value, ttl)
            return True

    def compare_and_delete(self, key: str, expected: bytes) -> bool:
        with self._lock:
            if self._get(key) != expected:
                return False
            del self._data[key]
            return True

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        with self._lock:
            item = self._data.get(key)
            if item is None or item[1] <= self._now():
                self._set(key, str(amount).encode(), ttl)
                return amount
            value = int(item[0]) + amount
            # An existing key keeps its expiry, as INCRBY does in Redis.
            self._data[key] = (str(value).encode(), item[1])
            return value

    def ttl(self, key: str) -> float | None:
        with self._lock:
            return self._ttl(key)

    def run(self, script: Script[T], keys: Sequence[str], args: Sequence[StoreValue] = ()) -> T:
        str_args = [script_arg(a) for a in args]
        with self._lock:
            raw = script.python(_LockedOps(self), list(keys), str_args)
        return script.decode(raw)

    def ping(self) -> bool:
        return True

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __repr__(self) -> str:
        return f"MemoryStore(maxsize={self.maxsize}, default_ttl={self.default_ttl})"


class _LockedOps:
    """The :class:`~ai_guard.stores.base.ScriptOps` a script sees: the store's primitives,
    called while ``MemoryStore.run`` holds the lock."""

    __slots__ = ("_store",)

    def __init__(self, store: MemoryStore) -> None:
        self._store = store

    def get(self, key: str) -> bytes | None:
        return self._store._get(key)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self._store._set(key, value, ttl)

    def delete(self, key: str) -> bool:
        return self._store._delete(key)

    def ttl(self, key: str) -> float | None:
        return self._store._ttl(key)
