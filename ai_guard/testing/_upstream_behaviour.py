"""What the fake upstream does, apart from HTTP: its settings, token counting, replies,
prompt caching, the quota, and JSON generated from a schema.

Everything here is pure or guarded by its own lock, so it is tested without a socket.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from ai_guard.clock import SYSTEM_CLOCK, Clock
from ai_guard.config import GuardConfig

__all__ = [
    "CACHE_INCREMENT_TOKENS",
    "CACHE_MIN_PROMPT_TOKENS",
    "CHARS_PER_TOKEN",
    "DEFAULT_FAKE_MODELS",
    "FixedWindowQuota",
    "PromptCache",
    "QuotaDecision",
    "UpstreamBehaviour",
    "estimate_tokens",
    "format_go_duration",
    "message_text",
    "prompt_tokens",
    "reply_text",
    "value_from_schema",
]

#: The fake's tokenizer: one token per 4 characters (rounded up), at least 1 per message.
CHARS_PER_TOKEN = 4
#: Prompt caching applies to prompts of at least this many tokens (OpenAI's documented floor).
CACHE_MIN_PROMPT_TOKENS = 1024
#: Cached prefixes grow in steps of this many tokens beyond the floor.
CACHE_INCREMENT_TOKENS = 128
#: Models the fake knows by default (dated snapshots such as ``gpt-4o-mini-2024-07-18``
#: match their base name).
DEFAULT_FAKE_MODELS: tuple[str, ...] = ("gpt-4o-mini", "gpt-4o")

RetryAfterStyle = Literal["ms", "seconds", "both"]


def _check_rate(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value


class UpstreamBehaviour(GuardConfig):
    """Settings of a :class:`~ai_guard.testing.FakeUpstream`; every one can change at run
    time with ``upstream.configure(...)``.

    Faults are drawn per chat request from one ``random.Random(seed)``, in a fixed order
    (reset, timeout, error), so a seeded run of sequential requests is reproducible.
    """

    #: Seconds before each chat answer: a number, or a callable returning one (a
    #: distribution, e.g. ``lambda: random.lognormvariate(-2, 0.5)``). Clamped to 0..600.
    latency: float | Callable[[], float] = 0.0
    #: Seconds between two chunks of a stream.
    stream_chunk_delay: float = Field(default=0.0, ge=0, le=60)
    #: Share of chat requests answered with one of ``error_statuses``.
    error_rate: float = 0.0
    error_statuses: tuple[int, ...] = (500, 502, 503)
    #: Share of chat requests that hang ``hang_seconds`` and then close without an answer
    #: (longer than the client's read timeout).
    timeout_rate: float = 0.0
    hang_seconds: float = Field(default=30.0, gt=0, le=600)
    #: Share of chat requests whose connection is closed abruptly (TCP reset), no answer.
    reset_rate: float = 0.0
    #: A stream drops its connection after this many chunks (no ``[DONE]``).
    stream_drop_after: int | None = Field(default=None, ge=0)
    #: A stream sends an ``event: error`` after this many chunks, then ends.
    stream_error_after: int | None = Field(default=None, ge=0)
    #: A stream carries a ``data:`` line that is not JSON after its first chunk.
    malformed_sse: bool = False
    #: A stream carries valid noise a parser must skip: comments, unknown fields,
    #: keep-alive blank lines, ``\r\n`` line ends.
    sse_noise: bool = False
    #: Put ``usage`` on the chunk that carries the finish reason instead of a final chunk
    #: with empty ``choices`` (what some OpenAI-compatible servers do).
    usage_on_finish_chunk: bool = False
    #: Requests admitted per fixed window (``None``: no request quota).
    quota_requests: int | None = Field(default=None, gt=0)
    #: Tokens admitted per fixed window (``None``: no token quota). A request costs its
    #: prompt estimate plus ``max_tokens`` (or ``max_completion_tokens``) when given, else
    #: plus the completion it will get.
    quota_tokens: int | None = Field(default=None, gt=0)
    #: Length of a quota window in seconds. Windows are fixed: they start when the
    #: upstream starts (or is reset) and follow each other back to back.
    quota_window: float = Field(default=60.0, gt=0)
    #: Whether a request refused with 429 still uses up one request of the window (OpenAI
    #: documents that unsuccessful requests count).
    quota_counts_rejected: bool = False
    #: Which header a 429 carries: ``retry-after-ms`` (``"ms"``, Azure), ``retry-after``
    #: in whole seconds (``"seconds"``) or both.
    retry_after_style: RetryAfterStyle = "both"
    #: Seed of the fault generator (``None``: unseeded).
    seed: int | None = None
    #: Model names the upstream serves (``None``: any). Unknown models get 404.
    models: tuple[str, ...] | None = DEFAULT_FAKE_MODELS
    #: When set, requests need ``Authorization: Bearer <require_api_key>`` (else 401).
    require_api_key: str | None = None
    #: A fixed reply, or a callable of the request's JSON body returning one; by default
    #: the reply is a sentence derived from the prompt (or JSON for ``response_format``).
    reply: str | Callable[[Mapping[str, Any]], str] | None = None
    #: When set, replies are refusals: ``message.refusal`` is this text, ``content`` null.
    refusal: str | None = None
    #: Length of every generated sentence reply in tokens (``None``: derived from the
    #: prompt, 8 to 40 tokens).
    completion_tokens: int | None = Field(default=None, gt=0, le=100_000)
    #: Most prompt prefixes the prompt cache remembers (least recently used go first).
    prompt_cache_size: int = Field(default=10_000, gt=0)
    #: Most request records kept in ``upstream.requests`` (the oldest go first;
    #: ``stats()`` stays exact).
    record_limit: int = Field(default=10_000, gt=0)

    @field_validator("latency")
    @classmethod
    def _latency_non_negative(
        cls, value: float | Callable[[], float]
    ) -> float | Callable[[], float]:
        if not callable(value) and not 0 <= value <= 600:
            raise ValueError("must be between 0 and 600 seconds, or a callable")
        return value

    @field_validator("error_rate", "timeout_rate", "reset_rate")
    @classmethod
    def _rate(cls, value: float) -> float:
        return _check_rate(value)

    @field_validator("error_statuses")
    @classmethod
    def _error_statuses(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("must name at least one status")
        for status in value:
            if not 400 <= status <= 599:
                raise ValueError(f"{status} is not an HTTP error status (400-599)")
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not all(value):
            raise ValueError("model names must not be empty")
        return value

    def latency_seconds(self) -> float:
        """This request's latency: the fixed value, or a draw from the callable."""
        value = self.latency() if callable(self.latency) else self.latency
        if not isinstance(value, int | float) or value != value:
            return 0.0
        return min(max(float(value), 0.0), 600.0)

    def serves(self, model: str) -> bool:
        """Whether ``model`` (or its base name, for a dated snapshot) is served."""
        if self.models is None:
            return True
        return any(model == name or model.startswith(name + "-") for name in self.models)


# -- tokens ------------------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """The fake's token count of ``text``: ``ceil(len(text) / 4)``."""
    return -(-len(text) // CHARS_PER_TOKEN)


def message_text(message: Any) -> str:
    """The text of a chat message: its ``content`` string, or the ``text`` of its content
    parts; anything else counts as empty."""
    if not isinstance(message, Mapping):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


def prompt_tokens(messages: Sequence[Any]) -> int:
    """Prompt tokens of a request: per message ``max(1, ceil(len(text) / 4))``, summed."""
    return sum(max(1, estimate_tokens(message_text(m))) for m in messages)


def prompt_fingerprint(body: Mapping[str, Any]) -> bytes:
    """A digest of what determines the reply: model, messages and response format."""
    material = json.dumps(
        [body.get("model"), body.get("messages"), body.get("response_format")],
        sort_keys=True,
        default=str,
        ensure_ascii=False,
    )
    return hashlib.sha256(material.encode("utf-8", "replace")).digest()


# fmt: off
_WORDS = (
    "the", "guard", "keeps", "every", "call", "safe", "while", "upstream", "answers",
    "quickly", "and", "breaker", "stays", "closed", "because", "retries", "absorb", "brief",
    "storm", "of", "errors", "so", "budget", "paces", "each", "request", "under", "its",
    "quota", "with", "jitter", "stream", "ends", "usage", "counted", "once", "cached",
    "prompts", "cost", "less", "than", "fresh", "ones",
)
# fmt: on


def reply_text(fingerprint: bytes, tokens: int | None = None) -> str:
    """A deterministic sentence for a prompt fingerprint.

    With ``tokens`` the sentence is exactly ``tokens * 4`` characters long; otherwise its
    length (8 to 40 tokens) comes from the fingerprint.
    """
    rng = random.Random(fingerprint)
    target_tokens = tokens if tokens is not None else rng.randint(8, 40)
    target_chars = target_tokens * CHARS_PER_TOKEN
    words: list[str] = []
    length = -1
    while length < target_chars:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    sentence = " ".join(words)
    sentence = sentence[0].upper() + sentence[1:]
    body = sentence[: target_chars - 1]
    if body.endswith(" "):
        body = body[:-1] + "s"  # keep the exact length without a " ." ending
    return body + "."


# -- durations ---------------------------------------------------------------------------


def format_go_duration(seconds: float) -> str:
    """A duration as OpenAI writes it in ``x-ratelimit-reset-*`` (Go's format, at
    millisecond precision, rounded up): ``20ms``, ``1s``, ``2.5s``, ``6m0s``, ``1h2m3.5s``.
    """
    total_ms = math.ceil(max(0.0, seconds) * 1000 - 1e-6)
    if total_ms <= 0:
        return "0s"
    if total_ms < 1000:
        return f"{total_ms}ms"
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    out = f"{hours}h" if hours else ""
    if hours or minutes:
        out += f"{minutes}m"
    return f"{out}{secs}s"


# -- prompt caching ----------------------------------------------------------------------


class PromptCache:
    """OpenAI-style prompt caching: for a prompt of at least 1024 tokens, the cached part
    is the longest prefix seen before, counted in 1024 + k * 128 token steps.

    Prefixes are remembered by digest (per model), at most ``maxsize`` of them, least
    recently used first out: memory is bounded whatever the traffic.
    """

    def __init__(self, maxsize: int = 10_000) -> None:
        self.maxsize = maxsize
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _prefix_digests(model: str, text: str, tokens: int) -> list[tuple[int, bytes]]:
        if tokens < CACHE_MIN_PROMPT_TOKENS:
            return []
        data = text.encode("utf-8", "replace")
        running = hashlib.sha256(model.encode() + b"\0")
        digests: list[tuple[int, bytes]] = []
        done = 0
        boundary = CACHE_MIN_PROMPT_TOKENS
        while boundary <= tokens and boundary * CHARS_PER_TOKEN <= len(data):
            end = boundary * CHARS_PER_TOKEN
            running.update(data[done:end])
            done = end
            digests.append((boundary, running.copy().digest()))
            boundary += CACHE_INCREMENT_TOKENS
        return digests

    def lookup_and_store(self, model: str, text: str, tokens: int) -> int:
        """Cached tokens for this prompt (0 on a miss); remembers its prefixes."""
        digests = self._prefix_digests(model, text, tokens)
        if not digests:
            return 0
        cached = 0
        with self._lock:
            for boundary, digest in digests:
                if digest in self._seen:
                    cached = boundary
                    self._seen.move_to_end(digest)
                else:
                    self._seen[digest] = None
            while len(self._seen) > self.maxsize:
                self._seen.popitem(last=False)
        return min(cached, tokens)

    def __len__(self) -> int:
        return len(self._seen)

    def clear(self) -> None:
        """Forget every prefix."""
        with self._lock:
            self._seen.clear()


# -- quota -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """The quota's answer for one request, and the figures its headers report."""

    allowed: bool
    #: Why it was refused: ``"requests"`` or ``"tokens"`` (``None`` when allowed).
    exceeded: str | None
    limit_requests: int | None
    remaining_requests: int | None
    limit_tokens: int | None
    remaining_tokens: int | None
    #: Seconds until the current window ends (both budgets refill then).
    reset_seconds: float
    #: Whether the request alone costs more tokens than a whole window holds.
    too_large: bool = False

    def headers(self, retry_after_style: RetryAfterStyle = "both") -> dict[str, str]:
        """The ``x-ratelimit-*`` headers (plus ``retry-after*`` when refused)."""
        headers: dict[str, str] = {}
        reset = format_go_duration(self.reset_seconds)
        if self.limit_requests is not None:
            headers["x-ratelimit-limit-requests"] = str(self.limit_requests)
            headers["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
            headers["x-ratelimit-reset-requests"] = reset
        if self.limit_tokens is not None:
            headers["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            headers["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            headers["x-ratelimit-reset-tokens"] = reset
        if not self.allowed:
            wait_ms = max(1, math.ceil(self.reset_seconds * 1000))
            if retry_after_style in ("ms", "both"):
                headers["retry-after-ms"] = str(wait_ms)
            if retry_after_style in ("seconds", "both"):
                headers["retry-after"] = str(max(1, math.ceil(wait_ms / 1000)))
        return headers


class FixedWindowQuota:
    """Requests and tokens admitted per fixed window, exact under concurrency.

    Window ``k`` covers ``[origin + k * window, origin + (k + 1) * window)`` on the clock's
    monotonic time; both budgets refill when a new window starts. The check and the
    consumption happen under one lock, so N threads never get more than the quota.
    """

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._origin = clock.monotonic()
        self._window_index = 0
        self.used_requests = 0
        self.used_tokens = 0

    def reset(self) -> None:
        """Start a fresh window now."""
        with self._lock:
            self._origin = self._clock.monotonic()
            self._window_index = 0
            self.used_requests = 0
            self.used_tokens = 0

    def _roll(self, window: float) -> float:
        # Called with the lock held: move to the current window; return seconds left in it.
        elapsed = self._clock.monotonic() - self._origin
        index = int(elapsed // window)
        if index != self._window_index:
            self._window_index = index
            self.used_requests = 0
            self.used_tokens = 0
        return (index + 1) * window - elapsed

    def _decision(
        self,
        behaviour: UpstreamBehaviour,
        reset: float,
        exceeded: str | None,
        *,
        too_large: bool = False,
    ) -> QuotaDecision:
        limit_r, limit_t = behaviour.quota_requests, behaviour.quota_tokens
        return QuotaDecision(
            allowed=exceeded is None,
            exceeded=exceeded,
            limit_requests=limit_r,
            remaining_requests=None if limit_r is None else max(0, limit_r - self.used_requests),
            limit_tokens=limit_t,
            remaining_tokens=None if limit_t is None else max(0, limit_t - self.used_tokens),
            reset_seconds=reset,
            too_large=too_large,
        )

    def peek(self, behaviour: UpstreamBehaviour) -> QuotaDecision:
        """The current figures, without admitting anything."""
        with self._lock:
            reset = self._roll(behaviour.quota_window)
            return self._decision(behaviour, reset, None)

    def admit(self, behaviour: UpstreamBehaviour, tokens: int) -> QuotaDecision:
        """Admit one request costing ``tokens``, or refuse it (nothing consumed, unless
        ``quota_counts_rejected``)."""
        limit_r, limit_t = behaviour.quota_requests, behaviour.quota_tokens
        with self._lock:
            reset = self._roll(behaviour.quota_window)
            exceeded: str | None = None
            if limit_r is not None and self.used_requests + 1 > limit_r:
                exceeded = "requests"
            elif limit_t is not None and self.used_tokens + tokens > limit_t:
                exceeded = "tokens"
            if exceeded is None:
                self.used_requests += 1
                self.used_tokens += tokens
            elif behaviour.quota_counts_rejected:
                self.used_requests += 1
            too_large = limit_t is not None and tokens > limit_t
            return self._decision(behaviour, reset, exceeded, too_large=too_large)


# -- JSON from a schema ------------------------------------------------------------------

_MAX_DEPTH = 6
_FORMAT_EXAMPLES = {
    "date-time": "2024-07-18T12:00:00Z",
    "date": "2024-07-18",
    "time": "12:00:00",
    "email": "someone@example.com",
    "uri": "https://example.com/a",
    "hostname": "example.com",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "duration": "P1D",
}


def _resolve(root: Mapping[str, Any], ref: str) -> Mapping[str, Any]:
    if not ref.startswith("#"):
        raise ValueError(f"only local $ref are supported, not {ref!r}")
    node: Any = root
    for part in ref[1:].split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"cannot resolve $ref {ref!r}")
        node = node[part]
    if not isinstance(node, Mapping):
        raise ValueError(f"$ref {ref!r} does not point to a schema")
    return node


def _is_null_schema(schema: Any) -> bool:
    return isinstance(schema, Mapping) and schema.get("type") == "null"


def value_from_schema(
    schema: Mapping[str, Any] | bool,
    rng: random.Random,
    *,
    root: Mapping[str, Any] | None = None,
    depth: int = 0,
) -> Any:
    """A JSON value that conforms to ``schema``, drawn with ``rng``.

    Understands what strict structured outputs allow: ``type`` (one or a list), objects
    (every declared property is produced), arrays (``minItems``/``maxItems``), ``enum``,
    ``const``, strings (``minLength``/``maxLength``, common ``format``\\ s), numbers and
    integers (bounds, ``multipleOf``), booleans, ``null``, ``anyOf``/``oneOf``, ``allOf``,
    and local ``$ref``/``$defs`` (recursion ends by preferring ``null`` and empty arrays
    when deep). ``pattern`` is honoured only when a plain word happens to match it.
    """
    if root is None:
        root = schema if isinstance(schema, Mapping) else {}
    if schema is True or schema == {}:
        return "any"
    if schema is False or not isinstance(schema, Mapping):
        raise ValueError("no value conforms to this schema")
    ref = schema.get("$ref")
    if isinstance(ref, str):
        merged = {**_resolve(root, ref), **{k: v for k, v in schema.items() if k != "$ref"}}
        return value_from_schema(merged, rng, root=root, depth=depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return rng.choice(enum)
    for key in ("anyOf", "oneOf"):
        variants = schema.get(key)
        if isinstance(variants, list) and variants:
            if depth >= _MAX_DEPTH and any(_is_null_schema(v) for v in variants):
                return None
            choices = [v for v in variants if not _is_null_schema(v)] or variants
            if rng.random() < 0.2 and len(choices) < len(variants):
                return None
            return value_from_schema(rng.choice(choices), rng, root=root, depth=depth + 1)
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and all_of:
        merged_all: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in all_of:
            if isinstance(part, Mapping) and isinstance(part.get("$ref"), str):
                part = _resolve(root, part["$ref"])
            if isinstance(part, Mapping):
                for k, v in part.items():
                    if k == "properties" and isinstance(v, Mapping):
                        merged_all["properties"] = {**merged_all.get("properties", {}), **v}
                    elif k == "required" and isinstance(v, list):
                        merged_all["required"] = [*merged_all.get("required", []), *v]
                    else:
                        merged_all.setdefault(k, v)
        return value_from_schema(merged_all, rng, root=root, depth=depth + 1)

    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if isinstance(k, str)]
        if depth >= _MAX_DEPTH and "null" in kinds:
            return None
        non_null = [k for k in kinds if k != "null"] or kinds
        kind = rng.choice(non_null) if non_null else None
        if "null" in kinds and rng.random() < 0.2:
            kind = "null"
    if kind is None:
        if "properties" in schema:
            kind = "object"
        elif "items" in schema:
            kind = "array"
        else:
            kind = "string"
    return _value_of_type(kind, schema, rng, root, depth)


def _value_of_type(
    kind: str, schema: Mapping[str, Any], rng: random.Random, root: Mapping[str, Any], depth: int
) -> Any:
    if kind == "null":
        return None
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "object":
        properties = schema.get("properties")
        out: dict[str, Any] = {}
        if isinstance(properties, Mapping):
            required = schema.get("required")
            required_names = set(required) if isinstance(required, list) else set(properties)
            for name, sub in properties.items():
                if name in required_names or rng.random() < 0.5:
                    out[name] = value_from_schema(sub, rng, root=root, depth=depth + 1)
        return out
    if kind == "array":
        items = schema.get("items", {})
        low = int(schema.get("minItems", 0) or 0)
        high = schema.get("maxItems")
        high = low + (0 if depth >= _MAX_DEPTH else 3) if not isinstance(high, int) else high
        count = rng.randint(low, max(low, min(high, low + 3)))
        if isinstance(items, Mapping | bool):
            return [value_from_schema(items, rng, root=root, depth=depth + 1) for _ in range(count)]
        return []
    if kind in ("integer", "number"):
        return _number(kind, schema, rng)
    return _string(schema, rng)


def _number(kind: str, schema: Mapping[str, Any], rng: random.Random) -> int | float:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    low_f = float(low) if isinstance(low, int | float) else 0.0
    high_f = float(high) if isinstance(high, int | float) else low_f + 100.0
    if "exclusiveMinimum" in schema and "minimum" not in schema:
        low_f += 1 if kind == "integer" else 1e-6
    if "exclusiveMaximum" in schema and "maximum" not in schema:
        high_f -= 1 if kind == "integer" else 1e-6
    if kind == "integer":
        low_i, high_i = math.ceil(low_f), math.floor(high_f)
        step = schema.get("multipleOf")
        if isinstance(step, int) and step > 0:
            first = -(-low_i // step) * step
            count = max(0, (high_i - first) // step)
            return first + step * rng.randint(0, count)
        return rng.randint(low_i, max(low_i, high_i))
    value = round(rng.uniform(low_f, max(low_f, high_f)), 3)
    return min(max(value, low_f), max(low_f, high_f))


def _string(schema: Mapping[str, Any], rng: random.Random) -> str:
    fmt = schema.get("format")
    if fmt == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if isinstance(fmt, str) and fmt in _FORMAT_EXAMPLES:
        return _FORMAT_EXAMPLES[fmt]
    min_len = int(schema.get("minLength", 0) or 0)
    max_len = schema.get("maxLength")
    words = [rng.choice(_WORDS) for _ in range(rng.randint(1, 4))]
    text = " ".join(words)
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        try:
            compiled = re.compile(pattern)
        except re.error:
            compiled = None
        if compiled is not None:
            for candidate in (text, *words, ""):
                if compiled.search(candidate):
                    text = candidate
                    break
    while len(text) < min_len:
        text += " " + rng.choice(_WORDS)
    if isinstance(max_len, int):
        text = text[: max(max_len, min_len)]
    return text


def schema_value_json(schema: Mapping[str, Any], fingerprint: bytes) -> str:
    """The JSON text of a value generated for ``schema`` from a prompt fingerprint."""
    value = value_from_schema(schema, random.Random(fingerprint))
    return json.dumps(value, ensure_ascii=False)
