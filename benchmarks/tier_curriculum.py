"""Add a tier over time, on real data: a prose model learns Python code in a new tier.

    python benchmarks/tier_curriculum.py            # ~20 min on 2 cores
    python benchmarks/tier_curriculum.py --quick    # a smoke run (minutes), figures not meaningful

1. Train a base model with one tier on English prose (the standard library's pydoc topics).
2. ``add_tier`` a second tier (a copy of the first, k_tier 2: same function, bitwise, until
   routed) and run the curriculum (isolation, integration ramp, joint) on Python code (the
   standard library's sources) with 30% prose replay rows distilled towards the base model
   (``--replay``, ``--distill``), and automatic rollback guarding prose.
3. Baseline: fine-tune the whole base model on code for the same number of steps and schedule.

Reports validation bits per byte on prose and on code for the base, the curriculum and the
fine-tune, and draws the ramp chart.  Targets (issue 5): prose bpb after the curriculum within
1% of the base; code bpb improved by at least 80% of the fine-tune's improvement.  Ends with
one JSON line.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_json, print_table, reexec_with_thp, rounded, setup_torch_threads, stdlib_prose_and_code  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "tier_curriculum")
    parser.add_argument("--base-steps", type=int, default=1200)
    parser.add_argument("--isolation", type=int, default=200)
    parser.add_argument("--integration", type=int, default=300)
    parser.add_argument("--joint", type=int, default=100)
    parser.add_argument("--to-share", type=float, default=0.35)
    parser.add_argument("--share", type=float, default=0.1, help="The new tier's share during isolation.")
    parser.add_argument("--k-tier", type=int, default=2, help="Tiers per token after add_tier (2: both, weighted by the router).")
    parser.add_argument("--replay", type=float, default=0.3, help="Share of prose in the curriculum's batches (0: code only).")
    parser.add_argument("--lr", type=float, default=3e-3, help="Peak learning rate of the curriculum and of the fine-tune.")
    parser.add_argument("--distill", type=float, default=0.4, help="Weight of distillation to the base model on the prose rows (0: off).")
    parser.add_argument("--reuse-base", action="store_true", help="Reuse the base model of a previous run in --workdir.")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--chart", type=Path, default=ROOT / "benchmarks" / "results" / "tier_ramp.png")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.base_steps, args.isolation, args.integration, args.joint = 60, 20, 30, 10
    reexec_with_thp()
    setup_torch_threads()

    import torch

    from lite_llm import ModelConfig, RoutingConfig, TierConfig, build_model
    from lite_llm.eval import evaluate
    from lite_llm.grow import get_op
    from lite_llm.grow.expand import materialize
    from lite_llm.model import stored_state
    from lite_llm.plot import plot_run
    from lite_llm.train import TrainConfig, Trainer
    from lite_llm.train.curriculum import Curriculum, CurriculumConfig
    from lite_llm.train.distill import Distillation

    work = args.workdir
    data = stdlib_prose_and_code(work)

    def bpb(model) -> dict[str, float]:
        scores = evaluate(model, data, ["prose", "code"], batch_size=16, seq_len=args.seq, max_batches=16)
        return {d: s.bpb for d, s in scores.items()}

    def train(model, domains: dict[str, float], steps: int, run: str, lr: float, callbacks=(), eval_every: int = 0):
        cfg = TrainConfig(
            steps=steps, batch_size=args.batch, seq_len=args.seq, lr=lr, warmup_steps=min(50, steps // 10), seed=1,
            domains=domains, eval_every=eval_every, eval_batches=8, eval_batch_size=16, keep_last=1,
        )
        shutil.rmtree(work / run, ignore_errors=True)
        trainer = Trainer(model, data, cfg, run_dir=work / run, callbacks=list(callbacks), show_progress=False)
        started = time.perf_counter()
        result = trainer.train()
        print(f"{run}: {steps} steps in {time.perf_counter() - started:.0f} s" + (f" — {result.stopped_early}" if result.stopped_early else ""), flush=True)
        return result

    config = ModelConfig(
        vocab_size=256, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, intermediate_size=512, max_seq_len=args.seq, name="tier-demo",
        tiers=[TierConfig("tier_prose", num_groups=2, experts_per_group=4, expert_hidden=192)],
        routing=RoutingConfig(k_tier=1, k_group=1, k_expert=2),
    )
    from lite_llm.checkpoint import CheckpointManager, load_checkpoint

    previous = CheckpointManager(work / "base").latest() if args.reuse_base else None
    if previous is not None and previous.name.endswith(f"{args.base_steps:08d}"):
        base = load_checkpoint(previous).model
        print(f"base: reused {previous}")
    else:
        base = build_model(config, seed=0)
        train(base, {"prose": 1.0}, args.base_steps, "base", lr=3e-3)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    scores = {"base": bpb(base)}

    # Add the code tier: a copy of the prose tier, unroutable until the curriculum brings it in.
    stored = stored_state(base)
    grown_cfg, tensors = get_op("add_tier")(
        config, stored, tier="tier_code", num_groups=2, experts_per_group=4, expert_hidden=192, init="copy", source_tier="tier_prose",
        k_tier=args.k_tier,
    )
    grown = materialize(grown_cfg, dict(tensors)).train()
    ids = torch.randint(0, 256, (4, args.seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base.eval(), grown.eval()
        unchanged = torch.equal(base(ids).logits, grown(ids).logits)
    plan = CurriculumConfig(
        "tier_code",
        [
            {"name": "isolation", "steps": args.isolation, "share": args.share},
            {"name": "integration", "steps": args.integration, "to_share": args.to_share, "ramp": "cosine"},
            {"name": "joint", "steps": args.joint, "lr_scale": 0.1},
        ],
        rollback={"domains": ["prose"], "margin": 0.05},
    )
    total = plan.total_steps
    mixture = {"code": 1.0 - args.replay, "prose": args.replay} if args.replay > 0 else {"code": 1.0}
    callbacks = [Curriculum(plan)]
    if args.distill > 0:  # keep prose predictions close to the base model's (the teacher)
        teacher = build_model(config)
        teacher.load_state_dict(base_state)
        callbacks.append(Distillation(teacher, weight=args.distill, temperature=2.0, domains=["prose"]))
    curriculum = train(grown, mixture, total, "curriculum", lr=args.lr, callbacks=callbacks, eval_every=max(total // 12, 1))
    scores["curriculum"] = bpb(grown)
    charts = plot_run(work / "curriculum")
    ramp = next(p for p in charts if p.name == "ramp.png")
    args.chart.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ramp, args.chart)

    finetuned = build_model(config)
    finetuned.load_state_dict(base_state)
    train(finetuned, {"code": 1.0}, total, "finetune", lr=args.lr)
    scores["finetune"] = bpb(finetuned)

    rows = [[name, f"{s['prose']:.4f}", f"{s['code']:.4f}"] for name, s in scores.items()]
    print_table(["model", "prose bpb", "code bpb"], rows, title="validation bits per byte")
    b, c, f = scores["base"], scores["curriculum"], scores["finetune"]
    prose_change = c["prose"] / b["prose"] - 1
    code_gain, ft_gain = b["code"] - c["code"], b["code"] - f["code"]
    share_of_ft = code_gain / ft_gain if ft_gain > 0 else float("nan")
    print(f"prose after curriculum: {prose_change:+.2%} vs base (target within 1%); fine-tune: {f['prose'] / b['prose'] - 1:+.2%}")
    print(f"code improvement: curriculum {code_gain:.4f} bpb = {share_of_ft:.0%} of the fine-tune's {ft_gain:.4f} (target >= 80%)")
    print(f"add_tier left the function unchanged (bitwise): {unchanged}; ramp chart: {args.chart}")
    emit_json(
        {
            "benchmark": "tier_curriculum",
            "base": {k: rounded(v) for k, v in b.items()},
            "curriculum": {k: rounded(v) for k, v in c.items()},
            "finetune": {k: rounded(v) for k, v in f.items()},
            "prose_change_curriculum": rounded(prose_change),
            "prose_change_finetune": rounded(f["prose"] / b["prose"] - 1),
            "code_gain_share_of_finetune": rounded(share_of_ft),
            "rolled_back": curriculum.stopped_early,
            "add_tier_bitwise_unchanged": unchanged,
            "steps": {"base": args.base_steps, "curriculum": total, "finetune": total},
            "settings": {"k_tier": args.k_tier, "replay": args.replay, "lr": args.lr, "share": args.share, "to_share": args.to_share, "distill": args.distill},
        }
    )


if __name__ == "__main__":
    main()
