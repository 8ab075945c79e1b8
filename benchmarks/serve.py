"""The OpenAI-compatible server over loopback: latency at concurrency, continuous batching's
throughput, and what streaming costs over an in-process ``generate``.

    python benchmarks/serve.py [--checkpoint CKPT] [--threads 1] [--max-tokens 32] [--rounds 3]

Without ``--checkpoint`` a model of the quickstart's shape (d=128, 4 layers, two tiers of
2 groups x 4 experts, 2 active per token per layer) over the byte vocabulary is built from
the config presets and saved with a byte tokenizer (random weights: the figures are about
speed, and speed does not depend on what the weights say).  Prefer the quickstart's trained
checkpoint when there is one (``lite-llm quickstart`` writes it).

Servers are real ``lite-llm serve`` processes on 127.0.0.1, each pinned to ``--threads``
torch threads; the client is this process (asyncio + httpx, streaming SSE).  All requests are
greedy with a fixed ``max_tokens`` and a model with no EOS, so each generates exactly that many
tokens.

1. Latency: at concurrency 1, 2, 4 and 8 (closed loop: each client sends its next request when
   the last one ends, ``--rounds`` requests each) against a ``--max-batch 8`` server: time to
   first token (request sent -> first text chunk) and inter-token latency (gap between text
   chunks; a chunk is one token except where the byte decoder holds back an incomplete UTF-8
   character) at p50 and p99.
2. Throughput at concurrency 4: tokens/s against a ``--max-batch 8`` server (continuous
   batching) and a ``--max-batch 1`` server (one request at a time), rounds interleaved
   (A, B, A, B, ...) so drift of the shared machine hits both alike; median of rounds.
   Target >= 1.5x.
3. Streaming overhead: one streamed request of ``--overhead-tokens`` tokens, wall time from
   send to ``[DONE]``, against ``generate_ids`` of the same prompt in this process with the
   same thread count, interleaved, median of ``--overhead-repeats``.  Target <= 5%.  Reported
   as the median of per-repeat ratios (each repeat runs the candidates back to back), and with a
   third candidate, the server's ``Engine`` in this process without HTTP, which splits the
   overhead into the engine's share and the HTTP/SSE path's.

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_description, emit_json, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_BATCHING_SPEEDUP = 1.5
TARGET_STREAM_OVERHEAD = 0.05
PROMPT = "def main(argv):\n    parser = argparse.ArgumentParser(description="


def build_checkpoint(out: Path) -> Path:
    from lite_llm import ModelConfig, build_model
    from lite_llm.checkpoint import save_checkpoint
    from lite_llm.data import ByteTokenizer

    cfg = ModelConfig.from_preset("quickstart", vocab_size=256)
    return save_checkpoint(out / "quickstart-shape", build_model(cfg, seed=0), tokenizer=ByteTokenizer())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LITE_LLM_DEVICE": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lite_llm.cli", "serve", str(ckpt), "--port", str(port), "--max-batch", str(max_batch),
         "--max-queue", "64", "--threads", str(threads), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError("server did not start")


async def one_stream(client, base: str, max_tokens: int) -> dict:
    """One streamed completion: send time, chunk arrival times, token count."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    chunks: list[float] = []
    tokens = 0
    async with client.stream("POST", base + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            elif data["choices"] and data["choices"][0]["text"]:
                chunks.append(time.perf_counter())
    return {"sent": sent, "chunks": chunks, "tokens": tokens, "done": time.perf_counter()}


async def closed_loop(base: str, concurrency: int, rounds: int, max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency + 2)) as client:
        async def worker() -> list[dict]:
            return [await one_stream(client, base, max_tokens) for _ in range(rounds)]

        start = time.perf_counter()
        results = [r for batch in await asyncio.gather(*(worker() for _ in range(concurrency))) for r in batch]
        wall = time.perf_counter() - start
    ttft = [r["chunks"][0] - r["sent"] for r in results if r["chunks"]]
    itl = [b - a for r in results for a, b in zip(r["chunks"], r["chunks"][1:])]
    tokens = sum(r["tokens"] for r in results)
    chunks = sum(len(r["chunks"]) for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "ttft": ttft, "itl": itl, "chunks_per_token": chunks / max(tokens, 1)}


def engine_seconds(engine, ids: list[int], n: int) -> float:
    """Wall time of one greedy request of ``n`` tokens through the serving engine alone, submit to done."""
    import threading

    from lite_llm.config import TierSet
    from lite_llm.serve.engine import Job, SamplingParams

    done = threading.Event()
    t = time.perf_counter()
    engine.submit(Job(list(ids), SamplingParams(max_tokens=n, temperature=0.0), TierSet.all(), lambda e: e.kind == "done" and done.set()))
    done.wait()
    return time.perf_counter() - t


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server and of the in-process generate")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="requests per client per measurement")
    parser.add_argument("--throughput-rounds", type=int, default=3, help="interleaved rounds of the batching comparison")
    parser.add_argument("--overhead-tokens", type=int, default=64)
    parser.add_argument("--overhead-repeats", type=int, default=5)
    parser.add_argument("--parts", default="latency,throughput,overhead", help="which of latency, throughput, overhead to measure")
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    import httpx
    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    ckpt = args.checkpoint or build_checkpoint(work)
    print(f"checkpoint {ckpt}; CPU {cpu_description()}; {args.threads} thread(s) per process", flush=True)
    servers = {}
    try:
        servers["batched"] = start_server(ckpt, 8, args.threads)
        servers["serial"] = start_server(ckpt, 1, args.threads)
        for _, base in servers.values():  # warm-up: first-call costs out of the figures
            asyncio.run(closed_loop(base, 2, 1, 8))

        # 1. latency at concurrency 1, 2, 4, 8 (continuous batching server)
        latency = {}
        for c in (1, 2, 4, 8) if "latency" in parts else ():
            r = asyncio.run(closed_loop(servers["batched"][1], c, args.rounds, args.max_tokens))
            latency[c] = {
                "ttft_p50_ms": 1e3 * pct(r["ttft"], 0.5), "ttft_p99_ms": 1e3 * pct(r["ttft"], 0.99),
                "itl_p50_ms": 1e3 * pct(r["itl"], 0.5), "itl_p99_ms": 1e3 * pct(r["itl"], 0.99),
                "tokens_per_s": r["tokens_per_s"], "chunks_per_token": r["chunks_per_token"],
            }
            print(f"concurrency {c}: {latency[c]}", flush=True)

        # 2. throughput at concurrency 4: continuous batching vs one at a time, interleaved
        tput: dict[str, list[float]] = {"batched": [], "serial": []}
        for i in range(args.throughput_rounds if "throughput" in parts else 0):
            for name in (("batched", "serial") if i % 2 == 0 else ("serial", "batched")):
                r = asyncio.run(closed_loop(servers[name][1], 4, args.rounds, args.max_tokens))
                tput[name].append(r["tokens_per_s"])
                print(f"throughput round {i} {name}: {r['tokens_per_s']:.1f} tok/s", flush=True)
        speedup = statistics.median(tput["batched"]) / statistics.median(tput["serial"]) if tput["serial"] else float("nan")

        # 3. streaming overhead vs in-process generate, interleaved
        from lite_llm.checkpoint import load_checkpoint
        from lite_llm.generate import generate_ids
        from lite_llm.serve.engine import Engine

        loaded = load_checkpoint(ckpt)
        model, tok = loaded.model.eval(), loaded.tokenizer
        ids = tok.encode(PROMPT)
        n = args.overhead_tokens
        list(generate_ids(model, ids, n))  # warm-up
        served, local, engine_only = [], [], []
        engine = Engine(model, tok, max_batch=8).start()  # the server's engine in this process: no HTTP, no second process
        with httpx.Client(timeout=300) as client:
            for i in range(args.overhead_repeats if "overhead" in parts else 0):
                for which in (("server", "local", "engine") if i % 2 == 0 else ("engine", "local", "server")):
                    if which == "engine":
                        engine_only.append(engine_seconds(engine, ids, n))
                    elif which == "local":
                        t = time.perf_counter()
                        assert len(list(generate_ids(model, ids, n))) == n
                        local.append(time.perf_counter() - t)
                    else:
                        body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True}
                        t = time.perf_counter()
                        with client.stream("POST", servers["batched"][1] + "/v1/completions", json=body) as response:
                            for _ in response.iter_lines():
                                pass
                        served.append(time.perf_counter() - t)
        overhead = statistics.median(served) / statistics.median(local) - 1 if local else float("nan")
        # each repeat holds one sample of both, taken back to back: the per-repeat ratio cancels
        # the drift between repeats that moves the two medians apart on a shared machine
        paired = sorted(s / l - 1 for s, l in zip(served, local))
        paired_overhead = statistics.median(paired) if paired else float("nan")
        engine_paired = sorted(e / l - 1 for e, l in zip(engine_only, local))
        engine.stop()
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    print_table(
        ["concurrency", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "tok/s"],
        [[c, f"{v['ttft_p50_ms']:.1f}", f"{v['ttft_p99_ms']:.1f}", f"{v['itl_p50_ms']:.1f}", f"{v['itl_p99_ms']:.1f}", f"{v['tokens_per_s']:.0f}"]
         for c, v in latency.items()],
        title=f"streamed completions, {args.max_tokens} tokens each, --max-batch 8",
    )
    if tput["serial"]:
        print(f"concurrency 4: continuous batching {statistics.median(tput['batched']):.1f} tok/s, one at a time "
              f"{statistics.median(tput['serial']):.1f} tok/s: {speedup:.2f}x (target >= {TARGET_BATCHING_SPEEDUP}x: "
              f"{'met' if speedup >= TARGET_BATCHING_SPEEDUP else 'MISSED'})")
    if local:
        print(f"streaming {n} tokens: server {1e3 * statistics.median(served):.1f} ms vs in-process generate "
              f"{1e3 * statistics.median(local):.1f} ms: {100 * overhead:+.1f}%; paired per repeat {100 * paired_overhead:+.1f}% "
              f"(quartiles {100 * pct(paired, 0.25):+.1f}%..{100 * pct(paired, 0.75):+.1f}%) (target <= {100 * TARGET_STREAM_OVERHEAD:.0f}%: "
              f"{'met' if paired_overhead <= TARGET_STREAM_OVERHEAD else 'MISSED'})")
        print(f"of which the engine in this process (no HTTP): paired {100 * pct(engine_paired, 0.5):+.1f}% "
              f"(quartiles {100 * pct(engine_paired, 0.25):+.1f}%..{100 * pct(engine_paired, 0.75):+.1f}%)")
    emit_json({
        "benchmark": "serve", "cpu": cpu_description(), "threads": args.threads, "checkpoint": str(ckpt), "max_tokens": args.max_tokens,
        "latency": {str(c): v for c, v in latency.items()},
        "throughput_c4": {"batched_tok_s": tput["batched"], "serial_tok_s": tput["serial"], "speedup": speedup,
                          "target": TARGET_BATCHING_SPEEDUP, "met": speedup >= TARGET_BATCHING_SPEEDUP},
        "stream_overhead": {"tokens": n, "server_s": served, "local_s": local, "overhead_of_medians": overhead,
                            "overhead": paired_overhead, "paired": paired, "engine_s": engine_only,
                            "engine_paired": engine_paired,
                            "target": TARGET_STREAM_OVERHEAD, "met": paired_overhead <= TARGET_STREAM_OVERHEAD},
    })


if __name__ == "__main__":
    main()
