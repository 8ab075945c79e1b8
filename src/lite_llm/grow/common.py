"""What the growth ops that add or copy experts share: the names of a tier's router head and
expert bank, seeded draws private to one output tensor, and argument checks.

A draw is keyed by ``(seed, tensor name)``, never by global RNG or by the order tensors are
produced in, so a streamed growth (which makes tensors one at a time, in any order) writes the
same numbers as an in-memory one, in any process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import zlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig, format_size
from ..errors import ConfigError
from ..model.router import seeded_hash


def router_prefix(layer: int, tier: str) -> str:
    return f"layers.{layer}.ffn.router.heads.{tier}."


def bank_prefix(layer: int, tier: str) -> str:
    return f"layers.{layer}.ffn.experts.{tier}."


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator private to one output tensor, seeded by ``seed`` and a stable hash of
    ``name``: the same (seed, name) draws the same numbers in any process and in any order of
    evaluation (the global RNG is never touched).

    The CPU generator (mt19937) keeps only the low 32 bits of its seed, so the 64-bit hash of
    (seed, name) is folded to 32 bits rather than, say, adding the name's hash to the seed
    (seeds 2**32 apart, or pairs whose sums agree, would then draw the same noise).
    """
    mixed = seeded_hash(int(seed), zlib.crc32(name.encode()))
    return torch.Generator().manual_seed((mixed ^ (mixed >> 32)) & 0xFFFF_FFFF)


def normal(shape: torch.Size | tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    """N(0, std^2) noise of ``shape`` in fp32 drawn from ``gen``."""
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * std


def seeded_normal(shape: tuple[int, ...], std: float, seed: int, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Seeded normal(0, std) draws for the tensor ``name``, made in fp32 (the same numbers
    whatever ``dtype``)."""
    return normal(shape, std, tensor_generator(seed, name)).to(dtype)


def perturb(weight: torch.Tensor, noise: float, seed: int, name: str) -> torch.Tensor:
    """``weight + noise * std(weight) * N(0, 1)``: noise relative to the tensor's own scale, so
    ``noise=0.01`` means "1% of a typical weight" for every tensor and every model."""
    if not noise:
        return weight
    scale = float(weight.float().std()) * noise
    return (weight.float() + seeded_normal(tuple(weight.shape), scale, seed, name, torch.float32)).to(weight.dtype)


def replace_within_budgets(config: ModelConfig, growth: str, **changes) -> ModelConfig:
    """``config.replace(**changes)``, refusing first — with a message that says how to fix it —
    when the growth would take a tier past its strict parameter budget."""
    tiers = changes.get("tiers", config.tiers)
    unbudgeted = config.replace(**{**changes, "tiers": [dataclasses.replace(t, budget=None) for t in tiers]})
    for tier, new in zip(tiers, unbudgeted.tiers):
        if tier.budget is None or tier.budget_mode != "strict":
            continue
        need = unbudgeted.tier_params(new)
        if need > tier.budget:
            raise ConfigError(
                f"{growth} would give tiers[{tier.name}] {format_size(need)} parameters ({need}), over its strict budget of "
                f"{format_size(tier.budget)}; raise it first with a budget step (lite-llm expand CKPT --method budget --set "
                f"tier={tier.name} --set size={need}, or mode=advisory; or first in a recipe), or grow less"
            )
    return config.replace(**changes)


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


@dataclass(frozen=True)
class Room:
    """The free bytes where a growth writes, and the dtype it writes in."""

    free: int
    where: Path
    dtype: torch.dtype

    def check(self, params: int, what: str) -> None:
        from ..store.sizes import format_bytes

        need = params * torch.empty((), dtype=self.dtype).element_size()
        if need > self.free:
            dtype = str(self.dtype).removeprefix("torch.")
            raise ConfigError(
                f"{what} would make a model of {format_size(params)} parameters ({format_bytes(need)} in {dtype}), more than the "
                f"{format_bytes(self.free)} free at {self.where}; grow less, or write the output to a disk with room"
            )


_ROOM: ContextVar[Room | None] = ContextVar("growth_room", default=None)


@contextlib.contextmanager
def room_at(output: Path, dtype: torch.dtype) -> Iterator[None]:
    """While inside, :func:`check_room` refuses a growth whose output could not fit on the disk
    under ``output``: a size that needs terabytes is refused in one sentence before anything
    is built, instead of filling the memory (or the disk) and failing there."""
    where = Path(output).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    token = _ROOM.set(Room(shutil.disk_usage(where).free, where, dtype))
    try:
        yield
    finally:
        _ROOM.reset(token)


def check_room(config: ModelConfig | int, n_layers: int | None = None, what: str = "this growth") -> None:
    """Refuse a grown model too large for the output's disk (see :func:`room_at`; no check
    outside it).  ``config`` is the grown model's config or parameter count; with
    ``n_layers``, the count of ``config`` deepened to that many layers, each at least as large
    as its smallest block (cheap at any depth, where a plan of that many blocks is not)."""
    room = _ROOM.get()
    if room is None:
        return
    if isinstance(config, int):
        params = config
    elif n_layers is None:
        params = config.num_params()
    else:
        d = config.d_model
        outside = config.vocab_size * d * (1 if config.tie_embeddings else 2) + d  # embeddings, head, final norm
        block = 2 * d + config.attention_params()
        n_moe = len(config.moe_layer_indices)
        kinds = ([block + config.dense_ffn_params()] if n_moe < config.n_layers else []) + (
            [block + sum(config.tier_params(t, per_layer=True) for t in config.tiers)] if n_moe else []
        )
        params = outside + n_layers * min(kinds)
    room.check(params, what)
