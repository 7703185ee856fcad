"""One suite for every store backend: memory and a real redis-server."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter

import pytest

from ai_guard import ConfigError, MemoryStore, RedisStore, StoreUnavailableError, store_from_url
from ai_guard.stores import Script, ScriptOps, Store, resolve_store
from ai_guard.testing import FakeClock

# -- primitives --------------------------------------------------------------------------


def test_get_missing_key_is_none(store: Store) -> None:
    assert store.get("nope") is None


def test_set_then_get_roundtrips_binary_values(store: Store) -> None:
    value = bytes(range(256))
    store.set("k", value)
    assert store.get("k") == value


def test_set_replaces_value(store: Store) -> None:
    store.set("k", b"one")
    store.set("k", b"two")
    assert store.get("k") == b"two"


def test_add_claims_only_once(store: Store) -> None:
    assert store.add("claim", b"me", ttl=30) is True
    assert store.add("claim", b"you", ttl=30) is False
    assert store.get("claim") == b"me"


def test_delete_reports_whether_key_existed(store: Store) -> None:
    store.set("k", b"v")
    assert store.delete("k") is True
    assert store.delete("k") is False
    assert store.get("k") is None


def test_compare_and_set_swaps_only_on_expected_value(store: Store) -> None:
    assert store.compare_and_set("k", None, b"a") is True
    assert store.compare_and_set("k", None, b"b") is False
    assert store.compare_and_set("k", b"x", b"b") is False
    assert store.compare_and_set("k", b"a", b"b") is True
    assert store.get("k") == b"b"


def test_compare_and_delete_releases_only_our_claim(store: Store) -> None:
    store.set("k", b"mine")
    assert store.compare_and_delete("k", b"theirs") is False
    assert store.get("k") == b"mine"
    assert store.compare_and_delete("k", b"mine") is True
    assert store.get("k") is None


def test_incr_counts_from_zero_and_by_amount(store: Store) -> None:
    assert store.incr("n") == 1
    assert store.incr("n", 5) == 6
    assert store.incr("n", -2) == 4
    assert store.get("n") == b"4"


def test_ttl_of_missing_key_is_none(store: Store) -> None:
    assert store.ttl("nope") is None


def test_ttl_reports_remaining_seconds(store: Store) -> None:
    store.set("k", b"v", ttl=30)
    remaining = store.ttl("k")
    assert remaining is not None
    assert 29 < remaining <= 30


def test_key_without_ttl_gets_default_ttl(store: Store) -> None:
    store.set("k", b"v")
    remaining = store.ttl("k")
    assert remaining is not None
    assert store.default_ttl - 5 < remaining <= store.default_ttl


def test_incr_keeps_expiry_of_existing_key(store: Store) -> None:
    store.incr("n", 1, ttl=30)
    store.incr("n", 1, ttl=9999)
    remaining = store.ttl("n")
    assert remaining is not None
    assert remaining <= 30


def test_clear_removes_every_key(store: Store) -> None:
    for i in range(20):
        store.set(f"k{i}", b"v")
    store.clear()
    assert all(store.get(f"k{i}") is None for i in range(20))


def test_ping(store: Store) -> None:
    assert store.ping() is True


# -- scripts: one operation, two implementations ------------------------------------------


def _max_python(ops: ScriptOps, keys: list[str], args: list[str]) -> int:
    current = ops.get(keys[0])
    if current is not None and int(current) >= int(args[0]):
        return 0
    ops.set(keys[0], args[0].encode(), float(args[1]))
    return 1


SET_IF_GREATER: Script[bool] = Script(
    name="set_if_greater",
    lua=(
        "local cur = redis.call('GET', KEYS[1]) "
        "if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end "
        "redis.call('SET', KEYS[1], ARGV[1], 'PX', math.floor(tonumber(ARGV[2]) * 1000)) "
        "return 1"
    ),
    python=_max_python,
    decode=bool,
)


def test_script_runs_the_same_on_every_backend(store: Store) -> None:
    assert store.run(SET_IF_GREATER, ["hi"], [5, 30.0]) is True
    assert store.run(SET_IF_GREATER, ["hi"], [3, 30.0]) is False
    assert store.run(SET_IF_GREATER, ["hi"], [9, 30.0]) is True
    assert store.get("hi") == b"9"


# -- expiry on the fake clock (memory) and real TTLs (redis) ------------------------------


def test_memory_key_expires_after_ttl() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    store.set("k", b"v", ttl=10)
    clock.advance(9.999)
    assert store.get("k") == b"v"
    clock.advance(0.002)
    assert store.get("k") is None
    assert store.ttl("k") is None


def test_memory_expired_claim_can_be_claimed_again() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    assert store.add("claim", b"a", ttl=5)
    clock.advance(5.1)
    assert store.add("claim", b"b", ttl=5)
    assert store.get("claim") == b"b"


def test_memory_default_ttl_is_24_hours() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    store.set("k", b"v")
    clock.advance(86399)
    assert store.get("k") == b"v"
    clock.advance(2)
    assert store.get("k") is None


def test_memory_store_stays_bounded_under_key_flood() -> None:
    store = MemoryStore(maxsize=1000)
    for i in range(10_000):
        store.set(f"k{i}", b"v")
    assert len(store) == 1000
    # the newest keys survive, the oldest went first
    assert store.get("k9999") == b"v"
    assert store.get("k0") is None


def test_memory_store_evicts_the_oldest_write_first() -> None:
    clock = FakeClock()
    store = MemoryStore(maxsize=3, clock=clock)
    store.set("short", b"v", ttl=1)
    store.set("long1", b"v", ttl=100)
    store.set("long2", b"v", ttl=100)
    clock.advance(2)
    store.set("long3", b"v", ttl=100)
    assert [store.get(k) for k in ("long1", "long2", "long3")] == [b"v"] * 3


def test_redis_store_sets_ttl_in_redis(redis_store: RedisStore) -> None:
    redis_store.set("k", b"v", ttl=2.5)
    pttl = redis_store.client.pttl(redis_store.key_prefix + "k")
    assert 2000 < pttl <= 2500


def test_redis_prefix_isolates_stores(redis_url: str) -> None:
    a = RedisStore(redis_url, key_prefix="iso-a:")
    b = RedisStore(redis_url, key_prefix="iso-b:")
    try:
        a.set("k", b"from-a")
        assert b.get("k") is None
        b.clear()
        assert a.get("k") == b"from-a"
    finally:
        a.clear()
        a.close()
        b.close()


# -- concurrency ----------------------------------------------------------------------------


def test_32_threads_racing_for_1000_claims_get_exactly_one_winner_each(store: Store) -> None:
    threads, rounds = 32, 1000
    wins: Counter[int] = Counter()
    wins_lock = threading.Lock()
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def racer() -> None:
        try:
            barrier.wait()
            mine = [r for r in range(rounds) if store.add(f"claim:{r}", b"x", ttl=60)]
            with wins_lock:
                wins.update(mine)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=racer) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not errors
    assert len(wins) == rounds
    assert set(wins.values()) == {1}


def test_memory_reads_without_the_lock_see_only_live_values_of_their_own_key() -> None:
    """get() reads without the lock (atomic under the GIL): while writers replace, evict
    and let keys expire, a reader sees its key's current or an earlier value, or None;
    never another key's value and never one that expired on the clock it reads."""
    clock = FakeClock()
    # Writers fill the first 64 keys, then the other 64: 96 slots, so the second half
    # evicts 32 of the first, and the other 32 stay behind, expired, for the readers.
    store = MemoryStore(maxsize=96, clock=clock)
    keys = [f"k{i}" for i in range(128)]
    writers, readers, rounds = 4, 8, 3000
    barrier = threading.Barrier(writers + readers + 1)
    errors: list[str] = []
    seen = Counter[str]()
    slack = 0.25 * writers

    def write(n: int) -> None:
        barrier.wait()
        for r in range(rounds):
            key = keys[(64 if r >= rounds // 2 else 0) + (n * 31 + r) % 64]
            # The expiry is encoded in the value: a reader can tell an expired one.
            expires_at = clock.monotonic() + 1.0
            store.set(key, f"{key}|{expires_at!r}".encode(), ttl=1.0)
            if r % 97 == 0:
                clock.advance(0.25)  # values written over 1 s ago expire

    def read(n: int) -> None:
        barrier.wait()
        for r in range(rounds):
            key = keys[(n * 17 + r) % len(keys)]
            before = clock.monotonic()  # the store's clock at get() is at least this
            value = store.get(key)
            if value is None:
                seen["none"] += 1
                continue
            seen["value"] += 1
            owner, _, expires_at = value.decode().partition("|")
            if owner != key:
                errors.append(f"{key} read {owner}'s value")
            # The store stamps its expiry a moment after the writer read the clock: the
            # other writers may have stepped it meanwhile (slack: one step each).
            elif float(expires_at) + slack <= before:
                errors.append(f"{key} read a value expired at {expires_at}, now {before}")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    threads += [threading.Thread(target=read, args=(n,)) for n in range(readers)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:5]
    assert seen["value"] > 0  # both paths ran (the counts are approximate: no lock)
    assert seen["none"] > 0
    assert len(store) <= 96


def _transfer_python(ops: ScriptOps, keys: list[str], args: list[str]) -> int:
    source, target = keys
    amount = int(args[0])
    have = int(ops.get(source) or b"0")
    if have < amount:
        return 0
    ops.set(source, str(have - amount).encode(), 3600)
    ops.set(target, str(int(ops.get(target) or b"0") + amount).encode(), 3600)
    return 1


TRANSFER: Script[bool] = Script(
    name="transfer",
    lua=(
        "local have = tonumber(redis.call('GET', KEYS[1]) or '0') "
        "local amount = tonumber(ARGV[1]) "
        "if have < amount then return 0 end "
        "redis.call('SET', KEYS[1], tostring(have - amount), 'EX', 3600) "
        "local other = tonumber(redis.call('GET', KEYS[2]) or '0') "
        "redis.call('SET', KEYS[2], tostring(other + amount), 'EX', 3600) "
        "return 1"
    ),
    python=_transfer_python,
    decode=bool,
)


def test_scripts_over_two_keys_in_both_orders_neither_deadlock_nor_lose_a_unit() -> None:
    """A script holds the locks of all its keys (taken in one order): 16 threads moving
    units between 8 accounts, each pair in both directions, keep the total exact."""
    store = MemoryStore()
    accounts = [f"acct:{i}" for i in range(8)]
    for account in accounts:
        store.set(account, b"1000", ttl=3600)
    threads, moves = 16, 500
    barrier = threading.Barrier(threads)

    def mover(n: int) -> None:
        barrier.wait()
        for m in range(moves):
            a, b = accounts[(n + m) % 8], accounts[(n * 3 + m * 5 + 1) % 8]
            if a != b:
                store.run(TRANSFER, [a, b], [1 + m % 3])

    workers = [threading.Thread(target=mover, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not any(w.is_alive() for w in workers), "deadlock: a mover never finished"
    assert sum(int(store.get(a) or b"0") for a in accounts) == 8000


def test_memory_store_under_eviction_from_every_stripe_stays_bounded_and_raises_nothing() -> None:
    """Writes on one lock stripe evict keys of the others: 16 threads claiming,
    completing, deleting, counting and reading over 4x more keys than the store holds
    raise nothing, and the store ends within its bound."""
    store = MemoryStore(maxsize=64)
    keys = [f"key:{i}" for i in range(256)]
    threads, rounds = 16, 2000
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        barrier.wait()
        try:
            for r in range(rounds):
                key = keys[(n * 37 + r * 11) % len(keys)]
                step = r % 6
                if step == 0:
                    store.add_or_get(key, b"claim", ttl=60)
                elif step == 1:
                    store.compare_and_set(key, b"claim", b"done", ttl=60)
                elif step == 2:
                    store.set(key, b"x", ttl=60)
                elif step == 3:
                    store.incr(f"count:{n % 4}")
                elif step == 4:
                    store.compare_and_delete(key, b"done")
                else:
                    value = store.get(key)
                    assert value in (None, b"claim", b"done", b"x"), value
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not errors, errors[:3]
    assert len(store) <= 64


def test_32_threads_incrementing_lose_no_update(store: Store) -> None:
    threads, per_thread = 32, 200
    barrier = threading.Barrier(threads)

    def bump() -> None:
        barrier.wait()
        for _ in range(per_thread):
            store.incr("counter")

    workers = [threading.Thread(target=bump) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert store.get("counter") == str(threads * per_thread).encode()


def _claim_in_process(url: str, prefix: str, rounds: int, start: object, out: object) -> None:
    store = RedisStore(url, key_prefix=prefix)
    start.wait()  # type: ignore[attr-defined]
    mine = [r for r in range(rounds) if store.add(f"claim:{r}", b"x", ttl=60)]
    out.put(mine)  # type: ignore[attr-defined]
    store.close()


def test_4_processes_racing_through_redis_get_exactly_one_winner_each(
    redis_store: RedisStore, redis_url: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    out = ctx.Queue()
    rounds = 500
    procs = [
        ctx.Process(
            target=_claim_in_process,
            args=(redis_url, redis_store.key_prefix, rounds, start, out),
        )
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    start.set()
    wins: Counter[int] = Counter()
    for _ in procs:
        wins.update(out.get(timeout=60))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(wins) == rounds
    assert set(wins.values()) == {1}


# -- URLs and bad input ----------------------------------------------------------------------


def test_store_from_url_memory_with_options() -> None:
    store = store_from_url("memory://?maxsize=42&default_ttl=60")
    assert isinstance(store, MemoryStore)
    assert store.maxsize == 42
    assert store.default_ttl == 60


def test_store_from_url_redis(redis_url: str) -> None:
    store = store_from_url(redis_url, key_prefix="url-test:")
    assert isinstance(store, RedisStore)
    assert store.ping()
    store.close()


@pytest.mark.parametrize(
    ("url", "setting"),
    [
        ("memcached://localhost", "url"),
        ("nonsense", "url"),
        ("memory://?maxsize=0", "maxsize"),
        ("memory://?maxsize=abc", "maxsize"),
        ("memory://?default_ttl=-1", "default_ttl"),
    ],
)
def test_bad_store_url_names_the_setting(url: str, setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        store_from_url(url)
    assert info.value.setting == setting
    assert setting in str(info.value)


def test_store_from_url_rejects_non_string() -> None:
    with pytest.raises(ConfigError):
        store_from_url(42)  # type: ignore[arg-type]


def test_resolve_store_accepts_store_url_or_none() -> None:
    mem = MemoryStore()
    assert resolve_store(mem) is mem
    assert isinstance(resolve_store(None), MemoryStore)
    assert isinstance(resolve_store("memory://"), MemoryStore)
    with pytest.raises(ConfigError):
        resolve_store(3.5)  # type: ignore[arg-type]


def test_unreachable_redis_raises_store_unavailable() -> None:
    from tests.conftest import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2)
    with pytest.raises(StoreUnavailableError):
        store.get("k")
    assert store.ping() is False


def test_redis_url_password_is_redacted() -> None:
    store = RedisStore("redis://:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in store.url
    assert "s3cret" not in repr(store)


def test_memory_store_rewriting_a_key_makes_it_young_again() -> None:
    store = MemoryStore(maxsize=3)
    for key in ("a", "b", "c"):
        store.set(key, b"v")
    store.set("a", b"v2")  # "b" is now the oldest write
    store.set("d", b"v")
    assert store.get("b") is None
    assert [store.get(k) for k in ("a", "c", "d")] == [b"v2", b"v", b"v"]


def test_store_options_in_a_redis_url_configure_the_store_not_the_connection(
    redis_url: str,
) -> None:
    store = store_from_url(f"{redis_url}?key_prefix=opts:&default_ttl=60&socket_timeout=1")
    assert isinstance(store, RedisStore)
    try:
        assert store.key_prefix == "opts:"
        store.set("k", b"v")  # redis-py would fail here if it had received key_prefix
        assert store.get("k") == b"v"
        remaining = store.ttl("k")
        assert remaining is not None
        assert remaining <= 60
    finally:
        store.clear()
        store.close()


def test_memory_add_or_get_claims_a_free_key_or_returns_its_holder() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    assert store.add_or_get("claim", b"me", ttl=30) is None
    assert store.add_or_get("claim", b"you", ttl=30) == b"me"
    assert store.get("claim") == b"me"
    clock.advance(30)  # expired: the key is free again
    assert store.add_or_get("claim", b"you", ttl=30) is None
    assert store.get("claim") == b"you"
    assert store.ttl("claim") == pytest.approx(30)


def test_memory_add_or_get_stays_bounded_and_keeps_the_newest() -> None:
    store = MemoryStore(maxsize=3)
    for key in ("a", "b", "c", "d"):
        assert store.add_or_get(key, b"v", ttl=30) is None
    assert len(store) == 3
    assert store.get("a") is None
    assert store.add_or_get("d", b"w", ttl=30) == b"v"


def test_memory_compare_and_set_over_an_expired_key() -> None:
    clock = FakeClock()
    store = MemoryStore(maxsize=2, clock=clock)
    store.set("old", b"v", ttl=1)
    store.set("other", b"v", ttl=100)
    clock.advance(2)
    assert store.compare_and_set("old", b"v", b"w") is False  # expired: not "v" any more
    assert store.compare_and_set("old", None, b"w") is True  # expired counts as missing
    assert store.get("old") == b"w"
    assert len(store) == 2
    store.set("new", b"v")  # "old" was rewritten after "other": "other" goes first
    assert store.get("other") is None
    assert store.get("old") == b"w"


def test_memory_compare_and_set_makes_the_key_young_again() -> None:
    store = MemoryStore(maxsize=3)
    for key in ("a", "b", "c"):
        store.set(key, b"v")
    assert store.compare_and_set("a", b"v", b"v2") is True  # "b" is now the oldest write
    store.set("d", b"v")
    assert store.get("b") is None
    assert [store.get(k) for k in ("a", "c", "d")] == [b"v2", b"v", b"v"]
