"""``GET /metrics``: the server's counters in Prometheus' text format.

Written by hand (a dozen lines of text) rather than with ``prometheus_client``, which is not a
dependency.  Counters that only grow are ``_total``; gauges are what is true now.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from .engine import TTFT_BUCKETS, Engine


class RequestCounter:
    """HTTP requests answered, by endpoint and status code (written from the event loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: collections.Counter[tuple[str, int]] = collections.Counter()

    def add(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.counts[(endpoint, status)] += 1


def render_metrics(engine: Engine, requests: RequestCounter, store: Any = None) -> str:
    """The exposition text: requests, tokens, tokens/s, queue depth, running rows, batch sizes,
    time to first token (histogram), cancellations, routes per tier, and the expert store's
    hit rate when the experts are served from a store."""
    s = engine.stats
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            out.append(f"{name}{labels} {_number(value)}")

    with requests._lock:
        counts = sorted(requests.counts.items())
    metric("lite_llm_requests_total", "counter", "HTTP requests answered, by endpoint and status.",
           [(f'{{endpoint="{e}",status="{c}"}}', n) for (e, c), n in counts])
    metric("lite_llm_requests_finished_total", "counter", "Generations that ended (stop or length).", [("", s.requests_finished)])
    metric("lite_llm_requests_cancelled_total", "counter", "Generations stopped because the client left.", [("", s.requests_cancelled)])
    metric("lite_llm_requests_failed_total", "counter", "Generations that failed inside the engine.", [("", s.requests_failed)])
    metric("lite_llm_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", s.prompt_tokens)])
    metric("lite_llm_generated_tokens_total", "counter", "Tokens generated.", [("", s.generated_tokens)])
    metric("lite_llm_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.", [("", s.tokens_per_second())])
    metric("lite_llm_queue_depth", "gauge", "Requests waiting for a place in the batch.", [("", engine.queue_depth)])
    metric("lite_llm_running_requests", "gauge", "Requests in the running batch.", [("", engine.running)])
    metric("lite_llm_decode_steps_total", "counter", "Batched decode steps run.", [("", s.decode_steps)])
    metric("lite_llm_decode_rows_total", "counter", "Rows over all decode steps (divide by steps for the mean batch).", [("", s.decode_rows)])
    buckets = [(f'{{le="{b}"}}', n) for b, n in zip(TTFT_BUCKETS, s.ttft_buckets)] + [('{le="+Inf"}', s.ttft_count)]
    out.append("# HELP lite_llm_time_to_first_token_seconds Time from a request's arrival to its first token.")
    out.append("# TYPE lite_llm_time_to_first_token_seconds histogram")
    out.extend(f"lite_llm_time_to_first_token_seconds_bucket{labels} {_number(n)}" for labels, n in buckets)
    out.append(f"lite_llm_time_to_first_token_seconds_sum {_number(s.ttft_sum)}")
    out.append(f"lite_llm_time_to_first_token_seconds_count {s.ttft_count}")
    metric("lite_llm_expert_routes_total", "counter", "Token-to-expert routes per tier (all MoE layers).",
           [(f'{{tier="{t}"}}', n) for t, n in sorted(s.tier_routes.items())])
    if store is not None:
        stats = store.stats()
        metric("lite_llm_expert_store_hit_rate", "gauge", "Share of expert fetches served from the device (hot) cache.",
               [('{level="hot"}', stats.hot.hit_rate), ('{level="warm"}', stats.warm.hit_rate)])
        metric("lite_llm_expert_store_hits_total", "counter", "Hot-cache hits.", [("", stats.hot.hits)])
        metric("lite_llm_expert_store_misses_total", "counter", "Hot-cache misses.", [("", stats.hot.misses)])
    return "\n".join(out) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"
