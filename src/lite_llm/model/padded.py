"""Expert compute as padded batched matmuls: one ``bmm`` per tier bank, for bf16/fp16 on CPU.

Why it exists: on CPU, ``grouped_mm`` is a loop of one ``mm`` per expert, and small bf16
``mm``s are inefficient — at E=64 (256 rows per expert, d=512, H=1024) a loop of 64 forward
``mm``s ran at ~25 GFLOP/s in bf16 on the AVX512-BF16 EPYC of these machines, one ``bmm`` of
the same shapes at ~59 and one big ``mm`` of the same FLOPs at ~70; at E=512 (32 rows each)
``bmm`` was 8.5x faster than ``grouped_mm`` (BENCHMARKS.md, "bf16 on CPU").  ``bmm`` needs
every expert to have the same row count, so each tier's rows are padded to its busiest
expert's count (plus one zero row, below).  The padding is wasted FLOPs; ``auto`` takes this
path only while the padded rows stay within what that speed buys back (``PADDED_MAX_WASTE``).

Layout: route ``r`` (token ``n``, slot ``s``, flat id ``n * slots + s``) of expert ``e`` of tier
``t`` sits at row ``base[t] + e * C[t] + rank`` of one padded buffer, where ``rank`` is its
place among that expert's routes in token order (a stable sort, as the grouped path uses).
Combining goes through the (N, slots) layout — gather every slot's output row, scale by the
route weight, sum over the slots — so neither direction needs ``index_add_`` (a serial scatter:
~150 ms at 16,384 x 512 against ~16 ms for a bf16 gather on these machines).  Unused slots
(``-1``) read one row that stays exactly zero in both directions: the padding row of the
first tier's first expert, whose input is zero (so its SwiGLU output is exactly zero) and
whose output gradient is the unused slot's zero weight times the upstream gradient.

fp32 never takes this path unless asked for it (``impl="padded_bmm"``): ``bmm``'s summation
order differs from ``mm``'s, and CPU fp32 training must stay bitwise what it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from .experts import ExpertBank

# How much padding still pays, by the mean rows per active expert: measured forward speed-ups
# of one bf16 bmm over grouped_mm at the same shapes (d=512, H=1024, 2 cores, AVX512-BF16):
# 2.3x at 256 rows, 2.9x at 128, 3.8x at 64, 8.5x at 32; 1.06x at 2,048 (where the loop is as
# fast).  Each limit sits below the speed-up measured at the smallest row count of its band.
PADDED_MAX_WASTE: tuple[tuple[int, float], ...] = ((256, 2.0), (128, 2.5), (64, 3.0), (0, 4.0))


def padding_pays(counts: list[int], tier_offsets: list[int]) -> bool:
    """Whether the padded buffer for ``counts`` (routes per flat expert) stays within the waste
    that ``bmm``'s speed over ``grouped_mm`` buys back (``PADDED_MAX_WASTE``)."""
    routed = sum(counts)
    active = sum(1 for n in counts if n)
    if not routed:
        return False
    mean_rows = routed / active
    limit = next(w for rows, w in PADDED_MAX_WASTE if mean_rows >= rows)
    return padded_rows(counts, tier_offsets) <= limit * routed


def padded_rows(counts: list[int], tier_offsets: list[int]) -> int:
    """Rows of the padded buffer for per-expert route ``counts`` (tiers without routes: none)."""
    total = 0
    for a, b in zip(tier_offsets[:-1], tier_offsets[1:]):
        busiest = max(counts[a:b], default=0)
        if busiest:
            total += (b - a) * (busiest + 1)
    return total


def padded_dispatch(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    banks: list["ExpertBank | None"],
    tier_offsets: list[int],
    activation: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``sum_k weights[n,k] * expert[expert_ids[n,k]](x[n])`` through one ``bmm`` pair per tier.

    ``activation`` maps the fused ``[gate | up]`` rows to the hidden ones (the experts' SwiGLU,
    passed in so that this module needs nothing of ``experts``).

    Same contract as ``experts.dispatch``; the result is in ``x``'s dtype, and the expert
    weights are cast to it once per call (under autocast: one bf16 copy of each bank per
    forward, instead of one cast per expert and matmul).
    """
    n_tokens, slots = expert_ids.shape
    d = x.shape[-1]
    flat = expert_ids.reshape(-1)
    used = (flat >= 0).nonzero().flatten()
    ids = flat[used]
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    counts_t = torch.bincount(ids, minlength=tier_offsets[-1])
    counts = counts_t.tolist()

    # Capacity per tier (busiest expert + one zero row) and each flat expert's first row.
    base: list[int] = []
    tiers: list[tuple[int, int, int]] = []  # (tier, experts, capacity) of tiers with routes
    row = 0
    for t, (a, b) in enumerate(zip(tier_offsets[:-1], tier_offsets[1:])):
        busiest = max(counts[a:b], default=0)
        capacity = busiest + 1 if busiest else 0
        base.extend(row + e * capacity for e in range(b - a))
        if capacity:
            if banks[t] is None:
                raise RuntimeError(f"tokens were routed to tier #{t}, whose experts are not loaded")
            tiers.append((t, b - a, capacity))
        row += (b - a) * capacity
    if not tiers:
        return x.new_zeros(n_tokens, d)
    rows_total = row
    zero_row = tiers[0][2] - 1  # the first routed tier's first expert's padding row

    starts = counts_t.cumsum(0) - counts_t
    rank = torch.arange(sorted_ids.numel(), device=x.device) - starts[sorted_ids]
    pos = torch.tensor(base, device=x.device)[sorted_ids] + rank  # padded row of each sorted route
    pos_full = torch.full((n_tokens * slots,), zero_row, dtype=torch.long, device=x.device)
    pos_full[used[order]] = pos
    tokens = used[order] // slots

    xp = _ToPadded.apply(x, tokens, pos, pos_full, rows_total, slots)
    outs = []
    for (t, experts, capacity), xt in zip(tiers, xp.split([e * c for _, e, c in tiers])):
        bank = banks[t]
        w_gu, w_d = bank.gate_up_proj, bank.down_proj
        if w_gu.dtype != x.dtype:
            w_gu, w_d = w_gu.to(x.dtype), w_d.to(x.dtype)
        h = _BankMatmul.apply(xt.view(experts, capacity, d), w_gu)
        outs.append(_BankMatmul.apply(activation(h), w_d).view(experts * capacity, d))
    y = torch.cat(outs) if len(outs) > 1 else outs[0]
    per_slot = _GatherRows.apply(y, pos_full).view(n_tokens, slots, d)
    return (per_slot * weights.to(x.dtype)[..., None]).sum(1)


class _ToPadded(torch.autograd.Function):
    """Rows of ``x`` into the zero-padded expert buffer; backward sums each token's slots.

    Forward: ``out[pos[i]] = x[tokens[i]]`` (``pos`` distinct), zeros elsewhere.  Backward:
    ``grad_x[n] = sum_s grad_out[pos_full[n * slots + s]]`` — a gather and a sum over the
    slots, not ``index_add_``; unused slots read the zero row, whose gradient is exactly 0.
    """

    @staticmethod
    def forward(ctx, x, tokens, pos, pos_full, rows_total: int, slots: int):  # type: ignore[override]
        ctx.save_for_backward(pos_full)
        ctx.slots = slots
        out = x.new_zeros(rows_total, x.shape[-1])
        out.index_copy_(0, pos, x.index_select(0, tokens))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (pos_full,) = ctx.saved_tensors
        d = grad.shape[-1]
        grad_x = grad.index_select(0, pos_full).view(-1, ctx.slots, d).sum(1)
        return grad_x, None, None, None, None, None


class _GatherRows(torch.autograd.Function):
    """``y[pos_full]`` with a backward that copies instead of accumulating.

    Every used slot reads its own row; unused slots all read the zero row, and the gradient
    they carry back is exactly zero (their route weight is 0), so writing those duplicates
    with ``index_copy_`` gives the same result as ``index_add_`` without its serial scatter.
    """

    @staticmethod
    def forward(ctx, y, pos_full):  # type: ignore[override]
        ctx.save_for_backward(pos_full)
        ctx.rows = y.shape[0]
        return y.index_select(0, pos_full)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (pos_full,) = ctx.saved_tensors
        grad_y = grad.new_zeros(ctx.rows, grad.shape[-1])
        grad_y.index_copy_(0, pos_full, grad)
        return grad_y, None


class _BankMatmul(torch.autograd.Function):
    """``x @ w.transpose(1, 2)`` per expert (``bmm``), with a backward that writes the weight
    gradient in the weight's own layout.

    Autograd's ``bmm`` backward returns the gradient of ``w.transpose(1, 2)``, i.e. a
    transposed view, and ``AccumulateGrad`` then copies it into ``w``'s contiguous layout: at
    E=64 that strided copy of the (64, 2048, 512) gradient cost more than the ``bmm`` that made
    it.  Here ``grad_w = grad.transpose(1, 2) @ x`` comes out contiguous.
    """

    @staticmethod
    def forward(ctx, x, w):  # type: ignore[override]
        ctx.save_for_backward(x, w)
        return torch.bmm(x, w.transpose(1, 2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, w = ctx.saved_tensors
        grad_x = torch.bmm(grad, w) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w
