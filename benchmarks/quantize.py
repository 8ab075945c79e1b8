"""int8 and int4 expert tiers on a trained model: bytes per expert, the change of validation
bits per byte per domain against the unquantized model, and decode tokens/s from disk with
10% of the experts resident.

    python benchmarks/quantize.py --checkpoint RUN/checkpoints/step-00000300 --data RUN/../data
    python benchmarks/quantize.py            # runs a short quickstart-style training first

Every tier of the model is quantized (``lite-llm quantize`` once per tier).  Validation: the
first ``--batches`` windows of each domain's held-out split, as ``lite-llm eval`` reads them.
Decode: greedy, ``--tokens`` tokens after a 16-token prompt, through the expert store with a
hot budget of 10% of the unquantized experts' bytes (the quantized models fit more experts in
the same budget only on disk: hot holds them dequantized), page cache of the expert shards
dropped first; median of ``--rounds``, the candidates interleaved.  Targets: int8 within 0.5%
of the unquantized bits per byte, int4 within 3%, per domain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_description, emit_json, print_table, setup_torch_threads  # noqa: E402
from offload_decode import decode_rate, drop_page_cache, expert_shards  # noqa: E402

TARGETS = {"int8": 0.005, "int4": 0.03}


def quickstart_model(work: Path, steps: int) -> tuple[Path, Path]:
    from lite_llm.quickstart import run_quickstart

    run_quickstart(work / "qs", steps=steps, max_bytes_per_domain=2_000_000)
    ckpt = sorted((work / "qs" / "run" / "checkpoints").iterdir())[-1]
    return ckpt, work / "qs" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--data", type=Path)
    p.add_argument("--steps", type=int, default=150, help="training steps when no --checkpoint is given")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    setup_torch_threads(args.threads)

    from lite_llm.checkpoint import load_checkpoint
    from lite_llm.data import TokenData
    from lite_llm.eval import evaluate
    from lite_llm.grow.quantize import quantize_checkpoint
    from lite_llm.store import load_with_store

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt, data_dir = (args.checkpoint, args.data) if args.checkpoint else quickstart_model(work, args.steps)
        data = TokenData(data_dir)
        tiers = [t.name for t in load_checkpoint(ckpt).config.tiers]
        paths = {"fp32": ckpt}
        for kind in ("int8", "int4"):
            path = ckpt
            for i, tier in enumerate(tiers):
                path = quantize_checkpoint(path, work / f"{kind}-{i}", tier=tier, to=kind)
            paths[kind] = path

        bpb, per_expert = {}, {}
        for kind, path in paths.items():
            model = load_checkpoint(path).model.eval()
            scores = evaluate(model, data, data.domains, batch_size=8, seq_len=args.seq_len, max_batches=args.batches)
            bpb[kind] = {d: s.bpb for d, s in scores.items()}
            manifest = json.loads((path / "manifest.json").read_text())
            experts_bytes = sum(s["bytes"] for s in manifest["shards"] if s["kind"] == "experts")
            n_experts = sum(t.num_experts for t in model.config.tiers) * len(model.config.moe_layer_indices)
            per_expert[kind] = experts_bytes / n_experts

        full = sum(f.stat().st_size for f in expert_shards(ckpt))
        stores = {kind: load_with_store(path, hot_budget=max(int(0.10 * full), 1), warm_budget=0) for kind, path in paths.items()}
        rates: dict[str, list[float]] = {k: [] for k in paths}
        for r in range(args.rounds):
            order = list(paths)[r % 3:] + list(paths)[: r % 3]
            for kind in order:
                drop_page_cache(expert_shards(paths[kind]))
                rate, _ = decode_rate(stores[kind].model, args.tokens)
                rates[kind].append(rate)
        speed = {k: statistics.median(v) for k, v in rates.items()}

    change = {k: {d: bpb[k][d] / bpb["fp32"][d] - 1 for d in bpb["fp32"]} for k in ("int8", "int4")}
    rows = [[k, f"{per_expert[k]:,.0f}", *(f"{bpb[k][d]:.4f}" for d in bpb["fp32"]),
             *(f"{change[k][d]:+.3%}" if k != "fp32" else "-" for d in bpb["fp32"]), speed[k]] for k in paths]
    print_table(["tiers", "bytes / expert", *(f"{d} bpb" for d in bpb["fp32"]), *(f"{d} change" for d in bpb["fp32"]), "decode tok/s @10%"], rows,
                title=f"quantized expert tiers, {args.batches} validation batches per domain")
    met = {f"{k}_within_{TARGETS[k]:.1%}": all(abs(v) <= TARGETS[k] for v in change[k].values()) for k in TARGETS}
    for k, v in met.items():
        print(f"target {k}: {'met' if v else 'NOT met'} (worst {max(abs(x) for x in change[k.split('_')[0]].values()):.3%})")
    emit_json({"benchmark": "quantize", "cpu": cpu_description(), "bytes_per_expert": per_expert, "bpb": bpb, "bpb_change": change,
               "decode_tokens_per_s_at_10%": speed, "targets_met": met})


if __name__ == "__main__":
    main()
