"""Training run configuration (a plain validated dataclass, YAML/JSON round-trip)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, TierSetError


# How a field is read from the command line when it is not a plain number, flag or word.
SettingKind = Literal["weights", "names", "freeze", "path"]
POSITIVE_INTS = ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "eval_batch_size", "keep_last", "log_every")
NON_NEGATIVE_INTS = ("warmup_steps", "eval_every", "save_every", "seed")
# settings that only mean something with another one: setting -> (that field, its flag)
_PROTECTION_SETTINGS = {
    "distill_weight": ("distill_from", "--distill-from TEACHER"),
    "distill_temperature": ("distill_from", "--distill-from TEACHER"),
    "si_damping": ("si_strength", "--si-strength C"),
}


def _setting(default: Any, help: str = "", *, flag: str | None = None, kind: SettingKind | None = None) -> Any:
    """A TrainConfig field with the help text and flag that ``lite-llm train`` shows for it, so a
    setting is declared once, here (a type such as ``dict`` as ``default`` is a default factory)."""
    metadata = {"help": help, "flag": flag, "kind": kind}
    if isinstance(default, type):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """What a training run does.  Everything that affects the numbers is here, so a run is
    reproduced by its TrainConfig, its data and its starting checkpoint.

    ``domains`` maps domain names to mixture weights (empty: every domain, equal weights).
    ``eval_every``/``save_every`` of 0 disable periodic evaluation/saving (the final step is
    always evaluated and saved when a run directory is given).

    Forgetting prevention (each optional, combinable):

    * replay: ``replay_share`` of every micro-batch's rows (exactly ``floor(share * B)`` plus one
      more with probability of the remainder) drawn from the ``replay`` mixture of old domains;
    * freezing: ``freeze`` rules ``{"patterns": [...], "thaw_at": step or None}``: parameters
      matching a pattern get no update before ``thaw_at`` (never, when None);
    * EWC: ``ewc_from`` a checkpoint holding an estimate (``lite-llm ewc estimate``), penalty
      weight ``ewc_weight``;
    * distillation: ``distill_from`` a teacher checkpoint, ``distill_weight`` x T^2 KL at
      ``distill_temperature`` on the rows of ``distill_domains`` (empty: every row);
    * Synaptic Intelligence (:mod:`.synaptic`): ``si_strength`` (the paper's c) > 0 makes the
      run measure each weight's importance along its training path and store it, consolidated
      with damping ``si_damping`` (xi), in every checkpoint's ``si/``; ``si_from`` a checkpoint
      holding earlier tasks' importance (a previous SI run's, possibly grown) adds the penalty
      ``si_strength * sum Omega (theta - theta*)^2`` and is consolidated into this run's.

    ``keep_freed_cpu_memory`` (on CPU only) tells glibc to keep freed memory for the next step
    instead of returning it to the OS (:mod:`lite_llm.runtime.cpu_memory`): the numbers are unchanged,
    steps of large MoE layers run up to ~2x faster, and the process keeps its peak memory.
    """

    steps: int = _setting(200, "Total optimizer steps.")
    batch_size: int = _setting(16, "Sequences per micro-batch.")
    seq_len: int = _setting(128, "Tokens per sequence.")
    grad_accum: int = _setting(1, "Micro-batches per step.")
    lr: float = _setting(3e-3, "Peak learning rate.")
    min_lr_ratio: float = _setting(0.1, "Final learning rate of the cosine decay, as a fraction of --lr.")
    warmup_steps: int = _setting(20, "Linear warm-up steps.")
    weight_decay: float = _setting(0.1, "AdamW weight decay (not applied to norms and biases).")
    beta1: float = _setting(0.9, "AdamW beta1.")
    beta2: float = _setting(0.95, "AdamW beta2.")
    grad_clip: float = _setting(1.0, "Clip the global gradient norm to this (0: no clipping).")
    bf16: bool = _setting(False, "bfloat16 autocast with fp32 master weights.")
    seed: int = _setting(0, "Seed of data order and routing noise.")
    domains: dict[str, float] = _setting(dict, "Mixture weights, e.g. 'code=0.7,prose=0.3' (empty: every domain, equal weights).", kind="weights")
    tierset: str = _setting("all", "TierSet to train: all, tier_1b, upto:tier_1b, only:tier_10b.", flag="--tiers")
    eval_every: int = _setting(100, "Validate every N steps (0: only at the end).")
    eval_batches: int = _setting(8, "Batches per domain in each validation.")
    eval_batch_size: int = _setting(16, "Sequences per validation batch.")
    save_every: int = _setting(0, "Checkpoint every N steps (0: only at the end).")
    keep_last: int = _setting(3, "Periodic checkpoints kept (older ones are deleted).")
    log_every: int = _setting(1, "Write metrics.jsonl every N steps.")
    replay: dict[str, float] = _setting(dict, "Old domains to replay, e.g. 'prose=1' (with --replay-share).", kind="weights")
    replay_share: float = _setting(0.0, "Share of each batch's rows drawn from the --replay domains.")
    freeze: list[dict[str, Any]] = _setting(
        list, "Freeze parameters matching PATTERN until a step: 'layers.[0-3].*@500' (no @: never thaw). Repeatable.", kind="freeze"
    )
    ewc_from: str | None = _setting(None, "Checkpoint holding an EWC estimate (`lite-llm ewc estimate`).", flag="--ewc", kind="path")
    ewc_weight: float = _setting(0.0, "EWC penalty weight lambda.")
    distill_from: str | None = _setting(None, "Teacher checkpoint for distillation.", kind="path")
    distill_weight: float = _setting(1.0, "Distillation loss weight.")
    distill_temperature: float = _setting(2.0, "Distillation temperature.")
    distill_domains: list[str] = _setting(list, "Distil only rows of these domains, e.g. 'prose' (empty: every row).", kind="names")
    si_strength: float = _setting(
        0.0, "Synaptic Intelligence c: > 0 measures each weight's importance along this run (stored in every checkpoint's si/) and weights the --si-from penalty."
    )
    si_damping: float = _setting(1e-3, "SI damping xi in Omega = omega / (Delta^2 + xi).")
    si_from: str | None = _setting(None, "Checkpoint of an earlier SI run (or grown from one) whose importance to protect (needs --si-strength).", kind="path")
    parallel: str = _setting(
        "", "Parallel degrees under torchrun, e.g. 'dp=2,ep=2' (world size = dp x ep x tp x pp; see the README); empty: data parallel over every rank."
    )
    pp_schedule: str = _setting(
        "1f1b", "Pipeline schedule under --parallel pp=N: 1f1b or gpipe; its microbatches are --grad-accum (1f1b needs at least N)."
    )
    keep_freed_cpu_memory: bool = _setting(True, flag="--keep-memory", help="On CPU, keep freed memory for the next step (faster large MoE steps; the process keeps its peak memory).")

    def __post_init__(self) -> None:
        from ..config import is_int

        for name in ("lr", "min_lr_ratio", "grad_clip", "weight_decay", "replay_share", "ewc_weight", "distill_weight", "distill_temperature", "si_strength", "si_damping"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"train.{name} must be a number, got {value!r}")
        for name in ("bf16", "keep_freed_cpu_memory"):  # "no" or 1 in a YAML file is not a yes/no
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"train.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("parallel", "pp_schedule"):  # tierset has its own forms (a TierSet, a list)
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"train.{name} must be a string, e.g. {'dp=2,ep=2' if name == 'parallel' else '1f1b'}, got {getattr(self, name)!r}")
        for name in ("ewc_from", "distill_from", "si_from"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"train.{name} must be a checkpoint path, got {getattr(self, name)!r}")
        if isinstance(self.freeze, str):  # one pattern written as a string: walking its characters made no sense
            raise ConfigError(f"train.freeze must be a list of rules such as [{{patterns: [{self.freeze!r}], thaw_at: null}}], got the string {self.freeze!r}")
        for name in ("domains", "replay"):
            value = getattr(self, name)
            if not isinstance(value, dict) or any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in value.values()):
                raise ConfigError(f"train.{name} must map domain names to numeric weights, e.g. {{code: 0.7, prose: 0.3}}, got {value!r}")
        for name in POSITIVE_INTS:
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ConfigError(f"train.{name} must be a positive integer, got {value!r}")
        for name in NON_NEGATIVE_INTS:
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ConfigError(f"train.{name} must be a non-negative integer, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("train.grad_clip and train.weight_decay must be >= 0")
        bad = {k: v for k, v in self.domains.items() if not v >= 0}
        if bad:
            raise ConfigError(f"train.domains weights must be >= 0, got {bad}")
        if self.domains and not any(v > 0 for v in self.domains.values()):
            raise ConfigError("train.domains must give at least one domain a positive weight")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"train.{name} must be a number in [0, 1) (AdamW's moment decay), got {value!r}")
        self._normalise_tierset()
        if self.pp_schedule not in ("1f1b", "gpipe"):
            raise ConfigError(f"train.pp_schedule must be 1f1b or gpipe, got {self.pp_schedule!r}")
        self._check_protection()

    def _normalise_tierset(self) -> None:
        """Keep ``tierset`` in its string form (``upto:tier_1b``), whatever form it was given in
        (a TierSet, a list of names): the config is written to JSON in every checkpoint and
        compared on resume, where a TierSet object would come back as a dict and never match."""
        from ..config import TierSet

        if not isinstance(self.tierset, str):
            try:
                self.tierset = str(TierSet.coerce(self.tierset))
            except TierSetError:
                raise ConfigError(
                    f"train.tierset must be a TierSet or its string form (all, tier_1b, upto:tier_1b, only:tier_10b), got {self.tierset!r}"
                ) from None
        else:
            try:
                TierSet.parse(self.tierset)
            except TierSetError as exc:
                raise ConfigError(f"train.tierset: {exc}") from None

    def _check_protection(self) -> None:
        self._check_finite_protection()
        self._check_unused_protection()
        if not 0 <= self.replay_share < 1:
            raise ConfigError(f"train.replay_share must be in [0, 1) (the rest of each batch is new data), got {self.replay_share}")
        if any(not 0 <= v < math.inf for v in self.replay.values()):
            raise ConfigError(f"train.replay weights must be finite numbers >= 0, got {self.replay}")
        if self.replay_share > 0 and not any(v > 0 for v in self.replay.values()):
            raise ConfigError("train.replay_share is set but train.replay names no old domain with a positive weight, e.g. {prose: 1.0}")
        if self.replay and self.replay_share == 0:
            raise ConfigError("train.replay names old domains but train.replay_share is 0, so nothing would be replayed; set a share such as 0.25")
        if self.replay_share > (self.batch_size - 1) / self.batch_size:
            raise ConfigError(
                f"train.replay_share {self.replay_share} leaves no row of new data in a micro-batch of {self.batch_size}; use at most {(self.batch_size - 1) / self.batch_size:.3g} or a larger batch"
            )
        for i, rule in enumerate(self.freeze):
            if not isinstance(rule, dict) or set(rule) - {"patterns", "thaw_at"} or not rule.get("patterns"):
                raise ConfigError(f"train.freeze[{i}] must be {{patterns: [...], thaw_at: STEP or null}}, got {rule!r}")
            thaw = rule.get("thaw_at")
            if thaw is not None and (not isinstance(thaw, int) or thaw < 0):
                raise ConfigError(f"train.freeze[{i}].thaw_at must be a step (an integer >= 0) or null, got {thaw!r}")
        if self.ewc_weight < 0 or (self.ewc_from is None) != (self.ewc_weight == 0):
            raise ConfigError("train.ewc_from and train.ewc_weight go together: give a checkpoint with an EWC estimate and a positive weight, or neither")
        if self.distill_from is not None and not (self.distill_weight > 0 and self.distill_temperature > 0):
            raise ConfigError("train.distill_weight and train.distill_temperature must be positive")
        if not self.si_strength >= 0 or not self.si_damping > 0:
            raise ConfigError(f"train.si_strength must be >= 0 and train.si_damping > 0, got {self.si_strength} and {self.si_damping}")
        if self.si_from is not None and self.si_strength == 0:
            raise ConfigError("train.si_from needs a positive train.si_strength (the penalty's c, e.g. 1.0); without it the importance would be ignored")

    def _check_finite_protection(self) -> None:
        """An infinite penalty weight or temperature makes every step's loss non-finite: each
        step would be skipped and the run would end "successfully" having learnt nothing."""
        for name in ("ewc_weight", "distill_weight", "distill_temperature", "si_strength", "si_damping"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ConfigError(f"train.{name} must be a finite number, got {value}")

    def _check_unused_protection(self) -> None:
        """A distillation or SI setting given without the option that turns it on would be
        ignored without a word: the user believes the run is protected when it is not."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in _PROTECTION_SETTINGS}
        for name, (switch, flag) in _PROTECTION_SETTINGS.items():
            if getattr(self, name) != defaults[name] and getattr(self, switch) in (None, 0, 0.0):
                raise ConfigError(f"train.{name} is set but train.{switch} is not, so it would be ignored; give {flag} too, or leave train.{name} out")
        if self.distill_domains and self.distill_from is None:
            raise ConfigError(
                "train.distill_domains is set but train.distill_from is not, so it would be ignored; give --distill-from TEACHER too, or leave train.distill_domains out"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training field(s) {', '.join(unknown)}; known fields are {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        """Read a training config (``.json`` or YAML; its fields at the top or under ``train:``)."""
        from ..config import load_config_file

        def parse(data: dict[str, Any]) -> "TrainConfig":
            return cls.from_dict(data.get("train", data))

        return load_config_file(path, "training config", parse)