"""An embedded OpenAI-compatible upstream: a real HTTP server on loopback, in a thread.

It serves ``POST /v1/chat/completions`` (JSON and SSE streams) and ``GET /v1/models``
like the real API does, enforces a request/token quota with real ``x-ratelimit-*``
headers, caches prompts, and injects the faults a production client must survive
(latency, 5xx, hangs, connection resets, streams that drop or fail mid-way, malformed
SSE). Everything it received is recorded, so tests can assert on what the client sent.
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
import re
import socket
import struct
import sys
import threading
import traceback
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ai_guard.clock import SYSTEM_CLOCK, Clock
from ai_guard.config import build_config
from ai_guard.testing._upstream_behaviour import (
    FixedWindowQuota,
    PromptCache,
    QuotaDecision,
    UpstreamBehaviour,
    estimate_tokens,
    message_text,
    prompt_fingerprint,
    prompt_tokens,
    reply_text,
    schema_value_json,
)

__all__ = ["FakeUpstream", "Headers", "UpstreamRequest"]

# Request bodies beyond this size are refused (413) rather than read into memory.
_MAX_BODY_BYTES = 32 * 1024 * 1024
_MAX_CHOICES = 8
_SCHEMA_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_PIECES = re.compile(r"\S+\s*|\s+")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_SERVER_ERROR_MESSAGES = {
    500: "The server had an error while processing your request. Sorry about that!",
    502: "Bad gateway.",
    503: "The engine is currently overloaded, please try again later.",
    504: "Gateway timeout.",
}


class Headers(Mapping[str, str]):
    """A read-only, case-insensitive copy of HTTP headers (repeated names joined by
    ``", "``)."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        collected: dict[str, tuple[str, str]] = {}
        for name, value in items:
            key = name.lower()
            if key in collected:
                collected[key] = (collected[key][0], f"{collected[key][1]}, {value}")
            else:
                collected[key] = (name, value)
        self._items = collected

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()][1]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return (original for original, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One request the fake upstream received, and what it did with it.

    ``received_at`` is when the request arrived (wall time of the upstream's clock, before
    any injected latency). ``json`` is the decoded body (``None`` when absent or not
    JSON); ``status`` the HTTP status answered (``None`` when the connection was reset or
    left hanging); ``fault`` names an injected fault (``"error"``, ``"reset"``,
    ``"timeout"``, ``"stream_drop"``, ``"stream_error"``, ``"malformed_sse"``) or a
    refusal by the quota (``"rate_limited"``).
    """

    method: str
    path: str
    headers: Headers
    json: Any
    body: bytes
    status: int | None
    fault: str | None
    request_id: str
    received_at: float
    #: The client's source port: the same port on two records means one kept-alive
    #: connection carried both.
    client_port: int = 0

    @property
    def idempotency_key(self) -> str | None:
        """The ``Idempotency-Key`` header, if the client sent one."""
        return self.headers.get("idempotency-key")


class _ApiError(Exception):
    """An OpenAI-shaped error answer, raised while validating a request."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True, slots=True)
class _Choice:
    content: str | None
    refusal: str | None
    finish_reason: str
    tokens: int


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ai-guard-fake-upstream"
    sys_version = ""
    # Headers and body go out in one write, but small SSE chunks must not wait for Nagle.
    disable_nagle_algorithm = True
    server: _Server
    #: When the request line arrived (the upstream clock's wall time).
    received_at: float = 0.0

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests read ``upstream.requests`` instead of a log."""

    def _dispatch(self) -> None:
        self.server.upstream._handle(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Many clients open connections at once in the load tests; the default backlog is 5.
    request_queue_size = 1024
    block_on_close = False

    def __init__(self, address: tuple[str, int], upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self.connections: dict[socket.socket, threading.Thread] = {}
        self.connections_lock = threading.Lock()
        self.aborted: set[socket.socket] = set()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Our own connection threads, tracked so close() can end keep-alive connections
        # and join every thread instead of leaving daemons blocked on a read.
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name="FakeUpstream-connection",
            daemon=True,
        )
        with self.connections_lock:
            self.connections[request] = thread
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self.connections_lock:
                self.connections.pop(request, None)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            aborted = request in self.aborted
            self.aborted.discard(request)
        if aborted:
            # No FIN first: closing with SO_LINGER 0 sends a TCP reset.
            self.close_request(request)
        else:
            super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return  # the client went away; nothing to report
        self.upstream._server_errors.append(traceback.format_exc())


def _error_body(message: str, type: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


class FakeUpstream:
    """An OpenAI-compatible API on ``127.0.0.1``, in a background thread, for tests,
    examples and the offline demo.

    ``FakeUpstream(**behaviour)`` starts serving at once; use it as a context manager (or
    call :meth:`close`). ``behaviour`` is any setting of
    :class:`~ai_guard.testing.UpstreamBehaviour` (latency, error and fault rates, quota,
    seed, models, ...); :meth:`configure` changes them at run time. Bad values raise
    :class:`~ai_guard.errors.ConfigError`. ``clock`` drives the quota windows and the
    ``created`` timestamps (a :class:`~ai_guard.testing.FakeClock` makes windows move only
    when the test says so); latency and hangs are real waits.

    What it serves, like the real API:

    - ``POST /v1/chat/completions``: a deterministic reply derived from the prompt
      (``max_tokens`` honoured with ``finish_reason: "length"``), JSON conforming to the
      schema for ``response_format`` ``json_schema`` (strict schemas are checked as
      OpenAI checks them), an SSE stream for ``stream: true`` (with
      ``stream_options.include_usage`` a final chunk with empty ``choices`` carries
      ``usage``, then ``data: [DONE]``), ``usage`` with ``prompt_tokens_details`` and
      ``completion_tokens_details``.
    - ``GET /v1/models``.
    - ``x-request-id`` on every answer; OpenAI-shaped error bodies
      (``{"error": {"message", "type", "param", "code"}}``): 400 for a malformed body,
      401 for a wrong API key (when ``require_api_key`` is set), 404 for an unknown model
      or path, 429 beyond the quota.

    Tokens: one per 4 characters, at least one per message. Prompt caching: a prompt of
    1024 tokens or more reports as cached the longest prefix seen before, in 128-token
    steps. Quota: fixed windows of ``quota_window`` seconds; a request costs its prompt
    tokens plus ``max_tokens`` when given (OpenAI reserves the maximum up front), else
    plus its completion. Every chat answer carries ``x-ratelimit-*`` headers for the
    configured quotas.

    A chat request goes through, in order: the API key (401), the body (400, 404), the
    quota (429; a refused request consumes nothing unless ``quota_counts_rejected``), the
    latency, the injected faults (reset, timeout, error status; the request has used its
    quota, as at OpenAI), then the answer. An injected 429 (``error_statuses=(429,)``)
    carries no ``retry-after``: it stands for a limit the client knows nothing about.

    Example::

        with FakeUpstream(quota_requests=10, quota_window=1.0) as upstream:
            client = openai.OpenAI(base_url=upstream.url, api_key="test")
            client.chat.completions.create(model="gpt-4o-mini", messages=[...])
            assert upstream.stats()["200"] == 1
    """

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK, port: int = 0, **behaviour: Any) -> None:
        self._behaviour = build_config(UpstreamBehaviour, **behaviour)
        self._clock = clock
        self._configure_lock = threading.Lock()
        self._rng_lock = threading.Lock()
        self._rng = random.Random(self._behaviour.seed)
        self._quota = FixedWindowQuota(clock)
        self._prompt_cache = PromptCache(self._behaviour.prompt_cache_size)
        self._records_lock = threading.Lock()
        self._records: collections.deque[UpstreamRequest] = collections.deque(
            maxlen=self._behaviour.record_limit
        )
        self._counts: collections.Counter[str] = collections.Counter()
        self._server_errors: list[str] = []
        self._closing = threading.Event()
        self._closed = False
        self._server = _Server(("127.0.0.1", port), self)
        self.port: int = self._server.server_address[1]
        self.url: str = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FakeUpstream:{self.port}",
            daemon=True,
        )
        self._thread.start()

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving: end hanging answers, close every connection, join every thread."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        with self._server.connections_lock:
            connections = list(self._server.connections.items())
        for sock, _ in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in connections:
            thread.join(timeout=5.0)
        self._thread.join(timeout=5.0)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __repr__(self) -> str:
        return f"FakeUpstream(url={self.url!r}, closed={self._closed})"

    # -- behaviour -----------------------------------------------------------------------

    @property
    def behaviour(self) -> UpstreamBehaviour:
        """The current settings."""
        return self._behaviour

    def configure(self, **behaviour: Any) -> None:
        """Change settings at run time (thread-safe; requests in flight keep the settings
        they started with). Unknown or bad values raise
        :class:`~ai_guard.errors.ConfigError` and change nothing."""
        with self._configure_lock:
            updated = build_config(UpstreamBehaviour, **{**dict(self._behaviour), **behaviour})
            if "seed" in behaviour:
                with self._rng_lock:
                    self._rng = random.Random(updated.seed)
            self._prompt_cache.maxsize = updated.prompt_cache_size
            if updated.record_limit != self._behaviour.record_limit:
                with self._records_lock:
                    self._records = collections.deque(self._records, maxlen=updated.record_limit)
            self._behaviour = updated

    def reset(self) -> None:
        """Forget every record and count, start a fresh quota window, empty the prompt
        cache and re-seed the fault generator."""
        with self._records_lock:
            self._records.clear()
            self._counts.clear()
        self._quota.reset()
        self._prompt_cache.clear()
        with self._rng_lock:
            self._rng = random.Random(self._behaviour.seed)
        self._server_errors.clear()

    # -- what happened -------------------------------------------------------------------

    @property
    def requests(self) -> list[UpstreamRequest]:
        """The requests received so far (the last ``record_limit``), oldest first."""
        with self._records_lock:
            return list(self._records)

    @property
    def last_request(self) -> UpstreamRequest | None:
        """The most recent request, or ``None``."""
        with self._records_lock:
            return self._records[-1] if self._records else None

    def stats(self) -> dict[str, int]:
        """Counts per answered status (``{"200": n, "429": m, ...}``), per unanswered fault
        (``"reset"``, ``"timeout"``), and ``"total"``. Exact however many requests came."""
        with self._records_lock:
            return dict(self._counts)

    @property
    def server_errors(self) -> list[str]:
        """Tracebacks of unexpected errors inside the server (a test can assert none)."""
        return list(self._server_errors)

    @property
    def prompt_cache_entries(self) -> int:
        """How many prompt prefixes the cache holds (bounded by ``prompt_cache_size``)."""
        return len(self._prompt_cache)

    def _record(
        self,
        handler: _Handler,
        request_id: str,
        body: bytes,
        parsed: Any,
        status: int | None,
        fault: str | None,
    ) -> None:
        # Recorded before the answer goes out, so a client that has its answer always
        # finds the record.
        record = UpstreamRequest(
            method=handler.command,
            path=handler.path,
            headers=Headers(handler.headers.items()),
            json=parsed,
            body=body,
            status=status,
            fault=fault,
            request_id=request_id,
            received_at=handler.received_at,
            client_port=int(handler.client_address[1]),
        )
        key = str(status) if status is not None else (fault or "unanswered")
        with self._records_lock:
            self._records.append(record)
            self._counts[key] += 1
            self._counts["total"] += 1

    # -- HTTP ----------------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        handler.received_at = self._clock.time()
        request_id = f"req_{uuid.uuid4().hex}"
        try:
            body = self._read_body(handler)
        except _ApiError as exc:
            handler.close_connection = True
            self._record(handler, request_id, b"", None, exc.status, None)
            self._send_json(handler, exc.status, exc.body, request_id)
            return
        path = handler.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/chat/completions":
            if handler.command != "POST":
                self._answer_error(handler, request_id, body, None, _method_not_allowed(handler))
                return
            self._chat(handler, request_id, body)
        elif path == "/v1/models":
            if handler.command != "GET":
                self._answer_error(handler, request_id, body, None, _method_not_allowed(handler))
                return
            self._models(handler, request_id, body)
        else:
            error = _ApiError(
                404, f"Invalid URL ({handler.command} {handler.path})", code="unknown_url"
            )
            self._answer_error(handler, request_id, body, None, error)

    def _read_body(self, handler: _Handler) -> bytes:
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts: list[bytes] = []
            size = 0
            while True:
                line = handler.rfile.readline(1024)
                try:
                    length = int(line.split(b";", 1)[0].strip() or b"x", 16)
                except ValueError:
                    raise _ApiError(400, "malformed chunked request body") from None
                if length == 0:
                    while handler.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                size += length
                if size > _MAX_BODY_BYTES:
                    raise _ApiError(413, "request body too large")
                parts.append(handler.rfile.read(length))
                handler.rfile.readline(1024)
        raw_length = handler.headers.get("Content-Length")
        if raw_length is None:
            return b""
        try:
            length = int(raw_length)
        except ValueError:
            raise _ApiError(400, "malformed Content-Length") from None
        if length < 0:
            raise _ApiError(400, "malformed Content-Length")
        if length > _MAX_BODY_BYTES:
            raise _ApiError(413, "request body too large")
        return handler.rfile.read(length)

    def _send(
        self,
        handler: _Handler,
        status: int,
        body: bytes,
        request_id: str,
        *,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            f"content-type: {content_type}",
            f"content-length: {len(body)}",
            f"x-request-id: {request_id}",
        ]
        if headers:
            lines.extend(f"{name}: {value}" for name, value in headers.items())
        if handler.close_connection:
            lines.append("connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            handler.wfile.write(head + body)
        except OSError:
            handler.close_connection = True

    def _send_json(
        self,
        handler: _Handler,
        status: int,
        payload: Any,
        request_id: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        self._send(handler, status, body, request_id, headers=headers)

    def _answer_error(
        self,
        handler: _Handler,
        request_id: str,
        body: bytes,
        parsed: Any,
        error: _ApiError,
        headers: Mapping[str, str] | None = None,
        fault: str | None = None,
    ) -> None:
        self._record(handler, request_id, body, parsed, error.status, fault)
        self._send_json(handler, error.status, error.body, request_id, headers)

    def _abort(self, handler: _Handler) -> None:
        """Close the connection abruptly: a TCP reset, no answer."""
        sock = handler.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        with self._server.connections_lock:
            self._server.aborted.add(sock)
        handler.close_connection = True

    def _models(self, handler: _Handler, request_id: str, body: bytes) -> None:
        behaviour = self._behaviour
        names = behaviour.models if behaviour.models is not None else ("gpt-4o-mini", "gpt-4o")
        created = int(self._clock.time())
        payload = {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "ai-guard"}
                for name in names
            ],
        }
        try:
            self._check_api_key(handler, behaviour)
        except _ApiError as exc:
            self._answer_error(handler, request_id, body, None, exc)
            return
        self._record(handler, request_id, body, None, 200, None)
        self._send_json(handler, 200, payload, request_id)

    @staticmethod
    def _check_api_key(handler: _Handler, behaviour: UpstreamBehaviour) -> None:
        if behaviour.require_api_key is None:
            return
        auth = handler.headers.get("Authorization", "")
        if auth != f"Bearer {behaviour.require_api_key}":
            message = (
                "Incorrect API key provided."
                if auth
                else "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
            raise _ApiError(401, message, code="invalid_api_key" if auth else None)

    # -- chat completions ----------------------------------------------------------------

    def _chat(self, handler: _Handler, request_id: str, raw_body: bytes) -> None:
        behaviour = self._behaviour
        quota_on = behaviour.quota_requests is not None or behaviour.quota_tokens is not None
        parsed: Any = None
        try:
            self._check_api_key(handler, behaviour)
            parsed = _parse_json(raw_body)
            request = _validate_chat_request(parsed, behaviour)
        except _ApiError as exc:
            extra = self._quota.peek(behaviour).headers() if quota_on else None
            self._answer_error(handler, request_id, raw_body, parsed, exc, extra)
            return

        try:
            choices = self._build_choices(parsed, request, behaviour)
        except _ApiError as exc:
            self._answer_error(handler, request_id, raw_body, parsed, exc)
            return
        prompt = request["prompt_tokens"]
        completion = sum(choice.tokens for choice in choices)
        max_tokens = request["max_tokens"]
        cost = prompt + (max_tokens * len(choices) if max_tokens is not None else completion)

        rate_headers: dict[str, str] = {}
        if quota_on:
            decision = self._quota.admit(behaviour, cost)
            rate_headers = decision.headers(behaviour.retry_after_style)
            if not decision.allowed:
                error = _rate_limit_error(decision, request["model"], cost)
                self._answer_error(
                    handler, request_id, raw_body, parsed, error, rate_headers, "rate_limited"
                )
                return

        with self._rng_lock:
            reset_draw, timeout_draw, error_draw = (
                self._rng.random(),
                self._rng.random(),
                self._rng.random(),
            )
            error_status = self._rng.choice(behaviour.error_statuses)
        latency = behaviour.latency_seconds()
        if latency > 0 and self._closing.wait(latency):
            self._record(handler, request_id, raw_body, parsed, None, "reset")
            self._abort(handler)
            return
        if reset_draw < behaviour.reset_rate:
            self._record(handler, request_id, raw_body, parsed, None, "reset")
            self._abort(handler)
            return
        if timeout_draw < behaviour.timeout_rate:
            self._record(handler, request_id, raw_body, parsed, None, "timeout")
            self._closing.wait(behaviour.hang_seconds)
            self._abort(handler)
            return
        if error_draw < behaviour.error_rate:
            message = _SERVER_ERROR_MESSAGES.get(error_status, "Injected error.")
            kind = "server_error" if error_status >= 500 else "invalid_request_error"
            code = "rate_limit_exceeded" if error_status == 429 else None
            if error_status == 429:
                kind = "requests"
            self._record(handler, request_id, raw_body, parsed, error_status, "error")
            self._send_json(
                handler, error_status, _error_body(message, kind, code), request_id, rate_headers
            )
            return

        cached = self._prompt_cache.lookup_and_store(
            request["model"], request["prompt_text"], prompt
        )
        usage = _usage(prompt, completion, cached)
        if request["stream"]:
            self._stream(
                handler,
                request_id,
                raw_body,
                parsed,
                request,
                choices,
                usage,
                behaviour,
                rate_headers,
            )
            return
        self._record(handler, request_id, raw_body, parsed, 200, None)
        payload = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(self._clock.time()),
            "model": request["model"],
            "system_fingerprint": "fp_ai_guard",
            "choices": [
                {
                    "index": index,
                    "message": {
                        "role": "assistant",
                        "content": choice.content,
                        "refusal": choice.refusal,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": choice.finish_reason,
                }
                for index, choice in enumerate(choices)
            ],
            "usage": usage,
            "service_tier": "default",
        }
        self._send_json(handler, 200, payload, request_id, rate_headers or None)

    def _build_choices(
        self, body: Mapping[str, Any], request: Mapping[str, Any], behaviour: UpstreamBehaviour
    ) -> list[_Choice]:
        fingerprint = prompt_fingerprint(body)
        max_tokens: int | None = request["max_tokens"]
        choices: list[_Choice] = []
        for index in range(request["n"]):
            seed = fingerprint if index == 0 else hashlib.sha256(fingerprint + bytes([index]))
            seed_bytes = seed if isinstance(seed, bytes) else seed.digest()
            if behaviour.refusal is not None:
                refusal = behaviour.refusal
                choices.append(_Choice(None, refusal, "stop", max(1, estimate_tokens(refusal))))
                continue
            content = self._content(body, request, behaviour, seed_bytes)
            tokens = max(1, estimate_tokens(content))
            finish = "stop"
            if max_tokens is not None and tokens > max_tokens:
                content = content[: max_tokens * 4]
                tokens = max_tokens
                finish = "length"
            choices.append(_Choice(content, None, finish, tokens))
        return choices

    @staticmethod
    def _content(
        body: Mapping[str, Any],
        request: Mapping[str, Any],
        behaviour: UpstreamBehaviour,
        seed: bytes,
    ) -> str:
        if behaviour.reply is not None:
            if not callable(behaviour.reply):
                return behaviour.reply
            try:
                return str(behaviour.reply(body))
            except Exception as exc:
                raise _ApiError(
                    500, f"the reply callable failed: {exc!r}", type="server_error"
                ) from None
        schema = request["schema"]
        if schema is not None:
            try:
                return schema_value_json(schema, seed)
            except (ValueError, TypeError, RecursionError) as exc:
                raise _ApiError(
                    400, f"Invalid schema for response_format: {exc}", param="response_format"
                ) from None
        sentence = reply_text(seed, behaviour.completion_tokens)
        if request["json_object"]:
            return json.dumps({"reply": sentence})
        return sentence

    def _stream(
        self,
        handler: _Handler,
        request_id: str,
        raw_body: bytes,
        parsed: Any,
        request: Mapping[str, Any],
        choices: list[_Choice],
        usage: dict[str, Any],
        behaviour: UpstreamBehaviour,
        rate_headers: Mapping[str, str],
    ) -> None:
        fault: str | None = None
        if behaviour.stream_drop_after is not None:
            fault = "stream_drop"
        elif behaviour.stream_error_after is not None:
            fault = "stream_error"
        elif behaviour.malformed_sse:
            fault = "malformed_sse"
        self._record(handler, request_id, raw_body, parsed, 200, fault)
        newline = "\r\n" if behaviour.sse_noise else "\n"
        events = list(
            _stream_events(
                request, choices, usage, behaviour.usage_on_finish_chunk, int(self._clock.time())
            )
        )
        head = (
            "HTTP/1.1 200 OK\r\n"
            "content-type: text/event-stream; charset=utf-8\r\n"
            "cache-control: no-cache\r\n"
            "transfer-encoding: chunked\r\n"
            f"x-request-id: {request_id}\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in rate_headers.items())
            + ("connection: close\r\n" if handler.close_connection else "")
            + "\r\n"
        )
        try:
            handler.wfile.write(head.encode("latin-1"))
            for sent, payload in enumerate(events):
                if behaviour.stream_drop_after is not None and sent >= behaviour.stream_drop_after:
                    self._abort(handler)
                    return
                if (
                    behaviour.stream_error_after is not None
                    and sent >= behaviour.stream_error_after
                ):
                    error = _error_body(
                        "The server had an error while processing your request.", "server_error"
                    )
                    _write_chunk(
                        handler, f"event: error{newline}data: {json.dumps(error)}{newline}{newline}"
                    )
                    handler.wfile.write(b"0\r\n\r\n")
                    return
                if (
                    sent
                    and behaviour.stream_chunk_delay
                    and self._closing.wait(behaviour.stream_chunk_delay)
                ):
                    self._abort(handler)
                    return
                text = f"data: {json.dumps(payload, separators=(',', ':'))}{newline}{newline}"
                if behaviour.sse_noise:
                    text = (
                        f": keep-alive{newline}{newline}id: {sent}{newline}"
                        f"x-unknown-field: 1{newline}{text}"
                    )
                _write_chunk(handler, text)
                if sent == 0 and behaviour.malformed_sse:
                    _write_chunk(handler, f'data: {{"choices": [{{"delta":{newline}{newline}')
            _write_chunk(handler, f"data: [DONE]{newline}{newline}")
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            # The client stopped reading (closed its end early): nothing more to send.
            handler.close_connection = True


def _write_chunk(handler: _Handler, text: str) -> None:
    data = text.encode("utf-8")
    handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


def _method_not_allowed(handler: _Handler) -> _ApiError:
    return _ApiError(405, f"Method {handler.command} is not allowed on {handler.path}.")


def _parse_json(raw_body: bytes) -> Any:
    try:
        return json.loads(raw_body)
    except (ValueError, RecursionError):
        raise _ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
        ) from None


def _validate_chat_request(body: Any, behaviour: UpstreamBehaviour) -> dict[str, Any]:
    """Check a chat request as the real API does; return what the answer needs."""
    if not isinstance(body, dict):
        raise _ApiError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _ApiError(
            400,
            "Missing required parameter: 'model'.",
            param="model",
            code="missing_required_parameter",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _ApiError(
            400,
            "Missing required parameter: 'messages'."
            if messages is None
            else "Invalid 'messages': expected a non-empty array of messages.",
            param="messages",
            code="missing_required_parameter" if messages is None else "invalid_type",
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _ApiError(
                400,
                f"Invalid type for 'messages[{index}]': expected an object with a 'role'.",
                param=f"messages[{index}]",
                code="invalid_type",
            )
    if not behaviour.serves(model):
        raise _ApiError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise _ApiError(
            400,
            f"Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, "
            f"but got {max_tokens!r} instead.",
            param="max_tokens",
            code="integer_below_min_value",
        )
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= _MAX_CHOICES:
        raise _ApiError(400, f"Invalid 'n': expected 1 to {_MAX_CHOICES}.", param="n")
    stream = body.get("stream") is True
    stream_options = body.get("stream_options")
    if stream_options is not None and not stream:
        raise _ApiError(
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    schema, json_object = _response_format(body.get("response_format"), messages)
    text = "".join(
        f"{m.get('role')}\n{message_text(m)}\n" for m in messages if isinstance(m, Mapping)
    )
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "n": n,
        "stream": stream,
        "include_usage": include_usage,
        "schema": schema,
        "json_object": json_object,
        "prompt_text": text,
        "prompt_tokens": prompt_tokens(messages),
    }


def _response_format(value: Any, messages: list[Any]) -> tuple[dict[str, Any] | None, bool]:
    if value is None:
        return None, False
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None, False
    if kind == "json_object":
        if not any("json" in message_text(m).lower() for m in messages):
            raise _ApiError(
                400,
                "'messages' must contain the word 'json' in some form, to use "
                "'response_format' of type 'json_object'.",
                param="messages",
            )
        return None, True
    if kind != "json_schema":
        raise _ApiError(
            400,
            "Invalid value for 'response_format.type': expected one of 'text', "
            "'json_object' or 'json_schema'.",
            param="response_format.type",
            code="invalid_value",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _ApiError(
            400,
            "Missing required parameter: 'response_format.json_schema'.",
            param="response_format.json_schema",
            code="missing_required_parameter",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise _ApiError(
            400,
            f"Invalid 'response_format.json_schema.name': {name!r} must match "
            "^[a-zA-Z0-9_-]{1,64}$.",
            param="response_format.json_schema.name",
            code="invalid_value",
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise _ApiError(
            400,
            f"Invalid schema for response_format '{name}': the schema must be an object.",
            param="response_format",
        )
    if spec.get("strict") is True:
        from ai_guard.structured import strict_schema_errors

        problems = strict_schema_errors(schema)
        if problems:
            raise _ApiError(
                400,
                f"Invalid schema for response_format '{name}': {problems[0]}",
                param="response_format",
            )
    return schema, False


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _rate_limit_error(decision: QuotaDecision, model: str, cost: int) -> _ApiError:
    if decision.too_large:
        message = (
            f"Request too large for {model} on tokens per min (TPM): Limit "
            f"{decision.limit_tokens}, Requested {cost}. The input or output tokens must be "
            "reduced in order to run successfully."
        )
    elif decision.exceeded == "tokens":
        limit = decision.limit_tokens or 0
        used = limit - (decision.remaining_tokens or 0)
        wait = decision.headers()["x-ratelimit-reset-tokens"]
        message = (
            f"Rate limit reached for {model} on tokens per min (TPM): Limit {limit}, "
            f"Used {used}, Requested {cost}. Please try again in {wait}."
        )
    else:
        message = (
            f"Rate limit reached for {model} on requests per min (RPM): Limit "
            f"{decision.limit_requests}, Used {decision.limit_requests}, Requested 1. Please try "
            f"again in {decision.headers()['x-ratelimit-reset-requests']}."
        )
    return _ApiError(429, message, type=decision.exceeded or "requests", code="rate_limit_exceeded")


def _stream_events(
    request: Mapping[str, Any],
    choices: list[_Choice],
    usage: dict[str, Any],
    usage_on_finish_chunk: bool,
    created: int,
) -> Iterator[dict[str, Any]]:
    include_usage: bool = request["include_usage"]
    base: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": request["model"],
        "system_fingerprint": "fp_ai_guard",
    }

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        out = {
            **base,
            "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }
        if include_usage and not usage_on_finish_chunk:
            out["usage"] = None
        return out

    for index, choice in enumerate(choices):
        yield chunk(index, {"role": "assistant", "content": "", "refusal": None})
        if choice.refusal is not None:
            for piece in _PIECES.findall(choice.refusal):
                yield chunk(index, {"refusal": piece})
        for piece in _PIECES.findall(choice.content or ""):
            yield chunk(index, {"content": piece})
        last = chunk(index, {}, choice.finish_reason)
        if include_usage and usage_on_finish_chunk and index == len(choices) - 1:
            last["usage"] = usage
        yield last
    if include_usage and not usage_on_finish_chunk:
        yield {**base, "choices": [], "usage": usage}
