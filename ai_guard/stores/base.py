"""The store interface every stateful guard uses.

A store is a key/value space of ``bytes`` with per-key TTLs and a handful of atomic
operations. Two backends implement it: :class:`~ai_guard.stores.memory.MemoryStore` (one
process) and :class:`~ai_guard.stores.redis.RedisStore` (many processes and hosts). Pick
one by URL with :func:`ai_guard.store_from_url`.

Guards that need an atomic operation of their own (a breaker's open-state transition, a
rate-limit budget reservation) describe it as a :class:`Script`: the same operation once in
Lua, run by Redis atomically, and once in Python, run by the memory store under its lock.
Both receive the keys with the store's prefix applied and the arguments as strings, and
return what Redis would return to redis-py (``int``, ``bytes``, ``None``, lists of those);
``Script.decode`` then turns that into the guard's own type. The shared store test suite
runs each script on both backends, so the two implementations cannot drift apart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Script", "ScriptOps", "Store", "StoreValue"]

T = TypeVar("T")
#: Arguments passed to a script; numbers are passed as their ``repr`` strings.
StoreValue = str | bytes | int | float


class ScriptOps(Protocol):
    """What the Python side of a :class:`Script` may do: the store's primitive operations,
    run while the memory store holds the locks of the script's keys (so the script is
    atomic). As in Redis, a script touches only the keys it is given."""

    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None: ...

    def delete(self, key: str) -> bool: ...

    def ttl(self, key: str) -> float | None: ...


def _identity(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Script(Generic[T]):
    """An atomic operation over some keys, implemented once per backend.

        ``lua`` runs in Redis with ``KEYS`` and ``ARGV``; ``python(ops, keys, args)`` runs in
        the memory store under its lock. Both must return the same raw value (as redis-py
        would give it: ``int``, ``bytes``, ``None`` or a list of those); ``decode`` maps that
        raw value to the result type. Like a Redis script, the Python side reads and writes only
    the keys it is given: the memory store locks those.

        Example: a "set if greater" over one key::

            SET_IF_GREATER = Script(
                name="set_if_greater",
                lua=(
                    "local cur = tonumber(redis.call('GET', KEYS[1]) or '-inf') "
                    "if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) "
                    "return 1 end return 0"
                ),
                python=_set_if_greater,
            )
    """

    name: str
    lua: str
    python: Callable[[ScriptOps, list[str], list[str]], Any]
    decode: Callable[[Any], T] = field(default=_identity)


class Store(ABC):
    """A key/value store with TTLs and atomic operations.

    Keys are ``str`` (the store adds its prefix), values are ``bytes``. ``ttl`` is in
    seconds; ``None`` means the store's ``default_ttl`` (24 h unless configured): every key
    expires eventually, so no guard can leak keys. All methods are thread-safe. A backend
    that cannot be reached raises :class:`~ai_guard.errors.StoreUnavailableError`.
    """

    #: The URL this store was made from (credentials removed).
    url: str
    default_ttl: float

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value of ``key``, or ``None`` when missing or expired."""

    @abstractmethod
    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds, replacing any value."""

    @abstractmethod
    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        """Store ``value`` only when ``key`` does not exist (Redis ``SET NX``).

        Returns ``True`` for the one caller that created the key: this is the atomic
        "claim" the idempotency guard builds on.
        """

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; ``True`` when it existed."""

    @abstractmethod
    def compare_and_set(
        self, key: str, expected: bytes | None, value: bytes, ttl: float | None = None
    ) -> bool:
        """Set ``key`` to ``value`` only if its current value is ``expected``
        (``None``: only if missing). ``True`` when the swap happened."""

    @abstractmethod
    def compare_and_delete(self, key: str, expected: bytes) -> bool:
        """Delete ``key`` only if its current value is ``expected`` (release a claim that
        is still ours)."""

    @abstractmethod
    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add ``amount`` to the integer at ``key`` (missing counts as 0) and return the new
        value. ``ttl`` applies when the key is created; an existing key keeps its expiry."""

    @abstractmethod
    def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires, or ``None`` when it does not exist."""

    @abstractmethod
    def run(self, script: Script[T], keys: Sequence[str], args: Sequence[StoreValue] = ()) -> T:
        """Run ``script`` atomically over ``keys`` (prefixed by the store) with ``args``."""

    @abstractmethod
    def ping(self) -> bool:
        """``True`` when the backend answers."""

    @abstractmethod
    def clear(self) -> None:
        """Remove every key of this store (only keys under its prefix, for Redis)."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections. The store is unusable afterwards."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def script_arg(value: StoreValue) -> str:
    """How an argument reaches a script: exactly as Redis would see it, as a string."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, float):
        return repr(value)
    return str(value)
