"""@idempotent() on Flask views: the Idempotency-Key header, through Flask's test client."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
from flask import Flask, Response, abort, g, jsonify, request
from flask.testing import FlaskClient

from ai_guard.errors import IdempotencyError
from ai_guard.idempotency import (
    default_store,
    done_record,
    generate_idempotency_key,
    idempotent,
    parse_record,
)
from ai_guard.stores import MemoryStore, RedisStore, Store
from ai_guard.testing import FakeClock
from tests.conftest import free_port

PROBLEM = "application/problem+json"


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def bump(self) -> int:
        with self.lock:
            self.n += 1
            return self.n


def make_app(store: Store | None, **options: Any) -> tuple[Flask, Counter]:
    """An app whose POST /orders creates an order (its side effect is the counter)."""
    app = Flask(__name__)
    app.testing = True
    orders = Counter()

    @app.before_request
    def authenticate() -> None:
        user = request.headers.get("X-User")
        if user is not None:
            g.user = SimpleNamespace(id=user)

    @app.post("/orders")
    @idempotent(store, **options)
    def create_order() -> Response:
        payload = request.get_json(silent=True) or {}
        response = jsonify(order=orders.bump(), item=payload.get("item"))
        response.status_code = 201
        response.headers["X-Order-Source"] = "test"
        response.headers["Location"] = f"/orders/{orders.n}"
        response.set_cookie("session", "secret")
        return response

    return app, orders


def post(client: FlaskClient, key: str | None, json: Any = None, **kwargs: Any) -> Any:
    headers = dict(kwargs.pop("headers", {}))
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(
        "/orders", json={"item": "book"} if json is None else json, headers=headers, **kwargs
    )


def assert_problem(response: Any, status: int, says: str) -> dict[str, Any]:
    assert response.status_code == status
    assert response.mimetype == PROBLEM
    body = response.get_json(force=True)
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["status"] == status
    assert body["type"].startswith("urn:ai-guard:problem:")
    assert says in body["detail"] or says in body["title"]
    return dict(body)


# -- the protocol ------------------------------------------------------------------------


def test_first_request_runs_and_repeat_is_replayed(store: Store) -> None:
    app, orders = make_app(store)
    client = app.test_client()
    first = post(client, "key-1")
    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first.headers

    again = post(client, "key-1")
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json() == first.get_json() == {"order": 1, "item": "book"}
    assert again.data == first.data
    assert again.headers["X-Order-Source"] == "test"
    assert again.headers["Location"] == "/orders/1"
    assert again.headers["Content-Type"] == first.headers["Content-Type"]
    assert again.headers["Content-Length"] == str(len(first.data))
    assert orders.n == 1


def test_replay_drops_set_cookie() -> None:
    app, _ = make_app(MemoryStore())
    client = app.test_client()
    assert "session=secret" in post(client, "k").headers["Set-Cookie"]
    assert "Set-Cookie" not in post(client, "k").headers


def test_quoted_and_bare_forms_are_the_same_key() -> None:
    app, orders = make_app(MemoryStore())
    client = app.test_client()
    post(client, '"abc-123"')
    assert post(client, "abc-123").headers["Idempotent-Replayed"] == "true"
    assert orders.n == 1


def test_different_keys_run_separately() -> None:
    app, orders = make_app(MemoryStore())
    client = app.test_client()
    assert post(client, "a").get_json()["order"] == 1
    assert post(client, "b").get_json()["order"] == 2
    assert orders.n == 2


def test_missing_key_runs_normally_every_time() -> None:
    app, orders = make_app(MemoryStore())
    client = app.test_client()
    assert post(client, None).status_code == 201
    assert post(client, None).status_code == 201
    assert orders.n == 2


def test_missing_key_when_required_is_400() -> None:
    app, orders = make_app(MemoryStore(), required=True)
    body = assert_problem(post(app.test_client(), None), 400, "requires an Idempotency-Key")
    assert body["type"] == "urn:ai-guard:problem:idempotency-key-missing"
    assert orders.n == 0


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({"Idempotency-Key": ""}, "empty"),
        ({"Idempotency-Key": '""'}, "empty"),
        ({"Idempotency-Key": "k" * 256}, "256 characters long"),
        ({"Idempotency-Key": "clé"}, "non-ASCII"),
        ({"Idempotency-Key": "ключ"}, "non-ASCII"),
        ({"Idempotency-Key": "a\x01b"}, "control character"),
        ({"Idempotency-Key": "a b"}, "a space"),
        ({"Idempotency-Key": "a, b"}, "not a list"),
        ([("Idempotency-Key", "a"), ("Idempotency-Key", "b")], "not a list"),
        ({"Idempotency-Key": '"unterminated'}, "no closing quote"),
    ],
    ids=[
        "empty",
        "empty-quoted",
        "too-long",
        "latin-1",
        "cyrillic",
        "control",
        "space",
        "list",
        "two-headers",
        "unterminated",
    ],
)
def test_malformed_key_is_400_problem_json_and_the_view_does_not_run(
    headers: Any, says: str
) -> None:
    app, orders = make_app(MemoryStore())
    response = app.test_client().post("/orders", json={"item": "book"}, headers=headers)
    body = assert_problem(response, 400, says)
    assert body["type"] == "urn:ai-guard:problem:idempotency-key-invalid"
    assert orders.n == 0


def test_key_of_255_characters_is_accepted() -> None:
    app, orders = make_app(MemoryStore())
    assert post(app.test_client(), "k" * 255).status_code == 201
    assert orders.n == 1


def test_same_key_different_body_gets_422(store: Store) -> None:
    app, orders = make_app(store)
    client = app.test_client()
    post(client, "k", json={"item": "book"})
    body = assert_problem(post(client, "k", json={"item": "lamp"}), 422, "different request")
    assert body["type"] == "urn:ai-guard:problem:idempotency-key-reused"
    assert orders.n == 1


def test_fingerprint_is_the_body_bytes_not_its_meaning() -> None:
    app, _ = make_app(MemoryStore())
    client = app.test_client()
    headers = {"Idempotency-Key": "k", "Content-Type": "application/json"}
    client.post("/orders", data='{"item":"book","n":1}', headers=headers)
    reordered = client.post("/orders", data='{"n":1,"item":"book"}', headers=headers)
    assert reordered.status_code == 422


def test_same_key_on_another_path_method_or_query_gets_422() -> None:
    store = MemoryStore()
    app = Flask(__name__)
    runs = Counter()

    @app.route("/a", methods=["POST", "PUT"])
    @idempotent(store)
    def view_a() -> str:
        return f"a{runs.bump()}"

    @app.post("/b")
    @idempotent(store)
    def view_b() -> str:
        return f"b{runs.bump()}"

    client = app.test_client()
    headers = {"Idempotency-Key": "shared"}
    assert client.post("/a", data=b"x", headers=headers).data == b"a1"
    assert client.post("/b", data=b"x", headers=headers).status_code == 422
    assert client.put("/a", data=b"x", headers=headers).status_code == 422
    assert client.post("/a?page=2", data=b"x", headers=headers).status_code == 422
    assert client.post("/a", data=b"x", headers=headers).data == b"a1"
    assert runs.n == 1


def test_repeat_while_first_is_in_flight_gets_409_with_retry_after(store: Store) -> None:
    entered = threading.Event()
    release = threading.Event()
    app = Flask(__name__)
    runs = Counter()

    @app.post("/slow")
    @idempotent(store, retry_after=3)
    def slow() -> tuple[dict[str, int], int]:
        n = runs.bump()
        entered.set()
        release.wait(timeout=20)
        return {"run": n}, 201

    headers = {"Idempotency-Key": "k"}
    first: list[Any] = []
    worker = threading.Thread(
        target=lambda: first.append(app.test_client().post("/slow", data=b"x", headers=headers))
    )
    worker.start()
    try:
        assert entered.wait(timeout=20)
        conflict = app.test_client().post("/slow", data=b"x", headers=headers)
        body = assert_problem(conflict, 409, "still being processed")
        assert body["type"] == "urn:ai-guard:problem:idempotency-request-in-progress"
        assert conflict.headers["Retry-After"] == "3"
        mismatch = app.test_client().post("/slow", data=b"other", headers=headers)
        assert mismatch.status_code == 422
    finally:
        release.set()
        worker.join(timeout=20)
    assert first[0].status_code == 201
    replay = app.test_client().post("/slow", data=b"x", headers=headers)
    assert replay.get_json() == {"run": 1}
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert runs.n == 1


# -- what is not stored ------------------------------------------------------------------


def make_flaky_app(store: Store, first: Callable[[], Any]) -> tuple[Flask, Counter]:
    """POST /x answers ``first()`` the first time, then 200 "ok <n>"."""
    app = Flask(__name__)
    app.testing = True
    runs = Counter()

    @app.post("/x")
    @idempotent(store)
    def view() -> Any:
        if runs.bump() == 1:
            return first()
        return f"ok {runs.n}"

    return app, runs


def test_5xx_response_is_not_stored_and_the_retry_runs(store: Store) -> None:
    app, runs = make_flaky_app(store, lambda: ("upstream failed", 502))
    client = app.test_client()
    headers = {"Idempotency-Key": "k"}
    assert client.post("/x", headers=headers).status_code == 502
    retry = client.post("/x", headers=headers)
    assert (retry.status_code, retry.data) == (200, b"ok 2")
    replay = client.post("/x", headers=headers)
    assert (replay.data, replay.headers["Idempotent-Replayed"]) == (b"ok 2", "true")
    assert runs.n == 2


def test_exception_is_not_stored_and_the_claim_is_released(store: Store) -> None:
    def fail() -> Any:
        raise RuntimeError("boom")

    app, runs = make_flaky_app(store, fail)
    client = app.test_client()
    headers = {"Idempotency-Key": "k"}
    with pytest.raises(RuntimeError, match="boom"):
        client.post("/x", headers=headers)
    assert client.post("/x", headers=headers).data == b"ok 2"
    assert runs.n == 2


def test_aborted_request_is_not_stored() -> None:
    app, runs = make_flaky_app(MemoryStore(), lambda: abort(404))
    client = app.test_client()
    headers = {"Idempotency-Key": "k"}
    assert client.post("/x", headers=headers).status_code == 404
    assert client.post("/x", headers=headers).data == b"ok 2"
    assert runs.n == 2


def test_returned_4xx_is_stored_and_replayed() -> None:
    app, runs = make_flaky_app(MemoryStore(), lambda: ({"error": "bad item"}, 400))
    client = app.test_client()
    headers = {"Idempotency-Key": "k"}
    assert client.post("/x", headers=headers).status_code == 400
    replay = client.post("/x", headers=headers)
    assert replay.status_code == 400
    assert replay.get_json() == {"error": "bad item"}
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert runs.n == 1


def test_streamed_response_is_not_stored(store: Store) -> None:
    def stream() -> Response:
        return Response((chunk for chunk in [b"part 1, ", b"part 2"]), mimetype="text/plain")

    app, runs = make_flaky_app(store, stream)
    client = app.test_client()
    headers = {"Idempotency-Key": "k"}
    assert client.post("/x", headers=headers).data == b"part 1, part 2"
    assert client.post("/x", headers=headers).data == b"ok 2"
    assert runs.n == 2


def test_body_over_max_body_bytes_is_not_stored() -> None:
    store = MemoryStore()
    app = Flask(__name__)
    runs = Counter()

    @app.post("/big/<int:size>")
    @idempotent(store, max_body_bytes=1000)
    def big(size: int) -> str:
        runs.bump()
        return "x" * size

    client = app.test_client()
    headers = {"Idempotency-Key": "k"}
    assert len(client.post("/big/1001", headers=headers).data) == 1001
    assert len(client.post("/big/1001", headers=headers).data) == 1001
    assert runs.n == 2
    assert len(store) == 0
    headers = {"Idempotency-Key": "k2"}
    client.post("/big/1000", headers=headers)
    assert client.post("/big/1000", headers=headers).headers["Idempotent-Replayed"] == "true"
    assert runs.n == 3


def test_stored_response_expires_after_ttl() -> None:
    clock = FakeClock()
    app, orders = make_app(MemoryStore(clock=clock), ttl=60)
    client = app.test_client()
    post(client, "k")
    clock.advance(59)
    assert post(client, "k").headers["Idempotent-Replayed"] == "true"
    clock.advance(2)
    assert "Idempotent-Replayed" not in post(client, "k").headers
    assert orders.n == 2


def _stored_record(store: MemoryStore) -> tuple[str, bytes]:
    (key,) = [k for k in store._data if k.startswith("idem:v:")]
    record = store.get(key)
    assert record is not None
    return key, record


def test_stored_response_is_a_length_framed_http_v2_record() -> None:
    store = MemoryStore()
    app = Flask(__name__)

    @app.post("/x")
    @idempotent(store)
    def view() -> Response:
        response = Response(b"line 1\nline 2\n\x00\xff", status=202, mimetype="text/plain")
        response.headers["X-Empty"] = ""
        response.headers["X-Unicode"] = "caf\u00e9"
        return response

    client = app.test_client()
    headers = {"Idempotency-Key": "k"}
    first = client.post("/x", headers=headers)
    _, record = _stored_record(store)
    parsed = parse_record(record)
    assert parsed.done
    assert parsed.codec == "http.v2"
    head_length, _, rest = parsed.payload.partition(b"\n")
    head = rest[: int(head_length)].decode("utf-8")
    assert head.split("\n")[0] == "202 ACCEPTED"
    assert rest[int(head_length) :] == b"line 1\nline 2\n\x00\xff"

    replay = client.post("/x", headers=headers)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert (replay.status_code, replay.data) == (202, first.data)
    assert replay.headers["X-Empty"] == ""
    assert replay.headers["X-Unicode"] == first.headers["X-Unicode"]


def test_response_records_of_earlier_releases_are_still_replayed() -> None:
    store = MemoryStore()
    app, orders = make_app(store)
    client = app.test_client()
    first = post(client, "k")
    key, record = _stored_record(store)
    # Rewrite the record as releases before http.v2 wrote it: a JSON head line, the body.
    parsed = parse_record(record)
    head_length, _, rest = parsed.payload.partition(b"\n")
    status, *fields = rest[: int(head_length)].decode("utf-8").split("\n")
    meta = {
        "status": status,
        "headers": [list(p) for p in zip(fields[::2], fields[1::2], strict=True)],
    }
    legacy = json.dumps(meta).encode() + b"\n" + rest[int(head_length) :]
    store.set(key, done_record(parsed.fingerprint, "http", legacy))

    replay = post(client, "k")
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert (replay.status_code, replay.data) == (201, first.data)
    assert replay.headers["Location"] == "/orders/1"
    assert orders.n == 1


def test_header_with_a_line_break_is_stored_in_the_json_form() -> None:
    store = MemoryStore()
    app = Flask(__name__)
    app.testing = True

    @app.post("/x")
    @idempotent(store)
    def view() -> Response:
        response = Response("ok")
        response.headers["X-Odd\nName"] = "v"  # Werkzeug refuses this in values, not names
        return response

    client = app.test_client()
    client.post("/x", headers={"Idempotency-Key": "k"})
    _, record = _stored_record(store)
    assert parse_record(record).codec == "http"
    replay = client.post("/x", headers={"Idempotency-Key": "k"})
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["X-Odd\nName"] == "v"


@pytest.mark.parametrize("payload", [b"", b"x\n200 OK", b"99\n200 OK", b"-1\n", b"8\n200 OK\nX"])
def test_unreadable_stored_response_is_an_idempotency_error(payload: bytes) -> None:
    store = MemoryStore()
    app, orders = make_app(store)
    client = app.test_client()
    post(client, "k")
    key, record = _stored_record(store)
    store.set(key, done_record(parse_record(record).fingerprint, "http.v2", payload))
    with pytest.raises(IdempotencyError, match="cannot be read"):
        post(client, "k")
    assert orders.n == 1


# -- scope: one client never receives another's response ---------------------------------


def test_principal_a_response_is_never_replayed_to_b(store: Store) -> None:
    app, orders = make_app(store)
    client = app.test_client()
    alice = post(client, "same-key", headers={"X-User": "alice"})
    bob = post(client, "same-key", headers={"X-User": "bob"})
    assert "Idempotent-Replayed" not in bob.headers
    assert alice.get_json()["order"] == 1
    assert bob.get_json()["order"] == 2
    assert orders.n == 2
    # each gets their own replay
    assert post(client, "same-key", headers={"X-User": "alice"}).get_json()["order"] == 1
    assert post(client, "same-key", headers={"X-User": "bob"}).get_json()["order"] == 2
    assert orders.n == 2


def test_authorization_header_scopes_keys_when_no_principal_is_set() -> None:
    app, orders = make_app(MemoryStore())
    client = app.test_client()
    one = post(client, "k", headers={"Authorization": "Bearer token-one"})
    two = post(client, "k", headers={"Authorization": "Bearer token-two"})
    assert (one.get_json()["order"], two.get_json()["order"]) == (1, 2)
    again = post(client, "k", headers={"Authorization": "Bearer token-one"})
    assert again.get_json()["order"] == 1
    anonymous = post(client, "k")
    assert anonymous.get_json()["order"] == 3
    assert orders.n == 3


def test_g_principal_and_flask_login_style_users_are_principals() -> None:
    store = MemoryStore()
    app = Flask(__name__)
    runs = Counter()

    class LoginUser:
        def __init__(self, user_id: str) -> None:
            self._id = user_id

        def get_id(self) -> str:
            return self._id

    @app.before_request
    def authenticate() -> None:
        if "X-Principal" in request.headers:
            g.principal = request.headers["X-Principal"]
        if "X-Login" in request.headers:
            g.user = LoginUser(request.headers["X-Login"])

    @app.post("/x")
    @idempotent(store)
    def view() -> str:
        return str(runs.bump())

    client = app.test_client()

    def send(**headers: str) -> bytes:
        return cast(bytes, client.post("/x", headers={"Idempotency-Key": "k", **headers}).data)

    assert send(**{"X-Principal": "p1"}) == b"1"
    assert send(**{"X-Principal": "p2"}) == b"2"
    assert send(**{"X-Login": "u1"}) == b"3"
    assert send(**{"X-Login": "u2"}) == b"4"
    assert send(**{"X-Principal": "p1"}) == b"1"
    assert send(**{"X-Login": "u1"}) == b"3"


def test_custom_scope_callable_receives_the_view_arguments() -> None:
    store = MemoryStore()
    app = Flask(__name__)
    runs = Counter()

    @app.post("/tenants/<tenant>/orders")
    @idempotent(store, scope=lambda tenant: tenant)
    def view(tenant: str) -> str:
        return f"{tenant}:{runs.bump()}"

    client = app.test_client()
    headers = {"Idempotency-Key": "k"}
    assert client.post("/tenants/t1/orders", headers=headers).data == b"t1:1"
    # The same key in another tenant is another tenant's key (not a 422 for the path).
    assert client.post("/tenants/t2/orders", headers=headers).data == b"t2:2"
    assert client.post("/tenants/t1/orders", headers=headers).data == b"t1:1"


# -- the store ---------------------------------------------------------------------------


def test_store_none_uses_the_ai_guard_extension_store() -> None:
    extension_store = MemoryStore()
    app, orders = make_app(None)
    app.extensions["ai_guard"] = SimpleNamespace(store=extension_store)
    client = app.test_client()
    key = generate_idempotency_key("ext")
    post(client, key)
    assert post(client, key).headers["Idempotent-Replayed"] == "true"
    assert len(extension_store) == 1
    assert not any(key in k for k in getattr(default_store(), "_data", {}))
    assert orders.n == 1


def test_store_none_without_the_extension_uses_the_default_store() -> None:
    app, orders = make_app(None)
    client = app.test_client()
    key = generate_idempotency_key("default")
    post(client, key)
    assert post(client, key).headers["Idempotent-Replayed"] == "true"
    assert any(key in k for k in getattr(default_store(), "_data", {}))
    assert orders.n == 1


@pytest.fixture
def dead_redis() -> Iterator[RedisStore]:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2)
    yield store
    store.close()


def test_store_unavailable_is_503_and_the_view_does_not_run(dead_redis: RedisStore) -> None:
    app, orders = make_app(dead_redis)
    response = post(app.test_client(), "k")
    body = assert_problem(response, 503, "retry later")
    assert body["type"] == "urn:ai-guard:problem:idempotency-store-unavailable"
    assert response.headers["Retry-After"] == "1"
    assert orders.n == 0


def test_store_unavailable_with_fail_open_runs_the_view(dead_redis: RedisStore) -> None:
    app, orders = make_app(dead_redis, fail_open=True)
    assert post(app.test_client(), "k").status_code == 201
    assert orders.n == 1


# -- the view still works as a view ------------------------------------------------------


def test_view_can_still_read_a_form_body() -> None:
    app = Flask(__name__)

    @app.post("/form")
    @idempotent(MemoryStore())
    def form() -> str:
        return request.form["name"]

    client = app.test_client()
    headers = {"Idempotency-Key": "k"}
    assert client.post("/form", data={"name": "ada"}, headers=headers).data == b"ada"
    assert client.post("/form", data={"name": "ada"}, headers=headers).data == b"ada"


def test_after_request_headers_are_added_to_replays_too() -> None:
    app, _ = make_app(MemoryStore())

    @app.after_request
    def cors(response: Response) -> Response:
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    client = app.test_client()
    post(client, "k")
    replay = post(client, "k")
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers.getlist("Access-Control-Allow-Origin") == ["*"]


def test_view_wrapper_called_outside_a_request_is_a_clear_error() -> None:
    @idempotent(MemoryStore())
    def view() -> str:
        return "never"

    with pytest.raises(RuntimeError, match="outside a request; pass key="):
        view()


def test_view_keeps_its_name_for_flask_routing() -> None:
    @idempotent(MemoryStore())
    def create_thing() -> str:
        return "ok"

    assert create_thing.__name__ == "create_thing"


def test_many_threads_same_key_run_the_view_once(store: Store) -> None:
    app, orders = make_app(store)
    barrier = threading.Barrier(16)
    statuses: list[tuple[int, str | None]] = []
    lock = threading.Lock()

    def call() -> None:
        client = app.test_client()
        barrier.wait()
        response = post(client, "race")
        with lock:
            statuses.append((response.status_code, response.headers.get("Idempotent-Replayed")))

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert orders.n == 1
    assert len(statuses) == 16
    assert statuses.count((201, None)) == 1
    assert all(s in {(201, None), (201, "true"), (409, None)} for s in statuses)


def test_function_with_store_none_uses_the_apps_store_inside_the_app() -> None:
    extension_store = MemoryStore()
    app = Flask(__name__)
    app.extensions["ai_guard"] = SimpleNamespace(store=extension_store)
    runs = Counter()

    @idempotent(key=lambda k: k, namespace="in-app")
    def work(k: str) -> int:
        return runs.bump()

    with app.app_context():
        assert work("k") == work("k") == 1
    assert len(extension_store) == 1
