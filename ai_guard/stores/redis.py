"""Redis store: the same interface, shared by every process and host that uses the URL.

Every compound operation is one Redis command or one Lua script, never a
read-modify-write from Python, so exactly-once claims and counters hold across gunicorn
workers. Needs the ``redis`` extra: ``pip install "ai_guard[redis]"``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ai_guard.errors import ConfigError, StoreError, StoreUnavailableError
from ai_guard.stores.base import Script, Store, StoreValue

if TYPE_CHECKING:
    import redis

__all__ = ["RedisStore"]

T = TypeVar("T")

_COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if current then return 0 end
elseif current ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return 1
"""

_COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_INCR = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if value == tonumber(ARGV[1]) and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
"""


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisStore(Store):
    """A store in Redis (``redis://host:port/db``, ``rediss://`` for TLS,
    ``unix:///path/to/socket``).

    ``key_prefix`` (default ``"ai_guard:"``) is put before every key so several
    applications can share a database; ``clear()`` removes only those keys.
    ``socket_timeout`` bounds every command: an unreachable Redis raises
    :class:`~ai_guard.errors.StoreUnavailableError` within it rather than hanging a
    worker. Pass ``client=`` to reuse an existing ``redis.Redis``.
    """

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        key_prefix: str = "ai_guard:",
        default_ttl: float = 86400.0,
        socket_timeout: float = 2.0,
        client: redis.Redis | None = None,
    ) -> None:
        try:
            import redis as redis_lib
        except ImportError:  # pragma: no cover - exercised only without the extra
            raise ConfigError(
                "store_url", url, 'the Redis store needs "pip install ai_guard[redis]"'
            ) from None
        for setting, seconds in (("default_ttl", default_ttl), ("socket_timeout", socket_timeout)):
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, int | float)
                or not 0 < seconds < float("inf")
            ):
                raise ConfigError(setting, seconds, "must be a finite number of seconds > 0")
        self._redis_errors: tuple[type[BaseException], ...] = (
            redis_lib.exceptions.ConnectionError,
            redis_lib.exceptions.TimeoutError,
        )
        self._response_error = redis_lib.exceptions.RedisError
        self.url = _redacted(url)
        self.key_prefix = key_prefix
        self.default_ttl = float(default_ttl)
        if client is None:
            try:
                client = redis_lib.Redis.from_url(
                    url,
                    socket_timeout=socket_timeout,
                    socket_connect_timeout=socket_timeout,
                    decode_responses=False,
                )
            except ValueError as exc:
                raise ConfigError("store_url", self.url, str(exc)) from None
        self._client: redis.Redis = client
        self._scripts: dict[str, Any] = {}
        self._scripts_lock = threading.Lock()
        self._cas = self._register(_COMPARE_AND_SET)
        self._cad = self._register(_COMPARE_AND_DELETE)
        self._incr = self._register(_INCR)

    @property
    def client(self) -> redis.Redis:
        """The underlying ``redis.Redis`` client."""
        return self._client

    def _register(self, lua: str) -> Any:
        with self._scripts_lock:
            registered = self._scripts.get(lua)
            if registered is None:
                registered = self._client.register_script(lua)
                self._scripts[lua] = registered
            return registered

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._redis_errors as exc:
            raise StoreUnavailableError(f"redis store {self.url} unavailable: {exc}") from exc
        except self._response_error as exc:
            raise StoreError(f"redis store {self.url}: {exc}") from exc

    def _ttl_ms(self, ttl: float | None) -> int:
        return _ms(self.default_ttl if ttl is None else ttl)

    # -- the Store interface --------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        value: bytes | None = self._call(self._client.get, self.key_prefix + key)
        return value

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self._call(self._client.set, self.key_prefix + key, value, px=self._ttl_ms(ttl))

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        created = self._call(
            self._client.set, self.key_prefix + key, value, px=self._ttl_ms(ttl), nx=True
        )
        return bool(created)

    def delete(self, key: str) -> bool:
        return bool(self._call(self._client.delete, self.key_prefix + key))

    def compare_and_set(
        self, key: str, expected: bytes | None, value: bytes, ttl: float | None = None
    ) -> bool:
        args = ["1" if expected is None else "0", expected or b"", value, self._ttl_ms(ttl)]
        return bool(self._call(self._cas, keys=[self.key_prefix + key], args=args))

    def compare_and_delete(self, key: str, expected: bytes) -> bool:
        return bool(self._call(self._cad, keys=[self.key_prefix + key], args=[expected]))

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        value = self._call(
            self._incr, keys=[self.key_prefix + key], args=[amount, self._ttl_ms(ttl)]
        )
        return int(value)

    def ttl(self, key: str) -> float | None:
        pttl = int(self._call(self._client.pttl, self.key_prefix + key))
        if pttl == -2:
            return None
        if pttl == -1:  # no expiry: cannot happen for keys we wrote
            return float("inf")
        return pttl / 1000.0

    def run(self, script: Script[T], keys: Sequence[str], args: Sequence[StoreValue] = ()) -> T:
        registered = self._register(script.lua)
        raw = self._call(
            registered,
            keys=[self.key_prefix + k for k in keys],
            args=[repr(a) if isinstance(a, float) else a for a in args],
        )
        return script.decode(raw)

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except self._response_error:
            return False

    def clear(self) -> None:
        pattern = self.key_prefix.replace("*", r"\*") + "*"

        def _clear() -> None:
            batch: list[bytes] = []
            for key in self._client.scan_iter(match=pattern, count=500):
                batch.append(key)
                if len(batch) >= 500:
                    self._client.delete(*batch)
                    batch.clear()
            if batch:
                self._client.delete(*batch)

        self._call(_clear)

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, key_prefix={self.key_prefix!r})"
