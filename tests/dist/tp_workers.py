"""What the tensor- and pipeline-parallel tests run on each rank, and how they are launched.

Ranks are spawned processes joined by gloo on 127.0.0.1 with the torchrun environment, one
thread each, a 30 s collective timeout and a hard deadline for the whole run.  Each rank writes
its results as JSON (never pickled return values).  The one-process oracle runs inside rank 0,
with the same thread setting, on a model built from the same seed.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from lite_llm.dist import local as launcher

LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 3e-3, (0.9, 0.95), 0.1, 1.0


# ---------------------------------------------------------------------------------- launching
def _with_group(fn: Callable[..., Any], *args: Any) -> Any:
    """Join the gloo group (30 s collective timeout) the launcher's environment describes, then run ``fn``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    return fn(*args)


def run_ranks(fn: Callable[..., Any], world: int, out_dir: Path, *args: Any, timeout_s: float = 55.0) -> list[Any]:
    """``fn(*args)`` on ``world`` gloo ranks (lite_llm.dist.local); their JSON results, by rank (a hang fails)."""
    return launcher.run_ranks(_with_group, world, out_dir, fn, *args, timeout_s=timeout_s)


# ---------------------------------------------------------------------------------- shared bits
def tiny_config(name: str, **overrides: Any):
    """``moe``: the two-tier tiny preset; ``dense``: the dense tiny preset (4 layers when asked)."""
    from lite_llm.config import ModelConfig

    if name == "moe-last":  # MoE only in the last layer: the first stage has no aux loss of its own
        return ModelConfig.from_preset("tiny", moe_layers=[overrides.get("n_layers", 2) - 1], **overrides)
    return ModelConfig.from_preset("tiny" if name == "moe" else "tiny-dense", **overrides)


def batches(vocab: int, steps: int, rows: int, seq: int, seed: int = 1234) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (rows, seq), generator=gen) for _ in range(steps)]


def optimizer(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """The trainer's optimizer: AdamW, no decay on vectors, foreach=False."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS, foreach=False
    )


def reference_run(config_name: str, steps: int, rows: int, seq: int, grad_accum: int = 1, n_layers: int | None = None) -> dict[str, Any]:
    """One process, as the trainer's ``_one_step`` does it: (loss / grad_accum).backward() per
    micro-batch (consecutive row slices of the global batch), clip, AdamW.  Per-step total and
    LM losses, and the first step's gradients (before clipping)."""
    from lite_llm.model import build_model

    cfg = tiny_config(config_name, **({"n_layers": n_layers} if n_layers else {}))
    model = build_model(cfg, seed=0)
    params = list(model.parameters())
    opt = optimizer(params)
    losses, lm_losses, first_grads, norms = [], [], {}, []
    for step, batch in enumerate(batches(cfg.vocab_size, steps, rows, seq)):
        total, lm = 0.0, 0.0
        for micro in batch.chunk(grad_accum):
            out = model(micro, labels=micro, step=step)
            (out.loss / grad_accum).backward()
            total += out.loss.item() / grad_accum
            lm += out.lm_loss.item() / grad_accum
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        norms.append(float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], GRAD_CLIP, foreach=False)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        lm_losses.append(lm)
    return {"losses": losses, "lm_losses": lm_losses, "first_grads": first_grads, "grad_norms": norms}


def max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------- tensor parallel
def tp_worker(config_name: str, steps: int, rows: int, seq: int) -> dict[str, Any]:
    """TP over all ranks: forward logits vs one process, then ``steps`` AdamW steps."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lite_llm.dist.grad_norm import grad_norm_and_clip
    from lite_llm.dist.tensor_parallel import apply_tensor_parallel
    from lite_llm.model import build_model

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    cfg = tiny_config(config_name)
    data = batches(cfg.vocab_size, steps, rows, seq)

    single = build_model(cfg, seed=0)
    model = apply_tensor_parallel(build_model(cfg, seed=0), mesh)
    with torch.no_grad():
        ref_logits = single(data[0]).logits
        tp_logits = model(data[0]).logits
    logits_diff = float((tp_logits - ref_logits).abs().max() / ref_logits.abs().max())

    from torch.distributed.tensor import DTensor

    sharded = sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor))
    local_q = model.layers[0].attn.q_proj.weight.to_local().shape[0]
    params = list(model.parameters())
    opt = optimizer(params)
    losses, grad_norms = [], []
    for step, batch in enumerate(data):
        out = model(batch, labels=batch, step=step)
        out.loss.backward()
        grad_norms.append(grad_norm_and_clip([p for p in params if p.grad is not None], GRAD_CLIP))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    result: dict[str, Any] = {
        "losses": losses, "logits_rel_diff": logits_diff, "grad_norms": grad_norms, "sharded": sharded, "local_q_rows": local_q,
    }
    if rank == 0:
        ref = reference_run(config_name, steps, rows, seq)
        result["ref_losses"] = ref["losses"]
        result["ref_grad_norms"] = ref["grad_norms"]
    return result


def tp_refuse_worker(n_heads: int, n_kv_heads: int) -> dict[str, Any]:
    """apply_tensor_parallel on a model whose heads do not split over the ranks: the message."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lite_llm.dist.tensor_parallel import apply_tensor_parallel
    from lite_llm.errors import ConfigError
    from lite_llm.model import build_model

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    cfg = tiny_config("dense", n_heads=n_heads, n_kv_heads=n_kv_heads, d_model=n_heads * 16)
    try:
        apply_tensor_parallel(build_model(cfg, seed=0), mesh)
    except ConfigError as e:
        return {"error": str(e)}
    return {"error": None}


# ---------------------------------------------------------------------------------- pipeline parallel
def pp_worker(config_name: str, steps: int, rows: int, seq: int, n_micro: int, schedule: str, n_layers: int | None) -> dict[str, Any]:
    """PP over all ranks, ``n_micro`` microbatches, ``steps`` AdamW steps with clipping; on
    every rank the one-process oracle (grad_accum = n_micro on the same rows) to compare this
    stage's first-step gradients with."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lite_llm.dist.pipeline import build_pipeline, clip_grad_norm_pipeline, pipeline_step
    from lite_llm.model import build_model

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    cfg = tiny_config(config_name, **({"n_layers": n_layers} if n_layers else {}))
    pipe = build_pipeline(build_model(cfg, seed=0), mesh, n_micro, schedule)  # type: ignore[arg-type]
    params = list(pipe.module.parameters())
    opt = optimizer(params)
    names = [n for n, _ in pipe.module.named_parameters()]
    reports, first_grads, norms = [], {}, []
    for step, batch in enumerate(batches(cfg.vocab_size, steps, rows, seq)):
        lm = pipeline_step(pipe, batch, step)
        assert lm == pipe.report["lm_loss"]
        reports.append(pipe.report)
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in pipe.module.named_parameters() if p.grad is not None}
        norms.append(clip_grad_norm_pipeline(pipe, GRAD_CLIP))
        opt.step()
        opt.zero_grad(set_to_none=True)
    ref = reference_run(config_name, steps, rows, seq, grad_accum=n_micro, n_layers=n_layers)
    grad_abs = max(float((first_grads[n] - ref["first_grads"][n]).abs().max()) for n in first_grads)
    return {
        "rank": rank,
        "names": names,
        "losses": [r["loss"] for r in reports],
        "lm_losses": [r["lm_loss"] for r in reports],
        "ref_losses": ref["losses"],
        "ref_lm_losses": ref["lm_losses"],
        "grad_names_match": sorted(first_grads) == sorted(n for n in ref["first_grads"] if n in set(names)),
        "grad_max_abs_diff": grad_abs,
        "grads_bitwise": all(torch.equal(first_grads[n], ref["first_grads"][n]) for n in first_grads),
        "grad_norms": norms,
        "ref_grad_norms": ref["grad_norms"],
    }
