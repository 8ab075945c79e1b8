"""Tier budgets: the one growth step that changes a tier's declared size, not its weights.

A tier's ``budget`` (strict by default) guards against a config that grew a tier by accident.
A growth that adds parameters to a tier on purpose — more layers, a wider model, more experts
— is refused by that same guard, so the budget must be raised first, as a step of its own that
is recorded in the growth history like any other (``budget`` then ``llama_pro`` in a recipe,
or one ``expand --method budget`` before the growth).  Every tensor passes through unchanged,
so the step is exact by construction.
"""

from __future__ import annotations

import dataclasses
import warnings

from ..config import ModelConfig, format_size, parse_size
from ..errors import ConfigError
from .registry import register
from .tensors import LazyTensors, Tensors, ref, stored_names


@register("budget", family="tiers", exact=True)
def budget(
    config: ModelConfig, tensors: Tensors, *, tier: str, size: int | str | None = None, mode: str | None = None
) -> tuple[ModelConfig, LazyTensors]:
    """Set a tier's parameter budget (``size``: e.g. 10M, or none) and/or its ``mode``
    (strict or advisory); the weights are unchanged — exact.

    The new budget must hold the tier as it is (a budget the tier already exceeds would make
    a config no reader accepts); raise it with room for the growth that follows.
    """
    names = [t.name for t in config.tiers]
    if not names:
        raise ConfigError("budget sets a tier's parameter budget, but this model is dense: it has no tier of experts")
    if tier not in names:
        raise ConfigError(f"budget: unknown tier {tier!r}; this model's tiers are {', '.join(names)}")
    if size is None and mode is None:
        raise ConfigError("budget needs size (e.g. --set size=10M, or size=none to remove the budget) or mode (strict or advisory)")
    old = config.tier(tier)
    changes: dict[str, object] = {}
    if size is not None:
        changes["budget"] = None if isinstance(size, str) and size.strip().lower() == "none" else parse_size(size)
    if mode is not None:
        changes["budget_mode"] = mode
    new = dataclasses.replace(old, **changes)  # TierConfig checks the mode and that the size is positive
    need = config.tier_params(new)
    if new.budget is not None and new.budget_mode == "strict" and need > new.budget:
        raise ConfigError(
            f"budget: tiers[{tier}] already holds {format_size(need)} parameters ({need}), more than size={format_size(new.budget)}; give at least {need}"
        )
    with warnings.catch_warnings():  # an advisory budget's warning belongs to the growth that exceeds it
        warnings.simplefilter("ignore")
        new_config = config.replace(tiers=[new if t.name == tier else t for t in config.tiers])
    return new_config, LazyTensors({name: ref(tensors, name) for name in stored_names(new_config)})

