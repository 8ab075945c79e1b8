"""bf16 expert compute: the padded ``bmm`` path, autocast, and fp32 left exactly as it was.

Tolerance for bf16 against an fp32 oracle: normwise relative error <= 1e-2.  bf16 keeps 8
significant bits (unit roundoff 2^-8 = 3.9e-3); inputs, weights, each matmul's output and the
SwiGLU are rounded once each, so a few roundoffs — well under 1e-2 — are expected, while a wrong
row, expert or weight gives errors of order 1.
"""

from __future__ import annotations

import pytest
import torch

from lite_llm import ModelConfig, RoutingConfig, TierConfig, build_model
from lite_llm.model.experts import HAS_GROUPED_MM, ExpertBank, dispatch, prefers_padded
from tests.model.references import dispatch_reference
from lite_llm.model.moe import TieredMoE
from lite_llm.model.padded import padding_pays

BF16_RTOL = 1e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise relative error of ``a`` against the reference ``b`` (in fp64)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _banks(gen: torch.Generator, d: int = 32) -> tuple[list[ExpertBank], list[int]]:
    banks = [ExpertBank(5, d, 24), ExpertBank(7, d, 16)]
    with torch.no_grad():
        for bank in banks:
            for p in bank.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return banks, [0, 5, 12]


def _routes(gen: torch.Generator, n: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    allowed = torch.tensor([0, 1, 3, 4, 5, 6, 7, 10, 11])  # experts 2, 8, 9 get nothing
    ids = allowed[torch.stack([torch.randperm(len(allowed), generator=gen)[:slots] for _ in range(n)])]
    ids[torch.rand(n, slots, generator=gen) < 0.2] = -1
    weights = torch.rand(n, slots, generator=gen) * (ids >= 0)
    return ids, weights


def _run(fn, x: torch.Tensor, weights: torch.Tensor, banks: list[ExpertBank], upstream: torch.Tensor):
    """Output and the gradients of x, the route weights and every bank parameter."""
    for bank in banks:
        bank.zero_grad(set_to_none=True)
    xr, wr = x.clone().requires_grad_(), weights.clone().requires_grad_()
    out = fn(xr, wr)
    (out.float() * upstream).sum().backward()
    return [out.detach(), xr.grad, wr.grad] + [p.grad.clone() for bank in banks for p in bank.parameters()]


def _bf16_copy(banks: list[ExpertBank]) -> list[ExpertBank]:
    copies = []
    for bank in banks:
        c = ExpertBank(bank.num_experts, bank.d_model, bank.hidden).to(torch.bfloat16)
        with torch.no_grad():
            c.gate_up_proj.copy_(bank.gate_up_proj)
            c.down_proj.copy_(bank.down_proj)
        copies.append(c)
    return copies


@pytest.mark.parametrize("impl", ["padded_bmm", "auto"] + (["grouped_mm", "loop"] if HAS_GROUPED_MM else ["loop"]))
def test_bf16_matches_the_fp32_reference_forward_and_gradients(impl):
    gen = torch.Generator().manual_seed(0)
    banks, offsets = _banks(gen)
    ids, weights = _routes(gen, 300, slots=4)
    x = torch.randn(300, 32, generator=gen)
    upstream = torch.randn(300, 32, generator=gen)
    ref = _run(lambda xr, wr: dispatch_reference(xr, ids, wr, banks, offsets), x, weights, banks, upstream)
    low_banks = _bf16_copy(banks)
    low = _run(lambda xr, wr: dispatch(xr.bfloat16(), ids, wr, low_banks, offsets, impl), x, weights, low_banks, upstream)
    assert low[0].dtype == torch.bfloat16
    names = ["output", "grad x", "grad route weights"] + [f"grad {n}" for n in ("gate_up 0", "down 0", "gate_up 1", "down 1")]
    for name, a, b in zip(names, low, ref):
        if name == "grad route weights":
            a, b = a * (ids >= 0), b * (ids >= 0)
        assert _rel(a, b) <= BF16_RTOL, f"{name}: relative error {_rel(a, b):.2e}"
    # Experts that receive no route get exactly zero gradient on every path.
    assert not low_banks[0].gate_up_proj.grad[2].any() and not low_banks[1].down_proj.grad[8 - 5].any()


def test_autocast_is_the_bf16_path_on_bf16_cast_weights_bitwise():
    """Under autocast the bank is cast once and the experts run in bf16: output and gradients
    equal, bit for bit, the pure-bf16 computation on the cast weights (the fp32 master
    weights get the bf16 gradient, widened)."""
    gen = torch.Generator().manual_seed(1)
    banks, offsets = _banks(gen)
    ids, weights = _routes(gen, 200, slots=3)
    x = torch.randn(200, 32, generator=gen)
    upstream = torch.randn(200, 32, generator=gen)

    def autocast_run(xr, wr):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return dispatch(xr, ids, wr, banks, offsets)

    mixed = _run(autocast_run, x, weights, banks, upstream)
    low_banks = _bf16_copy(banks)
    low = _run(lambda xr, wr: dispatch(xr.bfloat16(), ids, wr, low_banks, offsets), x, weights, low_banks, upstream)
    assert mixed[0].dtype == torch.bfloat16
    assert torch.equal(mixed[0], low[0])
    assert torch.equal(mixed[1], low[1].float())  # x was fp32: its gradient is the bf16 one widened
    assert torch.equal(mixed[2], low[2])
    for a, b in zip(mixed[3:], low[3:]):
        assert a.dtype == torch.float32 and torch.equal(a, b.float())


def test_fp32_auto_never_takes_the_padded_path_and_stays_bitwise():
    """fp32 keeps its exact op sequence: auto equals the path it took before padded_bmm existed."""
    gen = torch.Generator().manual_seed(2)
    banks, offsets = _banks(gen)
    ids, weights = _routes(gen, 300, slots=4)
    x = torch.randn(300, 32, generator=gen, requires_grad=True)
    assert not prefers_padded(x, ids, offsets, allowed=True)
    assert prefers_padded(x.detach().bfloat16().requires_grad_(), ids, offsets, allowed=True)
    old = "grouped_mm" if HAS_GROUPED_MM else "loop"  # what ExpertBank.choose gives these rows
    assert torch.equal(dispatch(x, ids, weights, banks, offsets), dispatch(x, ids, weights, banks, offsets, old))
    padded = dispatch(x, ids, weights, banks, offsets, "padded_bmm")
    torch.testing.assert_close(padded, dispatch(x, ids, weights, banks, offsets, old), atol=1e-5, rtol=1e-5)


def test_auto_skips_padding_for_decoding_and_for_lopsided_routes():
    offsets = [0, 64]
    ids = torch.randint(0, 64, (512, 4), generator=torch.Generator().manual_seed(3))
    x = torch.zeros(512, 8, dtype=torch.bfloat16, requires_grad=True)
    assert prefers_padded(x, ids, offsets, allowed=True)
    assert not prefers_padded(x, ids, offsets)  # auto does not pad on CPUs (experts.AUTO_PADDED, measured)
    with torch.no_grad():
        assert not prefers_padded(x[:4], ids[:4], offsets, allowed=True)  # decoding: the loop over 4 experts
        assert prefers_padded(x, ids, offsets, allowed=True)  # a no-grad prefill of many rows still pads
    # One expert with every route but one, the rest of 64 with at most one each: 64x padding.
    lopsided = [2047] + [1] + [0] * 62
    assert not padding_pays(lopsided, offsets)
    assert padding_pays([32] * 64, offsets)  # even load: 33/32 padding


def _one_tier_moe(experts: int, d: int = 64) -> TieredMoE:
    cfg = ModelConfig(
        d_model=d, n_layers=1, n_heads=1, intermediate_size=4 * 32,
        tiers=[TierConfig(name="tier_0", num_groups=1, experts_per_group=experts, expert_hidden=32)],
        routing=RoutingConfig(k_tier=1, k_group=1, k_expert=4),
    )
    moe = TieredMoE(cfg, layer=0)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(4))
    return moe


def test_router_logits_stay_fp32_under_autocast():
    """Same fp32 input, autocast on or off: bitwise the same routes and route weights."""
    moe = _one_tier_moe(16)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(5))
    allowed = torch.ones(1, dtype=torch.bool)
    plain = moe.router(x, allowed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = moe.router(x, allowed)
    assert torch.equal(plain.expert_ids, mixed.expert_ids)
    assert mixed.weights.dtype == torch.float32 and torch.equal(plain.weights, mixed.weights)


def test_tiny_model_trains_under_autocast_close_to_fp32():
    """A forward+backward of the tiny preset under bf16 autocast: loss and gradients near fp32's."""
    cfg = ModelConfig.from_preset("tiny")
    ids = torch.randint(0, cfg.vocab_size, (4, 64), generator=torch.Generator().manual_seed(6))

    def grads(bf16: bool) -> tuple[float, torch.Tensor]:
        model = build_model(cfg, seed=0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    loss32, g32 = grads(False)
    loss16, g16 = grads(True)
    assert abs(loss16 - loss32) <= BF16_RTOL * abs(loss32)
    assert _rel(g16, g32) <= 5 * BF16_RTOL  # through several layers of bf16 activations
