"""Model catalogue and prices: what a call costs.

A :class:`ModelSpec` names a model, its tier (``"mini"`` or ``"full"``), its list prices
in USD per 1M tokens (input, cached input, output) and its context window. The default
catalogue holds OpenAI's ``gpt-4o-mini`` and ``gpt-4o`` at their public list prices;
routers and the metrics collector accept their own catalogue, and :func:`parse_models`
reads one from configuration (``app.config["AI_GUARD_MODELS"]``, a JSON file)::

    >>> cost_usd("gpt-4o-mini", Usage(prompt_tokens=1000, completion_tokens=100,
    ...                              cached_tokens=400))   # 600 x 0.15 + 400 x 0.075 + 100 x 0.60
    0.00018
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from ai_guard.config import GuardConfig, config_error
from ai_guard.errors import ConfigError
from ai_guard.types import Usage

__all__ = [
    "DEFAULT_MODELS",
    "TIERS",
    "ModelCatalog",
    "ModelSpec",
    "Tier",
    "cost_usd",
    "find_model",
    "model_catalog",
    "parse_models",
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


class ModelCatalog(Mapping[str, ModelSpec]):
    """A read-only name -> :class:`ModelSpec` table that remembers which base model a
    dated name (``gpt-4o-mini-2024-07-18``) resolves to.

    Pricing runs once per AI call and upstreams answer with dated names; without the
    memory every call would scan the table. Read-only, so a remembered answer never goes
    stale; the memory is bounded.
    """

    __slots__ = ("_known", "_specs")

    _MEMO_LIMIT = 1024

    def __init__(self, models: Iterable[ModelSpec]) -> None:
        self._specs: dict[str, ModelSpec] = {m.name: m for m in models}
        # Every name resolved so far (exact names, then dated names as they are seen).
        self._known: dict[str, ModelSpec | None] = dict(self._specs)

    def __getitem__(self, name: str) -> ModelSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"ModelCatalog({list(self._specs.values())!r})"

    def find(self, model: str) -> ModelSpec | None:
        """The spec of ``model`` or of its base name; ``None`` when unknown."""
        known = self._known
        if model in known:
            return known[model]
        found = _longest_base(model, self._specs)
        if len(known) >= len(self._specs) + self._MEMO_LIMIT:
            # An unbounded stream of odd names must not grow memory.
            self._known = known = dict(self._specs)
        known[model] = found
        return found


def _longest_base(model: str, table: Mapping[str, ModelSpec]) -> ModelSpec | None:
    best: ModelSpec | None = None
    for name, candidate in table.items():
        if model.startswith(name + "-") and (best is None or len(name) > len(best.name)):
            best = candidate
    return best


def model_catalog(models: Iterable[ModelSpec] | None = None) -> ModelCatalog:
    """A name -> spec mapping (the defaults when ``models`` is ``None``)."""
    return ModelCatalog(DEFAULT_MODELS if models is None else models)


_DEFAULT_CATALOG = model_catalog()


def find_model(
    model: str | None, catalog: Mapping[str, ModelSpec] | None = None
) -> ModelSpec | None:
    """The spec of ``model``; a dated name (``gpt-4o-mini-2024-07-18``) matches its base
    (``gpt-4o-mini``), the longest base first. ``None`` for an unknown model."""
    if not model:
        return None
    table = _DEFAULT_CATALOG if catalog is None else catalog
    if type(table) is ModelCatalog:
        # Exact and already-resolved dated names in one lookup: pricing runs on every call.
        known = table._known
        return known[model] if model in known else table.find(model)
    spec = table.get(model)
    if spec is not None:
        return spec
    return _longest_base(model, table)


def cost_usd(
    model: str | ModelSpec | None,
    usage: Usage | int,
    output_tokens: int = 0,
    cached_tokens: int = 0,
    *,
    catalog: Mapping[str, ModelSpec] | None = None,
) -> float | None:
    """Cost in USD of a call to ``model``, or ``None`` for a model the price table lacks.

    ``usage`` is a :class:`~ai_guard.types.Usage` (its ``cached_tokens`` are priced at the
    cached rate), or the number of input tokens followed by ``output_tokens`` and
    ``cached_tokens``. ``model`` is a name (a dated name matches its base) or a spec::

        cost_usd("gpt-4o", result.usage)
        cost_usd("gpt-4o-mini", 1200, 80, 1024)
    """
    spec = model if isinstance(model, ModelSpec) else find_model(model, catalog)
    if spec is None:
        return None
    if isinstance(usage, Usage):
        return spec.cost_usd(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
    return spec.cost_usd(usage, output_tokens, cached_tokens)


def parse_models(value: Any, *, setting: str = "models") -> tuple[ModelSpec, ...]:
    """Read a model catalogue from configuration; :class:`ConfigError` names the bad entry.

    Accepts :class:`ModelSpec` objects, dicts of their fields, or a mapping of model name
    to fields (the name comes from the key)::

        parse_models({"gpt-4o-mini": {"tier": "mini", "input_price": 0.15,
                                      "cached_input_price": 0.075, "output_price": 0.6}})

    Model names must be unique and the catalogue must not be empty.
    """
    if isinstance(value, ModelSpec):
        value = [value]
    if isinstance(value, Mapping):
        entries: list[tuple[str, Any]] = []
        for name, fields in value.items():
            if isinstance(fields, ModelSpec):
                entries.append((f"{setting}[{name!r}]", fields))
            elif isinstance(fields, Mapping):
                entries.append((f"{setting}[{name!r}]", {"name": name, **fields}))
            else:
                raise ConfigError(f"{setting}[{name!r}]", fields, "expected a mapping of prices")
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        entries = [(f"{setting}[{i}]", entry) for i, entry in enumerate(value)]
    else:
        raise ConfigError(setting, value, "expected a list of models or a mapping name -> prices")
    specs: list[ModelSpec] = []
    for where, entry in entries:
        if isinstance(entry, ModelSpec):
            specs.append(entry)
        elif isinstance(entry, Mapping):
            try:
                specs.append(ModelSpec(**entry))
            except ValidationError as exc:
                raise config_error(exc, prefix=where + ".") from None
        else:
            raise ConfigError(where, entry, "expected a ModelSpec or a mapping of its fields")
    if not specs:
        raise ConfigError(setting, value, "the catalogue needs at least one model")
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(setting, spec.name, "model names must be unique")
        seen.add(spec.name)
    return tuple(specs)
