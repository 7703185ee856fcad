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
``Content-Length``, and the body, for ``ttl`` seconds (24 h), as a record of codec
``http.v2`` (see :func:`_response_record`; records of codec ``http`` that earlier releases
wrote are still replayed). **Not stored** (the claim is released, so a retry runs the view
again):

- a 5xx response or an exception (including ``abort(...)``). Stripe stores 500s too and
  replays them; we don't, because a 5xx usually means the work did not happen and the
  client's retry is the recovery the key exists for. A view that may have half-done its
  work before a 5xx must make that work idempotent itself.
- a streamed response (a generator body, ``send_file``): it cannot be read without being
  consumed. The view ran; a retry with the key runs it again.
- a body larger than ``max_body_bytes`` (1 MiB): kept out of the store by design.

The replay is built with the app's ``response_class``; headers that ``after_request``
handlers add are added to replays as well (they are not stored).

Per request the guard reads the request object, ``g`` and the app once each (every read
through a Flask proxy looks the object up again) and the headers straight from the WSGI
environ; a replay of a finished request is recognised by one prefix comparison with the
record this request would have stored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

from flask import Flask, current_app, g, request
from flask.wrappers import Request, Response

from ai_guard.clock import Clock
from ai_guard.context import current_call
from ai_guard.errors import IdempotencyError, IdempotencyKeyError, StoreError
from ai_guard.idempotency import (
    _HTTP_CODEC,
    _HTTP_JSON_CODEC,
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

# Where a WSGI server puts the request headers this module reads (PEP 3333: a header sent
# twice arrives as one comma-joined value, which parse_idempotency_key refuses as a list).
_KEY_ENVIRON = "HTTP_" + IDEMPOTENCY_HEADER.upper().replace("-", "_")
_AUTHORIZATION_ENVIRON = "HTTP_AUTHORIZATION"
# The common key, a bare token (no quotes, no list, no spaces, 1-255 visible ASCII), is
# accepted as it is; anything else goes through parse_idempotency_key and its messages.
_BARE_KEY = re.compile(r"[\x21\x23-\x2b\x2d-\x7e][\x21-\x2b\x2d-\x7e]{0,254}")


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


def _current(proxy: Any) -> Any:
    """The object behind a Flask context proxy, resolved once: every attribute read
    through the proxy would resolve it again."""
    return proxy._get_current_object()


def _scope(app_globals: Any, environ: dict[str, Any]) -> str:
    principal = app_globals.get("principal")
    if principal is None:
        principal = app_globals.get("user")
    identifier = _principal_id(principal)
    if identifier is not None:
        return "principal:" + identifier
    authorization = environ.get(_AUTHORIZATION_ENVIRON)
    if authorization:
        return "authorization:" + hashlib.sha256(authorization.encode("latin-1")).hexdigest()
    return "anonymous"


def default_scope() -> str:
    """The scope of the current request when the view gives no ``scope=``: the
    authenticated principal's id, else the ``Authorization`` header's SHA-256, else
    ``"anonymous"``."""
    return _scope(_current(g), _current(request).environ)


def _fingerprint(req: Request, scope: str) -> bytes:
    # One digest over: method, path, query string, scope, body (cache=True: the view can
    # still read the body, with get_json or form, after us).
    digest = hashlib.sha256(
        f"{req.method}\n{req.path}\n".encode("utf-8", "backslashreplace")
        + req.query_string
        + b"\n"
        + scope.encode("utf-8", "backslashreplace")
        + b"\n"
    )
    digest.update(req.get_data(cache=True))
    return digest.hexdigest()[:32].encode("ascii")


def request_fingerprint(scope: str) -> bytes:
    """What makes two requests "the same" for one key: method, path, query string, body
    bytes and scope, as a hex SHA-256 (128 bits)."""
    return _fingerprint(_current(request), scope)


# Longest scope whose digest is remembered (a principal id, "authorization:" + 64 hex).
_SCOPE_KEPT_LENGTH = 256


class _ScopeDigests:
    """The store-key part of each scope (a digest), remembered for the scopes seen
    lately: most requests come from a few principals. Bounded; a dict's get and set are
    atomic, so threads share it without a lock (the worst case is a digest computed
    twice)."""

    __slots__ = ("digests", "limit")

    def __init__(self, limit: int = 4096) -> None:
        self.digests: dict[str, str] = {}
        self.limit = limit

    def __call__(self, scope: str) -> str:
        digest = self.digests.get(scope)
        if digest is None:
            digest = _digest(scope)
            if len(scope) <= _SCOPE_KEPT_LENGTH:
                if len(self.digests) >= self.limit:
                    self.digests = {}
                self.digests[scope] = digest
        return digest


_SCOPE_DIGESTS = _ScopeDigests()


def _storable_body(response: Response, max_body_bytes: int) -> bytes | None:
    if response.direct_passthrough:
        return None
    parts = response.response
    if type(parts) is list and len(parts) == 1 and type(parts[0]) is bytes:
        body = parts[0]  # what get_data() joins, for a body set at once (jsonify, a str)
    elif response.is_streamed:
        return None
    else:
        body = response.get_data()
    return body if len(body) <= max_body_bytes else None


def _response_record(fingerprint: bytes, response: Response, body: bytes) -> bytes:
    """The completed record of a response: its status, its storable headers and ``body``.

    The payload (codec ``http.v2``) is the length of a head in bytes, a line break, the
    head, then the body::

        <length>\n<status>\n<name>\n<value>\n...<name>\n<value><body>

    The head's lines are UTF-8; the length frames it, so a value may be empty and the body
    may hold anything. A header with a line break in its name or value (Werkzeug refuses
    them in values) cannot be framed by lines: such a response is stored in the JSON form
    of codec ``http`` instead, which every release reads."""
    fields = [response.status]
    for name, value in response.headers:
        if name.lower() not in UNSTORED_HEADERS:
            fields.append(name)
            fields.append(value)
    head = "\n".join(fields)
    if head.count("\n") != len(fields) - 1:
        headers = list(zip(fields[1::2], fields[2::2], strict=True))
        meta = json.dumps({"status": fields[0], "headers": headers}, separators=(",", ":"))
        return done_record(fingerprint, _HTTP_JSON_CODEC, meta.encode("utf-8") + b"\n" + body)
    encoded = head.encode("utf-8", "surrogatepass")
    return b"%s%d\n%s%s" % (
        done_record(fingerprint, _HTTP_CODEC, b""),
        len(encoded),
        encoded,
        body,
    )


def _decode_response(payload: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    """Status, headers and body of an ``http.v2`` payload (see :func:`_response_record`);
    ``ValueError`` when it is not one."""
    size_end = payload.index(b"\n")
    size = int(payload[:size_end])
    start = size_end + 1
    end = start + size
    if size < 0 or end > len(payload):
        raise ValueError(f"the stored response's head length {size} does not fit")
    status, *fields = payload[start:end].decode("utf-8", "surrogatepass").split("\n")
    if len(fields) % 2:
        raise ValueError("the stored response's headers are not name/value pairs")
    return status, list(zip(fields[0::2], fields[1::2], strict=True)), payload[end:]


def _decode_json_response(payload: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    """Status, headers and body of an ``http`` payload, as releases before ``http.v2``
    wrote them: a JSON head line, then the body."""
    meta_line, _, body = payload.partition(b"\n")
    meta = json.loads(meta_line)
    return meta["status"], [(name, value) for name, value in meta["headers"]], body


_DECODERS: dict[str, Callable[[bytes], tuple[str, list[tuple[str, str]], bytes]]] = {
    _HTTP_CODEC: _decode_response,
    _HTTP_JSON_CODEC: _decode_json_response,
}


def _replay_response(payload: bytes, codec: str, key: str) -> Response:
    decode = _DECODERS.get(codec)
    if decode is None:
        raise IdempotencyError(
            f"idempotency key {key!r} holds a {codec!r} record, not a response", key=key
        )
    try:
        status, headers, body = decode(payload)
    except (ValueError, TypeError, KeyError) as exc:
        raise IdempotencyError(
            f"the response stored for idempotency key {key!r} cannot be read: {exc}", key=key
        ) from exc
    response = current_app.response_class(body, status=status, headers=headers)
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
    required = config.required
    fail_open = config.fail_open
    ttl = config.ttl
    max_body_bytes = config.max_body_bytes
    bare_key = _BARE_KEY.fullmatch
    scope_digest = _SCOPE_DIGESTS

    @functools.wraps(view)
    def idempotent_view(*args: Any, **kwargs: Any) -> Any:
        try:
            req: Request = _current(request)
        except RuntimeError:
            raise RuntimeError(
                f"@idempotent() without key= guards a Flask view and reads the "
                f"{IDEMPOTENCY_HEADER} header, but {view.__qualname__} was called outside "
                "a request; pass key= to guard a plain function"
            ) from None
        environ = req.environ
        value = environ.get(_KEY_ENVIRON)
        if value is None:
            if required:
                return problem_response(
                    400,
                    "idempotency-key-missing",
                    "Idempotency-Key is missing",
                    f"This operation requires an {IDEMPOTENCY_HEADER} header.",
                )
            return view(*args, **kwargs)
        if bare_key(value) is not None:
            key: str = value
        else:
            try:
                key = parse_idempotency_key(value)
            except IdempotencyKeyError as exc:
                return problem_response(
                    400, "idempotency-key-invalid", "Idempotency-Key is invalid", str(exc)
                )
        if scope_of is None:
            scope_text = _scope(_current(g), environ)
        else:
            scope = scope_of(*args, **kwargs)
            scope_text = "-" if scope is None else str(scope)
        skey = f"{prefix}{scope_digest(scope_text)}:{key}"
        fingerprint = _fingerprint(req, scope_text)
        ctx = current_call()
        if ctx is not None:
            ctx.idempotency_key = key
        guard_store = _ambient_store() if store is None else store
        claim = new_claim(fingerprint)
        try:
            existing = try_claim(guard_store, skey, claim, in_flight_ttl)
        except StoreError as exc:
            if fail_open:
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
        if existing is None:
            return _run_view(view, args, kwargs, guard_store, skey, claim, fingerprint)
        # A replay's fast path: the record this request would have stored, header and all.
        header = done_record(fingerprint, _HTTP_CODEC, b"")
        if existing.startswith(header):
            response = _replay_response(existing[len(header) :], _HTTP_CODEC, key)
            if ctx is not None:
                ctx.idempotent_replay = True
            return response
        return _answer_holder(parse_record(existing, key=key), fingerprint, key, ctx)

    def _answer_holder(record: Record, fingerprint: bytes, key: str, ctx: Any) -> Response:
        """The answer to a request whose key is held by another request's record."""
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
        response = _replay_response(record.payload, cast(str, record.codec), key)
        if ctx is not None:
            ctx.idempotent_replay = True
        return response

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
                app: Flask = _current(current_app)
                returned = view(*args, **kwargs)
                # What Flask's make_response does with a response object: nothing.
                response: Response
                if isinstance(returned, app.response_class):
                    response = returned
                else:
                    response = app.make_response(returned)
            except BaseException:
                _release_quietly(guard_store, skey, claim)
                raise
            body = None if response.status_code >= 500 else _storable_body(response, max_body_bytes)
            if body is None:
                _release_quietly(guard_store, skey, claim)
                return response
            record = _response_record(fingerprint, response, body)
            try:
                if not complete(guard_store, skey, claim, record, ttl):
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
