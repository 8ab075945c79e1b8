"""The growth planner: from a model to a target size, which growth steps, at what cost.

A plan is a list of recipe steps (so ``lite-llm plan ... --write-recipe grow.yaml`` feeds
``lite-llm expand --recipe``).  Each step's resulting config comes from running the growth
operation itself on a names-only tensor mapping (operations are lazy, so no weight is ever
touched), which keeps the planner's arithmetic identical to what ``expand`` will build.

Cost model (a heuristic, stated so it can be argued with): after each growth the model is
trained on ``tokens_per_param`` tokens per parameter *added* by that step (Chinchilla's 20
tokens per parameter, spent on the new capacity only), at the grown model's training FLOPs
per token (6 x active parameters + attention).  Training the target from scratch costs
``tokens_per_param`` x its parameters tokens at its own FLOPs per token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..config import ModelConfig, format_size
from ..errors import ConfigError
from ..train.flops import flops_per_token
from .recipe import GrowthStep
from .registry import get_op
from .tensors import stored_names

STRATEGIES = ("depth_first", "width_first", "balanced", "moe")


class _NamesOnly(Mapping[str, torch.Tensor]):
    """The tensor names of a config with no values: enough for a lazy growth op's config."""

    def __init__(self, config: ModelConfig) -> None:
        self._names = stored_names(config)

    def __getitem__(self, name: str) -> torch.Tensor:
        raise RuntimeError(f"the planner never reads weights (asked for {name})")

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class PlannedStep:
    step: GrowthStep
    config: ModelConfig
    params: int
    active_params: int
    added_params: int
    tokens: int
    flops: float


@dataclass
class Plan:
    strategy: str
    source: ModelConfig
    target_params: int
    steps: list[PlannedStep] = field(default_factory=list)
    seq_len: int = 2048
    tokens_per_param: float = 20.0

    @property
    def final(self) -> ModelConfig:
        return self.steps[-1].config if self.steps else self.source

    @property
    def growth_flops(self) -> float:
        return sum(s.flops for s in self.steps)

    @property
    def scratch_flops(self) -> float:
        final = self.final
        return float(flops_per_token(final, self.seq_len)) * self.tokens_per_param * final.num_params()

    def recipe(self) -> dict[str, Any]:
        return {"steps": [{"method": s.step.method, **s.step.params} for s in self.steps]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "source_params": self.source.num_params(),
            "target_params": self.target_params,
            "final_params": self.final.num_params(),
            "growth_flops": self.growth_flops,
            "scratch_flops": self.scratch_flops,
            "steps": [
                {"method": s.step.method, "params": s.step.params, "params_after": s.params, "active_after": s.active_params, "tokens": s.tokens, "flops": s.flops}
                for s in self.steps
            ],
        }


def _apply(config: ModelConfig, method: str, **params: Any) -> ModelConfig:
    new_config, _ = get_op(method)(config, _NamesOnly(config), **params)
    return new_config


def _depth_to(config: ModelConfig, target: int, cap_factor: float = 2.0) -> GrowthStep | None:
    """A llama_pro step toward ``target`` parameters: as many layers as needed, at most
    ``cap_factor`` times the current depth."""
    per_layer = config.replace(n_layers=config.n_layers + 1).num_params() - config.num_params()
    need = math.ceil((target - config.num_params()) / per_layer) if per_layer > 0 else 0
    layers = config.n_layers + max(1, min(need, int(config.n_layers * (cap_factor - 1))))
    return GrowthStep("llama_pro", {"target_layers": layers})


def _width_steps(config: ModelConfig) -> list[GrowthStep]:
    """Double the model's width exactly: hidden size, attention heads (whole KV groups, so
    GQA stays intact) and FFN / expert hidden sizes."""
    steps = [GrowthStep("width", {"d_model": 2 * config.d_model}), GrowthStep("heads", {"n_heads": 2 * config.n_heads, "mode": "split"})]
    ffn: dict[str, Any] = {}
    if not config.is_moe or (config.moe_layers is not None and len(config.moe_layers) < config.n_layers):
        ffn["intermediate_size"] = 2 * config.intermediate_size
    if config.tiers:
        ffn["expert_hidden"] = {t.name: 2 * t.expert_hidden for t in config.tiers}
    steps.append(GrowthStep("ffn_width", ffn))
    return steps


def _moe_steps(config: ModelConfig, target: int) -> list[GrowthStep]:
    if not config.tiers:
        one = _apply(config, "upcycle", num_experts=2)
        per_expert = _apply(config, "upcycle", num_experts=3).num_params() - one.num_params()
        experts = max(2, 2 + math.ceil((target - one.num_params()) / per_expert))
        return [GrowthStep("upcycle", {"num_experts": experts})]
    tier = max(config.tiers, key=lambda t: t.num_experts)
    plus = _apply(config, "add_experts", tier=tier.name, count=1).num_params() - config.num_params()
    count = max(1, math.ceil((target - config.num_params()) / plus))
    return [GrowthStep("add_experts", {"tier": tier.name, "count": count})]


def _next_steps(config: ModelConfig, target: int, strategy: str, round_: int, source: ModelConfig) -> list[GrowthStep]:
    if strategy == "moe":
        return _moe_steps(config, target)
    width_fits = _chain(config, _width_steps(config)).num_params() <= target
    if strategy == "width_first":
        return _width_steps(config) if width_fits else [_depth_to(config, target)]
    if strategy == "depth_first":
        deep_enough = config.n_layers >= 4 * source.n_layers
        if deep_enough and width_fits:
            return _width_steps(config)
        return [_depth_to(config, target, cap_factor=2.0 if not deep_enough else 1.5)]
    # balanced: alternate doubling depth and width while a width doubling still fits.
    if round_ % 2 == 1 and width_fits:
        return _width_steps(config)
    return [_depth_to(config, target)]


def _chain(config: ModelConfig, steps: list[GrowthStep]) -> ModelConfig:
    for step in steps:
        config = _apply(config, step.method, **step.params)
    return config


def plan_growth(
    source: ModelConfig,
    target_params: int,
    strategy: str = "balanced",
    *,
    tokens_per_param: float = 20.0,
    seq_len: int = 2048,
    max_steps: int = 24,
) -> Plan:
    """Plan growth steps from ``source`` to at least ``target_params`` parameters."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if target_params <= source.num_params():
        raise ConfigError(
            f"the model already has {format_size(source.num_params())} parameters; the target ({format_size(target_params)}) must be larger"
        )
    plan = Plan(strategy, source, target_params, seq_len=seq_len, tokens_per_param=tokens_per_param)
    config = source
    for round_ in range(max_steps):
        if config.num_params() >= target_params:
            break
        for step in _next_steps(config, target_params, strategy, round_, source):
            before = config
            config = _apply(config, step.method, **step.params)
            added = config.num_params() - before.num_params()
            tokens = int(tokens_per_param * max(added, 0))
            flops = float(flops_per_token(config, seq_len)) * tokens
            plan.steps.append(PlannedStep(step, config, config.num_params(), config.num_active_params(), added, tokens, flops))
    else:
        raise ConfigError(f"no plan reaches {format_size(target_params)} within {max_steps} growth rounds; choose a closer target or another strategy")
    return plan
