"""``@idempotent()`` on a Flask view: the ``Idempotency-Key`` header, IETF draft semantics.

What a request gets (``draft-ietf-httpapi-idempotency-key-header``, with Stripe's practice):

============================================  ============================================
request                                       response
============================================  ============================================
no key                                        the view runs (``required=True``: **400**)
malformed key (empty, > 255 characters,       **400** ``application/problem+json``
non-ASCII, control character, space, a list,
the header sent twice)
first request with a key                      the view runs; its response is stored
same key, same request, first one finished    the stored response, ``Idempotent-Replayed:
                                              true``
same key while the first one runs             **409**, ``Retry-After``
same key, different request                   **422**
the store is unreachable                      **503**, ``Retry-After`` (``fail_open=True``:
                                              the view runs unguarded)
============================================  ============================================

"Same request" is the fingerprint: method, path, query string, a SHA-256 of the body
bytes, and the scope. The **scope** keeps clients apart: the stored key is scope + key,
the scope being ``scope(*view_args, **view_kwargs)`` when given, else the authenticated
principal (``flask.g.principal`` or ``flask.g.user``: its ``id``, ``get_id()``, or the
value itself when it is a ``str``/``int``), else a SHA-256 of the ``Authorization``
header, else ``"anonymous"``. Principal A's stored response is never replayed to B: B's
request with the same key runs on its own.

What is stored: the status, the headers minus hop-by-hop headers, ``Set-Cookie`` and
``Content-Length``, and the body, for ``ttl`` seconds (24 h). **Not stored** (the claim is
released, so a retry runs the view again):

- a 5xx response or an exception (including ``abort(...)``). Stripe stores 500s too and
  replays them; we don't, because a 5xx usually means the work did not happen and the
  client's retry is the recovery the key exists for. A view that may have half-done its
  work before a 5xx must make that work idempotent itself.
- a streamed response (a generator body, ``send_file``): it cannot be read without being
  consumed. The view ran; a retry with the key runs it again.
- a body larger than ``max_body_bytes`` (1 MiB): kept out of the store by design.

The replay is built with the app's ``response_class``; headers that ``after_request``
handlers add are added to replays as well (they are not stored).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

from flask import current_app, g, has_request_context, request
from flask.wrappers import Response

from ai_guard.clock import Clock
from ai_guard.context import current_call
from ai_guard.errors import IdempotencyError, IdempotencyKeyError, StoreError
from ai_guard.idempotency import (
    _HTTP_CODEC,
    IDEMPOTENCY_HEADER,
    REPLAYED_HEADER,
    IdempotencyConfig,
    Record,
    _ambient_store,
    _digest,
    _finish_flight,
    _register_view_claim,
    _release_quietly,
    complete,
    done_record,
    new_claim,
    parse_idempotency_key,
    parse_record,
    try_claim,
)
from ai_guard.stores import Store

__all__ = ["default_scope", "guard_view", "problem_response", "request_fingerprint"]

P = ParamSpec("P")
R = TypeVar("R")

_log = logging.getLogger("ai_guard.idempotency")

#: Headers never stored with a response: hop-by-hop (RFC 9110 §7.6.1), cookies (a replay
#: must not hand out a session), and the length (recomputed from the stored body).
UNSTORED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "set-cookie",
        "content-length",
        REPLAYED_HEADER.lower(),
    }
)

PROBLEM_TYPE_PREFIX = "urn:ai-guard:problem:"


def problem_response(
    status: int, problem: str, title: str, detail: str, *, retry_after: int | None = None
) -> Response:
    """An RFC 9457 ``application/problem+json`` response (``type``, ``title``,
    ``status``, ``detail``); ``type`` is ``urn:ai-guard:problem:<problem>``."""
    body = {
        "type": PROBLEM_TYPE_PREFIX + problem,
        "title": title,
        "status": status,
        "detail": detail,
    }
    response = current_app.response_class(
        json.dumps(body), status=status, mimetype="application/problem+json"
    )
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _principal_id(principal: Any) -> str | None:
    if principal is None or isinstance(principal, bool):
        return None
    if isinstance(principal, (str, int)):
        return str(principal)
    identifier = getattr(principal, "id", None)
    if identifier is None:
        get_id = getattr(principal, "get_id", None)  # Flask-Login's UserMixin
        identifier = get_id() if callable(get_id) else None
    return None if identifier is None else str(identifier)


def default_scope() -> str:
    """The scope of the current request when the view gives no ``scope=``: the
    authenticated principal's id, else the ``Authorization`` header's SHA-256, else
    ``"anonymous"``."""
    principal = g.get("principal")
    if principal is None:
        principal = g.get("user")
    identifier = _principal_id(principal)
    if identifier is not None:
        return "principal:" + identifier
    authorization = request.headers.get("Authorization")
    if authorization:
        return "authorization:" + hashlib.sha256(authorization.encode("latin-1")).hexdigest()
    return "anonymous"


def request_fingerprint(scope: str) -> bytes:
    """What makes two requests "the same" for one key: method, path, query string, body
    bytes and scope, as a hex SHA-256 (128 bits)."""
    digest = hashlib.sha256()
    digest.update(f"{request.method}\n{request.path}\n".encode("utf-8", "backslashreplace"))
    digest.update(request.query_string)
    digest.update(b"\n" + scope.encode("utf-8", "backslashreplace") + b"\n")
    # cache=True: the view can still read the body (get_json, form) after us.
    digest.update(request.get_data(cache=True))
    return digest.hexdigest()[:32].encode("ascii")


def _storable_body(response: Response, max_body_bytes: int) -> bytes | None:
    if response.is_streamed or response.direct_passthrough:
        return None
    body = response.get_data()
    return body if len(body) <= max_body_bytes else None


def _encode_response(response: Response, body: bytes) -> bytes:
    headers = [
        [name, value]
        for name, value in response.headers.items()
        if name.lower() not in UNSTORED_HEADERS
    ]
    meta = json.dumps({"status": response.status, "headers": headers}, separators=(",", ":"))
    return meta.encode("utf-8") + b"\n" + body


def _replay_response(record: Record) -> Response:
    meta_line, _, body = record.payload.partition(b"\n")
    meta = json.loads(meta_line)
    headers = [(name, value) for name, value in meta["headers"]]
    response = current_app.response_class(body, status=meta["status"], headers=headers)
    response.headers[REPLAYED_HEADER] = "true"
    return response


def guard_view(
    view: Callable[P, R],
    config: IdempotencyConfig,
    store: Store | None,
    scope_of: Callable[..., str | None] | None,
    clock: Clock,
) -> Callable[P, R]:
    """Wrap a Flask view with the ``Idempotency-Key`` protocol (see the module's table)."""
    prefix = f"idem:v:{config.namespace or 'http'}:"
    in_flight_ttl = config.in_flight_ttl
    retry_after = config.retry_after

    @functools.wraps(view)
    def idempotent_view(*args: Any, **kwargs: Any) -> Any:
        if not has_request_context():
            raise RuntimeError(
                f"@idempotent() without key= guards a Flask view and reads the "
                f"{IDEMPOTENCY_HEADER} header, but {view.__qualname__} was called outside "
                "a request; pass key= to guard a plain function"
            )
        values = request.headers.getlist(IDEMPOTENCY_HEADER)
        if not values:
            if config.required:
                return problem_response(
                    400,
                    "idempotency-key-missing",
                    "Idempotency-Key is missing",
                    f"This operation requires an {IDEMPOTENCY_HEADER} header.",
                )
            return view(*args, **kwargs)
        try:
            key = parse_idempotency_key(values)
        except IdempotencyKeyError as exc:
            return problem_response(
                400, "idempotency-key-invalid", "Idempotency-Key is invalid", str(exc)
            )
        scope = default_scope() if scope_of is None else scope_of(*args, **kwargs)
        scope_text = "-" if scope is None else str(scope)
        skey = f"{prefix}{_digest(scope_text)}:{key}"
        fingerprint = request_fingerprint(scope_text)
        ctx = current_call()
        if ctx is not None:
            ctx.idempotency_key = key
        guard_store = _ambient_store() if store is None else store
        claim = new_claim(fingerprint)
        try:
            existing = try_claim(guard_store, skey, claim, in_flight_ttl)
        except StoreError as exc:
            if config.fail_open:
                _log.warning("store unavailable (%s); running the view without idempotency", exc)
                return view(*args, **kwargs)
            return problem_response(
                503,
                "idempotency-store-unavailable",
                "Idempotency store unavailable",
                "The request was not processed because its Idempotency-Key cannot be "
                "checked right now; retry later with the same key.",
                retry_after=retry_after,
            )
        if existing is not None:
            record = parse_record(existing, key=key)
            if record.fingerprint != fingerprint:
                return problem_response(
                    422,
                    "idempotency-key-reused",
                    "Idempotency-Key is already used",
                    "This Idempotency-Key was used with a different request (method, path, "
                    "query, body or client); use a new key for a new request.",
                )
            if not record.done:
                return problem_response(
                    409,
                    "idempotency-request-in-progress",
                    "A request with this Idempotency-Key is in progress",
                    f"The first request with this key is still being processed; retry after "
                    f"{retry_after} s with the same key to get its response.",
                    retry_after=retry_after,
                )
            if record.codec != _HTTP_CODEC:
                raise IdempotencyError(
                    f"idempotency key {key!r} holds a {record.codec!r} record, not a response",
                    key=key,
                )
            if ctx is not None:
                ctx.idempotent_replay = True
            return _replay_response(record)
        return _run_view(view, args, kwargs, guard_store, skey, claim, fingerprint)

    def _run_view(
        view: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        guard_store: Store,
        skey: str,
        claim: bytes,
        fingerprint: bytes,
    ) -> Response:
        flight = _register_view_claim(guard_store, skey, claim, in_flight_ttl, clock)
        try:
            try:
                response = current_app.make_response(view(*args, **kwargs))
            except BaseException:
                _release_quietly(guard_store, skey, claim)
                raise
            body = (
                None
                if response.status_code >= 500
                else _storable_body(response, config.max_body_bytes)
            )
            if body is None:
                _release_quietly(guard_store, skey, claim)
                return response
            record = done_record(fingerprint, _HTTP_CODEC, _encode_response(response, body))
            try:
                if not complete(guard_store, skey, claim, record, config.ttl):
                    _log.warning(
                        "idempotency claim %r expired before its view finished; response "
                        "not stored",
                        skey,
                    )
            except StoreError as exc:
                _log.warning("could not store the response for key %r: %s", skey, exc)
            return response
        finally:
            _finish_flight(flight)

    return cast("Callable[P, R]", idempotent_view)
