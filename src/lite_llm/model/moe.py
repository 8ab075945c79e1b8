"""The tiered mixture-of-experts feed-forward: an HSER router and one expert bank per tier."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import ModelConfig
from .experts import DispatchImpl, ExpertBank, dispatch
from .router import HSERRouter, Routes


class TieredMoE(nn.Module):
    """Route each token to at most K experts across the allowed tiers and mix their outputs."""

    def __init__(self, config: ModelConfig, layer: int, expert_device: torch.device | str | None = None) -> None:
        super().__init__()
        self.router = HSERRouter(config, layer)
        self.experts = nn.ModuleDict(
            {t.name: ExpertBank(t.num_experts, config.d_model, t.expert_hidden, device=expert_device) for t in config.tiers}
        )
        self.tier_names = [t.name for t in config.tiers]
        self.dispatch_impl: DispatchImpl = "auto"
        # The expert compute, ``dispatch``'s signature.  Expert parallelism replaces it from
        # outside (``dist/expert_parallel.py``) with one that sends rows to the rank holding
        # their expert; the layer itself knows nothing of ranks.
        self.dispatcher: Callable[..., torch.Tensor] = dispatch

    @property
    def tier_offsets(self) -> list[int]:
        return self.router.tier_offsets

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, step: int | None = None) -> tuple[torch.Tensor, Routes]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routes = self.router(flat, allowed, step)
        banks = [self.experts[name] if name in self.experts else None for name in self.tier_names]
        out = self.dispatcher(flat, routes.expert_ids, routes.weights, banks, self.tier_offsets, self.dispatch_impl)
        return out.view(shape), routes
