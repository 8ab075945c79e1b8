"""The model layer: transformer backbone, HSER router, expert banks and dispatch."""

from .experts import ExpertBank, dispatch
from .moe import TieredMoE
from .router import HSERRouter, Routes, stable_topk
from .transformer import LiteLLM, LayerRouting, ModelOutput, build_model, load_stored, stored_state

__all__ = [
    "load_stored",
    "stored_state",
    "ExpertBank",
    "HSERRouter",
    "LayerRouting",
    "LiteLLM",
    "ModelOutput",
    "Routes",
    "TieredMoE",
    "build_model",
    "dispatch",
    "stable_topk",
]
