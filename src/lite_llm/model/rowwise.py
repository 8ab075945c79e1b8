"""Row-invariant matrix products, for serving many requests in one batch.

Why: on CPU, ``F.linear`` over M rows does not round row i as ``F.linear`` over that row alone.
Measured on this machine (torch 2.13, AVX512, MKL): for every M in 2..16 and every shape tried
(d=48..1024, out=48..50,257) some element differed by ~1e-5 — the one-row product takes a
matrix-vector path and M > 1 a blocked matrix-matrix kernel that accumulates in another order,
and even two M > 1 batches disagree (M=2 vs M=3..8: 11 of 32 cases differed).  A server that
batches requests must give each one exactly the tokens it gets alone, so inside
:func:`row_invariant` the model's linears run as one ``bmm`` of N one-row products, which was
measured bitwise equal to ``F.linear`` on each row alone for N = 1..64 at all those shapes, with
and without bias (``tests/serve/test_batched.py`` re-checks it on the machine it runs on).  It
costs what N separate products cost in arithmetic (each row reads the weights), but it is one
call: on a small model the per-call overhead it saves is most of a decode step.

Outside the context nothing changes: :func:`linear` is ``F.linear``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

_state = threading.local()


@contextmanager
def row_invariant() -> Iterator[None]:
    """Within this context (on this thread), :func:`linear` computes each row as a one-row product."""
    previous = getattr(_state, "on", False)
    _state.on = True
    try:
        yield
    finally:
        _state.on = previous


def row_invariant_enabled() -> bool:
    """Whether this thread is inside :func:`row_invariant`."""
    return getattr(_state, "on", False)


def rowwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for 2-D ``x`` (N, d), each row rounded as if it were alone."""
    n = x.shape[0]
    out = torch.bmm(x.unsqueeze(1), weight.t().unsqueeze(0).expand(n, -1, -1)).squeeze(1)
    return out if bias is None else out + bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or :func:`rowwise_linear` for 2-D inputs of several rows under :func:`row_invariant`."""
    if x.dim() == 2 and x.shape[0] > 1 and row_invariant_enabled():
        return rowwise_linear(x, weight, bias)
    return F.linear(x, weight, bias)
