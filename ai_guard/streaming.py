"""Server-Sent Events and streamed chat completions.

Three layers, each usable alone:

- :class:`SSEParser` / :func:`iter_sse`: a small, incremental parser of the SSE wire
  format (WHATWG "event stream interpretation"): bytes in, :class:`SSEEvent`\\ s out,
  whatever the network chunking.
- :func:`iter_chat_stream`: an OpenAI ``/chat/completions`` stream (``stream: true``) as
  :class:`~ai_guard.types.StreamEvent`\\ s: ``content`` deltas as they arrive, then one
  ``usage`` event, or an ``error`` event that keeps the partial content. The HTTP
  response is always closed.
- :class:`StreamAccumulator` / :func:`collect_stream`: the events folded back into a
  :class:`~ai_guard.types.ChatResult`.

Example::

    response = session.post(url, json={..., "stream": True,
                                       "stream_options": {"include_usage": True}},
                            stream=True, timeout=(3.05, 60))
    for event in iter_chat_stream(response):
        if event.type == "content":
            print(event.content, end="", flush=True)
        elif event.type == "usage":
            print("\\n", event.usage)
        else:
            raise event.error          # a StreamError; .partial_content has the text so far
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import requests
import urllib3.exceptions

from ai_guard.errors import StreamError
from ai_guard.types import ChatResult, StreamEvent, Usage

__all__ = [
    "SSEEvent",
    "SSEParser",
    "StreamAccumulator",
    "collect_stream",
    "iter_chat_stream",
    "iter_sse",
]

_BOM = b"\xef\xbb\xbf"
# What a dropped or broken connection raises while a stream is read (requests wraps most
# of them; a raw chunk iterable may raise the underlying ones).
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)
# How much of an error response body is read into the error.
_MAX_ERROR_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched Server-Sent Event.

    ``data`` is the joined ``data:`` lines (``\\n`` between them), ``event`` its type
    (``"message"`` when no ``event:`` line was given), ``id`` the last event id seen in
    the stream so far, ``retry`` the reconnection time in ms if this event set one.
    """

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEParser:
    """An incremental Server-Sent Events parser.

    :meth:`feed` it the bytes as they arrive, in chunks of any size: lines end with
    ``\\r\\n``, ``\\r`` or ``\\n`` (a ``\\r\\n`` split across two chunks counts once), a
    UTF-8 character may be split across chunks (lines are decoded whole), lines starting
    with ``:`` are comments, ``event:``/``id:``/``retry:`` lines set the event's fields,
    several ``data:`` lines join with ``\\n``, unknown fields are ignored, and a blank line
    dispatches the event (a blank line with no ``data`` dispatches nothing: keep-alives).
    As the standard says, an event not ended by a blank line when the stream ends is not
    dispatched (:attr:`pending` tells whether there was one).

    Example::

        parser = SSEParser()
        for chunk in response.iter_content(chunk_size=None):
            for event in parser.feed(chunk):
                handle(event.data)
    """

    __slots__ = ("_data", "_event", "_last_id", "_pending", "_retry", "_skip_lf", "_started")

    def __init__(self) -> None:
        # Pieces of a line whose end has not arrived yet: joined once the end comes, so a
        # long line in many chunks costs linear time, not quadratic.
        self._pending: list[bytes] = []
        self._skip_lf = False
        self._started = False
        self._data: list[bytes] = []
        self._event: str | None = None
        self._last_id: str | None = None
        self._retry: int | None = None

    @property
    def pending(self) -> bool:
        """Whether bytes or fields of an undispatched event are waiting (at end of stream:
        the stream was cut mid-event)."""
        return bool(self._pending or self._data or self._event is not None)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse ``chunk`` and return the events it completed (often none or one)."""
        if not chunk:
            return []
        if not self._started:
            if self._pending:
                chunk = b"".join(self._pending) + chunk
                self._pending = []
            if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
                self._pending.append(chunk)  # maybe a BOM split across chunks
                return []
            self._started = True
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
                if not chunk:
                    return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 10:  # the "\n" of a "\r\n" split across chunks
                chunk = chunk[1:]
                if not chunk:
                    return []
        if self._pending:
            self._pending.append(chunk)
            if 10 not in chunk and 13 not in chunk:
                return []
            chunk = b"".join(self._pending)
            self._pending = []
        # bytes.splitlines splits on exactly the SSE line ends: \r\n, \r and \n.
        lines = chunk.splitlines(True)
        last_byte = lines[-1][-1]
        if last_byte == 13:
            self._skip_lf = True
        elif last_byte != 10:
            self._pending.append(lines.pop())
        events: list[SSEEvent] = []
        data = self._data
        for raw_line in lines:
            line = raw_line.rstrip(b"\r\n")
            if not line:
                if data:
                    events.append(
                        SSEEvent(
                            b"\n".join(data).decode("utf-8", "replace"),
                            self._event or "message",
                            self._last_id,
                            self._retry,
                        )
                    )
                    data = self._data = []
                self._event = None
                self._retry = None
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value[:1] == b" " else value)
            elif line[0] != 58:  # not a ":" comment
                self._field(line)
        return events

    def _field(self, line: bytes) -> None:
        colon = line.find(b":")
        if colon < 0:
            field, value = line, b""
        else:
            field, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if field == b"data":
            self._data.append(value)
        elif field == b"event":
            self._event = value.decode("utf-8", "replace")
        elif field == b"id":
            if b"\0" not in value:
                self._last_id = value.decode("utf-8", "replace")
        elif field == b"retry" and value.isdigit():
            self._retry = int(value)


def iter_sse(chunks: Iterable[bytes]) -> Iterator[SSEEvent]:
    """The events of an SSE byte stream delivered in ``chunks`` (any chunking)."""
    parser = SSEParser()
    for chunk in chunks:
        yield from parser.feed(chunk)


# -- chat completion streams -------------------------------------------------------------


def _response_body(response: requests.Response) -> Any:
    # iter_content works whether or not the body was already read; the size is bounded.
    raw = b""
    try:
        for piece in response.iter_content(chunk_size=8192):
            raw += piece
            if len(raw) >= _MAX_ERROR_BODY:
                break
    except _TRANSPORT_ERRORS:
        pass
    text = raw[:_MAX_ERROR_BODY].decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _error_message(body: Any, fallback: str) -> str:
    if isinstance(body, Mapping):
        error = body.get("error", body)
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return f"{fallback}: {error['message']}"
        if isinstance(error, str):
            return f"{fallback}: {error}"
    return fallback


def iter_chat_stream(
    source: requests.Response | Iterable[bytes],
    *,
    raise_on_error: bool = False,
    close: Callable[[], None] | None = None,
    request_id: str | None = None,
) -> Generator[StreamEvent, None, None]:
    """The events of a streamed chat completion.

    ``source`` is the :class:`requests.Response` of a ``stream=True`` request (or an
    iterable of raw SSE bytes plus a ``close`` callback; given with a response, ``close``
    is called instead of ``response.close``). ``request_id`` defaults to the response's
    ``x-request-id``. Yields:

    - ``content`` events, one per non-empty delta of the first choice, as they arrive;
    - then, when ``data: [DONE]`` ends the stream, exactly one ``usage`` event: its
      ``usage`` comes from whichever chunk carried ``usage`` (the final chunk with empty
      ``choices`` that ``stream_options.include_usage`` asks for, or any other chunk, as
      some compatible servers send it), ``None`` when the server sent none; it also
      carries the final ``model``, ``finish_reason`` and ``id``;
    - or, when the stream fails, a last ``error`` event whose ``error`` is a
      :class:`~ai_guard.errors.StreamError` keeping ``partial_content`` (the text
      received so far), ``status``/``body`` (an error answer or an ``error`` event's
      payload) and ``request_id``. Failures: an HTTP error status, an ``event: error`` or
      a ``{"error": ...}`` data line, a data line that is not JSON, a connection that
      drops (``ChunkedEncodingError``, ``ConnectionError``, read timeouts, urllib3
      protocol errors), a stream that ends without ``[DONE]``. A ``usage`` event
      received before the failure is still yielded, just before the error. With
      ``raise_on_error=True`` the ``StreamError`` is raised instead of yielded.

    The response (or ``close``) is closed however the stream ends, also when the caller
    stops iterating early (the generator is closed, or garbage collected). A 200 answer
    with a JSON body (a server that ignored ``stream``) is read as one content event and
    its usage.
    """
    chunks: Iterable[bytes]
    response = source if isinstance(source, requests.Response) else None
    if response is not None:
        close = close or response.close
        request_id = request_id or response.headers.get("x-request-id")
        chunks = ()
    else:
        chunks = source
    parts: list[str] = []
    model: str | None = None
    finish_reason: str | None = None
    response_id: str | None = None
    usage: Usage | None = None
    failure: StreamError | None = None
    done = False
    try:
        if response is not None:
            status = response.status_code
            content_type = response.headers.get("content-type", "")
            if status >= 400:
                body = _response_body(response)
                failure = StreamError(
                    _error_message(body, f"the upstream answered {status}"),
                    status=status,
                    body=body,
                    request_id=request_id,
                )
                chunks = ()
            elif content_type.startswith("application/json"):
                try:
                    body = response.json()
                except (requests.exceptions.JSONDecodeError, RecursionError):
                    body = None  # a transport error while reading is handled below
                if not isinstance(body, dict):
                    failure = StreamError(
                        f"the upstream answered {status} with a JSON body that is not a "
                        "chat completion object",
                        body=response.text[:_MAX_ERROR_BODY],
                        request_id=request_id,
                    )
                    chunks = ()
                else:
                    result = ChatResult.from_openai(body, response.headers)
                    if result.content:
                        yield StreamEvent(
                            "content", content=result.content, model=result.model, id=result.id
                        )
                    yield StreamEvent(
                        "usage",
                        usage=Usage.from_openai(result.raw.get("usage")),
                        model=result.model,
                        finish_reason=result.finish_reason,
                        id=result.id,
                    )
                    return
            else:
                chunks = response.iter_content(chunk_size=None)
        parser = SSEParser()
        for chunk in chunks:
            for sse in parser.feed(chunk):
                data = sse.data
                if data == "[DONE]":
                    done = True
                    break
                try:
                    payload = json.loads(data)
                except (ValueError, RecursionError):
                    if sse.event == "error":
                        failure = StreamError(
                            f"the stream sent an error event: {data[:200]}",
                            partial_content="".join(parts),
                            body=data,
                            request_id=request_id,
                        )
                    else:
                        failure = StreamError(
                            f"malformed stream data (not JSON): {data[:200]!r}",
                            partial_content="".join(parts),
                            body=data,
                            request_id=request_id,
                        )
                    break
                if not isinstance(payload, dict):
                    failure = StreamError(
                        f"malformed stream data (not a JSON object): {data[:200]!r}",
                        partial_content="".join(parts),
                        body=payload,
                        request_id=request_id,
                    )
                    break
                if sse.event == "error" or payload.get("error"):
                    failure = StreamError(
                        _error_message(payload, "the stream sent an error event"),
                        partial_content="".join(parts),
                        body=payload,
                        request_id=request_id,
                    )
                    break
                chunk_model = payload.get("model")
                if isinstance(chunk_model, str) and chunk_model:
                    model = chunk_model
                chunk_id = payload.get("id")
                if isinstance(chunk_id, str) and chunk_id:
                    response_id = chunk_id
                chunk_usage = payload.get("usage")
                if chunk_usage is not None:
                    usage = Usage.from_openai(chunk_usage) or usage
                choices = payload.get("choices")
                if not isinstance(choices, list):
                    continue
                for choice in choices:
                    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                        continue
                    chunk_finish = choice.get("finish_reason")
                    if isinstance(chunk_finish, str):
                        finish_reason = chunk_finish
                    delta = choice.get("delta")
                    text = delta.get("content") if isinstance(delta, dict) else None
                    if isinstance(text, str) and text:
                        parts.append(text)
                        yield StreamEvent(
                            "content",
                            content=text,
                            model=model,
                            finish_reason=finish_reason,
                            id=response_id,
                        )
            if done or failure is not None:
                break
        if failure is None and not done:
            failure = StreamError(
                "the stream ended before data: [DONE]"
                + (" (cut in the middle of an event)" if parser.pending else ""),
                partial_content="".join(parts),
                request_id=request_id,
            )
    except _TRANSPORT_ERRORS as exc:
        failure = StreamError(
            f"the connection dropped mid-stream: {type(exc).__name__}: {exc}",
            partial_content="".join(parts),
            request_id=request_id,
        )
        failure.__cause__ = exc
    finally:
        if close is not None:
            close()
    if failure is None:
        yield StreamEvent(
            "usage", usage=usage, model=model, finish_reason=finish_reason, id=response_id
        )
        return
    if usage is not None:
        yield StreamEvent(
            "usage", usage=usage, model=model, finish_reason=finish_reason, id=response_id
        )
    if raise_on_error:
        raise failure
    yield StreamEvent(
        "error", error=failure, model=model, finish_reason=finish_reason, id=response_id
    )


class StreamAccumulator:
    """Folds stream events into a :class:`~ai_guard.types.ChatResult`.

    Feed it every event with :meth:`add` (e.g. while printing the deltas); :meth:`result`
    then gives the whole reply. ``error`` holds the stream's error, if it ended with one.

    Example::

        acc = StreamAccumulator()
        for event in client.stream_chat(messages):
            acc.add(event)
            if event.type == "content":
                print(event.content, end="")
        result = acc.result()          # raises the StreamError if the stream failed
    """

    __slots__ = ("_parts", "error", "finish_reason", "id", "model", "usage")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self.model: str | None = None
        self.finish_reason: str | None = None
        self.id: str | None = None
        self.usage: Usage | None = None
        self.error: BaseException | None = None

    @property
    def content(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    def add(self, event: StreamEvent) -> None:
        """Take one event into account."""
        if event.type == "content" and event.content:
            self._parts.append(event.content)
        elif event.type == "usage" and event.usage is not None:
            self.usage = event.usage
        elif event.type == "error":
            self.error = event.error
        if event.model:
            self.model = event.model
        if event.finish_reason:
            self.finish_reason = event.finish_reason
        if event.id:
            self.id = event.id

    def result(
        self, headers: Mapping[str, str] | None = None, *, strict: bool = True
    ) -> ChatResult:
        """The reply as a :class:`~ai_guard.types.ChatResult` (``raw`` is an OpenAI-shaped
        ``chat.completion`` body rebuilt from the stream).

        With ``strict`` (the default) a stream that ended with an error raises that error
        (a :class:`~ai_guard.errors.StreamError` keeps the partial content); with
        ``strict=False`` the partial result is returned.
        """
        if strict and self.error is not None:
            raise self.error
        content = self.content
        usage = self.usage or Usage()
        raw: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion",
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": self.finish_reason,
                }
            ],
        }
        if self.usage is not None:
            raw["usage"] = {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
                "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
            }
        return ChatResult(
            content=content,
            model=self.model or "",
            usage=usage,
            finish_reason=self.finish_reason,
            headers=dict(headers) if headers is not None else {},
            raw=raw,
            id=self.id,
        )


def collect_stream(
    events: Iterable[StreamEvent], headers: Mapping[str, str] | None = None
) -> ChatResult:
    """Consume a stream of events into a :class:`~ai_guard.types.ChatResult`; a stream that
    ended with an ``error`` event raises its :class:`~ai_guard.errors.StreamError`."""
    accumulator = StreamAccumulator()
    for event in events:
        accumulator.add(event)
    return accumulator.result(headers)
