"""Mixture-of-experts growth: sparse upcycling, and more experts for an existing tier.

* ``upcycle``: every expert of a new tier is a copy of its layer's dense SwiGLU FFN.  An MoE
  block outputs ``sum_k w_k f_k(x)`` over its active experts; with every ``f_k = f`` and the
  weights renormalised to ``sum_k w_k = 1`` this is ``f(x)`` whatever the router says, so the
  router can start anywhere (seeded normal, or zeros).  Exact to fp32 rounding (the fused
  gate/up matmul and the weighted sum round differently from the dense FFN); ``noise`` trades
  exactness for experts that start apart.
* ``add_experts``: ``count`` more experts in every group of a tier.  Their ``expert_bias`` is a
  large negative number, so ``exp`` of their logit underflows to exactly 0 in fp32: their
  routing probability is 0, the old experts' softmax is unchanged, and top-k never picks
  them.  The function is unchanged at step 0; a curriculum ramps the bias up later.
* :func:`old_expert_mask`: which rows of the grown tensors hold the pre-growth experts — the
  masks that :class:`~lite_llm.train.freezing.PartialFreeze` keeps fixed.

Tensor layout (see :mod:`lite_llm.model.router` and :mod:`lite_llm.model.experts`): router
``expert_gate`` (G*E, d) and ``expert_bias`` (G*E,) and the expert banks ``gate_up_proj``
(G*E, 2H, d), ``down_proj`` (G*E, d, H) are group-major: expert e of group g is row g*E+e.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable

import torch

from ..config import ModelConfig, TierConfig
from ..errors import ConfigError
from .common import bank_prefix, check_choice, replace_within_budgets, check_noise, check_positive_int, perturb, router_prefix, seeded_normal
from .registry import register
from .tensors import LazyTensors, Producer, Tensors, ref

UNROUTABLE_LIMIT = -1000.0  # exp(-1000) is 0 in fp32, fp16 and bf16 (fp32 underflows below about -104)
_DENSE_FFN = re.compile(r"^layers\.(\d+)\.ffn\.(gate_proj|up_proj|down_proj)\.weight$")


# ----------------------------------------------------------------------------------- upcycle
def _upcycle_layers(config: ModelConfig, layers: list[int] | None) -> list[int]:
    n = config.n_layers
    if layers is None:
        return list(range(n))
    chosen = sorted({int(i) for i in layers})
    if not chosen:
        raise ConfigError("upcycle's layers is empty; list at least one layer or leave it out to upcycle every layer")
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise ConfigError(f"layer indices {bad} are out of range for a model with {n} layers (valid: 0..{n - 1})")
    return chosen


def _upcycled_ffn(
    tensors: Tensors,
    layer: int,
    tier: TierConfig,
    d_model: int,
    router_init: str,
    init_std: float,
    noise: float,
    seed: int,
) -> dict[str, Producer]:
    """Producers of one layer's router head and expert bank, replacing its dense FFN.

    Every expert's ``gate_up_proj`` is ``cat([gate, up])`` and its ``down_proj`` is ``down``,
    which is exactly the dense SwiGLU ``down(silu(gate x) * up x)``.
    """
    src = f"layers.{layer}.ffn."
    gate, up, down = src + "gate_proj.weight", src + "up_proj.weight", src + "down_proj.weight"
    n_experts = tier.num_experts
    dtype_of = functools.cache(lambda name: tensors[name].dtype)  # one read per layer; a dtype, never a tensor, is kept
    router, bank = router_prefix(layer, tier.name), bank_prefix(layer, tier.name)

    def gate_rows(name: str, rows: int) -> Producer:
        def make() -> torch.Tensor:
            shape = (rows, d_model)
            if router_init == "zeros":
                return torch.zeros(shape, dtype=dtype_of(gate))
            return seeded_normal(shape, init_std, seed, name, dtype_of(gate))

        return make

    def zeros(rows: int) -> Producer:
        return lambda: torch.zeros(rows, dtype=dtype_of(gate))

    def gate_up() -> torch.Tensor:
        fused = torch.cat([tensors[gate], tensors[up]], 0)
        return perturb(fused.unsqueeze(0).repeat(n_experts, 1, 1), noise, seed, bank + "gate_up_proj")

    def down_proj() -> torch.Tensor:
        return perturb(tensors[down].unsqueeze(0).repeat(n_experts, 1, 1), noise, seed, bank + "down_proj")

    return {
        router + "tier_gate": gate_rows(router + "tier_gate", 1),
        router + "group_gate": gate_rows(router + "group_gate", tier.num_groups),
        router + "expert_gate": gate_rows(router + "expert_gate", n_experts),
        router + "tier_bias": zeros(1),
        router + "group_bias": zeros(tier.num_groups),
        router + "expert_bias": zeros(n_experts),
        bank + "gate_up_proj": gate_up,
        bank + "down_proj": down_proj,
    }


@register("upcycle", family="moe", exact=lambda p: not p.get("noise"))
def upcycle(
    config: ModelConfig,
    tensors: Tensors,
    *,
    num_experts: int = 8,
    num_groups: int = 1,
    tier: str = "tier_0",
    k_expert: int = 2,
    k_group: int = 1,
    layers: list[int] | None = None,
    router_init: str = "normal",
    noise: float = 0.0,
    seed: int = 0,
    budget: int | str | None = None,
    placement: str = "hot",
) -> tuple[ModelConfig, LazyTensors]:
    """Sparse upcycling: the dense FFNs become one tier of copied experts — exact.

    ``num_groups`` groups of ``num_experts`` experts each (per layer), every one a copy of the
    layer's FFN, in ``layers`` (default: all).  Routing is set to ``k_tier=1``, ``k_group``,
    ``k_expert`` and renormalised weights, so the output equals the dense FFN's whatever the
    router (``router_init``: seeded ``normal`` at init_std, or ``zeros``).  ``noise`` (a
    fraction of each tensor's std) makes the copies differ; then it is no longer exact.
    """
    if config.tiers:
        names = ", ".join(t.name for t in config.tiers)
        raise ConfigError(
            f"upcycle turns a dense model into a mixture of experts, but this model already has tiers ({names}); "
            "use add_experts to add experts to a tier, or add_tier to add a tier"
        )
    chosen = _upcycle_layers(config, layers)
    check_positive_int("upcycle's num_experts (experts per group)", num_experts)
    check_positive_int("upcycle's num_groups", num_groups)
    check_positive_int("upcycle's k_expert", k_expert)
    check_positive_int("upcycle's k_group", k_group)
    if k_expert > num_experts:
        raise ConfigError(f"k_expert={k_expert} is larger than num_experts={num_experts} (the experts per group); choose k_expert <= {num_experts}")
    if k_group > num_groups:
        raise ConfigError(f"k_group={k_group} is larger than num_groups={num_groups}; choose k_group <= {num_groups}")
    check_choice("upcycle's router_init", router_init, ("normal", "zeros"))
    check_noise(noise)

    new_tier = TierConfig(
        tier,
        num_groups=num_groups,
        experts_per_group=num_experts,
        expert_hidden=config.intermediate_size,
        budget=budget,
        placement=placement,
    )
    routing = dataclasses.replace(config.routing, k_tier=1, k_group=k_group, k_expert=k_expert, renormalize=True)
    moe_layers = None if len(chosen) == config.n_layers else chosen
    new_config = config.replace(tiers=[new_tier], routing=routing, moe_layers=moe_layers)

    producers: dict[str, Producer] = {}
    done: set[int] = set()
    for name in tensors:
        match = _DENSE_FFN.match(name)
        layer = int(match.group(1)) if match else -1
        if layer not in chosen:
            producers[name] = ref(tensors, name)
        elif layer not in done:  # the MoE tensors take the dense FFN's place in the order
            done.add(layer)
            producers.update(_upcycled_ffn(tensors, layer, new_tier, config.d_model, router_init, config.init_std, noise, seed))
    missing = [i for i in chosen if i not in done]
    if missing:
        raise ConfigError(f"layers {missing} have no dense FFN tensors (ffn.gate_proj/up_proj/down_proj) to upcycle; is this checkpoint complete?")
    return new_config, LazyTensors(producers)


# ----------------------------------------------------------------------------------- add_experts
def _with_new_experts(old: torch.Tensor, groups: int, per_group: int, new: torch.Tensor) -> torch.Tensor:
    """Rows ``old`` (G*E, ...) with ``new`` (G, c, ...) appended to each group: (G*(E+c), ...).

    Old row ``g*E + e`` lands at ``g*(E+c) + e``; new expert j of group g at ``g*(E+c) + E + j``.
    """
    rest = old.shape[1:]
    grown = torch.cat([old.reshape(groups, per_group, *rest), new.to(old.dtype)], dim=1)
    return grown.reshape(groups * (per_group + new.shape[1]), *rest)


def _sources(old: torch.Tensor, groups: int, per_group: int, count: int) -> torch.Tensor:
    """(G, count, ...): new expert j of group g copies old expert (g, j % E)."""
    index = torch.tensor([j % per_group for j in range(count)])
    return old.reshape(groups, per_group, *old.shape[1:])[:, index]


def _grown_tier_tensor(
    kind: str,
    name: str,
    tensors: Tensors,
    tier: TierConfig,
    count: int,
    *,
    init: str,
    router_init: str,
    noise: float,
    seed: int,
    init_std: float,
    residual_std: float,
    unroutable_bias: float,
) -> Producer:
    """The producer of one grown tensor of the tier (``kind`` is its last name component)."""
    G, E = tier.num_groups, tier.experts_per_group

    def make() -> torch.Tensor:
        old = tensors[name]
        if kind == "expert_bias":
            new = torch.full((G, count), unroutable_bias, dtype=old.dtype)
        elif kind == "expert_gate":
            new = _sources(old, G, E, count) if router_init == "copy" else torch.zeros(G, count, old.shape[1], dtype=old.dtype)
        elif init == "copy":
            new = perturb(_sources(old, G, E, count), noise, seed, name)
        else:  # random, initialised like the model's own reset_parameters
            std = residual_std if kind == "down_proj" else init_std
            new = seeded_normal((G, count, *old.shape[1:]), std, seed, name, old.dtype)
        return _with_new_experts(old, G, E, new)

    return make


@register("add_experts", family="moe", exact=lambda p: True)
def add_experts(
    config: ModelConfig,
    tensors: Tensors,
    *,
    tier: str,
    count: int,
    init: str = "copy",
    router_init: str = "copy",
    noise: float = 0.0,
    seed: int = 0,
    unroutable_bias: float = -1e4,
) -> tuple[ModelConfig, LazyTensors]:
    """``count`` more experts in every group of a tier, unroutable until ramped in — exact.

    New expert j of group g is a copy of expert (g, j % E) (``init="copy"``, plus optional
    ``noise``) or seeded random (``init="random"``); its router row copies the source's
    (``router_init="copy"``) or is zero.  Its ``expert_bias`` is ``unroutable_bias``, so its
    routing probability is exactly 0 and the model's output is unchanged.
    """
    names = [t.name for t in config.tiers]
    if tier not in names:
        raise ConfigError(f"unknown tier {tier!r}; this model has tiers {', '.join(names) or '(none: upcycle it first)'}")
    check_positive_int("add_experts' count", count)
    check_choice("add_experts' init", init, ("copy", "random"))
    check_choice("add_experts' router_init", router_init, ("copy", "zeros"))
    check_noise(noise)
    if not isinstance(unroutable_bias, (int, float)) or unroutable_bias > UNROUTABLE_LIMIT:
        raise ConfigError(
            f"unroutable_bias must be <= {UNROUTABLE_LIMIT:g} so that a new expert's routing probability is exactly 0, got {unroutable_bias!r}"
        )
    old_tier = config.tier(tier)
    grown_tier = dataclasses.replace(old_tier, experts_per_group=old_tier.experts_per_group + count)
    new_config = replace_within_budgets(config, f"add_experts count={count}", tiers=[grown_tier if t.name == tier else t for t in config.tiers])

    pattern = re.compile(
        rf"^layers\.\d+\.ffn\.(?:router\.heads\.{re.escape(tier)}\.(expert_gate|expert_bias)|experts\.{re.escape(tier)}\.(gate_up_proj|down_proj))$"
    )
    make: Callable[[str, str], Producer] = functools.partial(
        _grown_tier_tensor,
        tensors=tensors,
        tier=old_tier,
        count=count,
        init=init,
        router_init=router_init,
        noise=noise,
        seed=seed,
        init_std=config.init_std,
        residual_std=config.init_std / (2 * config.n_layers) ** 0.5,
        unroutable_bias=float(unroutable_bias),
    )
    producers: dict[str, Producer] = {}
    for name in tensors:
        match = pattern.match(name)
        producers[name] = make(match.group(1) or match.group(2), name) if match else ref(tensors, name)
    return new_config, LazyTensors(producers)


# ----------------------------------------------------------------------------------- masks
def old_expert_mask(old_config: ModelConfig, new_config: ModelConfig) -> dict[str, torch.Tensor]:
    """Per tensor of the grown model, True on the rows that hold a pre-growth expert.

    Covers every tier of every MoE layer of ``new_config``: router ``expert_gate`` rows and
    ``expert_bias`` entries, and the first dimension of ``gate_up_proj``/``down_proj``.  A tier
    or MoE layer absent from ``old_config`` is all False.  Meant for growth that keeps layer
    indices and group counts (``add_experts``, adding a tier): old expert (g, e) of a tier with
    E old and E' new experts per group sits at row ``g*E' + e``.
    """
    old_tiers = {t.name: t for t in old_config.tiers}
    masks: dict[str, torch.Tensor] = {}
    for layer in new_config.moe_layer_indices:
        for tier in new_config.tiers:
            mask = torch.zeros(tier.num_groups, tier.experts_per_group, dtype=torch.bool)
            old = old_tiers.get(tier.name)
            if old is not None and old_config.is_moe_layer(layer):
                if old.num_groups != tier.num_groups or old.experts_per_group > tier.experts_per_group:
                    raise ConfigError(
                        f"tier {tier.name} went from {old.num_groups}x{old.experts_per_group} to {tier.num_groups}x{tier.experts_per_group} "
                        "(groups x experts per group); old experts can only be located when the groups stay and experts are added"
                    )
                mask[:, : old.experts_per_group] = True
            flat = mask.flatten()
            router, bank = router_prefix(layer, tier.name), bank_prefix(layer, tier.name)
            for name in (router + "expert_gate", router + "expert_bias", bank + "gate_up_proj", bank + "down_proj"):
                masks[name] = flat.clone()
    return masks
