"""Experts the model does not hold: the interface the MoE layer asks for the experts a step
selected, and the stand-in for an :class:`~.experts.ExpertBank` that asks it.

Routing needs only the gates, which stay in the model; the experts a step needs are known once
it has routed.  So for each (layer, tier) that received rows, :class:`SourcedExperts` asks an
:class:`ExpertSource` for exactly the experts with rows, keyed by (layer, tier, expert), and
computes with them while the source keeps them pinned.  The model never reads a file: the
source (``lite_llm.store``) decides where the weights come from.

Outputs are bitwise those of the bank holding every expert: the same implementation is chosen
(:func:`~.experts.choose_impl` looks at rows and shapes only), each expert's rows go through the
same two matmuls, and ``grouped_mm`` over a subset of experts computes each group on its own.
When the source cannot hold every expert with rows at once, the experts are taken in chunks
that fit — each expert's computation does not depend on which others share its call.
Inference only: the source hands over plain tensors, with no gradient.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from torch import nn

from .experts import DispatchImpl, choose_impl, grouped_experts, looped_experts


class ExpertSource(Protocol):
    """Where the weights of experts the model does not hold come from."""

    def fetch(
        self, layer: int, tier: str, experts: Sequence[int], uses: Sequence[int] | None = None
    ) -> AbstractContextManager[list[tuple[torch.Tensor, torch.Tensor]]]:
        """``(gate_up (2H, d), down (d, H))`` of each of ``experts``, in that order, on the
        compute device in the compute dtype, pinned (never evicted) until the context exits.
        ``uses``: how many rows routed to each (a prefill's counts tell a cache more than one
        access each would)."""
        ...

    def max_experts_at_once(self, layer: int, tier: str) -> int:
        """How many experts of this tier one :meth:`fetch` can hold (at least 1)."""
        ...

    def room(self, nbytes: int) -> AbstractContextManager[None]:
        """Room for ``nbytes`` more on the compute device beside the fetched experts while the
        context lasts (the stacked copy of a grouped matmul's weights)."""
        ...


class SourcedExperts(nn.Module):
    """A tier's experts in one layer, fetched from an :class:`ExpertSource` per call."""

    def __init__(self, source: ExpertSource, layer: int, tier: str, num_experts: int, d_model: int, hidden: int) -> None:
        super().__init__()
        self.source, self.layer, self.tier = source, layer, tier
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        # shapes for choose_impl's alignment check (meta: no memory)
        self._shape_gu = torch.empty(1, 2 * hidden, d_model, device="meta")
        self._shape_d = torch.empty(1, d_model, hidden, device="meta")

    def extra_repr(self) -> str:
        return f"layer={self.layer}, tier={self.tier!r}, experts={self.num_experts}, hidden={self.hidden} (fetched)"

    def forward(self, x: torch.Tensor, counts: list[int], impl: DispatchImpl = "auto") -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("experts served by a store are for inference; train with the experts in the model")
        if impl in ("auto", "padded_bmm"):
            impl = choose_impl(x, counts, False, self._shape_gu, self._shape_d)
        active = [e for e, n in enumerate(counts) if n]
        if not active:
            return x.new_zeros(0, self.d_model)
        outs = []
        row = 0
        at_once = self.source.max_experts_at_once(self.layer, self.tier)
        if impl == "grouped_mm":  # the fetched experts and their stacked copy must fit the source together
            at_once = max(at_once // 2, 1)
        for chunk in _chunks(active, at_once):
            chunk_counts = [counts[e] for e in chunk]
            rows = x[row : row + sum(chunk_counts)]
            row += rows.shape[0]
            with self.source.fetch(self.layer, self.tier, chunk, chunk_counts) as weights:
                if impl == "grouped_mm" and len(weights) == 1:  # a view: no copy
                    outs.append(grouped_experts(rows, chunk_counts, weights[0][0].unsqueeze(0), weights[0][1].unsqueeze(0)))
                elif impl == "grouped_mm":
                    nbytes = sum(gu.nbytes + d.nbytes for gu, d in weights)
                    with self.source.room(nbytes):
                        w_gu = torch.stack([gu for gu, _ in weights])
                        w_d = torch.stack([d for _, d in weights])
                        outs.append(grouped_experts(rows, chunk_counts, w_gu, w_d))
                        del w_gu, w_d
                else:
                    outs.append(looped_experts(rows, chunk_counts, [gu for gu, _ in weights], [d for _, d in weights], self.d_model))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    size = max(int(size), 1)
    for i in range(0, len(items), size):
        yield items[i : i + size]


def attach_expert_source(model: nn.Module, source: ExpertSource, tiers: Sequence[str] | None = None) -> list[tuple[int, str]]:
    """Replace the expert banks of ``tiers`` (default: every tier) in every MoE layer of
    ``model`` by :class:`SourcedExperts` asking ``source``; returns the (layer, tier) pairs
    replaced.  The banks' weights are dropped from the model (a bank on the meta device, as
    a model built without its experts has, is replaced the same way)."""
    from .experts import ExpertBank
    from .moe import TieredMoE

    replaced = []
    for block in model.layers:  # type: ignore[attr-defined]
        if not isinstance(block.ffn, TieredMoE):
            continue
        for name, bank in list(block.ffn.experts.items()):
            if tiers is not None and name not in tiers:
                continue
            if isinstance(bank, ExpertBank):
                block.ffn.experts[name] = SourcedExperts(source, block.layer, name, bank.num_experts, bank.d_model, bank.hidden)
                replaced.append((block.layer, name))
    return replaced
