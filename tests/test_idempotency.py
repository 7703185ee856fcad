"""@idempotent on plain functions, keys, the header parser, records and serializers."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from ai_guard import idempotency
from ai_guard.context import close_call, open_call
from ai_guard.errors import (
    ConfigError,
    IdempotencyConflictError,
    IdempotencyError,
    IdempotencyKeyError,
    IdempotencyMismatchError,
    IdempotencyTimeoutError,
    NotStorableError,
    StoreUnavailableError,
)
from ai_guard.idempotency import (
    CLAIM_OR_READ,
    JSON_SERIALIZER,
    MAX_KEY_LENGTH,
    PICKLE_SERIALIZER,
    complete,
    default_store,
    done_record,
    generate_idempotency_key,
    idempotent,
    lookup,
    lookup_payload,
    new_claim,
    parse_idempotency_key,
    parse_record,
    refresh_claims,
    release,
    try_claim,
)
from ai_guard.stores import MemoryStore, RedisStore, Store
from ai_guard.testing import FakeClock
from ai_guard.types import ChatResult, Usage
from tests.conftest import free_port

# -- generate_idempotency_key ------------------------------------------------------------


def test_generated_key_is_prefix_and_128_random_bits_url_safe() -> None:
    key = generate_idempotency_key("order")
    assert re.fullmatch(r"order_[A-Za-z0-9_-]{22}", key)


def test_generated_keys_are_unique() -> None:
    keys = {generate_idempotency_key() for _ in range(20_000)}
    assert len(keys) == 20_000
    assert all(k.startswith("ai_") for k in keys)


def test_generated_key_is_a_valid_header_value() -> None:
    key = generate_idempotency_key("ai")
    assert parse_idempotency_key(key) == key
    assert parse_idempotency_key(f'"{key}"') == key


def test_empty_prefix_gives_the_bare_token() -> None:
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", generate_idempotency_key(""))


@pytest.mark.parametrize("prefix", ["has space", "a/b", "clé", "x" * 65, "a:b", 42, None])
def test_bad_prefix_is_a_config_error_naming_it(prefix: Any) -> None:
    with pytest.raises(ConfigError) as info:
        generate_idempotency_key(prefix)
    assert info.value.setting == "prefix"
    assert info.value.value == prefix


# -- the Idempotency-Key header ----------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "key"),
    [
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ('"8e03978e-40d5-43e8"', "8e03978e-40d5-43e8"),
        ('  "quoted"  ', "quoted"),
        ("\tbare\t", "bare"),
        ('"a\\"b\\\\c"', 'a"b\\c'),
        ("k" * 255, "k" * 255),
        ('"' + "q" * 255 + '"', "q" * 255),
        ("a;b=c", "a;b=c"),
        ("~!#$%&'*+-.^_`|", "~!#$%&'*+-.^_`|"),
    ],
)
def test_valid_keys_are_accepted(header: str, key: str) -> None:
    assert parse_idempotency_key(header) == key
    assert parse_idempotency_key([header]) == key


VISIBLE_ASCII = st.characters(min_codepoint=0x21, max_codepoint=0x7E)


@given(st.text(VISIBLE_ASCII, min_size=1, max_size=MAX_KEY_LENGTH))
def test_any_visible_ascii_key_roundtrips_quoted(key: str) -> None:
    quoted = '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assert parse_idempotency_key(quoted) == key


@given(
    st.text(VISIBLE_ASCII, min_size=1, max_size=MAX_KEY_LENGTH).filter(
        lambda k: "," not in k and not k.startswith('"')
    )
)
def test_any_bare_visible_ascii_key_is_itself(key: str) -> None:
    assert parse_idempotency_key(key) == key


@given(st.text(max_size=300))
def test_any_header_value_gives_a_key_or_a_key_error(value: str) -> None:
    try:
        key = parse_idempotency_key(value)
    except IdempotencyKeyError:
        return
    assert 1 <= len(key) <= MAX_KEY_LENGTH
    assert key.isascii()
    assert key.isprintable()
    assert " " not in key


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ([], "missing"),
        ([""], "empty"),
        (["   "], "empty"),
        (['""'], "empty"),
        (["k" * 256], "256 characters long"),
        (['"' + "q" * 256 + '"'], "256 characters long"),
        (["clé"], "non-ASCII"),
        (['"ключ"'], "non-ASCII"),
        (["a\x01b"], "control character (0x01)"),
        (["a\x7fb"], "control character (0x7f)"),
        (["a b"], "a space"),
        (['"a b"'], "a space"),
        (["a, b"], "not a list"),
        (['"a", "b"'], "not a list"),
        (["a", "b"], "sent 2 times"),
        (['"abc'], "no closing quote"),
        (['"abc";v=1'], "parameters are not supported"),
        (['"abc"x'], "after the closing quote"),
        (['"a\\nb"'], "invalid escape"),
    ],
)
def test_malformed_keys_raise_a_key_error_saying_what_is_wrong(
    values: list[str], says: str
) -> None:
    with pytest.raises(IdempotencyKeyError) as info:
        parse_idempotency_key(values)
    assert says in str(info.value)
    assert info.value.http_status == 400


# -- records and the claim primitives ----------------------------------------------------


def test_claims_are_unique_across_threads() -> None:
    claims: list[bytes] = []
    lock = threading.Lock()

    def make() -> None:
        mine = [new_claim() for _ in range(500)]
        with lock:
            claims.extend(mine)

    threads = [threading.Thread(target=make) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(claims)) == 32 * 500


def test_record_format_is_versioned_header_and_payload() -> None:
    claim = new_claim(b"abc123")
    assert claim.startswith(b"AIG1 P ")
    assert claim.endswith(b" abc123\n")
    record = parse_record(claim)
    assert not record.done
    assert record.fingerprint == b"abc123"

    done = done_record(b"-", "json", b'{"a":1}\n second line')
    assert done == b'AIG1 D - json\n{"a":1}\n second line'
    parsed = parse_record(done)
    assert parsed.done
    assert parsed.codec == "json"
    assert parsed.payload == b'{"a":1}\n second line'


@pytest.mark.parametrize("raw", [b"", b"hello", b"AIG2 D - json\n{}", b"AIG1 X a b\n", b"AIG1 D -"])
def test_unreadable_record_is_an_idempotency_error(raw: bytes) -> None:
    with pytest.raises(IdempotencyError, match="not in a format"):
        parse_record(raw, key="k")


def test_claim_is_atomic_and_returns_the_holder(store: Store) -> None:
    first, second = new_claim(), new_claim()
    assert try_claim(store, "k", first, 30) is None
    assert try_claim(store, "k", second, 30) == first


def test_claim_script_runs_the_same_on_every_backend(store: Store) -> None:
    first, second = new_claim(), new_claim()
    assert store.run(CLAIM_OR_READ, ["k"], [first, 30_000]) is None
    assert store.run(CLAIM_OR_READ, ["k"], [second, 30_000]) == first
    ttl = store.ttl("k")
    assert ttl is not None
    assert 29 < ttl <= 30


def test_completion_overwrites_only_our_own_claim(store: Store) -> None:
    ours = new_claim()
    assert try_claim(store, "k", ours, 30) is None
    # Our claim is lost (expired) and another worker claims the key.
    store.delete("k")
    theirs = new_claim()
    assert try_claim(store, "k", theirs, 30) is None
    assert complete(store, "k", ours, done_record(b"-", "json", b"1"), 60) is False
    assert release(store, "k", ours) is False
    assert store.get("k") == theirs
    assert complete(store, "k", theirs, done_record(b"-", "json", b"2"), 60) is True
    record = lookup(store, "k")
    assert record is not None
    assert record.done
    assert record.payload == b"2"


def test_lookup_payload_reads_only_the_completed_record_with_that_header(store: Store) -> None:
    header = done_record(b"fp1", "json", b"")
    assert lookup_payload(store, "k", header) is None  # missing
    claim = new_claim(b"fp1")
    assert try_claim(store, "k", claim, 30) is None
    assert lookup_payload(store, "k", header) is None  # in flight
    assert complete(store, "k", claim, done_record(b"fp1", "json", b'{"a":1}\n2'), 60)
    assert lookup_payload(store, "k", header) == b'{"a":1}\n2'
    assert lookup_payload(store, "k", done_record(b"fp2", "json", b"")) is None
    assert lookup_payload(store, "k", done_record(b"fp1", "pickle", b"")) is None
    assert lookup_payload(store, "k", done_record(b"fp", "json", b"")) is None  # a prefix of fp1


def test_a_waiter_replays_a_result_stored_with_its_fingerprint() -> None:
    runs = Counter()
    started = threading.Event()
    release_first = threading.Event()

    @idempotent(MemoryStore(), key=lambda k, amount: k, fingerprint=lambda k, amount: str(amount))
    def charge(k: str, amount: int) -> dict[str, int]:
        runs.bump()
        started.set()
        release_first.wait(5)
        return {"amount": amount}

    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(charge("k", 5)))
    first.start()
    started.wait(5)
    second = threading.Thread(target=lambda: results.append(charge("k", 5)))
    second.start()
    (flight,) = [f for f in idempotency._FLIGHTS.by_key.values() if "waiter_replays" in f.skey]
    for _ in range(500):  # until the second caller waits on the first's flight
        if flight.event is not None:
            break
        threading.Event().wait(0.01)
    assert flight.event is not None
    release_first.set()
    first.join(5)
    second.join(5)
    assert results == [{"amount": 5}, {"amount": 5}]
    assert runs.n == 1
    with pytest.raises(IdempotencyMismatchError):
        charge("k", 6)


def test_released_claim_frees_the_key(store: Store) -> None:
    claim = new_claim()
    assert try_claim(store, "k", claim, 30) is None
    assert release(store, "k", claim) is True
    assert lookup(store, "k") is None
    assert try_claim(store, "k", new_claim(), 30) is None


def test_claim_has_its_short_ttl_and_completion_the_long_one(store: Store) -> None:
    claim = new_claim()
    try_claim(store, "k", claim, 30)
    ttl = store.ttl("k")
    assert ttl is not None
    assert 29 < ttl <= 30
    complete(store, "k", claim, done_record(b"-", "json", b"1"), 86400)
    ttl = store.ttl("k")
    assert ttl is not None
    assert 86399 < ttl <= 86400


def test_unreadable_stored_record_is_an_error_and_leaves_nothing_registered() -> None:
    store = MemoryStore()
    store.set("idem:f:corrupt:k", b"not a record")

    @idempotent(store, key=lambda: "k", namespace="corrupt")
    def work() -> int:
        return 1

    with pytest.raises(IdempotencyError, match="not in a format"):
        work()
    assert not idempotency._FLIGHTS.by_key


def test_expired_claim_can_be_taken_over() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    crashed = new_claim()
    assert try_claim(store, "k", crashed, 5) is None
    clock.advance(5.01)
    assert try_claim(store, "k", new_claim(), 5) is None


# -- @idempotent on a function: exactly once ---------------------------------------------


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def bump(self) -> int:
        with self.lock:
            self.n += 1
            return self.n


def test_same_key_runs_once_and_replays_the_result(store: Store) -> None:
    runs = Counter()

    @idempotent(store, key=lambda order_id, amount: f"charge:{order_id}")
    def charge(order_id: str, amount: int) -> dict[str, Any]:
        return {"charge": runs.bump(), "order": order_id, "amount": amount}

    first = charge("o1", 100)
    again = charge("o1", 100)
    assert first == again == {"charge": 1, "order": "o1", "amount": 100}
    assert charge("o2", 100)["charge"] == 2
    assert runs.n == 2


def test_key_none_means_no_idempotency_for_the_call() -> None:
    runs = Counter()

    @idempotent(MemoryStore(), key=lambda key=None: key)
    def work(key: str | None = None) -> int:
        return runs.bump()

    assert [work(), work(), work("k"), work("k")] == [1, 2, 3, 3]


def test_required_key_missing_is_a_key_error() -> None:
    @idempotent(MemoryStore(), key=lambda key=None: key, required=True)
    def work(key: str | None = None) -> int:
        return 1

    with pytest.raises(IdempotencyKeyError, match="requires an idempotency key"):
        work()
    assert work("k") == 1


@pytest.mark.parametrize("bad_key", [42, b"bytes", "", "k" * 256])
def test_key_function_returning_a_bad_key_is_a_key_error(bad_key: Any) -> None:
    runs = Counter()

    @idempotent(MemoryStore(), key=lambda: bad_key)
    def work() -> int:
        return runs.bump()

    with pytest.raises(IdempotencyKeyError, match="1 to 255 characters"):
        work()
    assert runs.n == 0


def test_key_may_name_an_argument_positional_or_keyword() -> None:
    runs = Counter()

    @idempotent(MemoryStore(), key="request_id")
    def work(text: str, request_id: str | None = None) -> str:
        runs.bump()
        return text.upper()

    assert work("a", "r1") == "A"
    assert work("b", request_id="r1") == "A"  # same key: the stored result
    assert work("c") == "C"  # default None: no idempotency
    assert work("c") == "C"
    assert runs.n == 3


def test_key_naming_a_missing_argument_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:

        @idempotent(MemoryStore(), key="nope")
        def work(text: str) -> str:
            return text

    assert info.value.setting == "key"


def test_different_functions_keep_their_keys_apart() -> None:
    store = MemoryStore()

    @idempotent(store, key=lambda k: k)
    def one(k: str) -> str:
        return "one"

    @idempotent(store, key=lambda k: k)
    def two(k: str) -> str:
        return "two"

    assert (one("k"), two("k")) == ("one", "two")


def test_namespace_lets_two_functions_share_keys() -> None:
    store = MemoryStore()

    @idempotent(store, key=lambda k: k, namespace="payments")
    def one(k: str) -> str:
        return "one"

    @idempotent(store, key=lambda k: k, namespace="payments")
    def two(k: str) -> str:
        return "two"

    assert (one("k"), two("k")) == ("one", "one")


def test_scope_keeps_callers_apart() -> None:
    runs = Counter()

    @idempotent(MemoryStore(), key=lambda user, k: k, scope=lambda user, k: user)
    def work(user: str, k: str) -> str:
        runs.bump()
        return f"{user}:{k}"

    assert work("alice", "k") == "alice:k"
    assert work("bob", "k") == "bob:k"
    assert work("alice", "k") == "alice:k"
    assert runs.n == 2


def test_same_key_different_fingerprint_is_a_mismatch() -> None:
    @idempotent(MemoryStore(), key=lambda k, amount: k, fingerprint=lambda k, amount: str(amount))
    def charge(k: str, amount: int) -> int:
        return amount

    assert charge("k", 100) == 100
    assert charge("k", 100) == 100
    with pytest.raises(IdempotencyMismatchError) as info:
        charge("k", 200)
    assert info.value.http_status == 422


def test_exception_is_not_stored_and_the_next_call_runs() -> None:
    runs = Counter()

    @idempotent(MemoryStore(), key=lambda: "k")
    def flaky() -> int:
        if runs.bump() == 1:
            raise ConnectionError("upstream down")
        return runs.n

    with pytest.raises(ConnectionError):
        flaky()
    assert flaky() == 2
    assert flaky() == 2


def test_result_expires_after_ttl() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    runs = Counter()

    @idempotent(store, key=lambda: "k", ttl=10, clock=clock)
    def work() -> int:
        return runs.bump()

    assert work() == 1
    clock.advance(9.9)
    assert work() == 1
    clock.advance(0.2)
    assert work() == 2


def test_store_may_be_a_url() -> None:
    @idempotent("memory://", key=lambda: "k")
    def work() -> str:
        return "ok"

    assert work() == work() == "ok"


def test_store_none_uses_the_process_wide_default_store() -> None:
    key = generate_idempotency_key("default")
    runs = Counter()

    @idempotent(key=lambda: key, namespace="default-store-test")
    def work() -> int:
        return runs.bump()

    assert work() == work() == 1
    record = lookup(default_store(), f"idem:f:default-store-test:{key}")
    assert record is not None
    assert record.done
    assert default_store() is default_store()


# -- concurrency -------------------------------------------------------------------------


@pytest.fixture
def attached(monkeypatch: pytest.MonkeyPatch) -> threading.Semaphore:
    """Released once each time a caller starts waiting on another thread's call."""
    semaphore = threading.Semaphore(0)
    original = idempotency._Flights.attach

    def attach(self: Any, flight: Any) -> Any:
        event = original(self, flight)
        semaphore.release()
        return event

    monkeypatch.setattr(idempotency._Flights, "attach", attach)
    return semaphore


def _run_threads(n: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)


def test_64_threads_same_key_body_runs_once_and_63_get_its_result(
    store: Store, attached: threading.Semaphore
) -> None:
    runs = Counter()
    release_body = threading.Event()

    @idempotent(store, key=lambda: "same-key", wait_timeout=30)
    def create_order() -> dict[str, Any]:
        runs.bump()
        release_body.wait(timeout=20)
        return {"order": 42, "lines": [1, 2, 3], "tag": ("a", b"b")}

    barrier = threading.Barrier(64)
    results: list[Any] = [None] * 64
    errors: list[BaseException] = []

    def call(i: int) -> None:
        barrier.wait()
        try:
            results[i] = create_order()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    # Every other caller is now blocked on the first one (none polled, none ran).
    for _ in range(63):
        assert attached.acquire(timeout=20)
    release_body.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert runs.n == 1
    expected = {"order": 42, "lines": [1, 2, 3], "tag": ("a", b"b")}
    assert all(r == expected for r in results)
    assert not idempotency._FLIGHTS.by_key  # nothing left registered


def test_many_threads_many_keys_each_key_runs_once(store: Store) -> None:
    runs: dict[str, int] = {}
    lock = threading.Lock()

    @idempotent(store, key=lambda k: k, wait_timeout=30)
    def work(k: str) -> str:
        with lock:
            runs[k] = runs.get(k, 0) + 1
        return k.upper()

    keys = [f"key-{i}" for i in range(16)]
    results: list[list[str]] = [[] for _ in range(32)]

    def call(i: int) -> None:
        results[i] = [work(k) for k in keys]

    _run_threads(32, call)
    assert runs == dict.fromkeys(keys, 1)
    assert all(r == [k.upper() for k in keys] for r in results)


def test_waiter_gets_the_first_callers_result(attached: threading.Semaphore) -> None:
    release_body = threading.Event()
    runs = Counter()

    @idempotent(MemoryStore(), key=lambda: "k")
    def work() -> int:
        release_body.wait(timeout=20)
        return runs.bump()

    results: list[int] = []
    first = threading.Thread(target=lambda: results.append(work()))
    first.start()
    second = threading.Thread(target=lambda: results.append(work()))
    second.start()
    assert attached.acquire(timeout=20)
    release_body.set()
    first.join(timeout=20)
    second.join(timeout=20)
    assert results == [1, 1]
    assert runs.n == 1


def test_waiter_runs_the_body_itself_when_the_first_call_fails(
    attached: threading.Semaphore,
) -> None:
    release_body = threading.Event()
    runs = Counter()

    @idempotent(MemoryStore(), key=lambda: "k")
    def work() -> str:
        n = runs.bump()
        if n == 1:
            release_body.wait(timeout=20)
            raise ValueError("first attempt failed")
        return f"run {n}"

    outcomes: list[Any] = []

    def call() -> None:
        try:
            outcomes.append(work())
        except ValueError as exc:
            outcomes.append(exc)

    first = threading.Thread(target=call)
    first.start()
    second = threading.Thread(target=call)
    second.start()
    assert attached.acquire(timeout=20)
    release_body.set()
    first.join(timeout=20)
    second.join(timeout=20)
    assert runs.n == 2
    assert sorted(map(str, outcomes)) == ["first attempt failed", "run 2"]
    assert work() == "run 2"


def test_waiter_gives_up_after_wait_timeout(attached: threading.Semaphore) -> None:
    release_body = threading.Event()
    entered = threading.Event()

    @idempotent(MemoryStore(), key=lambda: "k", wait_timeout=0.05)
    def work() -> str:
        entered.set()
        release_body.wait(timeout=20)
        return "done"

    first = threading.Thread(target=work)
    first.start()
    try:
        assert entered.wait(timeout=20)
        with pytest.raises(IdempotencyTimeoutError) as info:
            work()
        assert info.value.key == "k"
        assert info.value.http_status == 409
    finally:
        release_body.set()
        first.join(timeout=20)
    assert work() == "done"


def test_wait_timeout_zero_is_an_immediate_conflict() -> None:
    release_body = threading.Event()
    entered = threading.Event()

    @idempotent(MemoryStore(), key=lambda: "k", wait_timeout=0)
    def work() -> str:
        entered.set()
        release_body.wait(timeout=20)
        return "done"

    first = threading.Thread(target=work)
    first.start()
    try:
        assert entered.wait(timeout=20)
        with pytest.raises(IdempotencyConflictError) as info:
            work()
        assert not isinstance(info.value, IdempotencyTimeoutError)
        assert info.value.retry_after == 1.0
    finally:
        release_body.set()
        first.join(timeout=20)


# -- across processes: a key held by another process is polled ---------------------------


FOREIGN_CLAIM = b"AIG1 P 00foreign00000001 -\n"


def test_key_held_by_another_process_is_polled_with_bounded_backoff() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    store.add("idem:f:orders:k", FOREIGN_CLAIM, ttl=1000)

    @idempotent(store, key=lambda: "k", namespace="orders", wait_timeout=3, clock=clock)
    def work() -> str:
        return "ran"

    with pytest.raises(IdempotencyTimeoutError):
        work()
    assert sum(clock.sleeps) == pytest.approx(3.0)
    assert max(clock.sleeps) <= 0.5
    assert clock.sleeps[0] <= 0.01
    assert len(clock.sleeps) < 40  # backoff, not a spin


def test_crashed_holders_claim_expires_and_the_waiter_runs() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    store.add("idem:f:orders:k", FOREIGN_CLAIM, ttl=5)
    runs = Counter()

    @idempotent(store, key=lambda: "k", namespace="orders", wait_timeout=30, clock=clock)
    def work() -> int:
        return runs.bump()

    assert work() == 1
    assert runs.n == 1
    assert 5 <= clock.total_slept < 6


class _HandOverClock(FakeClock):
    """A fake clock whose first sleep lets the other 'process' finish its call."""

    def __init__(self, on_first_sleep: Callable[[], None]) -> None:
        super().__init__()
        self._on_first_sleep: Callable[[], None] | None = on_first_sleep

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        hook, self._on_first_sleep = self._on_first_sleep, None
        if hook is not None:
            hook()


def test_two_processes_sharing_redis_run_the_body_once(
    redis_url: str, redis_store: RedisStore
) -> None:
    # Two store objects on one Redis behave like two processes: no in-process wake-up,
    # the second one polls Redis.
    other_process_store = RedisStore(redis_url, key_prefix=redis_store.key_prefix)
    release_body = threading.Event()
    entered = threading.Event()
    runs = Counter()

    def body() -> dict[str, int]:
        entered.set()
        release_body.wait(timeout=20)
        return {"run": runs.bump()}

    in_a = idempotent(redis_store, key=lambda: "k", namespace="orders")(body)
    results: list[dict[str, int]] = []
    first = threading.Thread(target=lambda: results.append(in_a()))
    first.start()
    assert entered.wait(timeout=20)

    def let_first_finish() -> None:
        release_body.set()
        first.join(timeout=20)

    clock = _HandOverClock(let_first_finish)
    in_b = idempotent(other_process_store, key=lambda: "k", namespace="orders", clock=clock)(body)
    try:
        assert in_b() == {"run": 1}
    finally:
        release_body.set()
        first.join(timeout=20)
        other_process_store.close()
    assert results == [{"run": 1}]
    assert runs.n == 1
    assert len(clock.sleeps) == 1


# -- claims that live long: the keeper ---------------------------------------------------


def test_claim_is_refreshed_while_a_long_call_runs() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    skey = "idem:f:long:k"
    seen: list[float | None] = []

    @idempotent(store, key=lambda: "k", namespace="long", in_flight_ttl=60, clock=clock)
    def long_call() -> str:
        clock.advance(40)
        refresh_claims()
        seen.append(store.ttl(skey))
        clock.advance(40)  # 80 s after the claim: alive only thanks to the refresh
        record = lookup(store, skey)
        seen.append(None if record is None or record.done else 1.0)
        return "done"

    assert long_call() == "done"
    assert seen[0] == pytest.approx(60)
    assert seen[1] == 1.0
    record = lookup(store, skey)
    assert record is not None
    assert record.done


def test_lost_claim_is_not_overwritten_by_the_late_owner(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    skey = "idem:f:late:k"

    @idempotent(store, key=lambda: "k", namespace="late", in_flight_ttl=5, clock=clock)
    def slow_call() -> str:
        clock.advance(6)  # our claim expired (the process stalled) ...
        assert store.add(skey, FOREIGN_CLAIM, ttl=60)  # ... and another worker claimed
        refresh_claims()
        return "late result"

    with caplog.at_level(logging.WARNING, logger="ai_guard.idempotency"):
        assert slow_call() == "late result"
    assert store.get(skey) == FOREIGN_CLAIM
    assert "expired" in caplog.text


def test_keeper_thread_refreshes_claims_in_real_time() -> None:
    store = MemoryStore()
    entered = threading.Event()
    release_body = threading.Event()

    @idempotent(store, key=lambda: "k", namespace="keeper", in_flight_ttl=2)
    def work() -> str:
        entered.set()
        release_body.wait(timeout=20)
        return "done"

    worker = threading.Thread(target=work)
    worker.start()
    try:
        assert entered.wait(timeout=20)
        # Real time must pass here: without the keeper the claim would be gone 2 s
        # after it was made.
        worker.join(timeout=2.6)
        assert worker.is_alive()
        record = lookup(store, "idem:f:keeper:k")
        assert record is not None
        assert not record.done
    finally:
        release_body.set()
        worker.join(timeout=20)


# -- serialization -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Invoice:
    number: int
    lines: tuple[str, ...]
    total: float = 0.0


class Answer(BaseModel):
    text: str
    score: float
    tags: list[str] = []


@pytest.mark.parametrize(
    "value",
    [
        None,
        "text",
        42,
        1.5,
        True,
        [1, "a", None],
        {"a": {"b": [1, 2]}},
        (1, (2, 3)),
        b"\x00\xffbinary",
        {1: "int key", (1, 2): "tuple key"},
        {"__aig__": "looks like a tag", "v": 1},
        Invoice(7, ("a", "b"), 9.5),
        Answer(text="hi", score=0.5, tags=["x"]),
        [Invoice(1, ()), {"answer": Answer(text="t", score=1.0)}],
        ChatResult(
            content="hello",
            model="gpt-4o-mini",
            usage=Usage(10, 5, 15, 2),
            finish_reason="stop",
            headers={"x-request-id": "r1"},
            raw={"id": "c1", "choices": []},
            id="c1",
        ),
    ],
)
def test_json_serializer_roundtrips_what_an_ai_call_returns(value: Any) -> None:
    restored = JSON_SERIALIZER.loads(JSON_SERIALIZER.dumps(value))
    assert restored == value
    assert type(restored) is type(value)


def _local_dataclass() -> Any:
    @dataclasses.dataclass
    class Local:
        x: int

    return Local(1)


def _generator() -> Iterator[int]:
    yield 1


class Tagged(dict[str, int]):
    pass


@pytest.mark.parametrize(
    "value",
    [object(), {1, 2}, _generator(), _local_dataclass(), Tagged(a=1), [1, threading.Lock()]],
    ids=["object", "set", "generator", "local-class", "dict-subclass", "nested-lock"],
)
def test_unstorable_result_is_not_stored_and_frees_the_key(value: Any) -> None:
    store = MemoryStore()
    results = [value, "fine"]

    @idempotent(store, key=lambda: "k")
    def work() -> Any:
        return results.pop(0)

    with pytest.raises(NotStorableError) as info:
        work()
    assert "cannot be stored" in str(info.value)
    assert len(store) == 0
    assert work() == "fine"
    assert work() == "fine"


def test_pickle_serializer_stores_other_types() -> None:
    runs = Counter()

    @idempotent(MemoryStore(), key=lambda: "k", serializer="pickle")
    def work() -> set[int]:
        runs.bump()
        return {1, 2, 3}

    assert work() == work() == {1, 2, 3}
    assert runs.n == 1
    assert PICKLE_SERIALIZER.name == "pickle"


def test_record_of_another_serializer_is_refused() -> None:
    store = MemoryStore()

    @idempotent(store, key=lambda: "k", namespace="codec", serializer="pickle")
    def pickled() -> int:
        return 1

    @idempotent(store, key=lambda: "k", namespace="codec")
    def json_one() -> int:
        return 2

    assert pickled() == 1
    with pytest.raises(IdempotencyError, match="'pickle' serializer"):
        json_one()


class Upper:
    name = "upper"

    def dumps(self, value: Any) -> bytes:
        return str(value).upper().encode()

    def loads(self, data: bytes) -> Any:
        return data.decode()


def test_custom_serializer_is_used() -> None:
    @idempotent(MemoryStore(), key=lambda: "k", serializer=Upper())
    def work() -> str:
        return "hello"

    assert work() == "hello"
    assert work() == "HELLO"


@pytest.mark.parametrize("serializer", ["yaml", object(), "http"])
def test_unknown_serializer_is_a_config_error(serializer: Any) -> None:
    with pytest.raises(ConfigError) as info:
        idempotent(MemoryStore(), key=lambda: "k", serializer=serializer)
    assert info.value.setting == "serializer"


# -- configuration and stores ------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": "a day"}, "ttl"),
        ({"in_flight_ttl": 1}, "in_flight_ttl"),
        ({"wait_timeout": -1}, "wait_timeout"),
        ({"max_body_bytes": -1}, "max_body_bytes"),
        ({"retry_after": 0}, "retry_after"),
        ({"namespace": "a:b"}, "namespace"),
        ({"namespace": ""}, "namespace"),
        ({"key": 123}, "key"),
        ({"scope": "user"}, "scope"),
        ({"fingerprint": 1}, "fingerprint"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_setting(
    options: dict[str, Any], setting: str
) -> None:
    options.setdefault("key", lambda: "k")
    with pytest.raises(ConfigError) as info:
        idempotent(MemoryStore(), **options)(lambda: 1)
    assert info.value.setting == setting


def test_unknown_store_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown store scheme"):
        idempotent("memcached://127.0.0.1:11211", key=lambda: "k")


def test_memory_stays_bounded_by_maxsize() -> None:
    store = MemoryStore(maxsize=100)

    @idempotent(store, key=lambda k: k)
    def work(k: str) -> str:
        return k

    for i in range(1000):
        assert work(f"key-{i}") == f"key-{i}"
        assert len(store) <= 100
    assert len(store) == 100
    assert not idempotency._FLIGHTS.by_key


def test_store_unavailable_refuses_the_call_unless_fail_open() -> None:
    dead = RedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2)
    runs = Counter()

    def work() -> int:
        return runs.bump()

    closed = idempotent(dead, key=lambda: "k")(work)
    with pytest.raises(StoreUnavailableError):
        closed()
    assert runs.n == 0
    opened = idempotent(dead, key=lambda: "k", fail_open=True)(work)
    assert opened() == 1
    dead.close()


# -- the per-call context ----------------------------------------------------------------


def test_key_and_replay_are_written_into_the_call_context() -> None:
    @idempotent(MemoryStore(), key=lambda: "key-1")
    def ask() -> ChatResult:
        return ChatResult(content="hi", model="gpt-4o-mini", usage=Usage(10, 5, 15))

    ctx, token = open_call()
    ask()
    close_call(ctx, token)
    assert ctx.idempotency_key == "key-1"
    assert ctx.idempotent_replay is False

    ctx, token = open_call()
    ask()
    close_call(ctx, token)
    assert ctx.idempotency_key == "key-1"
    assert ctx.idempotent_replay is True
    assert ctx.cost_usd == 0.0


def test_no_context_is_opened_by_the_guard() -> None:
    from ai_guard.context import current_call

    seen: list[Any] = []

    @idempotent(MemoryStore(), key=lambda: "k")
    def work() -> int:
        seen.append(current_call())
        return 1

    work()
    assert seen == [None]


def test_decorated_function_keeps_its_name_and_doc() -> None:
    @idempotent(MemoryStore(), key=lambda x: str(x))
    def documented(x: int) -> int:
        """Doc."""
        return x

    assert documented.__name__ == "documented"
    assert documented.__doc__ == "Doc."


def test_claim_tokens_differ_in_a_forked_child() -> None:
    read, write = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a threaded process may deadlock; the child
        # here only formats a claim and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report a claim, then leave without running pytest's exit
        try:
            os.write(write, new_claim())
        finally:
            os._exit(0)
    os.close(write)
    child_claim = os.read(read, 200)
    os.close(read)
    os.waitpid(pid, 0)
    parent_prefix = new_claim().split(b" ")[2][:16]
    assert child_claim.startswith(b"AIG1 P ")
    assert child_claim.split(b" ")[2][:16] != parent_prefix
