"""TierSet selection: the latency model's held-out error, and budgets met on a bursty trace.

1. Profile a three-tier model (a trained checkpoint if one is given, else one built at a small
   but realistic size: d=256, 4 layers, tiers of expert width 128 / 512 / 1536, k_tier=2) with
   `lite_llm.serve.profiling.profile_checkpoint`: every one of the 7 TierSets, KV-cached decode,
   repeats interleaved across TierSets.
2. Fit `LatencyModel` (c0 + c1 * expert MB read per token + c2 * tiers) two ways and report the
   mean absolute percentage error per TierSet:
   * half split: fit on the odd-numbered repeats of every TierSet, test on the even ones;
   * leave one TierSet out: fit on the other six TierSets, predict the held-out one (the model
     has never seen it — the honest test of "predicts a TierSet from its parts").
3. Simulate a bursty request trace (seeded): arrivals from a two-state Markov-modulated
   Poisson process (calm, and bursts at 6x the rate), each request decoding a fixed number of
   tokens with a per-token latency budget drawn log-normally around the measured latencies.
   Queueing model: one FIFO server decoding one request at a time (no batching — the server's
   continuous batching is not modelled), each request's service time = tokens x a per-token
   latency drawn from that TierSet's measured repeats.  A request meets its budget when
   (queue wait + service) / tokens <= budget.  Policies: always every tier; automatic
   selection (`choose` with the request's budget); queue-aware automatic selection (`choose`
   with the budget left after the wait it is known to have had; the fastest set when nothing
   fits).  Reported: share of requests meeting their budget, and mean utility served.

Ends with one JSON line.  Usage:

    python benchmarks/tier_select.py [--checkpoint CKPT --data DOMAIN=PATH ...] [--tokens 32 --repeats 10 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build_checkpoint(root: Path) -> Path:
    from lite_llm import ModelConfig, build_model
    from lite_llm.checkpoint import save_checkpoint
    from lite_llm.config import RoutingConfig, TierConfig
    from lite_llm.data import ByteTokenizer

    tier = dict(num_groups=2, experts_per_group=4)
    cfg = ModelConfig(
        name="tier-select-bench", vocab_size=256, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, intermediate_size=512, max_seq_len=512,
        tiers=[TierConfig("tier_1b", expert_hidden=128, **tier), TierConfig("tier_10b", expert_hidden=512, **tier),
               TierConfig("tier_100b", expert_hidden=1536, **tier)],
        routing=RoutingConfig(k_tier=2, k_group=2, k_expert=1, seed=0),
    )
    path = root / "ckpt"
    save_checkpoint(path, build_model(cfg, seed=0), tokenizer=ByteTokenizer())
    return path


def mape(model, samples) -> float:
    return 100.0 * model.mape(samples)


def trace(table, *, seed: int, requests: int, tokens: int) -> dict:
    """The queueing simulation of the module docstring; returns shares and utilities per policy."""
    from lite_llm.serve.selection import NoTierSetFits, choose

    rng = random.Random(seed)
    by = {p.tiers: p for p in table.profiles}
    full = max(table.profiles, key=lambda p: len(p.tiers))
    fastest = min(table.profiles, key=lambda p: p.latency_ms_per_token)
    lat_lo, lat_hi = fastest.latency_ms_per_token, full.latency_ms_per_token
    # arrivals: calm at 40% of the all-tiers service rate, bursts at 6x calm (mean load 0.58 of it)
    service_all_s = lat_hi * tokens / 1000.0
    calm, burst = 0.4 / service_all_s, 2.4 / service_all_s
    t, state, left, arrivals = 0.0, "calm", rng.expovariate(1 / (30 * service_all_s)), []
    while len(arrivals) < requests:
        rate = calm if state == "calm" else burst
        gap = rng.expovariate(rate)
        if gap > left:
            t += left
            state = "burst" if state == "calm" else "calm"
            left = rng.expovariate(1 / ((30 if state == "calm" else 3) * service_all_s))
            continue
        t += gap
        left -= gap
        arrivals.append(t)
    # budgets: log-normal, median at the geometric middle of the measured range, wide enough that
    # some are below the fastest set and some above every set
    mid = math.sqrt(lat_lo * lat_hi)
    budgets = [mid * math.exp(rng.gauss(0, 0.6)) for _ in arrivals]
    draws = [rng.random() for _ in arrivals]  # which measured repeat a request's service time takes

    def service(p, u: float) -> float:
        samples = p.latency_samples_ms or (p.latency_ms_per_token,)
        return samples[min(int(u * len(samples)), len(samples) - 1)] * tokens / 1000.0

    def run(policy: str) -> dict:
        free_at, met, utility, picks = 0.0, 0, 0.0, {}
        for arrive, budget, u in zip(arrivals, budgets, draws):
            start = max(arrive, free_at)
            wait_ms_per_token = (start - arrive) * 1000.0 / tokens
            if policy == "all":
                p = full
            else:
                allowance = budget - (wait_ms_per_token if policy == "auto-queue" else 0.0)
                try:
                    p = choose(table, latency_ms=max(allowance, 0.0))
                except NoTierSetFits:
                    p = fastest  # nothing meets it: serve it as fast as possible (it will miss)
            p = by[p.tiers]
            free_at = start + service(p, u)
            met += (free_at - arrive) * 1000.0 / tokens <= budget
            utility += p.utility
            picks[table.label(p.tiers)] = picks.get(table.label(p.tiers), 0) + 1
        return {"met_share": met / len(arrivals), "mean_utility": utility / len(arrivals), "picks": picks}

    return {"requests": len(arrivals), "tokens_per_request": tokens, "budget_median_ms": mid,
            "policies": {name: run(name) for name in ("all", "auto", "auto-queue")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="a trained checkpoint (default: build one)")
    ap.add_argument("--data", action="append", default=[], help="DOMAIN=PATH validation domains (default: stdlib code, prepared here)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from lite_llm.data import ByteTokenizer, prepare_data
    from lite_llm.serve.profiling import profile_checkpoint
    from lite_llm.serve.selection import LatencyModel, latency_features

    work = Path(tempfile.mkdtemp(prefix="tier-select-"))
    ckpt = args.checkpoint or build_checkpoint(work)
    data = dict(pair.split("=", 1) for pair in args.data)
    if not data:
        prepare_data({"code": "stdlib-code"}, work / "data", ByteTokenizer(), max_bytes_per_domain=200_000)
        data = {"code": str(work / "data")}
    t0 = time.perf_counter()
    table = profile_checkpoint(ckpt, data, tokens=args.tokens, repeats=args.repeats, eval_batches=2, batch_size=4, seq_len=128)
    profile_s = time.perf_counter() - t0

    rows = {}
    all_samples = {p.tiers: [(latency_features(p), s) for s in p.latency_samples_ms] for p in table.profiles}
    half = LatencyModel.fit([x for v in all_samples.values() for x in v[1::2]])
    for p in table.profiles:
        loo = LatencyModel.fit([x for k, v in all_samples.items() if k != p.tiers for x in v])
        rows[table.label(p.tiers)] = {
            "median_ms": round(p.latency_ms_per_token, 4), "memory_bytes": p.memory_bytes, "bpb": round(-p.utility, 4),
            "expert_MB_per_token": round(p.active_expert_bytes / 1e6, 3),
            "mape_half_pct": round(mape(half, all_samples[p.tiers][0::2]), 2),
            "mape_leave_one_out_pct": round(mape(loo, all_samples[p.tiers]), 2),
        }
    width = max(len(k) for k in rows)
    print(f"profile: {len(table.profiles)} TierSets, {args.tokens} tokens x {args.repeats} repeats, {args.threads} thread(s), {profile_s:.1f} s")
    print(f"latency model (half split): c0 {half.coef[0]:.3f} ms + {half.coef[1]:.3f} ms/MB + {half.coef[2]:.3f} ms/tier")
    print(f"{'TierSet':<{width}}  median ms/token  memory MB  bpb     expert MB/token  MAPE half  MAPE leave-one-out")
    for k, r in rows.items():
        print(f"{k:<{width}}  {r['median_ms']:>15.3f}  {r['memory_bytes'] / 1e6:>9.2f}  {r['bpb']:.3f}  {r['expert_MB_per_token']:>15.3f}  "
              f"{r['mape_half_pct']:>8.2f}%  {r['mape_leave_one_out_pct']:>17.2f}%")
    mean_half = statistics.mean(r["mape_half_pct"] for r in rows.values())
    mean_loo = statistics.mean(r["mape_leave_one_out_pct"] for r in rows.values())
    print(f"mean MAPE: half split {mean_half:.2f}%, leave one TierSet out {mean_loo:.2f}% (target <= 10%)")

    sim = trace(table, seed=args.seed, requests=args.requests, tokens=args.tokens)
    for name, r in sim["policies"].items():
        print(f"trace {name:<10}: {r['met_share']:.1%} of {sim['requests']} requests met their budget, mean utility {r['mean_utility']:.4f}, picks {r['picks']}")
    print(json.dumps({
        "benchmark": "tier_select", "checkpoint": str(args.checkpoint) if args.checkpoint else "built (untrained)", "threads": args.threads,
        "tokens": args.tokens, "repeats": args.repeats, "tiersets": rows, "mape_half_mean_pct": round(mean_half, 2),
        "mape_leave_one_out_mean_pct": round(mean_loo, 2), "latency_model": half.coef,
        "trace": {k: (v if k != "policies" else {n: {"met_share": round(p["met_share"], 4), "mean_utility": round(p["mean_utility"], 4)} for n, p in v.items()})
                  for k, v in sim.items()},
    }))


if __name__ == "__main__":
    os.environ.setdefault("LITE_LLM_DEVICE", "cpu")
    main()
