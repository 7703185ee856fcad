"""Get a validated pydantic object back from the model, with strict structured outputs.

    python examples/structured_output.py

With OPENAI_API_KEY set, it calls the real API (or OPENAI_BASE_URL, if set). Without it,
it starts the embedded fake upstream on 127.0.0.1, which answers with JSON that conforms
to the schema (made-up values), and also shows how a refusal is reported.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from typing import Literal

from pydantic import BaseModel

from ai_guard import AIClient, StructuredOutputError, StructuredOutputRefusalError
from ai_guard.testing import FakeUpstream


class Bike(BaseModel):
    name: str
    kind: Literal["city", "road", "mountain", "cargo"]
    price_eur: int | None  # optional: strict mode sends it as required and nullable
    features: list[str]


MESSAGES = [
    {"role": "system", "content": "Extract the bicycle described by the customer."},
    {
        "role": "user",
        "content": "I'd like the blue Dutch-style city bike with a basket and hub gears, "
        "the one around 600 euros.",
    },
]


def main() -> int:
    with ExitStack() as stack:
        upstream = None
        base_url = None  # OPENAI_BASE_URL, else https://api.openai.com/v1
        if not os.environ.get("OPENAI_API_KEY"):
            upstream = stack.enter_context(FakeUpstream())
            base_url = upstream.url
        client = stack.enter_context(AIClient(base_url, model="gpt-4o-mini"))

        try:
            bike = client.parse(MESSAGES, Bike, max_tokens=300)
        except StructuredOutputError as exc:  # not JSON, not matching, cut, or refused
            print(f"no valid answer: {exc}")
            return 1
        print(f"{type(bike).__name__}: {bike.model_dump()}")
        print(f"kind is one of the allowed values: {bike.kind!r}")

        if upstream is not None:
            # Offline only: the fake upstream refuses, as a model may.
            upstream.configure(refusal="I can't help with that request.")
            try:
                client.parse(MESSAGES, Bike)
            except StructuredOutputRefusalError as exc:
                print(f"refused: {exc.refusal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
