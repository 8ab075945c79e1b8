"""CUDA checks: the dispatch kernels and a tiny two-tier model on the GPU.

Skipped where CUDA is absent (CI runs on machines without a GPU).  The dispatch tests compare
the CUDA ``grouped_mm`` path (and the ``loop``/``auto`` paths) against the slow per-token
reference ``dispatch_reference`` run on the CPU in float64 on the same (already rounded)
weights and inputs, for the forward output and every gradient (input, route weights, both
weight banks), with empty experts inside both banks.  The model tests run the tiny preset
forward+backward under bf16 autocast and compare its fp32 CUDA logits with the CPU ones.
"""

from __future__ import annotations

import math

import pytest
import torch

from lite_llm import ModelConfig, build_model
from lite_llm.model.experts import (
    HAS_GROUPED_MM,
    ExpertBank,
    dispatch,
)
from tests.model.references import dispatch_reference
from tests.model.test_dispatch import _banks, _routes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
needs_grouped_mm = pytest.mark.skipif(not HAS_GROUPED_MM, reason="this torch has no torch.nn.functional.grouped_mm")

CUDA = torch.device("cuda")
# fp32: the kernels differ from the float64 reference only by fp32 rounding of sums of a few
# dozen terms (d=16, H<=24, values O(1)), i.e. ~1e-6 relative; 1e-5 is tight but safe.
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}
# bf16: 8 significant bits (unit roundoff 2^-9 ~ 0.002).  The hidden activations and the
# outputs are rounded to bf16 between the two matmuls, so a few roundoffs accumulate: the
# largest error may reach ~1% of the tensor's largest magnitude, the overall (norm) error a
# fraction of that.
BF16_MAX_REL = 2e-2
BF16_NORM_REL = 1e-2


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 must mean fp32: TF32 matmuls (10-bit mantissa) would break the fp32 tolerances."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, max_rel: float, norm_rel: float, what: str) -> None:
    """Errors relative to the tensor's scale (bf16 rounding is relative to magnitude)."""
    a, e = actual.double().cpu(), expected.double().cpu()
    scale = e.abs().max().item()
    assert scale > 0, f"{what}: the reference is all zeros, nothing is compared"
    max_err = (a - e).abs().max().item()
    norm_err = ((a - e).norm() / e.norm()).item()
    assert max_err <= max_rel * scale, f"{what}: max error {max_err:.3g} > {max_rel} x max |ref| {scale:.3g}"
    assert norm_err <= norm_rel, f"{what}: relative norm error {norm_err:.3g} > {norm_rel}"


def _run(fn, banks, x, ids, weights, upstream):
    """Forward + backward of ``fn``; returns the output and every gradient (missing ones as zeros)."""
    for bank in banks:
        bank.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_()
    wr = weights.clone().requires_grad_()
    out = fn(xr, ids, wr)
    (out.float() * upstream).sum().backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for bank in banks for p in bank.parameters()]
    return out.detach(), xr.grad, wr.grad, grads


def _reference(banks, offsets, x, ids, weights, upstream, param_dtype=None):
    """The per-token loop on the CPU in float64, on the given weights rounded to ``param_dtype``."""
    ref_banks = []
    for bank in banks:
        b = ExpertBank(bank.num_experts, bank.d_model, bank.hidden).double()
        with torch.no_grad():
            for p, q in zip(b.parameters(), bank.parameters()):
                p.copy_(q.detach().to(param_dtype or q.dtype).cpu().double())
        ref_banks.append(b)
    return _run(
        lambda xr, i, wr: dispatch_reference(xr, i, wr, ref_banks, offsets),
        ref_banks, x.cpu().double(), ids.cpu(), weights.cpu().double(), upstream.cpu().double(),
    )


def _setup(seed: int, n: int, slots: int, pattern: str):
    gen = torch.Generator().manual_seed(seed)
    d = 16
    banks, offsets = _banks(gen, d)  # tiers of 5 and 7 experts, d=16, H=24 and 16
    ids, weights = _routes(gen, n, slots)  # experts 2, 8 and 9 never routed; ~20% of slots unused
    if pattern == "tier0_only":  # every route into tier 0: tier 1's bank gets no rows at all
        ids = torch.where(ids >= 5, (ids % 5).masked_fill((ids % 5) == 2, 0), ids)
    x = torch.randn(n, d, generator=gen)
    upstream = torch.randn(n, d, generator=gen)
    return banks, offsets, ids, weights, x, upstream


def _check_empty_experts(banks, ids, grads_fast, pattern):
    """Experts that received no route get exactly zero gradient (and a whole empty tier too)."""
    used = set(ids[ids >= 0].tolist())
    assert 2 not in used
    gu0, d0, gu1, d1 = grads_fast
    assert not gu0[2].any() and not d0[2].any(), "empty expert 2 (tier 0) got a gradient"
    if pattern == "tier0_only":
        assert not gu1.any() and not d1.any(), "tier 1 received no route but its bank got a gradient"
    else:
        for e in (8, 9):
            assert e not in used
            assert not gu1[e - 5].any() and not d1[e - 5].any(), f"empty expert {e} (tier 1) got a gradient"
        assert gu1.any(), "tier 1 had routes but no gradient"


@needs_grouped_mm
@pytest.mark.parametrize("pattern", ["mixed", "tier0_only"])
@pytest.mark.parametrize("impl", ["grouped_mm", "loop", "auto"])
def test_cuda_dispatch_fp32_matches_reference(impl, pattern):
    banks, offsets, ids, weights, x, upstream = _setup(0, 37, 4, pattern)
    for bank in banks:
        bank.to(CUDA)
    fast = _run(
        lambda xr, i, wr: dispatch(xr, i, wr, banks, offsets, impl),
        banks, x.to(CUDA), ids.to(CUDA), weights.to(CUDA), upstream.to(CUDA),
    )
    slow = _reference(banks, offsets, x, ids, weights, upstream)
    assert fast[0].device.type == CUDA.type and fast[0].dtype == torch.float32
    valid = ids >= 0
    torch.testing.assert_close(fast[0].cpu().double(), slow[0], **FP32_TOL)
    torch.testing.assert_close(fast[1].cpu().double(), slow[1], **FP32_TOL)
    torch.testing.assert_close((fast[2].cpu() * valid).double(), slow[2] * valid, **FP32_TOL)
    for a, b in zip(fast[3], slow[3]):
        torch.testing.assert_close(a.cpu().double(), b, **FP32_TOL)
    _check_empty_experts(banks, ids, [g.cpu() for g in fast[3]], pattern)


@needs_grouped_mm
@pytest.mark.parametrize("pattern", ["mixed", "tier0_only"])
@pytest.mark.parametrize("weights_dtype", [torch.bfloat16, torch.float32], ids=["bf16_weights", "fp32_weights"])
def test_cuda_dispatch_bf16_matches_reference(weights_dtype, pattern):
    """bf16 activations through the grouped_mm path, with bf16 weights (pure bf16) or with fp32
    master weights cast inside (the autocast-style path); the reference uses the same bf16-rounded
    weights and inputs in float64, so only the kernels' own rounding is measured."""
    banks, offsets, ids, weights, x, upstream = _setup(1, 64, 4, pattern)
    upstream = upstream.bfloat16().float()  # the gradient reaching a bf16 output is bf16: give both sides the same
    for bank in banks:
        bank.to(device=CUDA, dtype=weights_dtype)
    xb = x.to(torch.bfloat16)
    fast = _run(
        lambda xr, i, wr: dispatch(xr, i, wr, banks, offsets, "grouped_mm"),
        banks, xb.to(CUDA), ids.to(CUDA), weights.to(CUDA), upstream.to(CUDA),
    )
    slow = _reference(banks, offsets, xb, ids, weights, upstream, param_dtype=torch.bfloat16)
    assert fast[0].dtype == torch.bfloat16 and fast[1].dtype == torch.bfloat16
    assert all(g.dtype == weights_dtype for g in fast[3])
    valid = ids >= 0
    _assert_scaled_close(fast[0], slow[0], BF16_MAX_REL, BF16_NORM_REL, "output")
    _assert_scaled_close(fast[1], slow[1], BF16_MAX_REL, BF16_NORM_REL, "grad x")
    _assert_scaled_close(fast[2].cpu() * valid, slow[2] * valid, BF16_MAX_REL, BF16_NORM_REL, "grad route weights")
    names = ["tier0.gate_up", "tier0.down", "tier1.gate_up", "tier1.down"]
    for name, a, b in zip(names, fast[3], slow[3]):
        if pattern == "tier0_only" and name.startswith("tier1"):
            assert not b.any()
            continue
        _assert_scaled_close(a, b, BF16_MAX_REL, BF16_NORM_REL, f"grad {name}")
    _check_empty_experts(banks, ids, [g.cpu() for g in fast[3]], pattern)


@needs_grouped_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_grouped_mm_matches_loop_at_benchmark_width(dtype):
    """The benchmark's shapes (d=512, H=1024, K=4) with 64 experts, a few of them empty: the
    CUDA grouped_mm kernels (tiled differently at this size) against the per-expert loop."""
    gen = torch.Generator().manual_seed(3)
    n, d, h, num_experts, k = 1024, 512, 1024, 64, 4
    bank = ExpertBank(num_experts, d, h)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    bank.to(device=CUDA, dtype=dtype)
    ids = torch.stack([torch.randperm(num_experts - 3, generator=gen)[:k] for _ in range(n)])  # 61..63 empty
    weights = torch.rand(n, k, generator=gen)
    x = torch.randn(n, d, generator=gen).to(dtype)
    upstream = torch.randn(n, d, generator=gen)
    args = ([bank], x.to(CUDA), ids.to(CUDA), weights.to(CUDA), upstream.to(CUDA))
    fast = _run(lambda xr, i, wr: dispatch(xr, i, wr, [bank], [0, num_experts], "grouped_mm"), *args)
    loop = _run(lambda xr, i, wr: dispatch(xr, i, wr, [bank], [0, num_experts], "loop"), *args)
    names = ["output", "grad x", "grad route weights", "grad gate_up", "grad down"]
    pairs = [fast[0], fast[1], fast[2], *fast[3]], [loop[0], loop[1], loop[2], *loop[3]]
    for name, a, b in zip(names, *pairs):
        if dtype == torch.float32:
            # Sums of 512..4096 terms in a different order: ~1e-6 relative to the scale.
            _assert_scaled_close(a, b, 1e-5, 1e-5, name)
        else:
            _assert_scaled_close(a, b, BF16_MAX_REL, BF16_NORM_REL, name)
    gu, dn = fast[3]
    assert not gu[61:].any() and not dn[61:].any(), "empty experts got a gradient"
    assert gu[:61].abs().sum(dim=(1, 2)).min() > 0, "a routed expert got no gradient"


# ------------------------------------------------------------------------------- the model
def _tokens(config: ModelConfig, batch: int = 2, seq: int = 48, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, seq), generator=gen)


def test_tiny_model_bf16_autocast_forward_backward_on_cuda():
    config = ModelConfig.from_preset("tiny")
    assert config.is_moe and len(config.tiers) == 2
    ids = _tokens(config).to(CUDA)

    def step(autocast: bool):
        model = build_model(config, seed=0, device=CUDA).train()
        with torch.autocast(CUDA.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, tierset="all", labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out, grads, model

    out16, grads16, model = step(autocast=True)
    out32, grads32, _ = step(autocast=False)
    assert out16.logits.dtype == torch.bfloat16  # autocast really ran the head in bf16
    for name in ("loss", "lm_loss", "balance_loss", "z_loss"):
        value = getattr(out16, name)
        assert value.dtype == torch.float32 and torch.isfinite(value), f"{name} = {value}"
    # An untrained model predicts ~uniformly over the 256 byte ids.
    assert abs(out16.lm_loss.item() - math.log(config.vocab_size)) < 0.1, out16.lm_loss.item()
    # bf16 autocast changes the loss only by rounding (same weights, same tokens).
    assert abs(out16.lm_loss.item() - out32.lm_loss.item()) < 1e-2, (out16.lm_loss.item(), out32.lm_loss.item())
    # Backward reached both tiers' experts, all gradients finite, and close in direction to fp32.
    for tier in config.tiers:
        assert any(tier.name in n and "experts" in n and g.abs().sum() > 0 for n, g in grads16.items()), tier.name
    assert grads16.keys() == grads32.keys()
    for n, g in grads16.items():
        assert torch.isfinite(g).all(), n
    flat16 = torch.cat([grads16[n].float().flatten() for n in sorted(grads16)])
    flat32 = torch.cat([grads32[n].float().flatten() for n in sorted(grads32)])
    cosine = torch.nn.functional.cosine_similarity(flat16, flat32, dim=0).item()
    assert cosine > 0.98, f"bf16-autocast gradient direction differs from fp32: cosine {cosine:.4f}"
    # An optimiser step in autocast lowers the loss on the same batch.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.step()
    with torch.no_grad(), torch.autocast(CUDA.type, dtype=torch.bfloat16):
        after = model(ids, tierset="all", labels=ids).lm_loss.item()
    assert after < out16.lm_loss.item(), (after, out16.lm_loss.item())


def test_tiny_model_fp32_cuda_logits_match_cpu():
    """Same weights, same tokens: fp32 logits on CUDA equal the CPU's to 1e-4 of their scale,
    and every layer routes every token to the same experts."""
    config = ModelConfig.from_preset("tiny")
    ids = _tokens(config, seed=1)
    cpu = build_model(config, seed=0).eval()
    gpu = build_model(config, seed=0, device=CUDA).eval()
    for (n, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert torch.equal(p, q.cpu()), f"{n} was initialised differently on CUDA"
    with torch.no_grad():
        for tierset in ("all", "upto:tier_1b"):
            ref = cpu(ids, tierset=tierset, return_routes=True)
            got = gpu(ids.to(CUDA), tierset=tierset, return_routes=True)
            assert got.logits.dtype == torch.float32 and got.logits.device.type == CUDA.type
            for r_cpu, r_gpu in zip(ref.routing, got.routing):
                assert torch.equal(r_cpu.routes.expert_ids, r_gpu.routes.expert_ids.cpu()), f"routes differ ({tierset})"
                torch.testing.assert_close(r_gpu.routes.weights.cpu(), r_cpu.routes.weights, atol=1e-5, rtol=1e-5)
            scale = ref.logits.abs().max().item()
            assert scale > 0
            err = (got.logits.cpu() - ref.logits).abs().max().item()
            assert err <= 1e-4 * scale, f"{tierset}: max |cuda - cpu| = {err:.3g} > 1e-4 x {scale:.3g}"
            torch.testing.assert_close(got.logits.cpu(), ref.logits, atol=1e-4 * scale, rtol=1e-4)
