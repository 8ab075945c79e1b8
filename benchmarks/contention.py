"""Training under contention: quickstart tokens/s idle and beside CPU-bound processes that this
script starts and stops, for the old thread policy and the new one.

    python benchmarks/contention.py [--steps 20] [--warmup 3] [--rounds 2] [--data DIR]
    python benchmarks/contention.py --task generate [--gen-tokens 128]

Scenarios, each a set of competitor processes started before the training runs and killed
after them (each also ends by itself after ``--competitor-s`` seconds):

* ``idle``: none.
* ``one_single``: one single-threaded Python busy loop.
* ``two_multi``: two processes multiplying 512x512 matrices with 2 torch threads each (plain
  torch, libgomp's default spinning wait: other people's jobs).

Policies, each a fresh training process (the OpenMP wait policy is fixed when torch loads):

* ``old``: what lite-llm did before ``lite_llm.runtime.threads``: torch imported with the
  OpenMP wait policy unset (libgomp spins ~3 ms before sleeping), MKL_DYNAMIC/OMP_DYNAMIC
  FALSE, PyTorch's default thread count.
* ``new``: ``import lite_llm`` first (its wait policy: passive when other tasks are runnable as it loads, the runtime's spin when idle), then ``apply_thread_policy(None)``.

Every (scenario, policy) pair runs ``--rounds`` times; within a round the scenarios run in
turn and the policies one after the other inside each, their order rotated every round, so
drift of the machine's load hits all alike.  ``--policies`` adds candidates: ``new-t1`` (the
new policy with one thread) and ``spin:N`` (libgomp spins N iterations before sleeping).  A training run is the quickstart's own loop
(``Trainer`` on the quickstart preset and ``QUICKSTART_TRAIN``: 16 x 256-token batches),
``--warmup`` untimed steps then ``--steps`` timed ones.  Data: a quickstart data folder given
with ``--data``, or one prepared here from the first ``--corpus-bytes`` of each built-in corpus.

``--task generate`` times greedy decoding (KV cache, one token at a time: many small ops, where
a sleeping thread's wake-up costs most) of the quickstart model instead of training.

Prints tokens/s per pair (median over rounds), the ratio of each to the old policy's idle
speed, whether the per-step losses of every run are bitwise the same (they must be: neither
the thread count nor anything computed changes), and one JSON line.  Targets: the new policy
>= 0.7x of idle beside one single-threaded competitor and >= 0.4x beside two multi-threaded.
The machine's 1-minute load average is printed before and after; other processes (not ours)
make every figure noisier, so measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_description, emit_json, print_table  # noqa: E402  (no torch import)

SCENARIOS = ("idle", "one_single", "two_multi")
POLICIES = ("old", "new")
# Further candidates for --policies: "new-t1" (the new policy with --threads 1) and "spin:N"
# (libgomp spinning N iterations before it sleeps, GOMP_SPINCOUNT=N; libgomp's default is 300000).
TARGETS = {"one_single": 0.7, "two_multi": 0.4}

BUSY_LOOP = "import sys, time\nend = time.time() + float(sys.argv[1])\nprint('ready', flush=True)\nwhile time.time() < end:\n    pass\n"
MATMUL_JOB = (
    "import sys, time, torch\n"
    "torch.set_num_threads(2)\n"
    "a = torch.randn(512, 512); b = torch.randn(512, 512)\n"
    "end = time.time() + float(sys.argv[1])\n"
    "print('ready', flush=True)\n"
    "while time.time() < end:\n"
    "    a = (a @ b).tanh_()\n"
)
COMPETITORS = {"idle": [], "one_single": [BUSY_LOOP], "two_multi": [MATMUL_JOB, MATMUL_JOB]}


# ------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> None:
    """One training run in this (fresh) process; prints one JSON line."""
    threads = None
    if args.policy.startswith("spin:"):
        os.environ["GOMP_SPINCOUNT"] = args.policy.split(":", 1)[1]  # lite_llm keeps a user's choice
    elif args.policy.startswith("new-t"):
        threads = int(args.policy[len("new-t"):])
    elif args.policy not in POLICIES:
        raise SystemExit(f"unknown policy {args.policy!r}")
    if args.policy == "old":
        # Today's lite_llm sets these two before importing torch; the old policy did nothing more.
        os.environ.setdefault("MKL_DYNAMIC", "FALSE")
        os.environ.setdefault("OMP_DYNAMIC", "FALSE")
        import torch  # before lite_llm: the OpenMP runtime loads with the wait policy unset

        policy = f"threads: {torch.get_num_threads()}, OpenMP default wait"
    from lite_llm.config import ModelConfig
    from lite_llm.data import TokenData
    from lite_llm.model import build_model
    from lite_llm.quickstart import QUICKSTART_PRESET, QUICKSTART_STEPS, QUICKSTART_TRAIN
    from lite_llm.runtime.threads import apply_thread_policy
    from lite_llm.train import TrainConfig, Trainer

    if args.policy != "old":
        policy = apply_thread_policy(threads).describe()
    if args.task == "generate":
        tokens_per_s, outputs = _generate(build_model(ModelConfig.from_preset(QUICKSTART_PRESET), seed=0), args.gen_tokens)
        print(json.dumps({"policy": policy, "threads": _threads(), "tokens_per_s": tokens_per_s, "losses": outputs}), flush=True)
        return
    data = TokenData(args.data)
    cfg = TrainConfig(steps=QUICKSTART_STEPS, seed=0, **QUICKSTART_TRAIN)
    model = build_model(ModelConfig.from_preset(QUICKSTART_PRESET), seed=0)
    trainer = Trainer(model, data, cfg, show_progress=False)
    warm = trainer.train(until=args.warmup)
    start = time.perf_counter()
    timed = trainer.train(until=args.warmup + args.steps)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "policy": policy,
        "threads": _threads(),
        "tokens_per_s": args.steps * cfg.tokens_per_step / seconds,
        "losses": warm.losses + timed.losses,
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")},
    }), flush=True)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _generate(model, new_tokens: int) -> tuple[float, list[int]]:
    """Greedy decoding through the KV cache from a 64-token prompt: new tokens per second of
    the timed call (after an untimed 8-token one), and the ids, which must not depend on the
    wait policy."""
    from lite_llm.generate import generate_ids

    prompt = [(7 * i) % model.config.vocab_size for i in range(64)]
    list(generate_ids(model, prompt, 8))
    start = time.perf_counter()
    ids = list(generate_ids(model, prompt, new_tokens))
    return len(ids) / (time.perf_counter() - start), ids


# ------------------------------------------------------------------------------ driver
def prepare(data_dir: Path, corpus_bytes: int) -> None:
    """The quickstart's tokenizer and data, from capped corpora (tokens/s does not depend on
    how much text there is to sample from)."""
    from lite_llm.data import prepare_data
    from lite_llm.quickstart import QUICKSTART_SOURCES, QUICKSTART_VAL_FRACTION, train_quickstart_tokenizer
    from lite_llm.config import ModelConfig

    vocab = ModelConfig.from_preset("quickstart").vocab_size
    tok = train_quickstart_tokenizer(vocab, max_bytes_per_domain=corpus_bytes)
    prepare_data(QUICKSTART_SOURCES, data_dir, tok, val_fraction=QUICKSTART_VAL_FRACTION, max_bytes_per_domain=corpus_bytes)


def start_competitors(scenario: str, seconds: float) -> list[subprocess.Popen]:
    """Start the scenario's processes and wait until each is running its loop."""
    procs = []
    for code in COMPETITORS[scenario]:
        # plain environment: other jobs do not get our OpenMP defaults
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(seconds)], stdout=subprocess.PIPE, text=True, env=env))
    for p in procs:
        p.stdout.readline()  # 'ready' (or EOF if it died, which the run then shows as no contention)
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def run_worker(policy: str, args: argparse.Namespace, data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else src
    cmd = [
        sys.executable, __file__, "--worker", "--policy", policy, "--task", args.task, "--data", str(data_dir),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--gen-tokens", str(args.gen_tokens),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.competitor_s)
    if out.returncode != 0:
        raise RuntimeError(f"worker {policy} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--task", choices=("train", "generate"), default="train", help="generate: greedy decoding of --gen-tokens tokens instead of training")
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--data", type=Path, default=None, help="a quickstart data folder (default: prepare one from capped corpora)")
    parser.add_argument("--corpus-bytes", type=int, default=2_000_000)
    parser.add_argument("--competitor-s", type=float, default=600.0, help="a competitor (and a training run) ends by itself after this long")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--policies", default=",".join(POLICIES), help="old, new, and extra candidates new-tN, spin:N")
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    scenarios = [s for s in args.scenarios.split(",") if s]
    policies = [p for p in args.policies.split(",") if p]
    if "old" not in policies:
        parser.error("--policies must include old (the reference)")
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")

    with tempfile.TemporaryDirectory(prefix="contention_") as tmp:
        data_dir = args.data
        if data_dir is None and args.task == "train":
            data_dir = Path(tmp) / "data"
            print(f"preparing quickstart data from {args.corpus_bytes:,} bytes of each corpus…", flush=True)
            prepare(data_dir, args.corpus_bytes)
        load_before = os.getloadavg()
        print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)
        runs: dict[tuple[str, str], list[dict]] = {(s, p): [] for s in scenarios for p in policies}
        for r in range(args.rounds):
            for scenario in scenarios:
                k = r % len(policies)
                order = policies[k:] + policies[:k]  # rotated each round
                procs = start_competitors(scenario, args.competitor_s)
                try:
                    for policy in order:
                        result = run_worker(policy, args, data_dir)
                        runs[(scenario, policy)].append(result)
                        print(f"  round {r + 1} {scenario:>10} {policy}: {result['tokens_per_s']:8.0f} tokens/s  ({result['policy']})", flush=True)
                finally:
                    stop(procs)
        load_after = os.getloadavg()
        print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")

    tps = {f"{s}/{p}": statistics.median(x["tokens_per_s"] for x in v) for (s, p), v in runs.items()}
    reference = tps.get("idle/old")
    ratios = {k: (v / reference if reference else None) for k, v in tps.items()}
    own_idle = {f"{s}/{p}": (tps[f"{s}/{p}"] / tps[f"idle/{p}"] if f"idle/{p}" in tps else None) for s in scenarios for p in policies}
    what = f"quickstart training, {args.steps} steps of 16 x 256" if args.task == "train" else f"greedy decoding of {args.gen_tokens} tokens, quickstart model"
    rows = [[s, p, tps[f"{s}/{p}"], ratios[f"{s}/{p}"], own_idle[f"{s}/{p}"]] for s in scenarios for p in policies]
    print_table(["scenario", "policy", "tokens/s", "vs old idle", "vs own idle"], rows, title=what + f", median of {args.rounds}")
    # runs with the same thread count must agree bitwise, whatever the wait policy and the load
    by_threads: dict[int, set[str]] = {}
    for v in runs.values():
        for x in v:
            by_threads.setdefault(x["threads"], set()).add(json.dumps(x["losses"]))
    bitwise = all(len(v) == 1 for v in by_threads.values())
    runs_count = sum(len(v) for v in runs.values())
    outputs = "per-step losses" if args.task == "train" else "generated ids"
    print(f"{outputs} bitwise the same across all {runs_count} runs of the same thread count: {bitwise}")
    met = {s: r >= t for s, t in TARGETS.items() if (r := ratios.get(f"{s}/new")) is not None}
    for s, ok in met.items():
        print(f"target {s}: new >= {TARGETS[s]}x of old idle: {'met' if ok else 'NOT met'} ({ratios[f'{s}/new']:.2f}x)")
    emit_json({
        "benchmark": "contention",
        "task": args.task,
        "cpu": cpu_description(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "steps": args.steps if args.task == "train" else None,
        "gen_tokens": args.gen_tokens if args.task == "generate" else None,
        "rounds": args.rounds,
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "policies": {p: runs[(scenarios[0], p)][0]["policy"] for p in policies},
        "tokens_per_s": tps,
        "vs_old_idle": ratios,
        "vs_own_idle": own_idle,
        "samples": {f"{s}/{p}": [x["tokens_per_s"] for x in v] for (s, p), v in runs.items()},
        "losses_bitwise_same": bitwise,
        "targets_met": met,
    })


if __name__ == "__main__":
    main()
