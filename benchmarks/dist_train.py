"""Distributed training on CPU (issue 19): the bytes expert parallelism moves, and what 2
processes cost against 1 on the same global batch.

    PYTHONPATH=src python benchmarks/dist_train.py [--rounds 3] [--steps 6] [--batch 8] [--seq 256] [--no-ep4]

Model: the ``small`` preset (4 layers, all MoE, d=256, two tiers of 2 groups x 4 experts,
expert hidden 192, k = 1 tier x 2 groups x 1 expert = 2 active experts per token), byte-level,
trained on real text (the standard library's sources and pydoc topics, 400 kB per domain).

1. **All-to-all bytes, counted, not timed.**  ``lite_llm.dist.expert_parallel.funcol`` is
   replaced on every rank by a proxy whose ``all_to_all_single_autograd`` adds up the bytes of
   the input rows sent to *other* ranks (the self-block, ``input_split_sizes[my_rank]``, never
   leaves the process), and hooks the output's gradient to count the backward all-to-all too
   (it sends the output's gradient back along ``output_split_sizes``).  Compared with the
   spec's O(N*L*K*d / R_EP): for uniform routing each rank moves
   ``2 (rows out + results back) x N*L*K*d*bytes x (R-1)/R`` per forward, and as much again
   per backward.
2. **Step time, 2 processes vs 1**, same global batch: one process with 2 threads and with 1
   thread, ``ep=2``, ``dp=2``, ``tp=2`` and ``pp=2`` (1F1B, 2 microbatches) with 1 thread per rank, and one process with 2
   threads on pp's 2 microbatches (its loss reference: the balance loss is taken per microbatch);
   interleaved rounds, each candidate a fresh launch, the median of steps after the first 2.  On 2 cores 2 processes cannot beat 1
   process using both cores: the figure is the price of the communication and duplication.

Ends with one JSON line of every figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_description, emit_json  # noqa: E402

PRESET = "small"


# ----------------------------------------------------------------------------- launching
def run_ranks(fn_name: str, world: int, threads: int, out_dir: Path, *args: Any, timeout_s: float = 600.0) -> list[Any]:
    """``fn(*args)`` on ``world`` spawned processes of ``threads`` threads (gloo on 127.0.0.1 when world > 1)."""
    from lite_llm.dist.local import run_ranks as run_local

    return run_local(globals()[fn_name], world, out_dir, *args, timeout_s=timeout_s, threads=threads)


# ----------------------------------------------------------------------------- on each rank
class CountingFuncol:
    """Stands in for ``torch.distributed._functional_collectives`` inside expert_parallel:
    counts the bytes each all-to-all sends to other ranks, forward and backward."""

    def __init__(self) -> None:
        import torch.distributed._functional_collectives as funcol

        self._real = funcol
        self.forward_bytes = 0
        self.backward_bytes = 0
        self.forward_self_bytes = 0
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def all_to_all_single_autograd(self, input, output_split_sizes, input_split_sizes, group):  # noqa: A002
        import torch.distributed as dist

        me = dist.get_rank(group)
        row_bytes = input.shape[1:].numel() * input.element_size()
        self.calls += 1
        self.forward_bytes += (sum(input_split_sizes) - input_split_sizes[me]) * row_bytes
        self.forward_self_bytes += input_split_sizes[me] * row_bytes
        out = self._real.all_to_all_single_autograd(input, output_split_sizes, input_split_sizes, group)
        if out.requires_grad:
            back = (sum(output_split_sizes) - output_split_sizes[me]) * row_bytes

            def count(grad):
                self.backward_bytes += back
                return grad

            out.register_hook(count)
        return out


def _train_config(steps: int, batch: int, seq: int, grad_accum: int = 1):
    from lite_llm.train import TrainConfig

    return TrainConfig(steps=steps, batch_size=batch // grad_accum, grad_accum=grad_accum, seq_len=seq, lr=1e-3, warmup_steps=2, eval_every=0, eval_batches=1,
                       eval_batch_size=2, log_every=1000, save_every=0)


def _model(vocab: int):
    from lite_llm import ModelConfig, build_model

    return build_model(ModelConfig.from_preset(PRESET, vocab_size=vocab), seed=5)


def _timed_steps(trainer, counter: CountingFuncol | None) -> tuple[list[float], list[dict[str, int]]]:
    times: list[float] = []
    counts: list[dict[str, int]] = []
    inner = trainer._one_step

    def one_step(step: int):
        before = (counter.forward_bytes, counter.backward_bytes, counter.forward_self_bytes, counter.calls) if counter else None
        t0 = time.perf_counter()
        record = inner(step)
        times.append(time.perf_counter() - t0)
        if counter:
            counts.append({
                "forward": counter.forward_bytes - before[0], "backward": counter.backward_bytes - before[1],
                "forward_self": counter.forward_self_bytes - before[2], "calls": counter.calls - before[3],
            })
        return record

    trainer._one_step = one_step
    return times, counts


def dist_worker(data_dir: str, parallel: str, steps: int, batch: int, seq: int, count: bool) -> dict[str, Any]:
    import torch

    import lite_llm.dist.expert_parallel as ep_mod
    from lite_llm.data import TokenData
    from lite_llm.dist.launch import init_distributed
    from lite_llm.dist.parallelize import parallelize
    from lite_llm.dist.trainer import DistributedTrainer
    from lite_llm.model import TieredMoE

    ranks = init_distributed(parallel, torch.device("cpu"))
    data = TokenData(data_dir)
    model = _model(data.tokenizer.vocab_size)
    cfg = model.config
    moe_layers = sum(1 for m in model.modules() if isinstance(m, TieredMoE))
    model = parallelize(model, ranks)  # under pp: this rank's stage
    counter = None
    if count:
        counter = CountingFuncol()
        ep_mod.funcol = counter
    # under pp the global batch goes through the pipeline as pp microbatches (1F1B needs >= pp)
    accum = ranks.degrees.pp
    trainer = DistributedTrainer(model, data, _train_config(steps, batch, seq, accum), ranks, show_progress=False)
    times, counts = _timed_steps(trainer, counter)
    result = trainer.train()
    r = cfg.routing
    return {
        "times": times, "counts": counts, "losses": result.losses, "moe_layers": moe_layers, "d_model": cfg.d_model,
        "k": r.k_tier * r.k_group * r.k_expert, "rows": batch // ranks.degrees.data_ranks * seq, "ep": ranks.degrees.ep,
    }


def single_worker(data_dir: str, steps: int, batch: int, seq: int, accum: int = 1) -> dict[str, Any]:
    from lite_llm.data import TokenData
    from lite_llm.train import Trainer

    data = TokenData(data_dir)
    trainer = Trainer(_model(data.tokenizer.vocab_size), data, _train_config(steps, batch, seq, accum), show_progress=False)
    times, _ = _timed_steps(trainer, None)
    result = trainer.train()
    return {"times": times, "losses": result.losses}


# ----------------------------------------------------------------------------- driver
def _launch(name, kind, world, threads, out, data_dir, args):
    if kind.startswith("single"):
        accum = int(kind.split("accum=")[1]) if "accum=" in kind else 1
        res = run_ranks("single_worker", 1, threads, out, data_dir, args.steps, args.batch, args.seq, accum, timeout_s=300)
        return res[0]["times"], res
    res = run_ranks("dist_worker", world, threads, out, data_dir, kind, args.steps, args.batch, args.seq, False, timeout_s=300)
    return [max(ts) for ts in zip(*(r["times"] for r in res))], res


def steady(times: list[float], skip: int = 2) -> float:
    return statistics.median(times[skip:] if len(times) > skip else times)


def bytes_figures(data_dir: str, ep: int, steps: int, batch: int, seq: int, tmp: Path) -> dict[str, Any]:
    res = run_ranks("dist_worker", ep, 1, tmp / f"bytes-ep{ep}", data_dir, f"ep={ep}", steps, batch, seq, True)
    r0 = res[0]
    n, layers, k, d, elem = r0["rows"], r0["moe_layers"], r0["k"], r0["d_model"], 4
    expected_fwd = 2 * n * layers * k * d * elem * (ep - 1) / ep
    per_rank = []
    for rank, r in enumerate(res):
        fwd = statistics.mean(c["forward"] for c in r["counts"])
        bwd = statistics.mean(c["backward"] for c in r["counts"])
        self_b = statistics.mean(c["forward_self"] for c in r["counts"])
        per_rank.append({"rank": rank, "forward_bytes": fwd, "backward_bytes": bwd, "self_bytes": self_b,
                         "calls_per_step": r["counts"][0]["calls"]})
    fwd_mean = statistics.mean(p["forward_bytes"] for p in per_rank)
    bwd_mean = statistics.mean(p["backward_bytes"] for p in per_rank)
    return {
        "ep": ep, "rows_per_rank_N": n, "moe_layers_L": layers, "k_active_K": k, "d_model": d, "bytes_per_elem": elem,
        "expected_forward_bytes": expected_fwd, "measured_forward_bytes": fwd_mean, "measured_backward_bytes": bwd_mean,
        "ratio_forward": fwd_mean / expected_fwd, "ratio_backward": bwd_mean / expected_fwd,
        "ratio_step": (fwd_mean + bwd_mean) / (2 * expected_fwd), "per_rank": per_rank,
        "step_s_oversubscribed": steady([max(ts) for ts in zip(*(r["times"] for r in res))]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--no-ep4", action="store_true", help="skip the ep=4 byte count (4 ranks on 2 cores)")
    args = ap.parse_args()

    lscpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    cores = len(os.sched_getaffinity(0))
    print(f"CPU: {lscpu} | {cpu_description()} | {cores} cores available", flush=True)
    print(f"model: preset {PRESET}; global batch {args.batch} x {args.seq} tokens; {args.steps} steps per launch", flush=True)

    from lite_llm.data import ByteTokenizer, prepare_data

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        data_dir = str(tmp / "data")
        prepare_data({"code": "stdlib-code", "prose": "stdlib-docs"}, data_dir, ByteTokenizer(), max_bytes_per_domain=400_000)

        # 1. bytes
        byte_results = []
        for ep in ([2] if args.no_ep4 else [2, 4]):
            t0 = time.perf_counter()
            b = bytes_figures(data_dir, ep, 4, args.batch, args.seq, tmp)
            byte_results.append(b)
            print(f"\n[ep={ep}] all-to-all bytes per rank per step (N={b['rows_per_rank_N']} rows, L={b['moe_layers_L']}, "
                  f"K={b['k_active_K']}, d={b['d_model']}, fp32), counted over 4 steps ({time.perf_counter() - t0:.0f} s):")
            print(f"  expected forward (uniform, 2 x N*L*K*d*4 x (R-1)/R): {b['expected_forward_bytes'] / 1e6:.3f} MB")
            for p in b["per_rank"]:
                print(f"  rank {p['rank']}: forward {p['forward_bytes'] / 1e6:.3f} MB, backward {p['backward_bytes'] / 1e6:.3f} MB, "
                      f"kept local (self-block, fwd) {p['self_bytes'] / 1e6:.3f} MB, {p['calls_per_step']} all-to-all calls/step fwd")
            print(f"  measured / expected: forward {b['ratio_forward']:.4f}, backward {b['ratio_backward']:.4f}, "
                  f"whole step {b['ratio_step']:.4f}")

        # 2. step time, interleaved
        candidates = {
            "1proc_2threads": ("single", 1, 2),
            "1proc_1thread": ("single", 1, 1),
            "ep2_1thread_per_rank": ("ep=2", 2, 1),
            "dp2_1thread_per_rank": ("dp=2", 2, 1),
            "tp2_1thread_per_rank": ("tp=2", 2, 1),
            "pp2_1thread_per_rank": ("pp=2", 2, 1),  # 1F1B over 2 microbatches of half the global batch
            # pp's own reference: the same 2 microbatches in one process (the balance loss is taken
            # per microbatch, so its losses are not those of one batch of 8 rows)
            "1proc_2threads_accum2": ("single:accum=2", 1, 2),
        }
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        losses: dict[str, list[float]] = {}
        failed: dict[str, str] = {}
        for rnd in range(args.rounds):
            for name, (kind, world, threads) in candidates.items():
                out = tmp / f"time-{name}-{rnd}"
                if name in failed:
                    continue
                try:
                    times, res = _launch(name, kind, world, threads, out, data_dir, args)
                except Exception as e:  # noqa: BLE001 - reported, the others still run
                    failed[name] = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                    print(f"round {rnd} {name}: FAILED ({failed[name]})", flush=True)
                    continue
                losses[name] = res[0]["losses"]
                samples[name].append(steady(times))
                print(f"round {rnd} {name}: steady step {samples[name][-1]:.3f} s (steps: {', '.join(f'{t:.2f}' for t in times)})", flush=True)

        med = {name: statistics.median(v) for name, v in samples.items() if v}
        print("\nmedian steady-state step time (s) over rounds:")
        for name, v in med.items():
            print(f"  {name:24s} {v:.3f}   vs 1proc_2threads x{v / med['1proc_2threads']:.2f}   vs 1proc_1thread x{v / med['1proc_1thread']:.2f}")
        reference = {name: ("1proc_2threads_accum2" if name.startswith("pp") else "1proc_2threads") for name in losses}
        same = {name: max(abs(a - b) for a, b in zip(l, losses[reference[name]])) for name, l in losses.items() if reference[name] in losses}
        print("max |loss - one process's loss (same microbatches)| over the run:", {k: f"{v:.2e}" for k, v in same.items()})

    payload = {
        "bench": "dist_train", "cpu": lscpu, "cores": cores, "preset": PRESET, "global_batch": args.batch, "seq_len": args.seq,
        "steps_per_launch": args.steps, "rounds": args.rounds,
        "a2a": [{k: v for k, v in b.items() if k != "per_rank"} for b in byte_results],
        "step_s": med, "step_s_rounds": samples,
        "ratio_vs_1proc_2threads": {k: v / med["1proc_2threads"] for k, v in med.items()},
        "ratio_vs_1proc_1thread": {k: v / med["1proc_1thread"] for k, v in med.items()},
        "loss_max_abs_diff_vs_1proc": same, "failed": failed,
    }
    emit_json(payload)


if __name__ == "__main__":
    main()
