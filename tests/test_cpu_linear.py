"""faster_float32_linear: float32 CPU products routed to oneDNN only where it measured faster,
only without autograd, only on the thread that asked; the results those of float64 arithmetic
to float32 rounding."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from lite_llm.runtime import cpu_linear

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@pytest.fixture
def routed(monkeypatch):
    """oneDNN taken whatever the calibration says, and a log of the products it ran."""
    calls: list[tuple[int, ...]] = []
    real = cpu_linear._onednn_linear
    monkeypatch.setattr(cpu_linear, "onednn_is_faster", lambda: True)
    monkeypatch.setattr(cpu_linear, "_onednn_linear", lambda x, w, b: calls.append(tuple(x.shape)) or real(x, w, b))
    return calls


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_routed_products_are_float64_arithmetic_to_float32_rounding(routed, bias):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 7, 64, generator=gen), torch.randn(96, 64, generator=gen) / 8
    b = torch.randn(96, generator=gen) if bias else None
    exact = F.linear(x.double(), w.double(), b.double() if bias else None)
    with torch.no_grad(), cpu_linear.faster_float32_linear() as used:
        y = torch.nn.functional.linear(x, w, b)
        module = torch.nn.Linear(64, 96, bias=bias)
        module.weight.copy_(w)
        if bias:
            module.bias.copy_(b)
        z = module(x)
    assert used and routed == [(2, 7, 64), (2, 7, 64)]
    for out in (y, z):
        assert out.dtype == torch.float32 and out.shape == (2, 7, 96)
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_products_that_autograd_or_other_dtypes_need_are_left_alone(routed):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 16, generator=gen, requires_grad=True)
    x = torch.randn(3, 16, generator=gen)
    with cpu_linear.faster_float32_linear():
        F.linear(x, w).sum().backward()  # needs the derivative: MKL's
        with torch.no_grad():
            F.linear(x.double(), w.double())  # float64
            F.linear(x.bfloat16(), w.bfloat16())  # bf16
    assert routed == []
    torch.testing.assert_close(w.grad, x.sum(0).expand(8, 16))  # d(sum(x w^T))/dw, in closed form


@needs_onednn
def test_only_the_thread_that_entered_is_routed(routed):
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    entered, done = threading.Event(), threading.Event()

    def elsewhere() -> None:
        entered.wait()
        with torch.no_grad():
            F.linear(x, w)
        done.set()

    other = threading.Thread(target=elsewhere)
    other.start()
    with torch.no_grad(), cpu_linear.faster_float32_linear():
        entered.set()
        done.wait(10)
        assert routed == []  # the other thread's product went to the default library
        F.linear(x, w)
    other.join()
    assert routed == [(4, 16)]


def test_without_onednn_nothing_is_routed(monkeypatch):
    cpu_linear.onednn_is_faster.cache_clear()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    try:
        assert cpu_linear.onednn_is_faster() is False
        with cpu_linear.faster_float32_linear() as used:
            assert used is False
    finally:
        cpu_linear.onednn_is_faster.cache_clear()


@needs_onednn
def test_the_calibration_is_a_measured_verdict_made_once():
    cpu_linear.onednn_is_faster.cache_clear()
    first = cpu_linear.onednn_is_faster()
    assert isinstance(first, bool) and cpu_linear.onednn_is_faster() is first
    assert cpu_linear.onednn_is_faster.cache_info().hits >= 1
