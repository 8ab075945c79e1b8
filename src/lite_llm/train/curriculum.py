"""The tier curriculum: bring a newly added tier in without disturbing what the model does.

Four phases, in this order (each optional except integration, each a number of steps):

* **preparation** — the tier exists but is not routable (its tier bias is -1e4: probability 0);
* **isolation** — dense weights, old tiers and their router heads frozen; only the new tier's
  experts and router heads train, with the tier's share of routing held at a small ``share``;
* **integration** — the share ramps from ``from_share`` to ``to_share`` (linear or cosine),
  everything else still frozen unless ``trainable`` says otherwise;
* **joint** — everything trainable at a small learning rate (``lr_scale``), load balancing on.

The share — the part of a layer's routing weight that goes to the new tier — is steered by the
new tier's ``tier_bias`` buffer in every MoE layer, set after each step for the next one:

* with ``k_tier=1`` a token goes to the new tier when its biased tier logit beats every other
  tier's, so the share is the fraction of tokens whose margin ``d = max_other - raw_new`` is
  below the bias: the bias is set to the ``target`` quantile of ``d`` over the last batch
  (a proportional controller oscillates here: with similar tokens the share jumps 0 <-> 1);
* with several tiers selected per token the share is smooth in the bias, and a proportional
  controller in logit space moves it by ``gain * (logit(target) - logit(measured))``.

Controlling the router *probability* instead would be wrong with top-1 tiers: a tier can hold
30% of the probability mass and win no token.  The bias is part of the weights, so a checkpoint holds the controller's whole state and
a run resumed mid-ramp continues bitwise (on CPU).  During every phase but joint the tier-level
load-balancing term is off: it would pull the tiers towards equal shares, against the schedule.

Rollback: at the start of integration the model is checkpointed (``pre-integration``, kept) and
the validation loss of the old domains recorded; if during integration that loss rises by more
than ``rollback.margin`` (relative), the weights are restored from that checkpoint, the new tier
made unroutable again, and the run stops saying why, its last checkpoint the restored model (a
rolled-back run is not resumed: that would ramp the tier in again over it).  ``lite-llm
rollback`` does the same by hand from a finished run.  Resuming a curriculum run without its
file takes the schedule saved in the run's training state, as every other saved setting.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import is_int
from ..errors import ConfigError
from .callbacks import TrainerCallback

if TYPE_CHECKING:
    from ..model import LiteLLM
    from .trainer import Trainer

PHASES = ("preparation", "isolation", "integration", "joint")
UNROUTABLE = -1e4
_BIAS_LIMIT = 30.0  # beyond this a sigmoid is 0 or 1 in fp32; the controller stays inside


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


@dataclass
class Phase:
    """One phase of the curriculum (see the module docstring for what each name means)."""

    name: str
    steps: int
    lr_scale: float = 1.0
    share: float | None = None  # isolation: the share held
    from_share: float | None = None  # integration: ramp start (default: isolation's share)
    to_share: float | None = None  # integration: ramp end
    ramp: str = "linear"  # integration: linear | cosine
    trainable: str | list[str] = "new"  # "new", "all", or parameter-name patterns
    balance: bool | None = None  # tier-level load balancing (default: only in joint)

    def __post_init__(self) -> None:
        where = f"curriculum phase {self.name!r}"
        if self.name not in PHASES:
            raise ConfigError(f"unknown curriculum phase {self.name!r}; phases are {', '.join(PHASES)} (in that order)")
        if not is_int(self.steps) or self.steps < 0:
            raise ConfigError(f"{where}: steps must be a non-negative integer, got {self.steps!r}")
        if not _is_number(self.lr_scale) or not 0 < self.lr_scale < math.inf:
            raise ConfigError(f"{where}: lr_scale must be a finite positive number (a factor of the learning rate), got {self.lr_scale!r}")
        for key in ("share", "from_share", "to_share"):
            value = getattr(self, key)
            if value is not None and (not _is_number(value) or not 0 <= value <= 1):
                raise ConfigError(f"{where}: {key} must be a probability between 0 and 1, got {value!r}")
        if self.ramp not in ("linear", "cosine"):
            raise ConfigError(f"{where}: ramp must be 'linear' or 'cosine', got {self.ramp!r}")
        trainable = [self.trainable] if isinstance(self.trainable, str) else self.trainable
        if not isinstance(trainable, list) or not trainable or not all(isinstance(t, str) and t for t in trainable):
            raise ConfigError(f"{where}: trainable must be 'new', 'all' or parameter-name patterns (a string or a list of them), got {self.trainable!r}")
        if self.balance is not None and not isinstance(self.balance, bool):
            raise ConfigError(f"{where}: balance must be true or false (tier-level load balancing), got {self.balance!r}")
        self._refuse_unused()
        if self.name == "integration":
            if self.steps == 0:
                raise ConfigError("curriculum phase 'integration' has a zero-length ramp; give it at least one step")
            if self.to_share is None:
                raise ConfigError("curriculum phase 'integration' needs to_share (the new tier's share at the end of the ramp)")
        if self.name == "isolation" and self.share is None:
            self.share = 0.05
        if self.balance is None:
            self.balance = self.name == "joint"
        if self.name == "joint" and self.trainable == "new":
            self.trainable = "all"

    def _refuse_unused(self) -> None:
        """A share or ramp given to a phase that does not read it would be ignored without a
        word, and the schedule would not be the one the user wrote."""
        unused = {"share": self.share is not None and self.name != "isolation"}
        for key in ("from_share", "to_share"):
            unused[key] = getattr(self, key) is not None and self.name != "integration"
        unused["ramp"] = self.ramp != "linear" and self.name != "integration"
        given = [key for key, bad in unused.items() if bad]
        if given:
            owner = "isolation" if given[0] == "share" else "integration"
            raise ConfigError(
                f"curriculum phase {self.name!r} does not use {given[0]} (only the {owner} phase does), so it would be ignored; move it to the {owner} phase or leave it out"
            )


def _is_number(value: Any) -> bool:
    """A real number and not a bool (``True`` is an ``int`` to Python, never to a schedule)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fields_of(cls: type, data: Any, where: str) -> dict[str, Any]:
    """``data`` as keyword arguments of the dataclass ``cls``: a mapping whose keys are its
    fields, else one sentence naming ``where`` and what is expected."""
    known = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of {', '.join(known)}, got {data!r}")
    unknown = sorted(str(k) for k in set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where} has unknown key {unknown[0]!r}; expected {', '.join(known)}")
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{where} needs {' and '.join(required)}; it lacks {', '.join(missing)}")
    return data


@dataclass
class RollbackConfig:
    """Roll back when an old domain's validation loss rises more than ``margin`` (relative)."""

    domains: list[str] = field(default_factory=list)
    margin: float = 0.02
    enabled: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.domains, list) or not all(isinstance(d, str) and d for d in self.domains):
            raise ConfigError(f"curriculum rollback.domains must be a list of domain names, e.g. [prose], got {self.domains!r}")
        if not _is_number(self.margin) or not math.isfinite(self.margin):
            raise ConfigError(f"curriculum rollback.margin must be a finite number (the relative rise of loss tolerated, e.g. 0.05), got {self.margin!r}")
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"curriculum rollback.enabled must be true or false, got {self.enabled!r}")


@dataclass
class CurriculumConfig:
    tier: str
    phases: list[Phase]
    gain: float = 1.0
    rollback: RollbackConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tier, str) or not self.tier:
            raise ConfigError(f"curriculum tier must be the new tier's name (e.g. tier_10b), got {self.tier!r}")
        if not isinstance(self.phases, list):
            raise ConfigError(f"curriculum phases must be a list of phases, e.g. [{{name: integration, steps: 100, to_share: 0.5}}], got {self.phases!r}")
        self.phases = [p if isinstance(p, Phase) else Phase(**_fields_of(Phase, p, f"curriculum phase {i + 1}")) for i, p in enumerate(self.phases)]
        if self.rollback is not None and not isinstance(self.rollback, RollbackConfig):
            self.rollback = RollbackConfig(**_fields_of(RollbackConfig, self.rollback, "curriculum rollback"))
        order = [PHASES.index(p.name) for p in self.phases]
        if order != sorted(set(order)):
            names = ", ".join(p.name for p in self.phases)
            raise ConfigError(f"curriculum phases are out of order or repeated ({names}); use {', '.join(PHASES)}, each at most once, in that order")
        if "integration" not in [p.name for p in self.phases]:
            raise ConfigError("a curriculum needs an integration phase (the ramp that brings the new tier in)")
        if not _is_number(self.gain) or not 0 < self.gain < math.inf:
            raise ConfigError(f"curriculum gain must be a finite positive number (the share controller's step), got {self.gain!r}")
        integ = self.phase("integration")
        if integ.from_share is None:
            iso = self.phase("isolation")
            integ.from_share = iso.share if iso is not None else 0.0

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def phase(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)

    def at(self, step: int) -> tuple[Phase, int]:
        """The phase of ``step`` and the step's index inside it (past the end: the last phase)."""
        start = 0
        for p in self.phases:
            if step < start + p.steps:
                return p, step - start
            start += p.steps
        last = [p for p in self.phases if p.steps > 0][-1]
        return last, last.steps - 1

    def start_of(self, name: str) -> int | None:
        start = 0
        for p in self.phases:
            if p.name == name:
                return start
            start += p.steps
        return None

    def target_share(self, step: int) -> float | None:
        """The new tier's scheduled share at ``step`` (None in joint: the router is free)."""
        phase, i = self.at(step)
        if phase.name == "preparation":
            return 0.0
        if phase.name == "isolation":
            return phase.share
        if phase.name == "integration":
            t = (i + 1) / phase.steps
            if phase.ramp == "cosine":
                t = (1 - math.cos(math.pi * t)) / 2
            return phase.from_share + (phase.to_share - phase.from_share) * t
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "CurriculumConfig":
        if not isinstance(data, dict) or "tier" not in data or "phases" not in data:
            raise ConfigError("a curriculum needs 'tier' (the new tier's name) and 'phases' (a list)")
        unknown = sorted(set(data) - {"tier", "phases", "gain", "rollback"})
        if unknown:
            raise ConfigError(f"curriculum has unknown key {unknown[0]!r}; expected tier, phases, gain, rollback")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"curriculum is malformed ({exc})") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "CurriculumConfig":
        from ..config import load_config_file

        return load_config_file(path, "curriculum", cls.from_dict)


def new_tier_parameters(model: "LiteLLM", tier: str) -> list[str]:
    """Names of the parameters that belong to ``tier`` (its router heads and experts)."""
    marks = (f".heads.{tier}.", f".experts.{tier}.")
    return [n for n, _ in model.named_parameters() if any(m in n for m in marks)]


def set_trainable(model: "LiteLLM", tier: str, trainable: str | list[str]) -> list[str]:
    """Freeze everything but what ``trainable`` names; return the trainable names."""
    if trainable == "all":
        chosen = {n for n, _ in model.named_parameters()}
    else:
        chosen = set(new_tier_parameters(model, tier))
        if trainable != "new":
            patterns = [trainable] if isinstance(trainable, str) else list(trainable)
            for pattern in patterns:
                matched = {n for n, _ in model.named_parameters() if fnmatch(n, pattern)}
                if not matched:
                    raise ConfigError(f"trainable pattern {pattern!r} matches no parameter; names look like {next(iter(chosen), 'layers.0.attn.q_proj.weight')}")
                chosen |= matched
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return sorted(chosen)


def tier_bias_buffers(model: "LiteLLM", tier: str) -> list[torch.Tensor]:
    """The new tier's ``tier_bias`` buffer in every MoE layer, in layer order."""
    return [block.ffn.router.heads[tier].tier_bias for block in model.layers if block.is_moe]


class Curriculum(TrainerCallback):
    """Runs a :class:`CurriculumConfig` inside the :class:`Trainer` (see the module docstring)."""

    name = "curriculum"

    def __init__(self, config: CurriculumConfig, *, starvation_window: int = 20) -> None:
        self.config = config
        self.window = starvation_window
        self.phase_applied: str | None = None
        self.pre_integration: dict[str, Any] | None = None
        self.rolled_back: str | None = None
        self.recent_routes: deque[list[float]] = deque(maxlen=starvation_window)
        self._original_routing: list[Any] = []
        self._memory_copy: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------ set-up
    def on_train_begin(self, trainer: "Trainer") -> None:
        model, tier = trainer.model, self.config.tier
        names = [t.name for t in model.config.tiers]
        if tier not in names:
            raise ConfigError(f"the curriculum's tier {tier!r} is not in the model (tiers: {', '.join(names) or 'none'}); add it first with lite-llm add-tier")
        if len(names) < 2:
            raise ConfigError("a curriculum brings a new tier in next to existing ones; this model has only one tier")
        chosen = trainer.tierset.resolve(model.config)
        if tier not in chosen or len(chosen) < 2:
            # the new tier outside the TierSet has nothing to train; alone in it, no share to steer
            raise ConfigError(
                f"the run's TierSet {trainer.tierset} selects {', '.join(chosen)}, but a curriculum needs its tier {tier!r} and at least one "
                "existing tier in it; train with --tiers all (or a TierSet naming both)"
            )
        if trainer.config.steps != self.config.total_steps:
            raise ConfigError(
                f"train.steps is {trainer.config.steps} but the curriculum's phases add up to {self.config.total_steps}; make them equal"
            )
        self._original_routing = [block.ffn.router.routing for block in model.layers if block.is_moe]
        for block in model.layers:
            if block.is_moe:
                block.ffn.router.record_tier_logits = True
        self.phase_applied = None
        self._enter_phase(trainer, trainer.step)

    def _enter_phase(self, trainer: "Trainer", step: int) -> None:
        phase, _ = self.config.at(step)
        if phase.name == self.phase_applied:
            return
        model = trainer.model
        set_trainable(model, self.config.tier, phase.trainable)
        routers = [block.ffn.router for block in model.layers if block.is_moe]
        for router, original in zip(routers, self._original_routing):
            router.routing = original if phase.balance else dataclasses.replace(original, balance_alpha_tier=0.0)
        target = self.config.target_share(step)
        with torch.no_grad():
            for bias in tier_bias_buffers(model, self.config.tier):
                if phase.name == "preparation":
                    bias.fill_(UNROUTABLE)
                elif target is not None and float(bias) <= UNROUTABLE / 2:
                    bias.fill_(_logit(max(target, 1e-3)))  # first guess; the controller refines it
        self.phase_applied = phase.name

    # ------------------------------------------------------------------------------ hooks
    def lr_scale(self, trainer: "Trainer", step: int) -> float:
        return self.config.at(step)[0].lr_scale

    def on_step_begin(self, trainer: "Trainer", step: int) -> None:
        self._enter_phase(trainer, step)
        start = self.config.start_of("integration")
        rb = self.config.rollback
        if step == start and self.pre_integration is None and rb is not None and rb.enabled:
            self._snapshot(trainer)

    def on_step_end(self, trainer: "Trainer", step: int, record: dict[str, Any]) -> None:
        phase, i = self.config.at(step)
        target = self.config.target_share(step)
        record["phase"] = phase.name
        if target is not None:
            record["target_share"] = target
        t = [x.name for x in trainer.model.config.tiers].index(self.config.tier)
        per_layer = record.get("tier_weight_layers") or []
        if per_layer:
            record["new_tier_share"] = sum(layer[t] for layer in per_layer) / len(per_layer)
        probs = record.get("tier_prob_layers") or []
        if probs:
            record["new_tier_prob"] = sum(layer[t] for layer in probs) / len(probs)
        nxt = self.config.target_share(step + 1) if step + 1 < self.config.total_steps else None
        if nxt is not None and phase.name != "preparation" and self.config.at(step + 1)[0].name != "preparation" and per_layer:
            self._steer(trainer.model, t, nxt, [layer[t] for layer in per_layer])
        self._monitor(trainer, record)
        trainer.progressive["curriculum"] = self.state_dict() | {"phase": phase.name, "step_in_phase": i}

    def _steer(self, model: "LiteLLM", t: int, target: float, measured: list[float]) -> None:
        """Set each layer's new-tier bias for the next step (see the module docstring)."""
        routers = [block.ffn.router for block in model.layers if block.is_moe]
        with torch.no_grad():
            for router, bias, share in zip(routers, tier_bias_buffers(model, self.config.tier), measured):
                logits = router.last_tier_logits
                if router.k_tier == 1 and logits is not None and logits.shape[1] > 1:
                    raw_new = logits[:, t] - bias
                    others = torch.cat([logits[:, :t], logits[:, t + 1 :]], dim=1).max(dim=1).values
                    margin = (others - raw_new).double()
                    value = torch.quantile(margin, target) if target > 0 else torch.tensor(UNROUTABLE)
                else:
                    value = bias + self.config.gain * (_logit(target) - _logit(share))
                bias.copy_(value.to(bias.dtype).clamp(-_BIAS_LIMIT, _BIAS_LIMIT) if target > 0 else value.to(bias.dtype))

    def _monitor(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        """Experts of the new tier starved of tokens over the last ``window`` steps, with the
        chance that an expert with a fair share 1/E of the tier's routes gets none in T routes
        by luck: (1 - 1/E)^T <= exp(-T/E)."""
        routes = record.get("expert_routes")
        if routes is None:
            return
        cfg = trainer.model.config
        names = [x.name for x in cfg.tiers]
        offset = sum(x.num_experts for x in cfg.tiers[: names.index(self.config.tier)])
        n = cfg.tier(self.config.tier).num_experts
        self.recent_routes.append([float(r) for r in routes[offset : offset + n]])
        totals = [sum(col) for col in zip(*self.recent_routes)]
        tier_routes = sum(totals)
        record["starved_experts"] = sum(1 for x in totals if x == 0)
        record["starvation_bound"] = math.exp(-tier_routes / n) if tier_routes else 1.0
        record["starvation_window"] = len(self.recent_routes)

    def on_eval(self, trainer: "Trainer", step: int, scores: dict[str, Any]) -> None:
        phase, _ = self.config.at(step)
        rb = self.config.rollback
        if phase.name != "integration" or rb is None or not rb.enabled or self.pre_integration is None:
            return
        base = self.pre_integration["val_loss"]
        for domain in rb.domains:
            now, before = scores[domain]["loss"], base[domain]
            if now > before * (1 + rb.margin):
                reason = (
                    f"rolled back at step {step + 1}: validation loss on {domain} rose from {before:.4f} to {now:.4f} "
                    f"(more than the {rb.margin:.1%} margin) during integration; restored {self.pre_integration['path']}"
                )
                self._restore(trainer)
                self.rolled_back = reason
                trainer.progressive["curriculum"] = self.state_dict()
                trainer.stop(reason)
                return

    # ------------------------------------------------------------------------------ rollback
    def _snapshot(self, trainer: "Trainer") -> None:
        rb = self.config.rollback
        scores = trainer.evaluate()
        unknown = [d for d in rb.domains if d not in scores]
        if unknown:
            raise ConfigError(f"rollback.domains names unknown domain(s) {', '.join(unknown)}; the data has {', '.join(scores)}")
        self.pre_integration = {"step": trainer.step, "val_loss": {d: scores[d]["loss"] for d in rb.domains}, "path": None}
        trainer.progressive["curriculum"] = self.state_dict()
        path = trainer.save(tag="pre-integration")
        self.pre_integration["path"] = str(path) if path is not None else None
        if path is None:  # no run directory: keep the weights in memory instead
            self._memory_copy = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def _restore(self, trainer: "Trainer") -> None:
        model = trainer.model
        if self.pre_integration.get("path"):
            from ..checkpoint import load_checkpoint
            from .rollback import find_pre_integration

            recorded = self.pre_integration["path"]
            # a run resumed from another directory: the snapshot is in its run directory
            found = find_pre_integration(recorded, [trainer.run_dir] if trainer.run_dir is not None else [], self.pre_integration.get("step"))
            state = load_checkpoint(found if found is not None else recorded).model.state_dict()
        else:
            state = self._memory_copy
        model.load_state_dict(state)
        with torch.no_grad():
            for bias in tier_bias_buffers(model, self.config.tier):
                bias.fill_(UNROUTABLE)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "tier": self.config.tier,
            "schedule": self.config.to_dict(),
            "pre_integration": self.pre_integration,
            "rolled_back": self.rolled_back,
            "recent_routes": list(self.recent_routes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("schedule") != self.config.to_dict():
            raise ConfigError(
                "cannot resume: the curriculum schedule differs from the one this run started with; resume with the original curriculum file or start a new run"
            )
        if state.get("rolled_back"):
            # continuing would ramp the tier in again over the very weights the rollback restored
            raise ConfigError(
                f"cannot resume: this curriculum run was {state['rolled_back'].split(';')[0]}; start a new run from its checkpoint "
                "(lite-llm rollback gives the model without the tier) with another curriculum"
            )
        self.pre_integration = state.get("pre_integration")
        self.rolled_back = state.get("rolled_back")
        self.recent_routes = deque(state.get("recent_routes") or [], maxlen=self.window)
