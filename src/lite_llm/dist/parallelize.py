"""Apply the run's parallelism to a model from outside it, as torchtitan's ``parallelize`` does:
expert parallel first (it splits the banks), then FSDP2 over the data ranks for the rest."""

from __future__ import annotations

from ..errors import ConfigError
from ..model import LiteLLM
from .data_parallel import apply_data_parallel
from .expert_parallel import apply_expert_parallel, expert_parameters
from .launch import Ranks
from .tensor_parallel import apply_tensor_parallel, check_tensor_parallel


def parallelize(model: LiteLLM, ranks: Ranks) -> LiteLLM:
    """Split ``model`` (the same full model on every rank) as ``ranks.degrees`` say."""
    degrees = ranks.degrees
    if degrees.pp > 1:
        raise ConfigError(
            f"--parallel {degrees}: pipeline parallel is not in the trainer yet; train with dp, ep or tp "
            f"(the pipeline building block is lite_llm.dist.pipeline.build_pipeline)"
        )
    if degrees.tp > 1:
        check_tensor_parallel(model.config, degrees.tp)
        apply_tensor_parallel(model, ranks.mesh["tp"])
    ignored = []
    if degrees.ep > 1:
        if not model.config.is_moe:
            raise ConfigError(f"--parallel ep={degrees.ep} splits experts, but this model has no MoE layer; drop ep")
        apply_expert_parallel(model, ranks.mesh["dp", "ep"])
        ignored = expert_parameters(model)
    if degrees.data_ranks > 1:
        apply_data_parallel(model, ranks.data_mesh, ignored)
    return model
