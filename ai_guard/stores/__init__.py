"""Stores: where the guards keep state that outlives one call.

``memory://`` is one process's bounded in-memory store; ``redis://host:port/db`` (or
``rediss://``, ``unix://``) shares state between processes and hosts. Every stateful guard
takes ``store=`` as a :class:`Store` or a URL.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

from ai_guard.clock import SYSTEM_CLOCK, Clock
from ai_guard.config import StoreConfig, build_config
from ai_guard.errors import ConfigError
from ai_guard.stores.base import Script, ScriptOps, Store, StoreValue
from ai_guard.stores.memory import MemoryStore
from ai_guard.stores.redis import RedisStore

__all__ = [
    "MemoryStore",
    "RedisStore",
    "Script",
    "ScriptOps",
    "Store",
    "StoreValue",
    "resolve_store",
    "store_from_url",
]


# Query options that configure the store itself rather than the Redis connection.
_OUR_OPTIONS = frozenset({"key_prefix", "default_ttl", "socket_timeout", "maxsize"})


def store_from_url(url: str = "memory://", *, clock: Clock = SYSTEM_CLOCK, **options: Any) -> Store:
    """Build a store from its URL.

    - ``memory://`` : :class:`MemoryStore`; query options ``maxsize`` and ``default_ttl``
      (``memory://?maxsize=10000``).
    - ``redis://[:password@]host:port/db``, ``rediss://...``, ``unix:///path?db=0`` :
      :class:`RedisStore`; options ``key_prefix``, ``default_ttl``, ``socket_timeout``.

    Keyword ``options`` override the query string. An unknown scheme or a bad option raises
    :class:`~ai_guard.errors.ConfigError` naming it::

        store = store_from_url("redis://127.0.0.1:6379/0", key_prefix="myapp:")
    """
    if not isinstance(url, str):
        raise ConfigError("store_url", url, "must be a URL string such as 'memory://'")
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme == "memory":
        merged: dict[str, Any] = {**query, **options}
        config = build_config(StoreConfig, url=url, **merged)
        return MemoryStore(
            maxsize=config.maxsize, default_ttl=config.default_ttl, clock=clock, url=url
        )
    redis_options = {k: v for k, v in query.items() if k in _OUR_OPTIONS}
    config = build_config(StoreConfig, url=url, **{**redis_options, **options})
    # Our own options must not reach redis-py, which would pass them to its connections.
    kept = [
        (k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in _OUR_OPTIONS
    ]
    return RedisStore(
        urlunsplit(parts._replace(query=urlencode(kept))),
        key_prefix=config.key_prefix,
        default_ttl=config.default_ttl,
        socket_timeout=config.socket_timeout,
    )


def resolve_store(store: Store | str | None, *, clock: Clock = SYSTEM_CLOCK) -> Store:
    """``store=`` as the guards accept it: a :class:`Store`, a URL, or ``None`` for a new
    in-memory store."""
    if store is None:
        return MemoryStore(clock=clock)
    if isinstance(store, str):
        return store_from_url(store, clock=clock)
    if isinstance(store, Store):
        return store
    raise ConfigError("store", store, "must be a Store, a store URL, or None")
