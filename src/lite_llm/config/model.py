"""Model configuration: tiers, TierSets, routing and the model itself.

Plain dataclasses, validated in ``__post_init__`` so that a bad config fails where it is
written, with a message naming the field.  Everything a later layer needs to know about a
model's shape — parameter counts included — is computable from the config alone, without
building tensors: the planner, the checkpoint manifest and the expert store all rely on that.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from ..errors import ConfigError, TierSetError

Placement = Literal["hot", "warm", "cold", "archive"]
PLACEMENTS: tuple[str, ...] = ("hot", "warm", "cold", "archive")
BudgetMode = Literal["strict", "advisory"]

_TIER_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_SIZE_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


def is_int(value: Any) -> bool:
    """An integer and not a bool (``True`` is an ``int`` to Python, never to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)


RESERVED_TIER_NAMES = ("all",)


def parse_size(value: int | float | str | None) -> int | None:
    """Parse a parameter count such as ``10B``, ``1.5M``, ``250k`` or ``12000`` into an int."""
    if isinstance(value, bool):
        raise ConfigError(f"cannot read {value!r} as a parameter count; write e.g. 10B, 1.5M or 250000")
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBtT]?)\s*", str(value))
    if not match:
        raise ConfigError(f"cannot read {value!r} as a parameter count; write e.g. 10B, 1.5M or 250000")
    return int(round(float(match.group(1)) * _SIZE_SUFFIX[match.group(2).lower()]))


def format_size(n: int) -> str:
    """Human-readable parameter count (``12.3M``)."""
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` names (int, float, bool, str, Literal, unions,
    lists of those; a nested config dataclass also as a mapping, which its parent converts)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in args)
    if origin is Literal:
        return isinstance(value, str) and value in args
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_int(value)
    if hint is float:
        return (is_int(value) or isinstance(value, float)) and math.isfinite(value)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (hint, dict))
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return ", or ".join(_describe(arm) for arm in args)
    if origin is Literal:
        return "one of " + ", ".join(args)
    if origin is list:
        plural = {int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], getattr(args[0], '__name__', 'items'))}"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_types(config: Any, where: str) -> None:
    """One sentence for a field of the wrong type (``rope_theta: "x"``, ``moe_layers: 3``),
    before any check compares it: YAML and JSON give whatever was typed."""
    hints = _field_types(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        _require(_matches(value, hints[f.name]), f"{where}{f.name} must be {_describe(hints[f.name])}, got {value!r}")


@dataclass
class TierConfig:
    """One tier of experts: ``num_groups`` groups of ``experts_per_group`` SwiGLU experts.

    ``name`` is the tier's stable id (``tier_1b``); it keys TierSets, parameter names and
    checkpoint shards, so it never changes once the tier exists.  ``k_group``/``k_expert``
    override the routing defaults for this tier.  ``budget`` is the tier's parameter budget
    over all MoE layers (experts and router heads); ``budget_mode`` says whether exceeding it
    is an error (``strict``) or a warning (``advisory``).
    """

    name: str
    num_groups: int = 1
    experts_per_group: int = 8
    expert_hidden: int = 256
    budget: int | str | None = None
    budget_mode: BudgetMode = "strict"
    placement: Placement = "hot"
    k_group: int | None = None
    k_expert: int | None = None
    quantization: str | None = None
    min_reader_version: str | None = None
    created_at: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        _check_types(self, f"tiers[{self.name}]." if isinstance(self.name, str) else "tiers[].")
        _require(
            isinstance(self.name, str) and bool(_TIER_NAME.match(self.name)),
            f"tier name {self.name!r} must be lower-case letters, digits and underscores starting with a letter (e.g. 'tier_1b')",
        )
        # "all" is the TierSet of every tier: a tier of that name could never be chosen alone by it
        _require(self.name not in RESERVED_TIER_NAMES, f"tier name {self.name!r} is reserved (the TierSet 'all' means every tier); choose another name such as 'tier_{self.name}'")
        for name in ("num_groups", "experts_per_group", "expert_hidden"):
            value = getattr(self, name)
            _require(is_int(value) and value > 0, f"tiers[{self.name}].{name} must be a positive integer, got {value!r}")
        self.budget = parse_size(self.budget)
        _require(self.budget is None or self.budget > 0, f"tiers[{self.name}].budget must be positive, got {self.budget}")
        _require(self.budget_mode in ("strict", "advisory"), f"tiers[{self.name}].budget_mode must be 'strict' or 'advisory', got {self.budget_mode!r}")
        _require(self.placement in PLACEMENTS, f"tiers[{self.name}].placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.quantization in ("none", ""):
            self.quantization = None
        _require(
            self.quantization in (None, "int8", "int4"),
            f"tiers[{self.name}].quantization must be none, int8 or int4, got {self.quantization!r}",
        )
        if self.k_group is not None:
            _require(
                1 <= self.k_group <= self.num_groups,
                f"tiers[{self.name}].k_group={self.k_group} must be between 1 and num_groups={self.num_groups}",
            )
        if self.k_expert is not None:
            _require(
                1 <= self.k_expert <= self.experts_per_group,
                f"tiers[{self.name}].k_expert={self.k_expert} must be between 1 and experts_per_group={self.experts_per_group}",
            )

    @property
    def num_experts(self) -> int:
        return self.num_groups * self.experts_per_group


@dataclass
class RoutingConfig:
    """How HSER picks experts: ``k_tier`` tiers, then ``k_group`` groups in each, then
    ``k_expert`` experts in each group (tiers may override the last two).

    Temperatures divide the gate logits of their level.  ``renormalize`` rescales the joint
    weights of a token's active experts to sum to one, which is what makes sparse upcycling
    exactly function-preserving.  ``noise_std`` adds exploration noise to the logits during
    training only, drawn from a generator seeded by (seed, step, layer).
    """

    k_tier: int = 1
    k_group: int = 1
    k_expert: int = 2
    seed: int = 0
    tier_temperature: float = 1.0
    group_temperature: float = 1.0
    expert_temperature: float = 1.0
    renormalize: bool = True
    noise_std: float = 0.0
    balance_alpha_tier: float = 0.01
    balance_alpha_group: float = 0.01
    balance_alpha_expert: float = 0.01
    z_loss_coef: float = 1e-3

    def __post_init__(self) -> None:
        _check_types(self, "routing.")
        for name in ("k_tier", "k_group", "k_expert"):
            value = getattr(self, name)
            _require(is_int(value) and value >= 1, f"routing.{name} must be an integer >= 1, got {value!r}")
        _require(is_int(self.seed) and self.seed >= 0, f"routing.seed must be a non-negative integer, got {self.seed!r}")
        for name in ("tier_temperature", "group_temperature", "expert_temperature"):
            _require(getattr(self, name) > 0, f"routing.{name} must be positive, got {getattr(self, name)}")
        for name in ("noise_std", "balance_alpha_tier", "balance_alpha_group", "balance_alpha_expert", "z_loss_coef"):
            _require(getattr(self, name) >= 0, f"routing.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class ModelConfig:
    """A decoder-only transformer whose FFNs are dense (Llama-style) or tiered mixtures of experts.

    With ``tiers`` empty every block has a dense SwiGLU FFN of width ``intermediate_size``;
    otherwise the blocks listed in ``moe_layers`` (all of them when ``None``) use the tiered
    MoE and the rest stay dense.  ``head_dim`` is independent of ``d_model`` so that heads can
    be added without changing RoPE or the attention scale.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    attention_bias: bool = False
    init_std: float = 0.02
    tiers: list[TierConfig] = field(default_factory=list)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    moe_layers: list[int] | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        _check_types(self, "")
        self.tiers = [t if isinstance(t, TierConfig) else TierConfig(**t) for t in self.tiers]
        if isinstance(self.routing, dict):
            self.routing = RoutingConfig(**self.routing)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "max_seq_len"):
            value = getattr(self, name)
            _require(is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}")
        _require(
            self.n_heads % self.n_kv_heads == 0,
            f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads}) for grouped-query attention",
        )
        if self.head_dim is None:
            _require(
                self.d_model % self.n_heads == 0,
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), or set head_dim explicitly",
            )
            self.head_dim = self.d_model // self.n_heads
        _require(self.head_dim > 0 and self.head_dim % 2 == 0, f"head_dim must be a positive even number for RoPE, got {self.head_dim}")
        _require(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        _require(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        names = [t.name for t in self.tiers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        _require(not duplicates, f"tier names must be unique; {', '.join(duplicates)} appears more than once")
        if self.moe_layers is not None:
            self.moe_layers = sorted(set(int(i) for i in self.moe_layers))
            bad = [i for i in self.moe_layers if not 0 <= i < self.n_layers]
            _require(not bad, f"moe_layers {bad} are out of range for n_layers={self.n_layers}")
        if self.tiers:
            _require(
                self.routing.k_tier <= len(self.tiers),
                f"routing.k_tier={self.routing.k_tier} is larger than the number of tiers ({len(self.tiers)})",
            )
            for tier in self.tiers:
                _require(
                    self.k_group_of(tier) <= tier.num_groups,
                    f"routing.k_group={self.k_group_of(tier)} is larger than tiers[{tier.name}].num_groups={tier.num_groups}; set a smaller k_group or give the tier its own",
                )
                _require(
                    self.k_expert_of(tier) <= tier.experts_per_group,
                    f"routing.k_expert={self.k_expert_of(tier)} is larger than tiers[{tier.name}].experts_per_group={tier.experts_per_group}; set a smaller k_expert or give the tier its own",
                )
                self._check_budget(tier)

    # ----------------------------------------------------------------------------- structure
    @property
    def kv_groups(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def is_moe(self) -> bool:
        return bool(self.tiers) and bool(self.moe_layer_indices)

    @property
    def moe_layer_indices(self) -> list[int]:
        if not self.tiers:
            return []
        return list(range(self.n_layers)) if self.moe_layers is None else list(self.moe_layers)

    def is_moe_layer(self, layer: int) -> bool:
        return layer in set(self.moe_layer_indices)

    def tier(self, name: str) -> TierConfig:
        for t in self.tiers:
            if t.name == name:
                return t
        raise TierSetError(f"unknown tier {name!r}; this model has tiers {', '.join(t.name for t in self.tiers) or '(none)'}")

    def k_group_of(self, tier: TierConfig) -> int:
        return tier.k_group if tier.k_group is not None else self.routing.k_group

    def k_expert_of(self, tier: TierConfig) -> int:
        return tier.k_expert if tier.k_expert is not None else self.routing.k_expert

    # ----------------------------------------------------------------------------- counting
    def attention_params(self) -> int:
        d, hd = self.d_model, self.head_dim
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        bias = (q + 2 * kv) if self.attention_bias else 0
        return d * q + 2 * d * kv + q * d + bias

    def dense_ffn_params(self) -> int:
        return 3 * self.d_model * self.intermediate_size

    def expert_params(self, tier: TierConfig) -> int:
        """Parameters of one expert of ``tier`` (gate, up and down projections)."""
        return 3 * self.d_model * tier.expert_hidden

    def router_params(self, tier: TierConfig) -> int:
        """Router parameters of one tier in one layer: its tier score, group gate and expert gates."""
        return self.d_model * (1 + tier.num_groups + tier.num_experts)

    def tier_params(self, tier: TierConfig, per_layer: bool = False) -> int:
        """Parameters that belong to ``tier``: its experts and router heads (all MoE layers)."""
        one = tier.num_experts * self.expert_params(tier) + self.router_params(tier)
        return one if per_layer else one * len(self.moe_layer_indices)

    def _check_budget(self, tier: TierConfig) -> None:
        if tier.budget is None:
            return
        need = self.tier_params(tier)
        if need <= tier.budget:
            return
        message = (
            f"tiers[{tier.name}] needs {format_size(need)} parameters ({need}) but its budget is "
            f"{format_size(tier.budget)}; raise the budget or use fewer/smaller experts"
        )
        if tier.budget_mode == "strict":
            raise ConfigError(message)
        warnings.warn(message, stacklevel=3)

    def num_params(self) -> int:
        """Total parameters of the built model (matches ``sum(p.numel())`` exactly)."""
        return self._count(active_tiers=None)

    def num_active_params(self, tierset: "TierSet | str | Sequence[str] | None" = None) -> int:
        """Parameters that one token can touch: all dense weights, the router heads of the
        tiers in ``tierset`` and the experts of the largest allowed choice of k_tier tiers."""
        names = TierSet.coerce(tierset).resolve(self)  # a dense model has no tier to name either
        return self._count(active_tiers=names)

    def _count(self, active_tiers: list[str] | None) -> int:
        d, n = self.d_model, self.n_layers
        total = self.vocab_size * d * (1 if self.tie_embeddings else 2) + d  # embeddings, head, final norm
        n_moe = len(self.moe_layer_indices)
        total += n * (2 * d + self.attention_params()) + (n - n_moe) * self.dense_ffn_params()
        if n_moe == 0:
            return total
        per_layer = 0
        if active_tiers is None:
            per_layer = sum(self.tier_params(t, per_layer=True) for t in self.tiers)
        else:
            chosen = [self.tier(name) for name in active_tiers]
            per_layer = sum(self.router_params(t) for t in chosen)
            expert_cost = sorted(
                (self.k_group_of(t) * self.k_expert_of(t) * self.expert_params(t) for t in chosen), reverse=True
            )
            per_layer += sum(expert_cost[: self.routing.k_tier])
        return total + n_moe * per_layer

    def max_active_experts(self) -> int:
        """K: the most experts one token can use in one MoE layer."""
        per_tier = sorted((self.k_group_of(t) * self.k_expert_of(t) for t in self.tiers), reverse=True)
        return sum(per_tier[: self.routing.k_tier])

    # ----------------------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, allow_unknown: bool = False) -> "ModelConfig":
        """Build a config from a dict.

        Unknown fields are an error unless ``allow_unknown`` (used when reading a checkpoint of
        a newer minor version, whose extra fields we may ignore); missing fields take defaults.
        """
        data = dict(data)
        _require(isinstance(data.get("tiers", []), list), f"tiers must be a list of tiers, got {data.get('tiers')!r}")
        data["tiers"] = [_pick_fields(TierConfig, _without_retired_dtype(t), "tiers[]", allow_unknown) for t in data.get("tiers", [])]
        data["routing"] = _pick_fields(RoutingConfig, data.get("routing", {}), "routing", allow_unknown)
        return cls(**_pick_fields(cls, data, "model", allow_unknown))

    @classmethod
    def from_json(cls, text: str, **kwargs: Any) -> "ModelConfig":
        return cls.from_dict(json.loads(text), **kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Read a config from a ``.json`` or ``.yaml``/``.yml`` file (``preset:`` plus overrides allowed)."""
        from .files import load_config_file

        def parse(data: dict[str, Any]) -> "ModelConfig":
            if "preset" in data:
                base = cls.from_preset(data.pop("preset")).to_dict()
                base.update(data)
                data = base
            return cls.from_dict(data)

        keys = {f.name for f in dataclasses.fields(cls)} | {"preset"}
        return load_config_file(path, "model config", parse, keys=keys)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named configuration (see ``PRESETS``), with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
        return cls.from_dict({"name": name, **copy.deepcopy(PRESETS[name]), **overrides})

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with some fields changed."""
        data = self.to_dict()
        data.update(changes)
        return ModelConfig.from_dict(data)


def _without_retired_dtype(tier: Any) -> Any:
    """Drop the ``dtype`` that tiers used to carry (always float32, never read): every
    checkpoint written before still loads.  Any other value was a wish nothing honoured, so it
    is refused rather than silently ignored."""
    if not isinstance(tier, dict) or "dtype" not in tier:
        return tier
    if tier["dtype"] != "float32":
        raise ConfigError(
            f"tiers[{tier.get('name', '?')}].dtype is no longer a tier setting (a tier computes in the run's dtype: "
            "train with --bf16, store smaller with quantization); remove the key"
        )
    return {k: v for k, v in tier.items() if k != "dtype"}


def _pick_fields(cls: type, data: dict[str, Any], where: str, allow_unknown: bool) -> dict[str, Any]:
    if isinstance(data, cls):
        return dataclasses.asdict(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown and not allow_unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)} in {where}; known fields are {', '.join(sorted(known))}")
    return {k: v for k, v in data.items() if k in known}


# --------------------------------------------------------------------------------- TierSet
@dataclass(frozen=True)
class TierSet:
    """The tiers a run (or a request) may route to.

    * ``explicit``: exactly the named tiers.
    * ``cumulative``: every tier up to and including the named one, in the model's tier order
      ("everything up to tier_10b").
    * ``exclusive``: only the named tiers — same as explicit, kept as its own mode so that a
      request can say "this tier alone" and the intent survives serialisation.
    * ``all``: every tier the model has.

    String forms (CLI ``--tiers``): ``all``, ``tier_1b,tier_10b``, ``upto:tier_10b``,
    ``only:tier_10b``.
    """

    mode: Literal["all", "explicit", "cumulative", "exclusive"] = "all"
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # checked here, not at resolve: a TierSet built by hand would otherwise fail later as a
        # KeyError (unknown mode) or IndexError (cumulative with no name) deep in the model
        modes = ("all", "explicit", "cumulative", "exclusive")
        if self.mode not in modes:
            raise TierSetError(f"TierSet mode must be one of {', '.join(modes)}, got {self.mode!r}")
        if isinstance(self.names, str) or not all(isinstance(n, str) for n in self.names):
            raise TierSetError(f"TierSet names must be tier names (strings), got {self.names!r}; build one with TierSet.of('tier_1b', ...)")
        object.__setattr__(self, "names", tuple(self.names))
        if self.mode == "cumulative" and len(self.names) != 1:
            raise TierSetError(f"a cumulative TierSet names exactly one tier (everything up to it), got {len(self.names)}; use TierSet.up_to('tier_1b')")
        if self.mode != "all" and not self.names:
            raise TierSetError("a TierSet must name at least one tier (a model routed to none computes nothing); use TierSet.all() for every tier")
        if any(not n.strip() for n in self.names):
            raise TierSetError(f"a TierSet's tier names must not be empty, got {self.names!r}; name tiers such as tier_1b")

    @classmethod
    def all(cls) -> "TierSet":
        """Every tier the model has."""
        return cls("all")

    @classmethod
    def of(cls, *names: str) -> "TierSet":
        """Exactly the named tiers."""
        return cls("explicit", tuple(names))

    @classmethod
    def up_to(cls, name: str) -> "TierSet":
        """Every tier up to and including ``name``, in the model's tier order."""
        return cls("cumulative", (name,))

    @classmethod
    def only(cls, *names: str) -> "TierSet":
        """Only the named tiers (as :meth:`of`, with the intent kept in its string form)."""
        return cls("exclusive", tuple(names))

    @classmethod
    def parse(cls, text: str) -> "TierSet":
        """The TierSet of a string form: ``all``, ``tier_1b,tier_10b``, ``upto:tier_10b``, ``only:tier_10b``."""
        text = text.strip()
        if text in ("all", "*"):
            return cls.all()
        if not text.strip(", "):
            raise TierSetError("the TierSet is empty; name tiers (tier_1b,tier_10b), upto:TIER, only:TIER, or all")
        for prefix, mode in (("upto:", "cumulative"), ("<=", "cumulative"), ("only:", "exclusive")):
            if text.startswith(prefix):
                names = tuple(n.strip() for n in text[len(prefix):].split(",") if n.strip())
                if not names:
                    raise TierSetError(f"'{text}' names no tier after '{prefix}'; write e.g. {prefix}tier_1b")
                if mode == "cumulative" and len(names) != 1:
                    raise TierSetError(f"'{text}' must name exactly one tier after '{prefix}'")
                return cls(mode, names)
        return cls.of(*(n.strip() for n in text.split(",") if n.strip()))

    @classmethod
    def coerce(cls, value: "TierSet | str | Iterable[str] | None") -> "TierSet":
        """A TierSet from what an API accepts: None (all), a TierSet, its string form or tier names."""
        if value is None:
            return cls.all()
        if isinstance(value, TierSet):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if not isinstance(value, Iterable):
            raise TierSetError(f"a TierSet must be a TierSet, a string such as 'upto:tier_1b' or a list of tier names, got {value!r}")
        return cls.of(*value)

    def resolve(self, config: ModelConfig) -> list[str]:
        """The tier names this set selects in ``config``, in the model's tier order."""
        order = [t.name for t in config.tiers]
        unknown = [n for n in self.names if n not in order]
        if unknown:
            raise TierSetError(
                f"TierSet names unknown tier(s) {', '.join(unknown)}; this model has {', '.join(order) or 'no tiers'}"
            )
        if self.mode == "all":
            chosen = order
        elif self.mode == "cumulative":
            chosen = order[: order.index(self.names[0]) + 1]
        else:
            chosen = [n for n in order if n in self.names]
        if config.tiers and not chosen:
            raise TierSetError("TierSet selects no tier; name at least one tier or use 'all'")
        return chosen

    def __str__(self) -> str:
        if self.mode == "all":
            return "all"
        prefix = {"cumulative": "upto:", "exclusive": "only:", "explicit": ""}[self.mode]
        return prefix + ",".join(self.names)


# --------------------------------------------------------------------------------- presets
def _two_tiers(expert_hidden: int, budget: str) -> list[dict[str, Any]]:
    """The presets' tier layout: a hot ``tier_1b`` and a warm ``tier_10b``, 2 groups x 4 experts."""
    tier = dict(num_groups=2, experts_per_group=4, expert_hidden=expert_hidden, budget=budget)
    return [dict(name="tier_1b", **tier), dict(name="tier_10b", **tier, placement="warm")]


# name -> the fields that differ from ModelConfig's defaults (litgpt-style: data, not code).
PRESETS: dict[str, dict[str, Any]] = {
    # two tiers, small enough for unit tests (a few hundred thousand parameters)
    "tiny": dict(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, max_seq_len=256,
        tiers=_two_tiers(64, "1M"), routing=dict(k_tier=1, k_group=2, k_expert=2),
    ),
    "tiny-dense": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=160, max_seq_len=256),
    # the throughput reference: ~10M parameters, two tiers, byte-level vocab
    "small": dict(
        vocab_size=256, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, intermediate_size=512, max_seq_len=512,
        tiers=_two_tiers(192, "5M"), routing=dict(k_tier=1, k_group=2, k_expert=1),
    ),
    # the quickstart's model: small's two tiers, narrower, over a 4,096-token BPE vocabulary; chosen
    # by measured runs at equal training time on 2 CPU cores (BENCHMARKS.md): narrower and longer-
    # trained beat wider and shorter-trained, and BPE beat bytes
    "quickstart": dict(
        vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=512, max_seq_len=512,
        tiers=_two_tiers(128, "5M"), routing=dict(k_tier=1, k_group=2, k_expert=1),
    ),
    # the shape of SmolLM2-135M (Llama architecture), dense
    "smollm2-135m": dict(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536,
        rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True,
    ),
}
