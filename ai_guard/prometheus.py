"""Prometheus exposition of ai_guard's figures (needs the ``prometheus`` extra).

**One process** (a script, ``flask run``, gunicorn with one worker): register
:class:`AIGuardCollector` — a ``prometheus_client`` custom collector reading a
:class:`~ai_guard.metrics.MetricsCollector` at scrape time — or call
:func:`render_prometheus`, which does it on a private registry::

    body, content_type = render_prometheus(collector)

**Several worker processes** (gunicorn ``-w 4``): each worker has its own collector, so a
scrape answered by one worker would show a quarter of the traffic. ``prometheus_client``'s
multiprocess mode solves this with one memory-mapped file per process and metric:

1. set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory *before* the workers start
   (``prometheus_client`` reads it when it is first imported), and wipe it between runs;
2. register the process's :class:`PrometheusSink` as a sink in every worker (it records
   each AI call into ``prometheus_client`` counters and a histogram, which write to those
   files); one sink per process, or each call would be counted twice::

       from ai_guard.context import register_default_sink
       register_default_sink(default_prometheus_sink())

3. call :func:`render_prometheus` in the metrics view: with ``PROMETHEUS_MULTIPROC_DIR``
   set it reads every worker's files through ``prometheus_client.multiprocess
   .MultiProcessCollector``, so the counters are the sums over all workers;
4. in the gunicorn config, tell ``prometheus_client`` when a worker exits::

       from prometheus_client import multiprocess

       def child_exit(server, worker):
           multiprocess.mark_process_dead(worker.pid)

In multiprocess mode the SLO gauges are left out (an SLO computed from one worker's
share of the traffic would mislead: compute it in PromQL from the counters and the
histogram); ``ai_guard_circuit_state`` describes the worker that answered the scrape
(identical in every worker when breakers share their state through Redis).

**Metrics** (the same names in both modes):

- ``ai_guard_requests_total{model,tier,outcome}`` — ``outcome`` is ``success`` or
  ``error``;
- ``ai_guard_tokens_total{model,tier,type}`` — ``type`` is ``input``, ``output`` or
  ``cached`` (cached tokens are part of the input tokens);
- ``ai_guard_cost_usd_total{model,tier}``, ``ai_guard_retries_total{model,tier}``,
  ``ai_guard_fallbacks_total{model,tier}``;
- ``ai_guard_request_latency_seconds{model,tier}`` — a histogram with the fixed
  boundaries :data:`LATENCY_BUCKETS_SECONDS`. The collector's own buckets (64 per power
  of two) are summed into them: a cumulative count at ``le`` counts the buckets whose
  upper edge is ``<= le``, so it may miss the one bucket that straddles ``le`` (values
  within 1/64 of ``le`` below it) and is never too high;
- ``ai_guard_circuit_state{breaker}`` — 0 closed, 1 half-open, 2 open;
- ``ai_guard_slo_met{slo}`` (1 or 0, absent without data),
  ``ai_guard_slo_burn_rate{slo,window}``, ``ai_guard_slo_alert{slo}`` (0 none, 1 ticket,
  2 page) — one process only.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from itertools import accumulate
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ai_guard import _histogram
from ai_guard.context import CallContext
from ai_guard.errors import AIGuardError
from ai_guard.metrics import (
    OTHER_MODEL,
    UNKNOWN_MODEL,
    UNKNOWN_TIER,
    MetricsCollector,
    _label,
    _normalized,
    call_figures,
    call_tier,
    default_collector,
)
from ai_guard.pricing import ModelSpec, find_model

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = [
    "CIRCUIT_STATE_VALUES",
    "LATENCY_BUCKETS_SECONDS",
    "AIGuardCollector",
    "PrometheusSink",
    "default_prometheus_sink",
    "multiprocess_mode",
    "render_prometheus",
]

_log = logging.getLogger("ai_guard.prometheus")

#: Upper bounds (seconds) of the latency histogram's buckets (``+Inf`` is added). They
#: include the default SLO targets (1.2 s and 2.5 s) so that PromQL can compute the
#: share of slow calls exactly at those boundaries.
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    1.2,
    1.5,
    2.0,
    2.5,
    3.0,
    4.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
#: ``ai_guard_circuit_state`` values.
CIRCUIT_STATE_VALUES: dict[str, int] = {"closed": 0, "half_open": 1, "open": 2}
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_ALERT_VALUES: dict[str, int] = {"none": 0, "ticket": 1, "page": 2}
# For each boundary, how many of the collector's buckets lie at or below it.
_BUCKET_CUTS: tuple[int, ...] = tuple(
    _histogram.buckets_below(le * 1000.0) for le in LATENCY_BUCKETS_SECONDS
)


def _prometheus() -> ModuleType:
    """``prometheus_client``, imported on first use with an error that says what to do."""
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - the test environment has it
        raise ImportError(
            "ai_guard.prometheus needs prometheus_client: pip install 'ai_guard[prometheus]'"
        ) from exc
    return prometheus_client


def multiprocess_mode() -> bool:
    """Whether ``prometheus_client`` runs in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``
    is set)."""
    # The same test prometheus_client makes when it is imported (the lower-case name is
    # its deprecated spelling).
    return _MULTIPROC_ENV in os.environ or _MULTIPROC_ENV.lower() in os.environ


def cumulative_latency_buckets(counts: list[int]) -> list[tuple[float, int]]:
    """The collector's bucket counts as Prometheus cumulative ``(le_seconds, count)`` pairs
    at :data:`LATENCY_BUCKETS_SECONDS`, ending with ``(inf, total)``."""
    running = list(accumulate(counts))
    pairs = [
        (le, running[cut - 1] if cut else 0)
        for le, cut in zip(LATENCY_BUCKETS_SECONDS, _BUCKET_CUTS, strict=True)
    ]
    pairs.append((float("inf"), running[-1] if running else 0))
    return pairs


def _breaker_states() -> list[tuple[str, int]]:
    """(name, gauge value) of every registered circuit breaker; none when the breaker
    module is not available."""
    try:
        breaker_module = importlib.import_module("ai_guard.breaker")
    except ImportError:
        return []
    all_breakers = getattr(breaker_module, "all_breakers", None)
    if all_breakers is None:
        return []
    found = all_breakers()
    breakers: Iterable[Any] = found.values() if isinstance(found, Mapping) else found
    states: list[tuple[str, int]] = []
    for breaker in breakers:
        try:
            state = breaker.state
        except AIGuardError:  # e.g. the shared store is down: leave this breaker out
            _log.warning("breaker %r: state unavailable for Prometheus", breaker.name)
            continue
        value = CIRCUIT_STATE_VALUES.get(str(getattr(state, "value", state)))
        if value is not None:
            states.append((str(breaker.name), value))
    return states


class AIGuardCollector:
    """A ``prometheus_client`` custom collector (it satisfies the
    ``prometheus_client.registry.Collector`` protocol) exposing a
    :class:`~ai_guard.metrics.MetricsCollector` (default: the process-wide one).

    ``counters=False`` leaves out the request, token, cost and latency figures (the
    multiprocess path exposes those from :class:`PrometheusSink`); ``slos=False`` the SLO
    gauges; ``breakers=False`` the circuit-state gauge::

        from prometheus_client import REGISTRY
        REGISTRY.register(AIGuardCollector(collector))
    """

    def __init__(
        self,
        collector: MetricsCollector | None = None,
        *,
        counters: bool = True,
        slos: bool = True,
        breakers: bool = True,
    ) -> None:
        self._collector = collector
        self._counters = counters
        self._slos = slos
        self._breakers = breakers

    @property
    def collector(self) -> MetricsCollector:
        return self._collector if self._collector is not None else default_collector()

    def describe(self) -> list[Metric]:
        """Nothing up front: the families depend on the traffic (``prometheus_client``
        then skips its duplicate-name check for this collector)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The metric families, read from the collector at scrape time."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        collector = self.collector
        if self._counters:
            requests = CounterMetricFamily(
                "ai_guard_requests", "AI calls", labels=["model", "tier", "outcome"]
            )
            tokens = CounterMetricFamily(
                "ai_guard_tokens", "Tokens of AI calls", labels=["model", "tier", "type"]
            )
            cost = CounterMetricFamily(
                "ai_guard_cost_usd", "Cost of AI calls in USD", labels=["model", "tier"]
            )
            retries = CounterMetricFamily(
                "ai_guard_retries", "Retries inside AI calls", labels=["model", "tier"]
            )
            fallbacks = CounterMetricFamily(
                "ai_guard_fallbacks",
                "AI calls the router sent to a fallback model",
                labels=["model", "tier"],
            )
            latency = HistogramMetricFamily(
                "ai_guard_request_latency_seconds",
                "Latency of AI calls in seconds",
                labels=["model", "tier"],
            )
            for totals in collector.series_totals():
                labels = [totals.model, totals.tier]
                requests.add_metric([*labels, "success"], totals.requests - totals.errors)
                requests.add_metric([*labels, "error"], totals.errors)
                tokens.add_metric([*labels, "input"], totals.input_tokens)
                tokens.add_metric([*labels, "output"], totals.output_tokens)
                tokens.add_metric([*labels, "cached"], totals.cached_tokens)
                cost.add_metric(labels, totals.cost_usd)
                retries.add_metric(labels, totals.retries)
                fallbacks.add_metric(labels, totals.fallbacks)
                latency.add_metric(
                    labels,
                    buckets=[
                        (_le_label(le), count)
                        for le, count in cumulative_latency_buckets(totals.latency_counts)
                    ],
                    sum_value=totals.latency_sum_ms / 1000.0,
                )
            yield from (requests, tokens, cost, retries, fallbacks, latency)
        if self._breakers:
            circuit = GaugeMetricFamily(
                "ai_guard_circuit_state",
                "Circuit breaker state: 0 closed, 1 half-open, 2 open",
                labels=["breaker"],
            )
            for name, value in _breaker_states():
                circuit.add_metric([name], value)
            yield circuit
        if self._slos:
            met = GaugeMetricFamily(
                "ai_guard_slo_met", "1 when the SLO is met, 0 when missed", labels=["slo"]
            )
            burn = GaugeMetricFamily(
                "ai_guard_slo_burn_rate",
                "Error-budget burn rate of the SLO over the window",
                labels=["slo", "window"],
            )
            alert = GaugeMetricFamily(
                "ai_guard_slo_alert",
                "Multiwindow burn-rate alert: 0 none, 1 ticket, 2 page",
                labels=["slo"],
            )
            for result in collector.check_slos():
                if result.met is not None:
                    met.add_metric([result.name], 1.0 if result.met else 0.0)
                if result.burn_rates is not None:
                    for window, rate in result.burn_rates.items():
                        if rate is not None:
                            burn.add_metric([result.name, window], rate)
                    alert.add_metric([result.name], _ALERT_VALUES[result.alert])
            yield from (met, burn, alert)


def _le_label(le: float) -> str:
    # What prometheus_client.utils.floatToGoString gives for these plain decimals.
    return "+Inf" if le == float("inf") else repr(float(le))


def render_prometheus(
    collector: MetricsCollector | None = None, *, multiprocess: bool | None = None
) -> tuple[bytes, str]:
    """The text exposition of ``collector`` (default: the process-wide one) and its
    content type, from a private ``CollectorRegistry``.

    With ``multiprocess`` (default: :func:`multiprocess_mode`), the counters and the
    histogram come from every worker's files (see the module's documentation) and only
    the circuit-state gauge from this process.
    """
    prometheus_client = _prometheus()
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    if multiprocess is None:
        multiprocess = multiprocess_mode()
    if multiprocess:
        from prometheus_client import multiprocess as prometheus_multiprocess

        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(AIGuardCollector(collector, counters=False, slos=False))
    else:
        registry.register(AIGuardCollector(collector))
    body: bytes = prometheus_client.generate_latest(registry)
    return body, str(prometheus_client.CONTENT_TYPE_LATEST)


class _Children:
    """The labelled children of one (model, tier): bound once, so recording a call does
    not pay ``.labels()`` (a lock and a dict lookup per metric)."""

    __slots__ = (
        "cached",
        "cost",
        "errors",
        "fallbacks",
        "input",
        "latency",
        "output",
        "retries",
        "spec",
        "successes",
    )

    def __init__(self, sink: PrometheusSink, model: str, tier: str, spec: ModelSpec | None):
        self.spec = spec
        self.successes = sink.requests.labels(model, tier, "success")
        self.errors = sink.requests.labels(model, tier, "error")
        self.input = sink.tokens.labels(model, tier, "input")
        self.output = sink.tokens.labels(model, tier, "output")
        self.cached = sink.tokens.labels(model, tier, "cached")
        self.cost = sink.cost.labels(model, tier)
        self.retries = sink.retries.labels(model, tier)
        self.fallbacks = sink.fallbacks.labels(model, tier)
        self.latency = sink.latency.labels(model, tier)


class PrometheusSink:
    """A sink that records every AI call into ``prometheus_client`` metrics: the path for
    ``prometheus_client``'s multiprocess mode (gunicorn with several workers), where
    counters live in files shared by the workers.

    Same names and labels as :class:`AIGuardCollector`. ``registry`` is where the metrics
    are registered (``None``: nowhere, which is right in multiprocess mode, where
    :func:`render_prometheus` reads the files). ``catalog`` gives tiers and prices, as
    for the collector; at most ``max_series`` (model, tier) pairs get their own labels,
    the rest are labelled ``other``::

        sink = PrometheusSink()
        register_default_sink(sink)      # or bind_sinks(collector.record_call, sink)
    """

    def __init__(
        self,
        *,
        registry: Any = None,
        catalog: Mapping[str, ModelSpec] | None = None,
        max_series: int = 32,
    ) -> None:
        prometheus_client = _prometheus()
        self.requests = prometheus_client.Counter(
            "ai_guard_requests", "AI calls", ["model", "tier", "outcome"], registry=registry
        )
        self.tokens = prometheus_client.Counter(
            "ai_guard_tokens", "Tokens of AI calls", ["model", "tier", "type"], registry=registry
        )
        self.cost = prometheus_client.Counter(
            "ai_guard_cost_usd", "Cost of AI calls in USD", ["model", "tier"], registry=registry
        )
        self.retries = prometheus_client.Counter(
            "ai_guard_retries", "Retries inside AI calls", ["model", "tier"], registry=registry
        )
        self.fallbacks = prometheus_client.Counter(
            "ai_guard_fallbacks",
            "AI calls the router sent to a fallback model",
            ["model", "tier"],
            registry=registry,
        )
        self.latency = prometheus_client.Histogram(
            "ai_guard_request_latency_seconds",
            "Latency of AI calls in seconds",
            ["model", "tier"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self._catalog = catalog
        self._max_series = max_series
        self._children: dict[tuple[str, str | None], _Children] = {}
        self._lock = threading.Lock()

    def __call__(self, ctx: CallContext) -> None:
        self.record_call(ctx)

    def record_call(self, ctx: CallContext) -> None:
        """Record the call a :class:`~ai_guard.context.CallContext` describes."""
        self.record_request(
            ctx.response_model or ctx.request_model or UNKNOWN_MODEL,
            tier=call_tier(ctx),
            **call_figures(ctx),
        )

    def record_request(
        self,
        model: str,
        *,
        tier: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cached_tokens: int = 0,
        cost_usd: float | None = None,
        latency_ms: float,
        error: bool = False,
        retries: int = 0,
        fallback: bool = False,
    ) -> None:
        """Record one call; the same arguments and checks as
        :meth:`ai_guard.metrics.MetricsCollector.record_request`."""
        figures = _normalized(
            input_tokens, output_tokens, cached_tokens, cost_usd, latency_ms, retries
        )
        children = self._children.get((model, tier))
        if children is None:
            children = self._children_for(model, tier)
        cost = figures["cost_usd"]
        if cost is None:
            spec = children.spec
            cost = (
                spec.cost_usd(
                    figures["input_tokens"], figures["output_tokens"], figures["cached_tokens"]
                )
                if spec is not None
                else 0.0
            )
        (children.errors if error else children.successes).inc()
        children.input.inc(figures["input_tokens"])
        children.output.inc(figures["output_tokens"])
        children.cached.inc(figures["cached_tokens"])
        children.cost.inc(cost)
        if figures["retries"]:
            children.retries.inc(figures["retries"])
        if fallback:
            children.fallbacks.inc()
        children.latency.observe(figures["latency_ms"] / 1000.0)

    def _children_for(self, model: Any, tier: Any) -> _Children:
        model = _label("model", model, 256)
        if tier is not None:
            tier = _label("tier", tier, 64)
        with self._lock:
            children = self._children.get((model, tier))
            if children is not None:
                return children
            spec = find_model(model, self._catalog)
            effective_tier = tier if tier is not None else (spec.tier if spec else UNKNOWN_TIER)
            if len(self._children) >= self._max_series:
                other = self._children.get((OTHER_MODEL, OTHER_MODEL))
                if other is None:
                    other = _Children(self, OTHER_MODEL, OTHER_MODEL, None)
                    self._children[OTHER_MODEL, OTHER_MODEL] = other
                return other
            children = _Children(self, model, effective_tier, spec)
            self._children[model, tier] = children
            return children


class _DefaultSink:
    """Registry of the process-wide :class:`PrometheusSink` (created on first use)."""

    __slots__ = ("lock", "sink")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sink: PrometheusSink | None = None


_DEFAULT_SINK = _DefaultSink()


def default_prometheus_sink() -> PrometheusSink:
    """The process-wide :class:`PrometheusSink`, unregistered (``registry=None``): what the
    multiprocess path records into. Always the same object, so that binding it in several
    places never counts a call twice."""
    with _DEFAULT_SINK.lock:
        if _DEFAULT_SINK.sink is None:
            _DEFAULT_SINK.sink = PrometheusSink()
        return _DEFAULT_SINK.sink
