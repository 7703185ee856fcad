"""Ask questions through the guarded client from a plain script: no Flask, no event loop.

    python examples/script_chat.py

With OPENAI_API_KEY set, it calls the real API (or OPENAI_BASE_URL, if set). Without it,
it starts the embedded fake upstream on 127.0.0.1 and runs offline.

Every call goes through the whole stack: a circuit breaker per model, retries of 429s
and 5xx with one Idempotency-Key per call, pacing from the rate-limit headers, a span,
a log line, and the metrics of the collector printed at the end.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack

from ai_guard import AIClient, MetricsCollector
from ai_guard.testing import FakeUpstream

# A long, shared system prompt (over 1024 tokens): the upstream caches it, so the second
# call pays the cached rate for most of its prompt.
SYSTEM_PROMPT = (
    "You are the assistant of a small bicycle shop. Answer in two short sentences, "
    "practical and friendly, and never recommend a product we do not sell. " * 40
)
QUESTIONS = (
    "Which tyre pressure suits a city bike?",
    "How often should I oil the chain?",
)


def main() -> int:
    with ExitStack() as stack:
        base_url = None  # OPENAI_BASE_URL, else https://api.openai.com/v1
        where = "the API at"
        if not os.environ.get("OPENAI_API_KEY"):
            base_url = stack.enter_context(FakeUpstream()).url
            where = "the fake upstream at"
        collector = MetricsCollector()
        client = stack.enter_context(
            AIClient(base_url, model="gpt-4o-mini", collector=collector, timeout=(5, 30))
        )
        print(f"Asking {where} {client.base_url}")

        for question in QUESTIONS:
            result = client.chat(
                [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": question},
                ],
                max_tokens=120,
            )
            usage = result.usage
            print(f"\nQ: {question}")
            print(f"A: {result.content}")
            print(
                f"   {result.model}: {usage.prompt_tokens} prompt tokens "
                f"({usage.cached_tokens} cached), {usage.completion_tokens} completion tokens"
            )

        report = collector.report()
        print(
            f"\n{report['total_requests']} calls, {report['total_tokens']} tokens, "
            f"cost ${report['total_cost_usd']:.6f}, "
            f"cache hit rate {report['cache_hit_rate']:.0%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
