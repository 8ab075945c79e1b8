"""Plain validated dataclasses for models and their tiers, the presets, and what a model costs
(parameters and training FLOPs) — the layer everything else reads its settings from."""

from .files import load_config_file, read_config_file, read_yaml
from .flops import flops_per_token
from .model import PRESETS, BudgetMode, ModelConfig, Placement, RoutingConfig, TierConfig, TierSet, format_size, is_int, parse_size

__all__ = [
    "PRESETS", "BudgetMode", "ModelConfig", "Placement", "RoutingConfig", "TierConfig", "TierSet",
    "flops_per_token", "format_size", "is_int", "load_config_file", "parse_size", "read_config_file", "read_yaml",
]
