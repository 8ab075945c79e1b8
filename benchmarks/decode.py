"""Decode speed on the real model: `lite-llm generate`'s loop against transformers' `generate`,
in float32 and bfloat16, on SmolLM2-135M-Instruct.

    python benchmarks/decode.py [--gguf models/SmolLM2-135M-Instruct.Q4_1.gguf] [--tokens 64] [--repeats 5]

The GGUF is imported (``lite-llm import``) and exported (``lite-llm export``) into ``--workdir``,
so both libraries hold the same weights; transformers loads the export with ``torch_dtype``.
Each candidate decodes ``--tokens`` tokens greedily after the same 64-token prompt (the
prompt's prefill included, the same for all), ``min_new_tokens`` = ``max_new_tokens`` so that
no candidate stops early; candidates interleaved, rotated per repeat, median reported.  The
reference is ours in float32: every figure is a ratio against it, measured in the same process.
Greedy tokens are compared between the libraries in each dtype (float32 must agree exactly;
bfloat16 rounds differently in each library's kernels, so only the share agreeing is shown).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_description, emit_json, measure_interleaved, print_table, reexec_with_thp, setup_torch_threads  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _prepare(gguf: Path, workdir: Path) -> tuple[Path, Path]:
    """The imported checkpoint and its transformers export, made once per work folder."""
    ckpt, hf = workdir / "smollm2", workdir / "smollm2-hf"
    cli = [sys.executable, "-m", "lite_llm.cli"]
    if not ckpt.exists():
        subprocess.run([*cli, "import", str(gguf), "-o", str(ckpt)], check=True)
    if not hf.exists():
        subprocess.run([*cli, "export", str(ckpt), "-o", str(hf)], check=True)
    return ckpt, hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lite-llm-decode"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-thp", action="store_true", help="Keep glibc's default allocator settings.")
    args = parser.parse_args()
    reexec_with_thp()
    if not args.gguf.is_file():
        sys.exit(f"{args.gguf} is missing; run `make fetch-smollm2` first")
    args.workdir.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoModelForCausalLM

    from lite_llm.generate import generate_ids
    from lite_llm.store import load_for_inference

    threads = setup_torch_threads(args.threads)
    ckpt, hf = _prepare(args.gguf, args.workdir)
    prompt = list(range(100, 164))
    models = {
        "ours fp32": load_for_inference(ckpt).model,
        "ours bf16": load_for_inference(ckpt, dtype=torch.bfloat16).model,
        "transformers fp32": AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval(),
        "transformers bf16": AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.bfloat16).eval(),
    }
    outputs: dict[str, list[int]] = {}

    def ours(name: str):
        def run() -> None:
            outputs[name] = list(generate_ids(models[name], prompt, args.tokens, temperature=0))
        return run

    def theirs(name: str):
        def run() -> None:
            with torch.no_grad():
                out = models[name].generate(
                    torch.tensor([prompt]), max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=0
                )
            outputs[name] = out[0, len(prompt):].tolist()
        return run

    candidates = {name: (ours if name.startswith("ours") else theirs)(name) for name in models}
    print(f"CPU: {cpu_description()}, {threads} torch threads; {args.tokens} tokens after a {len(prompt)}-token prompt")
    timings = measure_interleaved(candidates, warmup=1, repeats=args.repeats, log=print)
    reference = timings["ours fp32"].median
    rows, figures = [], {}
    for name, timing in timings.items():
        tokens_per_s = args.tokens / timing.median
        figures[name] = {"tokens_per_s": tokens_per_s, "vs_ours_fp32": reference / timing.median}
        rows.append([name, tokens_per_s, reference / timing.median])
    print_table(["candidate", "tokens/s", "speed vs ours fp32"], rows, title="greedy decoding, median of interleaved repeats")
    agree = {
        dtype: sum(a == b for a, b in zip(outputs[f"ours {dtype}"], outputs[f"transformers {dtype}"])) / args.tokens
        for dtype in ("fp32", "bf16")
    }
    print(f"greedy tokens equal to transformers': fp32 {agree['fp32']:.0%}, bf16 {agree['bf16']:.0%}")
    emit_json({"benchmark": "decode", "cpu": cpu_description(), "threads": threads, "tokens": args.tokens, "figures": figures, "agree": agree})


if __name__ == "__main__":
    main()
