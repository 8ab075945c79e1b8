"""What the growth check adds to a growth's time, paired in one process (issue 16, point 2).

    python benchmarks/validate_cost.py [--repeats 7] [--no-smollm2] [--workdir DIR]

``benchmarks/grow.py`` times each run in a fresh process (its peak RSS must be its own), so its
percentages move with the disk's luck between processes.  Here the three modes of
``expand_checkpoint`` run one after another in one process, ``--repeats`` times interleaved,
after one untimed growth that brings the source into the page cache, and the figure is the
median of each mode over the median without the check:

* ``never``: no check (the reference);
* ``auto``: the default — for LLaMA-Pro the proof that the grown model is the original by
  construction (``lite_llm.grow.streaming_validate.prove_unchanged``) plus the gradient check;
* ``always``: the streamed float64 sample (128 tokens) evaluated whatever the method.

Growths: LLaMA-Pro 16 -> 24 of a 1.7 GB bf16 Llama of random weights (as in grow.py), and
30 -> 40 of SmolLM2-135M-Instruct imported from its GGUF (when present).  Target: the default
check adds <= 25%.  Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_description, emit_json, print_table, rounded  # noqa: E402
from grow import ROOT, _make_source  # noqa: E402

MODES = ("never", "auto", "always")
TARGET = 0.25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=None, help="Where the checkpoints go (default: a temp dir).")
    parser.add_argument("--smollm2", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--no-smollm2", action="store_true")
    args = parser.parse_args()

    from lite_llm.grow.expand import expand_checkpoint
    from lite_llm.grow.recipe import GrowthStep

    work = Path(tempfile.mkdtemp(prefix="validate-cost-", dir=args.workdir))
    try:
        cases = {"bf16 Llama llama_pro 16 -> 24": (work / "llama", 24)}
        _make_source(work / "llama", argparse.Namespace(d_model=2048, layers=16, shard_bytes=512 * 1024**2))
        if not args.no_smollm2 and args.smollm2.exists():
            from lite_llm.interop import import_gguf

            cases["SmolLM2-135M llama_pro 30 -> 40"] = (import_gguf(args.smollm2, work / "smollm2"), 40)
        figures, rows = {}, []
        for name, (src, target) in cases.items():
            times: dict[str, list[float]] = {mode: [] for mode in MODES}
            shutil.rmtree(work / "out", ignore_errors=True)
            expand_checkpoint(src, work / "out", [GrowthStep("llama_pro", {"target_layers": target})], validate="never")  # untimed: the source into the page cache
            for _ in range(args.repeats):
                for mode in MODES:
                    shutil.rmtree(work / "out", ignore_errors=True)
                    start = time.perf_counter()
                    expand_checkpoint(src, work / "out", [GrowthStep("llama_pro", {"target_layers": target})], validate=mode)
                    times[mode].append(time.perf_counter() - start)
            median = {mode: statistics.median(v) for mode, v in times.items()}
            figures[name] = {"seconds": {m: rounded(v, 3) for m, v in times.items()}, "median_s": rounded(median, 3),
                             "auto_added": rounded(median["auto"] / median["never"] - 1, 3),
                             "always_added": rounded(median["always"] / median["never"] - 1, 3)}
            rows.append([name, f"{median['never']:.2f}", f"{median['auto']:.2f}", f"{figures[name]['auto_added']:+.0%}",
                         f"{median['always']:.2f}", f"{figures[name]['always_added']:+.0%}"])
            print(name, {m: [f"{x:.2f}" for x in v] for m, v in times.items()}, flush=True)
        print_table(["growth", "never (s)", "auto: proof (s)", "added", "always: sample (s)", "added"], rows,
                    title=f"check's added time, medians of {args.repeats} interleaved repeats in one process ({cpu_description()})")
        worst = max(f["auto_added"] for f in figures.values())
        print(f"target: the default check adds <= {TARGET:.0%}: {'met' if worst <= TARGET else 'NOT met'} (worst {worst:+.0%})")
        emit_json({"benchmark": "validate_cost", "cpu": cpu_description(), "repeats": args.repeats, "cases": figures, "worst_auto_added": worst})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
