"""Data parallelism with FSDP2 (``fully_shard``): dense weights and their optimizer state
sharded over the data ranks, and the load-balance loss taken over the whole global batch.

Each block and then the whole model are ``fully_shard``-ed over the ``dp x ep`` data ranks
(the usual FSDP2 nesting: a block's weights are gathered just before it runs and freed after).
Expert banks split by expert parallelism are left to it (``ignored_params``).  Under tensor
parallel the data mesh is that of this rank's ``tp`` index, and FSDP2 shards each TP slice over
it (2-D weights); the plain weights it shards are whole copies on every ``tp`` rank.

The router's load-balance loss is a function of the batch-mean routing probabilities, which
is not linear in the rows: the mean of per-rank losses is not the loss of the whole batch.  So
the routers' ``batch_mean`` becomes a mean over every data rank's tokens (an all-reduce with a
gradient), and DP training follows the single-process run on the same global batch.  It runs
over the data ranks only: the ``tp`` ranks of one data rank hold the same tokens.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from ..model import HSERRouter

M = TypeVar("M", bound=torch.nn.Module)


def apply_data_parallel(model: M, data_mesh: DeviceMesh, ignored: list[torch.nn.Parameter] | None = None) -> M:
    """Shard ``model``'s weights over ``data_mesh`` with FSDP2, skipping ``ignored`` ones:
    a ``LiteLLM``, or one pipeline stage of it (a ``StageModule``, its blocks in a dict)."""
    group = data_mesh.get_group()
    ranks = data_mesh.size()
    for module in model.modules():
        if isinstance(module, HSERRouter):
            module.batch_mean = _GlobalBatchMean(group, ranks)
    ignored_set = set(ignored or [])
    blocks = model.layers.values() if isinstance(model.layers, torch.nn.ModuleDict) else model.layers
    for block in blocks:
        fully_shard(block, mesh=data_mesh, ignored_params=ignored_set)
    fully_shard(model, mesh=data_mesh, ignored_params=ignored_set)
    # A tier no row of this rank reached has no gradient here but may have one elsewhere; FSDP2
    # then reduce-scatters zeros for it so every rank's collective has the same size.  (Where no
    # rank reached it, its gradient is zeros rather than None as in one process: AdamW applies
    # weight decay to it that step.)
    model.set_reduce_scatter_unused_params(True)
    return model


class _GlobalBatchMean:
    """Mean over the tokens of every data rank (equal token counts), differentiable: the
    all-reduce's backward all-reduces the gradient, so each rank's routers get the gradient
    of the global-batch loss with respect to their own tokens' probabilities."""

    def __init__(self, group: dist.ProcessGroup, ranks: int) -> None:
        self.group, self.ranks = group, ranks

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(t.mean(0), "sum", self.group) / self.ranks
