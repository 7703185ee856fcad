"""The dashboard in a real browser: headless Chromium loads it from a live server, takes a
screenshot, and dumps the DOM it built (charts, SLO table, the refresh script running
under the page's CSP)."""

from __future__ import annotations

import re
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from flask import Flask, Response, jsonify, request

from ai_guard.errors import UpstreamError
from ai_guard.flask import AIGuard
from ai_guard.metrics import MetricsCollector
from ai_guard.testing import FakeClock
from ai_guard.tracing import traced_ai
from ai_guard.types import ChatResult, Usage
from tests._servers import chromium_binary, run_chromium, serve_in_thread

pytestmark = [pytest.mark.browser, pytest.mark.slow]

WIDTH, HEIGHT = 1280, 1600
MINI_TEAL = (0x0D, 0x94, 0x88)  # the mini tier's colour in the charts
HEADER = (0x0B, 0x12, 0x20)  # the page header's background
PAGE = (0xF4, 0xF6, 0xFA)  # the page's background


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, chunks, header = 8, [], b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        position += 12 + length
    width, height, depth, color_type = struct.unpack(">IIBB", header[:10])
    assert depth == 8
    assert color_type in (2, 6)
    channels = 3 if color_type == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    offset = 0
    for _ in range(height):
        method, line = raw[offset], bytearray(raw[offset + 1 : offset + 1 + stride])
        offset += 1 + stride
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if method == 1:
                line[i] = (line[i] + left) & 0xFF
            elif method == 2:
                line[i] = (line[i] + up) & 0xFF
            elif method == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif method == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + pred) & 0xFF
        previous = line
        rgb = bytes(line) if channels == 3 else bytes(b for i, b in enumerate(line) if i % 4 != 3)
        rows.append(rgb)
    return width, height, rows


def pixel(rows: list[bytes], x: int, y: int) -> tuple[int, int, int]:
    row = rows[y]
    return row[3 * x], row[3 * x + 1], row[3 * x + 2]


def near(color: tuple[int, int, int], expected: tuple[int, int, int], tolerance: int = 6) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(color, expected, strict=True))


@pytest.fixture
def served_dashboard() -> Iterator[str]:
    """A live app with an hour of traffic already recorded (on a fake clock) and a live
    view that adds more over HTTP."""
    clock = FakeClock()
    collector = MetricsCollector(clock=clock)
    app = Flask("browser-dashboard")
    AIGuard(app, collector=collector, tracing=False, dashboard_refresh=10)

    @traced_ai(operation="chat", clock=clock)
    def ask(latency_ms: float, fail: bool, *, model: str) -> ChatResult:
        clock.advance(latency_ms / 1000)
        if fail:
            raise UpstreamError("upstream down", status=503)
        return ChatResult(content="ok", model=model, usage=Usage(1600, 90, 1690, 1408))

    @app.post("/ask")
    def ask_view() -> Response:
        body = request.get_json()
        try:
            ask(body["latency"], body.get("fail", False), model=body["model"])
        except UpstreamError:
            return jsonify(ok=False)
        return jsonify(ok=True)

    @app.post("/tick")
    def tick() -> Response:
        clock.advance(float(request.args["seconds"]))
        return jsonify(ok=True)

    with serve_in_thread(app) as url, requests.Session() as session:
        for minute in range(12):
            for i in range(12):
                model = "gpt-4o" if i % 8 == 0 else "gpt-4o-mini"
                latency = (700.0 if model == "gpt-4o" else 220.0) + 15 * (i % 5) + 20 * minute
                body = {"model": model, "latency": latency, "fail": minute == 7 and i < 2}
                assert session.post(f"{url}/ask", json=body, timeout=10).ok
            session.post(f"{url}/tick", params={"seconds": 20}, timeout=10)
        yield url


def test_the_dashboard_renders_its_charts_in_headless_chromium(
    served_dashboard: str, tmp_path: Path
) -> None:
    binary = chromium_binary()
    url = f"{served_dashboard}/ai-guard/?window=300"
    screenshot = tmp_path / "dash.png"
    shot = run_chromium(
        binary,
        tmp_path / "profile-shot",
        [f"--screenshot={screenshot}", f"--window-size={WIDTH},{HEIGHT}", url],
    )
    assert shot.returncode == 0, shot.stderr.decode(errors="replace")[-2000:]
    dump = run_chromium(
        binary, tmp_path / "profile-dom", ["--virtual-time-budget=2000", "--dump-dom", url]
    )
    assert dump.returncode == 0, dump.stderr.decode(errors="replace")[-2000:]
    dom = dump.stdout.decode()

    # The screenshot: a PNG of the window's size, styled (the CSP let the nonce'd CSS in),
    # with the mini tier's colour painted by the charts.
    data = screenshot.read_bytes()
    assert len(data) > 50_000
    width, height, rows = decode_png(data)
    assert (width, height) == (WIDTH, HEIGHT)
    assert near(pixel(rows, 5, 5), HEADER), pixel(rows, 5, 5)
    assert near(pixel(rows, 5, HEIGHT // 2), PAGE), pixel(rows, 5, HEIGHT // 2)
    colours = Counter(pixel(rows, x, y) for y in range(0, HEIGHT, 2) for x in range(0, WIDTH, 2))
    teal = sum(n for colour, n in colours.items() if near(colour, MINI_TEAL, 10))
    assert teal > 500, "the charts painted almost nothing in the mini tier's colour"

    # The DOM Chromium built: every chart with data-bearing elements.
    for chart in ("latency-mini", "latency-full", "traffic", "cost"):
        assert re.search(rf'<svg[^>]*data-chart="{chart}"', dom), chart
    paths = re.findall(r'<path [^>]*data-series="latency-mini-p95"', dom)
    assert paths
    bars = re.findall(r'<rect [^>]*data-series="traffic-mini"[^>]*data-value="([\d.]+)"', dom)
    assert len(bars) >= 10
    report = requests.get(f"{served_dashboard}/ai-guard/metrics?window=300", timeout=10).json()
    assert sum(float(v) for v in bars) == report["mini_requests"] > 0
    assert re.search(r'<circle [^>]*data-series="traffic-errors"', dom)
    assert re.search(r'<circle [^>]*data-series="cost-cumulative"', dom)
    assert re.search(r'<line [^>]*data-series="latency-mini-target"', dom)
    # The SLO table, with the outage's availability miss.
    rows_found = dict(re.findall(r'<tr data-slo="([a-z0-9_]+)" data-met="(True|False|None)"', dom))
    assert set(rows_found) == {
        "latency_p95_mini",
        "latency_p95_full",
        "availability",
        "cache_hit_rate",
        "mini_usage",
        "monthly_cost",
    }
    assert rows_found["availability"] == "False"
    assert rows_found["latency_p95_mini"] == "True"
    # The refresh script ran (it is allowed by the CSP nonce) and armed its timer.
    assert 'data-refresh="10000"' in dom
