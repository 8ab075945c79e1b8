"""Lazy tensor mappings: how growth operations stay pure and still stream.

A growth operation maps ``(config, tensors) -> (config, tensors)``.  The tensors it returns
are a :class:`LazyTensors`: each output name holds a small closure that computes the tensor
from the input mapping when it is looked up, and nothing is cached.  Chaining operations
chains closures; writing the result (``write_checkpoint`` with specs) asks for one tensor at a
time, so a chain of growths over a checkpoint opened with ``open_checkpoint`` never holds
more than a few tensors in memory.  Looking a tensor up twice computes it twice: materialise
with ``dict(lazy)`` when that matters more than memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterator

import torch

from ..checkpoint.load import _expected_tensors
from ..checkpoint.stream import TensorSpec
from ..config import ModelConfig

Tensors = Mapping[str, torch.Tensor]
Producer = Callable[[], torch.Tensor]


class LazyTensors(Mapping[str, torch.Tensor]):
    """name -> tensor, each computed by its producer when looked up (never cached)."""

    def __init__(self, producers: dict[str, Producer]) -> None:
        self._producers = producers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._producers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._producers)

    def __len__(self) -> int:
        return len(self._producers)


class _Ref:
    """A producer that returns input tensor ``name`` unchanged, and says so (:func:`origin`)."""

    __slots__ = ("tensors", "name")

    def __init__(self, tensors: Tensors, name: str) -> None:
        self.tensors, self.name = tensors, name

    def __call__(self) -> torch.Tensor:
        return self.tensors[self.name]


def ref(tensors: Tensors, name: str) -> Producer:
    """A producer that returns input tensor ``name`` unchanged."""
    return _Ref(tensors, name)


def origin(tensors: Tensors, name: str) -> tuple[Tensors, str]:
    """The mapping and name that ``tensors[name]`` passes on unchanged through :func:`ref`
    producers: two names of one origin hold the same tensor, known without reading either
    (the streamed validation computes such blocks once for both models)."""
    while isinstance(tensors, LazyTensors) and isinstance(producer := tensors._producers.get(name), _Ref):
        tensors, name = producer.tensors, producer.name
    return tensors, name


def derive(fn: Callable[..., torch.Tensor], tensors: Tensors, *names: str) -> Producer:
    """A producer computing ``fn(tensors[n0], tensors[n1], ...)``."""
    return lambda: fn(*(tensors[n] for n in names))


def stored_names(config: ModelConfig) -> list[str]:
    """The names a checkpoint of ``config`` stores, in writing order (tied ``lm_head`` excluded)."""
    return list(_expected_tensors(config))


def expected_specs(config: ModelConfig, dtype: torch.dtype) -> dict[str, TensorSpec]:
    """name -> (dtype, shape) of every stored tensor of ``config`` when held in ``dtype``."""
    return {name: TensorSpec(dtype, shape) for name, shape in _expected_tensors(config).items()}


def layer_prefix(i: int) -> str:
    return f"layers.{i}."


def layer_names(names: list[str] | Tensors, i: int) -> list[str]:
    """The names of layer ``i``'s tensors, without the ``layers.{i}.`` prefix."""
    prefix = layer_prefix(i)
    return [n[len(prefix):] for n in names if n.startswith(prefix)]
