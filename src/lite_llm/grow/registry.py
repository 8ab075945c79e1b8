"""The registry of growth operations: every method a recipe or the CLI can name."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from ..config import ModelConfig, is_int
from ..errors import ConfigError
from .tensors import Tensors

GrowthFn = Callable[..., tuple[ModelConfig, Tensors]]


@dataclass(frozen=True)
class GrowthOp:
    """A registered growth operation.

    ``exact`` says whether the grown model computes the same function as the original with
    the given parameters (a callable, since e.g. added noise makes an exact method inexact).
    """

    name: str
    family: str  # depth, width, heads, moe, tiers
    fn: GrowthFn
    exact: Callable[[dict[str, Any]], bool]
    summary: str

    def parameters(self) -> list[str]:
        sig = inspect.signature(self.fn)
        return [p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY]

    def required(self) -> list[str]:
        """The parameters without a default: a step that leaves one out cannot run."""
        sig = inspect.signature(self.fn)
        return [p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY and p.default is p.empty]

    def check_params(self, params: dict[str, Any]) -> None:
        """Refuse an unknown or a missing parameter in one sentence (calling the function
        would end in Python's TypeError instead)."""
        known = self.parameters()
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError(
                f"growth method {self.name!r} has no parameter {unknown[0]!r}; its parameters are {', '.join(known) or 'none'}"
            )
        missing = [name for name in self.required() if name not in params]
        if missing:
            raise ConfigError(
                f"growth method {self.name!r} needs {', '.join(missing)}; give each as --set NAME=VALUE, or as NAME: VALUE in the recipe step"
            )
        seed = params.get("seed", 0)  # every op's seed keys its draws; int() would read 1.5 as 1 and record 1.5
        if not (is_int(seed) and 0 <= seed < 2**63):
            raise ConfigError(f"growth method {self.name!r}: seed must be a whole number from 0 to 2**63-1, got {seed!r}")

    def __call__(self, config: ModelConfig, tensors: Tensors, **params: Any) -> tuple[ModelConfig, Tensors]:
        self.check_params(params)
        return self.fn(config, tensors, **params)


_REGISTRY: dict[str, GrowthOp] = {}


def register(name: str, *, family: str, exact: bool | Callable[[dict[str, Any]], bool]) -> Callable[[GrowthFn], GrowthFn]:
    """Decorator registering a growth function under ``name``."""

    def wrap(fn: GrowthFn) -> GrowthFn:
        if name in _REGISTRY:
            raise ValueError(f"growth method {name!r} is registered twice")
        is_exact = exact if callable(exact) else (lambda params, _e=exact: _e)
        summary = (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ").replace("``", "")
        _REGISTRY[name] = GrowthOp(name, family, fn, is_exact, summary)
        return fn

    return wrap


def get_op(name: str) -> GrowthOp:
    """The operation registered as ``name``, or a clear error listing the known ones."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown growth method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_ops() -> dict[str, GrowthOp]:
    return dict(sorted(_REGISTRY.items()))
