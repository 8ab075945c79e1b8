"""Expert weight banks and the dispatch kernel.

Each tier's experts in a layer are two 3-D parameters, ``gate_up_proj`` (E, 2H, d) — gate and
up fused, gate first, as in Hugging Face's Mixtral — and ``down_proj`` (E, d, H).  One bank per
tier keeps tiers separable (frozen, loaded, skipped or offloaded on their own).

Dispatch (see DESIGN.md, "Dispatch"): sort the (token, expert) routes once by flat expert id;
the rows of each tier are then one contiguous slice, run through that tier's bank with two
``grouped_mm`` calls and SwiGLU between; scale by the route weights and ``index_add_`` back.
A tier that receives no route is never touched, so its weights need not even be present.

Implementations of the expert compute, chosen by ``impl``:

* ``grouped_mm`` — the fast path for training and large batches;
* ``loop`` — one matmul per expert that has rows, over ``unbind`` views (never ``W[e]`` under
  autograd: each use would allocate a full-size gradient); the fallback for torches without
  ``grouped_mm`` or for unaligned shapes, and the reference the fast path is tested against;
* ``padded_bmm`` — every tier's rows padded to its busiest expert and run as one ``bmm`` pair
  (``model/padded.py``); for CPUs whose bf16 ``bmm`` is much faster than a loop of small
  ``mm``s, at the price of the padding's FLOPs;
* ``auto`` — in bf16/fp16 on CPU where ``AUTO_PADDED`` allows it, ``padded_bmm`` unless decoding
  or the padding would cost more than ``bmm`` gains (``padded.PADDED_MAX_WASTE``); otherwise ``grouped_mm`` when
  available and aligned; the per-active-expert loop when no gradient is needed and only a few rows are
  routed (decoding), so per-token cost does not grow with the number of experts, and on CPU
  when the active experts average >= 1,024 rows each (few large matmuls, where the loop
  measured faster).  fp32 never takes ``padded_bmm`` by itself: CPU fp32 training stays
  bitwise what it was before that path existed.

Under autocast (``torch.autocast``, as ``TrainConfig.bf16`` trains), the rows and each bank are
cast to the autocast dtype once per call and the experts run in it with autocast off: without
this, ``grouped_mm`` (not on autocast's CPU list) ran in fp32 while the loop's ``F.linear``
calls ran in bf16, each casting its own expert.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .padded import padded_dispatch, padding_pays
from .rowwise import linear, row_invariant_enabled

DispatchImpl = Literal["auto", "grouped_mm", "loop", "padded_bmm"]
HAS_GROUPED_MM = hasattr(F, "grouped_mm")
DECODE_ROWS = 64  # at most this many routed rows without autograd -> loop over the active experts only
# On CPU, few experts with many rows each run faster as one matmul per expert than through
# grouped_mm (whose CPU kernel is itself a loop, with more work around it): at E=8 (2,048 rows
# per expert) the loop took 0.94x grouped_mm's time for forward+backward; at E=64 (256 rows)
# grouped_mm was 1.6x faster (benchmarks/moe_dispatch.py, BENCHMARKS.md).
CPU_LOOP_ROWS_PER_EXPERT = 1024


class Experts(Protocol):
    """What dispatch needs of a tier's experts: rows sorted by expert in, their outputs out.
    :class:`ExpertBank` holds the weights; an expert source (:mod:`.expert_source`) fetches
    the ones a step routed to."""

    def __call__(self, x: torch.Tensor, counts: list[int], impl: DispatchImpl = "auto") -> torch.Tensor: ...


class ExpertBank(nn.Module):
    """All SwiGLU experts of one tier in one layer."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * hidden, d_model, device=device))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, d_model, hidden, device=device))

    def forward(self, x: torch.Tensor, counts: list[int], impl: DispatchImpl = "auto") -> torch.Tensor:
        """Run rows ``x`` (sorted by expert; ``counts[e]`` rows for expert e, summing to all of
        ``x``'s rows) through their experts."""
        if impl == "auto" or impl == "padded_bmm":  # padded_bmm is chosen across banks, in dispatch()
            impl = self.choose(x, counts)
        if impl == "grouped_mm":
            return self._grouped(x, counts)
        return self._loop(x, counts)

    def choose(self, x: torch.Tensor, counts: list[int]) -> DispatchImpl:
        """The implementation ``auto`` runs for rows ``x`` split as ``counts`` (see the module docstring)."""
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.gate_up_proj.requires_grad)
        return choose_impl(x, counts, needs_grad, self.gate_up_proj, self.down_proj)

    def _grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return grouped_experts(x, counts, self.gate_up_proj, self.down_proj)

    def _loop(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gate_up_proj.requires_grad:
            gate_ups, downs = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        else:  # plain views, no autograd: indexing copies nothing
            gate_ups, downs = self.gate_up_proj, self.down_proj
        return looped_experts(x, counts, gate_ups, downs, self.d_model)


def choose_impl(x: torch.Tensor, counts: list[int], needs_grad: bool, *weights: torch.Tensor) -> DispatchImpl:
    """The implementation ``auto`` runs for rows ``x`` split as ``counts`` over experts of
    ``weights``' shapes (see the module docstring).  A function of the rows and shapes only,
    so an expert source that hands over a few experts at a time picks what the bank would.
    Under :func:`~.rowwise.row_invariant` (a server's batched decode step) always the loop:
    its products are the only ones computed row by row as a lone token's are."""
    if not needs_grad and (x.shape[0] <= DECODE_ROWS or row_invariant_enabled()):
        return "loop"
    if x.device.type == "cpu" and x.shape[0] >= CPU_LOOP_ROWS_PER_EXPERT * max(sum(1 for n in counts if n), 1):
        return "loop"
    if HAS_GROUPED_MM and _aligned(x, *weights):
        return "grouped_mm"
    return "loop"


def grouped_experts(x: torch.Tensor, counts: list[int], w_gu: torch.Tensor, w_d: torch.Tensor) -> torch.Tensor:
    """Rows ``x`` (``counts[e]`` for expert e, in order) through the stacked experts ``w_gu``
    (E, 2H, d) and ``w_d`` (E, d, H) with two ``grouped_mm`` calls."""
    offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    if x.dtype != w_gu.dtype:
        w_gu, w_d = w_gu.to(x.dtype), w_d.to(x.dtype)
    h = F.grouped_mm(x, w_gu.transpose(-2, -1), offs=offs)
    return F.grouped_mm(swiglu(h), w_d.transpose(-2, -1), offs=offs)


def looped_experts(
    x: torch.Tensor, counts: list[int], gate_ups: Sequence[torch.Tensor], downs: Sequence[torch.Tensor], d_model: int
) -> torch.Tensor:
    """Rows ``x`` (``counts[e]`` for expert e, in order) through expert e's ``gate_ups[e]``
    (2H, d) and ``downs[e]`` (d, H), one pair of matmuls per expert that has rows."""
    outs = [
        linear(swiglu(linear(rows, gate_ups[e].to(x.dtype))), downs[e].to(x.dtype))
        for e, rows in nonempty_groups(x, counts)
    ]
    if not outs:
        return x.new_zeros(0, d_model)
    return torch.cat(outs)


def nonempty_groups(x: torch.Tensor, sizes: list[int]) -> list[tuple[int, torch.Tensor]]:
    """``(i, rows)`` for each group ``i`` with ``sizes[i] > 0`` rows, consecutive in ``x``.

    ``split``, not slicing: split's backward is one ``cat``, while each slice's backward
    zero-fills a gradient the size of all of ``x`` (a fill and an add per group); only the
    non-empty groups (decoding at E=512 touches 4 experts, not 512 views); and ``x`` itself
    when one group has every row (even a one-piece split copies in its backward).
    """
    active = [i for i, n in enumerate(sizes) if n]
    if len(active) == 1:
        return [(active[0], x)]
    return list(zip(active, x.split([sizes[i] for i in active])))


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused ``[gate | up]`` tensor (..., 2H) -> (..., H)."""
    if torch.is_grad_enabled() and h.requires_grad:
        return _FusedSwiGLU.apply(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class _FusedSwiGLU(torch.autograd.Function):
    """SwiGLU over the fused tensor, with a backward that writes the (rows, 2H) gradient once.

    Autograd's own version (``h.chunk(2)``, silu, mul) computes the two halves' gradients as
    separate tensors and ``cat``s them (``SplitBackward0``), and keeps ``silu(gate)`` alive for
    the backward.  This backward runs the same ops autograd would (``silu_backward(grad * up,
    gate)`` and ``grad * silu(gate)``) straight into the two halves of one buffer, so gradients
    are bitwise equal (tested), without the copy; it saves ``h`` only and recomputes
    ``silu(gate)`` (one (rows, H) activation less per layer).  Forward+backward at
    16,384 x 2,048 fp32 on 2 cores: 81 ms against autograd's 88.  Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(h)
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad, F.silu(gate), out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_h


def _aligned(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned row strides and a float dtype it supports."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    per_16 = 16 // x.element_size()
    return all(w.shape[-1] % per_16 == 0 and w.shape[-2] % per_16 == 0 for w in weights) and x.shape[-1] % per_16 == 0


def dispatch(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    banks: Sequence[Experts | None],
    tier_offsets: list[int],
    impl: DispatchImpl = "auto",
) -> torch.Tensor:
    """Combine ``sum_k weights[n,k] * expert[expert_ids[n,k]](x[n])`` for every token n.

    ``expert_ids`` (N, slots) hold flat ids (``-1`` = unused slot); ``banks[t]`` serves flat ids
    ``tier_offsets[t] .. tier_offsets[t+1]``.  Returns (N, d) in ``x``'s dtype, or in the
    autocast dtype when autocast is on and ``x`` is fp32 (as a ``Linear`` would).
    """
    return in_autocast_dtype(x, lambda rows: _dispatch(rows, expert_ids, weights, banks, tier_offsets, impl))


def in_autocast_dtype(x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``run(x)``, with fp32 ``x`` cast to the autocast dtype once and autocast off inside, so
    every expert runs in that dtype (see the module docstring); plain ``run(x)`` otherwise."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype == torch.float32:
        x = x.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return run(x)
    return run(x)


LOW_PRECISION = (torch.bfloat16, torch.float16)
# Whether ``auto`` may take ``padded_bmm`` on a CPU.  Off: measured on an AVX512-BF16 CPU without
# AMX (AMD EPYC, 2 cores, d=512, H=1024, 4,096 tokens, k=4; BENCHMARKS.md, issue 17) padded_bmm
# was 0.94-1.13x grouped_mm's forward time and 1.11-1.18x its forward+backward at E=8/64/512, so
# the whole-layer training step ran 1.15-1.30x slower with it.  No AMX machine has measured it
# since it was written; turn it on only with such a measurement.
AUTO_PADDED = False


def prefers_padded(x: torch.Tensor, expert_ids: torch.Tensor, tier_offsets: list[int], *, allowed: bool | None = None) -> bool:
    """Whether ``auto`` runs ``padded_bmm`` for these rows and routes (see the module docstring);
    ``allowed`` overrides ``AUTO_PADDED`` (tests check the rule itself with it)."""
    if not (AUTO_PADDED if allowed is None else allowed) or row_invariant_enabled():
        return False
    if x.dtype not in LOW_PRECISION or x.device.type != "cpu":
        return False
    if not torch.is_grad_enabled() and x.shape[0] <= DECODE_ROWS:
        return False  # decoding: the loop touches the active experts only
    ids = expert_ids[expert_ids >= 0]
    return padding_pays(torch.bincount(ids, minlength=tier_offsets[-1]).tolist(), tier_offsets)


def _dispatch(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    banks: Sequence[Experts | None],
    tier_offsets: list[int],
    impl: DispatchImpl,
) -> torch.Tensor:
    held = all(bank is None or isinstance(bank, ExpertBank) for bank in banks)  # padded_bmm needs the whole banks
    if held and (impl == "padded_bmm" or (impl == "auto" and prefers_padded(x, expert_ids, tier_offsets))):
        return padded_dispatch(x, expert_ids, weights, banks, tier_offsets, swiglu)
    n_tokens, slots = expert_ids.shape
    flat = expert_ids.reshape(-1)
    used = (flat >= 0).nonzero().flatten()
    flat, token_of_route = flat[used], used // slots
    route_weights = weights.reshape(-1)[used]
    order = torch.argsort(flat, stable=True)
    rows = token_of_route[order]
    counts = torch.bincount(flat, minlength=tier_offsets[-1]).tolist()
    xs = x.index_select(0, rows)
    tier_counts = [counts[a:b] for a, b in zip(tier_offsets[:-1], tier_offsets[1:])]
    outs = []
    for t, tier_xs in nonempty_groups(xs, [sum(c) for c in tier_counts]):
        if banks[t] is None:
            raise RuntimeError(f"tokens were routed to tier #{t}, whose experts are not loaded")
        outs.append(banks[t](tier_xs, tier_counts[t], impl))
    out = torch.zeros_like(x)
    if outs:
        ys = torch.cat(outs) if len(outs) > 1 else outs[0]
        ys = ys * route_weights[order].to(ys.dtype)[:, None]
        out.index_add_(0, rows, ys.to(x.dtype))
    return out


