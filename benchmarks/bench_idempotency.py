"""Idempotency on the memory store, beside the do-it-yourself baseline.

Group ``idempotency``: one new key's claim + completion + the read a replay does, with the
functions ``@idempotent`` itself calls (``new_claim``, ``try_claim``, ``complete``,
``lookup_payload``: the stored result when its record is the completed one with this
call's fingerprint and serializer), against a ``cachetools.TTLCache`` set + get under a
``threading.Lock`` (what a user writes by hand, without claims, expiry per key or
exactly-once). Target: at most half its cost. Both stores are bounded at 100,000 keys and
filled to that bound before they are measured, so every round measures the steady state
with eviction. ``claim+complete+lookup`` is the same with ``lookup`` (the record parsed
into a :class:`~ai_guard.idempotency.Record`) as the last step: reported, no target.

Group ``idempotency-decorated``: the whole ``@idempotent(key=...)`` call on a new key
(claim, run, serialize, complete) and on a replayed key (claim attempt, read,
deserialize), over the undecorated function. Reported, no target; checked exactly: every
new key ran the function once, the replayed key never ran it again.

Both groups from 1 thread and from 8 (one store shared by the threads).
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
    lookup_payload,
    new_claim,
    try_claim,
)
from ai_guard.stores import MemoryStore
from benchmarks._harness import CallCounter, Case

MAXSIZE = 100_000
RESULT = {"order": 42, "status": "created"}
PAYLOAD = b'{"order":42,"status":"created"}'


def _check_bounded(size: int) -> None:
    """The store holds exactly its bound: full, and not a key more."""
    if size != MAXSIZE:
        raise AssertionError(f"{size} keys stored, the bound is {MAXSIZE}")


def cases() -> list[Case]:
    keys = itertools.count()
    header = done_record(b"-", "json", b"")
    record = header + PAYLOAD
    store = MemoryStore(maxsize=MAXSIZE)
    parsed_store = MemoryStore(maxsize=MAXSIZE)

    def fill(target: MemoryStore) -> None:
        for _ in range(MAXSIZE):
            target.set(f"fill{next(keys)}", record)

    def bare() -> str:
        return f"k{next(keys)}"

    # Calls that did not claim their new key, complete it or read it back: none may.
    failed = CallCounter(expected=lambda calls: 0)
    fail = failed.tick

    def ours() -> None:
        key = f"k{next(keys)}"
        claim = new_claim()
        if (
            try_claim(store, key, claim, 60.0) is not None
            or not complete(store, key, claim, record, 86400.0)
            or lookup_payload(store, key, header) is None
        ):
            fail()

    def ours_parsed() -> None:
        key = f"k{next(keys)}"
        claim = new_claim()
        try_claim(parsed_store, key, claim, 60.0)
        complete(parsed_store, key, claim, record, 86400.0)
        lookup(parsed_store, key)

    def setup_ours() -> None:
        failed.setup()
        fill(store)

    def check_ours(calls: int) -> None:
        failed.check(calls)
        _check_bounded(len(store))
        key = f"k{next(keys)}"
        claim = new_claim()
        if try_claim(store, key, claim, 60.0) is not None:
            raise AssertionError("a new key was not claimed")
        if not complete(store, key, claim, record, 86400.0):
            raise AssertionError("our own claim was not completed")
        if lookup_payload(store, key, header) != PAYLOAD:
            raise AssertionError("the stored result was not read back")

    cache: TTLCache[str, bytes] = TTLCache(maxsize=MAXSIZE, ttl=86400)
    lock = threading.Lock()

    def fill_cache() -> None:
        for _ in range(MAXSIZE):
            cache[f"fill{next(keys)}"] = record

    def ttlcache_set_get() -> None:
        key = f"k{next(keys)}"
        with lock:
            cache[key] = record
        with lock:
            cache.get(key)

    decorated_keys = itertools.count()
    # Every new key runs the function exactly once; the replayed key never runs it again.
    runs_new, runs_replayed = CallCounter(), CallCounter(expected=lambda calls: 0)

    def create_order(key: str) -> dict[str, Any]:
        return RESULT

    def create_new(key: str) -> dict[str, Any]:
        runs_new.tick()
        return RESULT

    def create_replayed(key: str) -> dict[str, Any]:
        runs_replayed.tick()
        return RESULT

    guarded_new = idempotent(MemoryStore(maxsize=MAXSIZE), key=lambda key: key)(create_new)
    guarded_replayed = idempotent(MemoryStore(maxsize=MAXSIZE), key=lambda key: key)(
        create_replayed
    )
    guarded_replayed("replayed")

    def bare_call() -> None:
        create_order(f"o{next(decorated_keys)}")

    def new_key() -> None:
        guarded_new(f"o{next(decorated_keys)}")

    def replayed_key() -> None:
        _unused = f"o{next(decorated_keys)}"  # the key-making work the other cases do
        guarded_replayed("replayed")

    out: list[Case] = []
    for threads in (1, 8):
        out += [
            Case("idempotency", "bare", bare, threads=threads),
            Case(
                "idempotency",
                "claim+complete+replay read",
                ours,
                anchor="ttlcache_set_get",
                target=0.5,
                threads=threads,
                setup=setup_ours,
                check=check_ours,
            ),
            Case(
                "idempotency",
                "ttlcache_set_get",
                ttlcache_set_get,
                threads=threads,
                setup=fill_cache,
                check=lambda calls: _check_bounded(len(cache)),
            ),
            Case("idempotency-decorated", "bare", bare_call, threads=threads),
            Case(
                "idempotency-decorated",
                "new_key",
                new_key,
                threads=threads,
                setup=runs_new.setup,
                check=runs_new.check,
            ),
            Case(
                "idempotency-decorated",
                "replayed_key",
                replayed_key,
                threads=threads,
                setup=runs_replayed.setup,
                check=runs_replayed.check,
            ),
        ]
        if threads == 1:
            out.insert(
                -4,
                Case(
                    "idempotency",
                    "claim+complete+lookup",
                    ours_parsed,
                    anchor="ttlcache_set_get",
                    setup=lambda: fill(parsed_store),
                    check=lambda calls: _check_bounded(len(parsed_store)),
                ),
            )
    return out
