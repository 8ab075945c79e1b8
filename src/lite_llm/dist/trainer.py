"""The trainer on many ranks: the single-process :class:`~lite_llm.train.Trainer`, with what
data parallelism changes and nothing else.

* Each data rank takes its rows of the global batch (the batch of a step is a pure function of
  seed and step, so every rank knows it without talking): rank r of R gets rows
  ``r*B/R .. (r+1)*B/R``, and the global batch is the same rows one process would train on.
  ``R`` counts data ranks (``dp x ep``): the ``tp`` ranks of one data rank read the same rows,
  and what is averaged "over the ranks" below is averaged over the data ranks of one ``tp``
  index (``Ranks.data_group``) — its ``tp`` twins hold the same values.
* Expert gradients are averaged like the dense ones (FSDP2 does those), then clipped by the
  global norm over every mesh (``dist/grad_norm.py``).
* A step is skipped on every rank or on none; losses are averaged over the ranks.
* Rank 0 alone prints progress and writes ``metrics.jsonl``; checkpoints are sharded
  (``dist/checkpoint.py``) and consolidated into an ordinary one at the end of the run.

Under pipeline parallel (``--parallel pp=N``) the model is this rank's :class:`StageModule`
and the micro-batch loop becomes the pipeline schedule over the ``grad_accum`` micro-batches
(1F1B or GPipe, ``train.pp_schedule``): the same rows, losses and gradients as one process's
loop, the losses broadcast from the last stage, the step skipped where one process would
stop (at the first non-finite micro-batch), the clip over every stage's gradients, and
validation run forward through the stages.  Not carried: the per-layer routing statistics
(``tier_share`` and the rest are absent from the metrics) and callbacks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..train import TrainConfig, Trainer
from ..train.trainer import Accumulated, RoutingTotals
from ..train.validation import score_domains
from ..train.metrics import MetricsLogger
from .checkpoint import consolidate, load_sharded, read_meta, save_sharded
from .expert_parallel import sync_expert_grads
from .grad_norm import grad_norm_and_clip
from .launch import Ranks
from .pipeline import Pipeline, StageModule, check_schedule, clip_grad_norm_pipeline, schedule_stage

if TYPE_CHECKING:
    from ..data import TokenData
    from ..model import LiteLLM


class DistributedTrainer(Trainer):
    """A :class:`Trainer` for one rank of a parallelized model (see :func:`dist.parallelize`)."""

    def __init__(self, model: "LiteLLM | StageModule", data: "TokenData", config: TrainConfig, ranks: Ranks, **kwargs: Any) -> None:
        if config.batch_size % ranks.degrees.data_ranks:
            raise ConfigError(
                f"--batch-size {config.batch_size} does not split evenly over the {ranks.degrees.data_ranks} data ranks "
                f"(dp x ep); use a multiple of {ranks.degrees.data_ranks}"
            )
        for unsupported in ("ewc_from", "distill_from", "si_from"):
            if getattr(config, unsupported):
                raise ConfigError(f"train.{unsupported} is not supported in distributed runs yet; train with it in one process")
        if config.si_strength or config.replay_share or config.freeze:
            raise ConfigError("synaptic intelligence, replay and freezing are not supported in distributed runs yet; use them in one process")
        pipelined = isinstance(model, StageModule)
        if pipelined:
            check_schedule(ranks.degrees.pp, config.grad_accum, config.pp_schedule)
            if kwargs.get("callbacks"):
                raise ConfigError("trainer callbacks (a curriculum and the like) cannot run under pipeline parallel, where no rank holds the whole model; train without pp")
        self.ranks = ranks
        if not ranks.is_main:
            kwargs["show_progress"] = False
        super().__init__(model, data, config, device=ranks.device, **kwargs)
        if not ranks.is_main:
            self.logger = MetricsLogger(None)
        self.pipe: Pipeline | None = None
        if pipelined:
            self.pipe = schedule_stage(self.model, ranks.mesh["pp"], config.grad_accum, config.pp_schedule, ranks.device)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ what DP changes
    def sample(self, step: int, micro: int) -> tuple[torch.Tensor, list[str]]:
        batch, domains = super().sample(step, micro)
        per = self.config.batch_size // self.ranks.degrees.data_ranks
        r = self.ranks.data_rank
        return batch[r * per : (r + 1) * per], domains[r * per : (r + 1) * per]

    def all_finite(self, loss: torch.Tensor) -> bool:
        # on the ranks' device: nccl reduces only CUDA tensors
        ok = torch.tensor([1.0 if bool(torch.isfinite(loss)) else 0.0], device=self.ranks.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() == 1.0)

    def reduce_totals(self, totals: dict[str, float]) -> dict[str, float]:
        keys = sorted(totals)
        values = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=self.ranks.device)
        dist.all_reduce(values, group=self.ranks.data_group)
        values /= self.ranks.degrees.data_ranks
        return {k: float(v) for k, v in zip(keys, values.tolist())}

    def reduce_routing(self, routing: RoutingTotals) -> RoutingTotals:
        """Route counts summed and per-layer batch means averaged over the data ranks (each rank
        routes as many rows), so the metrics describe the global batch, as one process's do."""
        group, n = self.ranks.data_group, self.ranks.degrees.data_ranks

        def reduced(t: torch.Tensor, mean: bool) -> torch.Tensor:
            out = t.detach().to(self.ranks.device, copy=True)
            dist.all_reduce(out, group=group)
            return (out / n if mean else out).to(t.device)

        return RoutingTotals(
            tier_routes=reduced(routing.tier_routes, False) if routing.tier_routes is not None else None,
            expert_routes=reduced(routing.expert_routes, False) if routing.expert_routes is not None else None,
            tier_probs=[reduced(p, True) for p in routing.tier_probs],
            tier_weights=[reduced(w, True) for w in routing.tier_weights],
        )

    def prepare_update(self) -> float | None:
        degrees = self.ranks.degrees
        if degrees.ep > 1:
            sync_expert_grads(self.model, self.ranks.mesh.get_group("dp"), self.ranks.data_group, degrees.data_ranks)
        if self.pipe is not None:  # collective over the stages: every rank calls it
            return clip_grad_norm_pipeline(self.pipe, self.config.grad_clip) if self.config.grad_clip > 0 else None
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.config.grad_clip > 0 and params:
            return grad_norm_and_clip(params, self.config.grad_clip)
        return None

    # ------------------------------------------------------------------ what PP changes
    def forward_backward(self, step: int) -> Accumulated:
        """One process's micro-batch loop, or under pp the schedule over the same micro-batches
        (this data rank's rows of each, consecutive), reported as that loop reports them."""
        if self.pipe is None:
            return super().forward_backward(step)
        c = self.config
        samples = [self.sample(step, micro) for micro in range(c.grad_accum)]
        batch = torch.cat([rows for rows, _ in samples]).to(self.device)
        self.batch_domains = [d for _, domains in samples for d in domains]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.bf16):
            self.pipe.step(batch, step, self.tierset)
        return pipeline_totals(self.pipe.micro_parts, self._first_non_finite(self.pipe.micro_parts), c.grad_accum)

    def _first_non_finite(self, parts: list[tuple[float, float, float, float]]) -> int:
        """The first micro-batch whose loss is not finite on some rank (``len(parts)``: none),
        agreed by every rank — where one process's loop, and a data-parallel one, stop."""
        local = next((k for k, p in enumerate(parts) if not math.isfinite(p[0])), len(parts))
        first = torch.tensor([local], dtype=torch.int64, device=self.device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        return int(first.item())

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Validation as one process scores it; under pp each batch runs forward through the stages."""
        if self.pipe is None:
            return super().evaluate()
        c, pipe = self.config, self.pipe
        self.model.eval()
        try:
            scores = score_domains(
                lambda batch: pipe.forward_loss(batch.to(self.device), self.tierset), self.data, self.data.domains,
                batch_size=c.eval_batch_size, seq_len=c.seq_len, max_batches=c.eval_batches,
            )
        finally:
            self.model.train()
        return {d: s.to_dict() for d, s in scores.items()}

    # ------------------------------------------------------------------ checkpoints
    def sharded_meta(self) -> dict[str, Any]:
        """What a sharded checkpoint's ``lite_llm.json`` holds (its tensors are DCP's); no RNG
        state: it differs per rank and nothing draws from global RNG."""
        return {
            "model_config": self.model.config.to_dict(),
            "trainer": self.training_meta(),
            "progressive": self.progressive_state(),
            "parallel": self.ranks.degrees.to_dict(),
        }

    def save(self, tag: str | None = None) -> Path | None:
        """A sharded checkpoint of this step; at the run's last step also the consolidated one
        (``RUN/checkpoints/step-N``, by rank 0), which is what the run returns."""
        if self.run_dir is None:
            return None
        _reshard(self.model)
        path = save_sharded(self.run_dir, self.step, self.model, self.optimizer, self.sharded_meta(), self.tokenizer, self.config.keep_last)
        if self.step < self.config.steps:
            return path
        from ..checkpoint import CheckpointManager

        target = CheckpointManager(self.run_dir).path_for(self.step)
        if self.ranks.is_main:
            consolidate(path, target)
        dist.barrier()
        return target

    def resume_sharded(self, path: Path) -> None:
        """Continue from a sharded checkpoint saved at any world size and degrees."""
        resume_sharded(self, path)


def pipeline_totals(parts: list[tuple[float, float, float, float]], first_non_finite: int, grad_accum: int) -> Accumulated:
    """The losses a pipelined step reports, from each micro-batch's (total, LM, balance, z):
    added in order as one process's loop adds them, and like it stopping at the first
    non-finite micro-batch (whose LM loss is then the reported ``loss``)."""
    done = Accumulated({"loss": 0.0, "balance_loss": 0.0, "z_loss": 0.0, "extra_loss": 0.0})
    totals = done.totals
    for k, (_, lm, balance, z) in enumerate(parts):
        if k == first_non_finite:
            done.finite = False
            totals["loss"] = lm
            break
        totals["loss"] += lm / grad_accum
        totals["balance_loss"] += balance / grad_accum
        totals["z_loss"] += z / grad_accum
    return done


def _reshard(model: torch.nn.Module) -> None:
    """Put FSDP2's sharded parameters back in place: the root keeps its weights gathered after
    a forward (validation ran one), and the state to save is the optimizer's, sharded."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def resume_sharded(trainer: Trainer, path: Path) -> None:
    """Put a sharded checkpoint's weights, optimizer moments and position into ``trainer`` —
    a distributed one, or a single-process one (a run continued on one process)."""
    meta = read_meta(path)
    trainer_meta = meta.get("trainer") or {}
    if trainer_meta.get("train_config"):
        trainer.check_same_schedule(trainer_meta["train_config"])
    trainer.check_same_data(trainer_meta)
    trainer.load_training_state({}, trainer_meta)  # step, tokens, callbacks (clears the moments)
    load_sharded(path, trainer.model, trainer.optimizer)  # then the weights and the moments
    trainer.progressive = dict(meta.get("progressive") or {})
    trainer.logger.drop_from(trainer.step)
