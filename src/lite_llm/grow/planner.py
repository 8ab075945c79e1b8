"""The growth planner: from a model to a target size, which growth steps, at what cost.

A plan is a list of recipe steps (so ``lite-llm plan ... --write-recipe grow.yaml`` feeds
``lite-llm expand --recipe``).  Each step's resulting config comes from running the growth
operation itself on a names-only tensor mapping (operations are lazy, so no weight is ever
touched), which keeps the planner's arithmetic identical to what ``expand`` will build — and
runs every check ``expand`` runs (tier budgets, head groups, k limits).

How a plan is found.  The planner enumerates *shapes* a user would grow to, in steps a user
would take, and proposes one only after running its whole chain of operations:

* depth: LLaMA-Pro identity blocks, at most twice the depth per step and
  :data:`MAX_DEPTH_FACTOR` times the source's depth in all;
* width: doublings (hidden size, attention heads as whole KV groups, FFN / expert widths),
  at most :data:`MAX_WIDTH_DOUBLINGS`;
* experts (strategy ``moe``): a dense model is upcycled to a power of two of experts (at
  most :data:`MAX_EXPERTS` per tier); a tier's experts are doubled up to that; further
  capacity comes as new tiers (at most :data:`MAX_NEW_TIERS`, each a power of two of experts,
  copies of the first tier or fresh experts 2x/4x as wide), and only when that cannot reach
  the target is the dense part grown first.

Tier budgets.  A strict budget is a guard against growing a tier by accident, so by default
the planner honours it: a shape that would take a tier past it is refused like any failed
check.  With ``raise_budgets`` (``lite-llm plan --raise-budgets``) the user says the growth is
on purpose: shapes are searched on the source with its strict budgets lifted (by the
``budget`` op itself), so the strategy's preferred shape is proposed even where a less
preferred one would fit within the budgets.  The plan found starts with one ``budget`` step
per tier whose strict budget its final model exceeds, setting the budget to exactly that
tier's final size: growth only adds parameters to a tier, so that size bounds every step
before it, and the guard stays as tight as it was.  The whole chain, budget steps first, is
then run again from the source itself, every check included, so the recipe runs through
``expand`` as it is.  A budget that is advisory (it only warns), or that the final model does
not exceed, gets no step.

A plan is proposed when its final size is within ``tolerance`` (relative) of the target.
The strategies differ in which shape they prefer: ``depth_first`` the least width growth,
``width_first`` the most, ``balanced`` depth and width factors alike, ``moe`` the least
compute per token.  When no shape fits, :class:`PlanError` says so in one sentence with the
closest size that passes the checks.

Cost model (a heuristic, stated so it can be argued with): after each growth the model is
trained on ``tokens_per_param`` tokens per parameter *added* by that step (Chinchilla's 20
tokens per parameter, spent on the new capacity only), at the grown model's training FLOPs
per token (6 x active parameters + attention).  Training the target from scratch costs
``tokens_per_param`` x its parameters tokens at its own FLOPs per token.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ModelConfig, flops_per_token, format_size
from ..errors import ConfigError
from .recipe import GrowthStep
from .registry import get_op
from .tensors import LazyMapping, stored_names

STRATEGIES = ("depth_first", "width_first", "balanced", "moe")
DEFAULT_TOLERANCE = 0.1
MAX_DEPTH_FACTOR = 4  # layers: at most 4x the source's
MAX_WIDTH_DOUBLINGS = 3  # hidden size: at most 8x the source's
MAX_EXPERTS = 64  # experts per tier, a power of two
MAX_NEW_TIERS = 3
_EXPERT_COUNTS = tuple(2**i for i in range(1, int(math.log2(MAX_EXPERTS)) + 1))
_TIER_WIDTHS = (1, 2, 4)  # a new tier's expert hidden size, in multiples of the first tier's


class PlanError(ConfigError):
    """No plan of sane steps reaches the target within the tolerance."""


class _NamesOnly(LazyMapping):
    """The tensor names of a config with no values: enough for a lazy growth op's config."""

    def __init__(self, config: ModelConfig) -> None:
        self._names = stored_names(config)

    def __getitem__(self, name: str) -> torch.Tensor:
        raise RuntimeError(f"the planner never reads weights (asked for {name})")


@dataclass
class PlannedStep:
    step: GrowthStep
    config: ModelConfig
    params: int
    active_params: int
    added_params: int
    tokens: int
    flops: float


@dataclass
class Plan:
    strategy: str
    source: ModelConfig
    target_params: int
    steps: list[PlannedStep] = field(default_factory=list)
    seq_len: int = 2048
    tokens_per_param: float = 20.0
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def final(self) -> ModelConfig:
        return self.steps[-1].config if self.steps else self.source

    @property
    def growth_flops(self) -> float:
        return sum(s.flops for s in self.steps)

    @property
    def scratch_flops(self) -> float:
        final = self.final
        return float(flops_per_token(final, self.seq_len)) * self.tokens_per_param * final.num_params()

    @property
    def error(self) -> float:
        """The final size's relative distance from the target."""
        return self.final.num_params() / self.target_params - 1.0

    def recipe(self) -> dict[str, Any]:
        return {"steps": [{"method": s.step.method, **s.step.params} for s in self.steps]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "source_params": self.source.num_params(),
            "target_params": self.target_params,
            "final_params": self.final.num_params(),
            "tolerance": self.tolerance,
            "growth_flops": self.growth_flops,
            "scratch_flops": self.scratch_flops,
            "steps": [
                {"method": s.step.method, "params": s.step.params, "params_after": s.params, "active_after": s.active_params, "tokens": s.tokens, "flops": s.flops}
                for s in self.steps
            ],
        }


def _apply(config: ModelConfig, method: str, **params: Any) -> ModelConfig:
    """The config ``method`` makes of ``config``: the real operation with all its checks."""
    new_config, _ = get_op(method)(config, _NamesOnly(config), **params)
    return new_config


# ----------------------------------------------------------------------------------- budgets
def _strict_tiers(config: ModelConfig) -> list[str]:
    """The tiers whose budget is strict: the only ones that refuse a growth (an advisory
    budget just warns, so it never needs raising)."""
    return [t.name for t in config.tiers if t.budget is not None and t.budget_mode == "strict"]


def _unbudgeted(config: ModelConfig) -> ModelConfig:
    """``config`` with its strict budgets removed by the ``budget`` op: where a plan that may
    raise budgets searches its shapes (no other check is lifted)."""
    for name in _strict_tiers(config):
        config = _apply(config, "budget", tier=name, size="none")
    return config


def _budget_steps(source: ModelConfig, final: ModelConfig) -> list[GrowthStep]:
    """A ``budget`` step for each strict budget of ``source`` that ``final`` exceeds, raising
    it to exactly that tier's parameters in ``final``: enough for every step on the way (growth
    only adds to a tier), and no slack for a later accident to hide in."""
    steps = []
    for name in _strict_tiers(source):
        need = final.tier_params(final.tier(name))
        if need > source.tier(name).budget:
            steps.append(GrowthStep("budget", {"tier": name, "size": need}))
    return steps


def _chain(source: ModelConfig, search: ModelConfig, moves: list[tuple]) -> list[tuple[GrowthStep, ModelConfig]]:
    """The plan's steps from ``source``, each with the config after it.  ``search`` is the
    config the shapes were found on: ``source`` itself, or ``source`` with its strict budgets
    lifted — then the budget steps the final model needs come first, and the whole chain is run
    again from ``source`` (raises the first check that fails, budgets included)."""
    chain = _run(search, moves)
    if search is source:
        return chain
    return _run(source, [("step", step) for step in _budget_steps(source, chain[-1][1])] + moves)


# ----------------------------------------------------------------------------------- moves
# A candidate is a list of *moves*; a move becomes recipe steps only when the chain is run,
# because a width doubling's parameters depend on the config it meets.


def _depth_targets(start: int, end: int) -> list[int]:
    """Layer counts from ``start`` to ``end`` in steps of at most 2x, spaced geometrically."""
    if end <= start:
        return []
    count = math.ceil(math.log2(end / start) - 1e-12)
    out: list[int] = []
    for i in range(1, count + 1):
        layers = max(round(start * (end / start) ** (i / count)), (out[-1] if out else start) + 1)
        out.append(min(layers, end))
    return out


def _width_steps(config: ModelConfig) -> list[GrowthStep]:
    """Double the model's width exactly: hidden size, attention heads (whole KV groups, so
    GQA stays intact) and FFN / expert hidden sizes."""
    steps = [GrowthStep("width", {"d_model": 2 * config.d_model}), GrowthStep("heads", {"n_heads": 2 * config.n_heads, "mode": "split"})]
    ffn: dict[str, Any] = {}
    if len(config.moe_layer_indices) < config.n_layers:
        ffn["intermediate_size"] = 2 * config.intermediate_size
    if config.tiers:
        ffn["expert_hidden"] = {t.name: 2 * t.expert_hidden for t in config.tiers}
    steps.append(GrowthStep("ffn_width", ffn))
    return steps


def _dense_moves(n: int, layers: int, doublings: int, strategy: str) -> list[tuple]:
    """The moves growing ``n`` layers to ``layers`` and the width by 2**``doublings``, in the
    strategy's order: depth first, width first, or alternating (balanced, moe)."""
    depth = [("depth", t) for t in _depth_targets(n, layers)]
    width = [("width",)] * doublings
    if strategy == "depth_first":
        return depth + width
    if strategy == "width_first":
        return width + depth
    out: list[tuple] = []
    for d, w in itertools.zip_longest(depth, width):
        out += [m for m in (d, w) if m is not None]
    return out


def _run(source: ModelConfig, moves: list[tuple]) -> list[tuple[GrowthStep, ModelConfig]]:
    """Every step of ``moves`` with the config after it (raises the first check that fails)."""
    config, out = source, []
    for move in moves:
        if move[0] == "depth":
            steps = [GrowthStep("llama_pro", {"target_layers": move[1]})]
        elif move[0] == "width":
            steps = _width_steps(config)
        else:
            steps = [move[1]]
        for step in steps:
            config = _apply(config, step.method, **step.params)
            out.append((step, config))
    return out


# ----------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class _Candidate:
    moves: tuple
    estimate: int  # parameters the moves should reach (verified by running them)
    preference: tuple  # the strategy's order (lower first); closeness breaks ties


def _closeness(estimate: int, target: int) -> float:
    return abs(estimate / target - 1.0)


class _Refusals:
    """The first check a candidate failed: reported when no plan fits."""

    def __init__(self) -> None:
        self.first: str | None = None

    def note(self, exc: ConfigError) -> None:
        self.first = self.first or str(exc)


def _dense_bases(source: ModelConfig, refusals: _Refusals) -> list[tuple[int, ModelConfig, int | None]]:
    """Per width doubling w that passes its checks: (w, the widened config, parameters one
    more layer adds, None when depth growth is refused)."""
    out = []
    for w in range(MAX_WIDTH_DOUBLINGS + 1):
        try:
            config = _run(source, [("width",)] * w)[-1][1] if w else source
        except ConfigError as exc:
            refusals.note(exc)
            break
        try:
            per_layer = _apply(config, "llama_pro", target_layers=config.n_layers + 1).num_params() - config.num_params()
        except ConfigError as exc:
            refusals.note(exc)
            per_layer = None
        out.append((w, config, per_layer))
    return out


def _dense_shapes(source: ModelConfig, refusals: _Refusals) -> Iterator[tuple[int, int, int]]:
    """(layers, width doublings, estimated parameters) of every shape within the caps."""
    n = source.n_layers
    for w, config, per_layer in _dense_bases(source, refusals):
        top = n * MAX_DEPTH_FACTOR if per_layer is not None else n
        for layers in range(n, top + 1):
            yield layers, w, config.num_params() + (layers - n) * (per_layer or 0)


def _dense_preference(strategy: str, n: int, layers: int, w: int) -> tuple:
    if strategy == "depth_first":
        return (w,)
    if strategy == "width_first":
        return (-w,)
    # balanced: depth and width factors alike, to half a doubling (closeness decides within)
    return (round(2 * abs(math.log2(layers / n) - w)) / 2,)


def _dense_candidates(source: ModelConfig, strategy: str, refusals: _Refusals) -> Iterator[_Candidate]:
    for layers, w, estimate in _dense_shapes(source, refusals):
        if (layers, w) != (source.n_layers, 0):
            moves = tuple(_dense_moves(source.n_layers, layers, w, strategy))
            yield _Candidate(moves, estimate, _dense_preference(strategy, source.n_layers, layers, w))


# ----------------------------------------------------------------------------------- experts
def _tier_name(params: int, taken: set[str]) -> str:
    """A new tier's name from its size (``tier_151m``), unique among ``taken``."""
    for scale, suffix in ((10**9, "b"), (10**6, "m"), (10**3, "k"), (1, "")):
        if params >= scale:
            base = f"tier_{round(params / scale)}{suffix}"
            break
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


@dataclass(frozen=True)
class _TierOption:
    """A tier the planner may add: its add_tier parameters (but the name) and its size."""

    params: dict
    size: int
    fresh: bool  # random experts (wider than the first tier's), not copies


def _tier_options(config: ModelConfig, refusals: _Refusals) -> list[_TierOption]:
    """New tiers shaped like the first tier (same groups), a power of two of experts, copies
    of its experts or fresh ones 2x/4x as wide — each checked by running add_tier."""
    ref = config.tiers[0]
    out = []
    for total, factor in itertools.product(_EXPERT_COUNTS, _TIER_WIDTHS):
        if total % ref.num_groups:
            continue
        params = {"num_groups": ref.num_groups, "experts_per_group": total // ref.num_groups, "expert_hidden": ref.expert_hidden * factor}
        params["init"] = "copy" if factor == 1 else "random"
        try:
            size = _apply(config, "add_tier", tier="tier_planned", **params).num_params() - config.num_params()
        except ConfigError as exc:
            refusals.note(exc)
            continue
        out.append(_TierOption(params, size, factor != 1))
    return out


def _expert_options(config: ModelConfig, refusals: _Refusals) -> list[list[tuple[GrowthStep | None, int]]]:
    """Per existing tier: (step, added parameters) for keeping it, or doubling its experts
    (once, twice, ...) while it stays within MAX_EXPERTS and its budget."""
    out = []
    for tier in config.tiers:
        options: list[tuple[GrowthStep | None, int]] = [(None, 0)]
        total = tier.num_experts * 2
        while total <= MAX_EXPERTS:
            count = total // tier.num_groups - tier.experts_per_group
            step = GrowthStep("add_experts", {"tier": tier.name, "count": count})
            try:
                options.append((step, _apply(config, "add_experts", **step.params).num_params() - config.num_params()))
            except ConfigError as exc:
                refusals.note(exc)
                break
            total *= 2
        out.append(options)
    return out


def _moe_candidates(source: ModelConfig, refusals: _Refusals) -> Iterator[list[_Candidate]]:
    """Expert growth on top of each dense prelude (none first, then by size; one list per
    prelude, built when asked for): upcycling (dense) or doubling tiers' experts (MoE), then up
    to MAX_NEW_TIERS new tiers."""
    n = source.n_layers
    preludes = sorted(((est, layers, w) for layers, w, est in _dense_shapes(source, refusals) if layers in (n, 2 * n, 4 * n) and w <= 2))
    for rank, (_, layers, w) in enumerate(preludes):
        prelude = tuple(_dense_moves(n, layers, w, "balanced"))
        try:
            base = _run(source, list(prelude))[-1][1] if prelude else source
        except ConfigError as exc:
            refusals.note(exc)
            continue
        if base.tiers:
            starts = _existing_tier_starts(base, refusals)
            with_tiers = base
        else:
            starts = _upcycle_starts(base, refusals)
            with_tiers = _apply(base, "upcycle", num_experts=_EXPERT_COUNTS[0]) if starts else None
        options = _tier_options(with_tiers, refusals) if with_tiers is not None else []
        group = []
        for moves, size, steps in starts:
            for count in range(MAX_NEW_TIERS + 1):
                for tiers in itertools.combinations_with_replacement(options, count):
                    estimate = size + sum(t.size for t in tiers)
                    fresh = sum(t.fresh for t in tiers)
                    group.append(_Candidate(prelude + moves + tuple(("tier", t) for t in tiers), estimate, (rank, steps + count, fresh)))
        yield group


def _upcycle_starts(base: ModelConfig, refusals: _Refusals) -> list[tuple[tuple, int, int]]:
    out = []
    for experts in _EXPERT_COUNTS:
        step = GrowthStep("upcycle", {"num_experts": experts})
        try:
            out.append(((("step", step),), _apply(base, "upcycle", **step.params).num_params(), 1))
        except ConfigError as exc:
            refusals.note(exc)
    return out


def _existing_tier_starts(base: ModelConfig, refusals: _Refusals) -> list[tuple[tuple, int, int]]:
    out = []
    for choice in itertools.product(*_expert_options(base, refusals)):
        steps = [("step", step) for step, _ in choice if step is not None]
        out.append((tuple(steps), base.num_params() + sum(added for _, added in choice), len(steps)))
    return out


def _named(moves: tuple, config: ModelConfig) -> list[tuple]:
    """Moves with each planned tier turned into an add_tier step with its own name."""
    taken = {t.name for t in config.tiers}
    out = []
    for move in moves:
        if move[0] == "tier":
            option: _TierOption = move[1]
            out.append(("step", GrowthStep("add_tier", {"tier": _tier_name(option.size, taken), **option.params})))
        else:
            out.append(move)
    return out


# ----------------------------------------------------------------------------------- planning
def _candidate_groups(source: ModelConfig, strategy: str, refusals: _Refusals) -> Iterator[list[_Candidate]]:
    """The candidates in groups, best first: a later group is only looked at when no
    candidate of the earlier ones makes a plan (moe: a dense prelude only when needed)."""
    if strategy == "moe":
        return _moe_candidates(source, refusals)
    return iter([list(_dense_candidates(source, strategy, refusals))])


def _plan_of(source: ModelConfig, target: int, strategy: str, chain: list[tuple[GrowthStep, ModelConfig]], tokens_per_param: float, seq_len: int, tolerance: float) -> Plan:
    plan = Plan(strategy, source, target, seq_len=seq_len, tokens_per_param=tokens_per_param, tolerance=tolerance)
    before = source
    for step, config in chain:
        added = config.num_params() - before.num_params()
        tokens = int(tokens_per_param * max(added, 0))
        flops = float(flops_per_token(config, seq_len)) * tokens
        plan.steps.append(PlannedStep(step, config, config.num_params(), config.num_active_params(), added, tokens, flops))
        before = config
    return plan


def plan_growth(
    source: ModelConfig,
    target_params: int,
    strategy: str = "balanced",
    *,
    tokens_per_param: float = 20.0,
    seq_len: int = 2048,
    tolerance: float = DEFAULT_TOLERANCE,
    raise_budgets: bool = False,
) -> Plan:
    """A plan of growth steps from ``source`` to ``target_params`` parameters (within
    ``tolerance``, relative), every step checked by running its operation; see the module
    docstring.  With ``raise_budgets`` the plan may start with ``budget`` steps raising strict
    tier budgets to what its final model needs (otherwise they are honoured).  Raises
    :class:`PlanError` (one sentence, with the closest achievable size) when no plan fits."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not 0 < tolerance < 1:
        raise ConfigError(f"tolerance must be a fraction between 0 and 1 (e.g. 0.1 for 10%), got {tolerance!r}")
    if target_params <= source.num_params():
        raise ConfigError(
            f"the model already has {format_size(source.num_params())} parameters; the target ({format_size(target_params)}) must be larger"
        )
    search = _unbudgeted(source) if raise_budgets else source
    plan, candidates, refusals = _search(source, search, target_params, strategy, tokens_per_param, seq_len, tolerance)
    if plan is not None:
        return plan
    hint = None if raise_budgets else _raising_hint(source, target_params, strategy, tokens_per_param, seq_len, tolerance)
    raise PlanError(_no_plan(source, search, target_params, strategy, tolerance, candidates, refusals, hint))


def _search(
    source: ModelConfig, search: ModelConfig, target: int, strategy: str, tokens_per_param: float, seq_len: int, tolerance: float
) -> tuple[Plan | None, list[_Candidate], _Refusals]:
    """The strategy's preferred plan whose shape (found on ``search``) fits, or None, with the
    candidates looked at and the checks that refused some (for the sentence saying why not)."""
    refusals = _Refusals()
    candidates: list[_Candidate] = []
    for group in _candidate_groups(search, strategy, refusals):
        candidates += group
        fitting = [c for c in group if _closeness(c.estimate, target) <= tolerance]
        for candidate in sorted(fitting, key=lambda c: (c.preference, _closeness(c.estimate, target))):
            try:
                chain = _chain(source, search, _named(candidate.moves, source))
            except ConfigError as exc:
                refusals.note(exc)
                continue
            plan = _plan_of(source, target, strategy, chain, tokens_per_param, seq_len, tolerance)
            if abs(plan.error) <= tolerance:
                return plan, candidates, refusals
    return None, candidates, refusals


def _raising_hint(source: ModelConfig, target: int, strategy: str, tokens_per_param: float, seq_len: int, tolerance: float) -> str | None:
    """When honouring strict budgets leaves no plan but raising them would give one: the
    clause naming ``--raise-budgets`` and what it would raise (None otherwise, so the option is
    never suggested where it would not help).  Costs a second search, on the failure path only."""
    if not _strict_tiers(source):
        return None
    plan, _, _ = _search(source, _unbudgeted(source), target, strategy, tokens_per_param, seq_len, tolerance)
    raised = [s.step.params for s in plan.steps if s.step.method == "budget"] if plan is not None else []
    if not raised:
        return None
    what = ", ".join(f"{p['tier']} to {format_size(p['size'])}" for p in raised)
    ends = format_size(plan.final.num_params())
    return f"pass --raise-budgets to let the planner raise the strict budgets first (budget steps: {what}; the plan then ends at {ends})"


def _no_plan(
    source: ModelConfig,
    search: ModelConfig,
    target: int,
    strategy: str,
    tolerance: float,
    candidates: list[_Candidate],
    refusals: _Refusals,
    hint: str | None = None,
) -> str:
    """One sentence: no plan fits, the closest grown size that passes the checks (or the check
    that refuses every growth), and what to do (``hint``: how raising budgets would help)."""
    closest = None
    for candidate in sorted(candidates, key=lambda c: _closeness(c.estimate, target)):
        try:
            closest = _chain(source, search, _named(candidate.moves, source))[-1][1].num_params()
            break
        except ConfigError as exc:
            refusals.note(exc)
    limits = (
        f"at most {MAX_DEPTH_FACTOR}x the layers and {2**MAX_WIDTH_DOUBLINGS}x the width"
        + (f", {MAX_EXPERTS} experts per tier and {MAX_NEW_TIERS} new tiers" if strategy == "moe" else "")
    )
    head = f"no {strategy} plan reaches {format_size(target)} within {tolerance:.0%} in steps of {limits}"
    also = f"{hint}, " if hint else ""
    if closest is None:
        reason = (refusals.first or "no growth step applies").rstrip(".")
        if hint:  # the check's own advice (a budget step by hand) is what the hint automates
            return f"{head}: every growth of this model is refused ({reason.split('; ')[0]}); {hint}, or try another --strategy"
        return f"{head}: every growth of this model is refused ({reason}); fix that first or try another --strategy"
    why = f" (a check refused others: {refusals.first.rstrip('.')})" if refusals.first else ""
    return f"{head}: the closest that passes the checks is {format_size(closest)}{why}; aim near that, raise --tolerance, {also}or try another --strategy"
