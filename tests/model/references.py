"""Slow, obviously-correct versions of the fast kernels, the oracles the model tests compare to.

They live with the tests, not in the library: nothing the library runs needs them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lite_llm.model.experts import ExpertBank


def dispatch_reference(
    x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, banks: list[ExpertBank], tier_offsets: list[int]
) -> torch.Tensor:
    """Dispatch done one token and one slot at a time: each routed expert run on its own."""
    out = torch.zeros_like(x)
    rows = []
    for n in range(x.shape[0]):
        acc = torch.zeros_like(x[n])
        for k in range(expert_ids.shape[1]):
            fid = int(expert_ids[n, k])
            if fid < 0:
                continue
            t = max(i for i in range(len(banks)) if tier_offsets[i] <= fid)
            e = fid - tier_offsets[t]
            bank = banks[t]
            gate, up = (bank.gate_up_proj[e] @ x[n]).chunk(2)
            acc = acc + weights[n, k] * (bank.down_proj[e] @ (F.silu(gate) * up))
        rows.append(acc)
    return torch.stack(rows) if rows else out


def stable_topk_reference(scores: torch.Tensor, k: int, rank: torch.Tensor) -> torch.Tensor:
    """Top-k by a stable sort over the tie-break order."""
    order = rank.expand_as(scores).argsort(dim=-1)
    permuted = scores.gather(-1, order)
    ranked = torch.sort(permuted, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.gather(-1, ranked)
