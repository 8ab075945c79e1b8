"""Pipeline parallelism with ``torch.distributed.pipelining``, applied to a built model from outside.

Why it is built this way:

* The model knows nothing of ranks, so a :class:`StageModule` *borrows* a contiguous run of a
  :class:`LiteLLM`'s blocks (stage 0 also its embedding, the last stage its final norm and LM
  head) and runs them the way ``LiteLLM.forward`` does.  The blocks are held in a ModuleDict
  keyed by their index in the model, so a stage's parameter names are the model's own
  (``layers.3.attn.q_proj.weight``): checkpoints and optimizer state map back one to one.
* The MoE load-balance and z-losses are produced in every MoE block, on every stage.  Each
  stage passes the running sums on as two extra outputs next to the hidden state, so the last
  stage forms ``lm + balance + z`` exactly as ``LiteLLM.forward`` does and the gradient of the
  aux losses flows back through the pipeline to the routers of earlier stages.
* Microbatches are the trainer's ``grad_accum``: the schedule splits the global batch into
  consecutive row slices, computes each one's loss, and divides the accumulated gradients by
  the number of microbatches — the trainer's ``(loss / grad_accum).backward()``.  With a power
  of two microbatches the scaling is exact, and the gradients are bitwise the trainer's.
* ``tie_embeddings`` puts one weight at both ends of the model, i.e. on two stages: refused
  for pp > 1 (torch's pipelining has no shared-parameter support).

Not carried through the pipeline: the per-layer routing statistics (``LayerRouting``) and the
trainer's callback losses (EWC, distillation); a loop that needs them runs without PP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from ..config import ModelConfig, TierSet
from ..errors import ConfigError, PromptError
from ..model import LiteLLM
from ..model.layers import rope_tables
from ..model.transformer import IGNORE_INDEX
from .grad_norm import clip_by_total, per_grad_norms

ScheduleName = Literal["gpipe", "1f1b"]


def stage_layers(n_layers: int, pp: int) -> list[range]:
    """The blocks of each stage: contiguous, sizes differing by at most one (earlier stages
    take the remainder, as they also hold nothing else but the embedding)."""
    if not 1 <= pp <= n_layers:
        raise ConfigError(f"pipeline-parallel degree pp={pp} must be between 1 and the model's n_layers ({n_layers})")
    base, extra = divmod(n_layers, pp)
    bounds = [0]
    for s in range(pp):
        bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]


class StageModule(nn.Module):
    """One pipeline stage's share of a :class:`LiteLLM` (its modules borrowed, not copied).

    Inputs: token ids (first stage) or the previous stage's outputs.  Outputs: the hidden state
    (logits on the last stage), followed for a MoE model by the running balance and z-loss sums.
    ``tierset`` and ``step`` are set on the module before a step, as ``LiteLLM.forward`` takes them.
    """

    def __init__(self, model: LiteLLM, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.config = model.config
        self.first, self.last = first, last
        # assigned in the model's parameter order (embed, layers, norm, lm_head): the gradient
        # norm over all stages is then taken in the same order as in one process
        self.embed = model.embed if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.tierset: TierSet | str | None = None
        self.step: int | None = None

    def _allowed(self, device: torch.device) -> torch.Tensor | None:
        if not self.config.is_moe:
            return None
        names = set(TierSet.coerce(self.tierset).resolve(self.config))
        return torch.tensor([t.name in names for t in self.config.tiers], dtype=torch.bool, device=device)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        if self.first:
            (input_ids,) = inputs
            if input_ids.shape[1] > cfg.max_seq_len:
                raise PromptError(
                    f"a sequence of {input_ids.shape[1]} positions exceeds this model's max_seq_len={cfg.max_seq_len}; give at most {cfg.max_seq_len} tokens"
                )
            x = self.embed(input_ids)
            balance = x.new_zeros((), dtype=torch.float32)
            z = x.new_zeros((), dtype=torch.float32)
        elif cfg.is_moe:
            x, balance, z = inputs
        else:
            (x,) = inputs
        positions = torch.arange(x.shape[1], device=x.device)
        cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, positions)
        allowed = self._allowed(x.device)
        for block in self.layers.values():
            x, routes = block(x, cos, sin, allowed, self.step, None)
            if routes is not None:
                balance = balance + routes.balance_loss
                z = z + routes.z_loss
        if self.last:
            x = self.lm_head(self.norm(x))
        return (x, balance, z) if cfg.is_moe else x


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy exactly as ``LiteLLM.forward`` computes its ``lm_loss``."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


class MicrobatchLoss:
    """The schedule's loss function: the trainer's loss of one microbatch (on the last stage) —
    LM cross-entropy plus the MoE balance and z-losses summed over every stage — keeping each
    call's parts (total, LM, balance, z) for reporting."""

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, output: torch.Tensor | tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        logits, balance, z = output if isinstance(output, tuple) else (output, None, None)
        lm = lm_loss(logits, target)
        total = lm + balance + z if balance is not None and z is not None else lm
        zero = lm.new_zeros(())
        self.parts.append((total.detach(), lm.detach(), zero if balance is None else balance.detach(), zero if z is None else z.detach()))
        return total


LOSS_PARTS = ("loss", "lm_loss", "balance_loss", "z_loss")


@dataclass
class Pipeline:
    """This rank's stage and the schedule that drives it; :meth:`step` runs one optimizer step's
    forward and backward (the optimizer itself stays the caller's, over ``module.parameters()``)."""

    module: StageModule
    stage: PipelineStage
    schedule: Schedule1F1B | ScheduleGPipe
    group: dist.ProcessGroup
    n_microbatches: int
    loss: MicrobatchLoss
    report: dict[str, float] = field(default_factory=dict)  # the last step's losses
    micro_parts: list[tuple[float, float, float, float]] = field(default_factory=list)  # the last step's, per microbatch

    @property
    def last_rank(self) -> int:
        """The global rank of this pipeline's last stage (which computes the losses)."""
        return dist.get_global_rank(self.group, self.stage.num_stages - 1)

    def step(self, batch: torch.Tensor, step: int | None = None, tierset: TierSet | str | None = None) -> dict[str, float]:
        """Forward and backward of ``batch`` (B, S) — the global batch, labels = inputs — in
        ``n_microbatches`` consecutive row slices.  Gradients are left in the stage's
        parameters, averaged over microbatches.  Returns the mean ``loss``, ``lm_loss``,
        ``balance_loss`` and ``z_loss`` (as the trainer reports them), the same on every rank;
        each microbatch's (total, LM, balance, z) are in ``micro_parts``, also on every rank."""
        if batch.shape[0] % self.n_microbatches:
            raise ConfigError(f"a batch of {batch.shape[0]} rows does not split into {self.n_microbatches} equal microbatches; make the rows a multiple of it")
        self.module.step, self.module.tierset = step, tierset
        self.loss.parts.clear()
        kwargs = {"target": batch} if self.stage.is_last else {}
        args = (batch,) if self.stage.is_first else ()
        self.schedule.step(*args, return_outputs=False, **kwargs)
        self.micro_parts = self._broadcast_parts()
        sums = [0.0, 0.0, 0.0, 0.0]
        for parts in self.micro_parts:  # as the trainer adds them, in order
            for i, value in enumerate(parts):
                sums[i] += value / self.n_microbatches
        self.report = dict(zip(LOSS_PARTS, sums))
        return self.report

    def _broadcast_parts(self) -> list[tuple[float, float, float, float]]:
        """The last stage's per-microbatch losses, on every rank of the pipeline (float64 holds
        each float32 value exactly).  On its first step the schedule also calls the loss on
        placeholder tensors to infer shapes (torch 2.13's metadata inference): only the last
        ``n_microbatches`` calls are real."""
        device = self.stage.device  # a collective's tensors live where the backend works (nccl: the GPU)
        parts = torch.zeros(self.n_microbatches, len(LOSS_PARTS), dtype=torch.float64, device=device)
        if self.stage.is_last:
            real = self.loss.parts[-self.n_microbatches :]
            parts = torch.tensor([[v.item() for v in p] for p in real], dtype=torch.float64, device=device)
        dist.broadcast(parts, src=self.last_rank, group=self.group)
        return [tuple(row) for row in parts.tolist()]  # type: ignore[misc]

    @torch.no_grad()
    def forward_loss(self, batch: torch.Tensor, tierset: TierSet | str | None = None) -> float:
        """The LM loss of ``batch`` (labels = inputs) through every stage, forward only, on every
        rank: what ``float(model(batch, labels=batch).lm_loss)`` gives in one process (for
        validation).  The hidden state goes from stage to stage by send/recv — outside the
        schedule, whose buffers are sized for the training microbatches."""
        module, index = self.module, self.stage.stage_index
        module.step, module.tierset = None, tierset
        inputs: tuple[torch.Tensor, ...] = (batch,)
        if not module.first:
            dtype = next(module.parameters()).dtype
            hidden = torch.empty(*batch.shape, module.config.d_model, dtype=dtype, device=batch.device)
            dist.recv(hidden, src=dist.get_global_rank(self.group, index - 1), group=self.group)
            zero = torch.zeros((), dtype=torch.float32, device=batch.device)  # aux losses do not enter the LM loss
            inputs = (hidden, zero, zero) if module.config.is_moe else (hidden,)
        out = module(*inputs)
        x = out[0] if isinstance(out, tuple) else out
        loss = torch.zeros((), dtype=torch.float64, device=batch.device)
        if module.last:
            loss = torch.tensor(float(lm_loss(x, batch)), dtype=torch.float64, device=batch.device)
        else:
            dist.send(x.contiguous(), dst=dist.get_global_rank(self.group, index + 1), group=self.group)
        dist.broadcast(loss, src=self.last_rank, group=self.group)
        return float(loss)


SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def check_split(config: ModelConfig, pp: int) -> None:
    """Refuse, in one sentence, a model that cannot be split into ``pp`` stages."""
    stage_layers(config.n_layers, pp)
    if pp > 1 and config.tie_embeddings:
        raise ConfigError(
            "pipeline parallelism cannot split a model with tie_embeddings (its embedding and LM head share one weight across stages); untie them or use pp=1"
        )


def check_schedule(pp: int, n_microbatches: int, schedule: str = "1f1b") -> None:
    """Refuse, in one sentence, a schedule that cannot drive ``pp`` stages."""
    if n_microbatches < 1:
        raise ConfigError(f"n_microbatches must be at least 1, got {n_microbatches}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown pipeline schedule {schedule!r}; choose gpipe or 1f1b")
    if schedule == "1f1b" and n_microbatches < pp:
        raise ConfigError(f"the 1f1b schedule needs at least as many microbatches as stages ({pp}), got {n_microbatches}; raise grad_accum or use gpipe")


def check_pipeline(config: ModelConfig, pp: int, n_microbatches: int, schedule: str = "1f1b") -> None:
    """Refuse, in one sentence, a pipeline this model cannot be split into."""
    check_split(config, pp)
    check_schedule(pp, n_microbatches, schedule)


def _check_mesh(pp_mesh: DeviceMesh) -> None:
    if pp_mesh.ndim != 1:
        raise ConfigError(f"pipeline parallelism needs a 1-D device mesh, got one of {pp_mesh.ndim} dimensions; pass mesh['pp']")


def split_stage(model: LiteLLM, pp_mesh: DeviceMesh) -> StageModule:
    """This rank's stage of ``model`` over the 1-D ``pp_mesh`` (stage index = rank in the mesh),
    its modules borrowed from ``model`` (the rest of it can be garbage collected)."""
    _check_mesh(pp_mesh)
    pp, index = pp_mesh.size(), pp_mesh.get_local_rank()
    check_split(model.config, pp)
    layers = stage_layers(model.config.n_layers, pp)[index]
    return StageModule(model, layers, first=index == 0, last=index == pp - 1)


def schedule_stage(
    module: StageModule, pp_mesh: DeviceMesh, n_microbatches: int, schedule: ScheduleName = "1f1b", device: torch.device | str = "cpu"
) -> Pipeline:
    """The pipeline stage of ``module`` (from :func:`split_stage`, perhaps FSDP-sharded since)
    and a GPipe or 1F1B schedule of ``n_microbatches``."""
    _check_mesh(pp_mesh)
    pp, index = pp_mesh.size(), pp_mesh.get_local_rank()
    check_schedule(pp, n_microbatches, schedule)
    group = pp_mesh.get_group()
    stage = PipelineStage(module, index, pp, torch.device(device), group=group)
    loss = MicrobatchLoss()
    return Pipeline(module, stage, SCHEDULES[schedule](stage, n_microbatches, loss_fn=loss), group, n_microbatches, loss)


def build_pipeline(
    model: LiteLLM, pp_mesh: DeviceMesh, n_microbatches: int, schedule: ScheduleName = "1f1b", device: torch.device | str = "cpu"
) -> Pipeline:
    """This rank's stage of ``model`` over the 1-D ``pp_mesh`` and a GPipe or 1F1B schedule of
    ``n_microbatches``.  Every rank builds the whole model from the same seed and keeps only its
    stage's modules."""
    _check_mesh(pp_mesh)
    check_pipeline(model.config, pp_mesh.size(), n_microbatches, schedule)
    return schedule_stage(split_stage(model, pp_mesh), pp_mesh, n_microbatches, schedule, device)


def pipeline_step(pipe: Pipeline, batch: torch.Tensor, step: int | None = None, tierset: TierSet | str | None = None) -> float:
    """Forward + backward of one optimizer step through the pipeline; the mean LM loss, on every
    rank (the other parts are in ``pipe.report``).  A training loop calls it in place of the
    trainer's micro-batch loop (``DistributedTrainer`` does, under ``--parallel pp=N``)::

        pipe = build_pipeline(build_model(cfg, seed=0), mesh["pp"], n_microbatches=grad_accum)
        opt = torch.optim.AdamW(pipe.module.parameters(), ...)
        for step, batch in enumerate(global_batches):
            lm_loss = pipeline_step(pipe, batch, step)
            if math.isfinite(pipe.report["loss"]):  # the same verdict on every rank
                clip_grad_norm_pipeline(pipe, grad_clip)
                opt.step()
            opt.zero_grad(set_to_none=True)
    """
    return pipe.step(batch, step, tierset)["lm_loss"]


def clip_grad_norm_pipeline(pipe: Pipeline, max_norm: float) -> float:
    """Clip the gradients of every stage to a global 2-norm of ``max_norm``; the norm before.

    Each stage's per-gradient norms (of DTensors too, where FSDP shards the stage over data
    ranks) are gathered from all stages and stacked in stage order — the model's parameter
    order — so the total is computed exactly as ``clip_grad_norm_(foreach=False)`` computes it
    in one process (bitwise the same number, at pp alone).
    """
    grads = [p.grad for p in pipe.module.parameters() if p.grad is not None]
    device = pipe.stage.device
    norms = per_grad_norms(grads) if grads else torch.zeros(0, device=device)
    world = dist.get_world_size(pipe.group)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([norms.numel()], device=device), group=pipe.group)
    longest = max(int(c) for c in counts)
    padded = torch.zeros(longest, dtype=torch.float32, device=device)
    padded[: norms.numel()] = norms
    gathered = [torch.zeros(longest, dtype=torch.float32, device=device) for _ in range(world)]
    dist.all_gather(gathered, padded, group=pipe.group)
    every = torch.cat([g[: int(c)] for g, c in zip(gathered, counts)])
    return clip_by_total(grads, torch.linalg.vector_norm(every, 2), max_norm)
