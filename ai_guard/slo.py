"""Service level objectives for AI calls: target, actual, met, and how fast the budget burns.

The defaults are the product's (SPEC §8):

=====================  ===============================  ===================================
SLO                    target                           error budget
=====================  ===============================  ===================================
``latency_p95_mini``   p95 latency of mini calls        5 % of mini calls may be slower
                       ``<= 1200 ms``
``latency_p95_full``   p95 latency of full calls        5 % of full calls may be slower
                       ``<= 2500 ms``
``availability``       ``>= 99.9 %`` of calls succeed   0.1 % of calls may fail
``cache_hit_rate``     cached / prompt tokens           (no budget: a ratio)
                       ``>= 85 %``
``mini_usage``         ``>= 85 %`` of calls on mini     (no budget: a ratio)
``monthly_cost``       projected ``<= 500 USD``         (no budget: a projection)
=====================  ===============================  ===================================

**Burn rate.** For an SLO with an error budget (latency and availability), the burn rate
over a window is the fraction of bad calls in that window divided by the fraction the
budget allows: 1.0 spends the budget exactly over the SLO period, 14.4 spends a 30-day
budget in about two days. A slow call is one above the tier's latency target (the
histogram places the threshold within 0.78 %).

**Alerts**, as in the Google SRE workbook ("Alerting on SLOs", multiwindow,
multi-burn-rate alerts): an alert fires when the burn rate is at or above its threshold
over *both* a long and a short window (the short one makes the alert stop soon after the
problem does). The workbook's table is the default:

=========  ===========  ============  =========  ===================================
severity   long window  short window  burn rate  budget spent when it fires
=========  ===========  ============  =========  ===================================
page       1 h          5 min         14.4       2 % of 30 days' budget in 1 h
page       6 h          30 min        6          5 % in 6 h
ticket     3 days       6 h           1          10 % in 3 days
=========  ===========  ============  =========  ===================================

Each result's ``alert`` is the most severe that fires: ``"page"``, ``"ticket"`` or
``"none"``.

**Projected monthly cost** = spend per second over the observed window x 30 days (the
observed window is the report's window, or the time since the collector started when
shorter). It is not projected before ``cost_projection_min_seconds`` (60 s) of
observation, because one early call would extrapolate to an absurd month.

**No data.** An SLO whose figure has no data in the window (no calls, no calls of that
tier, no prompt tokens, too short an observation to project cost) has ``actual=None``
and ``met=None``: neither met nor missed. A burn rate over a window without calls is
``None`` and never fires an alert.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ai_guard.config import GuardConfig, build_config
from ai_guard.errors import ConfigError

__all__ = [
    "SLO_NAMES",
    "SRE_WORKBOOK_ALERTS",
    "AlertLevel",
    "BurnRateAlert",
    "SLOConfig",
    "SLOResult",
    "alert_level",
    "burn_rate",
    "burn_windows",
    "evaluate_slos",
    "projected_monthly_cost",
    "slo_config",
    "window_label",
]

AlertLevel = Literal["none", "ticket", "page"]
_SEVERITY_RANK: dict[str, int] = {"none": 0, "ticket": 1, "page": 2}

#: Seconds in the period a monthly figure stands for (30 days).
MONTH_SECONDS = 30 * 86400.0
#: The latency SLOs are on the 95th percentile: 5 % of calls may be slower.
LATENCY_QUANTILE = 0.95


class BurnRateAlert(GuardConfig):
    """One multiwindow burn-rate alert: fires when the burn rate is ``>= burn_rate`` over
    both ``long_window`` and ``short_window`` (seconds)."""

    severity: Literal["page", "ticket"]
    long_window: float = Field(gt=0)
    short_window: float = Field(gt=0)
    burn_rate: float = Field(gt=0)

    @model_validator(mode="after")
    def _short_inside_long(self) -> BurnRateAlert:
        if self.short_window >= self.long_window:
            raise ValueError("short_window must be shorter than long_window")
        return self


#: The SRE workbook's recommended pairs for a 30-day SLO period.
SRE_WORKBOOK_ALERTS: tuple[BurnRateAlert, ...] = (
    BurnRateAlert(severity="page", long_window=3600, short_window=300, burn_rate=14.4),
    BurnRateAlert(severity="page", long_window=6 * 3600, short_window=1800, burn_rate=6.0),
    BurnRateAlert(severity="ticket", long_window=3 * 86400, short_window=6 * 3600, burn_rate=1.0),
)


class SLOConfig(GuardConfig):
    """The SLO set, frozen and validated. ``None`` switches an SLO off.

    Override through :func:`slo_config` (a dict, keyword arguments, or both)::

        slo_config({"availability": 0.995}, monthly_cost_usd=2000)

    Ratios are fractions (``availability=0.999``, ``cache_hit_rate=0.85``) except
    ``mini_percentage``, a percentage like the report's key of that name.
    """

    #: p95 latency target in ms per tier.
    latency_p95_ms: dict[str, float] = Field(
        default_factory=lambda: {"mini": 1200.0, "full": 2500.0}
    )
    availability: float | None = Field(default=0.999, gt=0, lt=1)
    cache_hit_rate: float | None = Field(default=0.85, ge=0, le=1)
    mini_percentage: float | None = Field(default=85.0, ge=0, le=100)
    monthly_cost_usd: float | None = Field(default=500.0, gt=0)
    #: No cost projection before this many seconds of observation.
    cost_projection_min_seconds: float = Field(default=60.0, ge=0)
    alerts: tuple[BurnRateAlert, ...] = SRE_WORKBOOK_ALERTS

    @field_validator("latency_p95_ms")
    @classmethod
    def _positive_targets(cls, targets: dict[str, float]) -> dict[str, float]:
        for tier, target in targets.items():
            if not tier:
                raise ValueError("a tier name must not be empty")
            if not (0 < target < math.inf):
                raise ValueError(f"latency target of tier {tier!r} must be > 0 ms, got {target}")
        return dict(targets)


def slo_config(
    value: SLOConfig | Mapping[str, Any] | None = None,
    *,
    setting: str = "slos",
    **overrides: Any,
) -> SLOConfig:
    """An :class:`SLOConfig` from a config object or dict plus keyword overrides; a bad value
    raises :class:`~ai_guard.errors.ConfigError` naming the setting, prefixed by
    ``setting`` (``slos.availability``; the Flask extension passes ``"AI_GUARD_SLOS"``)."""
    if isinstance(value, SLOConfig):
        if not overrides:
            return value
        values: dict[str, Any] = {**value.model_dump(), **overrides}
    elif value is None:
        values = dict(overrides)
    elif isinstance(value, Mapping):
        values = {**value, **overrides}
    else:
        raise ConfigError(setting, value, "expected an SLOConfig or a mapping of SLO settings")
    return build_config(SLOConfig, _prefix=f"{setting}.", **values)


def burn_windows(config: SLOConfig) -> tuple[float, ...]:
    """Every window (seconds, ascending) the alerts of ``config`` need a burn rate for."""
    windows = {a.long_window for a in config.alerts} | {a.short_window for a in config.alerts}
    return tuple(sorted(windows))


def window_label(seconds: float) -> str:
    """``300 -> "5m"``, ``3600 -> "1h"``, ``259200 -> "3d"``, ``45 -> "45s"``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def burn_rate(bad: float, total: float, budget_fraction: float) -> float | None:
    """Error-budget burn rate: ``(bad / total) / budget_fraction``; ``None`` without calls.

    >>> burn_rate(bad=3, total=1000, budget_fraction=0.001)   # 0.3 % errors, 99.9 % SLO
    3.0
    """
    if total <= 0:
        return None
    if budget_fraction <= 0:
        raise ValueError("an error budget must be > 0")
    return bad / (total * budget_fraction)


def alert_level(
    burn_rates: Mapping[float, float | None], alerts: tuple[BurnRateAlert, ...]
) -> AlertLevel:
    """The most severe alert whose long and short windows both burn at or above its rate;
    a window without a burn rate (no calls) never fires."""
    level: AlertLevel = "none"
    for alert in alerts:
        long_rate = burn_rates.get(alert.long_window)
        short_rate = burn_rates.get(alert.short_window)
        if (
            long_rate is not None
            and short_rate is not None
            and long_rate >= alert.burn_rate
            and short_rate >= alert.burn_rate
            and _SEVERITY_RANK[alert.severity] > _SEVERITY_RANK[level]
        ):
            level = alert.severity
    return level


def projected_monthly_cost(
    spend_usd: float, observed_seconds: float, *, min_seconds: float = 60.0
) -> float | None:
    """Spend per second over the observed time x 30 days; ``None`` before ``min_seconds``."""
    if observed_seconds <= 0 or observed_seconds < min_seconds:
        return None
    return spend_usd / observed_seconds * MONTH_SECONDS


@dataclass(frozen=True, slots=True)
class SLOResult:
    """The state of one SLO.

    ``objective`` is ``"<="`` or ``">="`` (how ``actual`` compares with ``target``);
    ``met`` is ``None`` when there is no data. ``burn_rates`` maps a window label
    (``"5m"``, ``"1h"``, ``"6h"`` ...) to the burn rate over it, for the SLOs with an
    error budget (latency, availability); ``None`` for the others.
    """

    name: str
    description: str
    objective: Literal["<=", ">="]
    target: float
    actual: float | None
    unit: str
    met: bool | None
    burn_rates: dict[str, float | None] | None = None
    alert: AlertLevel = "none"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "description": self.description,
            "objective": self.objective,
            "target": self.target,
            "actual": self.actual,
            "unit": self.unit,
            "met": self.met,
            "burn_rates": dict(self.burn_rates) if self.burn_rates is not None else None,
            "alert": self.alert,
        }


#: Names of the default SLOs (latency ones are ``latency_p95_<tier>``).
SLO_NAMES = (
    "latency_p95_mini",
    "latency_p95_full",
    "availability",
    "cache_hit_rate",
    "mini_usage",
    "monthly_cost",
)

#: What the collector counts for a budget: ``events[window][slo_name] = (bad, total)``.
BudgetEvents = Mapping[float, Mapping[str, tuple[int, int]]]


def _met(actual: float | None, objective: str, target: float) -> bool | None:
    if actual is None:
        return None
    return actual <= target if objective == "<=" else actual >= target


def _budgeted(
    name: str,
    description: str,
    objective: Literal["<=", ">="],
    target: float,
    actual: float | None,
    unit: str,
    budget_fraction: float,
    events: BudgetEvents,
    config: SLOConfig,
) -> SLOResult:
    # 1 - 0.999 is 0.0010000000000000009 in binary floating point; a burn rate of
    # exactly 10.0 should read 10.0.
    budget_fraction = round(budget_fraction, 12)
    rates: dict[float, float | None] = {}
    for window, per_slo in events.items():
        bad, total = per_slo.get(name, (0, 0))
        rates[window] = burn_rate(bad, total, budget_fraction)
    return SLOResult(
        name=name,
        description=description,
        objective=objective,
        target=target,
        actual=actual,
        unit=unit,
        met=_met(actual, objective, target),
        burn_rates={window_label(w): rates[w] for w in sorted(rates)},
        alert=alert_level(rates, config.alerts),
    )


def evaluate_slos(
    config: SLOConfig, report: Mapping[str, Any], events: BudgetEvents
) -> list[SLOResult]:
    """Judge ``report`` (a :meth:`MetricsCollector.report` dict) against ``config``.

    ``events`` gives, per burn-rate window (seconds) and per budgeted SLO, the number of
    bad calls and of calls: ``latency_p95_<tier>`` → (calls above the tier's target,
    calls of the tier); ``availability`` → (failed calls, calls).
    """
    results: list[SLOResult] = []
    latency = report.get("latency_ms", {})
    for tier, target in config.latency_p95_ms.items():
        actual = (latency.get(tier) or {}).get("p95")
        results.append(
            _budgeted(
                f"latency_p95_{tier}",
                f"95th percentile latency of {tier}-tier calls",
                "<=",
                target,
                actual,
                "ms",
                1.0 - LATENCY_QUANTILE,
                events,
                config,
            )
        )
    if config.availability is not None:
        results.append(
            _budgeted(
                "availability",
                "share of calls that succeed",
                ">=",
                config.availability,
                report.get("availability"),
                "ratio",
                1.0 - config.availability,
                events,
                config,
            )
        )
    # The SLOs judged on a figure of the report alone (no error budget).
    plain: tuple[tuple[str, str, Literal["<=", ">="], float | None, str, str], ...] = (
        (
            "cache_hit_rate",
            "cached prompt tokens / prompt tokens",
            ">=",
            config.cache_hit_rate,
            "cache_hit_rate",
            "ratio",
        ),
        (
            "mini_usage",
            "percentage of calls served by the mini tier",
            ">=",
            config.mini_percentage,
            "mini_percentage",
            "percent",
        ),
        (
            "monthly_cost",
            "cost projected over 30 days from the current spend rate",
            "<=",
            config.monthly_cost_usd,
            "projected_monthly_cost_usd",
            "USD",
        ),
    )
    for name, description, objective, goal, report_key, unit in plain:
        if goal is None:
            continue
        actual = report.get(report_key)
        results.append(
            SLOResult(
                name=name,
                description=description,
                objective=objective,
                target=goal,
                actual=actual,
                unit=unit,
                met=_met(actual, objective, goal),
            )
        )
    return results
