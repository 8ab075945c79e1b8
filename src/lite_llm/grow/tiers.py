"""Adding a tier: a new router head and expert bank in every MoE layer, unroutable at first.

A tier is the unit of growth a tiered MoE is built for: ``tier_10b`` joins ``tier_1b`` without
touching it.  :func:`add_tier` keeps the model's function exactly:

* every existing tensor is passed through as the very object of the input mapping;
* the new head's ``tier_bias`` is a large negative number, so ``exp`` of its logit underflows
  to exactly 0: its routing probability is 0, the other tiers' softmax is unchanged, top-k
  never picks it (and a route of weight 0 is dropped), so no token reaches its experts;
* the router computes each tier's logits with its own matmul and breaks ties by a hash of the
  tier *name*, so the old tiers' logits and tie-breaks do not depend on the new tier.

Raising (or lowering) ``k_tier`` is different: it changes how many of the existing tiers every
token mixes, so the output cannot be preserved whatever the new tier holds.  :func:`add_tier`
refuses it unless ``change_routing`` acknowledges the change; the growth is then recorded as
not exact, with the measured change of the logits and of the loss.

The new experts start ``random`` (initialised like the model's own ``reset_parameters``),
as ``copy`` (cyclic copies of a source tier's experts) or as ``upcycle`` (every expert the mean
of the source tier's experts); a curriculum ramps ``tier_bias`` up later.

:func:`add_tier_checkpoint` does the same on disk and proves it before committing: every
pre-existing tensor of the output hashes (sha256) like the source's, and, for models small
enough to run, the logits on sample tokens are bitwise equal.  The manifest's
``model_version`` gets a minor bump (old readers may ignore the new tier) and
``progressive.json`` gets an ``add_tier`` record.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.derived import check_new_output, copied_tokenizer, derivation_record, derive, source_tokenizer, utc_now, with_record
from ..checkpoint.lazy import CheckpointTensors, check_sound, open_checkpoint
from ..checkpoint.manifest import next_minor_version
from ..checkpoint.save import write_checkpoint
from ..checkpoint.stream import TensorSpec
from ..config import ModelConfig, TierConfig
from ..errors import ConfigError
from .carry import extend_ewc
from .expand import GrowthError, carried_ewc_dirs, materialize
from .common import refuse_quantized, bank_prefix, check_room, room_at, check_choice, check_noise, check_positive_int, perturb, router_prefix, seeded_normal
from .moe import UNROUTABLE_LIMIT
from .registry import get_op, register
from .tensors import LazyMapping, LazyTensors, Producer, Tensors, expected_specs, ref, stored_names
from .validate import sample_ids

INITS = ("random", "copy", "upcycle")
MAX_VALIDATE_PARAMS = 400_000_000


# ----------------------------------------------------------------------------------- checks
def _check_new_name(config: ModelConfig, tier: str) -> None:
    if not config.tiers:
        raise ConfigError(
            "add_tier adds a tier to a mixture-of-experts model, but this model is dense (it has no tiers); use upcycle to make its FFNs the first tier"
        )
    if tier in {t.name for t in config.tiers}:
        raise ConfigError(f"tier {tier!r} already exists; choose a new name")


def _check_unroutable(bias: object) -> None:
    if not isinstance(bias, (int, float)) or isinstance(bias, bool) or bias > UNROUTABLE_LIMIT:
        raise ConfigError(
            f"unroutable_bias must be <= {UNROUTABLE_LIMIT:g} so that the new tier's routing probability is exactly 0, got {bias!r}"
        )


def _reference_tier(config: ModelConfig, init: str, source_tier: str | None, expert_hidden: int, noise: float) -> TierConfig:
    """The tier the new one is made from (``copy``/``upcycle``) or takes its dtypes from
    (``random``: the first tier)."""
    if init == "random":
        if source_tier is not None:
            raise ConfigError("source_tier applies to init 'copy' or 'upcycle', not 'random'; leave it out or choose another init")
        if noise:
            raise ConfigError("noise applies to init 'copy' or 'upcycle' (random experts already differ); leave it out or choose another init")
        return config.tiers[0]
    names = [t.name for t in config.tiers]
    name = names[0] if source_tier is None else source_tier
    if name not in names:
        raise ConfigError(f"unknown source tier {name!r}; this model has tiers {', '.join(names)}")
    source = config.tier(name)
    if source.expert_hidden != expert_hidden:
        raise ConfigError(
            f"init {init!r} copies experts of hidden size {source.expert_hidden} from tier {name!r}, but the new tier's expert_hidden is {expert_hidden}; "
            f"use expert_hidden={source.expert_hidden} or init 'random'"
        )
    return source


def routed_tiers(config: ModelConfig, k_tier: int | None) -> tuple[int, int]:
    """How many of ``config``'s tiers a token mixes now, and after adding an unroutable tier
    with ``k_tier`` (None: unchanged).  The new tier is never among them, so the old tiers'
    top-k is ``min(k_tier, number of old tiers)``."""
    old = min(config.routing.k_tier, len(config.tiers))
    return old, old if k_tier is None else min(k_tier, len(config.tiers))


def _check_routing_change(config: ModelConfig, k_tier: int | None, change_routing: object) -> None:
    """A k_tier that changes which tiers tokens use needs ``change_routing``; a
    ``change_routing`` with nothing to change is refused too, so a record never calls an
    exact growth inexact."""
    if not isinstance(change_routing, bool):
        raise ConfigError(f"add_tier's change_routing must be true or false, got {change_routing!r}")
    before, after = routed_tiers(config, k_tier)
    if before != after and not change_routing:
        raise ConfigError(
            f"k_tier={k_tier} changes which tiers every token uses (it would mix {after} of the {len(config.tiers)} existing tiers instead of {before}), "
            "so the model's output cannot be preserved; add --change-routing (in a recipe or --set: change_routing: true) to add the tier "
            "as a recorded non-exact change with its measured loss jump, or leave k_tier out to keep the output exact"
        )
    if change_routing and before == after:
        raise ConfigError(
            f"change_routing was given but the routing does not change (every token still mixes {before} of the {len(config.tiers)} existing tiers"
            f"{'' if k_tier is None else f' with k_tier={k_tier}'}), so adding the tier is exact; leave change_routing out"
        )


def _grown_config(config: ModelConfig, new_tier: TierConfig, k_tier: int | None) -> ModelConfig:
    """``config`` with ``new_tier`` appended (and ``k_tier`` when given), budget checked.

    The config checks every tier's budget when it is built: a strict budget the new tier
    exceeds raises there; advisory warnings are silenced while building (the old tiers' were
    given when they were made) and the new tier's alone is given afterwards.
    """
    changes: dict[str, Any] = {"tiers": [*config.tiers, new_tier]}
    if k_tier is not None:
        changes["routing"] = dataclasses.replace(config.routing, k_tier=k_tier)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grown = config.replace(**changes)
    grown._check_budget(grown.tier(new_tier.name))
    return grown


# ----------------------------------------------------------------------------------- tensors
def analog(name: str, tier: str, reference: str) -> str:
    """The reference tier's tensor in the same place as the new tier's ``name`` (the one a new
    tensor takes its dtype from)."""
    return name.replace(f".{tier}.", f".{reference}.", 1)


def _dtype_reader(tensors: Tensors) -> Callable[[str], torch.dtype]:
    """name -> dtype, without reading the tensor when the mapping can say (an opened checkpoint)."""
    spec = getattr(tensors, "spec", None)
    if callable(spec):
        return lambda name: spec(name).dtype
    return functools.cache(lambda name: tensors[name].dtype)


@dataclasses.dataclass(frozen=True)
class _NewTier:
    """What the producers of one new tier need to know."""

    tier: TierConfig
    reference: str
    init: str
    d_model: int
    init_std: float
    residual_std: float
    seed: int
    noise: float
    unroutable_bias: float


def _head_producers(spec: _NewTier, layer: int, dtype_of: Callable[[str], torch.dtype]) -> dict[str, Producer]:
    """The new tier's router head in ``layer``: seeded normal gates, unroutable tier bias."""
    head, t = router_prefix(layer, spec.tier.name), spec.tier

    def dtype(name: str) -> torch.dtype:
        return dtype_of(analog(name, t.name, spec.reference))

    def gate(name: str, rows: int) -> Producer:
        return lambda: seeded_normal((rows, spec.d_model), spec.init_std, spec.seed, name, dtype(name))

    def filled(name: str, rows: int, value: float) -> Producer:
        return lambda: torch.full((rows,), value, dtype=dtype(name))

    return {
        head + "tier_gate": gate(head + "tier_gate", 1),
        head + "group_gate": gate(head + "group_gate", t.num_groups),
        head + "expert_gate": gate(head + "expert_gate", t.num_experts),
        head + "tier_bias": filled(head + "tier_bias", 1, spec.unroutable_bias),
        head + "group_bias": filled(head + "group_bias", t.num_groups, 0.0),
        head + "expert_bias": filled(head + "expert_bias", t.num_experts, 0.0),
    }


def _from_source(source: torch.Tensor, count: int, init: str) -> torch.Tensor:
    """``count`` experts from a source bank (E, ...): cyclic copies, or each the bank's mean."""
    if init == "copy":
        return source[torch.arange(count) % source.shape[0]]
    mean = source.double().mean(0, keepdim=True).to(source.dtype)
    return mean.expand(count, *source.shape[1:]).contiguous()


def _bank_producers(spec: _NewTier, layer: int, tensors: Tensors, dtype_of: Callable[[str], torch.dtype]) -> dict[str, Producer]:
    """The new tier's expert bank in ``layer``."""
    bank, t = bank_prefix(layer, spec.tier.name), spec.tier
    shapes = {"gate_up_proj": (t.num_experts, 2 * t.expert_hidden, spec.d_model), "down_proj": (t.num_experts, spec.d_model, t.expert_hidden)}

    def make(kind: str) -> Producer:
        name = bank + kind
        source = analog(name, t.name, spec.reference)
        if spec.init == "random":  # as the model's reset_parameters: residual writers scaled down
            std = spec.residual_std if kind == "down_proj" else spec.init_std
            return lambda: seeded_normal(shapes[kind], std, spec.seed, name, dtype_of(source))
        return lambda: perturb(_from_source(tensors[source], t.num_experts, spec.init), spec.noise, spec.seed, name)

    return {bank + kind: make(kind) for kind in shapes}


@register("add_tier", family="moe", exact=lambda p: not p.get("change_routing"))
def add_tier(
    config: ModelConfig,
    tensors: Tensors,
    *,
    tier: str,
    num_groups: int,
    experts_per_group: int,
    expert_hidden: int,
    budget: int | str | None = None,
    budget_mode: str = "strict",
    placement: str = "warm",
    init: str = "random",
    source_tier: str | None = None,
    k_group: int | None = None,
    k_expert: int | None = None,
    k_tier: int | None = None,
    change_routing: bool = False,
    seed: int = 0,
    unroutable_bias: float = -1e4,
    noise: float = 0.0,
) -> tuple[ModelConfig, LazyTensors]:
    """A new tier (router head and expert bank in every MoE layer), unroutable — exact.

    ``num_groups`` groups of ``experts_per_group`` experts of width ``expert_hidden``, started
    ``random``, as ``copy`` (cyclic copies of ``source_tier``'s experts, default the first tier)
    or ``upcycle`` (each the mean of the source tier's experts), plus optional ``noise``.  Its
    ``tier_bias`` is ``unroutable_bias``: routing probability exactly 0, output unchanged.
    ``budget`` is checked like any tier's (``budget_mode`` strict: error; advisory: warning).
    A ``k_tier`` that changes how many old tiers a token mixes is refused unless
    ``change_routing`` (then not exact: the routing of every token changes).
    """
    _check_new_name(config, tier)
    for what, value in (("num_groups", num_groups), ("experts_per_group", experts_per_group), ("expert_hidden", expert_hidden)):
        check_positive_int(f"add_tier's {what}", value)
    check_choice("add_tier's init", init, INITS)
    check_noise(noise)
    _check_unroutable(unroutable_bias)
    if k_tier is not None:
        check_positive_int("add_tier's k_tier", k_tier)
    reference = _reference_tier(config, init, source_tier, expert_hidden, noise)
    new_tier = TierConfig(
        tier,
        num_groups=num_groups,
        experts_per_group=experts_per_group,
        expert_hidden=expert_hidden,
        budget=budget,
        budget_mode=budget_mode,
        placement=placement,
        k_group=k_group,
        k_expert=k_expert,
        created_at=utc_now(),
    )
    new_config = _grown_config(config, new_tier, k_tier)
    _check_routing_change(config, k_tier, change_routing)
    spec = _NewTier(
        tier=new_tier,
        reference=reference.name,
        init=init,
        d_model=config.d_model,
        init_std=config.init_std,
        residual_std=config.init_std / (2 * config.n_layers) ** 0.5,
        seed=seed,
        noise=float(noise),
        unroutable_bias=float(unroutable_bias),
    )
    dtype_of = _dtype_reader(tensors)
    new: dict[str, Producer] = {}
    for layer in config.moe_layer_indices:
        new.update(_head_producers(spec, layer, dtype_of))
        new.update(_bank_producers(spec, layer, tensors, dtype_of))
    # Every other name is the input's own tensor; the order is the new model's storage order.
    return new_config, LazyTensors({name: new.get(name) or ref(tensors, name) for name in stored_names(new_config)})


# ----------------------------------------------------------------------------------- on disk
def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes: equal digests mean bitwise-equal tensors."""
    t = t.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


class _DigestingTensors(LazyMapping):
    """Hands tensors to the writer unchanged, recording the sha256 of the ``watched`` ones as
    they go out: the hashes are of exactly what is written, at no extra read."""

    def __init__(self, tensors: Tensors, watched: set[str]) -> None:
        self._tensors, self._watched = tensors, watched
        self._names = tensors
        self.digests: dict[str, str] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        if name in self._watched:
            self.digests[name] = tensor_sha256(t)
        return t


def _source_digests(src: CheckpointTensors, verify: bool) -> dict[str, str]:
    """The source's soundness (file hashes), then the sha256 of each of its tensors — run in a
    background thread while the output is written."""
    if verify:
        check_sound(src.path)
    return {name: tensor_sha256(src.tensors[name]) for name in src.tensors}


def _check_unchanged(expected: dict[str, str], written: dict[str, str]) -> None:
    changed = [name for name, digest in expected.items() if written.get(name) != digest]
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise GrowthError(
            f"tensor {changed[0]}{more} of the output does not hash like the source's; nothing was written — please report this"
        )


def _run_both(src: CheckpointTensors, config: ModelConfig, tensors: Tensors) -> tuple[dict[str, torch.Tensor], torch.Tensor, Any, Any]:
    """The grown tensors in memory (so writing reads nothing again), the sample tokens, and
    the model outputs (logits and loss) of the source and the grown model on them."""
    before = materialize(src.config, src.tensors)
    state = {name: tensors[name] for name in tensors}
    grown = materialize(config, state)
    ids = sample_ids(src.config.vocab_size, source_tokenizer(src))
    with torch.no_grad():
        return state, ids, before(ids, labels=ids), grown(ids, labels=ids)


def _check_logits(src: CheckpointTensors, config: ModelConfig, tensors: Tensors) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run the source and the grown model on sample tokens; their logits must be bitwise equal.

    Returns the grown model's tensors and the preservation record."""
    state, ids, a, b = _run_both(src, config, tensors)
    if not torch.equal(a.logits, b.logits):
        diff = float((a.logits.double() - b.logits.double()).abs().max())
        raise GrowthError(f"adding the tier changed the logits (max abs difference {diff:.3g}); nothing was written — please report this")
    return state, {"max_abs": 0.0, "mse": 0.0, "loss_jump": 0.0, "tokens": int(ids.numel()), "bitwise": True}


def _measure_change(src: CheckpointTensors, config: ModelConfig, tensors: Tensors) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A growth that changes the routing on purpose: how much the logits (compared in fp64)
    and the next-token loss on sample tokens moved."""
    state, ids, a, b = _run_both(src, config, tensors)
    diff = a.logits.double() - b.logits.double()
    loss_before, loss_after = float(a.lm_loss), float(b.lm_loss)
    return state, {
        "max_abs": float(diff.abs().max()),
        "mse": float(diff.square().mean()),
        "loss_before": loss_before,
        "loss_after": loss_after,
        "loss_jump": loss_after - loss_before,
        "tokens": int(ids.numel()),
        "bitwise": False,
    }


def _specs(src: CheckpointTensors, config: ModelConfig, tier: str, reference: str) -> dict[str, TensorSpec]:
    """Storage specs: old tensors as stored in the source, new ones in the dtype of their
    analog in the reference tier (what :func:`add_tier` produces)."""
    specs = expected_specs(config, src.dtype)
    for name, shape_spec in specs.items():
        stored = name if name in src.tensors else analog(name, tier, reference)
        specs[name] = TensorSpec(src.tensors.spec(stored).dtype, shape_spec.shape)
    return specs


def _tier_record(
    src: CheckpointTensors,
    params: dict[str, Any],
    after: ModelConfig,
    tier: TierConfig,
    versions: tuple[str, str],
    preservation: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ``progressive.json`` record: expand's record, plus the tier and the versions; a
    routing change is recorded as not exact, with what it did to the output."""
    exact = not params.get("change_routing")
    record = derivation_record(src, "add_tier", params, exact, src.config, after, preservation=None)
    note = None
    if not exact:
        before_k, after_k = routed_tiers(src.config, params.get("k_tier"))
        note = f"k_tier {src.config.routing.k_tier} -> {after.routing.k_tier}: every token now mixes {after_k} old tiers instead of {before_k}; not function-preserving"
    if preservation is None:
        note = (note + "; " if note else "") + "logits not compared: model larger than max_validate_params (run lite-llm validate)"
    record.update(
        tier=tier.name,
        created_at=tier.created_at,
        tier_params=after.tier_params(tier),
        model_version_before=versions[0],
        model_version_after=versions[1],
        old_tensors_verified="sha256",
        preservation=preservation,
        note=note,
    )
    return record


def add_tier_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    verify: bool = True,
    max_validate_params: int = MAX_VALIDATE_PARAMS,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
    **params: Any,
) -> Path:
    """Add a tier (see :func:`add_tier`, which ``params`` go to) to the checkpoint at ``source``,
    writing a new checkpoint at ``output``; returns its path.

    Nothing is committed unless the source is sound (``verify``), every pre-existing tensor of
    the output hashes like the source's, and — below ``max_validate_params`` parameters — the
    logits on sample tokens are bitwise equal (``change_routing``: their change is measured and
    recorded instead).  The manifest's ``model_version`` is the
    source's with the minor version bumped; ``progressive.json`` gains an ``add_tier`` record.
    """
    out = Path(output)
    src = open_checkpoint(source, verify=False)
    check_new_output(out, src.path, overwrite=overwrite)  # before any work
    refuse_quantized(src.config, "add a tier to")
    with room_at(out, src.dtype):  # a tier the output's disk cannot hold is refused before it is built
        config, tensors = get_op("add_tier")(src.config, src.tensors, **params)
        check_room(config, what=f"adding the tier {params.get('tier')!r}")
    return derive(
        src.path,
        out,
        lambda digests: _write(src, out, params, config, tensors, digests, max_validate_params, max_shard_bytes),
        check_source=lambda: _source_digests(src, verify),
        overwrite=overwrite,
    )


def _write(
    src: CheckpointTensors,
    out: Path,
    params: dict[str, Any],
    config: ModelConfig,
    tensors: Tensors,
    digests: Future,
    max_validate_params: int,
    max_shard_bytes: int,
) -> Path:
    preservation = None
    if src.config.num_params() <= max_validate_params:
        check = _measure_change if params.get("change_routing") else _check_logits
        tensors, preservation = check(src, config, tensors)
    tier = config.tiers[-1]
    versions = (src.manifest["model_version"], next_minor_version(src.manifest["model_version"]))
    progressive = with_record(src.progressive, _tier_record(src, params, config, tier, versions, preservation))
    reference = params.get("source_tier") or src.config.tiers[0].name
    extra_dirs = carried_ewc_dirs(src, progressive, ["add_tier"], lambda f, a: extend_ewc(config, tensors, f, a))
    written = _DigestingTensors(tensors, set(src.tensors))
    return write_checkpoint(
        out,
        config,
        written,
        specs=_specs(src, config, tier.name, reference),
        tokenizer=copied_tokenizer(src),
        progressive=progressive,
        extra_dirs=extra_dirs,
        max_shard_bytes=max_shard_bytes,
        before_commit=lambda: _check_unchanged(digests.result(), written.digests),
        model_version=versions[1],
    )
