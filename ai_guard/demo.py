"""The offline demo: a scripted scenario and a report (grown by later issues)."""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from ai_guard.context import CallContext, bind_sinks, close_call, open_call
from ai_guard.stores import MemoryStore
from ai_guard.types import ChatResult, Usage


def run_demo(*, quick: bool = False, out: TextIO = sys.stdout) -> int:
    """Run the scenario and print the report; returns the process exit code."""
    store = MemoryStore()
    calls: list[CallContext] = []
    lock = threading.Lock()

    def record(ctx: CallContext) -> None:
        with lock:
            calls.append(ctx)

    def ask(i: int) -> ChatResult:
        ctx, token = open_call()
        ctx.operation = "chat"
        ctx.request_model = "gpt-4o-mini" if i % 10 else "gpt-4o"
        result = ChatResult(
            content="ok", model=ctx.request_model, usage=Usage(1200, 80, 1280, 1024)
        )
        return close_call(ctx, token, result=result)

    n = 20 if quick else 200
    with bind_sinks(record):
        for i in range(n):
            if store.add(f"job:{i % (n // 2)}", b"done"):
                ask(i)
    cost = sum(c.cost_usd or 0.0 for c in calls)
    out.write("ai_guard demo report\n")
    out.write(f"  calls made        {len(calls)} (of {n} requests; the rest were duplicates)\n")
    out.write(f"  total cost (USD)  {cost:.6f}\n")
    return 0
