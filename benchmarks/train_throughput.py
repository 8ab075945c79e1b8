"""Training throughput: Lite LLM's reference two-tier model vs transformers' Mixtral.

The reference config is the ``small`` preset (~10M parameters: 4 layers, d=256, two tiers of
2 groups x 4 experts, expert hidden 192, 2 experts active per token).  The Mixtral model has
the same vocabulary, attention shape, layers, 16 experts of the same size per layer and top-2
routing, so active and total parameters match (up to Lite LLM's 6 extra router rows per
layer, reported below).  Both train full steps (forward, backward, AdamW) on the same batch in
the same process, interleaved; Mixtral runs with each experts implementation and the fastest
one is the reference.

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/train_throughput.py [--steps 6] [--batch 16] [--seq 256] [--profile]
    python benchmarks/train_throughput.py --dtype bfloat16     # mixed precision, as `lite-llm train --bf16`

``--dtype bfloat16`` keeps fp32 master weights and AdamW state and runs every model's forward
under ``torch.autocast("cpu", dtype=torch.bfloat16)``, exactly as the trainer's ``bf16: true``
does, for ours and Mixtral alike.  ``--preset`` picks another Lite LLM preset (Mixtral is
built to match it).

Prints tokens/s per candidate and the ratio ours / fastest Mixtral (target >= 1.5), then one
JSON line.  ``--profile`` also splits two steps of each model (torch.profiler, self CPU time)
into matrix multiplies, attention and everything else, and prints the ceiling the matmuls
and attention put on the speed-up: the fastest Mixtral's step divided by our matmul +
attention time (our step times the profiled share), i.e. what ours / Mixtral would be if all
our other work cost nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    cpu_description,
    emit_json,
    keep_freed_memory_unless,
    measure_interleaved,
    print_table,
    reexec_with_thp,
    setup_torch_threads,
)

reexec_with_thp()

import torch  # noqa: E402

from lite_llm import ModelConfig, build_model  # noqa: E402


def mixtral_like(cfg: ModelConfig, impl: str):
    from transformers import MixtralConfig, MixtralForCausalLM

    tier = cfg.tiers[0]
    experts = sum(t.num_experts for t in cfg.tiers)
    hf = MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=tier.expert_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        num_local_experts=experts,
        num_experts_per_tok=cfg.max_active_experts(),
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        router_aux_loss_coef=0.01,
        output_router_logits=True,  # the load-balancing loss, as ours computes
    )
    hf._experts_implementation = impl
    hf._attn_implementation = "sdpa"
    model = MixtralForCausalLM(hf)
    model.train()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per candidate")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="split each model's step into matmul / attention / other")
    parser.add_argument("--no-keep-memory", action="store_true", help="leave glibc's malloc as it is (see lite_llm.runtime.cpu_memory)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16: forwards under CPU autocast with fp32 master weights (the trainer's bf16)")
    parser.add_argument("--preset", default="small", help="Lite LLM preset to measure (default: small)")
    args = parser.parse_args()
    threads = setup_torch_threads(args.threads)
    kept = keep_freed_memory_unless(args.no_keep_memory)

    cfg = ModelConfig.from_preset(args.preset)
    bf16 = args.dtype == "bfloat16"
    ours = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step_fn(model, opt, forward):
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = forward(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    candidates = {"lite_llm": step_fn(ours, torch.optim.AdamW(ours.parameters(), lr=1e-4), lambda m: m(ids, labels=ids).loss)}
    counts = {"lite_llm": (ours.num_params(), cfg.num_active_params())}
    for impl in ("eager", "grouped_mm"):
        try:
            hf = mixtral_like(cfg, impl)
        except Exception as exc:  # noqa: BLE001 - reported
            print(f"skip mixtral {impl}: {exc}")
            continue
        name = f"mixtral_{impl}"
        candidates[name] = step_fn(hf, torch.optim.AdamW(hf.parameters(), lr=1e-4), lambda m: m(input_ids=ids, labels=ids).loss)
        total = sum(p.numel() for p in hf.parameters())
        per_expert = 3 * cfg.d_model * cfg.tiers[0].expert_hidden
        experts_total = cfg.n_layers * sum(t.num_experts for t in cfg.tiers) * per_expert
        counts[name] = (total, total - experts_total + cfg.n_layers * cfg.max_active_experts() * per_expert)

    timings = measure_interleaved(candidates, warmup=args.warmup, repeats=args.steps, log=print)
    tokens = args.batch * args.seq
    rows, tps = [], {}
    for name, t in timings.items():
        tps[name] = tokens / t.median if t.median else None
        rows.append([name, counts[name][0], counts[name][1], t.median, tps[name]])
    print_table(["model", "total params", "active params", "step s (median)", "tokens/s"], rows,
                title=f"training, preset {args.preset}, batch {args.batch} x {args.seq}, {args.dtype}{' autocast' if bf16 else ''}, {threads} threads")
    mixtral = {k: v for k, v in tps.items() if k.startswith("mixtral") and v}
    fastest = max(mixtral, key=mixtral.get) if mixtral else None
    speedup = tps["lite_llm"] / mixtral[fastest] if fastest else None
    print(f"\nLite LLM / fastest Mixtral ({fastest}): {speedup:.2f}x (target >= 1.5)" if speedup else "no Mixtral reference ran")
    split = {name: profile_split(run) for name, run in candidates.items()} if args.profile else {}
    ceiling = None
    if split and fastest:
        print_table(
            ["model", "profiled s / step", "matmul", "attention", "other"],
            [[n, f"{v['total']:.3f}", f"{v['matmul']:.3f}", f"{v['attention']:.3f}", f"{v['other']:.3f}"] for n, v in split.items()],
            title="where a step's time goes (torch.profiler, self CPU time, mean of 2 steps)",
        )
        # The profiler's own overhead inflates its totals: take our matmul + attention *share*
        # from the profile and the step times from the timed runs.
        ours = split["lite_llm"]
        floor = timings["lite_llm"].median * (ours["matmul"] + ours["attention"]) / ours["total"]
        ceiling = timings[fastest].median / floor
        print(f"ceiling: with every non-matmul, non-attention op free, ours / {fastest} would be {ceiling:.2f}x")
    emit_json(
        {
            "benchmark": "train_throughput",
            "preset": args.preset,
            "dtype": args.dtype,
            "autocast": bf16,
            "batch": args.batch,
            "seq_len": args.seq,
            "threads": threads,
            "cpu": cpu_description(),
            "loadavg": list(os.getloadavg()),
            "keep_freed_memory": kept,
            "tokens_per_s": tps,
            "params": {k: {"total": v[0], "active": v[1]} for k, v in counts.items()},
            "fastest_mixtral": fastest,
            "speedup_vs_fastest_mixtral": speedup,
            "target_met": bool(speedup and speedup >= 1.5),
            **({"profile_s_per_step": split, "ceiling_vs_fastest_mixtral": ceiling} if split else {}),
        }
    )


MATMUL_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}


def profile_split(run, steps: int = 2) -> dict[str, float]:
    """Seconds per step of ``run`` spent in matmuls, in attention kernels and in everything
    else (self CPU time, so a matmul inside ``grouped_mm`` counts as matmul)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    total = matmul = attention = 0.0
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6 / steps
        total += seconds
        if event.key in MATMUL_OPS:
            matmul += seconds
        elif "scaled_dot_product" in event.key:
            attention += seconds
    return {"total": total, "matmul": matmul, "attention": attention, "other": total - matmul - attention}


if __name__ == "__main__":
    main()
