"""Rate-limit headers and the sleep arithmetic: pure functions, table-driven, fuzzed."""

from __future__ import annotations

import email.utils
import http.client
import io
import math
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict
from werkzeug.datastructures import Headers

from ai_guard.backoff import (
    EqualJitter,
    FullJitter,
    NoJitter,
    exponential_delay,
    resolve_jitter,
)
from ai_guard.errors import ConfigError
from ai_guard.ratelimit import (
    MAX_COUNT,
    MAX_DURATION,
    RateLimitInfo,
    compute_rate_limit_sleep,
    estimate_call_tokens,
    estimate_message_tokens,
    parse_duration,
    parse_rate_limit_headers,
)
from ai_guard.testing import FakeClock

# -- durations ---------------------------------------------------------------------------

DURATIONS = [
    ("1s", 1.0),
    ("6m0s", 360.0),
    ("20ms", 0.02),
    ("12ms", 0.012),
    ("1h2m3.5s", 3723.5),
    ("0.5s", 0.5),
    ("2", 2.0),
    ("1.5", 1.5),
    ("0", 0.0),
    ("0s", 0.0),
    (".5s", 0.5),
    ("1m", 60.0),
    ("1h", 3600.0),
    ("250us", 0.00025),
    ("250µs", 0.00025),
    ("1500ns", 1.5e-6),
    ("2m30.25s", 150.25),
    (" 7s ", 7.0),
    ("24h", 86400.0),
]

BAD_DURATIONS = [
    "",
    "   ",
    "garbage",
    "s",
    "1x",
    "-1s",
    "-5",
    "1s-",
    "1 s",
    "nan",
    "NaN",
    "inf",
    "Infinity",
    "1e3",
    "1_000",
    "١٢",  # Arabic-Indic digits: int() would take them
    "1..5s",
    "24h0m0.001s",  # beyond the one-day cap
    "86401",
    "9" * 400 + "s",
    "1h" * 40,
]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_parse_duration_reads_go_durations_and_plain_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", BAD_DURATIONS)
def test_parse_duration_gives_none_for_garbage(text: str) -> None:
    assert parse_duration(text) is None


@pytest.mark.parametrize("value", [None, 5, 1.5, b"1s", ["1s"]])
def test_parse_duration_of_a_non_string_is_none(value: object) -> None:
    assert parse_duration(value) is None


@given(
    hours=st.integers(0, 23),
    minutes=st.integers(0, 59),
    millis=st.integers(0, 59_999),
)
def test_parse_duration_roundtrips_generated_go_durations(
    hours: int, minutes: int, millis: int
) -> None:
    text = f"{hours}h{minutes}m{millis / 1000:g}s"
    assert parse_duration(text) == pytest.approx(hours * 3600 + minutes * 60 + millis / 1000)


# -- every header ------------------------------------------------------------------------

HEADER_TABLE: list[tuple[dict[str, str], str, Any]] = [
    ({"x-ratelimit-limit-requests": "500"}, "limit_requests", 500),
    ({"x-ratelimit-limit-tokens": "150000"}, "limit_tokens", 150_000),
    ({"x-ratelimit-remaining-requests": "499"}, "remaining_requests", 499),
    ({"x-ratelimit-remaining-tokens": "149984"}, "remaining_tokens", 149_984),
    ({"x-ratelimit-remaining-requests": "0"}, "remaining_requests", 0),
    ({"x-ratelimit-reset-requests": "120ms"}, "reset_requests", 0.12),
    ({"x-ratelimit-reset-tokens": "6m0s"}, "reset_tokens", 360.0),
    ({"x-ratelimit-reset-tokens": "1h2m3.5s"}, "reset_tokens", 3723.5),
    ({"retry-after-ms": "1500"}, "retry_after", 1.5),
    ({"retry-after-ms": "12.5"}, "retry_after", 0.0125),
    ({"x-ms-retry-after-ms": "250"}, "retry_after", 0.25),
    ({"retry-after": "3"}, "retry_after", 3.0),
    ({"retry-after": "0.75"}, "retry_after", 0.75),
    ({"retry-after": "0"}, "retry_after", 0.0),
    # garbage in any header: that field is unknown
    ({"x-ratelimit-limit-requests": "lots"}, "limit_requests", None),
    ({"x-ratelimit-remaining-requests": "-1"}, "remaining_requests", None),
    ({"x-ratelimit-remaining-tokens": "12.5"}, "remaining_tokens", None),
    ({"x-ratelimit-remaining-tokens": "nan"}, "remaining_tokens", None),
    ({"x-ratelimit-remaining-tokens": str(MAX_COUNT + 1)}, "remaining_tokens", None),
    ({"x-ratelimit-remaining-tokens": "9" * 5000}, "remaining_tokens", None),
    ({"x-ratelimit-reset-requests": "soon"}, "reset_requests", None),
    ({"x-ratelimit-reset-requests": "-3s"}, "reset_requests", None),
    ({"x-ratelimit-reset-tokens": "99999h"}, "reset_tokens", None),
    ({"retry-after-ms": "inf"}, "retry_after", None),
    ({"retry-after-ms": "-5"}, "retry_after", None),
    ({"retry-after-ms": "1e400"}, "retry_after", None),
    ({"retry-after-ms": str(int(MAX_DURATION * 1000) + 1)}, "retry_after", None),
    ({"retry-after": "NaN"}, "retry_after", None),
    ({"retry-after": "-1"}, "retry_after", None),
    ({"retry-after": "100000"}, "retry_after", None),
    ({"retry-after": "tomorrow"}, "retry_after", None),
    ({"retry-after": ""}, "retry_after", None),
    ({}, "retry_after", None),
]


@pytest.mark.parametrize(("headers", "field", "expected"), HEADER_TABLE)
def test_every_header_is_read_or_unknown(
    headers: dict[str, str], field: str, expected: Any
) -> None:
    info = parse_rate_limit_headers(headers)
    value = getattr(info, field)
    if expected is None:
        assert value is None
    else:
        assert value == pytest.approx(expected)
        assert type(value) is type(expected)


def test_a_full_openai_header_set() -> None:
    info = parse_rate_limit_headers(
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-remaining-tokens": "149984",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-reset-tokens": "6m0s",
            "content-type": "application/json",
        }
    )
    assert info == RateLimitInfo(60, 150_000, 59, 149_984, 1.0, 360.0, None)


def test_headers_are_case_insensitive() -> None:
    info = parse_rate_limit_headers(
        {
            "X-RateLimit-Remaining-Requests": "0",
            "X-RATELIMIT-RESET-REQUESTS": "2s",
            "Retry-After": "4",
        }
    )
    assert info.remaining_requests == 0
    assert info.reset_requests == 2.0
    assert info.retry_after == 4.0


def _http_message(raw: bytes) -> http.client.HTTPMessage:
    return http.client.parse_headers(io.BytesIO(raw))


MAPPING_KINDS: dict[str, Callable[[dict[str, str]], object]] = {
    "dict": lambda h: dict(h),
    "requests": lambda h: CaseInsensitiveDict(h),
    "werkzeug": lambda h: Headers(list(h.items())),
    "http.client": lambda h: _http_message(
        "".join(f"{k}: {v}\r\n" for k, v in h.items()).encode() + b"\r\n"
    ),
}


@pytest.mark.parametrize("kind", sorted(MAPPING_KINDS))
def test_any_header_mapping_is_read(kind: str) -> None:
    raw = {
        "X-Ratelimit-Remaining-Tokens": "42",
        "x-ratelimit-reset-tokens": "1m",
        "retry-after-ms": "5",
    }
    info = parse_rate_limit_headers(MAPPING_KINDS[kind](raw))
    assert (info.remaining_tokens, info.reset_tokens, info.retry_after) == (42, 60.0, 0.005)


@pytest.mark.parametrize(
    "headers", [None, {}, 42, "retry-after: 3", object(), [("retry-after", "3")]]
)
def test_non_mappings_read_as_no_information(headers: object) -> None:
    assert parse_rate_limit_headers(headers) == RateLimitInfo()


def test_a_mapping_that_breaks_while_iterated_reads_as_no_information() -> None:
    class Broken(dict[str, str]):
        def items(self) -> Any:
            raise RuntimeError("boom")

    assert parse_rate_limit_headers(Broken(a="1")) == RateLimitInfo()


def test_bytes_header_names_and_values_are_read() -> None:
    info = parse_rate_limit_headers({b"Retry-After": b"2"})
    assert info.retry_after == 2.0


def test_first_of_repeated_headers_wins() -> None:
    message = _http_message(b"Retry-After: 2\r\nRetry-After: 9\r\n\r\n")
    assert parse_rate_limit_headers(message).retry_after == 2.0


# -- retry-after priorities and dates ----------------------------------------------------


def test_retry_after_ms_beats_azure_ms_beats_retry_after() -> None:
    everything = {"retry-after-ms": "100", "x-ms-retry-after-ms": "200", "retry-after": "3"}
    assert parse_rate_limit_headers(everything).retry_after == 0.1
    del everything["retry-after-ms"]
    assert parse_rate_limit_headers(everything).retry_after == 0.2
    del everything["x-ms-retry-after-ms"]
    assert parse_rate_limit_headers(everything).retry_after == 3.0


def test_a_garbage_retry_after_ms_falls_back_to_the_next_header() -> None:
    headers = {"retry-after-ms": "soon", "x-ms-retry-after-ms": "-1", "retry-after": "2"}
    assert parse_rate_limit_headers(headers).retry_after == 2.0


def test_retry_after_http_date_is_relative_to_the_clock_wall_time() -> None:
    clock = FakeClock()
    when = email.utils.formatdate(clock.time() + 30, usegmt=True)
    assert parse_rate_limit_headers({"retry-after": when}, clock=clock).retry_after == 30.0
    clock.advance(10)
    assert parse_rate_limit_headers({"retry-after": when}, clock=clock).retry_after == 20.0


def test_retry_after_http_date_in_the_past_means_zero() -> None:
    clock = FakeClock()
    info = parse_rate_limit_headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, clock=clock)
    assert info.retry_after == 0.0


@pytest.mark.parametrize(
    "value",
    [
        "Wed, 21 Oct 99999 07:28:00 GMT",  # year out of range
        "Fri, 31 Dec 2100 23:59:59 GMT",  # far beyond the cap
        "Wed, 32 Foo 2015 07:28:00 GMT",
        "Wed, 21 Oct 2015",
    ],
)
def test_absurd_or_broken_http_dates_are_unknown(value: str) -> None:
    assert parse_rate_limit_headers({"retry-after": value}, clock=FakeClock()).retry_after is None


def test_a_parsed_info_passes_through() -> None:
    info = RateLimitInfo(retry_after=2.0)
    assert parse_rate_limit_headers(info) is info


def test_exhausted_reset_is_the_reset_of_the_exhausted_dimension() -> None:
    assert RateLimitInfo(remaining_requests=0, reset_requests=2.0).exhausted_reset == 2.0
    assert RateLimitInfo(remaining_tokens=0, reset_tokens=7.0).exhausted_reset == 7.0
    both = RateLimitInfo(
        remaining_requests=0, reset_requests=2.0, remaining_tokens=0, reset_tokens=7.0
    )
    assert both.exhausted_reset == 7.0
    assert RateLimitInfo(remaining_requests=3, reset_requests=2.0).exhausted_reset is None
    assert RateLimitInfo(remaining_requests=0).exhausted_reset is None


# -- fuzz: never an exception, never a nonsense value ------------------------------------

_KNOWN = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "retry-after-ms",
    "x-ms-retry-after-ms",
    "retry-after",
]


@st.composite
def header_names(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(_KNOWN))
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if flip else c for c, flip in zip(name, flips, strict=True))


header_values = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"-?[0-9]{0,20}(\.[0-9]{0,6})?(h|m|s|ms|us|ns)?", fullmatch=True),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers().map(str),
    st.sampled_from(["Wed, 21 Oct 2015 07:28:00 GMT", "Sat, 01 Jan 2050 00:00:00 GMT", "1h2m3.5s"]),
)


@given(st.dictionaries(st.one_of(header_names(), st.text(max_size=20)), header_values, max_size=12))
def test_fuzzed_headers_never_raise_and_give_sane_fields(headers: dict[str, str]) -> None:
    info = parse_rate_limit_headers(headers, clock=FakeClock())
    for name in ("limit_requests", "limit_tokens", "remaining_requests", "remaining_tokens"):
        value = getattr(info, name)
        assert value is None or (type(value) is int and 0 <= value <= MAX_COUNT)
    for name in ("reset_requests", "reset_tokens", "retry_after"):
        value = getattr(info, name)
        assert value is None or (type(value) is float and math.isfinite(value))
        assert value is None or 0.0 <= value <= MAX_DURATION
    # and the sleep derived from it is a finite, non-negative number too
    sleep = compute_rate_limit_sleep(info, attempt=3, jitter=FullJitter(rng=random.Random(0)))
    assert math.isfinite(sleep)
    assert sleep >= 0.0


# -- compute_rate_limit_sleep: the order of authority ------------------------------------


def test_server_retry_after_comes_first() -> None:
    headers = {
        "retry-after-ms": "1500",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "20s",
    }
    assert compute_rate_limit_sleep(headers, attempt=4, jitter=False) == 1.5


def test_reset_of_the_exhausted_dimension_comes_second() -> None:
    requests_out = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}
    assert compute_rate_limit_sleep(requests_out, attempt=4, jitter=False) == 2.0
    tokens_out = {
        "x-ratelimit-remaining-requests": "10",
        "x-ratelimit-reset-requests": "2s",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert compute_rate_limit_sleep(tokens_out, jitter=False) == 360.0


def test_a_reset_of_a_dimension_that_is_not_exhausted_is_ignored() -> None:
    headers = {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "30s"}
    assert compute_rate_limit_sleep(headers, attempt=0, jitter=False) == 0.5


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (50, 60.0), (10**6, 60.0)],
)
def test_exponential_backoff_from_base_delay_capped_by_max_delay(
    attempt: int, expected: float
) -> None:
    assert (
        compute_rate_limit_sleep({}, attempt, base_delay=0.5, max_delay=60.0, jitter=False)
        == expected
    )


def test_exponential_delay_never_overflows() -> None:
    assert exponential_delay(10**9, 1.0, 5.0) == 5.0
    assert exponential_delay(-3, 1.0, 5.0) == 1.0


def test_a_server_wait_longer_than_max_delay_is_returned_as_asked() -> None:
    assert compute_rate_limit_sleep({"retry-after": "120"}, max_delay=60.0, jitter=True) == 120.0


# -- jitter ------------------------------------------------------------------------------


@pytest.mark.parametrize("jitter", [FullJitter, EqualJitter])
def test_jitter_never_shortens_a_server_given_wait(jitter: type[FullJitter]) -> None:
    strategy = jitter(rng=random.Random(3))
    for asked in (0.0, 0.01, 0.5, 1.0, 2.0, 9.5, 30.0):
        headers = {"retry-after-ms": str(asked * 1000)}
        for _ in range(200):
            wait = compute_rate_limit_sleep(headers, jitter=strategy, max_delay=60.0)
            assert asked <= wait <= asked + max(0.05, min(asked * 0.1, 1.0)) + 1e-9


def test_jitter_on_a_server_wait_stays_under_max_delay() -> None:
    strategy = FullJitter(rng=random.Random(5))
    waits = [
        compute_rate_limit_sleep({"retry-after": "59.99"}, jitter=strategy, max_delay=60.0)
        for _ in range(200)
    ]
    assert all(59.99 <= w <= 60.0 for w in waits)


def test_full_jitter_spreads_exponential_waits_over_the_whole_window() -> None:
    strategy = FullJitter(rng=random.Random(11))
    waits = [compute_rate_limit_sleep({}, attempt=3, jitter=strategy) for _ in range(1000)]
    assert all(0.0 <= w <= 4.0 for w in waits)
    assert min(waits) < 0.2
    assert max(waits) > 3.8


def test_equal_jitter_keeps_at_least_half_the_delay() -> None:
    strategy = EqualJitter(rng=random.Random(11))
    waits = [compute_rate_limit_sleep({}, attempt=3, jitter=strategy) for _ in range(1000)]
    assert all(2.0 <= w <= 4.0 for w in waits)
    assert min(waits) < 2.2
    assert max(waits) > 3.8


def test_one_hundred_clients_do_not_retry_in_lockstep() -> None:
    # 100 clients, each with its own random source, back off from the same 429.
    waits = [
        compute_rate_limit_sleep({}, attempt=4, jitter=FullJitter(rng=random.Random(seed)))
        for seed in range(100)
    ]
    window = 0.5 * 2**4
    assert len({round(w, 6) for w in waits}) == 100
    assert max(waits) - min(waits) >= 0.8 * window
    # and they are spread over the window, not bunched: every eighth of it is used
    assert {int(w / window * 8) for w in waits} == set(range(8))


def test_one_hundred_clients_told_the_same_retry_after_spread_above_it() -> None:
    waits = [
        compute_rate_limit_sleep({"retry-after": "2"}, jitter=FullJitter(rng=random.Random(seed)))
        for seed in range(100)
    ]
    assert min(waits) >= 2.0
    assert len({round(w, 6) for w in waits}) == 100
    assert max(waits) - min(waits) >= 0.8 * 0.2  # spread over the 10 % added on top


def test_default_jitter_uses_the_module_random_and_varies() -> None:
    waits = {compute_rate_limit_sleep({}, attempt=5) for _ in range(50)}
    assert len(waits) > 40


def test_no_jitter_is_exact() -> None:
    assert compute_rate_limit_sleep({"retry-after": "2"}, jitter=NoJitter()) == 2.0
    assert compute_rate_limit_sleep({}, attempt=2, jitter=NoJitter()) == 2.0


@pytest.mark.parametrize("bad", ["yes", 1, None, 0.5, object()])
def test_bad_jitter_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError) as raised:
        resolve_jitter(bad)  # type: ignore[arg-type]
    assert raised.value.setting == "jitter"


# -- token estimates ---------------------------------------------------------------------


def test_estimate_counts_characters_over_four_plus_max_tokens() -> None:
    messages = [
        {"role": "system", "content": "x" * 40},
        {"role": "user", "content": [{"type": "text", "text": "y" * 21}, {"type": "image_url"}]},
    ]
    assert estimate_message_tokens(messages) == 16  # ceil(61 / 4)
    assert estimate_message_tokens(messages, max_tokens=100) == 116
    assert estimate_call_tokens(messages=messages, max_tokens=100) == 116
    assert estimate_call_tokens(messages=messages, max_completion_tokens=50) == 66


def test_estimate_finds_messages_passed_positionally() -> None:
    messages = [{"role": "user", "content": "z" * 8}]
    assert estimate_call_tokens("client", messages, max_tokens=2) == 4


@pytest.mark.parametrize(
    "call",
    [
        ((), {}),
        (("plain prompt",), {}),
        ((), {"messages": "not a list"}),
        ((), {"messages": [1, 2, 3]}),
        ((), {"messages": [{"role": "user", "content": 5}], "max_tokens": True}),
        ((), {"messages": [], "max_tokens": -5}),
    ],
)
def test_estimate_of_odd_input_is_a_small_non_negative_number(call: tuple[Any, Any]) -> None:
    args, kwargs = call
    assert estimate_call_tokens(*args, **kwargs) == 0
