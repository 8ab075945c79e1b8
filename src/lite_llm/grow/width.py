"""Width growth: a wider residual stream (``width``) and wider feed-forwards (``ffn_width``).

Hidden size (``width``).  Every stored tensor touches the residual stream in one of three ways
(:func:`residual_role`): it *writes* to it (embedding, ``o_proj``, ``down_proj``), it *reads*
from it (q/k/v, gate/up, router gates, expert ``gate_up_proj``, an untied ``lm_head``), or it
is an RMSNorm scale.  Growing d -> D maps the residual stream x to a wider x' and rewrites each
tensor so that every reader still sees the same value:

* D = k*d (tiling): x' = [x, x, ..., x].  Writers are tiled k times, so they write x'.  Readers
  get their input columns tiled in shares that sum to one: [s_1 W, ..., s_k W] x' = W x.  The
  shares are unequal (``split``, ``split`` of the rest, ...): with equal shares W/k every copy
  of a residual dimension receives the same gradient forever, under SGD and Adam alike, so the
  grown model would keep the small model's width in disguise; unequal reader shares make the
  readers' updates (equal for every copy) stop being proportional to the shares after one
  step, and the copies drift apart.  RMSNorm's mean of squares is the same over k identical
  copies, so the normalised x' is the tiled normalised x and the scale is simply tiled.  With
  tied embeddings the shared matrix must stay tiled (it writes the embedding), so the head
  reads the copies equally and its 1/k goes into the final norm's scale instead.
* otherwise (LEMON-style padding): x' = [x, 0].  Writers get zero rows; readers' new columns
  see only zeros, so they may hold anything: seeded N(0, init_std) noise, which lets gradient
  reach the new dimensions.  RMSNorm now averages over D instead of d: mean(x'^2) = mean(x^2)
  d/D, so with eps' = eps d/D, rsqrt(mean(x'^2) + eps') = sqrt(D/d) rsqrt(mean(x^2) + eps) and a
  scale g sqrt(d/D) on the old dimensions gives back exactly g * x / rms(x).

FFN width (``ffn_width``): neuron splitting.  New neuron j copies neuron j mod H (its gate and
up rows), so its activation equals its source's; the source's outgoing ``down`` column is
shared among its copies in fractions that sum to one, so the sum the ``down`` projection
computes is unchanged.  Unequal fractions (or paired zero-sum noise) make the copies receive
different gradients, so they can drift apart; independent noise on the copies' incoming rows
also breaks symmetry but changes the function (mode ``noise_copies``, not exact).

All randomness comes from a generator seeded by ``seed`` and a hash of the tensor's name, so
results are reproducible and do not depend on the order tensors are looked up in.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Literal

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from .common import check_room, normal, replace_within_budgets, tensor_generator
from .registry import register
from .tensors import LazyTensors, Producer, RowWise, Tensors, ref

Role = Literal["reader", "writer", "norm", "keep"]
FFN_MODES: tuple[str, ...] = ("split", "paired_noise", "noise_copies", "fresh")
WIDTH_MODES: tuple[str, ...] = ("auto", "tile", "pad")

# ----------------------------------------------------------------------------- shared helpers


def stored_order(names: Iterable[str]) -> list[str]:
    """``names`` in checkpoint order: embedding first, then the blocks in order, then the rest
    (final norm, head).  Stable: names of one block keep their relative order."""

    def key(item: tuple[int, str]) -> tuple[int, int, int]:
        position, name = item
        if name.startswith("embed."):
            return (0, 0, position)
        match = re.match(r"^layers\.(\d+)\.", name)
        if match:
            return (1, int(match.group(1)), position)
        return (2, 0, position)

    return [name for _, name in sorted(enumerate(names), key=key)]


def lazy_in_order(producers: dict[str, Producer]) -> LazyTensors:
    """A :class:`LazyTensors` over ``producers`` in checkpoint order."""
    return LazyTensors({name: producers[name] for name in stored_order(producers)})


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype to compute in: fp64 stays fp64, everything else is computed in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_split(split: float) -> None:
    """``split`` must be a fraction in (0, 1) other than 1/2 (equal halves keep copies symmetric)."""
    if not isinstance(split, (int, float)) or not 0.0 < float(split) < 1.0:
        raise ConfigError(f"split must be a fraction strictly between 0 and 1 (e.g. 0.6), got {split!r}")
    if float(split) == 0.5:
        raise ConfigError("split must not be 0.5: equal shares keep the copies identical under training; use e.g. 0.6")


def split_fractions(copies: int, split: float) -> list[float]:
    """The shares of one outgoing weight among ``copies`` copies: ``split`` to the first,
    ``split`` of what is left to the next, ..., the remainder to the last.  They sum to one
    (up to rounding) and are never all equal when ``split != 1/2``."""
    if copies == 1:
        return [1.0]
    rest, shares = 1.0, []
    for _ in range(copies - 1):
        shares.append(rest * split)
        rest *= 1.0 - split
    return shares + [rest]


def copy_ranks(source: list[int]) -> tuple[list[int], dict[int, int]]:
    """For each new unit, its rank among the copies of its source (0 = first occurrence), and
    the number of copies of each source."""
    seen: dict[int, int] = {}
    ranks = []
    for s in source:
        ranks.append(seen.get(s, 0))
        seen[s] = seen.get(s, 0) + 1
    return ranks, seen


def split_shares(source: list[int], split: float) -> list[float]:
    """The share of its source's outgoing weight that each new unit gets (asymmetric split)."""
    ranks, counts = copy_ranks(source)
    return [split_fractions(counts[s], split)[r] for s, r in zip(source, ranks)]


def _check_noise(noise: float) -> None:
    if not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ConfigError(f"noise must be a non-negative number (a multiple of init_std), got {noise!r}")


# ----------------------------------------------------------------------------- hidden size

# (pattern, role, axis of the hidden dimension d)
_ROLES: list[tuple[re.Pattern[str], Role, int]] = [
    (re.compile(p), role, axis)
    for p, role, axis in [
        (r"embed\.weight", "writer", -1),
        (r"lm_head\.weight", "reader", -1),
        (r"(layers\.\d+\.(attn|ffn)_)?norm\.weight", "norm", 0),
        (r"layers\.\d+\.attn\.[qkv]_proj\.weight", "reader", -1),
        (r"layers\.\d+\.attn\.[qkv]_proj\.bias", "keep", 0),
        (r"layers\.\d+\.attn\.o_proj\.weight", "writer", 0),
        (r"layers\.\d+\.ffn\.(gate|up)_proj\.weight", "reader", -1),
        (r"layers\.\d+\.ffn\.down_proj\.weight", "writer", 0),
        (r"layers\.\d+\.ffn\.router\.heads\.[a-z][a-z0-9_]*\.(tier|group|expert)_gate", "reader", -1),
        (r"layers\.\d+\.ffn\.router\.heads\.[a-z][a-z0-9_]*\.(tier|group|expert)_bias", "keep", 0),
        (r"layers\.\d+\.ffn\.experts\.[a-z][a-z0-9_]*\.gate_up_proj", "reader", -1),
        (r"layers\.\d+\.ffn\.experts\.[a-z][a-z0-9_]*\.down_proj", "writer", -2),
    ]
]


def residual_role(name: str) -> tuple[Role, int]:
    """How tensor ``name`` touches the residual stream, and which of its axes is the hidden size."""
    for pattern, role, axis in _ROLES:
        if pattern.fullmatch(name):
            return role, axis
    raise ConfigError(f"width growth does not know whether tensor {name!r} reads or writes the residual stream; it cannot widen this checkpoint")


def _with_noise_after(t: torch.Tensor, axis: int, start: int, std: float, gen: torch.Generator) -> torch.Tensor:
    """``t`` with N(0, std^2) added to the slice ``start:`` of ``axis`` (the new part)."""
    if std == 0:
        return t
    new = t.narrow(axis, start, t.shape[axis] - start)
    noisy = new + normal(new.shape, std, gen).to(t.dtype)
    return torch.cat([t.narrow(axis, 0, start), noisy], dim=axis)


def tile_tensor(t: torch.Tensor, axis: int, shares: list[float], noise_std: float = 0.0, gen: torch.Generator | None = None) -> torch.Tensor:
    """``t`` repeated ``len(shares)`` times along ``axis``, copy r times ``shares[r]``, noise on
    copies 2..k."""
    work = t.to(work_dtype(t)) if any(share != 1.0 for share in shares) else t  # writers need no upcast
    out = torch.cat([t if share == 1.0 else work * share for share in shares], dim=axis)
    if noise_std:
        out = _with_noise_after(out.to(work_dtype(t)), axis, t.shape[axis], noise_std, gen)
    return out.to(t.dtype)


def pad_tensor(t: torch.Tensor, axis: int, size: int, fill_std: float = 0.0, gen: torch.Generator | None = None) -> torch.Tensor:
    """``t`` extended to ``size`` along ``axis``: zeros, or N(0, fill_std^2) noise from ``gen``."""
    shape = list(t.shape)
    shape[axis] = size - t.shape[axis]
    fill = normal(shape, fill_std, gen).to(t.dtype) if fill_std else t.new_zeros(shape)
    return torch.cat([t, fill], dim=axis)


# The vocabulary-sized tables, the growth's largest tensors.  Without noise (whose draws depend
# on the whole tensor) their rows are widened one by one, so they are made as RowWise.
_TABLES = frozenset({"embed.weight", "lm_head.weight"})


def _tiled_producer(tensors: Tensors, name: str, role: Role, axis: int, k: int, final_scale: float, split: float, noise_std: float, seed: int) -> Producer:
    """Integer growth d -> k*d: writers tiled, readers tiled in the unequal shares ``split``
    gives, norm scales tiled (the final norm's times ``final_scale``, 1/k when the head is
    tied to the embedding)."""
    if role == "keep":
        return lambda: tensors[name]
    if role == "norm":
        scale = final_scale if name == "norm.weight" else 1.0
        return lambda: tile_tensor(tensors[name], 0, [scale] * k)
    shares = split_fractions(k, split) if role == "reader" else [1.0] * k
    if not noise_std and name in _TABLES:  # each row tiled alone: made row range by row range
        return RowWise(tensors, name, lambda t: tile_tensor(t, axis, shares))
    return lambda: tile_tensor(tensors[name], axis, shares, noise_std, tensor_generator(seed, name))


def _padded_norm(g: torch.Tensor, size: int) -> torch.Tensor:
    """RMSNorm scale for x' = [x, 0] in D = ``size`` dims: g sqrt(d/D) on the old dims (exact
    with eps' = eps d/D), sqrt(d/D) mean(g) on the new ones (they only ever scale zeros at first)."""
    d = g.shape[0]
    factor = math.sqrt(d / size)
    g32 = g.to(work_dtype(g))
    new = g32.mean().expand(size - d)
    return (torch.cat([g32, new]) * factor).to(g.dtype)


def _padded_producer(tensors: Tensors, name: str, role: Role, axis: int, size: int, reader_std: float, writer_std: float, seed: int) -> Producer:
    """Non-integer growth d -> D: writers zero-padded (``writer_std`` noise when asked for, not
    exact), readers padded with N(0, reader_std^2) columns that only ever multiply zeros."""
    if role == "keep":
        return lambda: tensors[name]
    if role == "norm":
        return lambda: _padded_norm(tensors[name], size)
    std = reader_std if role == "reader" else writer_std
    if not std and name in _TABLES:  # each row zero-padded alone: made row range by row range
        return RowWise(tensors, name, lambda t: pad_tensor(t, axis, size))
    return lambda: pad_tensor(tensors[name], axis, size, std, tensor_generator(seed, name))


@register("width", family="width", exact=lambda p: not p.get("noise"))
def hidden(
    config: ModelConfig, tensors: Tensors, *, d_model: int, mode: str = "auto", split: float = 0.6, noise: float = 0.0, seed: int = 0
) -> tuple[ModelConfig, LazyTensors]:
    """Widen the residual stream to ``d_model``: tiling when it is a multiple of the current
    size, LEMON zero padding otherwise (``mode`` ``auto``) — exact either way.  ``mode``
    ``pad`` pads at any size: the new dimensions start at zero with fresh readers, as new
    capacity rather than copies; ``tile`` insists on tiling.

    head_dim, the heads and the FFN sizes are unchanged.  ``split`` (tiling) is the share of
    each reader column the first copy gets (``split`` of the rest to the next, ...; not 1/2,
    which would keep the copies identical under training).  ``noise`` (a multiple of init_std,
    default 0) perturbs the copies (tiling) or the zero rows of the writers (padding) so the new
    dimensions start apart; the function is then no longer exact.
    """
    d = config.d_model
    if not isinstance(d_model, int) or d_model <= d:
        raise ConfigError(f"d_model must be an integer larger than the current {d} (width growth only widens), got {d_model!r}")
    if mode not in WIDTH_MODES:
        raise ConfigError(f"unknown width mode {mode!r}; choose one of {', '.join(WIDTH_MODES)}")
    if mode == "tile" and d_model % d:
        raise ConfigError(f"width mode 'tile' needs d_model a multiple of the current {d}, got {d_model}; use mode 'pad' (or 'auto')")
    check_split(split)
    _check_noise(noise)
    noise_std = float(noise) * config.init_std
    what = f"width growth to d_model={d_model}"
    producers: dict[str, Producer] = {}
    if d_model % d == 0 and mode != "pad":
        k = d_model // d
        new_config = replace_within_budgets(config, what, d_model=d_model)
        check_room(new_config, what=what)  # before k reader shares per tensor are computed
        final_scale = 1.0 / k if config.tie_embeddings else 1.0
        for name in tensors:
            role, axis = residual_role(name)
            producers[name] = _tiled_producer(tensors, name, role, axis, k, final_scale, split, noise_std, seed)
    else:
        new_config = replace_within_budgets(config, what, d_model=d_model, norm_eps=config.norm_eps * d / d_model)
        check_room(new_config, what=what)
        for name in tensors:
            role, axis = residual_role(name)
            producers[name] = _padded_producer(tensors, name, role, axis, d_model, config.init_std, noise_std, seed)
    return new_config, lazy_in_order(producers)


# ----------------------------------------------------------------------------- FFN width

_DENSE_IN = re.compile(r"layers\.\d+\.ffn\.(gate|up)_proj\.weight")
_DENSE_OUT = re.compile(r"layers\.\d+\.ffn\.down_proj\.weight")
_EXPERT = re.compile(r"layers\.\d+\.ffn\.experts\.([a-z][a-z0-9_]*)\.(gate_up_proj|down_proj)")


@dataclasses.dataclass(frozen=True)
class NeuronSplit:
    """How ``old`` neurons become ``new``: new neuron j copies neuron ``j % old`` — or, in mode
    ``fresh``, is a new neuron (N(0, noise_std^2) incoming rows, zero outgoing column).

    ``mode`` says how each source's outgoing column is shared among its copies; ``noise_std``
    is the absolute std of the symmetry-breaking noise (modes ``paired_noise``, ``noise_copies``)
    or of the new neurons' incoming rows (``fresh``).
    """

    old: int
    new: int
    mode: str
    split: float
    noise_std: float

    @property
    def source(self) -> list[int]:
        return [j % self.old for j in range(self.new)]

    def incoming(self, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Rows (neuron axis -2) of gate or up for the new neurons: copies of their sources,
        with independent noise on the copies in mode ``noise_copies`` (not exact)."""
        if self.mode == "fresh":
            return pad_tensor(rows, -2, self.new, self.noise_std, gen)
        out = rows.index_select(-2, torch.tensor(self.source))
        if self.mode == "noise_copies":
            out = _with_noise_after(out.to(work_dtype(rows)), -2, self.old, self.noise_std, gen).to(rows.dtype)
        return out

    def outgoing(self, down: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Columns (neuron axis -1) of down for the new neurons: each source's column shared
        among its copies in fractions summing to one, so sum_j down'_j h_j = sum_s down_s h_s."""
        if self.mode == "fresh":
            return pad_tensor(down, -1, self.new)
        source = torch.tensor(self.source)
        cols = down.to(work_dtype(down)).index_select(-1, source)
        if self.mode == "split":
            shares = torch.tensor(split_shares(self.source, self.split), dtype=cols.dtype)
            return (cols * shares).to(down.dtype)
        counts = torch.bincount(source, minlength=self.old).to(cols.dtype)
        cols = cols / counts[source]
        if self.mode == "paired_noise":
            cols = cols + self._zero_sum_noise(cols.shape, source, gen)
        return cols.to(down.dtype)

    def _zero_sum_noise(self, shape: torch.Size, source: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Noise whose sum over the copies of each source is zero (a lone neuron gets none):
        draw z, then subtract each source's mean over its copies."""
        z = normal(shape, self.noise_std, gen).to(torch.float64)
        sums = z.new_zeros((*shape[:-1], self.old)).index_add_(-1, source, z)
        counts = torch.bincount(source, minlength=self.old).to(z.dtype)
        return (z - (sums / counts)[..., source]).to(torch.float32)


def _fused_incoming(split: NeuronSplit, gate_up: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """An expert bank's fused (E, 2H, d) gate/up tensor, each half grown on its own."""
    gate, up = gate_up.chunk(2, dim=-2)
    return torch.cat([split.incoming(gate, gen), split.incoming(up, gen)], dim=-2)


def _expert_targets(config: ModelConfig, expert_hidden: dict[str, int] | int | None, tier: str | None) -> dict[str, int]:
    """tier name -> new expert_hidden, for the tiers that grow (``tier``: only that one)."""
    if tier is not None:
        known = [t.name for t in config.tiers]
        if tier not in known:
            raise ConfigError(f"unknown tier {tier!r}; this model has tiers {', '.join(known) or '(none: it is dense)'}")
        if isinstance(expert_hidden, dict):
            raise ConfigError("give tier with one expert_hidden size, or expert_hidden as a mapping of tier name to size, not both")
    if expert_hidden is None:
        return {}
    if not config.tiers:
        raise ConfigError("expert_hidden was given but this model has no tiers of experts; grow intermediate_size instead")
    if isinstance(expert_hidden, int) and not isinstance(expert_hidden, bool):
        return {t.name: expert_hidden for t in config.tiers if tier is None or t.name == tier}
    if not isinstance(expert_hidden, dict):
        raise ConfigError(f"expert_hidden must be an integer (every tier) or a mapping of tier name to size, got {expert_hidden!r}")
    known = [t.name for t in config.tiers]
    unknown = sorted(set(expert_hidden) - set(known))
    if unknown:
        raise ConfigError(f"expert_hidden names unknown tier(s) {', '.join(unknown)}; this model has tiers {', '.join(known)}")
    return dict(expert_hidden)


def _has_dense_ffn(config: ModelConfig) -> bool:
    """Whether some block has a dense FFN (of ``intermediate_size``): not when every block is MoE."""
    return len(config.moe_layer_indices) < config.n_layers


def _experts_for_intermediate(config: ModelConfig, intermediate_size: int, expert_hidden: object, tier: str | None) -> dict[str, int]:
    """On a model whose every FFN is a mixture of experts, ``intermediate_size`` names the
    experts' new hidden size (every tier, or ``tier``): growing a field no tensor uses would
    change nothing while claiming growth."""
    if expert_hidden is not None:
        raise ConfigError(
            "this model has no dense FFN layer (every block is a mixture of experts), so intermediate_size would change nothing; give expert_hidden alone"
        )
    targets = {t.name: intermediate_size for t in config.tiers if tier is None or t.name == tier}
    for name, size in targets.items():
        old = config.tier(name).expert_hidden
        if not isinstance(size, int) or isinstance(size, bool) or size <= old:
            raise ConfigError(
                f"every FFN of this model is a mixture of experts, so intermediate_size={size!r} grows the experts, but tiers[{name}].expert_hidden "
                f"is already {old}; give a size larger than {old} (or expert_hidden per tier)"
            )
    return targets


def _check_growth(field: str, old: int, new: int) -> None:
    if not isinstance(new, int) or isinstance(new, bool) or new <= old:
        raise ConfigError(f"{field} must be an integer larger than the current {old} (ffn_width only adds neurons), got {new!r}")


@register("ffn_width", family="width", exact=lambda p: p.get("mode", "split") != "noise_copies")
def ffn(
    config: ModelConfig,
    tensors: Tensors,
    *,
    intermediate_size: int | None = None,
    expert_hidden: dict[str, int] | int | None = None,
    tier: str | None = None,
    split: float = 0.6,
    mode: str = "split",
    seed: int = 0,
    noise: float = 0.01,
) -> tuple[ModelConfig, LazyTensors]:
    """Widen the dense FFNs (``intermediate_size``) and/or the experts (``expert_hidden``, one
    size for every tier or ``tier``, or a mapping per tier) by neuron splitting.

    On a model whose every block is a mixture of experts, ``intermediate_size`` is the experts'
    new hidden size (every tier, or ``tier``): it is what the FFN is there; the unused config
    field is left as it is.

    New neuron j copies neuron j mod H.  ``mode``: ``split`` shares each outgoing column as
    ``split``, ``split`` of the rest, ... (exact); ``paired_noise`` shares it equally plus
    zero-sum noise of ``noise`` * init_std across the copies (exact); ``noise_copies`` adds
    independent noise to the copies' incoming rows (not exact); ``fresh`` copies nothing: the
    new neurons get seeded N(0, init_std) incoming rows and zero outgoing columns (exact, like
    LEMON's padding), so they start as new capacity instead of copies that must first drift
    apart.
    """
    if mode not in FFN_MODES:
        raise ConfigError(f"unknown ffn_width mode {mode!r}; choose one of {', '.join(FFN_MODES)}")
    check_split(split)
    _check_noise(noise)
    if mode in ("paired_noise", "noise_copies") and noise == 0:
        raise ConfigError(f"mode {mode!r} needs noise > 0 to make the copies differ; give noise (e.g. 0.01) or use mode 'split'")
    targets = _expert_targets(config, expert_hidden, tier)
    if intermediate_size is not None and config.tiers and not _has_dense_ffn(config):
        targets = _experts_for_intermediate(config, intermediate_size, expert_hidden, tier)
        intermediate_size = None
    if tier is not None and not targets:
        raise ConfigError(f"tier={tier!r} names the tier whose experts grow, but no expert size was given; add expert_hidden (the tier's new hidden size)")
    if intermediate_size is None and not targets:
        raise ConfigError("ffn_width needs intermediate_size and/or expert_hidden (the new sizes)")
    if intermediate_size is not None:
        _check_growth("intermediate_size", config.intermediate_size, intermediate_size)
    for tier_name, size in targets.items():
        _check_growth(f"tiers[{tier_name}].expert_hidden", config.tier(tier_name).expert_hidden, size)

    noise_std = config.init_std if mode == "fresh" else float(noise) * config.init_std
    dense = NeuronSplit(config.intermediate_size, intermediate_size, mode, split, noise_std) if intermediate_size else None
    experts = {t: NeuronSplit(config.tier(t).expert_hidden, h, mode, split, noise_std) for t, h in targets.items()}
    tiers = [dataclasses.replace(t, expert_hidden=targets.get(t.name, t.expert_hidden)) for t in config.tiers]
    changes: dict = {"tiers": tiers}
    if intermediate_size is not None:
        changes["intermediate_size"] = intermediate_size
    new_config = replace_within_budgets(config, "ffn_width growth", **changes)
    check_room(new_config, what="ffn_width growth")

    producers = {name: _ffn_producer(tensors, name, dense, experts, seed) for name in tensors}
    return new_config, lazy_in_order(producers)


def _ffn_producer(tensors: Tensors, name: str, dense: NeuronSplit | None, experts: dict[str, NeuronSplit], seed: int) -> Producer:
    """The producer of output tensor ``name``: grown when it belongs to a widened FFN (a fresh
    generator per lookup keeps its noise the same however often it is looked up)."""
    if dense is not None and _DENSE_IN.fullmatch(name):
        return lambda: dense.incoming(tensors[name], tensor_generator(seed, name))
    if dense is not None and _DENSE_OUT.fullmatch(name):
        return lambda: dense.outgoing(tensors[name], tensor_generator(seed, name))
    match = _EXPERT.fullmatch(name)
    if match and match.group(1) in experts:
        grow = experts[match.group(1)]
        if match.group(2) == "gate_up_proj":
            return lambda: _fused_incoming(grow, tensors[name], tensor_generator(seed, name))
        return lambda: grow.outgoing(tensors[name], tensor_generator(seed, name))
    return ref(tensors, name)
