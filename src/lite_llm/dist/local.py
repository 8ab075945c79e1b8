"""Run a function on several local processes, as torchrun would start them — for tests,
benchmarks and notebooks that exercise distributed code on one machine.

Each rank gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on
127.0.0.1), a set number of threads, and a hard deadline: a run that would hang fails instead.
Ranks report through JSON files in ``out_dir``, never through pickled return values.  ``fn``
must be importable by the spawned processes (a module-level function).
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (for a rendezvous or a server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, fn: Callable[..., Any], world: int, port: int, out_dir: str, threads: int, args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(threads)
    try:
        result = fn(*args)
    except BaseException:
        Path(out_dir, f"error-{local_rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out_dir, f"rank-{local_rank}.json").write_text(json.dumps(result))


def run_ranks(fn: Callable[..., Any], world: int, out_dir: Path, *args: Any, timeout_s: float = 60.0, threads: int = 1) -> list[Any]:
    """``fn(*args)`` on ``world`` ranks of ``threads`` threads each; their JSON results, by rank.
    A rank's exception (its traceback), a missing result or the deadline raise AssertionError."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_entry, args=(fn, world, free_port(), str(out_dir), threads, args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks still running after {timeout_s} s")
    except ProcessException:
        pass  # the failing rank wrote its traceback; reported below
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    errors = sorted(out_dir.glob("error-*.txt"))
    if errors:
        raise AssertionError("\n".join(f"{e.name}:\n{e.read_text()}" for e in errors))
    missing = [r for r in range(world) if not Path(out_dir, f"rank-{r}.json").is_file()]
    if missing:
        codes = [p.exitcode for p in ctx.processes]
        raise AssertionError(f"rank(s) {missing} ended without a result (exit codes {codes})")
    return [json.loads(Path(out_dir, f"rank-{r}.json").read_text()) for r in range(world)]
