"""Does growth pay?  Compute to reach a from-scratch model's quality, by growth path.

    python benchmarks/growth_savings.py              # ~50 min on 2 cores
    python benchmarks/growth_savings.py --quick      # a smoke run (minutes), figures not meaningful

For each path a small model S is trained, grown to L by a function-preserving chain of
growth operations, and trained on; L is also trained from scratch on the same data (the
standard library's prose and code, half each, byte-level) with the same batch and learning
rate schedule (linear warm-up, cosine to 10%).  The target is the scratch run's final
validation loss (mean over the two domains).  A path's cost is S's training FLOPs plus the
grown run's FLOPs up to the first evaluation at or below the target (linearly interpolated
between evaluations); savings = 1 - cost / scratch FLOPs.  FLOPs are the trainer's count
(6 x active parameters x tokens + attention), so runs of different shapes compare at equal
compute.  Also reported: the scratch run's loss at the grown run's final FLOPs (who is ahead at
equal compute when the target is not reached), and the savings at the grown run's own final
loss (1 - the grown path's total FLOPs / the scratch FLOPs to first reach that loss).

Protocols (``--protocol``):

* ``takeover`` (default): one run, one schedule, the model changes mid-way.  S trains the first
  ``t`` of the scratch run's steps (``--switch t``, several allowed), is grown, and L takes the
  run over at that step: the same learning-rate schedule (no new warm-up) and the same data
  stream as the scratch run from that step on.  The most direct comparison there is: only
  the model differs, and only before the switch.
* ``restart``: S trains ``--small-frac`` of the steps on its own full schedule, then the grown
  L trains ``--cont-frac`` of them on a new warm-up + cosine schedule (a separate run).
* ``budget``: the direct test of a savings claim.  The grown path gets ``--budget`` (e.g. 0.6)
  of the scratch run's FLOPs as one run of its own length N (the same schedule family: warm-up,
  cosine to 10% over N steps): S trains its first ``t`` of the steps, L takes over (as in
  ``takeover``) and the run ends when the budget is spent.  N follows from the budget and the
  two models' FLOPs per step.  If the final loss is at or below the scratch run's, the path
  needs at most ``budget`` of the scratch FLOPs: savings >= 1 - budget.  Two controls at the
  same budget, each on its own full schedule: L from scratch (what the scratch run reaches
  with that compute) and S alone (whether growing was needed at all).

Paths (L = 4 layers, d 192, 6 query / 2 KV heads of 32, SwiGLU 512: 1.7 M parameters):

* depth:   S has 2 layers;                      ``llama_pro`` to 4 (new blocks silent);
* depth_stack: the same S;                   ``stack`` to 4 (G_stack: both copies live; not exact);
* width:   S has d 96, 3/1 heads, SwiGLU 256;   ``width`` 192, ``heads`` 6 (split), ``ffn_width`` 512;
* width_fresh: the same S;                     ``width`` 192 ``mode: pad``, ``heads`` 6 ``copy``,
  ``ffn_width`` 512 ``fresh`` — the new half of each axis starts as fresh capacity, not copies;
* upcycle: S is L with SwiGLU 256;              ``upcycle`` to 4 experts of 256, top-2 — and its
  L (same active FLOPs per token as the dense L, 2.5x the FFN parameters) has its own scratch run.

``--d-model --heads --kv-heads --head-dim --ffn`` change L's shape (S halves it along each path).

Each path is measured against a scratch run of the very config it grows into (a path whose growth
changes a field — ``width mode: pad`` halves ``norm_eps`` — gets its own scratch run).  Single
runs differ by ~0.01-0.02 nats from seed to seed, as much as the savings being measured, so
``--seeds 1 2 3`` repeats the whole study per seed (data order, initialisation and growth noise
all change) and adds a table of each path's final loss minus its own scratch run's, seed by
seed, with the mean and standard deviation.

Scale: byte-level models of 0.5-1.7 M parameters on ~2 M training tokens (1000 steps of 16 x 128)
per scratch run, so the whole study fits one session on 2 CPU cores.  That is small for the
progressive-training literature (which grows 100M+ models over billions of tokens); ``--steps``
scales it.  Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
if TYPE_CHECKING:
    from lite_llm import ModelConfig

from _common import emit_json, print_table, reexec_with_thp, rounded, setup_torch_threads, stdlib_prose_and_code  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIXTURE = {"prose": 0.5, "code": 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "growth_savings")
    parser.add_argument("--steps", type=int, default=1000, help="Steps of each from-scratch run.")
    parser.add_argument("--protocol", choices=["takeover", "restart", "budget"], default="takeover")
    parser.add_argument("--switch", type=float, nargs="+", default=[0.5, 0.75], help="takeover, budget: the fractions of the run S trains before L takes over.")
    parser.add_argument("--budget", type=float, default=0.6, help="budget: the grown path's FLOPs as a fraction of the scratch run's.")
    parser.add_argument("--small-frac", type=float, default=0.6, help="restart: steps of S as a fraction of --steps.")
    parser.add_argument("--cont-frac", type=float, default=0.5, help="restart: steps of the continued run as a fraction of --steps.")
    parser.add_argument("--paths", nargs="+", default=["depth", "width", "upcycle"], choices=["depth", "depth_stack", "width", "width_fresh", "upcycle"])
    parser.add_argument("--d-model", type=int, default=192, help="L's hidden size (S halves it on the width path).")
    parser.add_argument("--heads", type=int, default=6, help="L's query heads.")
    parser.add_argument("--kv-heads", type=int, default=2, help="L's KV heads.")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--ffn", type=int, default=512, help="L's SwiGLU hidden size.")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--rewarm", type=int, default=30,
        help="takeover, budget: steps over which the grown model's learning rate ramps back up to the schedule's (its AdamW moments start fresh).",
    )
    parser.add_argument("--eval-every", type=int, default=40, help="Evaluations of the continued runs (to find where they cross the target).")
    parser.add_argument("--chart", type=Path, default=ROOT / "benchmarks" / "results" / "growth_savings.png")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1],
        help="Repeat the whole study once per seed (data order, initialisation, growth noise), each in workdir/seed<N>, "
        "and report each path against its own scratch run, seed by seed, with the mean and spread.",
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_every = 40, 5
    reexec_with_thp()
    setup_torch_threads()

    studies = {}
    several = len(args.seeds) > 1
    for seed in args.seeds:
        work = args.workdir / f"seed{seed}" if several else args.workdir
        if several:
            print(f"=== seed {seed} ===", flush=True)
        studies[seed] = _study(args, seed, work)
        _report(args, *studies[seed], None if several else args.chart)
    if several:  # one chart for all seeds: each grown run's lead over its own scratch run, step by step
        pairs: dict[str, list[tuple[int, Path, Path]]] = {}
        for seed, (results, _, _) in studies.items():
            for label, r in results.items():
                pairs.setdefault(label, []).append((seed, Path(r["grown_dir"]), Path(r["scratch_dir"])))
        gap_chart(pairs, args.chart)
        print(f"chart: {args.chart}")
    settings = {"protocol": args.protocol, "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr, "seeds": args.seeds}
    settings.update(d_model=args.d_model, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, ffn=args.ffn)
    if args.protocol == "restart":
        settings.update({"small_frac": args.small_frac, "cont_frac": args.cont_frac})
    else:
        settings.update({"switch": args.switch, "rewarm": args.rewarm}, **({"budget": args.budget} if args.protocol == "budget" else {}))
    payload: dict = {"benchmark": "growth_savings"}
    for seed, (results, _, controls) in studies.items():
        figures = {
            "paths": {n: {k: rounded(v) for k, v in r.items() if k not in ("curve", "small_curve")} for n, r in results.items()},
            "controls": {n: {"flops": rounded(f), "final_loss": rounded(l)} for n, (_, (l, f, _)) in controls.items()},
        }
        if several:
            payload.setdefault("per_seed", {})[seed] = figures
        else:
            payload.update(figures)
    if several:
        payload["summary"] = _summarise({seed: results for seed, (results, _, _) in studies.items()})
    payload["settings"] = settings
    emit_json(payload)


def _study(args: argparse.Namespace, seed: int, work: Path) -> tuple[dict, dict, dict]:
    """Run every path of ``args`` once with ``seed``; returns (results by path label, scratch runs
    by key, control runs by name).  Seed 1 is the seed of every run recorded before ``--seeds``
    existed (data order 1, initialisation 0, growth noise 0) and reproduces them bitwise."""
    import inspect

    import torch

    from lite_llm import ModelConfig, build_model
    from lite_llm.grow import get_op
    from lite_llm.grow.expand import materialize
    from lite_llm.model import stored_state
    from lite_llm.train import TrainConfig, Trainer, TrainerCallback, read_metrics
    from lite_llm.config import flops_per_token

    data = stdlib_prose_and_code(work)
    init_seed = seed - 1  # initialisation and growth noise; the data order uses ``seed`` itself

    def schedule(steps: int, eval_every: int) -> "TrainConfig":
        return TrainConfig(
            steps=steps, batch_size=args.batch, seq_len=args.seq, lr=args.lr, warmup_steps=min(50, steps // 10), seed=seed,
            domains=MIXTURE, eval_every=eval_every, eval_batches=6, eval_batch_size=16, keep_last=1,
        )

    class Rewarm(TrainerCallback):
        """The grown model's first ``steps`` steps ramp its learning rate linearly up to the
        schedule's: fresh AdamW moments make the first updates ~lr * sign(gradient) for every
        weight, which at the mid-run learning rate undoes part of what growth kept."""

        def __init__(self, start: int, steps: int):
            self.start, self.steps = start, steps

        def lr_scale(self, trainer, step: int) -> float:
            return min(1.0, (step - self.start + 1) / self.steps) if self.steps else 1.0

    def train(model, cfg: "TrainConfig", run: str, start: int = 0, until: int | None = None):
        """Train steps ``start .. until`` of the run ``cfg`` describes on the mixture; returns
        (final mean val loss, FLOPs, [(flops, mean val loss)])."""
        shutil.rmtree(work / run, ignore_errors=True)
        callbacks = [Rewarm(start, args.rewarm)] if start else []
        trainer = Trainer(model, data, cfg, run_dir=work / run, callbacks=callbacks, show_progress=False)
        trainer.step = start  # takeover: the grown model continues the run at this step
        started = time.perf_counter()
        result = trainer.train(until=until)
        curve = [(r["flops"], _mean_loss(r["val"])) for r in read_metrics(work / run) if "val" in r]
        if not curve or curve[-1][0] != result.flops:  # S stopped mid-run: evaluate where it stops
            curve.append((result.flops, _mean_loss(trainer.evaluate())))
        print(f"{run}: steps {start}..{trainer.step}, {result.flops:.3e} FLOPs, val loss {curve[-1][1]:.4f}, {time.perf_counter() - started:.0f} s", flush=True)
        return curve[-1][1], result.flops, curve

    d, h, kv, ffn = args.d_model, args.heads, args.kv_heads, args.ffn
    dense = ModelConfig(
        vocab_size=256, d_model=d, n_layers=4, n_heads=h, n_kv_heads=kv, head_dim=args.head_dim, intermediate_size=ffn, max_seq_len=args.seq,
        name="L",
    )
    paths = {  # S is L halved along the path's axis
        "depth": (dense.replace(n_layers=2, name="S-depth"), [("llama_pro", {"target_layers": 4})]),
        # G_stack (Du et al. 2024, "Stacking Your Transformers"): the same S, its whole stack
        # repeated — not function-preserving; that paper finds it beats identity-initialised depth
        "depth_stack": (dense.replace(n_layers=2, name="S-depth"), [("stack", {"times": 2})]),
        "width": (
            dense.replace(d_model=d // 2, n_heads=h // 2, n_kv_heads=kv // 2, intermediate_size=ffn // 2, name="S-width"),
            [("width", {"d_model": d}), ("heads", {"n_heads": h, "mode": "split"}), ("ffn_width", {"intermediate_size": ffn, "mode": "split"})],
        ),
        # the same S and sizes as "width", grown as fresh capacity instead of copies: zero new
        # residual dimensions (LEMON padding), silent copies of the heads, fresh FFN neurons
        "width_fresh": (
            dense.replace(d_model=d // 2, n_heads=h // 2, n_kv_heads=kv // 2, intermediate_size=ffn // 2, name="S-width"),
            [("width", {"d_model": d, "mode": "pad"}), ("heads", {"n_heads": h, "mode": "copy"}), ("ffn_width", {"intermediate_size": ffn, "mode": "fresh"})],
        ),
        "upcycle": (dense.replace(intermediate_size=ffn // 2, name="S-moe"), [("upcycle", {"num_experts": 4, "k_expert": 2})]),
    }
    scratch: dict[str, tuple[float, float, list]] = {}
    controls: dict[str, tuple[str, tuple[float, float, list]]] = {}  # budget: other runs at the same FLOPs (and their scratch run)
    lengths: dict[str, int] = {}  # budget: the steps of each grown path's run
    small_runs: dict[tuple, tuple] = {}  # budget: S runs by (S, schedule, switch step)
    small_curves: dict[str, list] = {}  # S's curve before each grown run
    path_scratch: dict[str, str] = {}  # the scratch run each path is measured against
    results = {}
    ids = torch.randint(0, 256, (2, args.seq), generator=torch.Generator().manual_seed(0))
    for name in args.paths:
        small_cfg, chain = paths[name]
        if args.protocol == "takeover":
            # S runs the scratch run's schedule and is snapshotted at every switch point.
            fraction_at = {round(t * args.steps): t for t in sorted(args.switch)}  # labelled by the fraction asked for
            switches = sorted(fraction_at)
            snapshots = {}

            class Snapshot(TrainerCallback):
                def on_step_end(self, trainer, step, record):
                    if step + 1 in switches:
                        snapshots[step + 1] = ({k: v.clone() for k, v in stored_state(trainer.model).items()}, trainer.flops)

            cfg = schedule(args.steps, max(args.steps // 8, 1))
            shutil.rmtree(work / f"{name}-small", ignore_errors=True)
            Trainer(build_model(small_cfg, seed=init_seed), data, cfg, run_dir=work / f"{name}-small", callbacks=[Snapshot()], show_progress=False).train(until=switches[-1])
            small_curve = [(r["flops"], _mean_loss(r["val"])) for r in read_metrics(work / f"{name}-small") if "val" in r]
            starts = [(f"{name}@{fraction_at[k]:g}", k, snapshots[k][0], snapshots[k][1]) for k in switches]
            small_curves.update({label: small_curve for label, *_ in starts})
        elif args.protocol == "budget":
            # One run per switch point, of the length that spends the budget: S's steps, then L's.
            per_step_small, per_step_large = (flops_per_token(c, args.seq) * args.batch * args.seq for c in (small_cfg, dense))
            starts = []
            for t in sorted(args.switch):
                length = round(args.budget * args.steps * per_step_large / (t * per_step_small + (1 - t) * per_step_large))
                at = round(t * length)
                label = f"{name}@{t:g}"
                lengths[label] = length
                key = (repr(small_cfg), length, at)  # paths that share S (and so the schedule) share its run
                if key not in small_runs:
                    small = build_model(small_cfg, seed=init_seed)
                    _, flops, curve = train(small, schedule(length, max(length // 8, 1)), f"{label.replace('@', '-at-')}-small", until=at)
                    small_runs[key] = (stored_state(small), flops, curve)
                small_state, small_flops, small_curves[label] = small_runs[key]
                starts.append((label, at, small_state, small_flops))
            alone = f"{small_cfg.name} alone"
            if alone not in controls:
                alone_steps = round(args.budget * args.steps * per_step_large / per_step_small)
                controls[alone] = (name, train(build_model(small_cfg, seed=init_seed), schedule(alone_steps, args.eval_every), f"{name}-small-alone"))
        else:
            small_steps, cont_steps = int(args.steps * args.small_frac), int(args.steps * args.cont_frac)
            small = build_model(small_cfg, seed=init_seed)
            _, small_flops, small_curves[name] = train(small, schedule(small_steps, max(small_steps // 8, 1)), f"{name}-small")
            starts = [(name, 0, stored_state(small), small_flops)]
        for label, at, small_state, small_flops in starts:
            config, tensors = small_cfg, small_state
            for method, params in chain:
                op = get_op(method)
                seeded = {"seed": init_seed} if "seed" in inspect.signature(op).parameters else {}
                config, tensors = op(config, tensors, **params, **seeded)
            grown = materialize(config, dict(tensors))
            with torch.no_grad():
                before = materialize(small_cfg, dict(small_state)).eval()(ids).logits
                drift = float((before - grown.eval()(ids).logits).abs().max())
            grown.train()
            key = path_scratch[name] = _scratch_key(config, dense)
            if key not in scratch:
                scratch[key] = train(build_model(config, seed=init_seed), schedule(args.steps, args.eval_every), f"scratch-{key}")
                if args.protocol == "budget":
                    steps = round(args.budget * args.steps)
                    controls[f"scratch {key}"] = (name, train(build_model(config, seed=init_seed), schedule(steps, args.eval_every), f"scratch-{key}-budget"))
            target, scratch_flops, scratch_curve = scratch[key]
            run = f"{label.replace('@', '-at-')}-grown"
            if args.protocol == "takeover":
                final, cont_flops, curve = train(grown, schedule(args.steps, args.eval_every), run, start=at)
            elif args.protocol == "budget":
                final, cont_flops, curve = train(grown, schedule(lengths[label], args.eval_every), run, start=at)
            else:
                final, cont_flops, curve = train(grown, schedule(cont_steps, args.eval_every), run)
            reached = _first_crossing(curve, target)
            cost = small_flops + reached if reached is not None else None
            # The same question asked at the grown run's own final loss: what would scratch pay for it?
            scratch_to_final = _first_crossing(scratch_curve, final)
            results[label] = {
                "scratch_run": key,
                "grown_dir": str(work / run),
                "scratch_dir": str(work / f"scratch-{key}"),
                "switch_step": at if args.protocol != "restart" else None,
                "run_steps": lengths.get(label, args.steps if args.protocol == "takeover" else None),
                "small_params": small_cfg.num_params(),
                "large_params": config.num_params(),
                "large_active_params": config.num_active_params(),
                "growth_max_abs_logit_change": drift,
                "small_flops": small_flops,
                "continued_flops_to_target": reached,
                "continued_flops_total": cont_flops,
                "continued_final_loss": final,
                "scratch_loss_at_equal_flops": _loss_at(scratch_curve, small_flops + cont_flops),
                "target_loss": target,
                "grown_minus_scratch_final": final - target,
                "scratch_flops": scratch_flops,
                "savings": 1 - cost / scratch_flops if cost is not None else None,
                "scratch_flops_to_grown_final": scratch_to_final,
                "savings_at_grown_final": 1 - (small_flops + cont_flops) / scratch_to_final if scratch_to_final else None,
                "curve": [(small_flops + f, l) for f, l in curve],
                "small_curve": [(f, l) for f, l in small_curves[label] if f <= small_flops],
            }

    controls = {n: (path_scratch[path], run) for n, (path, run) in controls.items()}  # normalised by the path's scratch run
    return results, scratch, controls


def _report(args: argparse.Namespace, results: dict, scratch: dict, controls: dict, chart: Path | None) -> None:
    """The tables and (given a path) the chart of one study."""
    rows = []
    for name, r in results.items():
        at_equal = r["scratch_loss_at_equal_flops"]
        rows.append([
            name, f"{r['small_params'] / 1e6:.2f}M -> {r['large_params'] / 1e6:.2f}M", f"{r['growth_max_abs_logit_change']:.1e}",
            f"{r['target_loss']:.4f}", f"{r['continued_final_loss']:.4f}", "-" if at_equal is None else f"{at_equal:.4f}", f"{r['small_flops']:.3e}",
            "not reached" if r["continued_flops_to_target"] is None else f"{r['continued_flops_to_target']:.3e}",
            f"{r['scratch_flops']:.3e}", "-" if r["savings"] is None else f"{r['savings']:+.1%}",
            "-" if r["savings_at_grown_final"] is None else f"{r['savings_at_grown_final']:+.1%}",
        ])
    print_table(
        ["path", "params S -> L", "growth |dlogit|", "target", "grown final", "scratch at same FLOPs", "S FLOPs", "grown FLOPs to target", "scratch FLOPs", "savings", "savings at grown final loss"],
        rows, title=f"compute to reach the from-scratch model's final validation loss (mean of prose and code, nats/token), protocol {args.protocol}",
    )
    if controls:
        print_table(
            ["control run (its own full schedule)", "FLOPs", "FLOPs / scratch", "final loss"],
            [[n, f"{f:.3e}", f"{f / scratch[key][1]:.3f}", f"{l:.4f}"] for n, (key, (l, f, _)) in controls.items()],
            title=f"controls at the budget ({args.budget:g} of the scratch FLOPs)",
        )
    if chart is not None:
        _chart(results, scratch, chart, {name: curve for name, (_, (_, _, curve)) in controls.items()})
        print(f"chart: {chart}")


def _scratch_key(config: ModelConfig, reference: ModelConfig) -> str:
    """The scratch run a grown ``config`` is measured against: the same architecture trained from
    scratch.  Named by kind (upcycling grows a MoE, the other paths a dense L) and by every float
    field where it differs from the dense L (``width mode: pad`` halves ``norm_eps`` to stay
    exact), so paths that grow into the same config share a run and no path is measured
    against a model it could not have become."""
    from dataclasses import fields

    kind = "moe" if config.tiers else "dense"
    differs = [
        f"{f.name}{getattr(config, f.name):g}"
        for f in fields(config)
        if isinstance(getattr(config, f.name), float) and getattr(config, f.name) != getattr(reference, f.name)
    ]
    return "-".join([kind, *differs])


def _summarise(per_seed: dict[int, dict]) -> dict:
    """Each path's figures over seeds, each seed against its own scratch run: the paired
    difference of final losses (grown - scratch; negative = growth ahead), the savings where
    the target was reached, and the spread of the scratch runs themselves (the noise floor)."""
    from statistics import mean, stdev

    def spread(values: list[float]) -> float:
        return stdev(values) if len(values) > 1 else 0.0

    summary: dict[str, dict] = {}
    labels = dict.fromkeys(label for results in per_seed.values() for label in results)
    for label in labels:
        runs = [results[label] for results in per_seed.values() if label in results]
        diffs = [r["grown_minus_scratch_final"] for r in runs]
        targets = [r["target_loss"] for r in runs]
        savings = [r["savings"] for r in runs]
        at_own = [r["savings_at_grown_final"] for r in runs]
        summary[label] = {
            "seeds": len(runs),
            "grown_minus_scratch_final": diffs,
            "mean_difference": mean(diffs),
            "difference_stdev": spread(diffs),
            "scratch_final": targets,
            "scratch_final_stdev": spread(targets),
            "reached": sum(s is not None for s in savings),
            "savings": savings,
            "savings_at_grown_final": at_own,
        }
    rows = [
        [
            label, s["seeds"], " ".join(f"{d:+.4f}" for d in s["grown_minus_scratch_final"]), f"{s['mean_difference']:+.4f} +- {s['difference_stdev']:.4f}",
            f"{mean(s['scratch_final']):.4f} +- {s['scratch_final_stdev']:.4f}", f"{s['reached']}/{s['seeds']}",
            " ".join("-" if v is None else f"{v:+.1%}" for v in s["savings"]),
            " ".join("-" if v is None else f"{v:+.1%}" for v in s["savings_at_grown_final"]),
        ]
        for label, s in summary.items()
    ]
    print_table(
        ["path", "seeds", "grown - scratch final, per seed", "mean +- stdev", "scratch final, mean +- stdev", "reached", "savings per seed", "savings at own final loss"],
        rows, title="over seeds, each seed's grown run against its own scratch run (negative difference: growth ahead)",
    )
    return summary


def _mean_loss(val: dict) -> float:
    return sum(val[d]["loss"] for d in MIXTURE) / len(MIXTURE)


def _loss_at(curve: list[tuple[float, float]], flops: float) -> float | None:
    """The loss of ``curve`` at ``flops`` (linear between evaluations; None outside it)."""
    for (f0, l0), (f1, l1) in zip(curve, curve[1:]):
        if f0 <= flops <= f1:
            return l0 + (l1 - l0) * (flops - f0) / (f1 - f0)
    return None


def _first_crossing(curve: list[tuple[float, float]], target: float) -> float | None:
    """FLOPs where the loss curve first reaches ``target`` (linear between evaluations)."""
    previous = None
    for flops, loss in curve:
        if loss <= target:
            if previous is None:
                return flops
            f0, l0 = previous
            return f0 + (flops - f0) * (l0 - target) / (l0 - loss)
        previous = (flops, loss)
    return None


def gap_chart(pairs: dict[str, list[tuple[int, Path, Path]]], path: Path) -> None:
    """Grown minus scratch validation loss at each evaluation step, one line per (path, seed).

    ``pairs`` maps a path label to (seed, grown run dir, scratch run dir) triples; the two runs
    of a seed share data order and evaluation batches, so their difference at a step is paired.
    Below zero the grown model is ahead.  Usable on runs of several invocations (e.g. seeds 1-3
    and 4-6 in two workdirs)."""
    from lite_llm.plot import _pyplot, _save
    from lite_llm.train import read_metrics

    def by_step(run: Path) -> dict[int, float]:
        return {r["step"]: _mean_loss(r["val"]) for r in read_metrics(run) if "val" in r}

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ax.axhline(0.0, color="gray", linewidth=1)
    for (label, triples), color in zip(pairs.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")):
        for seed, grown_dir, scratch_dir in triples:
            grown, scratch = by_step(grown_dir), by_step(scratch_dir)
            steps = sorted(set(grown) & set(scratch))
            ax.plot(steps, [grown[s] - scratch[s] for s in steps], color=color, alpha=0.8, linewidth=1,
                    label=label if seed == triples[0][0] else None)
            ax.annotate(f"s{seed}", (steps[-1], grown[steps[-1]] - scratch[steps[-1]]), fontsize=7, color=color)
    ax.set_xlabel("step (the grown model takes over at its switch step)")
    ax.set_ylabel("grown - scratch validation loss (nats/token)")
    ax.set_title("each seed's grown run against its own scratch run (below 0: growth ahead)")
    ax.set_ylim(-0.12, 0.12)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(plt, fig, path)


def _chart(results: dict, scratch: dict, path: Path, controls: dict[str, list] | None = None) -> None:
    from lite_llm.plot import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for key, (target, flops, curve) in scratch.items():
        ax.axhline(target, color="gray", linestyle=":", linewidth=1)
    for name, r in results.items():
        xs = [f for f, _ in r["small_curve"]] + [f for f, _ in r["curve"]]
        ys = [l for _, l in r["small_curve"]] + [l for _, l in r["curve"]]
        ax.plot(xs, ys, marker=".", label=f"{name}: S then grown")
    for key, (target, flops, curve) in scratch.items():
        ax.plot([f for f, _ in curve], [l for _, l in curve], marker="s", markersize=3, linestyle="--", label=f"scratch ({key})")
    for name, curve in (controls or {}).items():
        ax.plot([f for f, _ in curve], [l for _, l in curve], linestyle="-.", linewidth=1, label=f"control: {name}")
    ax.set_xlabel("training FLOPs (S's included)")
    ax.set_ylabel("validation loss, mean of prose and code (nats/token)")
    ax.set_title("growth vs training from scratch (dotted: scratch final = target)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(plt, fig, path)


if __name__ == "__main__":
    main()
