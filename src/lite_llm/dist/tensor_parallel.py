"""Tensor parallelism (Megatron-style) applied to a built model from outside it.

Why this shape: the model knows nothing of ranks (DESIGN.md, "Layers of the code"), so, as in
torchtitan's ``parallelize``, the plan is laid over an ordinary :class:`LiteLLM` with DTensor's
``parallelize_module``:

* attention: ``q_proj``/``k_proj``/``v_proj`` column-wise (each rank holds whole heads: query
  heads and the KV heads they read stay on one rank, so grouped-query attention needs no
  communication), ``o_proj`` row-wise (one all-reduce of the block's output);
* dense SwiGLU FFN: ``gate_proj``/``up_proj`` column-wise, ``down_proj`` row-wise;
* everything else — embedding, norms, LM head, MoE routers and expert banks — stays a plain,
  replicated tensor.  The row-wise layers hand back replicated activations, so each rank runs
  the replicated parts on the same values and routing agrees on every rank by construction.
  The column-wise layers all-reduce the gradient of their (replicated) input in backward, so
  the replicated weights get the whole gradient on every rank.

The only change the model needed: attention reads its head count from the projection's output
(``view(b, s, -1, head_dim)``), which is the local head count under TP and the same numbers as
before in one process.  The KV cache (generation) is not tensor-parallel: it is sized from the
config's head counts.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from ..config import ModelConfig
from ..errors import ConfigError
from ..model import LiteLLM
from ..model.transformer import Block


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Refuse, in one sentence, a degree that does not split the heads and dense FFN evenly."""
    if tp < 1:
        raise ConfigError(f"tensor-parallel degree must be at least 1, got {tp}")
    if config.n_heads % tp or config.n_kv_heads % tp:
        raise ConfigError(
            f"tp={tp} must divide n_heads ({config.n_heads}) and n_kv_heads ({config.n_kv_heads}); choose a tp that divides both"
        )
    has_dense = any(not config.is_moe_layer(i) for i in range(config.n_layers))
    if has_dense and config.intermediate_size % tp:
        raise ConfigError(
            f"tp={tp} must divide the dense FFN's intermediate_size ({config.intermediate_size}); choose a tp that divides it"
        )


def block_plan(is_moe: bool) -> dict[str, ParallelStyle]:
    """The parallel style of each linear layer in one block, by its name inside the block."""
    plan: dict[str, ParallelStyle] = {
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(),
    }
    if not is_moe:
        plan.update({"ffn.gate_proj": ColwiseParallel(), "ffn.up_proj": ColwiseParallel(), "ffn.down_proj": RowwiseParallel()})
    return plan


def apply_tensor_parallel(model: LiteLLM, tp_mesh: DeviceMesh) -> LiteLLM:
    """Shard ``model``'s attention and dense FFN over the 1-D ``tp_mesh``, in place; return it.

    Every rank must hold the same weights before the call (build it with the same seed): each
    keeps its slice of the sharded ones and all of the rest.
    """
    if tp_mesh.ndim != 1:
        raise ConfigError(f"tensor parallelism needs a 1-D device mesh, got one of {tp_mesh.ndim} dimensions; pass mesh['tp']")
    check_tensor_parallel(model.config, tp_mesh.size())
    for block in [m for m in model.modules() if isinstance(m, Block)]:  # a whole model's blocks, or a pipeline stage's
        parallelize_module(block, tp_mesh, block_plan(block.is_moe))
    return model
