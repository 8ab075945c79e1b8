"""Decode speed with the experts on disk: the expert store at 10%, 25% and 100% of the experts
resident, against the same model all in memory, and against transformers + accelerate's disk
offload under the same memory budget; and peak memory of a model whose experts are several
times the budget.

    python benchmarks/offload_decode.py [--layers 8 --experts 32 --hidden 512] [--tokens 32]
    python benchmarks/offload_decode.py --rss-check --experts 64 --hidden 1024 --budget-share 0.2

The model (random weights, seeded): Mixtral-shaped so that transformers can run it — one tier
of one group of ``--experts`` experts in every layer, 2 active per token.  Its experts are
``layers x experts x 3 x d x hidden x 4`` bytes in fp32 (0.8 GB at the defaults).

Decode: greedy, ``--tokens`` new tokens after a 16-token prompt, tokens/s of the tokens after
the first (the prompt's prefill excluded), for each candidate in turn, ``--warmup`` untimed
rounds (default 1: a store's first run fills its hot level from disk, which at 100% would
otherwise be half of a two-round median) then ``--rounds`` timed rounds with the order rotated,
median reported.  Before every store run the page cache of the expert
shards is dropped (``posix_fadvise(POSIX_FADV_DONTNEED)``), so misses read the disk (or
whatever the machine's storage is; a VM's virtual disk may itself be cached by the host —
the bytes read per token are reported so the figure can be judged).  Store runs: hot budget
= share x expert bytes, warm 0, policy ``layer-cycle``.  Random weights route close to
uniformly, the worst case for any cache; a trained model's routes repeat more (``--bias-std``
skews them, without the accelerate comparison).

accelerate: the model exported with ``lite-llm export --format hf`` and loaded by
``AutoModelForCausalLM.from_pretrained(device_map="auto", max_memory={"cpu": dense + share x
experts}, offload_folder=...)``; greedy ``generate`` of the same tokens.  Skipped with
``--no-accelerate``.  Targets: store >= 0.8x all-resident at 25%, >= 0.5x at 10%; store >= 5x
accelerate's tokens/s.

``--rss-check``: in a fresh process, load with the store at ``--budget-share`` of the expert
bytes and generate; VmHWM (peak resident memory) against budget + dense weights + the
process's baseline (torch imported, nothing loaded).
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
from _common import cpu_description, emit_json, print_table, setup_torch_threads  # noqa: E402

SHARES = (0.10, 0.25, 1.00)
PROMPT = list(range(100, 116))
TARGETS = {0.25: 0.8, 0.10: 0.5}
TARGET_VS_ACCELERATE = 5.0


def model_config(args):
    from lite_llm.config import ModelConfig, RoutingConfig, TierConfig

    return ModelConfig(
        name="offload-bench", vocab_size=4096, d_model=args.d_model, n_layers=args.layers, n_heads=8, n_kv_heads=4,
        intermediate_size=4 * args.d_model, max_seq_len=512,
        tiers=[TierConfig("tier_1b", num_groups=1, experts_per_group=args.experts, expert_hidden=args.hidden, placement="cold")],
        routing=RoutingConfig(k_tier=1, k_group=1, k_expert=2),
    )


def build_checkpoint(work: Path, args) -> Path:
    import torch

    from lite_llm.checkpoint import save_checkpoint
    from lite_llm.model import build_model

    path = work / "ckpt"
    model = build_model(model_config(args), seed=0)
    with torch.no_grad():  # optionally a router that prefers some experts, as trained ones do
        for block in model.layers if args.bias_std else []:
            head = block.ffn.router.heads["tier_1b"]
            head.expert_bias.copy_(torch.randn(head.expert_bias.shape, generator=torch.Generator().manual_seed(block.layer)) * args.bias_std)
    save_checkpoint(path, model)
    return path


def expert_shards(ckpt: Path) -> list[Path]:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    return [ckpt / s["path"] for s in manifest["shards"] if s["kind"] == "experts"]


def drop_page_cache(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def decode_rate(model, tokens: int) -> tuple[float, list[int]]:
    from lite_llm.generate import generate_ids

    out, start = [], None
    for token in generate_ids(model, PROMPT, tokens):
        out.append(token)
        if start is None:
            start = time.perf_counter()
    return (len(out) - 1) / (time.perf_counter() - start), out


def accelerate_rate(hf_dir: Path, budget: int, tokens: int, work: Path) -> tuple[float, list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, device_map="auto", max_memory={"cpu": budget}, offload_folder=str(work / "offload"), torch_dtype=torch.float32
    )
    ids = torch.tensor([PROMPT])
    stamps: list[float] = []

    class Clock:  # a streamer: the time each new token arrives
        def put(self, value):
            stamps.append(time.perf_counter())

        def end(self):
            pass

    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, streamer=Clock(), pad_token_id=0)
    new = out[0, len(PROMPT):].tolist()
    # stamps[0] is the prompt, stamps[1] the first new token
    return (len(new) - 1) / (stamps[-1] - stamps[1]), new


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_child(args) -> None:
    """In a fresh process: baseline, load with the store, generate; print the figures."""
    import torch  # noqa: F401  the baseline includes torch

    from lite_llm.store import load_with_store

    base = vm_hwm()
    stored = load_with_store(args.ckpt, hot_budget=args.hot, warm_budget=0)
    rate, out = decode_rate(stored.model, args.tokens)
    dense = sum(p.numel() * p.element_size() for p in stored.model.parameters())
    print(json.dumps({"baseline": base, "peak": vm_hwm(), "dense_bytes": dense, "tokens_per_s": rate, "ids": out,
                      "cold_bytes": stored.store.stats().cold_bytes}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--bias-std", type=float, default=0.0,
                   help="spread of the router's expert biases, for routes that prefer some experts (not exportable: implies --no-accelerate)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (the stores' hot levels fill)")
    p.add_argument("--no-accelerate", action="store_true")
    p.add_argument("--rss-check", action="store_true", help="peak memory of a store run at --budget-share (see the docstring)")
    p.add_argument("--budget-share", type=float, default=0.25)
    p.add_argument("--workdir", type=Path, default=None, help="keep the checkpoints here (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--hot", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bias_std:
        args.no_accelerate = True  # Mixtral's router has no expert bias
    setup_torch_threads(args.threads)
    if args.child:
        rss_child(args)
        return

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "ckpt" if (work / "ckpt" / "manifest.json").exists() else build_checkpoint(work, args)
    shards = expert_shards(ckpt)
    expert_bytes = sum(f.stat().st_size for f in shards)
    print(f"model: {args.layers} layers x {args.experts} experts of hidden {args.hidden}, experts {expert_bytes / 1e9:.2f} GB on disk", flush=True)

    if args.rss_check:
        hot = int(args.budget_share * expert_bytes)
        drop_page_cache(shards)
        child = subprocess.run([sys.executable, __file__, "--child", "--ckpt", str(ckpt), "--hot", str(hot), "--tokens", str(args.tokens)],
                               capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
        r = json.loads(child.stdout.strip().splitlines()[-1])
        allowed = r["baseline"] + r["dense_bytes"] + hot
        print(f"experts {expert_bytes / 1e9:.2f} GB = {expert_bytes / hot:.1f}x the hot budget of {hot / 1e9:.2f} GB; "
              f"peak RSS {r['peak'] / 1e9:.2f} GB vs baseline {r['baseline'] / 1e9:.2f} + dense {r['dense_bytes'] / 1e9:.2f} + budget "
              f"{hot / 1e9:.2f} = {allowed / 1e9:.2f} GB; {r['tokens_per_s']:.2f} tokens/s")
        emit_json({"benchmark": "offload_decode_rss", "cpu": cpu_description(), "expert_bytes": expert_bytes, "hot_budget": hot,
                   "experts_over_budget": expert_bytes / hot, **{k: r[k] for k in ("baseline", "peak", "dense_bytes", "tokens_per_s", "cold_bytes")},
                   "peak_within_budget": r["peak"] <= allowed})
        return

    from lite_llm.checkpoint import load_checkpoint
    from lite_llm.store import load_with_store

    resident = load_checkpoint(ckpt).model.eval()
    stores = {share: load_with_store(ckpt, hot_budget=int(share * expert_bytes), warm_budget=0) for share in SHARES}
    candidates = ["resident", *(f"store {int(s * 100)}%" for s in SHARES)]
    hf_dir = None
    if not args.no_accelerate:
        from lite_llm.interop.hf_export import export_hf

        hf_dir = work / "hf"
        if not (hf_dir / "config.json").exists():
            export_hf(ckpt, hf_dir)
        candidates += [f"accelerate {int(s * 100)}%" for s in SHARES[:2]]
    dense_bytes = sum(p.numel() * p.element_size() for p in stores[SHARES[0]].model.parameters())

    rates: dict[str, list[float]] = {c: [] for c in candidates}
    fetched: dict[str, float] = {}
    reference = None
    for r in range(args.warmup + args.rounds):
        order = candidates[r % len(candidates):] + candidates[: r % len(candidates)]
        for name in order:
            if name == "resident":
                rate, ids = decode_rate(resident, args.tokens)
            elif name.startswith("store"):
                share = int(name.split()[1][:-1]) / 100
                stored = stores[share]
                drop_page_cache(shards)
                before = stored.store.stats().cold_bytes
                rate, ids = decode_rate(stored.model, args.tokens)
                fetched[name] = (stored.store.stats().cold_bytes - before) / args.tokens
            else:
                share = int(name.split()[1][:-1]) / 100
                drop_page_cache([*hf_dir.glob("*.safetensors")])
                rate, ids = accelerate_rate(hf_dir, int(dense_bytes + share * expert_bytes), args.tokens, work)
            reference = ids if reference is None and name == "resident" else reference
            if name.startswith("store") and reference is not None and ids != reference:
                raise SystemExit(f"{name} generated other tokens than the resident model: {ids} vs {reference}")
            if r >= args.warmup:
                rates[name].append(rate)
            label = f"round {r + 1 - args.warmup}" if r >= args.warmup else f"warm-up {r + 1}"
            print(f"  {label} {name:>16}: {rate:8.2f} tokens/s" + (f", {fetched[name] / 1e6:.1f} MB read per token" if name in fetched else ""), flush=True)

    med = {c: statistics.median(v) for c, v in rates.items()}
    rows = [[c, med[c], med[c] / med["resident"], fetched.get(c, 0.0) / 1e6] for c in candidates]
    print_table(["candidate", "tokens/s", "vs resident", "MB read per token"], rows, title=f"greedy decode, {args.tokens} tokens, median of {args.rounds} after {args.warmup} warm-up round(s)")
    figures = {"vs_resident": {c: med[c] / med["resident"] for c in candidates}}
    met = {f"store_{int(s * 100)}%>={t}": figures["vs_resident"][f"store {int(s * 100)}%"] >= t for s, t in TARGETS.items()}
    if hf_dir is not None:
        for s in SHARES[:2]:
            ratio = med[f"store {int(s * 100)}%"] / med[f"accelerate {int(s * 100)}%"]
            figures[f"store_vs_accelerate_{int(s * 100)}%"] = ratio
            met[f"store_vs_accelerate_{int(s * 100)}%>={TARGET_VS_ACCELERATE}"] = ratio >= TARGET_VS_ACCELERATE
    for k, v in met.items():
        print(f"target {k}: {'met' if v else 'NOT met'}")
    emit_json({"benchmark": "offload_decode", "cpu": cpu_description(), "expert_bytes": expert_bytes, "tokens_per_s": med,
               "bytes_read_per_token": fetched, **figures, "targets_met": met})
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
