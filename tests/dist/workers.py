"""Functions the multi-process tests run on every rank (importable, for the spawn start method)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from lite_llm.dist.expert_parallel import apply_expert_parallel
from lite_llm.dist.launch import init_distributed
from lite_llm.model import build_model
from lite_llm.train.callbacks import TrainerCallback
from tests.conftest import two_tier_config

TOKENS_PER_RANK = 32


def _skew(model: Any, onto: str) -> None:
    """Route every token of tier_a to the experts of one EP rank (tier_b held unroutable)."""
    group = 0 if onto == "rank0" else 1
    for block in model.layers:
        heads = block.ffn.router.heads
        heads["tier_b"].tier_bias.fill_(-1e4)
        heads["tier_a"].group_bias.fill_(0.0)
        heads["tier_a"].group_bias[1 - group] = -1e4


def ep_forward(skew: str | None, with_grad: bool) -> dict[str, Any]:
    """Layer and whole-model forward with EP=2 against the same model in this process on the
    whole batch: bitwise, and the input gradient of the layer."""
    ranks = init_distributed("ep=2", torch.device("cpu"))
    rank = ranks.data_rank
    config = two_tier_config()
    reference = build_model(config, seed=3)
    model = build_model(config, seed=3)
    if skew:
        _skew(reference, skew)
        _skew(model, skew)
    apply_expert_parallel(model, ranks.mesh["dp", "ep"])
    world_tokens = TOKENS_PER_RANK * ranks.degrees.ep
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(world_tokens, config.d_model, generator=gen)
    ids = torch.randint(0, config.vocab_size, (ranks.degrees.ep * 2, 16), generator=gen)
    allowed = reference.allowed_tiers("all")
    mine = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)

    ref_moe, ep_moe = reference.layers[0].ffn, model.layers[0].ffn
    x_ref = x.clone().requires_grad_(with_grad)
    x_ep = x[mine].clone().requires_grad_(with_grad)
    with torch.set_grad_enabled(with_grad):
        want, routes = ref_moe(x_ref, allowed)
        got, _ = ep_moe(x_ep, allowed)
        if with_grad:
            want.square().sum().backward()
            got.square().sum().backward()
    rows_per_rank = [int((routes.expert_ids[r * TOKENS_PER_RANK : (r + 1) * TOKENS_PER_RANK] >= 0).sum()) for r in range(2)]
    owner_counts = torch.zeros(2, dtype=torch.long)
    from lite_llm.dist.expert_parallel import expert_owners

    owners = torch.tensor(expert_owners([t.num_experts for t in config.tiers], 2))
    ids_used = routes.expert_ids[routes.expert_ids >= 0]
    owner_counts += torch.bincount(owners[ids_used], minlength=2)
    with torch.no_grad():
        logits_ref = reference(ids).logits
        per = ids.shape[0] // 2
        logits_ep = model(ids[rank * per : (rank + 1) * per]).logits
    out = {
        "layer_equal": bool(torch.equal(got, want[mine])),
        "layer_max_diff": float((got - want[mine]).abs().max()),
        "logits_equal": bool(torch.equal(logits_ep, logits_ref[rank * per : (rank + 1) * per])),
        "routes_to_rank": owner_counts.tolist(),
        "rows": rows_per_rank,
    }
    if with_grad:
        out["input_grad_max_rel"] = float((x_ep.grad - x_ref.grad[mine]).abs().max() / x_ref.grad.abs().max())
        bank_ref, bank_ep = ref_moe.experts["tier_a"], ep_moe.experts["tier_a"]
        lo = rank * 3
        local = bank_ep.gate_up_proj.to_local()
        grad = bank_ep.gate_up_proj.grad
        g_ep = grad.to_local() if grad is not None else torch.zeros_like(local)  # None: no row reached these experts
        g_ref = bank_ref.gate_up_proj.grad[lo : lo + local.shape[0]]
        out["expert_grad_max_rel"] = float((g_ep - g_ref).abs().max() / g_ref.abs().max().clamp_min(1e-30))
    return out


def train_config(steps: int, **overrides: Any):
    from lite_llm.train import TrainConfig

    fields = dict(steps=steps, batch_size=8, seq_len=32, lr=1e-3, warmup_steps=2, eval_every=0, eval_batches=1, eval_batch_size=4, log_every=1, save_every=0)
    fields.update(overrides)
    return TrainConfig(**fields)


class StepTrace(TrainerCallback):
    """Each step's reported balance loss and gradient norm (before clipping), as the trainer
    logs them: what a distributed run must agree on with one process besides the loss."""

    name = "step_trace"

    def __init__(self) -> None:
        self.balance_losses: list[float] = []
        self.grad_norms: list[float] = []

    def on_step_end(self, trainer: Any, step: int, record: dict[str, Any]) -> None:
        self.balance_losses.append(record["balance_loss"])
        self.grad_norms.append(record["grad_norm"])

    def report(self) -> dict[str, list[float]]:
        return {"balance_losses": self.balance_losses, "grad_norms": self.grad_norms}


def train_dist(data_dir: str, parallel: str, steps: int, run_dir: str | None, resume: str | None, until: int | None,
               overrides: dict | None = None) -> dict[str, Any]:
    """Train the two-tier model on this rank's part of each global batch; the losses (and
    balance losses and gradient norms)."""
    from lite_llm.data import TokenData
    from lite_llm.dist.parallelize import parallelize
    from lite_llm.dist.trainer import DistributedTrainer

    ranks = init_distributed(parallel, torch.device("cpu"))
    data = TokenData(data_dir)
    model = parallelize(build_model(two_tier_config(vocab_size=data.tokenizer.vocab_size), seed=5), ranks)
    trace = StepTrace() if ranks.degrees.pp == 1 else None  # no callbacks under pp (no rank holds the whole model)
    trainer = DistributedTrainer(model, data, train_config(steps, **(overrides or {})), ranks, run_dir=run_dir, show_progress=False,
                                 callbacks=[trace] if trace else None)
    if resume:
        trainer.resume_sharded(resume)
    result = trainer.train(until=until)
    out = {"losses": result.losses, "step": trainer.step, "checkpoint": str(result.checkpoint) if result.checkpoint else None,
           **(trace.report() if trace else {})}
    if run_dir is not None and ranks.is_main:
        out["records"] = records(run_dir)
    if result.checkpoint is not None and trainer.step == trainer.config.steps:
        out.update(_consolidated_check(model, result.checkpoint))
    return out


def records(run_dir: str) -> list[dict[str, Any]]:
    """The run's metrics.jsonl rows (written by rank 0 alone)."""
    import json
    from pathlib import Path

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _consolidated_check(model: Any, checkpoint: Any) -> dict[str, Any]:
    """Whether the consolidated checkpoint holds exactly the weights this rank holds of the
    distributed model (all of them, FSDP-gathered; or its pipeline stage's), and their names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from lite_llm.checkpoint import load_checkpoint

    held = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    loaded = load_checkpoint(checkpoint).model.state_dict()
    return {
        "held": sorted(held),
        "consolidated_names": sorted(loaded),
        "consolidated_bitwise": all(k in loaded and torch.equal(v, loaded[k]) for k, v in held.items()),
    }


@contextlib.contextmanager
def _threads_of_a_rank() -> Iterator[None]:
    """Run the oracle on one thread, as :func:`~lite_llm.dist.local.run_ranks` runs each rank:
    a reduction split over two threads rounds differently (the pp=2 tests assert bitwise
    equality and failed when run alone, passing only after a test that left torch on 1 thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_single(data_dir: str, steps: int, run_dir: str | None = None, resume_sharded_from: str | None = None,
                 overrides: dict | None = None) -> dict[str, Any]:
    """The oracle: the same run in one process on the whole global batch."""
    with _threads_of_a_rank():
        return _train_single(data_dir, steps, run_dir, resume_sharded_from, overrides)


def _train_single(data_dir: str, steps: int, run_dir: str | None, resume_sharded_from: str | None, overrides: dict | None) -> dict[str, Any]:
    from lite_llm.data import TokenData
    from lite_llm.train import Trainer

    data = TokenData(data_dir)
    model = build_model(two_tier_config(vocab_size=data.tokenizer.vocab_size), seed=5)
    trace = StepTrace()
    trainer = Trainer(model, data, train_config(steps, **(overrides or {})), run_dir=run_dir, show_progress=False, callbacks=[trace])
    if resume_sharded_from:
        from lite_llm.dist.trainer import resume_sharded

        resume_sharded(trainer, resume_sharded_from)
    result = trainer.train()
    out: dict[str, Any] = {"losses": result.losses, "step": trainer.step, "final_eval": result.final_eval, **trace.report()}
    if run_dir is not None:
        out["records"] = records(run_dir)
    return out


def consolidated_equals_single(checkpoint: str, data_dir: str, steps: int) -> dict[str, Any]:
    """Whether a consolidated checkpoint holds bitwise the single-process model after ``steps``."""
    from lite_llm.checkpoint import load_checkpoint
    from lite_llm.data import TokenData
    from lite_llm.train import Trainer

    data = TokenData(data_dir)
    model = build_model(two_tier_config(vocab_size=data.tokenizer.vocab_size), seed=5)
    Trainer(model, data, train_config(steps), show_progress=False).train()
    loaded = load_checkpoint(checkpoint).model.state_dict()
    diffs = {k: float((v - loaded[k]).abs().max() / v.abs().max().clamp_min(1e-30)) for k, v in model.state_dict().items()}
    return {"max_rel": max(diffs.values()), "names_equal": sorted(diffs) == sorted(loaded)}


def lose_a_peer() -> dict[str, Any]:
    """Rank 1 is killed (SIGKILL, as the OOM killer or a lost node does) between two
    collectives; rank 0's next all-reduce fails, and what it reports is our sentence.  Run in
    plain processes (a spawn context or torchrun would terminate the survivor first)."""
    import os
    import signal
    from datetime import timedelta

    import torch.distributed as dist

    from lite_llm.dist.launch import describe_collective_failure

    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    dist.barrier()
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        dist.all_reduce(torch.ones(4))
    except Exception as exc:  # what the trainer's collectives raise
        return {"sentence": describe_collective_failure(exc), "raw": str(exc)[:300]}
    finally:
        dist.destroy_process_group()
    return {"sentence": None, "raw": "the all-reduce succeeded without its peer"}


def shared_hashing(run_dir: str) -> dict[str, Any]:
    """Save a sharded checkpoint on two FSDP ranks, then check it, counting which files each
    rank hashed; then rank 0 flips a byte of a file that rank 1 hashes, and both check again."""
    from pathlib import Path

    import torch.distributed as dist

    import lite_llm.dist.checkpoint as ckpt
    from lite_llm.dist.parallelize import parallelize
    from lite_llm.errors import CheckpointError

    ranks = init_distributed("dp=2", torch.device("cpu"))
    model = parallelize(build_model(two_tier_config(), seed=1), ranks)
    optimizer = torch.optim.AdamW(model.parameters())
    hashed: list[str] = []
    real = ckpt.sha256_file
    ckpt.sha256_file = lambda path: (hashed.append(Path(path).name), real(path))[1]
    meta = {"model_config": two_tier_config().to_dict(), "trainer": {"step": 3}, "progressive": {}}
    path = ckpt.save_sharded(Path(run_dir), 3, model, optimizer, meta, None, keep_last=3)
    saved, hashed[:] = list(hashed), []
    ckpt.check_sharded(path)  # just saved and hashed by this process: nothing is read again
    again, hashed[:] = list(hashed), []
    ckpt._CHECKED.clear()  # as a new process resuming the run would
    ckpt.check_sharded(path)
    checked, hashed[:] = list(hashed), []
    recorded = ckpt.read_meta(path)[ckpt.SHA256_KEY]
    files = [path / name for name in sorted(recorded)]
    victim = ckpt.hashing_shares(files, [f.stat().st_size for f in files], 2)[1][0]
    if ranks.rank == 0:
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
    dist.barrier()
    ckpt._CHECKED.clear()
    try:
        ckpt.check_sharded(path)
        refusal = None
    except CheckpointError as err:
        refusal = str(err)
    return {"saved": saved, "again": again, "checked": checked, "files": sorted(recorded), "victim": victim.name, "refusal": refusal}
