"""What the growth ops that add or copy experts share: the names of a tier's router head and
expert bank, seeded draws private to one output tensor, and argument checks.

A draw is keyed by ``(seed, tensor name)``, never by global RNG or by the order tensors are
produced in, so a streamed growth (which makes tensors one at a time, in any order) writes the
same numbers as an in-memory one, in any process.
"""

from __future__ import annotations

import zlib

import torch

from ..config import ModelConfig
from ..errors import ConfigError


def router_prefix(layer: int, tier: str) -> str:
    return f"layers.{layer}.ffn.router.heads.{tier}."


def bank_prefix(layer: int, tier: str) -> str:
    return f"layers.{layer}.ffn.experts.{tier}."


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator private to one output tensor: the same (seed, name) draws the same numbers
    in any process and in any order of evaluation (global RNG is never touched)."""
    return torch.Generator().manual_seed(int(seed) + zlib.crc32(name.encode()))


def seeded_normal(shape: tuple[int, ...], std: float, seed: int, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Seeded normal(0, std) draws, made in fp32 (the same numbers whatever ``dtype``)."""
    return (torch.randn(shape, generator=tensor_generator(seed, name), dtype=torch.float32) * std).to(dtype)


def perturb(weight: torch.Tensor, noise: float, seed: int, name: str) -> torch.Tensor:
    """``weight + noise * std(weight) * N(0, 1)``: noise relative to the tensor's own scale, so
    ``noise=0.01`` means "1% of a typical weight" for every tensor and every model."""
    if not noise:
        return weight
    scale = float(weight.float().std()) * noise
    return (weight.float() + seeded_normal(tuple(weight.shape), scale, seed, name, torch.float32)).to(weight.dtype)


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def check_positive_int(what: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")


def check_noise(noise: float) -> None:
    if not isinstance(noise, (int, float)) or noise < 0:
        raise ConfigError(f"noise must be a number >= 0 (a fraction of each weight tensor's std), got {noise!r}")


def refuse_quantized(config: ModelConfig, what: str) -> None:
    """Growth computes on float weights: a quantized tier would have to be dequantized (and its
    error kept) without anyone asking, so it is refused instead."""
    quantized = [t.name for t in config.tiers if t.quantization]
    if quantized:
        raise ConfigError(
            f"cannot {what} a checkpoint whose tier(s) {', '.join(quantized)} are quantized; {what} the unquantized checkpoint, then quantize the result"
        )
