"""Dispatch: the grouped_mm path and the loop path against a slow per-token reference."""

from __future__ import annotations

import pytest
import torch

from lite_llm.model.experts import HAS_GROUPED_MM, ExpertBank, dispatch, swiglu

from tests.model.references import dispatch_reference

pytestmark = pytest.mark.skipif(not HAS_GROUPED_MM, reason="this torch has no torch.nn.functional.grouped_mm")


def _banks(gen: torch.Generator, d: int) -> tuple[list[ExpertBank], list[int]]:
    banks = [ExpertBank(5, d, 24), ExpertBank(7, d, 16)]
    with torch.no_grad():
        for bank in banks:
            for p in bank.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return banks, [0, 5, 12]


def _routes(gen: torch.Generator, n: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Never route to experts 2 (tier 0) and 8, 9 (tier 1): empty experts inside both banks.
    allowed = torch.tensor([0, 1, 3, 4, 5, 6, 7, 10, 11])
    ids = allowed[torch.stack([torch.randperm(len(allowed), generator=gen)[:slots] for _ in range(n)])]
    ids[torch.rand(n, slots, generator=gen) < 0.2] = -1  # unused slots
    weights = torch.rand(n, slots, generator=gen) * (ids >= 0)
    return ids, weights


@pytest.mark.parametrize("impl", ["grouped_mm", "loop", "auto", "padded_bmm"])
def test_dispatch_matches_reference_forward_and_all_gradients(impl):
    gen = torch.Generator().manual_seed(0)
    d, n = 16, 37
    banks, offsets = _banks(gen, d)
    ids, weights = _routes(gen, n, slots=4)
    x = torch.randn(n, d, generator=gen)
    upstream = torch.randn(n, d, generator=gen)

    def run(fn):
        for bank in banks:
            bank.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        wr = weights.clone().requires_grad_()
        out = fn(xr, ids, wr)
        (out * upstream).sum().backward()
        grads = [p.grad.clone() for bank in banks for p in bank.parameters()]
        return out.detach(), xr.grad, wr.grad, grads

    fast = run(lambda xr, i, wr: dispatch(xr, i, wr, banks, offsets, impl))
    slow = run(lambda xr, i, wr: dispatch_reference(xr, i, wr, banks, offsets))
    torch.testing.assert_close(fast[0], slow[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[2] * (ids >= 0), slow[2] * (ids >= 0), atol=1e-5, rtol=1e-5)
    for a, b in zip(fast[3], slow[3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Empty experts get exactly zero gradient.
    assert not banks[0].gate_up_proj.grad[2].any()
    assert not banks[1].down_proj.grad[8 - 5].any() and not banks[1].down_proj.grad[9 - 5].any()


def test_untouched_tier_needs_no_weights():
    """A tier with no routes is never read: it may be absent (not loaded / offloaded)."""
    gen = torch.Generator().manual_seed(1)
    banks, offsets = _banks(gen, 16)
    ids = torch.tensor([[0, 3], [4, -1]])
    weights = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    x = torch.randn(2, 16, generator=gen)
    with_bank = dispatch(x, ids, weights, banks, offsets)
    without = dispatch(x, ids, weights, [banks[0], None], offsets)
    assert torch.equal(with_bank, without)
    with pytest.raises(RuntimeError, match="whose experts are not loaded"):
        dispatch(x, torch.tensor([[6, -1], [0, -1]]), weights, [banks[0], None], offsets)


def test_bf16_grouped_path_runs_and_stays_close():
    gen = torch.Generator().manual_seed(2)
    banks, offsets = _banks(gen, 16)
    ids, weights = _routes(gen, 64, slots=2)
    x = torch.randn(64, 16, generator=gen)
    ref = dispatch(x, ids, weights, banks, offsets, "grouped_mm")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = dispatch(x.bfloat16(), ids, weights, banks, offsets, "grouped_mm")
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=0.05, rtol=0.05)


def test_auto_picks_the_loop_for_few_large_experts_on_cpu():
    """auto: the per-expert loop when the active experts average >= CPU_LOOP_ROWS_PER_EXPERT rows
    (measured faster on CPU), grouped_mm for many small groups, the loop for decode."""
    from lite_llm.model.experts import CPU_LOOP_ROWS_PER_EXPERT

    bank = ExpertBank(8, 16, 16)
    big = torch.zeros(2 * CPU_LOOP_ROWS_PER_EXPERT, 16, requires_grad=True)
    assert bank.choose(big, [CPU_LOOP_ROWS_PER_EXPERT, CPU_LOOP_ROWS_PER_EXPERT] + [0] * 6) == "loop"
    spread = [big.shape[0] // 8] * 8  # 8 active experts, a quarter of the threshold each
    assert bank.choose(big, spread) == "grouped_mm"
    with torch.no_grad():
        assert bank.choose(torch.zeros(4, 16), [1, 3, 0, 0, 0, 0, 0, 0]) == "loop"


def test_fused_swiglu_is_bitwise_autograds_own_chunk_silu_mul():
    """The fused backward must give exactly what autograd gives for chunk + silu + mul."""
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(37, 2 * 24, generator=gen) * 3
    grad = torch.randn(37, 24, generator=gen)
    fused_in = h.clone().requires_grad_()
    out = swiglu(fused_in)
    out.backward(grad)
    plain_in = h.clone().requires_grad_()
    gate, up = plain_in.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    expected.backward(grad)
    assert torch.equal(out, expected)
    assert torch.equal(fused_in.grad, plain_in.grad)
    with torch.no_grad():  # inference takes the plain expression
        assert torch.equal(swiglu(h), expected)
