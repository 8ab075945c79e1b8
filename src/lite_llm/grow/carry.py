"""Carry an EWC estimate (diagonal Fisher and anchor weights) through growth.

The anchors are weights, so they go through the growth chain exactly as the weights do.

The Fisher needs more care.  Every growth operation maps each new entry either from one old
entry, ``w'_j = c_j w_s(j) + b_j`` (a copy, a tile divided by k, a neuron's split share, a
rescaled norm), or from none (fresh zeros or noise).  The penalty ``sum F (w - w*)^2`` should
not change when the grown model makes the change that corresponds to an old change ``delta``
(every copy of old entry ``i`` moves by ``c_j delta_i``).  That holds when

    F'_j = F_i / sum_{j' copied from i} c_j'^2        (fresh entries: F' = 0)

which spreads an entry's Fisher evenly over its copies, scaled to their coefficients.

The operations are pure functions, so the map ``(s(j), c_j)`` is found by running the same chain
on probe tensors instead of asking each operation to describe itself (new operations get
the behaviour for free): zeros give ``b``, ones give ``c``, the global index ``i + 1`` gives
``c (s + 1)``, and a pseudo-random value ``r(i)`` checks that no other entry was mixed in.  An
entry that mixes several old entries (LEMON's new norm entries, a mean of the old ones; upcycling
noise proportional to a tensor's own spread) has no single source: its Fisher is set to 0 and counted in ``unmapped``.

A block whose residual writers (``o_proj`` and the FFN's down projections) grow as exact zeros
(``llama_pro``'s new blocks) is silent: its copies of old weights do not touch the function, so
they are not counted among the copies and get Fisher 0.  The original block keeps its whole
Fisher, and the new block is free to learn — which is what the depth growth is for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..model.shapes import parameter_names
from .registry import GrowthOp
from .tensors import LazyTensors, Tensors, stored_names

Chain = Sequence[tuple[GrowthOp, dict[str, Any]]]
_GOLDEN = 0.6180339887498949
_RTOL = 1e-6


@dataclass
class CarriedEWC:
    """The grown estimate's tensors and how many of its entries had no single source."""

    fisher: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]
    unmapped: int


def _run(config: ModelConfig, tensors: Tensors, chain: Chain) -> tuple[ModelConfig, Tensors]:
    for op, params in chain:
        config, tensors = op(config, tensors, **params)
    return config, tensors


def _probe(offsets: dict[str, tuple[int, torch.Size]], value: Callable[[torch.Tensor], torch.Tensor]) -> LazyTensors:
    """Input tensors whose entries are ``value(global index)`` in fp64, built on demand."""

    def make(name: str) -> torch.Tensor:
        start, shape = offsets[name]
        index = torch.arange(start, start + shape.numel(), dtype=torch.float64)
        return value(index).reshape(shape)

    return LazyTensors({name: (lambda name=name: make(name)) for name in offsets})


def _mark(index: torch.Tensor) -> torch.Tensor:
    """A value in [1, 2) that differs between nearby indices (golden-ratio sequence)."""
    return 1.0 + torch.remainder(index * _GOLDEN, 1.0)


def _sources(b: torch.Tensor, ones: torch.Tensor, idx: torch.Tensor, mark: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output entry: source index (-1: none), coefficient c, and whether it mixes sources."""
    c = (ones - b).flatten()
    v = (idx - b).flatten()
    w = (mark - b).flatten()
    nonzero = c != 0
    s = torch.where(nonzero, v / torch.where(nonzero, c, torch.ones_like(c)), torch.zeros_like(c))
    source = torch.round(s)
    ok = nonzero & ((s - source).abs() <= _RTOL * s.abs().clamp_min(1.0)) & (source >= 1) & (source <= total)
    source = torch.where(ok, source - 1, torch.full_like(source, -1)).long()
    expected = c * _mark(source.clamp_min(0).double())
    ok &= (w - expected).abs() <= 1e-5 * expected.abs().clamp_min(1e-12)
    source = torch.where(ok, source, torch.full_like(source, -1))
    mixed = ~ok & ((c != 0) | (v != 0))
    return source, torch.where(ok, c, torch.zeros_like(c)), mixed


def carry_ewc(
    config: ModelConfig,
    tensors: Tensors,
    chain: Chain,
    fisher: Mapping[str, torch.Tensor],
    anchor: Mapping[str, torch.Tensor],
) -> CarriedEWC:
    """The estimate ``(fisher, anchor)`` of a model of ``config`` (whose stored tensors are
    ``tensors``: they supply the buffers the anchors lack) after the growth ``chain`` of
    (operation, resolved parameters) pairs, as the module docstring describes."""
    names = stored_names(config)
    _check_estimate(tensors, fisher, anchor)
    offsets: dict[str, tuple[int, torch.Size]] = {}
    total = 0
    for name in names:
        shape = torch.Size(tensors[name].shape)
        offsets[name] = (total, shape)
        total += shape.numel()
    flat_fisher = torch.zeros(total, dtype=torch.float64)
    for name, f in fisher.items():
        start, shape = offsets[name]
        flat_fisher[start : start + shape.numel()] = f.double().flatten()

    anchored = LazyTensors({n: (lambda n=n: anchor[n].float() if n in anchor else tensors[n].float()) for n in names})
    new_config, grown_anchor = _run(config, anchored, chain)
    keep = parameter_names(new_config)

    runs = [
        _run(config, _probe(offsets, fn), chain)[1]
        for fn in (torch.zeros_like, torch.ones_like, lambda i: i + 1.0, _mark)
    ]
    silent = _silent_layers(new_config, runs)
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    coeff_sq = torch.zeros(total, dtype=torch.float64)
    unmapped = 0
    for name in keep:
        source, c, mixed = _sources(*(r[name] for r in runs), total)
        if _layer_of(name) in silent:
            source = torch.full_like(source, -1)
            c, mixed = torch.zeros_like(c), torch.zeros_like(mixed)
        maps[name] = (source, c)
        hit = source >= 0
        coeff_sq.index_add_(0, source[hit], c[hit].square())
        unmapped += int(mixed.sum())

    out_fisher, out_anchor = {}, {}
    for name in keep:
        source, c = maps[name]
        hit = source >= 0
        f = torch.zeros(source.shape, dtype=torch.float64)
        f[hit] = flat_fisher[source[hit]] / coeff_sq[source[hit]]
        shape = grown_anchor[name].shape
        out_fisher[name] = f.reshape(shape).float()
        out_anchor[name] = grown_anchor[name].float()
    return CarriedEWC(out_fisher, out_anchor, unmapped)


def _check_estimate(tensors: Tensors, fisher: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor]) -> None:
    """One sentence for an estimate that does not belong to this model (instead of a KeyError
    or a shape error from deep inside the probes)."""
    for kind, given in (("Fisher", fisher), ("anchor", anchor)):
        for name, value in given.items():
            if name not in tensors:
                raise ConfigError(f"the EWC {kind} names {name}, which the model does not have; re-estimate it on this checkpoint (`lite-llm ewc estimate`)")
            if tuple(value.shape) != tuple(tensors[name].shape):
                raise ConfigError(
                    f"the EWC {kind} of {name} has shape {tuple(value.shape)} but the weight's is {tuple(tensors[name].shape)}; re-estimate it on this checkpoint (`lite-llm ewc estimate`)"
                )


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def _is_residual_writer(name: str) -> bool:
    return name.endswith(("attn.o_proj.weight", "ffn.down_proj.weight")) or (".ffn.experts." in name and name.endswith(".down_proj"))


def _silent_layers(config: ModelConfig, runs: Sequence[Tensors]) -> set[int]:
    """Blocks whose residual writers came out of growth as exact zeros whatever the input
    (zero offset and zero coefficient everywhere): they add nothing to the residual stream."""
    zeros, ones = runs[0], runs[1]
    writers: dict[int, list[str]] = {}
    for name in parameter_names(config):
        if _is_residual_writer(name):
            writers.setdefault(_layer_of(name), []).append(name)
    return {
        layer for layer, names in writers.items()
        if all(not bool(zeros[n].any()) and not bool(ones[n].any()) for n in names)
    }


def extend_ewc(config: ModelConfig, tensors: Tensors, fisher: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor]) -> CarriedEWC:
    """The estimate after a growth that keeps every old tensor bitwise and only adds new ones
    that do not touch the function yet (``add_tier``: the new tier is unroutable).  Old entries
    keep their Fisher and anchors; new ones get Fisher 0 (they are free to learn) and their
    initial values as anchors."""
    out_fisher, out_anchor = {}, {}
    for name in parameter_names(config):
        if name in fisher:  # an old tensor, passed through bitwise
            out_fisher[name], out_anchor[name] = fisher[name].float(), anchor[name].float()
        else:
            weight = tensors[name].float()
            out_fisher[name], out_anchor[name] = torch.zeros_like(weight), weight
    return CarriedEWC(out_fisher, out_anchor, 0)
