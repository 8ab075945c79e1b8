"""Gradient-norm clipping over sharded and split parameters.

``torch.nn.utils.clip_grad_norm_`` cannot combine DTensors that live on different meshes (the
dense weights sharded over the data ranks, tensor-parallel ones over (data, tp), the experts
split over the ``ep`` ranks).  Each gradient's norm is taken as a DTensor (its reduction runs
over that gradient's own mesh) and made a plain scalar with ``full_tensor()``; the rest is what
``clip_grad_norm_(foreach=False)`` does, in the same order: the norm of the per-gradient norms,
one coefficient, clamped at 1.

Why nothing is counted twice: a DTensor's norm sums only over the mesh dimensions it is
sharded on.  A weight replicated over ``tp`` (router, expert bank, embedding) has no ``tp``
dimension in its mesh at all — FSDP2 shards it over the data ranks of one ``tp`` index, and
expert banks live on ``("dp", "ep")`` — so each ``tp`` rank computes its whole norm from its own
copy, and they agree because the copies do.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def per_grad_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of each gradient, stacked as plain scalars (a DTensor's reduced over its own
    mesh), in the order given."""
    norms = []
    for g in grads:
        n = torch.linalg.vector_norm(g, 2)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    return torch.stack(norms)


def clip_by_total(grads: list[torch.Tensor], total: torch.Tensor, max_norm: float) -> float:
    """Scale ``grads`` by ``max_norm / total`` where that is below 1, as ``clip_grad_norm_``
    does; ``total`` as a float."""
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)  # a DTensor gradient times a plain scalar stays sharded as it was
    return float(total)


def grad_norm_and_clip(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the gradients of ``params`` to a global 2-norm of ``max_norm``; return the norm
    before clipping (the same on every rank)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return clip_by_total(grads, torch.linalg.vector_norm(per_grad_norms(grads), 2), max_norm)
