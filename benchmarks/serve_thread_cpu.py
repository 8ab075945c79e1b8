"""Where a streamed token's time goes inside ``lite-llm serve``: CPU time per thread.

    python benchmarks/serve_thread_cpu.py [--requests 10] [--tokens 128]

Starts a real server (the quickstart's shape, random weights, ``--threads 1``; see
``serve.py``), sends ``--requests`` greedy completions of ``--tokens`` tokens each, streamed and
then whole, and reads each server thread's CPU time from ``/proc/PID/task/TID/stat`` before and
after.  Wall-clock overheads of a few percent drown in this machine's noise; CPU time per
thread does not, and it says which thread pays (the loop that runs the engine and writes the
chunks, or threads beside it).  Linux only; the clock ticks are 10 ms, so keep the totals at
seconds.  The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_description, emit_json  # noqa: E402
from serve import PROMPT, build_checkpoint, one_stream, start_server  # noqa: E402


def thread_cpu_seconds(pid: int) -> dict[tuple[str, str], float]:
    """(thread id, name) -> user + system CPU seconds so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[(tid, name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


async def send(base: str, tokens: int, requests: int, stream: bool) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=300) as client:
        for _ in range(requests):
            if stream:
                await one_stream(client, base, tokens)
            else:
                response = await client.post(base + "/v1/completions", json={"prompt": PROMPT, "max_tokens": tokens, "temperature": 0})
                response.raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    total = args.requests * args.tokens
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        proc, base = start_server(build_checkpoint(Path(workdir)), max_batch=8, threads=1)
        try:
            asyncio.run(send(base, 16, 2, True))  # warm up
            for mode in ("stream", "whole"):
                before, start = thread_cpu_seconds(proc.pid), time.perf_counter()
                asyncio.run(send(base, args.tokens, args.requests, mode == "stream"))
                wall = time.perf_counter() - start
                after = thread_cpu_seconds(proc.pid)
                per_thread = {f"{name}/{tid}": 1e6 * (seconds - before.get((tid, name), 0.0)) / total
                              for (tid, name), seconds in after.items()}
                busy = {k: v for k, v in sorted(per_thread.items(), key=lambda kv: -kv[1]) if v >= 5}
                results[mode] = {"wall_ms_per_token": 1e3 * wall / total, "cpu_us_per_token_by_thread": busy}
                print(f"{mode}: {1e3 * wall / total:.3f} ms per token; CPU us per token by thread: "
                      + ", ".join(f"{k} {v:.0f}" for k, v in busy.items()), flush=True)
        finally:
            proc.terminate()
            proc.wait()
    emit_json({"benchmark": "serve_thread_cpu", "cpu": cpu_description(), "requests": args.requests, "tokens": args.tokens, **results})


if __name__ == "__main__":
    main()
