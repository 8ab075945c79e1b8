"""Keep prose while learning code: forgetting prevention after growth, compared.

    python benchmarks/retention.py            # ~15 min on 2 cores
    python benchmarks/retention.py --quick    # a smoke run (minutes), figures not meaningful

1. Train a base model on English prose only (the standard library's pydoc topics, byte-level),
   measuring its Synaptic Intelligence importance along the way (``si_strength`` > 0 with no
   earlier importance only measures: the run's numbers are those of a plain run).
2. Estimate its prose Fisher (``lite-llm ewc estimate``: 256 sequences, per-sample estimator)
   and grow it with ``llama_pro`` 4 -> 6 blocks through ``expand_checkpoint``, which carries
   the Fisher and the SI importance to the grown model.
3. Continue the grown model on Python code (the standard library's sources), same steps,
   learning rate and schedule, with: no protection; EWC at two strengths; SI at two strengths;
   replay (25% prose rows); distillation to the base model on every row (LwF-style, T=2);
   freezing everything but the two new blocks (the LLaMA-Pro recipe); replay + freezing; and
   replay with distillation on the replayed prose rows only.

Reports prose and code bits per byte for each, the change against the base, and writes the
retention report (``benchmarks/results/retention/``: table, JSON, chart) with the same code as
``lite-llm eval --against``.  Targets (issue 6): one protection keeps prose within 5% of the
base (goal 1%) while code improves.  Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_json, reexec_with_thp, rounded, setup_torch_threads, stdlib_prose_and_code  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "retention")
    parser.add_argument("--base-steps", type=int, default=800)
    parser.add_argument("--steps", type=int, default=400, help="Steps of each continued run on code.")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ewc-weights", type=float, nargs="+", default=[1e3, 1e5])
    parser.add_argument("--si-strengths", type=float, nargs="+", default=[1.0, 10.0], help="SI's c for the code runs.")
    parser.add_argument("--si-damping", type=float, default=1e-3, help="SI's xi (the paper's 1e-3).")
    parser.add_argument("--replay", type=float, default=0.25)
    parser.add_argument("--distill", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "results" / "retention")
    parser.add_argument("--only", nargs="+", default=None, help="Run only the variants whose names contain one of these strings.")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.base_steps, args.steps = 40, 20
    reexec_with_thp()
    setup_torch_threads()

    from lite_llm import ModelConfig, build_model
    from lite_llm.checkpoint import load_checkpoint, save_checkpoint
    from lite_llm.eval import RetentionReport, evaluate
    from lite_llm.grow.expand import expand_checkpoint
    from lite_llm.grow.recipe import GrowthStep
    from lite_llm.train import TrainConfig, Trainer, estimate_fisher, save_ewc

    work = args.workdir
    data = stdlib_prose_and_code(work)

    def train(model, steps: int, run: str, lr: float, **fields):
        cfg = TrainConfig(
            steps=steps, batch_size=args.batch, seq_len=args.seq, lr=lr, warmup_steps=min(50, steps // 10), seed=1,
            eval_every=0, eval_batches=4, eval_batch_size=16, keep_last=1, **fields,
        )
        shutil.rmtree(work / run, ignore_errors=True)
        started = time.perf_counter()
        trainer = Trainer.from_config(model, data, cfg, run_dir=work / run, show_progress=False)
        result = trainer.train()
        print(f"{run}: {steps} steps in {time.perf_counter() - started:.0f} s", flush=True)
        return model, result.checkpoint

    def bpb(model) -> dict[str, float]:
        scores = evaluate(model, data, ["prose", "code"], batch_size=16, seq_len=args.seq, max_batches=16)
        return {d: s.bpb for d, s in scores.items()}

    config = ModelConfig(
        vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, intermediate_size=352, max_seq_len=args.seq, name="prose-base",
    )
    # measuring SI importance changes no number of the base run; its checkpoint holds si/
    base, base_run = train(
        build_model(config, seed=0), args.base_steps, "base", lr=3e-3, domains={"prose": 1.0}, si_strength=1.0, si_damping=args.si_damping
    )
    for d in ("base-ckpt", "base-ewc", "grown"):
        shutil.rmtree(work / d, ignore_errors=True)
    base_ckpt = save_checkpoint(work / "base-ckpt", base, tokenizer=data.tokenizer)
    started = time.perf_counter()
    estimate = estimate_fisher(base, data, "prose", samples=256, seq_len=args.seq)
    print(f"Fisher: 256 sequences, per-sample, {time.perf_counter() - started:.0f} s", flush=True)
    save_ewc(base_run, estimate, work / "base-ewc")  # the base run's checkpoint: its si/ comes along
    grown_path = expand_checkpoint(work / "base-ewc", work / "grown", [GrowthStep("llama_pro", {"target_layers": 6})]).path
    grown = load_checkpoint(grown_path)
    new_blocks = [i for i, block in enumerate(grown.model.layers) if not block.attn.o_proj.weight.any()]
    scores = {"base": bpb(base), "grown": bpb(grown.model)}

    variants: dict[str, dict] = {"no protection": {}}
    for w in args.ewc_weights:
        variants[f"EWC lambda={w:g}"] = {"ewc_from": str(grown_path), "ewc_weight": w}
    for c in args.si_strengths:
        variants[f"SI c={c:g}"] = {"si_from": str(grown_path), "si_strength": c, "si_damping": args.si_damping}
    frozen_old = [{"patterns": ["embed.*", "norm.*", "lm_head.*", *(f"layers.{i}.*" for i in range(6) if i not in new_blocks)], "thaw_at": None}]
    variants.update({
        f"replay {args.replay:.0%}": {"replay": {"prose": 1.0}, "replay_share": args.replay},
        f"distill (w={args.distill:g}, T=2)": {"distill_from": str(base_ckpt), "distill_weight": args.distill, "distill_temperature": 2.0},
        "freeze old blocks": {"freeze": frozen_old},
        f"freeze + replay {args.replay:.0%}": {"freeze": frozen_old, "replay": {"prose": 1.0}, "replay_share": args.replay},
        f"replay {args.replay:.0%} + distill replayed rows": {
            "replay": {"prose": 1.0}, "replay_share": args.replay,
            "distill_from": str(base_ckpt), "distill_weight": args.distill, "distill_temperature": 2.0, "distill_domains": ["prose"],
        },
    })
    if args.only:
        variants = {name: fields for name, fields in variants.items() if any(part in name for part in args.only)}
    for i, (name, fields) in enumerate(variants.items()):
        model = load_checkpoint(grown_path).model
        train(model, args.steps, f"code-{i}", lr=args.lr, domains={"code": 1.0}, **fields)
        scores[name] = bpb(model)

    report = RetentionReport("base", ["prose", "code"], scores)
    written = report.write(args.report)
    print("\n" + report.to_markdown())
    print("wrote " + ", ".join(str(w) for w in written))
    kept = {
        name: report.change(name, "prose")
        for name in variants
        if report.change(name, "prose") <= 0.05 and scores[name]["code"] < scores["base"]["code"]
    }
    best = min(kept, key=kept.get) if kept else None
    print(f"new blocks of the grown model: {new_blocks}; growth changed bpb by {report.change('grown', 'prose'):+.2e} (prose)")
    print(f"protections keeping prose within 5% while code improves: {', '.join(f'{k} ({v:+.2%})' for k, v in kept.items()) or 'none'}")
    emit_json(
        {
            "benchmark": "retention",
            "scores": rounded(scores),
            "prose_change": {n: rounded(report.change(n, "prose")) for n in scores if n != "base"},
            "code_change": {n: rounded(report.change(n, "code")) for n in scores if n != "base"},
            "best_within_5pct": best,
            "settings": {
                "base_steps": args.base_steps, "steps": args.steps, "lr": args.lr, "ewc_weights": args.ewc_weights,
                "si_strengths": args.si_strengths, "si_damping": args.si_damping, "replay": args.replay, "distill": args.distill,
            },
        }
    )


if __name__ == "__main__":
    main()
