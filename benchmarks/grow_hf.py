"""One-pass growth of a Hugging Face folder against mergekit's passthrough (issue 16, point 3).

    python benchmarks/grow_hf.py --mergekit /path/to/mergekit-yaml          # ~1.6 GB bf16 Llama, 16 -> 24
    python benchmarks/grow_hf.py --layers 4 --d-model 512 --repeats 1        # a quick small run

Source: a Llama folder of random bf16 weights (``transformers`` config.json + safetensors,
hidden 2048, FFN 5632, vocab 32000, 16 layers: 1.6 GB by default).  Growth: SOLAR depth
up-scaling to 24 layers — blocks ``[0, 12)`` then ``[4, 16)`` — written as a transformers
folder.  Candidates, interleaved over ``--repeats``, each in a fresh subprocess (its peak RSS,
VmHWM, is its own):

* ``ours``: ``lite-llm expand SRC --method solar --target-layers 24 --format hf`` with the
  default streamed check (a depth step not meant to be exact, as SOLAR is, is measured in float32;
  the loss jump recorded);
* ``ours-novalidate``: the same with ``--validate never``;
* ``mergekit``: ``mergekit-yaml`` passthrough with the same two slices (when installed);
* ``mergekit+fsync``: the same, timed until its output files are fsynced.  ``lite-llm``
  fsyncs what it writes before it renames the folder into place (a crash never leaves a
  half-written model); mergekit returns with its 2.4 GB still in the page cache, so this is
  the like-for-like reference.

The page cache is flushed (``sync``, untimed) before every run, so no candidate pays for the
previous one's writeback.  The reference is mergekit's time: the figure is mergekit / ours
(target >= 2), against both mergekit candidates.  Peak RSS is
reported over the output's size (target <= 0.25).  Every output tensor of ours is compared
with mergekit's, bitwise.  Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_description, emit_json, print_table, ratio, rounded  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WRAPPER = """import json, os, resource, subprocess, sys, time
fsync_dir = os.environ.pop("GROW_HF_FSYNC_AFTER", "")
t = time.perf_counter(); rc = subprocess.call(sys.argv[1:])
for root, _, files in os.walk(fsync_dir) if fsync_dir and rc == 0 else ():
    for name in files:
        fd = os.open(os.path.join(root, name), os.O_RDONLY); os.fsync(fd); os.close(fd)
s = time.perf_counter() - t
print(json.dumps({"rc": rc, "seconds": s, "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"""


def _make_source(path: Path, args: argparse.Namespace) -> None:
    """A Llama folder of random bf16 weights, written one tensor at a time."""
    import torch
    from safetensors.torch import save_file

    d, f, v, n = args.d_model, args.ffn, 32000, args.layers
    heads, kv = d // 64, max(1, d // 256)
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shards: dict[str, dict[str, torch.Tensor]] = {"model-00001.safetensors": {"model.embed_tokens.weight": rand(v, d)}}
    for i in range(n):
        p = f"model.layers.{i}."
        shards[f"model-layer{i:03d}.safetensors"] = {
            p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.k_proj.weight": rand(kv * 64, d),
            p + "self_attn.v_proj.weight": rand(kv * 64, d), p + "self_attn.o_proj.weight": rand(d, d),
            p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d), p + "mlp.down_proj.weight": rand(d, f),
        }
    shards["model-final.safetensors"] = {"model.norm.weight": torch.ones(d, dtype=torch.bfloat16), "lm_head.weight": rand(v, d)}
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d, "intermediate_size": f,
        "num_hidden_layers": n, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": v,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))


def _timed(cmd: list[str], out: Path, env: dict[str, str], fsync_after: bool = False) -> dict:
    """Wall time and peak RSS of ``cmd`` in a fresh process; with ``fsync_after`` the time also
    covers fsyncing every file it wrote (what ``lite-llm`` does before it returns).  The page
    cache is flushed first, untimed, so no candidate pays for the previous one's writeback."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    env = {**env, "GROW_HF_FSYNC_AFTER": str(out) if fsync_after else ""}
    done = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, env=env)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"{cmd[0]} failed: {done.stdout[-2000:]}")
    result["out_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return result


def _same_tensors(a: Path, b: Path) -> tuple[bool, int]:
    """Whether two folders hold the same tensors (names, dtypes, values), and how many."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        found = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as f:
                found.update({k: shard for k in f.keys()})
        return found

    ia, ib = index(a), index(b)
    if sorted(ia) != sorted(ib):
        return False, len(ia)
    for name in ia:
        with safe_open(str(ia[name]), "pt") as fa, safe_open(str(ib[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape or not bool((x.reshape(-1).view(torch.uint8) == y.reshape(-1).view(torch.uint8)).all()):
                return False, len(ia)
    return True, len(ia)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--target-layers", type=int, default=24)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="mergekit-yaml executable (default: from PATH).")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="grow_hf_"))
    src = work / "src"
    if not src.exists():
        _make_source(src, args)
    src_bytes = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    drop = args.layers - args.target_layers // 2
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    lite = [sys.executable, "-c", "from lite_llm.cli import main; main()", "expand", str(src), "--method", "solar", "--target-layers", str(args.target_layers), "--format", "hf", "-o"]
    candidates: dict[str, list[str]] = {"ours": [*lite, str(work / "ours")], "ours-novalidate": [*lite, str(work / "ours-novalidate"), "--validate", "never"]}
    if args.mergekit:
        recipe = work / "mergekit.yaml"
        recipe.write_text(
            "merge_method: passthrough\ndtype: bfloat16\nslices:\n"
            f"  - sources: [{{model: {src}, layer_range: [0, {args.layers - drop}]}}]\n"
            f"  - sources: [{{model: {src}, layer_range: [{drop}, {args.layers}]}}]\n"
        )
        candidates["mergekit"] = [args.mergekit, str(recipe), str(work / "mergekit"), "--copy-tokenizer", "--lazy-unpickle", "--out-shard-size", "5B"]
        candidates["mergekit+fsync"] = candidates["mergekit"]
    runs: dict[str, list[dict]] = {k: [] for k in candidates}
    for _ in range(args.repeats):
        for name, cmd in candidates.items():
            out = Path(cmd[cmd.index("-o") + 1]) if "-o" in cmd else work / "mergekit"
            runs[name].append(_timed(cmd, out, env, fsync_after=name == "mergekit+fsync"))
            if name == "ours-novalidate":
                shutil.rmtree(out, ignore_errors=True)
    best = {k: min(r["seconds"] for r in v) for k, v in runs.items()}
    peak = {k: max(r["peak_kib"] for r in v) * 1024 for k, v in runs.items()}
    out_bytes = runs["ours"][0]["out_bytes"]
    equal, count = _same_tensors(work / "ours", work / "mergekit") if args.mergekit else (None, 0)
    rows = [[k, f"{best[k]:.2f}", f"{peak[k] / 1e6:.0f}", f"{peak[k] / out_bytes:.3f}", f"{ratio(best.get('mergekit'), best[k]) or 0:.2f}",
             f"{ratio(best.get('mergekit+fsync'), best[k]) or 0:.2f}"] for k in runs]
    print_table(["candidate", "best s", "peak RSS MB", "peak / output", "mergekit / this", "mergekit+fsync / this"], rows,
                title=f"SOLAR {args.layers} -> {args.target_layers}, source {src_bytes / 1e9:.2f} GB, output {out_bytes / 1e9:.2f} GB ({cpu_description()})")
    if equal is not None:
        print(f"outputs bitwise equal to mergekit's: {equal} ({count} tensors)")
    emit_json({
        "benchmark": "grow_hf", "cpu": cpu_description(), "source_bytes": src_bytes, "output_bytes": out_bytes, "repeats": args.repeats,
        "seconds": rounded(best), "peak_rss_bytes": peak, "speedup_vs_mergekit": rounded(ratio(best.get("mergekit"), best["ours"])),
        "speedup_vs_mergekit_novalidate": rounded(ratio(best.get("mergekit"), best["ours-novalidate"])),
        "speedup_vs_mergekit_fsync": rounded(ratio(best.get("mergekit+fsync"), best["ours"])),
        "speedup_vs_mergekit_fsync_novalidate": rounded(ratio(best.get("mergekit+fsync"), best["ours-novalidate"])),
        "peak_over_output": rounded(peak["ours"] / out_bytes), "bitwise_equal_to_mergekit": equal,
    })
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
