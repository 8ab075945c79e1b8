"""Apply the run's parallelism to a model from outside it, as torchtitan's ``parallelize`` does:
expert parallel first (it splits the banks), then FSDP2 over the data ranks for the rest.
Under pipeline parallel each rank keeps its stage's modules (a ``StageModule``), FSDP2-sharded
over the data ranks of that stage when dp > 1."""

from __future__ import annotations

from ..errors import ConfigError
from ..model import LiteLLM
from .data_parallel import apply_data_parallel
from .expert_parallel import apply_expert_parallel, expert_parameters
from .launch import Ranks
from .pipeline import StageModule, split_stage
from .tensor_parallel import apply_tensor_parallel, check_tensor_parallel


def parallelize(model: LiteLLM, ranks: Ranks) -> LiteLLM | StageModule:
    """Split ``model`` (the same full model on every rank) as ``ranks.degrees`` say: the model
    itself, or under pp this rank's stage of it (``DistributedTrainer`` drives either)."""
    degrees = ranks.degrees
    if degrees.pp > 1:
        return _pipeline_stage(model, ranks)
    if degrees.tp > 1:
        if degrees.data_ranks > 1:
            raise ConfigError(f"--parallel {degrees}: tensor parallel does not combine with dp or ep in the trainer yet; use tp alone or dp/ep alone")
        check_tensor_parallel(model.config, degrees.tp)
        return apply_tensor_parallel(model, ranks.mesh["tp"])
    ignored = []
    if degrees.ep > 1:
        if not model.config.is_moe:
            raise ConfigError(f"--parallel ep={degrees.ep} splits experts, but this model has no MoE layer; drop ep")
        apply_expert_parallel(model, ranks.mesh["dp", "ep"])
        ignored = expert_parameters(model)
    if degrees.data_ranks > 1:
        apply_data_parallel(model, ranks.data_mesh, ignored)
    return model


def _pipeline_stage(model: LiteLLM, ranks: Ranks) -> StageModule:
    """This rank's pipeline stage, sharded over its stage's data ranks with FSDP2 when dp > 1."""
    degrees = ranks.degrees
    if degrees.tp > 1 or degrees.ep > 1:
        raise ConfigError(f"--parallel {degrees}: pipeline parallel combines with dp in the trainer, not yet with tp or ep; use pp alone or pp with dp")
    stage = split_stage(model, ranks.mesh["pp"])
    if degrees.data_ranks > 1:
        apply_data_parallel(stage, ranks.data_mesh)
    return stage
