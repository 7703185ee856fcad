"""Model catalogue and prices: what a call costs.

A :class:`ModelSpec` names a model, its tier (``"mini"`` or ``"full"``), its list prices
in USD per 1M tokens (input, cached input, output) and its context window. The default
catalogue holds OpenAI's ``gpt-4o-mini`` and ``gpt-4o`` at their public list prices;
routers and the metrics collector accept their own catalogue.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from pydantic import Field, model_validator

from ai_guard.config import GuardConfig

__all__ = [
    "DEFAULT_MODELS",
    "TIERS",
    "ModelSpec",
    "Tier",
    "cost_usd",
    "find_model",
    "model_catalog",
]

Tier = Literal["mini", "full"]
TIERS: tuple[Tier, ...] = ("mini", "full")


class ModelSpec(GuardConfig):
    """A model the router may pick and the collector prices.

    Prices are USD per 1M tokens. ``cached_input_price`` applies to the prompt tokens the
    upstream served from its prompt cache::

        ModelSpec(name="gpt-4o-mini", tier="mini", input_price=0.15,
                  cached_input_price=0.075, output_price=0.60)
    """

    name: str = Field(min_length=1)
    tier: Tier
    input_price: float = Field(ge=0)
    cached_input_price: float | None = Field(default=None, ge=0)
    output_price: float = Field(ge=0)
    context_window: int = Field(default=128_000, gt=0)

    @model_validator(mode="after")
    def _cached_defaults_to_input(self) -> ModelSpec:
        if self.cached_input_price is None:
            object.__setattr__(self, "cached_input_price", self.input_price)
        return self

    def cost_usd(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> float:
        """Cost of one call; ``cached_tokens`` are part of ``input_tokens``."""
        cached = min(max(cached_tokens, 0), max(input_tokens, 0))
        cached_price = (
            self.cached_input_price if self.cached_input_price is not None else self.input_price
        )
        return (
            (input_tokens - cached) * self.input_price
            + cached * cached_price
            + output_tokens * self.output_price
        ) / 1_000_000


#: OpenAI list prices (USD per 1M tokens) as published for the two default models.
DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="gpt-4o-mini",
        tier="mini",
        input_price=0.15,
        cached_input_price=0.075,
        output_price=0.60,
        context_window=128_000,
    ),
    ModelSpec(
        name="gpt-4o",
        tier="full",
        input_price=2.50,
        cached_input_price=1.25,
        output_price=10.00,
        context_window=128_000,
    ),
)


def model_catalog(models: Iterable[ModelSpec] | None = None) -> dict[str, ModelSpec]:
    """A name -> spec mapping (the defaults when ``models`` is ``None``)."""
    return {m.name: m for m in (DEFAULT_MODELS if models is None else models)}


_DEFAULT_CATALOG = model_catalog()


def find_model(
    model: str | None, catalog: Mapping[str, ModelSpec] | None = None
) -> ModelSpec | None:
    """The spec of ``model``; a dated name (``gpt-4o-mini-2024-07-18``) matches its base
    (``gpt-4o-mini``), the longest base first. ``None`` for an unknown model."""
    if not model:
        return None
    table = _DEFAULT_CATALOG if catalog is None else catalog
    spec = table.get(model)
    if spec is not None:
        return spec
    best: ModelSpec | None = None
    for name, candidate in table.items():
        if model.startswith(name + "-") and (best is None or len(name) > len(best.name)):
            best = candidate
    return best


def cost_usd(
    model: str | None,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int = 0,
    *,
    catalog: Mapping[str, ModelSpec] | None = None,
) -> float | None:
    """Cost of a call to ``model`` from the price table, or ``None`` for an unknown model."""
    spec = find_model(model, catalog)
    if spec is None:
        return None
    return spec.cost_usd(input_tokens, output_tokens, cached_tokens)
