"""A breaker's state kept in a store, so that every process sees the same circuit.

Private to :mod:`ai_guard.breaker`. One key per breaker (``breaker:<name>``) holds the
whole shared state as one string::

    <state>|<epoch>|<opened_at>|<deadline>|<trials_in_flight>|<trial_successes>|
        <lease_until>|<failure times>          (one line, no spaces)

``state`` is ``c`` (closed), ``o`` (open) or ``h`` (half-open); times are wall-clock
seconds (``clock.time()``), so processes on different hosts agree as far as their clocks
do; ``failure times`` are the failures inside the window while closed, comma-separated.
``epoch`` changes on every transition (it starts from the wall clock in milliseconds, so
an expired and recreated key never reuses one): an outcome reported for an old epoch (a
trial call admitted before the circuit re-opened) is ignored.

Every transition is one :class:`~ai_guard.stores.Script`: Lua in Redis, Python under the
memory store's lock, same logic, so the transitions are atomic on both backends. A
missing key reads as closed: the key's TTL only collects garbage, it never ends a state
early (it is always longer than the window, the open time and the trial lease together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ai_guard.stores import MemoryStore, Script, ScriptOps, Store

__all__ = ["SharedCircuit", "SharedView"]

CLOSED, OPEN, HALF_OPEN = "c", "o", "h"
OUTCOME_SUCCESS, OUTCOME_FAILURE, OUTCOME_IGNORED = "s", "f", "i"


@dataclass(frozen=True)
class SharedView:
    """The shared state as decoded from the store."""

    state: str = CLOSED
    epoch: int = 0
    opened_at: float = 0.0
    deadline: float = 0.0
    trials_in_flight: int = 0
    trial_successes: int = 0
    lease_until: float = 0.0
    failures: tuple[float, ...] = ()


@dataclass(frozen=True)
class SharedResult:
    """What a transition script answers: the state after it ran, whether it changed the
    state, and (for trial acquisition) whether the caller got a permit."""

    view: SharedView
    transitioned: bool
    granted: bool


def decode_view(raw: bytes | None) -> SharedView:
    """Parse the stored string; a missing or unreadable value is the closed state."""
    if not raw:
        return SharedView()
    try:
        parts = raw.decode("ascii").split("|")
        state, epoch, opened_at, deadline, in_flight, successes, lease, fails = parts
        return SharedView(
            state=state if state in (CLOSED, OPEN, HALF_OPEN) else CLOSED,
            epoch=int(float(epoch)),
            opened_at=float(opened_at),
            deadline=float(deadline),
            trials_in_flight=int(float(in_flight)),
            trial_successes=int(float(successes)),
            lease_until=float(lease),
            failures=tuple(float(f) for f in fails.split(",") if f),
        )
    except (ValueError, UnicodeDecodeError):
        return SharedView()


def encode_view(view: SharedView) -> bytes:
    fails = ",".join(f"{f:.6f}" for f in view.failures)
    return (
        f"{view.state}|{view.epoch:d}|{view.opened_at:.6f}|{view.deadline:.6f}|"
        f"{view.trials_in_flight:d}|{view.trial_successes:d}|{view.lease_until:.6f}|{fails}"
    ).encode("ascii")


def _decode_result(raw: Any) -> SharedResult:
    encoded, transitioned, granted = raw
    return SharedResult(decode_view(encoded), bool(int(transitioned)), bool(int(granted)))


# -- the Lua side: shared helpers prepended to every script ------------------------------

_LUA_COMMON = """
local function load(raw)
  local st = {s='c', epoch=0, opened=0, deadline=0, inflight=0, succ=0, lease=0, fails={}}
  if not raw then return st end
  local s, e, o, d, i, c, l, f = string.match(raw,
    '^(%a)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  if not s then return st end
  st.s = s; st.epoch = tonumber(e) or 0; st.opened = tonumber(o) or 0
  st.deadline = tonumber(d) or 0; st.inflight = tonumber(i) or 0
  st.succ = tonumber(c) or 0; st.lease = tonumber(l) or 0
  for t in string.gmatch(f, '[^,]+') do st.fails[#st.fails + 1] = tonumber(t) end
  return st
end
local function dump(st)
  local parts = {}
  for n, t in ipairs(st.fails) do parts[n] = string.format('%.6f', t) end
  return string.format('%s|%.0f|%.6f|%.6f|%.0f|%.0f|%.6f|%s', st.s, st.epoch, st.opened,
    st.deadline, st.inflight, st.succ, st.lease, table.concat(parts, ','))
end
local function save(st, ttl)
  local raw = dump(st)
  redis.call('SET', KEYS[1], raw, 'PX', math.floor(ttl * 1000))
  return raw
end
local function next_epoch(st, now)
  return math.max(st.epoch + 1, math.floor(now * 1000))
end
local function open(st, now, deadline)
  st.s = 'o'; st.epoch = next_epoch(st, now); st.opened = now; st.deadline = deadline
  st.inflight = 0; st.succ = 0; st.lease = 0; st.fails = {}
end
"""


# -- the Python side: the same helpers ---------------------------------------------------


class _State:
    """Mutable twin of the Lua table ``st``."""

    __slots__ = ("deadline", "epoch", "fails", "inflight", "lease", "opened", "s", "succ")

    def __init__(self, view: SharedView) -> None:
        self.s = view.state
        self.epoch = view.epoch
        self.opened = view.opened_at
        self.deadline = view.deadline
        self.inflight = view.trials_in_flight
        self.succ = view.trial_successes
        self.lease = view.lease_until
        self.fails = list(view.failures)

    def view(self) -> SharedView:
        return SharedView(
            self.s,
            self.epoch,
            self.opened,
            self.deadline,
            self.inflight,
            self.succ,
            self.lease,
            tuple(self.fails),
        )

    def open(self, now: float, deadline: float) -> None:
        self.s = OPEN
        self.epoch = self.next_epoch(now)
        self.opened = now
        self.deadline = deadline
        self.inflight = 0
        self.succ = 0
        self.lease = 0.0
        self.fails = []

    def next_epoch(self, now: float) -> int:
        return max(self.epoch + 1, math.floor(now * 1000))


def _py_load(ops: ScriptOps, key: str) -> _State:
    return _State(decode_view(ops.get(key)))


def _py_save(ops: ScriptOps, key: str, st: _State, ttl: float) -> bytes:
    raw = encode_view(st.view())
    ops.set(key, raw, ttl)
    return raw


# -- record_failure: a failure in closed state; opens at the threshold --------------------
# ARGV: now, window, threshold, timeout, ttl

_RECORD_FAILURE_LUA = (
    _LUA_COMMON
    + """
local now, window, threshold = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local timeout, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local st = load(redis.call('GET', KEYS[1]))
if st.s ~= 'c' then return {dump(st), 0, 0} end
local kept = {}
for _, t in ipairs(st.fails) do if t > now - window then kept[#kept + 1] = t end end
kept[#kept + 1] = now
st.fails = kept
if #kept >= threshold then
  open(st, now, now + timeout)
  return {save(st, ttl), 1, 0}
end
return {save(st, ttl), 0, 0}
"""
)


def _record_failure_py(ops: ScriptOps, keys: list[str], args: list[str]) -> list[Any]:
    now, window, threshold, timeout, ttl = (float(a) for a in args)
    st = _py_load(ops, keys[0])
    if st.s != CLOSED:
        return [encode_view(st.view()), 0, 0]
    st.fails = [t for t in st.fails if t > now - window] + [now]
    if len(st.fails) >= threshold:
        st.open(now, now + timeout)
        return [_py_save(ops, keys[0], st, ttl), 1, 0]
    return [_py_save(ops, keys[0], st, ttl), 0, 0]


RECORD_FAILURE: Script[SharedResult] = Script(
    name="breaker_record_failure",
    lua=_RECORD_FAILURE_LUA,
    python=_record_failure_py,
    decode=_decode_result,
)

# -- trip: open a closed circuit (a process decided it alone: failure rate, outage) -------
# ARGV: now, deadline, ttl

_TRIP_LUA = (
    _LUA_COMMON
    + """
local now, deadline, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local st = load(redis.call('GET', KEYS[1]))
if st.s ~= 'c' then return {dump(st), 0, 0} end
open(st, now, deadline)
return {save(st, ttl), 1, 0}
"""
)


def _trip_py(ops: ScriptOps, keys: list[str], args: list[str]) -> list[Any]:
    now, deadline, ttl = (float(a) for a in args)
    st = _py_load(ops, keys[0])
    if st.s != CLOSED:
        return [encode_view(st.view()), 0, 0]
    st.open(now, deadline)
    return [_py_save(ops, keys[0], st, ttl), 1, 0]


TRIP: Script[SharedResult] = Script(
    name="breaker_trip", lua=_TRIP_LUA, python=_trip_py, decode=_decode_result
)

# -- acquire_trial: open past its deadline -> half-open; hand out bounded trial permits ---
# ARGV: now, max_calls, lease, ttl. A closed circuit answers granted (a normal call).

_ACQUIRE_TRIAL_LUA = (
    _LUA_COMMON
    + """
local now, max_calls = tonumber(ARGV[1]), tonumber(ARGV[2])
local lease, ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local st = load(redis.call('GET', KEYS[1]))
if st.s == 'c' then return {dump(st), 0, 1} end
local moved = 0
if st.s == 'o' then
  if now < st.deadline then return {dump(st), 0, 0} end
  st.s = 'h'; st.epoch = next_epoch(st, now); st.inflight = 0; st.succ = 0; st.lease = 0
  moved = 1
end
if st.inflight > 0 and st.lease <= now then st.inflight = 0 end
if st.inflight < max_calls then
  st.inflight = st.inflight + 1
  st.lease = now + lease
  return {save(st, ttl), moved, 1}
end
if moved == 1 then return {save(st, ttl), 1, 0} end
return {dump(st), 0, 0}
"""
)


def _acquire_trial_py(ops: ScriptOps, keys: list[str], args: list[str]) -> list[Any]:
    now, max_calls, lease, ttl = (float(a) for a in args)
    st = _py_load(ops, keys[0])
    if st.s == CLOSED:
        return [encode_view(st.view()), 0, 1]
    moved = 0
    if st.s == OPEN:
        if now < st.deadline:
            return [encode_view(st.view()), 0, 0]
        st.s = HALF_OPEN
        st.epoch = st.next_epoch(now)
        st.inflight = 0
        st.succ = 0
        st.lease = 0.0
        moved = 1
    # A permit whose holder never reported back (its process died) is given back when the
    # lease runs out, so a crashed trial cannot keep the circuit half-open forever.
    if st.inflight > 0 and st.lease <= now:
        st.inflight = 0
    if st.inflight < max_calls:
        st.inflight += 1
        st.lease = now + lease
        return [_py_save(ops, keys[0], st, ttl), moved, 1]
    if moved:
        return [_py_save(ops, keys[0], st, ttl), 1, 0]
    return [encode_view(st.view()), 0, 0]


ACQUIRE_TRIAL: Script[SharedResult] = Script(
    name="breaker_acquire_trial",
    lua=_ACQUIRE_TRIAL_LUA,
    python=_acquire_trial_py,
    decode=_decode_result,
)

# -- trial_result: a trial call ended; close after enough successes, re-open on failure ---
# ARGV: epoch, outcome (s/f/i), now, success_threshold, timeout, ttl

_TRIAL_RESULT_LUA = (
    _LUA_COMMON
    + """
local epoch, outcome, now = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local threshold, timeout, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local st = load(redis.call('GET', KEYS[1]))
if st.s ~= 'h' or st.epoch ~= epoch then return {dump(st), 0, 0} end
st.inflight = math.max(0, st.inflight - 1)
if outcome == 's' then
  st.succ = st.succ + 1
  if st.succ >= threshold then
    st.s = 'c'; st.epoch = next_epoch(st, now); st.inflight = 0; st.succ = 0; st.lease = 0
    st.fails = {}
    return {save(st, ttl), 1, 0}
  end
elseif outcome == 'f' then
  open(st, now, now + timeout)
  return {save(st, ttl), 1, 0}
end
return {save(st, ttl), 0, 0}
"""
)


def _trial_result_py(ops: ScriptOps, keys: list[str], args: list[str]) -> list[Any]:
    epoch = int(float(args[0]))
    outcome = args[1]
    now, threshold, timeout, ttl = (float(a) for a in args[2:])
    st = _py_load(ops, keys[0])
    if st.s != HALF_OPEN or st.epoch != epoch:
        return [encode_view(st.view()), 0, 0]
    st.inflight = max(0, st.inflight - 1)
    if outcome == OUTCOME_SUCCESS:
        st.succ += 1
        if st.succ >= threshold:
            st.s = CLOSED
            st.epoch = st.next_epoch(now)
            st.inflight = 0
            st.succ = 0
            st.lease = 0.0
            st.fails = []
            return [_py_save(ops, keys[0], st, ttl), 1, 0]
    elif outcome == OUTCOME_FAILURE:
        st.open(now, now + timeout)
        return [_py_save(ops, keys[0], st, ttl), 1, 0]
    return [_py_save(ops, keys[0], st, ttl), 0, 0]


TRIAL_RESULT: Script[SharedResult] = Script(
    name="breaker_trial_result",
    lua=_TRIAL_RESULT_LUA,
    python=_trial_result_py,
    decode=_decode_result,
)


class SharedCircuit:
    """The store side of one breaker: reads and atomic transitions of its shared state.

    Every method may raise :class:`~ai_guard.errors.StoreError` (the breaker decides what
    an unreachable store means). ``now`` arguments are wall-clock seconds.
    """

    __slots__ = (
        "_lease",
        "_max_trials",
        "_success_threshold",
        "_threshold",
        "_timeout",
        "_ttl",
        "_window",
        "in_process",
        "key",
        "store",
    )

    def __init__(
        self,
        store: Store,
        name: str,
        *,
        window: float,
        failure_threshold: int | None,
        timeout: float,
        success_threshold: int,
        max_trials: int,
        lease: float,
    ) -> None:
        self.store = store
        self.key = f"breaker:{name}"
        #: A memory store lives in this process: the state is shared only with the other
        #: breakers of this process on the same store (event reasons say so).
        self.in_process = isinstance(store, MemoryStore)
        self._window = window
        # Without a count threshold (failure-rate only) failures are not counted here.
        self._threshold = failure_threshold
        self._timeout = timeout
        self._success_threshold = success_threshold
        self._max_trials = max_trials
        self._lease = lease
        # Only garbage collection: longer than anything the state must outlive.
        self._ttl = window + timeout + lease + 60.0

    @property
    def counts_failures(self) -> bool:
        """Whether failures are counted in the store (a count threshold is set)."""
        return self._threshold is not None

    def read(self) -> SharedView:
        return decode_view(self.store.get(self.key))

    def record_failure(self, now: float) -> SharedResult:
        assert self._threshold is not None
        return self.store.run(
            RECORD_FAILURE,
            [self.key],
            [now, self._window, self._threshold, self._timeout, self._ttl],
        )

    def trip(self, now: float, deadline: float) -> SharedResult:
        return self.store.run(TRIP, [self.key], [now, deadline, self._ttl])

    def acquire_trial(self, now: float) -> SharedResult:
        return self.store.run(
            ACQUIRE_TRIAL, [self.key], [now, self._max_trials, self._lease, self._ttl]
        )

    def trial_result(self, epoch: int, outcome: str, now: float) -> SharedResult:
        return self.store.run(
            TRIAL_RESULT,
            [self.key],
            [epoch, outcome, now, self._success_threshold, self._timeout, self._ttl],
        )

    def reset(self) -> None:
        self.store.delete(self.key)
