"""float32 matrix products on the CPU through oneDNN where it is the faster library on this CPU.

Why: PyTorch's CPU ``linear`` in float32 goes to MKL's sgemm, and MKL takes its generic code
path on CPUs that are not Intel's.  On the AMD EPYC (AVX-512) these benchmarks ran on, oneDNN
(which PyTorch also ships, and uses for bf16) multiplied a 128-token batch by a 2048 x 5632
matrix in 15 ms where MKL took 24 ms, at the same float32 arithmetic (no reduced-precision
mode: ``fpmath`` stays strict); on an Intel CPU MKL is as fast.  So nothing is assumed: the
first use times both on one such product, interleaved, and keeps oneDNN only if it was clearly
faster and agreed with MKL to float32 rounding.  A streamed float32 check of a depth growth
(SOLAR on a 1.7 GB Llama: 28 block forwards at 128 tokens, ~320 GFLOP) is ~1.4x faster so.

Only forward products without autograd are routed (oneDNN's op here has no derivative), and
only inside :func:`faster_float32_linear`, on the thread that entered it (PyTorch's function
modes are per thread: a writer beside a check keeps its own kernels).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_CALIBRATION_SHAPE = (128, 1024, 4096)  # tokens, in, out: ~1 GFLOP, the shape of a check's products
_REPEATS = 3
_MUST_BE_FASTER = 0.85  # oneDNN is kept only below this fraction of MKL's time


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _routable(x: Any, weight: Any, bias: Any) -> bool:
    tensors = [t for t in (x, weight, bias) if t is not None]
    return (
        not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)
    ) and all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu" and t.layout == torch.strided for t in tensors) and weight.dim() == 2


@functools.cache
def onednn_is_faster() -> bool:
    """Whether oneDNN's float32 ``linear`` beat MKL's on this CPU (measured once per process),
    agreeing with it to float32 rounding; False where PyTorch has no oneDNN."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    tokens, d_in, d_out = _CALIBRATION_SHAPE
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(tokens, d_in, generator=gen), torch.randn(d_out, d_in, generator=gen) * d_in**-0.5
    try:
        reference, candidate = F.linear(x, w), _onednn_linear(x, w, None)  # also the first calls' set-up, untimed
    except RuntimeError:
        return False
    if not torch.allclose(candidate, reference, rtol=1e-4, atol=1e-4):
        return False
    best = {"mkl": float("inf"), "onednn": float("inf")}
    for _ in range(_REPEATS):
        for name, fn in (("mkl", F.linear), ("onednn", _onednn_linear)):
            start = time.perf_counter()
            fn(x, w, None)
            best[name] = min(best[name], time.perf_counter() - start)
    return best["onednn"] < _MUST_BE_FASTER * best["mkl"]


class _OneDNNLinear(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _routable(x, weight, bias):
                return _onednn_linear(x, weight, bias)
        return func(*args, **kwargs)


@contextlib.contextmanager
def faster_float32_linear() -> Iterator[bool]:
    """Within the block, on this thread, float32 CPU ``linear`` calls without autograd run on
    oneDNN when it is the faster library here (:func:`onednn_is_faster`); yields whether they do."""
    if not onednn_is_faster():
        yield False
        return
    with _OneDNNLinear():
        yield True
