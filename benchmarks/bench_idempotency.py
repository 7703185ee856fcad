"""Idempotency on the memory store, beside the do-it-yourself baseline.

Group ``idempotency``: one new key's claim + completion + the lookup a replay does, with
the functions ``@idempotent`` itself calls (``new_claim``, ``try_claim``, ``complete``,
``lookup``), against a ``cachetools.TTLCache`` set + get under a ``threading.Lock`` (what
a user writes by hand, without claims, expiry per key or exactly-once). Target: at most
half its cost. Both stores are bounded at 100,000 keys, so the runs measure the steady
state with eviction.

Group ``idempotency-decorated``: the whole ``@idempotent(key=...)`` call on a new key
(claim, run, serialize, complete) and on a replayed key (claim attempt, read,
deserialize), over the undecorated function. Reported, no target.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

from cachetools import TTLCache

from ai_guard.idempotency import (
    complete,
    done_record,
    idempotent,
    lookup,
    new_claim,
    try_claim,
)
from ai_guard.stores import MemoryStore
from benchmarks._harness import Case

MAXSIZE = 100_000
RESULT = {"order": 42, "status": "created"}


def cases() -> list[Case]:
    keys = itertools.count()
    store = MemoryStore(maxsize=MAXSIZE)
    record = done_record(b"-", "json", b'{"order":42,"status":"created"}')

    def bare() -> str:
        return f"k{next(keys)}"

    def ours() -> None:
        key = f"k{next(keys)}"
        claim = new_claim()
        try_claim(store, key, claim, 60.0)
        complete(store, key, claim, record, 86400.0)
        lookup(store, key)

    cache: TTLCache[str, bytes] = TTLCache(maxsize=MAXSIZE, ttl=86400)
    lock = threading.Lock()

    def ttlcache_set_get() -> None:
        key = f"k{next(keys)}"
        with lock:
            cache[key] = record
        with lock:
            cache.get(key)

    decorated_keys = itertools.count()

    def create_order(key: str) -> dict[str, Any]:
        return RESULT

    guarded = idempotent(MemoryStore(maxsize=MAXSIZE), key=lambda key: key)(create_order)
    guarded("replayed")

    def bare_call() -> None:
        create_order(f"o{next(decorated_keys)}")

    def new_key() -> None:
        guarded(f"o{next(decorated_keys)}")

    def replayed_key() -> None:
        _unused = f"o{next(decorated_keys)}"  # the key-making work the other cases do
        guarded("replayed")

    return [
        Case("idempotency", "bare", bare),
        Case("idempotency", "claim+complete+lookup", ours, anchor="ttlcache_set_get", target=0.5),
        Case("idempotency", "ttlcache_set_get", ttlcache_set_get),
        Case("idempotency-decorated", "bare", bare_call),
        Case("idempotency-decorated", "new_key", new_key),
        Case("idempotency-decorated", "replayed_key", replayed_key),
    ]
