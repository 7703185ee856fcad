"""The span the anchors open by hand around one chat call (what instrumented code
writes): one name and one set of starting attributes, shared by every benchmark that
compares with it. A constant, so the anchors do not build them on each call."""

from __future__ import annotations

from opentelemetry.util.types import AttributeValue

MODEL = "gpt-4o-mini"
CHAT_SPAN_NAME = f"chat {MODEL}"
CHAT_SPAN_ATTRIBUTES: dict[str, AttributeValue] = {
    "gen_ai.operation.name": "chat",
    "gen_ai.provider.name": "openai",
    "gen_ai.request.model": MODEL,
}
