from __future__ import annotations

import pytest
from pydantic import Field, ValidationError

from ai_guard.config import GuardConfig, StoreConfig, build_config
from ai_guard.errors import ConfigError
from ai_guard.pricing import DEFAULT_MODELS, ModelSpec, cost_usd, find_model


class _Example(GuardConfig):
    timeout: float = Field(default=30.0, gt=0)
    threshold: int = Field(default=5, ge=1)


def test_build_config_returns_frozen_model() -> None:
    config = build_config(_Example, timeout=3)
    assert config.timeout == 3.0
    with pytest.raises(ValidationError):
        config.timeout = 5


@pytest.mark.parametrize(
    ("values", "setting", "shown"),
    [
        ({"timeout": -1}, "timeout", "-1"),
        ({"threshold": 0}, "threshold", "0"),
        ({"timeout": "soon"}, "timeout", "soon"),
        ({"unknown": 1}, "unknown", "1"),
    ],
)
def test_bad_value_names_setting_and_value(
    values: dict[str, object], setting: str, shown: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(_Example, **values)  # type: ignore[arg-type]
    assert info.value.setting == setting
    assert setting in str(info.value)
    assert shown in str(info.value)


def test_prefix_names_the_config_key() -> None:
    with pytest.raises(ConfigError, match="AI_GUARD_url"):
        build_config(StoreConfig, _prefix="AI_GUARD_", url="ftp://x")


def test_model_spec_cost_prices_cached_tokens_at_cached_rate() -> None:
    mini = find_model("gpt-4o-mini")
    assert mini is not None
    # 1M prompt tokens of which 400k cached, 100k output
    cost = mini.cost_usd(1_000_000, 100_000, 400_000)
    assert cost == pytest.approx(0.6 * 0.15 + 0.4 * 0.075 + 0.1 * 0.60)


def test_dated_model_names_match_their_base() -> None:
    spec = find_model("gpt-4o-mini-2024-07-18")
    assert spec is not None
    assert spec.name == "gpt-4o-mini"
    spec = find_model("gpt-4o-2024-08-06")
    assert spec is not None
    assert spec.name == "gpt-4o"
    assert find_model("llama-3") is None
    assert cost_usd("llama-3", 10, 10) is None


def test_model_spec_rejects_negative_price_and_unknown_tier() -> None:
    with pytest.raises(ValidationError):
        ModelSpec(name="m", tier="mini", input_price=-1, output_price=1)
    with pytest.raises(ValidationError):
        ModelSpec(name="m", tier="huge", input_price=1, output_price=1)  # type: ignore[arg-type]


def test_cached_price_defaults_to_input_price() -> None:
    spec = ModelSpec(name="m", tier="full", input_price=2.0, output_price=8.0)
    assert spec.cached_input_price == 2.0


def test_default_catalogue_has_one_model_per_tier() -> None:
    assert sorted(m.tier for m in DEFAULT_MODELS) == ["full", "mini"]
