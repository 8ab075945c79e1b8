"""Growth: pure functions ``(config, tensors) -> (config, tensors)`` that make a model bigger.

Each operation is registered under a name (``available_ops()``) and returns lazy tensors, so
a growth over a checkpoint streams (see :mod:`lite_llm.grow.tensors`).  Exact operations keep
the function: the grown model's logits equal the original's (to fp32 rounding).
"""

# The built-in operations register themselves on import; lite_llm.grow.registry is only ever
# reached through this package, so they are always registered before get_op runs.
from . import budget, depth, heads, moe, tiers, width  # noqa: F401
from .importance import layer_importance
from .moe import old_expert_mask
from .tiers import add_tier_checkpoint
from .expand import expand_checkpoint, materialize
from .recipe import GrowthStep, Recipe
from .registry import GrowthOp, available_ops, get_op, register
from .tensors import LazyTensors, Tensors, expected_specs, stored_names

__all__ = [
    "GrowthOp",
    "GrowthStep",
    "Recipe",
    "LazyTensors",
    "add_tier_checkpoint",
    "Tensors",
    "available_ops",
    "expand_checkpoint",
    "expected_specs",
    "get_op",
    "layer_importance",
    "materialize",
    "old_expert_mask",
    "register",
    "stored_names",
]
