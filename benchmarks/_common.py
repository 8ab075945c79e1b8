"""Helpers shared by the benchmark scripts: THP re-exec, thread setup, interleaved timing.

This module must not import torch at module level: ``reexec_with_thp`` has to run before
torch is first imported, because torch reads ``THP_MEM_ALLOC_ENABLE`` only at start-up.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def reexec_with_thp(opt_out_flag: str = "--no-thp") -> None:
    """Re-execute this script with ``THP_MEM_ALLOC_ENABLE=1`` unless it is set already.

    Fresh-memory page faults dominate large weight gradients on CPU; transparent huge pages
    cut them (DESIGN.md, "Dispatch").  Torch reads the variable when it is imported, so the
    only way to turn it on from inside a script is to start the interpreter again.
    Pass ``opt_out_flag`` to measure without it.
    """
    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
        return
    if opt_out_flag in sys.argv:
        print(
            "hint: THP_MEM_ALLOC_ENABLE is not '1'; large CPU allocations will page-fault 4 KiB at a time "
            "and training steps will be slower than they need to be.",
            file=sys.stderr,
        )
        return
    print("hint: THP_MEM_ALLOC_ENABLE is not '1'; re-executing with THP_MEM_ALLOC_ENABLE=1 "
          f"(pass {opt_out_flag} to measure without it)", file=sys.stderr, flush=True)
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    os.execv(sys.executable, [sys.executable] + sys.argv)


def keep_freed_memory_unless(opted_out: bool) -> bool:
    """Keep freed CPU memory for reuse, as ``lite-llm`` training does on CPU (``lite_llm.runtime.cpu_memory``),
    unless ``opted_out``; returns whether it is in effect.  Process-wide: every candidate a
    benchmark compares runs under the same allocator setting."""
    if opted_out:
        return False
    from lite_llm.runtime.cpu_memory import keep_freed_memory

    return keep_freed_memory()


def cpu_description() -> str:
    """The CPU's model name and its widest vector/matrix extensions, from /proc/cpuinfo: these VMs
    change CPUs between sessions (AMD EPYC with AVX2, Intel Xeon with AVX-512 and AMX), and the
    kernels MKL picks, hence every absolute time, change with them."""
    import platform

    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}  # the first CPU's entry: every core reports the same
    for line in lines:
        key, colon, value = line.partition(":")
        if colon:
            fields.setdefault(key.strip(), value.strip())
    name, flags = fields.get("model name", "unknown CPU"), set(fields.get("flags", "").split())
    extensions = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(extensions) or 'no AVX2'})"


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity masks, unlike ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def setup_torch_threads(threads: int | None = None) -> int:
    import torch

    n = threads or available_cpus()
    torch.set_num_threads(n)
    return torch.get_num_threads()


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call (CPU work is synchronous, so no device sync is needed)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Timing:
    """Samples of one candidate; ``single_shot`` when it was too slow to repeat."""

    samples: list[float] = field(default_factory=list)
    single_shot: bool = False
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples and self.error is None else None

    @property
    def minimum(self) -> float | None:
        return min(self.samples) if self.samples and self.error is None else None


def measure_interleaved(
    candidates: dict[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    slow_s: float = float("inf"),
    inner: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict[str, Timing]:
    """Time every candidate ``repeats`` times, interleaved, after ``warmup`` calls each.

    Each repeat runs every candidate once, in an order rotated by one per repeat, so slow drift
    of the machine (other processes, thermal state) affects all candidates alike.  A sample is
    the time of ``inner`` back-to-back calls divided by ``inner`` (use ``inner > 1`` for calls
    of well under a millisecond).  A candidate whose warm-up call takes longer than ``slow_s``
    keeps that one call as its only sample (``single_shot``; it includes first-call costs, so
    it over-states the steady-state time).  A candidate that raises is recorded with its error
    and dropped.
    """
    results = {name: Timing() for name in candidates}

    def run(name: str) -> float:
        fn = candidates[name]
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - start) / inner

    active = list(candidates)
    for name in list(active):
        for i in range(warmup):
            try:
                t = run(name)
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                results[name].error = f"{type(exc).__name__}: {exc}"
                active.remove(name)
                if log:
                    log(f"  {name}: failed ({results[name].error})")
                break
            if log:
                log(f"  warm-up {name} #{i + 1}: {t:.3f} s")
            if t > slow_s:
                results[name].samples.append(t)
                results[name].single_shot = True
                active.remove(name)
                if log:
                    log(f"  {name}: {t:.1f} s > {slow_s:.0f} s, too slow to repeat; keeping this one call")
                break
    for r in range(repeats):
        if not active:
            break
        k = r % len(active)
        for name in active[k:] + active[:k]:
            gc.collect()
            results[name].samples.append(run(name))
        if log:
            log(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {results[n].samples[-1]:.3f}" for n in active))
    return results


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def rounded(value: object, digits: int = 4) -> object:
    """Round every float inside nested dicts/lists (for the JSON line)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def print_table(headers: list[str], rows: list[list[object]], title: str | None = None) -> None:
    """A plain, aligned text table (no dependencies, survives log files)."""

    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in text:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def emit_json(payload: dict) -> None:
    """The last line of a benchmark's output: one JSON object with every figure."""
    print(json.dumps(rounded(payload), sort_keys=False), flush=True)


def stdlib_prose_and_code(workdir, max_bytes_per_domain: int = 4_000_000):
    """The two real domains the growth benchmarks share, byte-level: ``prose`` (pydoc topics)
    and ``code`` (the standard library's sources), prepared once under ``workdir/data``."""
    from pathlib import Path

    from lite_llm.data import ByteTokenizer, TokenData, prepare_data

    data_dir = Path(workdir) / "data"
    if not (data_dir / "index.json").exists():
        prepare_data({"prose": "stdlib-docs", "code": "stdlib-code"}, data_dir, ByteTokenizer(), max_bytes_per_domain=max_bytes_per_domain)
    return TokenData(data_dir)
