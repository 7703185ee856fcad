"""A Flask app with one idempotent view, for the gunicorn exactly-once test.

Configured by environment variables (gunicorn workers import it after forking):
``AI_GUARD_TEST_REDIS_URL`` (the Redis server) and ``AI_GUARD_TEST_PREFIX`` (a key prefix
of this test run). ``POST /orders`` increments the Redis counter ``<prefix>side_effects``
(its side effect, observable from the test) and answers 201; every response says which
worker process served it (``X-Served-By``).
"""

from __future__ import annotations

import os
import threading

import redis
from flask import Flask, Response, jsonify, request

from ai_guard.idempotency import idempotent
from ai_guard.stores import RedisStore

REDIS_URL = os.environ["AI_GUARD_TEST_REDIS_URL"]
PREFIX = os.environ["AI_GUARD_TEST_PREFIX"]
#: Seconds the view works: long enough for the other requests to arrive meanwhile.
WORK_SECONDS = float(os.environ.get("AI_GUARD_TEST_WORK_SECONDS", "0.3"))

store = RedisStore(REDIS_URL, key_prefix=PREFIX)
counter = redis.Redis.from_url(REDIS_URL)
app = Flask(__name__)


@app.after_request
def served_by(response: Response) -> Response:
    # Added after the guard, so replays and 409s also say which worker answered.
    response.headers["X-Served-By"] = str(os.getpid())
    return response


@app.get("/health")
def health() -> Response:
    return jsonify(ok=True, pid=os.getpid())


@app.post("/orders")
@idempotent(store)
def create_order() -> tuple[Response, int]:
    payload = request.get_json(force=True)
    order_number = counter.incr(PREFIX + "side_effects")
    # The work of the view; the other requests with the key arrive while it runs.
    threading.Event().wait(WORK_SECONDS)
    return jsonify(order=order_number, item=payload.get("item"), pid=os.getpid()), 201
