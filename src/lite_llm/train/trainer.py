"""The training loop.

Reproducibility is by construction rather than by saving RNG streams: the batch of a step is a
pure function of (seed, step, micro-batch), routing noise is seeded by the step, the learning
rate is a function of the step, and nothing reads global RNG.  A run resumed from a checkpoint
therefore sees the same data, the same learning rates and (with the optimizer state restored
bitwise) produces the same losses as a run that was never interrupted.

Extension points for the curriculum and forgetting prevention are :class:`TrainerCallback`
hooks: they can change what is trainable, add loss terms, and keep JSON state in checkpoints.

Devices: the trainer runs on one device (``device=``; by default where the model already is).
The model, every batch, the optimizer's moments and the callbacks' tensors (EWC's Fisher and
anchor, a distillation teacher) live there; bf16 autocast runs on the device's own type, with
the parameters and optimizer state kept in fp32 (master weights).  What is saved is moved to
the CPU, so a checkpoint written on a GPU loads on a CPU and the other way round.  On the CPU
every operation is the one it was before devices existed: the numbers are bitwise the same.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import TierSet
from ..runtime.cpu_memory import keep_freed_memory
from ..runtime.device import Bf16Support, bf16_support, describe_device, module_device, resolve_device
from .validation import evaluate
from .config import TrainConfig
from ..config import flops_per_token
from .metrics import MetricsLogger
from .progress import TrainProgress
from .callbacks import TrainerCallback
from .schedule import lr_at

if TYPE_CHECKING:
    from ..data import TokenData
    from ..model import LiteLLM


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # LM loss of every step run (NaN where skipped)
    skipped_steps: list[int] = field(default_factory=list)
    final_eval: dict[str, dict[str, float]] = field(default_factory=dict)
    checkpoint: Path | None = None
    tokens: int = 0
    flops: float = 0.0
    stopped_early: str | None = None


@dataclass
class RoutingTotals:
    """A step's routing statistics, summed (counts) or averaged (probabilities) over its micro-batches."""

    tier_routes: torch.Tensor | None = None
    expert_routes: torch.Tensor | None = None
    tier_probs: list[torch.Tensor] = field(default_factory=list)  # per MoE layer, batch-mean p(tier)
    tier_weights: list[torch.Tensor] = field(default_factory=list)  # per MoE layer, batch-mean routing weight per tier

    def add(self, routing: list[Any], grad_accum: int) -> None:
        """Add one micro-batch's ``LayerRouting`` of every MoE layer."""
        for i, layer in enumerate(routing):
            if len(self.tier_probs) <= i:
                self.tier_probs.append(torch.zeros_like(layer.tier_probs))
                self.tier_weights.append(torch.zeros_like(layer.tier_probs))
            self.tier_probs[i] += layer.tier_probs / grad_accum
            if layer.tier_weights is not None:
                self.tier_weights[i] += layer.tier_weights / grad_accum
            self.tier_routes = layer.tier_routes.clone() if self.tier_routes is None else self.tier_routes + layer.tier_routes
            self.expert_routes = layer.expert_routes.clone() if self.expert_routes is None else self.expert_routes + layer.expert_routes

    def record(self, tiers: list[Any]) -> dict[str, Any]:
        """The metrics record's routing fields (call only when some layer was routed)."""
        assert self.tier_routes is not None and self.expert_routes is not None
        total = float(self.tier_routes.sum()) or 1.0
        weights = [w.tolist() for w in self.tier_weights]
        # the share of routing weight each tier carries, over the layers: what a tier does for
        # the tokens; route counts say only how often it is chosen, 50/50 whenever k_tier = 2
        weight_share = {t.name: sum(w[i] for w in weights) / len(weights) for i, t in enumerate(tiers)} if weights and any(map(any, weights)) else None
        return {
            "tier_share": {t.name: float(n) / total for t, n in zip(tiers, self.tier_routes)},
            **({"tier_weight_share": weight_share} if weight_share else {}),
            "expert_routes": self.expert_routes.tolist(),
            "tier_prob_layers": [p.tolist() for p in self.tier_probs],
            "tier_weight_layers": weights,
        }


@dataclass
class Accumulated:
    """What a step's forward and backward passes leave besides the gradients: the losses to
    report, whether every one was finite, and the routing statistics."""

    totals: dict[str, float]
    finite: bool = True
    routing: RoutingTotals = field(default_factory=RoutingTotals)


class Trainer:
    """Trains a model on a :class:`TokenData` mixture according to a :class:`TrainConfig`."""

    def __init__(
        self,
        model: "LiteLLM",
        data: "TokenData",
        config: TrainConfig,
        *,
        run_dir: str | Path | None = None,
        callbacks: list[TrainerCallback] | None = None,
        show_progress: bool = True,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
    ) -> None:
        from ..errors import ConfigError

        if not isinstance(config, TrainConfig):
            raise ConfigError(f"Trainer needs a TrainConfig, got {type(config).__name__}; build one with TrainConfig(...) or TrainConfig.from_dict(...)")
        # Shapes that would otherwise fail at step 0 deep inside the model (an IndexError from the
        # embedding for data of a larger vocabulary): refused now, in one sentence.
        if config.seq_len > model.config.max_seq_len:
            raise ConfigError(
                f"train.seq_len {config.seq_len} is longer than the model's context of {model.config.max_seq_len} tokens (max_seq_len); give seq_len {model.config.max_seq_len} or less"
            )
        data_vocab = getattr(getattr(data, "tokenizer", None), "vocab_size", None)
        if isinstance(data_vocab, int) and data_vocab > model.config.vocab_size:
            raise ConfigError(
                f"the data was tokenized with {data_vocab} token ids but the model's vocabulary has {model.config.vocab_size}; prepare the data with the model's tokenizer or build the model with vocab_size={data_vocab}"
            )
        # A run-time choice, not a TrainConfig field: where a run computes must not change what
        # it computes, and a run resumed on another device is the same run.
        self.device = module_device(model) if device is None else resolve_device(device)
        self.bf16: Bf16Support | None = bf16_support(self.device) if config.bf16 else None
        if self.bf16 is not None and not self.bf16.usable:
            raise ConfigError(f"train.bf16 is set but {self.device} cannot compute in bfloat16 ({self.bf16.how}); train in fp32 (--no-bf16)")
        self.model = model.to(self.device)
        self.data = data
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        from .protection import check_protections

        self.callbacks = list(callbacks or [])
        # a config asking for EWC (or SI, distillation, freezing) must not train without it
        check_protections(config, self.callbacks)
        self.show_progress = show_progress
        self.tokenizer = tokenizer if tokenizer is not None else getattr(data, "tokenizer", None)
        self.weights = self._mixture(config.domains, "domains")
        self.replay_weights = self._mixture(config.replay, "replay") if config.replay_share > 0 else {}
        self._check_domains(config.distill_domains, "distill_domains")
        self.tierset = TierSet.coerce(config.tierset)
        self.tierset.resolve(model.config)  # fail now on an unknown tier, not at step 1
        self.optimizer = self._build_optimizer()
        self.step = 0  # the next step to run
        self.tokens = 0
        self.flops = 0.0
        self.ancestor_flops = 0.0  # training FLOPs of the checkpoints this run started from
        self.progressive: dict[str, Any] = {}
        self.logger = MetricsLogger(self.run_dir / "metrics.jsonl" if self.run_dir else None)
        self.stop_reason: str | None = None
        self.batch_domains: list[str] = []  # the domain of each row of the current micro-batch

    @classmethod
    def from_config(
        cls,
        model: "LiteLLM",
        data: "TokenData",
        config: TrainConfig,
        *,
        callbacks: list[TrainerCallback] | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> "Trainer":
        """A trainer with the protection callbacks ``config`` asks for (EWC, SI, distillation,
        freezing) built from it, after ``callbacks``.  This is where their files are read (the
        Fisher, earlier SI importance, the teacher), so the constructor itself reads nothing and
        a test or script can hand it callbacks of its own."""
        from .protection import protection_callbacks

        where = module_device(model) if device is None else resolve_device(device)
        # protections last: a freezing schedule must have the final word on requires_grad
        built = list(callbacks or []) + protection_callbacks(config, model, device=where)
        return cls(model, data, config, callbacks=built, device=where, **kwargs)

    # ------------------------------------------------------------------------------ set-up
    def inherit(self, progressive: dict[str, Any]) -> None:
        """Start from a checkpoint's ``progressive.json``: keep its history (expansions, EWC,
        curriculum) and count its training compute as this run's ancestry, so a grown model's
        total cost includes the small model's training."""
        # the EWC estimate and SI importance live in the parent's ewc/ and si/, which this run's
        # checkpoints do not copy (an SI callback writes the run's own si/)
        self.progressive = {k: v for k, v in progressive.items() if k not in ("training", "ewc", "si")}
        done = progressive.get("training") or {}
        self.ancestor_flops = float(done.get("total_flops", done.get("flops", 0.0)) or 0.0)

    def runtime_summary(self) -> str:
        """Where and in what precision this run computes, for a run header, e.g.
        ``cuda:0 (NVIDIA H200), bf16 native on the GPU, fp32 master weights``."""
        precision = "fp32" if self.bf16 is None else f"{self.bf16.how}, fp32 master weights"
        return f"{describe_device(self.device)}, {precision}"

    @property
    def total_flops(self) -> float:
        return self.ancestor_flops + self.flops

    def _mixture(self, domains: dict[str, float], setting: str) -> dict[str, float]:
        if not domains:
            return {d: 1.0 for d in self.data.domains}
        self._check_domains(domains, setting)
        return {d: float(w) for d, w in domains.items() if w > 0}

    def _check_domains(self, domains: Iterable[str], setting: str) -> None:
        unknown = sorted(set(domains) - set(self.data.domains))
        if unknown:
            from ..errors import ConfigError

            raise ConfigError(f"train.{setting} names unknown domain(s) {', '.join(unknown)}; the data has {', '.join(self.data.domains)}")

    def _build_optimizer(self) -> torch.optim.AdamW:
        """AdamW over every parameter (frozen ones simply get no gradient and are skipped);
        no weight decay on norms, biases and vectors."""
        decay, no_decay = [], []
        for p in self.model.parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        c = self.config
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=c.lr,
            betas=(c.beta1, c.beta2),
            foreach=False,
        )

    def stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step (used by callbacks, e.g. rollback)."""
        self.stop_reason = reason

    # ------------------------------------------------------------------------------ state
    def training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Optimizer moments by parameter name (safetensors-ready) and JSON metadata."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        tensors: dict[str, torch.Tensor] = {}
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                tensors[f"optimizer/{names[id(p)]}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        for cb in self.callbacks:
            tensors.update({f"callback/{cb.name}/{key}": value for key, value in cb.state_tensors().items()})
        return tensors, {**self.training_meta(), "torch_rng": torch.get_rng_state().tolist()}

    def training_meta(self) -> dict[str, Any]:
        """The JSON part of the training state: position, compute, settings, callbacks' state."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "flops": self.flops,
            "ancestor_flops": self.ancestor_flops,
            "train_config": self.config.to_dict(),
            "data": self._data_identity(),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
        }

    def progressive_state(self) -> dict[str, Any]:
        """``progressive.json`` as of now: the inherited history plus this run's progress."""
        progressive = dict(self.progressive)
        progressive["training"] = {
            "step": self.step, "tokens": self.tokens, "flops": self.flops, "ancestor_flops": self.ancestor_flops, "total_flops": self.total_flops,
        }
        return progressive

    def load_training_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        params = dict(self.model.named_parameters())
        self.optimizer.state.clear()
        for key, value in tensors.items():
            if not key.startswith("optimizer/"):
                continue
            name, slot = key[len("optimizer/") :].rsplit("/", 1)
            if name in params:
                # torch's own policy (Optimizer.load_state_dict): AdamW's step count stays a CPU
                # scalar (non-fused, non-capturable); the moments go to their parameter's device
                to = value.device if slot == "step" else params[name].device
                self.optimizer.state[params[name]][slot] = value.to(to, copy=True)
        self.step = int(meta.get("step", 0))
        self.tokens = int(meta.get("tokens", 0))
        self.flops = float(meta.get("flops", 0.0))
        self.ancestor_flops = float(meta.get("ancestor_flops", 0.0))
        for cb in self.callbacks:
            cb.load_state_dict(meta.get("callbacks", {}).get(cb.name, {}))
            prefix = f"callback/{cb.name}/"
            cb.load_state_tensors({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        if "torch_rng" in meta:
            torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))

    def resume(self, checkpoint: str | Path) -> None:
        """Continue from ``checkpoint``: weights, optimizer moments, step, callback state."""
        from ..checkpoint import load_checkpoint

        loaded = load_checkpoint(checkpoint, load_training=True)
        if loaded.training is None:
            from ..errors import CheckpointError

            raise CheckpointError(f"checkpoint {checkpoint} has no training state; start a new run from it instead of resuming")
        saved_cfg = loaded.training.meta.get("train_config")
        if saved_cfg is not None:
            self.check_same_schedule(saved_cfg)
        self.check_same_data(loaded.training.meta)
        self.model.load_state_dict(loaded.model.state_dict())
        self.progressive = loaded.progressive
        self.load_training_state(loaded.training.tensors, loaded.training.meta)
        self.logger.drop_from(self.step)  # the steps after the checkpoint run again

    def _data_identity(self) -> dict[str, str] | None:
        """Where the data is and its fingerprint (a dataset of ``lite-llm data prepare``; None for others)."""
        fingerprint = getattr(self.data, "fingerprint", None)
        return {"dir": str(self.data.data_dir), "fingerprint": fingerprint} if isinstance(fingerprint, str) else None

    def check_same_data(self, saved_meta: dict[str, Any]) -> None:
        """Resuming on another dataset would silently continue another run (its batches are a
        function of the data and the step): refuse.  Checkpoints from before the fingerprint
        was recorded are taken as they are."""
        from ..errors import ConfigError

        saved, mine = saved_meta.get("data") or {}, self._data_identity() or {}
        if saved.get("fingerprint") and mine.get("fingerprint") and saved["fingerprint"] != mine["fingerprint"]:
            raise ConfigError(
                f"cannot resume with --data {mine['dir']}: the run was trained on {saved.get('dir', 'another dataset')}, "
                "whose index differs; resume with the run's own data, or start a new run in another -o directory"
            )

    def check_same_schedule(self, saved: dict[str, Any]) -> None:
        """Resuming with a different schedule would silently change the run: refuse.

        ``steps`` may grow (extending a run): the schedule is a function of (step, total steps),
        so an extended run continues on the schedule it would have had with the new total
        from the start (its warm-up is long past; the decay stretches over the new total)."""
        from ..errors import ConfigError

        mine = self.config.to_dict()
        if "steps" in saved and mine["steps"] < int(saved["steps"]):
            raise ConfigError(
                f"cannot resume: the run was planned for {saved['steps']} steps and --steps {mine['steps']} would shorten it; give at least {saved['steps']} (or omit --steps)"
            )
        keys = (
            "batch_size", "seq_len", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "seed", "domains", "tierset",
            "replay", "replay_share", "freeze", "ewc_from", "ewc_weight", "distill_from", "distill_weight", "distill_temperature", "distill_domains",
            "si_strength", "si_damping", "si_from",
        )
        for key in keys:
            if key in saved and saved[key] != mine[key]:
                raise ConfigError(
                    f"cannot resume: train.{key} was {saved[key]!r} in the checkpoint but is {mine[key]!r} now; use the original value or start a new run"
                )

    def save(self, tag: str | None = None) -> Path | None:
        if self.run_dir is None:
            return None
        from ..checkpoint import CheckpointManager, TrainingState, save_checkpoint

        tensors, meta = self.training_state()
        progressive = self.progressive_state()
        state = TrainingState(tensors=tensors, meta=meta)
        extra_dirs: dict[str, dict[str, torch.Tensor]] = {}
        for cb in self.callbacks:
            extra_dirs.update(cb.checkpoint_dirs(self, progressive))
        if tag is not None:
            return save_checkpoint(
                self.run_dir / tag, self.model, tokenizer=self.tokenizer, progressive=progressive, training=state, extra_dirs=extra_dirs
            )
        manager = CheckpointManager(self.run_dir, keep_last=self.config.keep_last)
        return manager.save(self.step, self.model, tokenizer=self.tokenizer, progressive=progressive, training=state, extra_dirs=extra_dirs)

    # ------------------------------------------------------------------------------ loop
    def evaluate(self) -> dict[str, dict[str, float]]:
        c = self.config
        scores = evaluate(
            self.model,
            self.data,
            self.data.domains,
            batch_size=c.eval_batch_size,
            seq_len=c.seq_len,
            max_batches=c.eval_batches,
            tierset=self.tierset,
        )
        return {d: s.to_dict() for d, s in scores.items()}

    def train(self, until: int | None = None) -> TrainResult:
        """Run steps ``self.step .. until`` (default: the configured total)."""
        c = self.config
        end = min(until if until is not None else c.steps, c.steps)
        result = TrainResult(steps=0)
        per_token = flops_per_token(self.model.config, c.seq_len, self.tierset)
        if c.keep_freed_cpu_memory and self.device.type == "cpu":
            keep_freed_memory()
        for cb in self.callbacks:
            cb.on_train_begin(self)
        self.model.train()
        with TrainProgress(end, self.step, enabled=self.show_progress) as progress:
            while self.step < end and self.stop_reason is None:
                step = self.step
                for cb in self.callbacks:
                    cb.on_step_begin(self, step)
                record = self._one_step(step)
                self.step += 1
                if record.get("skipped"):
                    result.skipped_steps.append(step)
                    progress.warn(f"step {step}: non-finite loss ({record['loss']}); skipped the update")
                else:
                    self.tokens += c.tokens_per_step
                    self.flops += per_token * c.tokens_per_step
                record.update(tokens=self.tokens, flops=self.flops, total_flops=self.total_flops)
                result.losses.append(record["loss"])
                last = self.step == c.steps  # the run's real end, not a pause at `until`
                if (c.eval_every and self.step % c.eval_every == 0) or last:
                    record["val"] = self.evaluate()
                    for cb in self.callbacks:
                        cb.on_eval(self, step, record["val"])
                for cb in self.callbacks:
                    cb.on_step_end(self, step, record)
                if step % c.log_every == 0 or "val" in record:
                    self.logger.log(record)
                progress.update(self.step, record)
                stopped = self.stop_reason is not None  # a callback ended the run (a curriculum's rollback): keep where it stopped
                if (c.save_every and self.step % c.save_every == 0) or ((last or stopped) and self.run_dir is not None):
                    result.checkpoint = self.save()
        if self.stop_reason is not None:
            result.stopped_early = self.stop_reason
        result.steps = len(result.losses)
        result.tokens, result.flops = self.tokens, self.flops
        last_val = self.logger.last("val")
        if last_val is not None:
            result.final_eval = last_val
        self.logger.close()
        return result

    def sample(self, step: int, micro: int) -> tuple[torch.Tensor, list[str]]:
        """The rows of a micro-batch and the domain of each: new data from the ``domains``
        mixture, then ``replay_rows`` rows from the ``replay`` mixture (an independent stream)."""
        c = self.config
        replayed = replay_rows(c.batch_size, c.replay_share, seed=c.seed, step=step, micro=micro) if self.replay_weights else 0
        batch, domains = self.data.sample_batch("train", self.weights, c.batch_size - replayed, c.seq_len, seed=c.seed, step=step, micro=micro)
        if replayed:
            old, old_domains = self.data.sample_batch(
                "train", self.replay_weights, replayed, c.seq_len, seed=c.seed, step=step, micro=micro, stream="replay"
            )
            batch, domains = torch.cat([batch, old]), domains + old_domains
        return batch, domains

    def _one_step(self, step: int) -> dict[str, Any]:
        c = self.config
        lr = lr_at(step, lr=c.lr, warmup_steps=c.warmup_steps, total_steps=c.steps, min_lr_ratio=c.min_lr_ratio)
        for cb in self.callbacks:
            lr *= cb.lr_scale(self, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        done = self.forward_backward(step)
        record: dict[str, Any] = {"step": step, "lr": lr, **self.reduce_totals(done.totals)}
        if not done.finite:
            self.optimizer.zero_grad(set_to_none=True)
            record["skipped"] = True
            return record
        for cb in self.callbacks:
            cb.on_before_step(self, step)
        grad_norm = self.prepare_update()
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the update's kernels are queued: time them too
        elapsed = time.perf_counter() - started
        record["tokens_per_s"] = c.tokens_per_step / max(elapsed, 1e-9)
        if done.routing.tier_routes is not None:
            record.update(self.reduce_routing(done.routing).record(self.model.config.tiers))
        return record

    def forward_backward(self, step: int) -> "Accumulated":
        """The step's gradients, accumulated over its ``grad_accum`` micro-batches as
        ``(loss / grad_accum).backward()``; stops at the first non-finite loss (a pipeline-parallel
        trainer runs its schedule here instead)."""
        c = self.config
        done = Accumulated({"loss": 0.0, "balance_loss": 0.0, "z_loss": 0.0, "extra_loss": 0.0})
        totals = done.totals
        for micro in range(c.grad_accum):
            batch, self.batch_domains = self.sample(step, micro)
            batch = batch.to(self.device)  # the same tensor on the CPU
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.bf16):
                out = self.model(batch, tierset=self.tierset, labels=batch, step=step)
            loss = out.loss
            for cb in self.callbacks:
                extra = cb.extra_loss(self, step, batch, out)
                if extra is not None:
                    loss = loss + extra
                    totals["extra_loss"] += extra.item() / c.grad_accum
            if not self.all_finite(loss):
                done.finite = False
                totals["loss"] = out.lm_loss.item()
                break
            (loss / c.grad_accum).backward()
            totals["loss"] += out.lm_loss.item() / c.grad_accum
            if out.balance_loss is not None:
                totals["balance_loss"] += out.balance_loss.item() / c.grad_accum
                totals["z_loss"] += out.z_loss.item() / c.grad_accum
            done.routing.add(out.routing, c.grad_accum)
        return done

    # -------------------------------------------------------------- what data parallelism changes
    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the step may go on (a distributed trainer asks every rank: all skip or none)."""
        return bool(torch.isfinite(loss))

    def reduce_totals(self, totals: dict[str, float]) -> dict[str, float]:
        """The step's losses as reported (a distributed trainer averages its ranks')."""
        return totals

    def reduce_routing(self, routing: RoutingTotals) -> RoutingTotals:
        """The step's routing statistics as reported (a distributed trainer's cover every data
        rank's rows, as its losses do)."""
        return routing

    def prepare_update(self) -> float | None:
        """Gradients ready for the optimizer: clipped to ``grad_clip``; the norm, if clipped."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.config.grad_clip > 0 and params:
            return float(torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip, foreach=False))
        return None


def replay_rows(batch_size: int, share: float, *, seed: int, step: int, micro: int) -> int:
    """How many of a micro-batch's rows are replayed: ``floor(share * B)``, plus one with
    probability equal to the remainder (a stable hash of seed/step/micro decides), so every
    batch is within one row of the share and the long-run share is exact.  At least one row
    stays new data."""
    from ..data.hashing import stable_unit

    whole, rest = divmod(share * batch_size, 1.0)
    rows = int(whole) + (1 if stable_unit("replay", seed, step, micro) < rest else 0)
    return min(rows, batch_size - 1)
