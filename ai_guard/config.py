"""Configuration models: frozen, validated at construction, errors that name the setting.

Each guard keeps its settings in a frozen pydantic model derived from :class:`GuardConfig`
(Resilience4j's split of configuration and runtime object). Build one with
:func:`build_config`, which turns pydantic's ``ValidationError`` into a
:class:`~ai_guard.errors.ConfigError` naming the first bad setting and its value::

    >>> build_config(StoreConfig, url="memcached://x")
    Traceback (most recent call last):
    ...
    ai_guard.errors.ConfigError: invalid setting url='memcached://x': ...
"""

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ai_guard.errors import ConfigError

__all__ = ["STORE_SCHEMES", "GuardConfig", "StoreConfig", "build_config", "config_error"]

C = TypeVar("C", bound=BaseModel)

#: URL schemes :func:`ai_guard.store_from_url` understands.
STORE_SCHEMES = ("memory", "redis", "rediss", "unix")


class GuardConfig(BaseModel):
    """Base of every settings model: frozen, unknown settings rejected, types strict
    enough that ``timeout="abc"`` is an error rather than a surprise."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


def config_error(exc: ValidationError, *, prefix: str = "") -> ConfigError:
    """The :class:`ConfigError` for the first error of a pydantic ``ValidationError``."""
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first.get("loc", ())) or "value"
    return ConfigError(prefix + loc, first.get("input"), first.get("msg", str(exc)))


def build_config(model: type[C], /, *, _prefix: str = "", **values: Any) -> C:
    """Validate ``values`` into ``model``; raise :class:`ConfigError` naming the setting.

    ``_prefix`` is prepended to the setting's name in the message (the Flask extension
    passes ``"AI_GUARD_"`` so the error names the config key the user wrote).
    """
    try:
        return model(**values)
    except ValidationError as exc:
        raise config_error(exc, prefix=_prefix) from None


class StoreConfig(GuardConfig):
    """Settings of a store, as parsed from its URL and options."""

    url: str = "memory://"
    #: Seconds a key lives when the caller gives no TTL (24 h).
    default_ttl: float = Field(default=86400.0, gt=0)
    #: Most keys the in-memory store keeps; the least recently used go first.
    maxsize: int = Field(default=100_000, gt=0)
    #: Prefix of every Redis key, so several applications can share one database.
    key_prefix: str = "ai_guard:"
    #: Seconds to wait for Redis to connect / answer before the store is "unavailable".
    socket_timeout: float = Field(default=2.0, gt=0)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = urlsplit(url).scheme
        if scheme not in STORE_SCHEMES:
            raise ValueError(
                f"unknown store scheme {scheme!r}; use one of "
                + ", ".join(f"{s}://" for s in STORE_SCHEMES)
            )
        return url
