"""Plain validated dataclasses for models and their tiers, the presets, and what a model costs
(parameters and training FLOPs) — the layer everything else reads its settings from."""

from .flops import flops_per_token
from .model import PRESETS, BudgetMode, ModelConfig, Placement, RoutingConfig, TierConfig, TierSet, format_size, is_int, parse_size, read_yaml

__all__ = [
    "PRESETS", "BudgetMode", "ModelConfig", "Placement", "RoutingConfig", "TierConfig", "TierSet",
    "flops_per_token", "format_size", "is_int", "parse_size", "read_yaml",
]
