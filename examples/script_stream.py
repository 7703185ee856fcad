"""Stream a reply token by token through the guarded client, then read its usage.

    python examples/script_stream.py

With OPENAI_API_KEY set, it calls the real API (or OPENAI_BASE_URL, if set). Without it,
it starts the embedded fake upstream on 127.0.0.1, and also shows what a stream that
breaks mid-way looks like: the last event is an error that keeps the text received.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack

from ai_guard import AIClient
from ai_guard.testing import FakeUpstream

MESSAGES = [{"role": "user", "content": "Tell me a very short story about a lost bicycle."}]


def stream_once(client: AIClient) -> None:
    for event in client.stream_chat(MESSAGES, max_tokens=200):
        if event.type == "content":
            print(event.content, end="", flush=True)  # as the tokens arrive
        elif event.type == "usage":
            usage = event.usage
            if usage is not None:
                print(
                    f"\nusage: {usage.prompt_tokens} prompt + {usage.completion_tokens} "
                    f"completion = {usage.total_tokens} tokens ({event.model})"
                )
        else:  # "error": the stream broke after it started; always the last event
            error = event.error
            print(f"\nstream cut: {error}")
            print(f"kept: {getattr(error, 'partial_content', '')!r}")


def main() -> int:
    with ExitStack() as stack:
        upstream = None
        base_url = None  # OPENAI_BASE_URL, else https://api.openai.com/v1
        if not os.environ.get("OPENAI_API_KEY"):
            upstream = stack.enter_context(FakeUpstream(stream_chunk_delay=0.01))
            base_url = upstream.url
        client = stack.enter_context(AIClient(base_url, model="gpt-4o-mini"))

        print("A complete stream:")
        stream_once(client)

        if upstream is not None:
            # Offline only: the fake upstream drops the connection after 6 chunks.
            upstream.configure(stream_drop_after=6)
            print("\nA stream whose connection drops mid-way:")
            stream_once(client)
    return 0


if __name__ == "__main__":
    sys.exit(main())
