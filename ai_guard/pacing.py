"""Proactive pacing: a rate-limit budget per upstream, fed by every response's headers,
that holds a call back until the window resets instead of letting it earn a 429.

One :class:`RateLimitBudget` per upstream key (base URL + model, say) lives in a store:
the memory store shares it between the threads of a process, a Redis store between
processes and hosts. Its two operations are atomic :class:`~ai_guard.stores.Script`\\ s,
written once in Lua for Redis and once in Python for the memory store:

- ``reserve(estimated_tokens)`` before a call: either a :class:`Reservation` (the call is
  counted *in flight*: one request and its estimated tokens, in the same atomic step, so
  50 threads reading "3 remaining" do not all go), or the seconds until the exhausted
  window resets (nothing reserved: wait, then ask again). ``acquire()`` is the same
  returning only the wait.
- ``observe(headers, reservation=...)`` after **every** answer (200, 429, 5xx, even none):
  the limits, remaining counts and resets the upstream reported, and the end of that call's
  flight.

The arithmetic, per dimension (requests, tokens)::

    available = remaining (the upstream's latest word) - in flight (reserved, unanswered)

Subtracting what is in flight, rather than decrementing a copy of the upstream's count,
means the estimate corrects itself as answers arrive: a call the upstream had already
counted stops being subtracted the moment it lands. A call that ends without a word from
the upstream (no rate-limit headers, no answer) is assumed counted: remaining drops by
what it reserved.

How the upstream's words merge, so that a slow thread's old news never overwrites newer
news: each report is *remaining R until deadline D = now + reset* (wall-clock,
``clock.time()``, so processes agree). A deadline later than the known one by more than
``window_tolerance`` is a new window and replaces the state; one within the tolerance is
the same window, where the *smaller* remaining wins (counts only fall within a window);
an earlier one is an older window's, ignored. When the deadline passes, the window is
refilled to its limit *provisionally* (the next deadline guessed from the longest reset
seen), calls still in flight are forgotten, and their answers, reserved in the old window
(an older *epoch*), no longer count.

A ``retry-after`` on an answer (a 429, a 503) holds every caller back until then. When the
store fails (Redis down) pacing turns itself off with a WARNING (at most once a minute)
and calls go through unpaced; ``@rate_limited`` still handles any 429.
"""

from __future__ import annotations

import logging
import math
import string
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from ai_guard.clock import SYSTEM_CLOCK, Clock
from ai_guard.config import GuardConfig, build_config
from ai_guard.errors import ConfigError, StoreError
from ai_guard.ratelimit import MAX_DURATION, RateLimitInfo, parse_rate_limit_headers
from ai_guard.stores import Script, ScriptOps, Store, resolve_store

__all__ = [
    "BudgetConfig",
    "BudgetSnapshot",
    "RateLimitBudget",
    "Reservation",
    "WindowSnapshot",
]

logger = logging.getLogger("ai_guard.ratelimit")

# A wait for a window reset ends this much after the deadline, so that the caller's next
# reserve() surely sees the window over (float rounding, clocks read a hair apart).
_WAKE_MARGIN = 0.001
# A failing store is reported at most this often (seconds), not once per call.
_WARNING_INTERVAL = 60.0
# Bound on the per-budget cache of bound keys ("openai:{model}" -> one per model).
_MAX_BOUND_KEYS = 1024


class BudgetConfig(GuardConfig):
    """The settings of a :class:`RateLimitBudget`."""

    key: str = Field(min_length=1, max_length=512)
    #: Fraction of each window's limit kept unused, for clients outside this budget.
    safety_margin: float = Field(default=0.0, ge=0, lt=1, allow_inf_nan=False)
    #: Deadlines within this many seconds belong to the same window.
    window_tolerance: float = Field(default=0.5, ge=0, le=60, allow_inf_nan=False)
    #: Window length assumed when an answer has remaining counts but no reset.
    default_reset: float = Field(default=1.0, gt=0, le=MAX_DURATION, allow_inf_nan=False)
    #: Seconds the budget's state lives in the store after its last update.
    ttl: float = Field(default=3600.0, gt=0, allow_inf_nan=False)

    @field_validator("key")
    @classmethod
    def _template(cls, key: str) -> str:
        try:
            list(string.Formatter().parse(key))
        except ValueError as exc:
            raise ValueError(f"not a valid key template: {exc}") from None
        return key


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer of :meth:`RateLimitBudget.reserve`.

    ``wait > 0``: nothing was reserved; wait that many seconds and reserve again.
    ``wait == 0``: the call is counted in flight; hand this object to
    :meth:`RateLimitBudget.observe` with the answer's headers when the call ends.
    """

    wait: float
    requests_epoch: int | None = None
    tokens_epoch: int | None = None
    tokens: int = 0

    @property
    def reserved(self) -> bool:
        """Whether the call was reserved (and may be sent now)."""
        return self.wait <= 0.0


_NOT_PACED = Reservation(0.0)


@dataclass(frozen=True, slots=True)
class WindowSnapshot:
    """One dimension of a budget as stored: the upstream's latest ``remaining`` until
    ``resets_at`` (wall time), the calls or tokens ``in_flight``; ``provisional`` when the
    window was refilled locally and the upstream has not confirmed it yet."""

    limit: float | None
    remaining: float | None
    in_flight: float
    resets_at: float | None
    provisional: bool

    @property
    def available(self) -> float | None:
        """What a new call may still use (``None``: unknown, so unlimited)."""
        return None if self.remaining is None else self.remaining - self.in_flight


@dataclass(frozen=True, slots=True)
class BudgetSnapshot:
    """The stored state of a budget (for tests, health pages and debugging)."""

    requests: WindowSnapshot
    tokens: WindowSnapshot


# -- the state and its two atomic operations ---------------------------------------------
#
# The state of one key is fourteen numbers as text, "n" for unknown: for requests then
# tokens, the limit, remaining (the upstream's latest word), in flight (reserved, not yet
# answered), deadline (wall time), epoch (+1 at every local refill: answers to calls
# reserved in an earlier epoch are stale), provisional (1: refilled locally, unconfirmed)
# and span (the longest reset seen: the guess of the window's length).

_FIELDS_PER_WINDOW = 7

_LUA_PRELUDE = """
local now = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local default_reset = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])

local function num(s)
  if s == nil or s == 'n' or s == '' then return nil end
  return tonumber(s)
end
local function fmt(x)
  if x == nil then return 'n' end
  return string.format('%.17g', x)
end

local fields = {}
local raw = redis.call('GET', KEYS[1])
if raw then
  local i, valid = 0, true
  for token in string.gmatch(raw, '%S+') do
    i = i + 1
    if token ~= 'n' and tonumber(token) == nil then valid = false end
    fields[i] = num(token)
  end
  if i ~= 14 or not valid then fields = {} end
end
local function window(o)
  return {limit = fields[o + 1], remaining = fields[o + 2], inflight = fields[o + 3] or 0,
          deadline = fields[o + 4], epoch = fields[o + 5] or 0,
          provisional = fields[o + 6] or 0, span = fields[o + 7]}
end
local function dump(w)
  return table.concat({fmt(w.limit), fmt(w.remaining), fmt(w.inflight), fmt(w.deadline),
                       fmt(w.epoch), fmt(w.provisional), fmt(w.span)}, ' ')
end
local requests, tokens = window(0), window(7)

local function normalize(w)
  if w.deadline ~= nil and w.deadline <= now then
    w.inflight = 0
    w.epoch = w.epoch + 1
    if w.limit == nil then
      w.remaining = nil
      w.deadline = nil
      w.provisional = 0
    else
      local span = w.span
      if span == nil or span <= 0 then span = default_reset end
      w.deadline = w.deadline + (math.floor((now - w.deadline) / span) + 1) * span
      w.remaining = w.limit
      w.provisional = 1
    end
  end
end
normalize(requests)
normalize(tokens)

local function save()
  redis.call('SET', KEYS[1], dump(requests) .. ' ' .. dump(tokens),
             'PX', math.max(1, math.floor(ttl * 1000)))
end
"""

_LUA_OBSERVE = (
    _LUA_PRELUDE
    + """
local function observe(w, limit, remaining, reset, epoch, release)
  if limit ~= nil then w.limit = limit end
  if reset ~= nil and (w.span == nil or reset > w.span) then w.span = reset end
  if epoch ~= nil then
    if epoch ~= w.epoch then return end
    w.inflight = math.max(0, w.inflight - release)
    if remaining == nil and w.remaining ~= nil then
      w.remaining = math.max(0, w.remaining - release)
    end
  end
  if remaining == nil then return end
  local deadline = now + (reset or default_reset)
  if w.remaining == nil or w.deadline == nil or w.provisional == 1 then
    if w.remaining ~= nil and w.remaining < remaining then remaining = w.remaining end
    w.remaining = remaining
    w.deadline = deadline
    w.provisional = 0
  elseif deadline > w.deadline + tolerance then
    w.remaining = remaining
    w.deadline = deadline
  elseif deadline >= w.deadline - tolerance then
    if remaining < w.remaining then w.remaining = remaining end
    if deadline > w.deadline then w.deadline = deadline end
  end
end
observe(requests, num(ARGV[8]), num(ARGV[9]), num(ARGV[10]), num(ARGV[5]), 1)
observe(tokens, num(ARGV[11]), num(ARGV[12]), num(ARGV[13]), num(ARGV[6]), num(ARGV[7]) or 0)
save()
return 1
"""
)

_LUA_RESERVE = (
    _LUA_PRELUDE
    + """
local need = tonumber(ARGV[5])
local margin_fraction = tonumber(ARGV[6])
local function margin(w)
  if w.limit == nil then return 0 end
  return math.floor(w.limit * margin_fraction)
end
local wait = 0
if requests.remaining ~= nil
    and requests.remaining - requests.inflight - margin(requests) < 1 then
  wait = (requests.deadline or now) - now
end
if tokens.remaining ~= nil then
  local m = margin(tokens)
  local available = tokens.remaining - tokens.inflight - m
  local untouched = tokens.limit ~= nil and tokens.inflight == 0
    and tokens.remaining >= tokens.limit - m and available >= 1
  if available < math.max(need, 1) and not untouched then
    local w = (tokens.deadline or now) - now
    if w > wait then wait = w end
  end
end
if wait > 0 then
  save()
  return fmt(wait)
end
requests.inflight = requests.inflight + 1
tokens.inflight = tokens.inflight + need
save()
return '0 ' .. fmt(requests.epoch) .. ' ' .. fmt(tokens.epoch)
"""
)


def _num(text: str) -> float | None:
    if not text or text == "n":
        return None
    return float(text)


def _fmt(value: float | None) -> str:
    # repr is the shortest exact form; Lua's tonumber reads it back bit for bit.
    return "n" if value is None else repr(value)


def _parse_state(raw: bytes | None) -> list[float | None]:
    if not raw:
        return [None] * (2 * _FIELDS_PER_WINDOW)
    try:
        values: list[float | None] = [None if t == b"n" else float(t) for t in raw.split()]
    except ValueError:
        values = []
    if len(values) != 2 * _FIELDS_PER_WINDOW:  # not a state we wrote: start afresh
        return [None] * (2 * _FIELDS_PER_WINDOW)
    return values


class _Window:
    """One dimension of the state; the Python twin of the Lua table above."""

    __slots__ = ("deadline", "epoch", "inflight", "limit", "provisional", "remaining", "span")

    def __init__(self, values: list[float | None]) -> None:
        self.limit, self.remaining, inflight, self.deadline, epoch, provisional, self.span = values
        self.inflight = inflight or 0.0
        self.epoch = epoch or 0.0
        self.provisional = provisional or 0.0

    def dump(self) -> str:
        return (
            f"{_fmt(self.limit)} {_fmt(self.remaining)} {self.inflight!r} "
            f"{_fmt(self.deadline)} {self.epoch!r} {self.provisional!r} {_fmt(self.span)}"
        )

    def normalize(self, now: float, default_reset: float) -> None:
        if self.deadline is not None and self.deadline <= now:
            # The window is over: what was in flight belonged to it; a new epoch begins.
            self.inflight = 0.0
            self.epoch += 1
            if self.limit is None:
                self.remaining = self.deadline = None
                self.provisional = 0.0
            else:
                span = self.span if self.span is not None and self.span > 0 else default_reset
                periods = math.floor((now - self.deadline) / span) + 1
                self.deadline = self.deadline + periods * span
                self.remaining = self.limit
                self.provisional = 1.0

    def observe(
        self,
        report: tuple[float | None, float | None, float | None],
        epoch: float | None,
        release: float,
        now: float,
        tolerance: float,
        default_reset: float,
    ) -> None:
        limit, remaining, reset = report
        if limit is not None:
            self.limit = limit
        if reset is not None and (self.span is None or reset > self.span):
            self.span = reset
        if epoch is not None:
            if epoch != self.epoch:
                return  # reserved in an earlier window: its news is about that window
            self.inflight = max(0.0, self.inflight - release)
            if remaining is None and self.remaining is not None:
                # No word from the upstream: assume it counted the call.
                self.remaining = max(0.0, self.remaining - release)
        if remaining is None:
            return
        deadline = now + (default_reset if reset is None else reset)
        if self.remaining is None or self.deadline is None or self.provisional == 1:
            if self.remaining is not None and self.remaining < remaining:
                remaining = self.remaining
            self.remaining, self.deadline, self.provisional = remaining, deadline, 0.0
        elif deadline > self.deadline + tolerance:
            self.remaining, self.deadline = remaining, deadline
        elif deadline >= self.deadline - tolerance:
            if remaining < self.remaining:
                self.remaining = remaining
            if deadline > self.deadline:
                self.deadline = deadline
        # else: an older window's news, ignored


class _State:
    """The key's two windows, loaded and normalised at ``now`` (the Lua prelude)."""

    __slots__ = ("default_reset", "key", "now", "ops", "requests", "tokens", "tolerance", "ttl")

    def __init__(self, ops: ScriptOps, keys: list[str], args: list[str]) -> None:
        self.ops = ops
        self.key = keys[0]
        self.now = float(args[0])
        self.tolerance = float(args[1])
        self.default_reset = float(args[2])
        self.ttl = float(args[3])
        values = _parse_state(ops.get(self.key))
        self.requests = _Window(values[:_FIELDS_PER_WINDOW])
        self.tokens = _Window(values[_FIELDS_PER_WINDOW:])
        self.requests.normalize(self.now, self.default_reset)
        self.tokens.normalize(self.now, self.default_reset)

    def save(self) -> None:
        value = f"{self.requests.dump()} {self.tokens.dump()}".encode()
        self.ops.set(self.key, value, self.ttl)


def _observe_python(ops: ScriptOps, keys: list[str], args: list[str]) -> int:
    # args: now, tolerance, default_reset, ttl, the reservation (requests epoch, tokens
    # epoch, tokens), then the report if any (limit, remaining, reset for requests, tokens).
    state = _State(ops, keys, args)
    common = (state.now, state.tolerance, state.default_reset)
    report = [_num(a) for a in args[7:13]] + [None] * (13 - max(7, len(args)))
    state.requests.observe((report[0], report[1], report[2]), _num(args[4]), 1.0, *common)
    released_tokens = _num(args[6]) or 0.0
    state.tokens.observe((report[3], report[4], report[5]), _num(args[5]), released_tokens, *common)
    state.save()
    return 1


def _reserve_python(ops: ScriptOps, keys: list[str], args: list[str]) -> bytes:
    state = _State(ops, keys, args)
    now = state.now
    need = float(args[4])
    margin_fraction = float(args[5])
    requests, tokens = state.requests, state.tokens

    def margin(window: _Window) -> float:
        return 0.0 if window.limit is None else float(math.floor(window.limit * margin_fraction))

    wait = 0.0
    if (
        requests.remaining is not None
        and requests.remaining - requests.inflight - margin(requests) < 1
    ):
        wait = (now if requests.deadline is None else requests.deadline) - now
    if tokens.remaining is not None:
        m = margin(tokens)
        available = tokens.remaining - tokens.inflight - m
        # A call larger than a whole window goes alone at the start of one, or never would.
        untouched = (
            tokens.limit is not None
            and tokens.inflight == 0
            and tokens.remaining >= tokens.limit - m
            and available >= 1
        )
        if available < max(need, 1.0) and not untouched:
            wait = max(wait, (now if tokens.deadline is None else tokens.deadline) - now)
    if wait > 0:
        state.save()
        return _fmt(wait).encode()
    requests.inflight += 1
    tokens.inflight += need
    state.save()
    return f"0 {_fmt(requests.epoch)} {_fmt(tokens.epoch)}".encode()


def _decode_reservation(raw: Any) -> tuple[float, int | None, int | None]:
    parts = (raw.decode() if isinstance(raw, bytes) else str(raw)).split()
    wait = float(parts[0])
    if wait > 0 or len(parts) < 3:
        return wait, None, None
    return 0.0, int(float(parts[1])), int(float(parts[2]))


OBSERVE = Script(name="ratelimit_observe", lua=_LUA_OBSERVE, python=_observe_python, decode=int)
RESERVE = Script(
    name="ratelimit_reserve", lua=_LUA_RESERVE, python=_reserve_python, decode=_decode_reservation
)


class _TemplateFields(dict[str, str]):
    def __missing__(self, name: str) -> str:
        return "-"


class RateLimitBudget:
    """The shared rate-limit budget of one upstream key; see the module docstring.

    ``store`` is a :class:`~ai_guard.stores.Store`, a URL (``"redis://127.0.0.1:6379/0"``)
    or ``None`` for a memory store of its own (share the *object* between the decorators
    of one process; share a Redis URL between processes). ``key`` names the upstream, e.g.
    ``"https://api.openai.com/v1|gpt-4o-mini"``; a key with ``{fields}`` such as
    ``"openai:{model}"`` is a template: ``@rate_limited`` keeps one budget per value of the
    call's ``model=`` keyword (a missing field reads ``-``).

    ``safety_margin`` keeps that fraction of each window unused (for clients that do not
    share this budget); ``window_tolerance`` (seconds) is how far apart two reports of the
    same window's deadline may be; ``default_reset`` the window assumed when an answer has
    counts but no reset; ``ttl`` how long the state outlives its last update. Deadlines are
    wall-clock (``clock.time()``): processes sharing a Redis budget need synchronised clocks
    (NTP), as they already do for TLS.

    Example::

        budget = RateLimitBudget("redis://127.0.0.1:6379/0", key="openai|gpt-4o-mini")

        @rate_limited(max_retries=3, budget=budget)
        def ask(*, messages: list[dict[str, str]]) -> requests.Response: ...

    Used by hand::

        reservation = budget.reserve(estimated_tokens=1200)
        while not reservation.reserved:
            time.sleep(reservation.wait)
            reservation = budget.reserve(estimated_tokens=1200)
        response = session.post(...)
        budget.observe(response.headers, reservation=reservation)
    """

    def __init__(
        self,
        store: Store | str | None = None,
        key: str = "default",
        *,
        clock: Clock = SYSTEM_CLOCK,
        safety_margin: float = 0.0,
        window_tolerance: float = 0.5,
        default_reset: float = 1.0,
        ttl: float = 3600.0,
    ) -> None:
        if not isinstance(clock, Clock):
            raise ConfigError("clock", clock, "must be a Clock (monotonic, time, sleep)")
        self.config = build_config(
            BudgetConfig,
            key=key,
            safety_margin=safety_margin,
            window_tolerance=window_tolerance,
            default_reset=default_reset,
            ttl=ttl,
        )
        self.store = resolve_store(store, clock=clock)
        self.clock = clock
        key = self.config.key  # as validated (a str), not as given
        self.key = key
        self._store_key = f"ratelimit:budget:{key}"
        self._fixed_args = (
            repr(self.config.window_tolerance),
            repr(self.config.default_reset),
            repr(self.config.ttl),
        )
        self._margin = repr(self.config.safety_margin)
        self._fields = tuple(
            name for _, name, _, _ in string.Formatter().parse(key) if name is not None
        )
        self._bound: dict[str, RateLimitBudget] = {}
        self._bound_lock = threading.Lock()
        self._warned_at = -math.inf

    # -- templates ------------------------------------------------------------------------

    @property
    def is_template(self) -> bool:
        """Whether the key has ``{fields}`` filled in per call."""
        return bool(self._fields)

    def bind(self, **fields: object) -> RateLimitBudget:
        """The budget of the key with ``fields`` filled in (sharing store and settings);
        ``self`` when the key is not a template."""
        if not self._fields:
            return self
        key = self.key.format_map(_TemplateFields({k: str(v) for k, v in fields.items()}))
        bound = self._bound.get(key)
        if bound is not None:
            return bound
        bound = self._child(key)
        with self._bound_lock:
            if len(self._bound) < _MAX_BOUND_KEYS:
                bound = self._bound.setdefault(key, bound)
        return bound

    def bind_call(self, kwargs: Mapping[str, Any]) -> RateLimitBudget:
        """The budget for a call with these keyword arguments (used by ``@rate_limited``)."""
        if not self._fields:
            return self
        return self.bind(**{name: kwargs.get(name, "-") for name in self._fields})

    def _child(self, key: str) -> RateLimitBudget:
        # Same store and settings, a concrete key (not parsed as a template again).
        child = object.__new__(RateLimitBudget)
        child.__dict__.update(self.__dict__)
        child.key = key
        child._store_key = f"ratelimit:budget:{key}"
        child._fields = ()
        child._bound = {}
        child._bound_lock = threading.Lock()
        child._warned_at = -math.inf
        return child

    # -- the two operations ---------------------------------------------------------------

    def reserve(self, estimated_tokens: int = 0) -> Reservation:
        """Reserve a call of ``estimated_tokens`` tokens, atomically.

        When the known budget covers it (available requests >= 1 and available tokens >=
        the estimate), the call is counted in flight and the :class:`Reservation` has
        ``wait == 0``: send the call, then pass the reservation to :meth:`observe`. Else
        nothing is reserved and ``wait`` is the seconds until the exhausted window resets.
        With nothing known yet the call is reserved (so the first burst is counted too); with
        the store unavailable it goes through unpaced. A call larger than a whole window's
        token limit is let through alone at the start of a window rather than held forever.
        """
        tokens = int(estimated_tokens) if estimated_tokens > 0 else 0
        args = (repr(self.clock.time()), *self._fixed_args, str(tokens), self._margin)
        try:
            wait, requests_epoch, tokens_epoch = self.store.run(RESERVE, [self._store_key], args)
        except StoreError as exc:
            self._store_failed(exc)
            return _NOT_PACED
        if wait > 0:
            return Reservation(wait + _WAKE_MARGIN)
        return Reservation(0.0, requests_epoch, tokens_epoch, tokens)

    def acquire(self, estimated_tokens: int = 0) -> float:
        """:meth:`reserve` returning only the wait: ``0.0`` when the call is reserved, else
        the seconds until the window resets. A call reserved this way stays counted in flight
        until its window ends (there is no reservation to hand to :meth:`observe`)."""
        return self.reserve(estimated_tokens).wait

    def observe(self, headers: object, *, reservation: Reservation | None = None) -> None:
        """Update the budget from an answer's headers (any mapping, or a parsed
        :class:`~ai_guard.ratelimit.RateLimitInfo`; ``None`` when the call got no answer)
        and end the flight of ``reservation``. Call it for *every* call that was reserved,
        whatever its outcome, and for any other answer from the upstream you see."""
        info = parse_rate_limit_headers(headers, clock=self.clock) if headers else None
        if reservation is not None and not reservation.reserved:
            reservation = None
        remaining_requests = reset_requests = None
        if info is not None:
            remaining_requests, reset_requests = info.remaining_requests, info.reset_requests
            if (
                info.retry_after is not None
                and info.retry_after > 0
                and not info.requests_exhausted
                and not info.tokens_exhausted
            ):
                # The upstream told this caller to wait: hold everyone back until then.
                remaining_requests = 0
                reset_requests = max(info.retry_after, reset_requests or 0.0)
            if _nothing_to_learn(info, remaining_requests):
                info = None
        if info is None and (reservation is None or reservation.requests_epoch is None):
            return
        args: tuple[str, ...] = (
            repr(self.clock.time()),
            *self._fixed_args,
            _arg(None if reservation is None else reservation.requests_epoch),
            _arg(None if reservation is None else reservation.tokens_epoch),
            str(0 if reservation is None else reservation.tokens),
        )
        if info is not None:  # a bare release sends no report
            args += (
                _arg(info.limit_requests),
                _arg(remaining_requests),
                _arg(reset_requests),
                _arg(info.limit_tokens),
                _arg(info.remaining_tokens),
                _arg(info.reset_tokens),
            )
        try:
            self.store.run(OBSERVE, [self._store_key], args)
        except StoreError as exc:
            self._store_failed(exc)

    def release(self, reservation: Reservation) -> None:
        """End the flight of a reserved call that got no answer worth reading."""
        self.observe(None, reservation=reservation)

    # -- inspection -----------------------------------------------------------------------

    def snapshot(self) -> BudgetSnapshot:
        """The stored state, as last written (a window past its deadline is shown as
        stored; the next operation refills it)."""
        values = _parse_state(self.store.get(self._store_key))

        def window(offset: int) -> WindowSnapshot:
            return WindowSnapshot(
                limit=values[offset],
                remaining=values[offset + 1],
                in_flight=values[offset + 2] or 0.0,
                resets_at=values[offset + 3],
                provisional=values[offset + 5] == 1,
            )

        return BudgetSnapshot(requests=window(0), tokens=window(_FIELDS_PER_WINDOW))

    def reset(self) -> None:
        """Forget everything learnt about this key."""
        self.store.delete(self._store_key)

    def _store_failed(self, exc: StoreError) -> None:
        now = self.clock.monotonic()
        if now - self._warned_at >= _WARNING_INTERVAL:
            self._warned_at = now  # a benign race: at worst two threads both warn
            logger.warning(
                "rate-limit budget %r: store unavailable (%s); pacing is off, calls go "
                "through unpaced",
                self.key,
                exc,
                extra={"budget": self.key, "store": self.store.url},
            )

    def __repr__(self) -> str:
        return f"RateLimitBudget({self.store!r}, key={self.key!r})"


def _arg(value: float | None) -> str:
    return "n" if value is None else repr(float(value))


def _nothing_to_learn(info: RateLimitInfo, remaining_requests: int | None) -> bool:
    return (
        remaining_requests is None
        and info.remaining_tokens is None
        and info.limit_requests is None
        and info.limit_tokens is None
        and info.reset_requests is None
        and info.reset_tokens is None
    )
