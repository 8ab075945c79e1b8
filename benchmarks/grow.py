"""Streaming growth of a >= 1 GB checkpoint: wall time against copying its files, peak
memory against the size of the output, and what the default validation adds to both.

    python benchmarks/grow.py                       # ~1.7 GB bf16 Llama-shaped source, 16 -> 24 layers
    python benchmarks/grow.py --layers 9 --target-layers 14   # the issue-4 figures (~1.1 GB)
    python benchmarks/grow.py --layers 4 --d-model 1024 --no-smollm2   # a quick small run

Each measurement runs in a fresh subprocess so its peak RSS (VmHWM) is its own:

* ``copy``: copy the checkpoint's files and fsync them (our writes are durable too), and
  ``copy-nofsync``: the same without fsync (what ``cp`` alone measures);
* ``grow``: ``expand_checkpoint(..., validate="never")``, LLaMA-Pro depth growth, with the
  source's sha256 verified first (the default) and without (``--no-verify`` figure);
* ``grow-validate``: the same growth with the default validation (``validate="auto"``: for
  LLaMA-Pro the proof that the grown model is the original by construction plus the gradient
  check; for other methods the streamed float64 check of
  :mod:`lite_llm.grow.streaming_validate` on 128 sample tokens), ``grow-validate-sample``: the
  float64 sample evaluated whatever the method (``validate="always"``), and
  ``grow-validate-256`` the same with 256 sample tokens;
* the same ``grow`` / ``grow-validate`` / ``grow-validate-sample`` runs on SmolLM2-135M-Instruct imported from its GGUF
  (``--smollm2 FILE``, default ``models/SmolLM2-135M-Instruct.Q4_1.gguf`` when present), grown by
  ``--smollm2-steps`` (default: llama_pro to 40 layers, and width to d_model 1152);
* ``mergekit`` (when the ``mergekit-yaml`` command is installed): the same depth growth as a
  passthrough merge of the exported Llama folder.

Targets: growth time / copy time <= 2.0; peak RSS minus the interpreter's baseline (after
importing torch and lite_llm) <= 25% of the output size (issue 4); validation adds <= 25% to
the growth's time and keeps the peak within 25% of the output size (issue 16).  Ends with one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_json, print_table, ratio, rounded  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _child(args: argparse.Namespace) -> None:
    """Run one measurement in this (fresh) process and print a JSON line."""
    import torch  # noqa: F401  - part of the baseline

    from lite_llm.grow.expand import expand_checkpoint
    from lite_llm.grow.recipe import GrowthStep
    from lite_llm.grow.validate import SAMPLE_TOKENS

    baseline = _hwm_kib()
    start = time.perf_counter()
    step = GrowthStep(**json.loads(args.step))
    if args.child in ("copy", "copy-nofsync"):
        dst = Path(args.out)
        dst.mkdir(parents=True)
        for p in sorted(Path(args.src).rglob("*")):
            if p.is_file():
                target = dst / p.relative_to(args.src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, target)
                if args.child == "copy":
                    fd = os.open(target, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
    else:
        validate = {"grow": "never", "grow-noverify": "never", "grow-validate": "auto"}.get(args.child, "always")
        tokens = 256 if args.child == "grow-validate-256" else SAMPLE_TOKENS
        verify = args.child != "grow-noverify"
        expand_checkpoint(args.src, args.out, [step], validate=validate, check_tokens=tokens, verify=verify, max_shard_bytes=args.shard_bytes)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "baseline_kib": baseline, "peak_kib": _hwm_kib()}))


def _run_child(kind: str, src: Path, out: Path, args: argparse.Namespace, step: dict | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    step = step or {"method": "llama_pro", "params": {"target_layers": args.target_layers}}
    cmd = [sys.executable, __file__, "--child", kind, "--src", str(src), "--out", str(out), "--step", json.dumps(step), "--shard-bytes", str(args.shard_bytes)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["out_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return result


def _validation_figures(runs: dict[str, list[dict]], kinds: list[str]) -> dict[str, dict]:
    """Per validated kind: best time, its addition to the best unvalidated growth, and peak
    RSS above baseline over the output size (worst of the repeats)."""
    grow = min(r["seconds"] for r in runs["grow"])
    out = {}
    for kind in kinds:
        best = min(r["seconds"] for r in runs[kind])
        peak = max(r["peak_kib"] - r["baseline_kib"] for r in runs[kind]) * 1024
        out[kind] = {"seconds": best, "added": best / grow - 1, "peak_bytes": peak, "peak_over_output": peak / runs[kind][0]["out_bytes"]}
    return out


def _smollm2(gguf: Path, work: Path, args: argparse.Namespace) -> list[dict]:
    """Growth with and without validation on the imported SmolLM2, for each of ``--smollm2-steps``."""
    from lite_llm.interop import import_gguf

    src = import_gguf(gguf, work / "smollm2")
    results = []
    for spec in args.smollm2_steps:
        method, _, rest = spec.partition(":")
        params = json.loads(rest) if rest else {}
        step = {"method": method, "params": params}
        runs: dict[str, list[dict]] = {"grow": [], "grow-validate": [], "grow-validate-sample": []}
        for _ in range(args.repeats):
            for kind in runs:
                runs[kind].append(_run_child(kind, src, work / f"smol-{kind}", args, step))
        figures = _validation_figures(runs, ["grow-validate", "grow-validate-sample"])
        peak_grow = max(r["peak_kib"] - r["baseline_kib"] for r in runs["grow"]) * 1024
        results.append({"step": spec, "grow_s": min(r["seconds"] for r in runs["grow"]), "grow_peak_bytes": peak_grow, "out_bytes": runs["grow"][0]["out_bytes"],
                        **figures["grow-validate"], "sample": figures["grow-validate-sample"]})
        for kind in runs:
            shutil.rmtree(work / f"smol-{kind}", ignore_errors=True)
    return results


def _make_source(path: Path, args: argparse.Namespace) -> tuple[int, object]:
    """A Llama-shaped bf16 checkpoint of random weights, written one tensor at a time."""
    import torch

    from lite_llm.checkpoint.save import write_checkpoint
    from lite_llm.config import ModelConfig
    from lite_llm.grow.tensors import LazyTensors, expected_specs

    config = ModelConfig(
        vocab_size=32000, d_model=args.d_model, n_layers=args.layers, n_heads=args.d_model // 64, n_kv_heads=args.d_model // 256,
        intermediate_size=int(args.d_model * 2.75), max_seq_len=2048, name="grow-bench",
    )
    specs = expected_specs(config, torch.bfloat16)

    def make(name: str, i: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(i)
        spec = specs[name]
        if name.endswith("norm.weight"):
            return torch.ones(spec.shape, dtype=torch.bfloat16)
        return (torch.randn(spec.shape, generator=gen) * 0.02).to(torch.bfloat16)

    tensors = LazyTensors({name: (lambda n=name, i=i: make(n, i)) for i, name in enumerate(specs)})
    write_checkpoint(path, config, tensors, specs=specs, max_shard_bytes=args.shard_bytes)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()), config


def _mergekit(src: Path, work: Path, args: argparse.Namespace) -> dict | None:
    """Time mergekit's passthrough merge of the same growth, when mergekit is installed."""
    exe = args.mergekit
    if not exe:
        return None
    from lite_llm.interop import export_hf

    hf = export_hf(src, work / "hf-src")
    n, m = args.layers, args.target_layers
    slices = []
    # LLaMA-Pro as passthrough slices (mergekit cannot zero o_proj/down_proj in a slice, so
    # this is the same tensor traffic: every layer once, the copied ones twice).
    from lite_llm.grow.depth import uniform_positions

    positions = uniform_positions(n, m - n)
    start = 0
    for p in positions:
        slices.append({"sources": [{"model": str(hf), "layer_range": [start, p + 1]}]})
        slices.append({"sources": [{"model": str(hf), "layer_range": [p, p + 1]}]})
        start = p + 1
    if start < n:
        slices.append({"sources": [{"model": str(hf), "layer_range": [start, n]}]})
    cfg = work / "mergekit.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({"slices": slices, "merge_method": "passthrough", "dtype": "bfloat16"}))
    out = work / "mk-out"
    start_t = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", exe, str(cfg), str(out), "--lazy-unpickle"], capture_output=True, text=True)
    seconds = time.perf_counter() - start_t
    peak = next((int(l.split()[-1]) for l in done.stderr.splitlines() if "Maximum resident" in l), 0)
    return {"seconds": seconds, "peak_kib": peak, "ok": done.returncode == 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--target-layers", type=int, default=24)
    parser.add_argument("--shard-bytes", type=int, default=512 * 1024**2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="Where the checkpoints go (default: a temp dir).")
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="mergekit-yaml executable (default: from PATH).")
    parser.add_argument("--smollm2", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf", help="SmolLM2 GGUF for the real-model validation figures.")
    parser.add_argument("--no-smollm2", action="store_true", help="Skip the SmolLM2 figures.")
    parser.add_argument(
        "--smollm2-steps", nargs="+", default=['llama_pro:{"target_layers": 40}', 'width:{"d_model": 1152}'], help="METHOD:JSON_PARAMS growths of SmolLM2."
    )
    parser.add_argument("--child", choices=["copy", "copy-nofsync", "grow", "grow-noverify", "grow-validate", "grow-validate-sample", "grow-validate-256"], help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--step", default='{"method": "llama_pro", "params": {"target_layers": 14}}', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    work = Path(tempfile.mkdtemp(prefix="grow-bench-", dir=args.workdir))
    try:
        src = work / "src"
        t0 = time.perf_counter()
        src_bytes, config = _make_source(src, args)
        print(f"source: {src_bytes / 1e9:.2f} GB, {config.n_layers} layers, d_model {config.d_model} (made in {time.perf_counter() - t0:.1f} s)")
        kinds = ["copy", "copy-nofsync", "grow", "grow-noverify", "grow-validate", "grow-validate-sample", "grow-validate-256"]
        runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
            for kind in runs:
                runs[kind].append(_run_child(kind, src, work / f"out-{kind}", args))
        out_bytes = sum(p.stat().st_size for p in (work / "out-grow").rglob("*") if p.is_file())
        best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
        peak = {k: max(r["peak_kib"] - r["baseline_kib"] for r in v) * 1024 for k, v in runs.items()}
        mk = _mergekit(src, work, args)
        rows = [
            [k, f"{best[k]['seconds']:.2f}", f"{ratio(best[k]['seconds'], best['copy']['seconds']):.2f}", f"{peak[k] / 1e6:.0f}", f"{peak[k] / out_bytes:.1%}"]
            for k in runs
        ]
        if mk:
            rows.append(["mergekit passthrough", f"{mk['seconds']:.2f}", f"{ratio(mk['seconds'], best['copy']['seconds']):.2f}", f"{mk['peak_kib'] * 1024 / 1e6:.0f} (total)", "-"])
        print_table(["run", "seconds", "/ copy", "peak RSS - baseline (MB)", "/ output size"], rows, title=f"growth {config.n_layers} -> {args.target_layers} layers, output {out_bytes / 1e9:.2f} GB")
        if mk is None:
            print("mergekit: not installed (pip install mergekit to compare)")
        validation = _validation_figures(runs, ["grow-validate", "grow-validate-sample", "grow-validate-256"])
        print_table(
            ["run", "seconds", "added to grow", "peak RSS - baseline (MB)", "/ output size"],
            [[k, f"{v['seconds']:.2f}", f"{v['added']:+.0%}", f"{v['peak_bytes'] / 1e6:.0f}", f"{v['peak_over_output']:.1%}"] for k, v in validation.items()],
            title="validation: default (proof for llama_pro), and the float64 sample (targets: adds <= 25%, peak <= 25% of the output)",
        )
        smol = [] if args.no_smollm2 or not args.smollm2.exists() else _smollm2(args.smollm2, work, args)
        if smol:
            print_table(
                ["SmolLM2-135M growth", "output (GB)", "grow (s)", "default validate (s)", "added", "peak RSS grow / validated (MB)", "validated peak / output",
                 "sample (s)", "added", "sample peak / output"],
                [[r["step"], f"{r['out_bytes'] / 1e9:.2f}", f"{r['grow_s']:.2f}", f"{r['seconds']:.2f}", f"{r['added']:+.0%}", f"{r['grow_peak_bytes'] / 1e6:.0f} / {r['peak_bytes'] / 1e6:.0f}", f"{r['peak_over_output']:.1%}",
                  f"{r['sample']['seconds']:.2f}", f"{r['sample']['added']:+.0%}", f"{r['sample']['peak_over_output']:.1%}"] for r in smol],
                title="validation on the real model",
            )
        emit_json(
            {
                "benchmark": "grow",
                "source_gb": rounded(src_bytes / 1e9, 3),
                "output_gb": rounded(out_bytes / 1e9, 3),
                "copy_s": rounded(best["copy"]["seconds"], 3),
                "grow_s": rounded(best["grow"]["seconds"], 3),
                "grow_noverify_s": rounded(best["grow-noverify"]["seconds"], 3),
                "grow_over_copy": rounded(ratio(best["grow"]["seconds"], best["copy"]["seconds"]), 3),
                "grow_noverify_over_copy": rounded(ratio(best["grow-noverify"]["seconds"], best["copy"]["seconds"]), 3),
                "copy_nofsync_s": rounded(best["copy-nofsync"]["seconds"], 3),
                "grow_over_copy_nofsync": rounded(ratio(best["grow"]["seconds"], best["copy-nofsync"]["seconds"]), 3),
                "peak_rss_over_output": rounded(peak["grow"] / out_bytes, 4),
                "peak_rss_mb": rounded(peak["grow"] / 1e6, 1),
                "baseline_mb": rounded(runs["grow"][0]["baseline_kib"] * 1024 / 1e6, 1),
                "mergekit_s": rounded(mk["seconds"], 3) if mk else None,
                "mergekit_over_copy": rounded(ratio(mk["seconds"], best["copy"]["seconds"]), 3) if mk else None,
                "mergekit_peak_mb": rounded(mk["peak_kib"] * 1024 / 1e6, 1) if mk else None,
                "validate_s": rounded(validation["grow-validate"]["seconds"], 3),
                "validate_added": rounded(validation["grow-validate"]["added"], 3),
                "validate_peak_over_output": rounded(validation["grow-validate"]["peak_over_output"], 4),
                "validate_sample_added": rounded(validation["grow-validate-sample"]["added"], 3),
                "validate_sample_peak_over_output": rounded(validation["grow-validate-sample"]["peak_over_output"], 4),
                "validate256_added": rounded(validation["grow-validate-256"]["added"], 3),
                "validate256_peak_over_output": rounded(validation["grow-validate-256"]["peak_over_output"], 4),
                "smollm2": [
                    {"step": r["step"], "grow_s": rounded(r["grow_s"], 3), "validate_s": rounded(r["seconds"], 3), "validate_added": rounded(r["added"], 3),
                     "validate_peak_over_output": rounded(r["peak_over_output"], 4), "output_gb": rounded(r["out_bytes"] / 1e9, 3),
                     "sample_s": rounded(r["sample"]["seconds"], 3), "sample_added": rounded(r["sample"]["added"], 3), "sample_peak_over_output": rounded(r["sample"]["peak_over_output"], 4)}
                    for r in smol
                ],
            }
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
