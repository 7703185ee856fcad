"""Streaming, structured outputs and the fake upstream.

- ``sse_parse``: our incremental SSE parser vs openai-python's ``SSEDecoder`` on the same
  chat stream (200 chunks delivered in network-sized pieces); ns per whole stream.
  Target: ours no slower than the SDK's (ratio <= 1.0).
- ``chat_stream``: ``iter_chat_stream`` (SSE + JSON + StreamEvents + usage) on the same
  stream; the ``bare`` case is the least a reader must do (SSE parsing plus
  ``json.loads`` of each event), so the overhead is what our events and checks cost.
- ``structured_parse``: ``parse_structured`` vs pydantic's ``model_validate_json`` (bare).
- ``structured_format``: ``structured_output_format`` vs openai-python's
  ``type_to_response_format_param`` for the same model (ours computes a model's schema
  once per class; ratio target <= 1.0).
- ``fake_upstream``: requests/s of ``FakeUpstream`` answering a ``requests.Session`` in
  one thread and in 8 (so quota benchmarks are not limited by the fake; target >= 500/s).

Run alone: ``python -m benchmarks -k streaming``.
"""

from __future__ import annotations

import json
import threading
import time

import requests
from openai._streaming import SSEDecoder
from openai.lib._parsing._completions import type_to_response_format_param
from pydantic import BaseModel

from ai_guard.streaming import SSEParser, iter_chat_stream
from ai_guard.structured import parse_structured, structured_output_format
from ai_guard.testing import FakeUpstream
from benchmarks._harness import Case, Result


def _stream_bytes(chunks: int = 200) -> bytes:
    out = []
    for i in range(chunks):
        body = {
            "id": "chatcmpl-0123456789abcdef01234567",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": "gpt-4o-mini",
            "system_fingerprint": "fp_ai_guard",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": f"word{i} "},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            "usage": None,
        }
        out.append(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n")
    usage = {"prompt_tokens": 1200, "completion_tokens": chunks, "total_tokens": 1200 + chunks}
    final = {"id": "chatcmpl-0123456789abcdef01234567", "choices": [], "usage": usage}
    out.append(b"data: " + json.dumps(final).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


STREAM = _stream_bytes()
# Network-sized pieces that cut events anywhere, as a TCP stream does.
PIECES = [STREAM[i : i + 1400] for i in range(0, len(STREAM), 1400)]


def _ours_sse() -> int:
    parser = SSEParser()
    count = 0
    for piece in PIECES:
        count += len(parser.feed(piece))
    return count


def _sdk_sse() -> int:
    return sum(1 for _ in SSEDecoder().iter_bytes(iter(PIECES)))


def _bare_chat_stream() -> int:
    parser = SSEParser()
    count = 0
    for piece in PIECES:
        for event in parser.feed(piece):
            if event.data != "[DONE]":
                json.loads(event.data)
                count += 1
    return count


def _ours_chat_stream() -> int:
    return sum(1 for _ in iter_chat_stream(PIECES))


class Part(BaseModel):
    name: str
    quantity: int


class Order(BaseModel):
    order_id: int
    customer: str
    parts: list[Part]
    note: str | None


ORDER_JSON = json.dumps(
    {
        "order_id": 7,
        "customer": "Ada",
        "parts": [{"name": f"p{i}", "quantity": i} for i in range(5)],
        "note": None,
    }
)


def cases() -> list[Case]:
    assert _ours_sse() == _sdk_sse() == 202
    assert _ours_chat_stream() == 201  # 200 content events and one usage event
    return [
        Case("sse_parse", "openai SSEDecoder", _sdk_sse),
        Case("sse_parse", "ai_guard SSEParser", _ours_sse, anchor="openai SSEDecoder", target=1.0),
        Case("chat_stream", "bare", _bare_chat_stream),
        Case("chat_stream", "ai_guard iter_chat_stream", _ours_chat_stream),
        Case("structured_parse", "bare", lambda: Order.model_validate_json(ORDER_JSON)),
        Case(
            "structured_parse",
            "ai_guard parse_structured",
            lambda: parse_structured(ORDER_JSON, Order),
        ),
        Case(
            "structured_format",
            "openai type_to_response_format_param",
            lambda: type_to_response_format_param(Order),
        ),
        Case(
            "structured_format",
            "ai_guard structured_output_format",
            lambda: structured_output_format("Order", Order),
            anchor="openai type_to_response_format_param",
            target=1.0,
        ),
    ]


def _requests_per_second(upstream: FakeUpstream, threads: int, per_thread: int) -> float:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    url = f"{upstream.url}/chat/completions"
    barrier = threading.Barrier(threads + 1)

    def work() -> None:
        with requests.Session() as session:
            session.post(url, json=body, timeout=10)  # connect outside the measured part
            barrier.wait()
            for _ in range(per_thread):
                session.post(url, json=body, timeout=10).raise_for_status()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join(timeout=120)
    return threads * per_thread / (time.perf_counter() - started)


def results(quick: bool) -> list[Result]:
    calls = 300 if quick else 2000
    rows = []
    with FakeUpstream(quota_requests=10**9, quota_tokens=10**12, record_limit=1000) as upstream:
        for threads in (1, 8):
            rate = _requests_per_second(upstream, threads, calls // threads)
            rows.append(
                Result(
                    "fake_upstream",
                    f"chat requests/s, {threads} client thread(s)",
                    rate,
                    "req/s",
                    target=500.0,
                )
            )
        if upstream.server_errors:
            raise RuntimeError(upstream.server_errors[0])
    return rows
