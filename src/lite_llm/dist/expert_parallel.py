"""Expert parallelism: each tier's experts split over the ranks of an expert-parallel group,
tokens sent to the rank that holds their expert with autograd all-to-all.

Applied to a model from outside it: :func:`apply_expert_parallel` replaces every tier bank's
weights by its rank's slice (a DTensor ``Shard(0)`` over the ``ep`` mesh dimension, replicated
over ``dp``, so ``torch.distributed.checkpoint`` sees — and can reshard — the whole bank) and
sets each MoE layer's ``dispatcher`` to an :class:`ExpertParallelDispatch`.

Why the result is bitwise that of one process holding the whole batch (DESIGN.md, "Where
users outgrow one machine"): routing runs on each rank's own tokens with the same gate weights
(the gate matmul's rows do not depend on the other rows at these sizes); every expert receives
exactly the rows one process would give it, in the same order — source rank by source rank,
which is global token order because rank r holds rows ``r*B/R .. (r+1)*B/R`` of the batch; the
outputs come back and are added into each token in increasing expert id, the order
``model.experts.dispatch`` adds them.  Token counts are exchanged first (one small all-gather),
then the rows.  A rank that receives no rows, or all of them, runs the same collectives.

A tier's ``E`` experts are split as ``torch.chunk`` splits: ``ceil(E / ep)`` per rank, the last
ranks holding fewer or none (a tier of 2 experts on 4 ranks lives on ranks 0 and 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from ..model import ExpertBank, LiteLLM, TieredMoE
from ..model.experts import DispatchImpl, choose_impl, grouped_experts, in_autocast_dtype, looped_experts, nonempty_groups


def expert_owners(tier_sizes: Sequence[int], ep: int) -> list[int]:
    """The EP rank holding each flat expert id (tiers concatenated), as ``torch.chunk`` splits."""
    owners: list[int] = []
    for size in tier_sizes:
        chunk = max(1, math.ceil(size / ep))
        owners.extend(i // chunk for i in range(size))
    return owners


class ExpertParallelDispatch:
    """``model.experts.dispatch`` for banks split over an expert-parallel group."""

    def __init__(self, group: dist.ProcessGroup, tier_sizes: Sequence[int]) -> None:
        self.group = group
        self.ep = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.tier_sizes = list(tier_sizes)
        self.num_experts = sum(tier_sizes)
        owners = expert_owners(tier_sizes, self.ep)
        self.owner = torch.tensor(owners, dtype=torch.long)
        self.mine = torch.tensor([e for e, r in enumerate(owners) if r == self.ep_rank], dtype=torch.long)
        offsets = [0]
        for size in tier_sizes:
            offsets.append(offsets[-1] + size)
        # how many of this rank's experts each tier has (they are consecutive in self.mine)
        self.local_per_tier = [sum(1 for e in range(a, b) if owners[e] == self.ep_rank) for a, b in zip(offsets[:-1], offsets[1:])]

    def __call__(
        self,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        banks: Sequence[ExpertBank | None],
        tier_offsets: list[int],
        impl: DispatchImpl = "auto",
    ) -> torch.Tensor:
        return in_autocast_dtype(x, lambda rows: self._dispatch(rows, expert_ids, weights, banks, impl))

    def _dispatch(
        self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, banks: Sequence[ExpertBank | None], impl: DispatchImpl
    ) -> torch.Tensor:
        n_experts, ep, device = self.num_experts, self.ep, x.device
        slots = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        used = (flat >= 0).nonzero().flatten()
        flat, token_of_route = flat[used], used // slots
        route_weights = weights.reshape(-1)[used]
        owner = self.owner.to(device)[flat]

        # 1. counts first: every rank learns how many rows each rank sends to each expert
        counts = torch.bincount(flat, minlength=n_experts)  # where the backend works (nccl: the GPU)
        gathered = [torch.empty_like(counts) for _ in range(ep)]
        dist.all_gather(gathered, counts, group=self.group)
        all_counts = torch.stack(gathered).cpu()  # (ep, E): rows rank r routes to expert e
        send_sizes = torch.bincount(owner, minlength=ep).tolist()
        local_counts = all_counts[:, self.mine]  # (ep, L): rows each source sends to my experts
        recv_sizes = local_counts.sum(1).tolist()

        # 2. rows out, ordered by (owner, expert id) so each destination gets one block
        send_order = torch.argsort(owner * n_experts + flat, stable=True)
        received = funcol.all_to_all_single_autograd(x.index_select(0, token_of_route[send_order]), recv_sizes, send_sizes, self.group)

        # 3. regroup by expert, source rank by source rank inside each expert (global order)
        by_expert = _source_major_to_expert_major(local_counts).to(device)
        rows = received.index_select(0, by_expert)
        per_expert = local_counts.sum(0).tolist()
        outs, start = [], 0
        tier_rows = []
        for t, n_local in enumerate(self.local_per_tier):
            tier_rows.append(per_expert[start : start + n_local])
            start += n_local
        for t, tier_xs in nonempty_groups(rows, [sum(c) for c in tier_rows]):
            bank = banks[t]
            if bank is None:
                raise RuntimeError(f"tokens were routed to tier #{t}, whose experts are not loaded")
            outs.append(_local_experts(bank, tier_xs, tier_rows[t], impl))
        # no rows here: send back the empty ``rows`` itself, which is on the autograd graph, so
        # this rank still runs the backward all-to-all the others wait for
        ys = torch.cat(outs) if len(outs) > 1 else (outs[0] if outs else rows)

        # 4. back to the senders, then into each token in increasing expert id
        ys = ys.index_select(0, torch.argsort(by_expert))
        returned = funcol.all_to_all_single_autograd(ys, send_sizes, recv_sizes, self.group)
        global_order = torch.argsort(flat, stable=True)
        position_in_send = torch.argsort(send_order)
        returned = returned.index_select(0, position_in_send[global_order])
        returned = returned * route_weights[global_order].to(returned.dtype)[:, None]
        out = torch.zeros_like(x)
        out.index_add_(0, token_of_route[global_order], returned.to(x.dtype))
        return out


def _source_major_to_expert_major(local_counts: torch.Tensor) -> torch.Tensor:
    """Row indices that turn received rows (blocks by source, experts inside) into blocks by
    expert with sources in rank order inside: expert e's rows in global token order."""
    ep, n_local = local_counts.shape
    flat_counts = local_counts.reshape(-1)
    starts = torch.cumsum(flat_counts, 0) - flat_counts  # start of (source r, expert j)
    pieces = [
        torch.arange(int(starts[r * n_local + j]), int(starts[r * n_local + j] + local_counts[r, j]))
        for j in range(n_local)
        for r in range(ep)
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _local_experts(bank: ExpertBank, x: torch.Tensor, counts: list[int], impl: DispatchImpl) -> torch.Tensor:
    """This rank's slice of a bank applied to rows sorted by its local experts (the same
    implementation choice the whole bank would make: both paths give the same bits)."""
    w_gu, w_d = _local(bank.gate_up_proj), _local(bank.down_proj)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w_gu.requires_grad)
    if impl in ("auto", "padded_bmm"):
        impl = choose_impl(x, counts, needs_grad, w_gu, w_d)
    if impl == "grouped_mm":
        return grouped_experts(x, counts, w_gu, w_d)
    if needs_grad:
        return looped_experts(x, counts, w_gu.unbind(0), w_d.unbind(0), bank.d_model)
    return looped_experts(x, counts, w_gu, w_d, bank.d_model)


def apply_expert_parallel(model: LiteLLM, mesh: DeviceMesh) -> LiteLLM:
    """Split every tier bank of ``model`` over ``mesh`` (dims ``("dp", "ep")``): each rank keeps
    its experts as DTensors ``[Replicate(), Shard(0)]`` and its MoE layers exchange rows with
    the other ranks of its ``ep`` group.  Every rank must hold the same full model first (built
    from the same seed or checkpoint)."""
    ep_group = mesh.get_group("ep")
    for moe in model.modules():  # a whole model's blocks, or a pipeline stage's
        if not isinstance(moe, TieredMoE):
            continue
        sizes = []
        for name in moe.tier_names:
            bank = moe.experts[name]
            sizes.append(bank.num_experts)
            for attr in ("gate_up_proj", "down_proj"):
                full: nn.Parameter = getattr(bank, attr)
                shard = distribute_tensor(full.detach(), mesh, [Replicate(), Shard(0)], src_data_rank=None)
                setattr(bank, attr, nn.Parameter(shard, requires_grad=full.requires_grad))
        moe.dispatcher = ExpertParallelDispatch(ep_group, sizes)
    return model


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The expert-bank weights (what expert parallelism splits and data parallelism must not shard again)."""
    return [p for m in model.modules() if isinstance(m, ExpertBank) for p in (m.gate_up_proj, m.down_proj)]


def sync_expert_grads(model: nn.Module, dp_group: dist.ProcessGroup, data_group: dist.ProcessGroup, data_ranks: int) -> None:
    """Average expert gradients as the dense ones are: summed over the ``dp`` replicas of each
    expert, divided by every data rank (each rank's loss is the mean over its own rows, and an
    expert's gradient already sums what its ``ep`` group's rows sent it).

    A bank has a gradient when any row of the global batch reached any of its experts, as in
    one process: a bank no row reached anywhere keeps none (AdamW then skips it — no weight
    decay, no moment decay), and one reached elsewhere only gets zeros here.  Presence is agreed
    over every data rank, so the collectives that follow (the norm) run on all of them or none.

    Under tensor parallel both groups hold the ranks of this rank's ``tp`` index only: the
    ``tp`` ranks of one data rank already hold the same expert gradient (their activations are
    replicated), so summing over them would count it ``tp`` times."""
    params = [p for p in expert_parameters(model) if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")  # nccl reduces only CUDA tensors
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(present, group=data_group)
    replicated = dist.get_world_size(dp_group) > 1
    for p, anywhere in zip(params, present.tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        local = _local(p.grad)
        if replicated:
            dist.all_reduce(local, group=dp_group)
        local.div_(data_ranks)
