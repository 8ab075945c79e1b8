"""Apply the run's parallelism to a model from outside it, in torchtitan's order:

1. tensor parallel (``parallelize_module`` over ``mesh["tp"]``): attention and the dense FFN
   become DTensors sharded over the ``tp`` ranks; routers and experts stay whole on each;
2. expert parallel over ``mesh["dp", "ep"]``: each tier bank split over the ``ep`` ranks of the
   same ``tp`` index, so its all-to-all runs among them and every ``tp`` rank holds the same
   experts (their gradients are alike on the ``tp`` ranks and are reduced over ``dp`` alone);
3. FSDP2 over the ``dp x ep`` data ranks for the rest (EP's banks left to it): a TP weight
   becomes 2-D, sharded over (data, tp) — FSDP2 takes DTensors whose mesh shares its root with
   the data mesh, which ``init_distributed`` guarantees by slicing both from one mesh.

Each step's rows are split over the data ranks only; the ``tp`` ranks of one data rank read the
same rows (``Ranks.data_rank``), and every reduction meant for data ranks (the routers' batch
mean, expert gradients, reported losses) runs over ``Ranks.data_group``, which holds one rank
per data rank with the same ``tp`` index.

Under pipeline parallel each rank first keeps only its stage's modules (a ``StageModule``), and
the three steps above apply to the stage: its blocks split over ``tp``, its expert banks over
``ep`` (the all-to-all runs inside each microbatch's forward and backward, which the schedule
runs in the same order on every rank of the stage), the rest FSDP2-sharded over its data ranks.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..model import LiteLLM
from .data_parallel import apply_data_parallel
from .expert_parallel import apply_expert_parallel, expert_parameters
from .launch import Ranks
from .pipeline import StageModule, split_stage
from .tensor_parallel import apply_tensor_parallel, check_tensor_parallel


def parallelize(model: LiteLLM, ranks: Ranks) -> LiteLLM | StageModule:
    """Split ``model`` (the same full model on every rank) as ``ranks.degrees`` say: under pp
    this rank's stage of it, then on that (or the whole model) any mix of tp, ep and dp
    (``DistributedTrainer`` drives either)."""
    degrees = ranks.degrees
    if degrees.ep > 1 and not model.config.is_moe:
        raise ConfigError(f"--parallel ep={degrees.ep} splits experts, but this model has no MoE layer; drop ep")
    if degrees.tp > 1:
        check_tensor_parallel(model.config, degrees.tp)
    target: LiteLLM | StageModule = split_stage(model, ranks.mesh["pp"]) if degrees.pp > 1 else model
    if degrees.tp > 1:
        apply_tensor_parallel(target, ranks.mesh["tp"])  # type: ignore[arg-type]
    ignored = []
    if degrees.ep > 1:
        apply_expert_parallel(target, ranks.mesh["dp", "ep"])  # type: ignore[arg-type]
        ignored = expert_parameters(target)
    if degrees.data_ranks > 1:
        apply_data_parallel(target, ranks.data_mesh, ignored)
    return target
