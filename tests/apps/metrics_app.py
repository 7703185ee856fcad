"""A tiny Flask app whose views make (fake) AI calls and expose Prometheus metrics, served
by gunicorn with several workers in ``tests/test_prometheus_multiprocess.py``.

``PROMETHEUS_MULTIPROC_DIR`` must be set before this module (and so ``prometheus_client``)
is imported: the counters then live in files that every worker writes and the scrape
reads.
"""

from __future__ import annotations

import os

from flask import Flask, Response, jsonify, request

from ai_guard.context import close_call, open_call, register_default_sink
from ai_guard.errors import UpstreamError
from ai_guard.prometheus import default_prometheus_sink, render_prometheus
from ai_guard.types import ChatResult, Usage

app = Flask(__name__)
register_default_sink(default_prometheus_sink())


@app.post("/call")
def call() -> Response:
    """One AI call through the per-call context, as a guard would make it."""
    ctx, token = open_call()
    ctx.operation = "chat"
    ctx.request_model = "gpt-4o-mini"
    if request.args.get("fail") == "1":
        close_call(ctx, token, error=UpstreamError("upstream down", status=503))
    else:
        result = ChatResult(content="ok", model="gpt-4o-mini", usage=Usage(100, 20, 120, 64))
        close_call(ctx, token, result=result)
    return jsonify(pid=os.getpid())


@app.get("/metrics")
def metrics() -> Response:
    body, content_type = render_prometheus()
    return Response(body, content_type=content_type)
