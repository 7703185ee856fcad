"""The vocabulary every module shares: token usage, a chat result, a stream event.

These are plain frozen dataclasses (slots, no validation on the hot path); the parsing
helpers accept the OpenAI wire format and never raise on a missing or odd field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ChatResult", "StreamEvent", "Usage"]


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, float) and value == value and 0 <= value < 1e15:
        return int(value)
    return 0


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call. ``cached_tokens`` is the part of ``prompt_tokens`` served
    from the upstream's prompt cache (billed at the cached rate)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0

    @classmethod
    def from_openai(cls, data: Any) -> Usage | None:
        """Parse an OpenAI ``usage`` object (``None`` when absent or not an object).

        Reads ``prompt_tokens_details.cached_tokens`` for cached tokens, and falls back to
        the Responses-API names ``input_tokens`` / ``output_tokens``.
        """
        if not isinstance(data, Mapping):
            return None
        prompt = _int(data.get("prompt_tokens", data.get("input_tokens", 0)))
        completion = _int(data.get("completion_tokens", data.get("output_tokens", 0)))
        total = _int(data.get("total_tokens", 0)) or prompt + completion
        details = data.get("prompt_tokens_details") or data.get("input_tokens_details")
        cached = _int(details.get("cached_tokens", 0)) if isinstance(details, Mapping) else 0
        return cls(prompt, completion, total, min(cached, prompt))


@dataclass(frozen=True, slots=True)
class ChatResult:
    """The outcome of one chat completion.

    ``content`` is the first choice's text, ``model`` the model that answered,
    ``usage`` its token counts, ``finish_reason`` why it stopped (``"stop"``,
    ``"length"``, ...), ``headers`` the HTTP response headers (rate-limit figures live
    there), ``raw`` the decoded JSON body.
    """

    content: str
    model: str
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)
    id: str | None = None

    @classmethod
    def from_openai(
        cls, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> ChatResult:
        """Build a result from a ``/chat/completions`` JSON body."""
        choices = body.get("choices")
        first: Mapping[str, Any] = {}
        if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
            first = choices[0]
        message = first.get("message")
        content = message.get("content") if isinstance(message, Mapping) else None
        finish = first.get("finish_reason")
        model = body.get("model")
        response_id = body.get("id")
        return cls(
            content=content if isinstance(content, str) else "",
            model=model if isinstance(model, str) else "",
            usage=Usage.from_openai(body.get("usage")) or Usage(),
            finish_reason=finish if isinstance(finish, str) else None,
            headers=dict(headers) if headers is not None else {},
            raw=body,
            id=response_id if isinstance(response_id, str) else None,
        )


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One event of a streamed chat completion.

    - ``type == "content"``: ``content`` is the text delta that just arrived.
    - ``type == "usage"``: ``usage`` holds the totals from the final chunk.
    - ``type == "error"``: ``error`` is the exception (a :class:`~ai_guard.errors.StreamError`
      keeping ``partial_content``); it is the last event.

    ``model`` and ``finish_reason`` are filled when the chunk carried them; ``id`` is the
    completion's id (``chatcmpl-...``) once a chunk carried it.
    """

    type: Literal["content", "usage", "error"]
    content: str = ""
    usage: Usage | None = None
    error: BaseException | None = None
    model: str | None = None
    finish_reason: str | None = None
    id: str | None = None
