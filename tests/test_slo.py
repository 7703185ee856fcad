"""SLOs: defaults, overrides, met / missed / no data, burn rates and multiwindow alerts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ai_guard.errors import ConfigError
from ai_guard.metrics import MetricsCollector
from ai_guard.pricing import cost_usd
from ai_guard.slo import (
    SRE_WORKBOOK_ALERTS,
    BurnRateAlert,
    SLOConfig,
    SLOResult,
    alert_level,
    burn_rate,
    burn_windows,
    projected_monthly_cost,
    slo_config,
    window_label,
)
from ai_guard.testing import FakeClock

HOUR = 3600.0


def _by_name(results: list[SLOResult]) -> dict[str, SLOResult]:
    return {result.name: result for result in results}


# -- configuration ---------------------------------------------------------------------------


def test_defaults_are_the_products_slos() -> None:
    config = SLOConfig()
    assert config.latency_p95_ms == {"mini": 1200.0, "full": 2500.0}
    assert config.availability == 0.999
    assert config.cache_hit_rate == 0.85
    assert config.mini_percentage == 85.0
    assert config.monthly_cost_usd == 500.0
    assert config.alerts == SRE_WORKBOOK_ALERTS


def test_the_workbook_alert_pairs() -> None:
    pairs = [(a.severity, a.long_window, a.short_window, a.burn_rate) for a in SRE_WORKBOOK_ALERTS]
    assert pairs == [
        ("page", HOUR, 300.0, 14.4),
        ("page", 6 * HOUR, 1800.0, 6.0),
        ("ticket", 72 * HOUR, 6 * HOUR, 1.0),
    ]
    assert burn_windows(SLOConfig()) == (300.0, 1800.0, HOUR, 6 * HOUR, 72 * HOUR)


def test_overrides_from_a_dict_and_keywords() -> None:
    config = slo_config(
        {"availability": 0.995, "latency_p95_ms": {"mini": 800}}, cache_hit_rate=0.5
    )
    assert config.availability == 0.995
    assert config.latency_p95_ms == {"mini": 800.0}
    assert config.cache_hit_rate == 0.5
    assert config.monthly_cost_usd == 500.0
    assert slo_config(config) is config
    assert slo_config(config, monthly_cost_usd=None).monthly_cost_usd is None


@pytest.mark.parametrize(
    ("values", "setting"),
    [
        ({"availability": 1.5}, "slos.availability"),
        ({"availability": "high"}, "slos.availability"),
        ({"cache_hit_rate": -0.1}, "slos.cache_hit_rate"),
        ({"mini_percentage": 101}, "slos.mini_percentage"),
        ({"monthly_cost_usd": 0}, "slos.monthly_cost_usd"),
        ({"latency_p95_ms": {"mini": -5}}, "slos.latency_p95_ms"),
        ({"latency_p95_ms": {"": 5}}, "slos.latency_p95_ms"),
        ({"uptime": 0.99}, "slos.uptime"),
        (
            {
                "alerts": [
                    {"severity": "page", "long_window": 60, "short_window": 300, "burn_rate": 2}
                ]
            },
            "slos.alerts.0",
        ),
        (
            {
                "alerts": [
                    {
                        "severity": "wake-everyone",
                        "long_window": 600,
                        "short_window": 60,
                        "burn_rate": 2,
                    }
                ]
            },
            "slos.alerts.0.severity",
        ),
    ],
)
def test_bad_slo_settings_name_the_setting(values: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        slo_config(values)
    assert excinfo.value.setting == setting


def test_slo_config_of_the_wrong_type_is_rejected() -> None:
    with pytest.raises(ConfigError, match="slos"):
        slo_config(["availability"])  # type: ignore[arg-type]


def test_errors_name_the_setting_the_caller_reads_from() -> None:
    with pytest.raises(ConfigError) as excinfo:
        slo_config({"availability": 7}, setting="AI_GUARD_SLOS")
    assert excinfo.value.setting == "AI_GUARD_SLOS.availability"


# -- pure arithmetic ---------------------------------------------------------------------------


def test_burn_rate_arithmetic() -> None:
    assert burn_rate(3, 1000, 0.001) == pytest.approx(3.0)
    assert burn_rate(0, 1000, 0.001) == 0.0
    assert burn_rate(10, 100, 0.05) == pytest.approx(2.0)
    assert burn_rate(1, 1, 0.001) == pytest.approx(1000.0)
    assert burn_rate(0, 0, 0.001) is None
    with pytest.raises(ValueError, match="budget"):
        burn_rate(1, 10, 0.0)


def test_alert_needs_both_windows_of_a_pair() -> None:
    alerts = SRE_WORKBOOK_ALERTS
    calm = {300.0: 0.5, 1800.0: 0.5, HOUR: 0.5, 6 * HOUR: 0.5, 72 * HOUR: 0.5}
    assert alert_level(calm, alerts) == "none"
    assert alert_level({**calm, HOUR: 20.0}, alerts) == "none"  # spike over, 5 min clean
    assert alert_level({**calm, 300.0: 20.0}, alerts) == "none"  # a blip, hour is fine
    assert alert_level({**calm, HOUR: 14.4, 300.0: 14.4}, alerts) == "page"
    assert alert_level({**calm, 6 * HOUR: 6.0, 1800.0: 6.5}, alerts) == "page"
    assert alert_level({**calm, 6 * HOUR: 5.9, 1800.0: 6.5}, alerts) == "none"
    assert alert_level({**calm, 72 * HOUR: 1.0, 6 * HOUR: 1.2}, alerts) == "ticket"
    both = {300.0: 15.0, 1800.0: 15.0, HOUR: 15.0, 6 * HOUR: 15.0, 72 * HOUR: 15.0}
    assert alert_level(both, alerts) == "page"
    assert alert_level({**both, 300.0: None}, alerts) == "page"  # the 6 h pair still fires
    assert alert_level(dict.fromkeys(both, None), alerts) == "none"


def test_window_labels() -> None:
    assert [window_label(w) for w in (300, 1800, 3600, 21600, 259200, 45, 90)] == [
        "5m",
        "30m",
        "1h",
        "6h",
        "3d",
        "45s",
        "90s",
    ]


def test_projected_monthly_cost() -> None:
    assert projected_monthly_cost(1.0, 3600.0) == pytest.approx(720.0)
    assert projected_monthly_cost(1.0, 59.0) is None
    assert projected_monthly_cost(1.0, 10.0, min_seconds=0) == pytest.approx(259_200.0)
    assert projected_monthly_cost(0.0, 0.0, min_seconds=0) is None


def test_burn_rate_alert_rejects_a_short_window_not_shorter() -> None:
    with pytest.raises(ValueError, match="shorter"):
        BurnRateAlert(severity="page", long_window=300, short_window=300, burn_rate=2)


# -- the collector's SLOs ----------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_no_data_means_neither_met_nor_missed(clock: FakeClock) -> None:
    collector = MetricsCollector(clock=clock)
    clock.advance(600)
    results = collector.check_slos()
    assert [r.name for r in results] == [
        "latency_p95_mini",
        "latency_p95_full",
        "availability",
        "cache_hit_rate",
        "mini_usage",
        "monthly_cost",
    ]
    for result in results:
        assert result.actual is None
        assert result.met is None
        assert result.alert == "none"
    assert results[2].burn_rates == dict.fromkeys(("5m", "30m", "1h", "6h", "3d"))
    assert results[3].burn_rates is None
    status = collector.slo_status()
    assert status["all_met"] is None
    assert status["alert"] == "none"
    json.dumps(status, allow_nan=False)


def test_healthy_traffic_meets_every_slo(clock: FakeClock) -> None:
    collector = MetricsCollector(clock=clock)
    for i in range(200):
        model = "gpt-4o" if i % 10 == 0 else "gpt-4o-mini"
        collector.record_request(
            model, input_tokens=1000, output_tokens=50, cached_tokens=900, latency_ms=400.0
        )
    clock.advance(3600)
    results = _by_name(collector.check_slos())
    assert all(result.met is True for result in results.values()), results
    assert results["availability"].actual == 1.0
    assert results["mini_usage"].actual == pytest.approx(90.0)
    assert results["cache_hit_rate"].actual == pytest.approx(0.9)
    assert results["latency_p95_mini"].actual == pytest.approx(400.0, rel=0.01)
    mini_cost = cost_usd("gpt-4o-mini", 1000, 50, 900)
    full_cost = cost_usd("gpt-4o", 1000, 50, 900)
    assert mini_cost is not None
    assert full_cost is not None
    spend = 180 * mini_cost + 20 * full_cost
    assert results["monthly_cost"].actual == pytest.approx(spend / 3600 * 30 * 86400)
    assert collector.slo_status()["all_met"] is True


def test_missed_slos_with_hand_computed_actuals_and_burn_rates(clock: FakeClock) -> None:
    collector = MetricsCollector(clock=clock)
    # 100 mini calls: 10 slow (2 s), 2 failed, half the prompt cached; 25 full calls.
    for i in range(100):
        collector.record_request(
            "gpt-4o-mini",
            input_tokens=1000,
            cached_tokens=500,
            latency_ms=2000.0 if i < 10 else 300.0,
            error=i in (50, 51),
        )
    for _ in range(25):
        collector.record_request("gpt-4o", input_tokens=1000, cached_tokens=500, latency_ms=900.0)
    clock.advance(30)
    results = _by_name(collector.check_slos())

    mini = results["latency_p95_mini"]
    assert mini.met is False
    assert mini.actual == pytest.approx(2000.0, rel=0.01)
    # 10 of 100 mini calls above 1200 ms, against a 5 % budget: burn rate 2.
    assert mini.burn_rates == pytest.approx(dict.fromkeys(("5m", "30m", "1h", "6h", "3d"), 2.0))
    assert mini.alert == "ticket"  # 3 d and 6 h both >= 1

    full = results["latency_p95_full"]
    assert full.met is True
    assert full.burn_rates == pytest.approx(dict.fromkeys(("5m", "30m", "1h", "6h", "3d"), 0.0))

    availability = results["availability"]
    assert availability.actual == pytest.approx(1 - 2 / 125)
    assert availability.met is False
    # 2 failed of 125 = 1.6 % against a 0.1 % budget: burn rate 16 everywhere -> page.
    assert availability.burn_rates == pytest.approx(
        dict.fromkeys(("5m", "30m", "1h", "6h", "3d"), 16.0)
    )
    assert availability.alert == "page"

    assert results["cache_hit_rate"].actual == pytest.approx(0.5)
    assert results["cache_hit_rate"].met is False
    assert results["mini_usage"].actual == pytest.approx(80.0)
    assert results["mini_usage"].met is False
    assert results["monthly_cost"].actual is None  # 30 s observed: too early to project
    assert results["monthly_cost"].met is None
    status = collector.slo_status()
    assert status["all_met"] is False
    assert status["alert"] == "page"


def test_fast_burn_pages_then_becomes_a_ticket_once_the_short_windows_are_clean(
    clock: FakeClock,
) -> None:
    collector = MetricsCollector(clock=clock)

    def minutes(count: int, errors_per_minute: int) -> None:
        for _ in range(count):
            for i in range(100):
                collector.record_request(
                    "gpt-4o-mini", latency_ms=100.0, error=i < errors_per_minute
                )
            clock.advance(60)

    def availability() -> SLOResult:
        return _by_name(collector.check_slos())["availability"]

    minutes(60, 2)  # an hour at 2 % errors: burn rate 20 against 99.9 %
    burning = availability()
    assert burning.burn_rates == pytest.approx(
        {"5m": 20.0, "30m": 20.0, "1h": 20.0, "6h": 20.0, "3d": 20.0}
    )
    assert burning.alert == "page"

    minutes(10, 0)  # the outage ends
    recovering = availability()
    rates = recovering.burn_rates
    assert rates is not None
    assert rates["5m"] == 0.0
    # 1 h window = minutes 11..69 (59 minutes of calls): 49 bad minutes x 2 errors.
    assert rates["1h"] == pytest.approx(98 / 5900 / 0.001)
    # 30 min window = minutes 41..69: 19 bad minutes.
    assert rates["30m"] == pytest.approx(38 / 2900 / 0.001)
    assert rates["6h"] == pytest.approx(120 / 7000 / 0.001)
    # The 1 h / 5 min pair is off; the 6 h / 30 min pair (>= 6) still pages.
    assert recovering.alert == "page"

    minutes(40, 0)  # now the last 30 minutes are clean too
    settled = availability()
    assert settled.burn_rates is not None
    assert settled.burn_rates["30m"] == 0.0
    assert settled.burn_rates["6h"] == pytest.approx(120 / 11_000 / 0.001)
    assert settled.alert == "ticket"  # 3 d and 6 h still burn faster than 1


def test_custom_slos_and_disabled_ones(clock: FakeClock) -> None:
    collector = MetricsCollector(
        clock=clock,
        slos={"latency_p95_ms": {"mini": 250}, "monthly_cost_usd": None, "cache_hit_rate": None},
    )
    for _ in range(20):
        collector.record_request("gpt-4o-mini", latency_ms=300.0)
    results = _by_name(collector.check_slos())
    assert set(results) == {"latency_p95_mini", "availability", "mini_usage"}
    assert results["latency_p95_mini"].met is False
    assert results["latency_p95_mini"].burn_rates == pytest.approx(
        dict.fromkeys(("5m", "30m", "1h", "6h", "3d"), 20.0)  # every call slow, 5 % budget
    )


def test_slos_over_a_window(clock: FakeClock) -> None:
    collector = MetricsCollector(clock=clock)
    for _ in range(10):
        collector.record_request("gpt-4o-mini", latency_ms=100.0, error=True)
    clock.advance(1000)
    for _ in range(10):
        collector.record_request("gpt-4o-mini", latency_ms=100.0)
    assert _by_name(collector.check_slos())["availability"].actual == pytest.approx(0.5)
    assert _by_name(collector.check_slos(window=300))["availability"].actual == 1.0
    assert collector.slo_status(window=300)["window_seconds"] == 300


def test_slo_result_as_dict_is_json_ready(clock: FakeClock) -> None:
    collector = MetricsCollector(clock=clock)
    collector.record_request("gpt-4o-mini", latency_ms=100.0)
    clock.advance(120)
    for result in collector.check_slos():
        data = result.as_dict()
        assert set(data) == {
            "name",
            "description",
            "objective",
            "target",
            "actual",
            "unit",
            "met",
            "burn_rates",
            "alert",
        }
        json.dumps(data, allow_nan=False)
