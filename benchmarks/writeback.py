"""Durable writes with and without early writeback (``lite_llm.checkpoint.atomic.EarlyWriteback``).

    python benchmarks/writeback.py                 # 2.4 GB (a grown 1.6 GB Llama), 5 repeats
    python benchmarks/writeback.py --gb 0.5 --repeats 5

Every checkpoint and Hugging Face folder lite-llm writes is fsynced before it is renamed into
place.  Candidates, interleaved, each writing ``--gb`` of random bytes in 64 MB ``os.write``
calls to a fresh file in ``--workdir`` and fsyncing it (``sync``, untimed, before each):

* ``plain``: write, then fsync (the reference: the kernel starts writing back on its own when
  the dirty pages pass ``vm.dirty_background_ratio``, and throttles the writer);
* ``early``: the same, each 64 MB handed to the disk as soon as it is written
  (``sync_file_range(SYNC_FILE_RANGE_WRITE)``), as the checkpoint writers do.

Prints the best and the median time of each and plain / early for both (the disks of shared
machines are noisy); ends with one JSON line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from _common import cpu_description, emit_json, measure_interleaved, print_table, ratio, rounded  # noqa: E402

from lite_llm.checkpoint.atomic import EarlyWriteback  # noqa: E402

CHUNK = 64 * 1024**2


def write_file(path: Path, chunks: int, block: memoryview, early: bool) -> None:
    """``chunks`` copies of ``block`` into ``path``, then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        writeback = EarlyWriteback(fd, every=CHUNK) if early else None
        for _ in range(chunks):
            view = block
            while view:
                n = os.write(fd, view)
                view = view[n:]
                if writeback is not None:
                    writeback.wrote(n)
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.4, help="bytes to write per run, in GB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    chunks = max(1, round(args.gb * 1e9 / CHUNK))
    block = memoryview(os.urandom(CHUNK))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        target = Path(tmp) / "data"

        def run(early: bool):
            def call() -> None:
                os.sync()
                write_file(target, chunks, block, early)

            return call

        timings = measure_interleaved({"plain": run(False), "early": run(True)}, warmup=0, repeats=args.repeats, log=print)
    best = {name: t.minimum for name, t in timings.items()}
    median = {name: t.median for name, t in timings.items()}
    print_table(
        ["candidate", "best s", "median s", "plain / this (best)", "plain / this (median)"],
        [[n, f"{best[n]:.2f}", f"{median[n]:.2f}", f"{ratio(best['plain'], best[n]):.2f}", f"{ratio(median['plain'], median[n]):.2f}"] for n in best],
        title=f"write {chunks * CHUNK / 1e9:.2f} GB + fsync ({cpu_description()})",
    )
    emit_json(
        {
            "benchmark": "writeback", "cpu": cpu_description(), "bytes": chunks * CHUNK, "repeats": args.repeats,
            "best_s": rounded(best), "median_s": rounded(median),
            "speedup_best": rounded(ratio(best["plain"], best["early"])), "speedup_median": rounded(ratio(median["plain"], median["early"])),
        }
    )

if __name__ == "__main__":
    main()
