"""Idempotency: a call with the same key runs exactly once, in one process or many.

``@idempotent`` guards two kinds of callables:

- **Flask views** (no ``key=``): the ``Idempotency-Key`` request header, with the
  semantics of the IETF ``Idempotency-Key`` draft and Stripe's practice (replay, 409 while
  in flight, 422 on a different payload, 400 on a malformed key). See
  :mod:`ai_guard._idempotency_flask`.
- **Plain functions** (``key=`` a callable of the call's arguments, or the name of an
  argument): a second caller with the same key waits for the first and gets its result.

Data flow of one guarded call (both modes)::

    claim = new_claim(fingerprint)                  # "AIG1 P <token> <fp>\\n", unique token
    existing = try_claim(store, key, claim, ttl)    # atomic SET NX + short TTL, or the record
    if existing is None:                            # we own the key
        result = fn(...)                            # a keeper thread refreshes the claim's TTL
        complete(store, key, claim, done_record)    # compare-and-set: only over OUR claim
    elif existing.startswith(done_header):          # the record this call would store
        replay existing[len(done_header):]
    else:
        wait / 409 / 422 from parse_record(existing)

Record format (``bytes``; version 1), one ASCII header line then an optional payload::

    AIG1 P <token> <fingerprint>\\n                 a claim: the call is in flight
    AIG1 D <fingerprint> <codec>\\n<payload>        done: the stored result

``token`` is unique per claim (a per-process random nonce + a counter), so completing or
releasing a claim is a compare-and-set on the exact claim bytes: a worker whose claim
expired can never overwrite the record of the worker that claimed the key after it.
``fingerprint`` is a hex digest of what the request carried (``-`` when none is checked);
``codec`` names the serializer of a function result (``json``, ``pickle``) or ``http.v2``
for a stored HTTP response (a length-framed head, then the body; ``http``, the JSON head
line of earlier releases, is still read). A reader that meets another version raises
:class:`~ai_guard.errors.IdempotencyError` rather than guessing.

A replay compares the stored bytes with the header its own call would have written
(``done_record(fingerprint, codec, b"")``): one prefix comparison covers the format, the
state, the fingerprint and the codec, and the rest is the payload. Anything else (a claim,
another fingerprint or codec) is parsed to find out which answer it gets.

Stores: the claim is ``MemoryStore.add_or_get`` (claim or read, one locked operation) on
the memory store, and one Lua script (claim-or-read, one round trip) on Redis and any
other store.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import importlib
import inspect
import itertools
import json
import logging
import os
import pickle
import random
import re
import secrets
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, Protocol, TypeVar, cast, runtime_checkable

from pydantic import BaseModel, Field

from ai_guard.clock import SYSTEM_CLOCK, Clock
from ai_guard.config import GuardConfig, build_config
from ai_guard.context import current_call
from ai_guard.errors import (
    ConfigError,
    IdempotencyConflictError,
    IdempotencyError,
    IdempotencyKeyError,
    IdempotencyMismatchError,
    IdempotencyTimeoutError,
    NotStorableError,
    StoreError,
)
from ai_guard.stores import MemoryStore, Script, Store, resolve_store

__all__ = [
    "IDEMPOTENCY_HEADER",
    "JSON_SERIALIZER",
    "MAX_KEY_LENGTH",
    "PICKLE_SERIALIZER",
    "REPLAYED_HEADER",
    "IdempotencyConfig",
    "JsonSerializer",
    "PickleSerializer",
    "Record",
    "Serializer",
    "complete",
    "default_store",
    "done_record",
    "generate_idempotency_key",
    "idempotent",
    "lookup",
    "lookup_payload",
    "new_claim",
    "parse_idempotency_key",
    "parse_record",
    "refresh_claims",
    "release",
    "try_claim",
]

P = ParamSpec("P")
R = TypeVar("R")

_log = logging.getLogger("ai_guard.idempotency")

#: The request header a client sends its key in.
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: The response header that marks a replayed response.
REPLAYED_HEADER = "Idempotent-Replayed"
#: Longest key accepted (the IETF draft and Stripe both stop at 255).
MAX_KEY_LENGTH = 255

# -- client side: keys -------------------------------------------------------------------

_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_-]{0,64}")


def generate_idempotency_key(prefix: str = "ai") -> str:
    """A new key: ``prefix`` + ``_`` + 128 random bits, URL-safe base64 (no padding).

    The guarded client sends one per logical call as the ``Idempotency-Key`` header and
    keeps it across every retry of that call. ``prefix`` is up to 64 characters from
    ``A-Z a-z 0-9 _ -`` (``""`` for none); anything else raises
    :class:`~ai_guard.errors.ConfigError`::

        >>> key = generate_idempotency_key("order")
        >>> key.startswith("order_") and len(key) == len("order_") + 22
        True
    """
    if not isinstance(prefix, str) or _PREFIX_PATTERN.fullmatch(prefix) is None:
        raise ConfigError(
            "prefix", prefix, "must be at most 64 characters from A-Z, a-z, 0-9, '_' and '-'"
        )
    token = secrets.token_urlsafe(16)
    return f"{prefix}_{token}" if prefix else token


# -- server side: the header -------------------------------------------------------------


def _first_bad_character(text: str) -> str | None:
    """Why ``text`` is not visible ASCII (``None`` when it is)."""
    for position, char in enumerate(text, 1):
        code = ord(char)
        if code < 0x20 or code == 0x7F:
            return f"a control character (0x{code:02x}) at position {position}"
        if code > 0x7F:
            return f"a non-ASCII character at position {position}"
        if code == 0x20:
            return f"a space at position {position}"
    return None


def _unquote_sf_string(raw: str) -> str:
    """The content of an RFC 8941 structured-field string (``raw`` starts with ``"``)."""
    chars: list[str] = []
    position = 1
    end = len(raw)
    while position < end:
        char = raw[position]
        if char == "\\":
            following = raw[position + 1 : position + 2]
            if following not in ('"', "\\"):
                raise IdempotencyKeyError(
                    'Idempotency-Key has an invalid escape: only \\" and \\\\ are allowed'
                )
            chars.append(following)
            position += 2
            continue
        if char == '"':
            rest = raw[position + 1 :].lstrip(" \t")
            if rest.startswith(","):
                raise IdempotencyKeyError(
                    "Idempotency-Key must be a single key, not a list of keys"
                )
            if rest.startswith(";"):
                raise IdempotencyKeyError("Idempotency-Key parameters are not supported")
            if rest:
                raise IdempotencyKeyError("Idempotency-Key has characters after the closing quote")
            return "".join(chars)
        chars.append(char)
        position += 1
    raise IdempotencyKeyError("Idempotency-Key has an opening quote but no closing quote")


def parse_idempotency_key(values: str | Sequence[str]) -> str:
    """The key in the ``Idempotency-Key`` header's value(s), validated.

    Accepts a structured-field string (``"8e03978e-40d5"``, RFC 8941, as the IETF draft
    specifies) or a bare value (``8e03978e-40d5``, as most clients send): 1 to 255 visible
    ASCII characters. ``values`` is every value the request carried for the header.
    Raises :class:`~ai_guard.errors.IdempotencyKeyError` saying what is wrong: sent twice,
    a list, empty, too long, non-ASCII, a control character or a space::

        >>> parse_idempotency_key('"abc-123"')
        'abc-123'
    """
    if isinstance(values, str):
        values = [values]
    if not values:
        raise IdempotencyKeyError("the Idempotency-Key header is missing")
    if len(values) > 1:
        raise IdempotencyKeyError(
            f"the Idempotency-Key header was sent {len(values)} times; send exactly one key"
        )
    raw = values[0].strip(" \t")
    if raw.startswith('"'):
        key = _unquote_sf_string(raw)
    elif "," in raw:
        raise IdempotencyKeyError("Idempotency-Key must be a single key, not a list of keys")
    else:
        key = raw
    if not key:
        raise IdempotencyKeyError("Idempotency-Key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise IdempotencyKeyError(
            f"Idempotency-Key is {len(key)} characters long; at most {MAX_KEY_LENGTH} allowed",
            key=key[:MAX_KEY_LENGTH],
        )
    if not (key.isascii() and key.isprintable()) or " " in key:
        problem = _first_bad_character(key)
        raise IdempotencyKeyError(
            f"Idempotency-Key must be visible ASCII characters only; it has {problem}"
        )
    return key


# -- serializers -------------------------------------------------------------------------


@runtime_checkable
class Serializer(Protocol):
    """How a function's result becomes bytes in the store and back.

    ``name`` is written into each record (1-32 characters of ``a-z 0-9 . _ + -``): a
    record written by another serializer is refused rather than misread.
    """

    name: str

    def dumps(self, value: Any) -> bytes:
        """Encode ``value``; raise any exception when it cannot be stored."""
        ...

    def loads(self, data: bytes) -> Any:
        """Decode what :meth:`dumps` produced."""
        ...


_TAG = "__aig__"
_TAG_MARK = b'"__aig__"'
_SCALARS = (str, int, float, bool, type(None))


def _class_path(cls: type) -> str:
    if "<locals>" in cls.__qualname__:
        raise TypeError(
            f"{cls.__qualname__} is defined inside a function; a stored result's class "
            "must be importable by name"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


class JsonSerializer:
    """The default serializer: JSON, with the types an AI call returns.

    Stores ``str``/``int``/``float``/``bool``/``None``, ``list``, ``dict`` (any keys it can
    store), ``tuple`` and ``bytes`` losslessly, plus :class:`~ai_guard.types.ChatResult`,
    :class:`~ai_guard.types.Usage` and any dataclass (rebuilt from its ``init`` fields) and
    any pydantic model (rebuilt with ``model_validate_json``). Classes must be importable
    by ``module:qualname``. Anything else (a generator, a socket, a subclass of ``dict``
    whose type would be lost) raises, which :func:`idempotent` turns into
    :class:`~ai_guard.errors.NotStorableError`.

    Why JSON rather than pickle: a stored result may be read by another process, another
    host or another release; unpickling bytes from a shared Redis runs whatever code they
    name, and a class renamed between releases breaks pickles silently. JSON rebuilds
    only dataclasses and pydantic models, by their validated fields.
    """

    name = "json"

    def __init__(self) -> None:
        self._classes: dict[str, type] = {}

    def dumps(self, value: Any) -> bytes:
        return json.dumps(self._encode(value), separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8"
        )

    def loads(self, data: bytes) -> Any:
        value = json.loads(data)
        if _TAG_MARK not in data:  # no tagged values: plain JSON needs no walk
            return value
        return self._decode(value)

    def _encode(self, value: Any) -> Any:
        kind = type(value)
        if kind in _SCALARS:
            return value
        if kind is list:
            return [self._encode(item) for item in value]
        if kind is dict:
            if _TAG not in value and all(type(k) is str for k in value):
                return {k: self._encode(v) for k, v in value.items()}
            items = [[self._encode(k), self._encode(v)] for k, v in value.items()]
            return {_TAG: "dict", "v": items}
        if kind is tuple:
            return {_TAG: "tuple", "v": [self._encode(item) for item in value]}
        if kind is bytes:
            return {_TAG: "bytes", "v": base64.b64encode(value).decode("ascii")}
        if isinstance(value, BaseModel):
            return {_TAG: "pydantic", "cls": _class_path(kind), "v": value.model_dump_json()}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {
                f.name: self._encode(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if f.init
            }
            return {_TAG: "dataclass", "cls": _class_path(kind), "v": fields}
        raise TypeError(
            f"a {kind.__module__}.{kind.__qualname__} cannot be stored as JSON; return "
            "JSON types, tuples, bytes, a dataclass or a pydantic model, or pass "
            "serializer='pickle'"
        )

    def _decode(self, value: Any) -> Any:
        if type(value) is list:
            return [self._decode(item) for item in value]
        if type(value) is not dict:
            return value
        tag = value.get(_TAG)
        if tag is None:
            return {k: self._decode(v) for k, v in value.items()}
        if tag == "tuple":
            return tuple(self._decode(item) for item in value["v"])
        if tag == "dict":
            return {self._decode(k): self._decode(v) for k, v in value["v"]}
        if tag == "bytes":
            return base64.b64decode(value["v"])
        cls = self._class(value["cls"], tag)
        if tag == "pydantic":
            return cast("type[BaseModel]", cls).model_validate_json(value["v"])
        return cls(**{k: self._decode(v) for k, v in value["v"].items()})

    def _class(self, path: str, tag: str) -> type:
        cls = self._classes.get(path)
        if cls is not None:
            return cls
        module_name, _, qualname = path.partition(":")
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
        # Only the two kinds of class we wrote may be rebuilt: a record cannot name an
        # arbitrary callable to run.
        ok = isinstance(found, type) and (
            (tag == "pydantic" and issubclass(found, BaseModel))
            or (tag == "dataclass" and dataclasses.is_dataclass(found))
        )
        if not ok:
            raise TypeError(f"{path} is not a {tag} class")
        self._classes[path] = found
        return cast(type, found)


class PickleSerializer:
    """Pickle: stores almost any Python object. Use it only with a store that nobody
    else can write to (unpickling runs code the bytes name) and across processes that
    run the same release."""

    name = "pickle"

    def dumps(self, value: Any) -> bytes:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes) -> Any:
        # Unpickling runs code the bytes name: documented as for trusted stores only.
        return pickle.loads(data)


#: The default serializer (see :class:`JsonSerializer`).
JSON_SERIALIZER: Serializer = JsonSerializer()
#: The pickle serializer, for trusted stores (``serializer="pickle"``).
PICKLE_SERIALIZER: Serializer = PickleSerializer()

_SERIALIZER_NAME = re.compile(r"[a-z0-9._+-]{1,32}")


def _resolve_serializer(serializer: str | Serializer) -> Serializer:
    if serializer == "json":
        return JSON_SERIALIZER
    if serializer == "pickle":
        return PICKLE_SERIALIZER
    if (
        isinstance(serializer, Serializer)
        and isinstance(serializer.name, str)
        and _SERIALIZER_NAME.fullmatch(serializer.name)
        and serializer.name not in (_HTTP_CODEC, _HTTP_JSON_CODEC)
    ):
        return serializer
    raise ConfigError(
        "serializer",
        serializer,
        "must be 'json', 'pickle' or an object with a name (a-z 0-9 . _ + -), dumps and loads",
    )


# -- records -----------------------------------------------------------------------------

_MAGIC = b"AIG1"
_CLAIM_PREFIX = b"AIG1 P "
_DONE_PREFIX = b"AIG1 D "
_NO_FINGERPRINT = b"-"
# Stored HTTP responses: "http.v2" is written (a length-framed head, then the body; see
# ai_guard._idempotency_flask); "http" (a JSON head line) is what releases before it
# wrote, still read.
_HTTP_CODEC = "http.v2"
_HTTP_JSON_CODEC = "http"


def _claim_tokens() -> tuple[bytes, Callable[[], int]]:
    """This process's claim tokens: a random nonce and a counter. Made again in a forked
    child, so two gunicorn workers never share a token."""
    return _CLAIM_PREFIX + secrets.token_hex(8).encode("ascii"), itertools.count(1).__next__


_CLAIM_HEAD, _next_token = _claim_tokens()


def new_claim(fingerprint: bytes = _NO_FINGERPRINT) -> bytes:
    """A new claim record, unique to this call: ``AIG1 P <token> <fingerprint>\\n``."""
    # itertools.count's next() is atomic under the GIL: no lock for a unique token.
    return b"%s%x %s\n" % (_CLAIM_HEAD, _next_token(), fingerprint)


class Record:
    """A parsed record: ``done`` or in flight, with its fingerprint and payload.

    ``codec`` is the serializer's name (``None`` for a claim); ``raw`` the stored bytes.
    """

    __slots__ = ("codec", "done", "fingerprint", "payload", "raw")

    def __init__(
        self, raw: bytes, done: bool, fingerprint: bytes, codec: str | None, payload: bytes
    ) -> None:
        self.raw = raw
        self.done = done
        self.fingerprint = fingerprint
        self.codec = codec
        self.payload = payload

    def __repr__(self) -> str:
        state = "done" if self.done else "in_flight"
        return f"Record({state}, fingerprint={self.fingerprint!r}, codec={self.codec!r})"


_CODEC_NAMES: dict[bytes, str] = {
    b"json": "json",
    b"pickle": "pickle",
    b"http": _HTTP_JSON_CODEC,
    b"http.v2": _HTTP_CODEC,
}


def parse_record(raw: bytes, *, key: str | None = None) -> Record:
    """Parse a stored record; a record of another format raises
    :class:`~ai_guard.errors.IdempotencyError`."""
    head, newline, payload = raw.partition(b"\n")
    parts = head.split(b" ")
    if newline and len(parts) == 4:
        magic, state, first, second = parts
        if magic == _MAGIC:
            if state == b"D":
                codec = _CODEC_NAMES.get(second) or second.decode("ascii", "replace")
                return Record(raw, True, first, codec, payload)
            if state == b"P" and not payload:
                return Record(raw, False, second, None, b"")
    raise IdempotencyError(
        f"the stored idempotency record is not in a format this version reads: {raw[:40]!r}",
        key=key,
    )


def done_record(fingerprint: bytes, codec: str, payload: bytes) -> bytes:
    """A completed record: ``AIG1 D <fingerprint> <codec>\\n<payload>``."""
    return b"%s%s %s\n%s" % (_DONE_PREFIX, fingerprint, codec.encode("ascii"), payload)


def _claim_python(ops: Any, keys: list[str], args: list[str]) -> bytes | None:
    current: bytes | None = ops.get(keys[0])
    if current is not None:
        return current
    ops.set(keys[0], args[0].encode("latin-1"), int(args[1]) / 1000.0)
    return None


#: Claim ``KEYS[1]`` with ``ARGV[1]`` for ``ARGV[2]`` ms, or return what holds it.
CLAIM_OR_READ: Script[bytes | None] = Script(
    name="idempotency_claim_or_read",
    lua=(
        "local current = redis.call('GET', KEYS[1]) "
        "if current then return current end "
        "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) "
        "return false"
    ),
    python=_claim_python,
)


def try_claim(store: Store, key: str, claim: bytes, ttl: float) -> bytes | None:
    """Atomically claim ``key`` with the record ``claim`` for ``ttl`` seconds.

    Returns ``None`` when the key is now ours, else the record that holds it (a claim of
    another caller, or a completed record).
    """
    if type(store) is MemoryStore:
        # In-process: one locked operation claims the key or reads what holds it.
        return store.add_or_get(key, claim, ttl)
    # Elsewhere (Redis): one round trip, claim or read.
    return store.run(CLAIM_OR_READ, [key], [claim, max(1, int(ttl * 1000))])


def complete(store: Store, key: str, claim: bytes, record: bytes, ttl: float) -> bool:
    """Replace our ``claim`` with ``record`` for ``ttl`` seconds; ``False`` (nothing
    written) when the claim is no longer ours (it expired and someone else claimed)."""
    return store.compare_and_set(key, claim, record, ttl)


def release(store: Store, key: str, claim: bytes) -> bool:
    """Delete our ``claim`` so the next caller runs; ``False`` when it is not ours."""
    return store.compare_and_delete(key, claim)


def lookup(store: Store, key: str) -> Record | None:
    """The record stored under ``key``, or ``None``."""
    raw = store.get(key)
    return None if raw is None else parse_record(raw, key=key)


def lookup_payload(store: Store, key: str, header: bytes) -> bytes | None:
    """The payload stored under ``key`` when its record is the completed one with
    ``header`` (``done_record(fingerprint, codec, b"")``: the same fingerprint and codec),
    else ``None`` (missing, in flight, another fingerprint or codec, another format:
    :func:`lookup` tells which).

    What a replay reads: one prefix comparison instead of parsing the record."""
    raw = store.get(key)
    if raw is not None and raw.startswith(header):
        return raw[len(header) :]
    return None


def _release_quietly(store: Store, key: str, claim: bytes) -> None:
    """Release on an error path: a store failure here must not hide the user's error (the
    claim then expires after its in-flight TTL)."""
    try:
        release(store, key, claim)
    except StoreError:
        _log.warning("could not release idempotency claim %r; it expires on its own", key)


# -- flights: the calls this process is running, for waiters and the claim keeper --------


class _Flight:
    """One call with a key that this process is running (or waiting on a foreign
    holder for). Local waiters block on ``event``; the keeper refreshes ``claim``."""

    __slots__ = (
        "claim",
        "clock",
        "event",
        "fkey",
        "in_flight_ttl",
        "lost",
        "refreshed_at",
        "skey",
        "store",
    )

    def __init__(self, store: Store, skey: str, in_flight_ttl: float, clock: Clock) -> None:
        self.store = store
        self.skey = skey
        self.fkey = (store, skey)
        self.in_flight_ttl = in_flight_ttl
        self.clock = clock
        self.claim: bytes | None = None
        self.refreshed_at = 0.0
        self.event: threading.Event | None = None
        self.lost = False


class _Flights:
    """The registry of flights, one per (store, key). Module-level because waiters in
    any thread must find the flight of the thread that runs the call."""

    __slots__ = ("by_key", "lock")

    def __init__(self) -> None:
        self.by_key: dict[tuple[Store, str], _Flight] = {}
        self.lock = threading.Lock()

    def finish(self, flight: _Flight) -> None:
        """Unregister ``flight`` and wake its waiters. Done under the lock so a waiter
        that attached to the flight is always woken."""
        with self.lock:
            if self.by_key.get(flight.fkey) is flight:
                del self.by_key[flight.fkey]
            event = flight.event
        if event is not None:
            event.set()

    def attach(self, flight: _Flight) -> threading.Event | None:
        """The event to wait on for ``flight``; ``None`` when it already finished."""
        with self.lock:
            if self.by_key.get(flight.fkey) is not flight:
                return None
            if flight.event is None:
                flight.event = threading.Event()
            return flight.event

    def claimed(self) -> list[_Flight]:
        with self.lock:
            return [f for f in self.by_key.values() if f.claim is not None and not f.lost]


_FLIGHTS = _Flights()


def refresh_claims() -> int:
    """Extend the TTL of every claim this process holds that is a third or more into its
    in-flight TTL (compare-and-set, so a claim that was lost stays lost).

    The keeper thread calls this twice a second; tests call it after advancing a
    :class:`~ai_guard.testing.FakeClock`. Returns how many claims were refreshed.
    """
    refreshed = 0
    for flight in _FLIGHTS.claimed():
        claim = flight.claim
        now = flight.clock.monotonic()
        if claim is None or now - flight.refreshed_at < flight.in_flight_ttl / 3:
            continue
        try:
            kept = flight.store.compare_and_set(flight.skey, claim, claim, flight.in_flight_ttl)
        except StoreError as exc:
            _log.warning("could not refresh idempotency claim %r: %s", flight.skey, exc)
            continue
        if kept:
            flight.refreshed_at = now
            refreshed += 1
        else:
            flight.lost = True
            _log.warning(
                "idempotency claim %r expired while its call was running; another caller "
                "may run the same call",
                flight.skey,
            )
    return refreshed


class _ClaimKeeper:
    """One daemon thread per process that keeps in-flight claims alive, started on the
    first claim. A claim therefore never expires while its call runs, however long, and
    a crashed worker's claim expires ``in_flight_ttl`` seconds after its last refresh."""

    period = 0.5

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def ensure_running(self) -> None:
        if self.thread is None:
            self._start()

    def _start(self) -> None:
        with self.lock:
            if self.thread is None:
                thread = threading.Thread(
                    target=self._run, name="ai_guard-idempotency-keeper", daemon=True
                )
                thread.start()
                self.thread = thread

    def _run(self) -> None:
        tick = threading.Event()  # nobody sets it: each wait lasts the full period
        while True:
            tick.wait(self.period)
            try:
                refresh_claims()
            except Exception:  # the keeper must outlive any one bad store
                _log.exception("idempotency claim keeper failed")


_KEEPER = _ClaimKeeper()


def _after_fork_in_child() -> None:
    # The child has none of the parent's threads: its flights are not running here, its
    # keeper thread does not exist, and a lock held at fork time would never be released.
    global _CLAIM_HEAD, _next_token, _FLIGHTS, _KEEPER
    _CLAIM_HEAD, _next_token = _claim_tokens()
    _FLIGHTS = _Flights()
    _KEEPER = _ClaimKeeper()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _register_claim(flight: _Flight, claim: bytes) -> None:
    flight.claim = claim
    flight.refreshed_at = flight.clock.monotonic()
    _KEEPER.ensure_running()


def _register_view_claim(
    store: Store, skey: str, claim: bytes, in_flight_ttl: float, clock: Clock
) -> _Flight:
    """Register a claim a view won, so the keeper refreshes it; finish it afterwards."""
    flight = _Flight(store, skey, in_flight_ttl, clock)
    _FLIGHTS.by_key[flight.fkey] = flight
    _register_claim(flight, claim)
    return flight


def _finish_flight(flight: _Flight) -> None:
    _FLIGHTS.finish(flight)


# -- stores ------------------------------------------------------------------------------


class _DefaultStores:
    """The registry of the process-wide default store (one ``MemoryStore``)."""

    __slots__ = ("lock", "store")

    def __init__(self) -> None:
        self.store: Store | None = None
        self.lock = threading.Lock()

    def get(self) -> Store:
        store = self.store
        if store is None:
            with self.lock:
                if self.store is None:
                    self.store = MemoryStore()
                store = self.store
        return store


_DEFAULT_STORES = _DefaultStores()


def default_store() -> Store:
    """The store ``@idempotent(store=None)`` uses outside a Flask app with the ai_guard
    extension: one process-wide :class:`~ai_guard.stores.MemoryStore`."""
    return _DEFAULT_STORES.get()


def _ambient_store() -> Store:
    """``store=None`` at call time: the Flask app's store when the ai_guard extension is
    installed in the current app, else the process-wide default."""
    flask = sys.modules.get("flask")  # never import Flask for a script that lacks it
    if flask is not None and flask.has_app_context():
        extension = flask.current_app.extensions.get("ai_guard")
        store = getattr(extension, "store", None)
        if isinstance(store, Store):
            return store
    return _DEFAULT_STORES.get()


# -- configuration -----------------------------------------------------------------------


class IdempotencyConfig(GuardConfig):
    """Settings of one ``@idempotent`` guard (validated when the decorator is built)."""

    #: Seconds a completed result is kept and replayed (24 h).
    ttl: float = Field(default=86400.0, gt=0)
    #: Seconds a claim lives without a refresh: how long a crashed caller blocks its key.
    in_flight_ttl: float = Field(default=60.0, ge=2.0)
    #: Seconds a function caller waits for a running call with its key (0: don't wait).
    wait_timeout: float = Field(default=60.0, ge=0)
    #: Largest response body a view stores; larger responses are not stored.
    max_body_bytes: int = Field(default=1 << 20, ge=0)
    #: A call without a key is refused (views: 400; functions: IdempotencyKeyError).
    required: bool = False
    #: Seconds in the ``Retry-After`` of a 409 (and of a 503 when the store is down).
    retry_after: int = Field(default=1, ge=1)
    #: When the store is unavailable, run the call unguarded instead of refusing it.
    fail_open: bool = False
    #: The part of every stored key that separates this guard's keys from others'.
    namespace: str | None = Field(default=None, pattern=r"^[^\s:]{1,200}$")


def _key_from_argument(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A key function reading the argument ``name`` of ``fn`` (by keyword or position)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        raise ConfigError("key", name, "the function's signature cannot be inspected") from None
    if name not in parameters:
        raise ConfigError("key", name, f"{fn.__qualname__} has no parameter {name!r}")
    parameter = parameters[name]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    position = list(parameters).index(name) if parameter.kind in positional else None
    default = None if parameter.default is inspect.Parameter.empty else parameter.default

    def key_of(*args: Any, **kwargs: Any) -> Any:
        if name in kwargs:
            return kwargs[name]
        if position is not None and position < len(args):
            return args[position]
        return default

    return key_of


def _digest(value: str | bytes) -> str:
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()[:32]


def idempotent(
    store: Store | str | None = None,
    *,
    ttl: float = 86400.0,
    key: Callable[..., str | None] | str | None = None,
    required: bool = False,
    scope: Callable[..., str | None] | None = None,
    in_flight_ttl: float = 60.0,
    wait_timeout: float = 60.0,
    max_body_bytes: int = 1 << 20,
    serializer: str | Serializer = "json",
    fingerprint: Callable[..., str | bytes | None] | None = None,
    retry_after: int = 1,
    fail_open: bool = False,
    namespace: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run each call with the same idempotency key exactly once; repeat calls get the
    stored result.

    **On a plain function** give ``key``: a callable of the call's arguments returning the
    key (``None``: no idempotency for this call), or the name of an argument::

        @idempotent(key=lambda order_id, **_: f"charge:{order_id}")
        def charge(order_id: str, amount: int) -> dict: ...

        @idempotent("redis://127.0.0.1:6379/0", key="request_id")
        def summarize(text: str, *, request_id: str) -> ChatResult: ...

    A second caller with the same key while the first runs waits up to ``wait_timeout``
    seconds and gets the first's result (then
    :class:`~ai_guard.errors.IdempotencyTimeoutError`; with ``wait_timeout=0``
    :class:`~ai_guard.errors.IdempotencyConflictError` at once). Later callers get the
    stored result for ``ttl`` seconds. An exception is not stored: a waiter then runs
    the body itself. Results are stored with ``serializer`` (JSON by default, see
    :class:`JsonSerializer`); one that cannot be stored raises
    :class:`~ai_guard.errors.NotStorableError` and frees the key. Keys are 1-255
    characters, kept apart per function (``namespace``, default the function's qualified
    name) and per ``scope(*args, **kwargs)`` when given; ``fingerprint(*args,
    **kwargs)`` makes a reused key with a different payload raise
    :class:`~ai_guard.errors.IdempotencyMismatchError`.

    **On a Flask view** leave ``key`` out: the key is the ``Idempotency-Key`` header, per
    the IETF draft (400 malformed, 409 in flight, 422 other payload, replay with
    ``Idempotent-Replayed: true``); see :mod:`ai_guard._idempotency_flask`.

    ``store``: a :class:`~ai_guard.stores.Store`, a URL, or ``None`` for the Flask app's
    store (``app.extensions["ai_guard"].store``) when there is one, else one process-wide
    memory store. Use Redis for exactly-once across processes. A claim lives
    ``in_flight_ttl`` seconds and is refreshed while the call runs, so a crashed worker
    blocks its key for at most that long. The store unavailable: the call is refused
    (:class:`~ai_guard.errors.StoreUnavailableError`, a view answers 503) unless
    ``fail_open=True`` runs it unguarded.

    Inside ``@traced_ai`` the key (hashed) and whether the result was replayed appear on
    the span and the call's metrics; placed outside, it records nothing there.
    """
    config = build_config(
        IdempotencyConfig,
        ttl=ttl,
        in_flight_ttl=in_flight_ttl,
        wait_timeout=wait_timeout,
        max_body_bytes=max_body_bytes,
        required=required,
        retry_after=retry_after,
        fail_open=fail_open,
        namespace=namespace,
    )
    if not isinstance(clock, Clock):
        raise ConfigError("clock", clock, "must be a Clock (monotonic, time, sleep)")
    fixed_store = None if store is None else resolve_store(store, clock=clock)
    if scope is not None and not callable(scope):
        raise ConfigError("scope", scope, "must be a callable of the call's arguments")
    if fingerprint is not None and not callable(fingerprint):
        raise ConfigError("fingerprint", fingerprint, "must be a callable of the call's arguments")
    codec = _resolve_serializer(serializer)

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        if key is None:
            try:
                from ai_guard._idempotency_flask import guard_view
            except ImportError as exc:  # pragma: no cover - only without the flask extra
                raise ConfigError(
                    "key",
                    None,
                    "without key= @idempotent guards a Flask view, which needs "
                    f'"pip install ai_guard[flask]" ({exc}); pass key= for a function',
                ) from None
            return guard_view(fn, config, fixed_store, scope, clock)
        if isinstance(key, str):
            key_of = _key_from_argument(fn, key)
        elif callable(key):
            key_of = key
        else:
            raise ConfigError("key", key, "must be a callable of the call's arguments or a name")
        guard = _FunctionGuard(fn, config, fixed_store, key_of, scope, fingerprint, codec, clock)
        return cast("Callable[P, R]", guard.wrapper())

    return decorate


class _FunctionGuard:
    """The runtime of ``@idempotent(key=...)`` on one function: configuration resolved
    at decoration time, so a call does only its store operations."""

    def __init__(
        self,
        fn: Callable[..., Any],
        config: IdempotencyConfig,
        store: Store | None,
        key_of: Callable[..., Any],
        scope_of: Callable[..., str | None] | None,
        fingerprint_of: Callable[..., str | bytes | None] | None,
        serializer: Serializer,
        clock: Clock,
    ) -> None:
        self.fn = fn
        self.config = config
        self.store = store
        self.key_of = key_of
        self.scope_of = scope_of
        self.fingerprint_of = fingerprint_of
        self.serializer = serializer
        self.clock = clock
        namespace = config.namespace or f"{fn.__module__}.{fn.__qualname__}"
        self.prefix = f"idem:f:{namespace}:"
        self.done_header = done_record(_NO_FINGERPRINT, serializer.name, b"")

    def wrapper(self) -> Callable[..., Any]:
        fn = self.fn
        key_of = self.key_of
        required = self.config.required
        run_once = self.run_once

        @functools.wraps(fn)
        def idempotent_call(*args: Any, **kwargs: Any) -> Any:
            call_key = key_of(*args, **kwargs)
            if call_key is None:
                if required:
                    raise IdempotencyKeyError(
                        f"{fn.__qualname__} requires an idempotency key and none was given"
                    )
                return fn(*args, **kwargs)
            return run_once(call_key, args, kwargs)

        return idempotent_call

    def _store_key(self, call_key: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if type(call_key) is not str or not 0 < len(call_key) <= MAX_KEY_LENGTH:
            raise IdempotencyKeyError(
                f"an idempotency key must be a str of 1 to {MAX_KEY_LENGTH} characters, "
                f"got {type(call_key).__name__} {str(call_key)[:40]!r}"
            )
        if self.scope_of is None:
            return self.prefix + call_key
        scope = self.scope_of(*args, **kwargs)
        return f"{self.prefix}{'-' if scope is None else _digest(scope)}:{call_key}"

    def run_once(self, call_key: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        skey = self._store_key(call_key, args, kwargs)
        ctx = current_call()
        if ctx is not None:
            ctx.idempotency_key = call_key
        fingerprint = _NO_FINGERPRINT
        if self.fingerprint_of is not None:
            value = self.fingerprint_of(*args, **kwargs)
            if value is not None:
                fingerprint = _digest(value).encode("ascii")
        store = _ambient_store() if self.store is None else self.store
        config = self.config
        clock = self.clock
        flights = _FLIGHTS
        flight = _Flight(store, skey, config.in_flight_ttl, clock)
        deadline: float | None = None
        delay = _POLL_FIRST
        while True:
            leader = flights.by_key.setdefault(flight.fkey, flight)
            if leader is not flight:
                # Another thread of this process runs (or awaits) this key: wait for it
                # without polling the store, then read what it left.
                deadline = self._wait_local(leader, deadline, call_key)
                payload = lookup_payload(store, skey, self._done_header(fingerprint))
                if payload is not None:
                    return self._load(payload, call_key, ctx)
                record = lookup(store, skey)
                if record is not None and record.done:
                    return self._replay(record, fingerprint, call_key, ctx)
                continue
            claim = new_claim(fingerprint)
            try:
                existing = try_claim(store, skey, claim, config.in_flight_ttl)
            except StoreError:
                _FLIGHTS.finish(flight)
                if not config.fail_open:
                    raise
                _log.warning("store unavailable; running %r without idempotency", call_key)
                return self.fn(*args, **kwargs)
            if existing is None:
                return self._run_owned(store, skey, claim, flight, fingerprint, args, kwargs)
            finished = True  # unless we go round again, this process stops leading the key
            try:
                # A replay's fast path: the record this call would have stored, header and
                # all (same fingerprint, same serializer); anything else is parsed.
                header = self._done_header(fingerprint)
                if existing.startswith(header):
                    return self._load(existing[len(header) :], call_key, ctx)
                record = parse_record(existing, key=call_key)
                if record.done:
                    return self._replay(record, fingerprint, call_key, ctx)
                if record.fingerprint != fingerprint:
                    raise self._mismatch(call_key)
                if config.wait_timeout == 0:
                    raise self._conflict(call_key)
                # Another process holds the key: poll the store with a bounded backoff,
                # as the leader of this process's waiters.
                now = clock.monotonic()
                if deadline is None:
                    deadline = now + config.wait_timeout
                if now >= deadline:
                    raise self._timeout(call_key)
                clock.sleep(min(delay * (0.5 + random.random() / 2), deadline - now))
                delay = min(delay * 2, _POLL_MAX)
                finished = False
            finally:
                if finished:
                    _FLIGHTS.finish(flight)

    def _run_owned(
        self,
        store: Store,
        skey: str,
        claim: bytes,
        flight: _Flight,
        fingerprint: bytes,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        _register_claim(flight, claim)
        try:
            try:
                result = self.fn(*args, **kwargs)
            except BaseException:
                _release_quietly(store, skey, claim)
                raise
            try:
                payload = self.serializer.dumps(result)
            except Exception as exc:
                _release_quietly(store, skey, claim)
                raise NotStorableError(
                    f"the result of {self.fn.__qualname__} cannot be stored: {exc}",
                    key=skey,
                ) from exc
            if fingerprint is _NO_FINGERPRINT:
                record = self.done_header + payload
            else:
                record = done_record(fingerprint, self.serializer.name, payload)
            try:
                stored = complete(store, skey, claim, record, self.config.ttl)
            except StoreError as exc:
                stored = True  # the call ran; its caller gets the result regardless
                _log.warning("could not store the result of idempotency key %r: %s", skey, exc)
            if not stored:
                _log.warning(
                    "idempotency claim %r expired before its call finished; result not "
                    "stored (raise in_flight_ttl?)",
                    skey,
                )
            return result
        finally:
            _FLIGHTS.finish(flight)

    def _wait_local(self, leader: _Flight, deadline: float | None, call_key: str) -> float:
        now = self.clock.monotonic()
        if deadline is None:
            deadline = now + self.config.wait_timeout
        event = _FLIGHTS.attach(leader)
        if event is None:
            return deadline
        if self.config.wait_timeout == 0:
            raise self._conflict(call_key)
        remaining = deadline - now
        if remaining <= 0 or not event.wait(remaining):
            raise self._timeout(call_key)
        return deadline

    def _done_header(self, fingerprint: bytes) -> bytes:
        """The header of the record a call with ``fingerprint`` stores."""
        if fingerprint is _NO_FINGERPRINT:
            return self.done_header
        return done_record(fingerprint, self.serializer.name, b"")

    def _replay(self, record: Record, fingerprint: bytes, call_key: str, ctx: Any) -> Any:
        if record.fingerprint != fingerprint:
            raise self._mismatch(call_key)
        if record.codec != self.serializer.name:
            raise IdempotencyError(
                f"the result stored for idempotency key {call_key!r} was written with the "
                f"{record.codec!r} serializer, not {self.serializer.name!r}",
                key=call_key,
            )
        return self._load(record.payload, call_key, ctx)

    def _load(self, payload: bytes, call_key: str, ctx: Any) -> Any:
        """The stored result, deserialized; the call context marked as a replay."""
        try:
            result = self.serializer.loads(payload)
        except Exception as exc:
            raise IdempotencyError(
                f"the result stored for idempotency key {call_key!r} cannot be read: {exc}",
                key=call_key,
            ) from exc
        if ctx is not None:
            ctx.idempotent_replay = True
            ctx.cost_usd = 0.0  # a replay spent no tokens
        return result

    def _conflict(self, call_key: str) -> IdempotencyConflictError:
        return IdempotencyConflictError(
            f"a call with idempotency key {call_key!r} is in flight",
            key=call_key,
            retry_after=float(self.config.retry_after),
        )

    def _timeout(self, call_key: str) -> IdempotencyTimeoutError:
        return IdempotencyTimeoutError(
            f"waited {self.config.wait_timeout:g}s for the call with idempotency key "
            f"{call_key!r} to finish",
            key=call_key,
            retry_after=float(self.config.retry_after),
        )

    def _mismatch(self, call_key: str) -> IdempotencyMismatchError:
        return IdempotencyMismatchError(
            f"idempotency key {call_key!r} was already used with different arguments",
            key=call_key,
        )


# First and largest sleep of a caller polling a key held by another process.
_POLL_FIRST = 0.01
_POLL_MAX = 0.5
