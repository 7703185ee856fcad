"""The SSE parser, the chat-stream reader and the accumulator."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from ai_guard.context import CallContext, bind_sinks, close_call, open_call
from ai_guard.errors import StreamError
from ai_guard.streaming import (
    SSEEvent,
    SSEParser,
    StreamAccumulator,
    collect_stream,
    iter_chat_stream,
    iter_sse,
)
from ai_guard.testing import FakeUpstream
from ai_guard.types import ChatResult, StreamEvent, Usage

MODEL = "gpt-4o-mini"


def parse(*chunks: bytes) -> list[SSEEvent]:
    return list(iter_sse(chunks))


# -- the SSE parser ----------------------------------------------------------------------


def test_data_lines_join_with_newlines() -> None:
    assert parse(b"data: one\ndata: two\n\n") == [SSEEvent("one\ntwo")]


def test_event_id_and_retry_fields() -> None:
    events = parse(b"event: delta\nid: 7\nretry: 1500\ndata: x\n\ndata: y\n\n")
    assert events == [SSEEvent("x", "delta", "7", 1500), SSEEvent("y", "message", "7", None)]


def test_comments_keep_alives_and_unknown_fields_are_skipped() -> None:
    stream = b": ping\n\n\n\nfoo: bar\nnocolon\ndata: kept\n: inside\n\n"
    assert parse(stream) == [SSEEvent("kept")]


def test_only_one_leading_space_is_stripped() -> None:
    assert parse(b"data:x\n\ndata:  two spaces\n\n") == [SSEEvent("x"), SSEEvent(" two spaces")]


def test_data_without_value_is_an_empty_line_of_data() -> None:
    assert parse(b"data\n\ndata:\ndata:\n\n") == [SSEEvent(""), SSEEvent("\n")]


def test_event_without_data_is_not_dispatched() -> None:
    assert parse(b"event: ping\n\nid: 3\n\ndata: after\n\n") == [SSEEvent("after", "message", "3")]


def test_id_with_nul_is_ignored_and_retry_must_be_digits() -> None:
    events = parse(b"id: a\x00b\nretry: soon\ndata: x\n\n")
    assert events == [SSEEvent("x", "message", None, None)]


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(line_end: bytes) -> None:
    stream = line_end.join([b"event: e", b"data: a", b"data: b", b"", b"data: c", b"", b""])
    assert parse(stream) == [SSEEvent("a\nb", "e"), SSEEvent("c")]


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    assert parse(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [SSEEvent("a\nb")]


def test_lone_cr_then_lf_in_next_chunk_is_not_an_extra_blank_line() -> None:
    # "\r" ends "data: a"; the "\n" opening the next chunk belongs to it, so the event is
    # dispatched only by the real blank line that follows.
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"data: b\n\n") == [SSEEvent("a\nb")]


def test_utf8_character_split_across_chunks() -> None:
    payload = "data: héllo → 世界\n\n".encode()
    split = payload.index("世".encode()) + 1  # in the middle of a 3-byte character
    assert parse(payload[:split], payload[split:]) == [SSEEvent("héllo → 世界")]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert parse(b"data: \xff\xfe\n\n") == [SSEEvent("\ufffd\ufffd")]


def test_bom_at_start_is_ignored_even_when_split() -> None:
    assert parse(b"\xef\xbb", b"\xbfdata: x\n\n") == [SSEEvent("x")]
    # a BOM later in the stream is data
    assert parse(b"data: x\n\n\xef\xbb\xbfdata: y\n\n")[0] == SSEEvent("x")


def test_event_cut_at_end_of_stream_is_not_dispatched() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: complete\n\ndata: cut") == [SSEEvent("complete")]
    assert parser.pending
    parser2 = SSEParser()
    parser2.feed(b"data: a\n\n")
    assert not parser2.pending


def test_empty_chunks_change_nothing() -> None:
    assert parse(b"", b"data: a", b"", b"\n", b"", b"\n") == [SSEEvent("a")]


# hypothesis: a stream of events written with random line ends, comments and keep-alives,
# split anywhere into network chunks, always parses to the same events.

_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\x00"),
    max_size=30,
)
_event = st.tuples(
    st.one_of(st.none(), _text.filter(lambda t: bool(t) and not t.startswith(" "))),
    st.lists(_text, min_size=1, max_size=4),
    st.one_of(st.none(), _text),
)


def _write(events: list[tuple[str | None, list[str], str | None]], draw: Any) -> bytes:
    out = bytearray()
    line_end = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    for kind, data_lines, event_id in events:
        if draw(st.booleans()):
            out += b": keep-alive" + line_end + line_end
        if kind is not None:
            out += b"event: " + kind.encode() + line_end
        if event_id is not None:
            out += b"id: " + event_id.encode() + line_end
        for line in data_lines:
            out += b"data: " + line.encode() + line_end
        out += line_end
    return bytes(out)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(_event, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
    data=st.data(),
)
def test_random_chunking_gives_the_same_events(
    events: list[tuple[str | None, list[str], str | None]], cuts: list[int], data: Any
) -> None:
    stream = _write(events, data.draw)
    whole = parse(stream)
    assert parse(*_split(stream, cuts)) == whole
    # byte by byte, the worst case for a parser
    assert list(iter_sse(stream[i : i + 1] for i in range(len(stream)))) == whole
    expected: list[SSEEvent] = []
    last_id: str | None = None
    for kind, data_lines, event_id in events:
        if event_id is not None:
            last_id = event_id
        expected.append(SSEEvent("\n".join(data_lines), kind or "message", last_id))
    assert whole == expected


@settings(max_examples=100)
@given(events=st.lists(_event, max_size=6), data=st.data())
def test_parser_agrees_with_openai_sdk_decoder(
    events: list[tuple[str | None, list[str], str | None]], data: Any
) -> None:
    # Without ids: the SDK's decoder dispatches an empty event on every blank line once an
    # id was seen, where the standard (and we) dispatch nothing.
    stream = _write([(kind, lines, None) for kind, lines, _ in events], data.draw)
    ours = [(e.event, e.data) for e in parse(stream)]
    theirs = [(e.event or "message", e.data) for e in SSEDecoder().iter_bytes(iter([stream]))]
    assert ours == theirs


@settings(max_examples=300)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=10))
def test_arbitrary_bytes_never_crash_the_parser(garbage: bytes, cuts: list[int]) -> None:
    events = parse(*_split(garbage, cuts))
    assert events == parse(garbage)
    assert all(isinstance(e.data, str) for e in events)


# -- chat streams from raw bytes ---------------------------------------------------------


def chunk(
    content: str | None = None,
    *,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    choices: bool = True,
    index: int = 0,
) -> bytes:
    body: dict[str, Any] = {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "model": MODEL}
    if choices:
        delta = {} if content is None else {"content": content}
        body["choices"] = [{"index": index, "delta": delta, "finish_reason": finish}]
    else:
        body["choices"] = []
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 30,
    "total_tokens": 1230,
    "prompt_tokens_details": {"cached_tokens": 1024},
}
DONE = b"data: [DONE]\n\n"


class Closable:
    """A raw chunk source that records whether the reader closed it."""

    def __init__(self, *chunks: bytes, fail_with: BaseException | None = None) -> None:
        self.chunks = chunks
        self.fail_with = fail_with
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.fail_with is not None:
            raise self.fail_with

    def close(self) -> None:
        self.closed += 1


def read(source: Closable, **kwargs: Any) -> list[StreamEvent]:
    return list(iter_chat_stream(source, close=source.close, **kwargs))


def test_content_then_exactly_one_usage_event() -> None:
    source = Closable(
        chunk(""),
        chunk("Hel"),
        chunk("lo"),
        chunk(finish="stop"),
        chunk(choices=False, usage=USAGE),
        DONE,
    )
    events = read(source)
    assert [e.type for e in events] == ["content", "content", "usage"]
    assert [e.content for e in events[:2]] == ["Hel", "lo"]
    final = events[-1]
    assert final.usage == Usage(1200, 30, 1230, 1024)
    assert final.finish_reason == "stop"
    assert final.model == MODEL
    assert final.id == "chatcmpl-abc"
    assert source.closed == 1


def test_usage_is_taken_from_a_chunk_that_also_has_choices() -> None:
    events = read(Closable(chunk("Hi"), chunk(finish="stop", usage=USAGE), DONE))
    assert events[-1].type == "usage"
    assert events[-1].usage == Usage(1200, 30, 1230, 1024)


def test_null_usage_on_ordinary_chunks_does_not_hide_the_final_usage() -> None:
    events = read(
        Closable(chunk("a", usage=None), chunk(choices=False, usage=USAGE), DONE),
    )
    assert events[-1].usage is not None
    assert events[-1].usage.cached_tokens == 1024


def test_stream_without_usage_ends_with_a_usage_event_of_none() -> None:
    events = read(Closable(chunk("x"), chunk(finish="stop"), DONE))
    assert events[-1].type == "usage"
    assert events[-1].usage is None
    assert events[-1].finish_reason == "stop"


def test_only_the_first_choice_is_streamed_as_content() -> None:
    events = read(Closable(chunk("zero"), chunk("one", index=1), chunk("!"), DONE))
    assert [e.content for e in events if e.type == "content"] == ["zero", "!"]


def test_stream_that_ends_without_done_is_an_error_keeping_partial_content() -> None:
    source = Closable(chunk("part"), chunk("ial"))
    events = read(source)
    assert events[-1].type == "error"
    error = events[-1].error
    assert isinstance(error, StreamError)
    assert error.partial_content == "partial"
    assert "[DONE]" in str(error)
    assert source.closed == 1


def test_stream_cut_mid_event_says_so() -> None:
    events = read(Closable(chunk("a"), b'data: {"choices": [{"del'))
    assert isinstance(events[-1].error, StreamError)
    assert "cut in the middle of an event" in str(events[-1].error)


def test_error_event_ends_the_stream_with_its_payload() -> None:
    error_payload = {"error": {"message": "overloaded", "type": "server_error"}}
    source = Closable(
        chunk("so far"),
        b"event: error\ndata: " + json.dumps(error_payload).encode() + b"\n\n",
        chunk("never"),
        DONE,
    )
    events = read(source)
    assert [e.type for e in events] == ["content", "error"]
    error = events[-1].error
    assert isinstance(error, StreamError)
    assert error.partial_content == "so far"
    assert error.body == error_payload
    assert "overloaded" in str(error)


def test_error_object_in_data_without_event_line_is_an_error() -> None:
    events = read(Closable(b'data: {"error": {"message": "quota"}}\n\n', DONE))
    assert isinstance(events[-1].error, StreamError)
    assert "quota" in str(events[-1].error)


def test_error_event_with_text_data_is_an_error() -> None:
    events = read(Closable(b"event: error\ndata: upstream exploded\n\n"))
    assert isinstance(events[-1].error, StreamError)
    assert "upstream exploded" in str(events[-1].error)


@pytest.mark.parametrize("bad", [b"data: {not json\n\n", b"data: [1, 2]\n\n", b"data: 42\n\n"])
def test_malformed_data_line_is_a_clear_stream_error(bad: bytes) -> None:
    source = Closable(chunk("ok "), bad, chunk("later"), DONE)
    events = read(source)
    assert [e.type for e in events] == ["content", "error"]
    error = events[-1].error
    assert isinstance(error, StreamError)
    assert "malformed stream data" in str(error)
    assert error.partial_content == "ok "
    assert source.closed == 1


@pytest.mark.parametrize(
    "failure",
    [
        requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead"),
        requests.exceptions.ConnectionError("reset"),
        ConnectionResetError(104, "Connection reset by peer"),
    ],
)
def test_dropped_connection_is_an_error_keeping_partial_content(failure: BaseException) -> None:
    source = Closable(chunk("half"), chunk(" way"), fail_with=failure)
    events = read(source)
    assert events[-1].type == "error"
    error = events[-1].error
    assert isinstance(error, StreamError)
    assert error.partial_content == "half way"
    assert error.__cause__ is failure
    assert "dropped" in str(error)
    assert source.closed == 1


def test_raise_on_error_raises_instead_of_yielding() -> None:
    source = Closable(chunk("half"), fail_with=requests.exceptions.ChunkedEncodingError("x"))
    received: list[StreamEvent] = []
    with pytest.raises(StreamError) as info:
        received.extend(iter_chat_stream(source, close=source.close, raise_on_error=True))
    assert info.value.partial_content == "half"
    assert [e.type for e in received] == ["content"]
    assert source.closed == 1


def test_usage_seen_before_a_failure_is_still_yielded() -> None:
    events = read(Closable(chunk("a", usage=USAGE), fail_with=ConnectionResetError()))
    assert [e.type for e in events] == ["content", "usage", "error"]


def test_stopping_early_closes_the_source() -> None:
    source = Closable(chunk("a"), chunk("b"), chunk("c"), DONE)
    stream = iter_chat_stream(source, close=source.close)
    assert next(stream).content == "a"
    assert source.closed == 0
    stream.close()
    assert source.closed == 1


def test_unrelated_exceptions_are_not_swallowed() -> None:
    source = Closable(chunk("a"), fail_with=KeyError("bug"))
    with pytest.raises(KeyError):
        read(source)
    assert source.closed == 1


# hypothesis: a chat stream chunked anywhere yields the same content and usage
@settings(max_examples=150)
@given(
    pieces=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=10),
    cuts=st.lists(st.integers(0, 5000), max_size=25),
)
def test_chat_stream_is_independent_of_network_chunking(pieces: list[str], cuts: list[int]) -> None:
    stream = b"".join([*(chunk(p) for p in pieces), chunk(choices=False, usage=USAGE), DONE])
    events = list(iter_chat_stream(_split(stream, cuts)))
    assert "".join(e.content for e in events if e.type == "content") == "".join(pieces)
    assert events[-1].type == "usage"
    assert events[-1].usage == Usage(1200, 30, 1230, 1024)


# -- chat streams over HTTP --------------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


def open_stream(
    upstream: FakeUpstream, content: str = "stream please", *, timeout: float = 10, **extra: Any
) -> requests.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    return requests.post(
        f"{upstream.url}/chat/completions", json=body, stream=True, timeout=timeout
    )


def reference(upstream: FakeUpstream, content: str = "stream please") -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    response = requests.post(f"{upstream.url}/chat/completions", json=body, timeout=10)
    return dict(response.json())


def test_stream_from_fake_upstream(upstream: FakeUpstream) -> None:
    response = open_stream(upstream)
    events = list(iter_chat_stream(response))
    expected = reference(upstream)
    assert [e.type for e in events[:-1]] == ["content"] * (len(events) - 1)
    assert "".join(e.content for e in events[:-1]) == expected["choices"][0]["message"]["content"]
    usage = events[-1].usage
    assert usage is not None
    assert usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert events[-1].id is not None
    assert events[-1].id.startswith("chatcmpl-")
    assert response.raw.closed


@pytest.mark.parametrize("behaviour", [{"sse_noise": True}, {"usage_on_finish_chunk": True}])
def test_stream_variants_read_the_same(upstream: FakeUpstream, behaviour: dict[str, Any]) -> None:
    plain = collect_stream(iter_chat_stream(open_stream(upstream)))
    upstream.configure(**behaviour)
    variant = collect_stream(iter_chat_stream(open_stream(upstream)))
    assert variant.content == plain.content
    assert variant.usage == plain.usage


def test_dropped_stream_from_fake_upstream(upstream: FakeUpstream) -> None:
    upstream.configure(stream_drop_after=4)
    response = open_stream(upstream)
    events = list(iter_chat_stream(response))
    error = events[-1].error
    assert isinstance(error, StreamError)
    received = "".join(e.content for e in events if e.type == "content")
    assert received
    assert error.partial_content == received
    assert error.request_id == response.headers["x-request-id"]
    assert response.raw.closed


def test_error_event_from_fake_upstream(upstream: FakeUpstream) -> None:
    upstream.configure(stream_error_after=3)
    with pytest.raises(StreamError) as info:
        collect_stream(iter_chat_stream(open_stream(upstream)))
    assert info.value.partial_content
    assert info.value.body["error"]["type"] == "server_error"


def test_malformed_sse_from_fake_upstream(upstream: FakeUpstream) -> None:
    upstream.configure(malformed_sse=True)
    events = list(iter_chat_stream(open_stream(upstream)))
    assert isinstance(events[-1].error, StreamError)
    assert "malformed" in str(events[-1].error)


def test_read_timeout_mid_stream_is_a_stream_error(upstream: FakeUpstream) -> None:
    upstream.configure(stream_chunk_delay=2.0)
    events = list(iter_chat_stream(open_stream(upstream, timeout=0.3)))
    error = events[-1].error
    assert isinstance(error, StreamError)
    assert "dropped" in str(error)


def test_http_error_status_is_an_error_event_with_body(upstream: FakeUpstream) -> None:
    response = open_stream(upstream, model="unknown-model")
    events = list(iter_chat_stream(response))
    assert len(events) == 1
    error = events[0].error
    assert isinstance(error, StreamError)
    assert error.status == 404
    assert error.body["error"]["code"] == "model_not_found"
    assert "does not exist" in str(error)
    assert error.request_id == response.headers["x-request-id"]


def test_json_answer_to_a_stream_request_is_read_whole(upstream: FakeUpstream) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "stream please"}]}
    response = requests.post(f"{upstream.url}/chat/completions", json=body, timeout=10)
    events = list(iter_chat_stream(response))
    assert [e.type for e in events] == ["content", "usage"]
    assert events[0].content == reference(upstream)["choices"][0]["message"]["content"]


def test_stopping_early_closes_the_http_response(upstream: FakeUpstream) -> None:
    upstream.configure(completion_tokens=500)
    response = open_stream(upstream)
    stream = iter_chat_stream(response)
    next(stream)
    stream.close()
    assert response.raw.closed
    # the server is fine and the next stream works
    assert collect_stream(iter_chat_stream(open_stream(upstream))).content


def test_stream_ends_the_call_context_with_usage_and_id(upstream: FakeUpstream) -> None:
    # The seam the client uses: a generator result of the outermost guard is observed as
    # it passes and the call is emitted when the stream ends.
    seen: list[CallContext] = []
    with bind_sinks(seen.append):
        ctx, token = open_call()
        ctx.operation = "chat"
        ctx.request_model = MODEL
        stream = close_call(ctx, token, result=iter_chat_stream(open_stream(upstream, "k" * 5000)))
        assert seen == []
        list(stream)
    assert len(seen) == 1
    assert seen[0].stream
    assert seen[0].usage_known
    assert seen[0].input_tokens == 1250
    assert seen[0].response_id is not None
    assert seen[0].finish_reasons == ("stop",)
    assert seen[0].error_type is None


def test_failed_stream_marks_the_call_context_as_an_error(upstream: FakeUpstream) -> None:
    upstream.configure(stream_drop_after=2)
    seen: list[CallContext] = []
    with bind_sinks(seen.append):
        ctx, token = open_call()
        ctx.operation = "chat"
        list(close_call(ctx, token, result=iter_chat_stream(open_stream(upstream))))
    assert seen[0].error_type == "StreamError"


# -- accumulating ------------------------------------------------------------------------


def test_collect_stream_builds_a_chat_result() -> None:
    events = read(
        Closable(
            chunk("Hel"),
            chunk("lo"),
            chunk(finish="length"),
            chunk(choices=False, usage=USAGE),
            DONE,
        )
    )
    result = collect_stream(events, headers={"x-request-id": "req_1"})
    assert result.content == "Hello"
    assert result.finish_reason == "length"
    assert result.model == MODEL
    assert result.id == "chatcmpl-abc"
    assert result.usage == Usage(1200, 30, 1230, 1024)
    assert result.headers == {"x-request-id": "req_1"}
    # raw is an OpenAI-shaped body that reads back the same
    again = ChatResult.from_openai(result.raw)
    assert (again.content, again.usage, again.finish_reason, again.id) == (
        result.content,
        result.usage,
        result.finish_reason,
        result.id,
    )


def test_collect_stream_raises_the_stream_error() -> None:
    with pytest.raises(StreamError) as info:
        collect_stream(read(Closable(chunk("abc"))))
    assert info.value.partial_content == "abc"


def test_accumulator_gives_the_partial_result_when_not_strict() -> None:
    accumulator = StreamAccumulator()
    for event in read(Closable(chunk("abc"), fail_with=ConnectionResetError())):
        accumulator.add(event)
    assert isinstance(accumulator.error, StreamError)
    assert accumulator.content == "abc"
    partial = accumulator.result(strict=False)
    assert partial.content == "abc"
    assert partial.usage == Usage()
    with pytest.raises(StreamError):
        accumulator.result()
