"""In-process store: a bounded, thread-safe dict with per-key TTLs.

Why not ``cachetools.TTLCache``: it keeps one TTL for the whole cache (we need one per
key: an in-flight claim lives seconds, a stored response a day) and its Python-level
bookkeeping costs about three times a dict under a lock (measured in
``benchmarks/bench_idempotency.py``). Here an ``OrderedDict`` (C-implemented) holds
``key -> (value, expires_at)`` in write order; expiry is checked on read, and a new key
beyond ``maxsize`` evicts the least recently written one (which is also the first to
expire among keys written with the same TTL). Memory is therefore bounded by ``maxsize``
whatever the key flood, and a key written a moment ago (an in-flight claim) is the last
to go.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TypeVar

from ai_guard.clock import SYSTEM_CLOCK, Clock
from ai_guard.errors import ConfigError
from ai_guard.stores.base import Script, Store, StoreValue, script_arg

__all__ = ["MemoryStore"]

T = TypeVar("T")

#: With the GIL (every CPython but a free-threaded build, PEP 703) one operation on a dict
#: is atomic, which the store relies on twice: ``get`` reads a live item without a lock,
#: and the keys are spread over :data:`LOCK_STRIPES` locks, so threads working on
#: different keys never queue behind each other. A free-threaded build takes one lock
#: around every operation, reads included.
_GIL: bool = getattr(sys, "_is_gil_enabled", lambda: True)()
_LOCK_FREE_READS: bool = _GIL
#: Locks a store's keys are spread over (a power of two).
LOCK_STRIPES: int = 16 if _GIL else 1


class MemoryStore(Store):
    """The embedded default store (``memory://``), for one process.

    ``maxsize`` bounds the number of keys (default 100,000); ``default_ttl`` is the TTL of a
    key written without one (24 h). ``clock`` is injectable so TTL tests run on
    :class:`~ai_guard.testing.FakeClock`.

    Thread-safe: every operation on one key is atomic (a lock per stripe of keys; reads
    of a live key take none), a script holds the locks of all its keys.

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
        # Checked by type as well as value: a float("nan") maxsize or TTL compares False
        # with everything, which would make the store unbounded or its keys immortal.
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize <= 0:
            raise ConfigError("maxsize", maxsize, "must be a whole number greater than 0")
        if (
            isinstance(default_ttl, bool)
            or not isinstance(default_ttl, int | float)
            or not default_ttl > 0
        ):
            raise ConfigError("default_ttl", default_ttl, "must be seconds greater than 0")
        if not isinstance(clock, Clock):
            raise ConfigError("clock", clock, "must be a Clock (monotonic, time, sleep)")
        self.url = url
        self.maxsize = maxsize
        self.default_ttl = float(default_ttl)
        self._clock = clock
        self._now = clock.monotonic
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._locks = tuple(threading.Lock() for _ in range(LOCK_STRIPES))
        self._stripe_mask = LOCK_STRIPES - 1
        self._ops = _LockedOps(self)

    # -- primitives, called with the key's lock held -------------------------------------
    # Another stripe's write may evict any key at any moment (the oldest goes when a new
    # key comes in beyond maxsize): so a key is removed with pop(key, None), never del,
    # and moved with move_to_end inside try. The public methods below inline these on the
    # hot path (one clock read, no extra calls).

    def _get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= self._now():
            self._data.pop(key, None)
            return None
        return item[0]

    def _set(self, key: str, value: bytes, ttl: float | None) -> None:
        data = self._data
        existed = key in data
        data[key] = (value, self._now() + (self.default_ttl if ttl is None else ttl))
        if existed:
            _move_to_end(data, key)
        else:
            self._evict()

    def _evict(self) -> None:
        """Drop the oldest key while the store is over ``maxsize`` (another stripe may be
        evicting at the same moment: whoever finds nothing left to drop stops)."""
        data = self._data
        while len(data) > self.maxsize:
            try:
                data.popitem(False)
            except KeyError:
                return

    def _delete(self, key: str) -> bool:
        item = self._data.pop(key, None)
        return item is not None and item[1] > self._now()

    def _ttl(self, key: str) -> float | None:
        item = self._data.get(key)
        if item is None:
            return None
        remaining = item[1] - self._now()
        if remaining <= 0:
            self._data.pop(key, None)
            return None
        return remaining

    # -- the Store interface --------------------------------------------------------------
    # The hot operations take the lock with acquire()/release() rather than ``with`` (one
    # call less each) and evict with popitem(False) rather than popitem(last=False) (a
    # keyword argument takes CPython's slow argument parsing): each is measurable when a
    # whole operation costs a few hundred ns. The clock is read before the lock: the
    # critical section (what other threads on the stripe queue behind) stays a few dict
    # operations.

    def get(self, key: str) -> bytes | None:
        if _LOCK_FREE_READS:
            # One dict lookup is atomic and an item is an immutable tuple: a live value
            # is returned without a lock (a replay's read, from every thread at once,
            # does not queue behind the writers). An expired or missing item takes the
            # locked path, which deletes it.
            item = self._data.get(key)
            if item is None:
                return None
            if item[1] > self._now():
                return item[0]
        with self._locks[hash(key) & self._stripe_mask]:
            return self._get(key)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        with self._locks[hash(key) & self._stripe_mask]:
            self._set(key, value, ttl)

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        return self.add_or_get(key, value, ttl) is None

    def add_or_get(self, key: str, value: bytes, ttl: float | None = None) -> bytes | None:
        """Store ``value`` only when ``key`` does not exist, atomically, and return
        ``None``; when it exists, store nothing and return its current value (Redis
        ``SET NX GET``). The idempotency guard's claim: one locked operation claims a key
        or reads what holds it."""
        now = self._now()
        expires_at = now + (self.default_ttl if ttl is None else ttl)
        lock = self._locks[hash(key) & self._stripe_mask]
        lock.acquire()
        try:
            data = self._data
            item = data.get(key)
            if item is not None:
                if item[1] > now:
                    return item[0]
                data.pop(key, None)  # expired: the key is free, and goes to the young end
            data[key] = (value, expires_at)
            if len(data) > self.maxsize:
                self._evict()
            return None
        finally:
            lock.release()

    def delete(self, key: str) -> bool:
        with self._locks[hash(key) & self._stripe_mask]:
            return self._delete(key)

    def compare_and_set(
        self, key: str, expected: bytes | None, value: bytes, ttl: float | None = None
    ) -> bool:
        now = self._now()
        expires_at = now + (self.default_ttl if ttl is None else ttl)
        lock = self._locks[hash(key) & self._stripe_mask]
        lock.acquire()
        try:
            data = self._data
            item = data.get(key)
            if item is not None and item[1] > now:
                if item[0] != expected:
                    return False
                data[key] = (value, expires_at)
                _move_to_end(data, key)  # a write makes the key young again
                return True
            if expected is not None:
                return False
            if item is not None:
                data.pop(key, None)  # expired: replaced, at the young end
            data[key] = (value, expires_at)
            if len(data) > self.maxsize:
                self._evict()
            return True
        finally:
            lock.release()

    def compare_and_delete(self, key: str, expected: bytes) -> bool:
        with self._locks[hash(key) & self._stripe_mask]:
            item = self._data.get(key)
            if item is None or item[1] <= self._now() or item[0] != expected:
                return False
            self._data.pop(key, None)
            return True

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        with self._locks[hash(key) & self._stripe_mask]:
            item = self._data.get(key)
            if item is None or item[1] <= self._now():
                self._set(key, str(amount).encode(), ttl)
                return amount
            value = int(item[0]) + amount
            # An existing key keeps its expiry, as INCRBY does in Redis.
            self._data[key] = (str(value).encode(), item[1])
            return value

    def ttl(self, key: str) -> float | None:
        with self._locks[hash(key) & self._stripe_mask]:
            return self._ttl(key)

    def run(self, script: Script[T], keys: Sequence[str], args: Sequence[StoreValue] = ()) -> T:
        str_args = [a if type(a) is str else script_arg(a) for a in args]
        keys = keys if type(keys) is list else list(keys)
        if len(keys) == 1:
            with self._locks[hash(keys[0]) & self._stripe_mask]:
                raw = script.python(self._ops, keys, str_args)
        else:
            # Every lock the script's keys need, in one order (no two scripts deadlock);
            # a script with no keys takes them all, as it may touch anything.
            mask = self._stripe_mask
            stripes = sorted({hash(k) & mask for k in keys}) if keys else range(len(self._locks))
            locks = [self._locks[i] for i in stripes]
            for lock in locks:
                lock.acquire()
            try:
                raw = script.python(self._ops, keys, str_args)
            finally:
                for lock in reversed(locks):
                    lock.release()
        return script.decode(raw)

    def ping(self) -> bool:
        return True

    def clear(self) -> None:
        for lock in self._locks:
            lock.acquire()
        try:
            self._data.clear()
        finally:
            for lock in reversed(self._locks):
                lock.release()

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"MemoryStore(maxsize={self.maxsize}, default_ttl={self.default_ttl})"


def _move_to_end(data: OrderedDict[str, tuple[bytes, float]], key: str) -> None:
    """Make ``key`` the youngest; nothing when another stripe evicted it a moment ago."""
    try:
        data.move_to_end(key)
    except KeyError:
        pass


class _LockedOps:
    """The :class:`~ai_guard.stores.base.ScriptOps` a script sees: the store's primitives,
    called while ``MemoryStore.run`` holds the locks of the script's keys."""

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
