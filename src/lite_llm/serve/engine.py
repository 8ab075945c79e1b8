"""The generation worker behind the server: one thread, a bounded queue, cancellation.

Requests are generated **one at a time**, in arrival order, each exactly as
``lite-llm generate`` would (``generate.generate_text``: same seed, same text), with its own
TierSet and sampling settings.  Continuous batching (rows joining and leaving one running
batch) is not built yet; this worker is what it will replace.

Text pieces reach the HTTP side through the asyncio loop (``call_soon_threadsafe``).  A client
that goes away sets its job's ``cancelled`` flag, which the worker reads after every token, so
its generation stops within one decode step.  A full queue is refused at once (the server
answers 429 with ``Retry-After``) rather than growing without bound.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import TierSet
from ..data.tokenizer import render_chat
from ..generate import generate_text
from .protocol import GenerationRequest

_DONE = object()


class QueueFull(Exception):
    """The server already holds as many waiting requests as it may."""


@dataclass
class Job:
    request: GenerationRequest
    tierset: TierSet
    prompt_ids: list[int]
    loop: asyncio.AbstractEventLoop
    pieces: asyncio.Queue = field(default_factory=asyncio.Queue)
    outcome: dict[str, Any] = field(default_factory=dict)
    cancelled: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    queued_at: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None


@dataclass
class EngineStats:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    generated_tokens: int = 0
    busy_s: float = 0.0
    ttft_sum_s: float = 0.0
    ttft_count: int = 0


class Engine:
    """Runs jobs on one worker thread; ``submit`` from the event loop, iterate ``job.pieces``."""

    def __init__(self, model: Any, tokenizer: Any, *, max_queue: int = 16, store: Any = None) -> None:
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.stats = EngineStats()
        self._thread = threading.Thread(target=self._run, name="lite-llm-engine", daemon=True)
        self._thread.start()

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        text = render_chat(self.tokenizer, request.messages) if request.chat else request.prompt
        return list(self.tokenizer.encode(text))

    def submit(self, request: GenerationRequest, tierset: TierSet, prompt_ids: list[int]) -> Job:
        job = Job(request, tierset, prompt_ids, asyncio.get_running_loop())
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        self.stats.requests += 1
        return job

    @property
    def queue_depth(self) -> int:
        return self.jobs.qsize()

    def close(self) -> None:
        """Finish the queued jobs, then stop the worker."""
        self.jobs.put(None)
        self._thread.join(timeout=60)

    # ------------------------------------------------------------------ the worker thread
    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            started = time.perf_counter()
            try:
                self._generate(job)
            except BaseException as exc:  # noqa: BLE001 - reported to the request, the worker lives on
                job.error = exc
            finally:
                self.stats.busy_s += time.perf_counter() - started
                self.stats.generated_tokens += int(job.outcome.get("completion_tokens", 0))
                if job.cancelled.is_set():
                    self.stats.cancelled += 1
                else:
                    self.stats.completed += 1
                job.loop.call_soon_threadsafe(job.pieces.put_nowait, _DONE)

    def _generate(self, job: Job) -> None:
        r = job.request
        if job.cancelled.is_set():
            return
        pieces = generate_text(
            self.model, self.tokenizer, "", r.max_tokens, prompt_ids=job.prompt_ids, stop=r.stop, outcome=job.outcome,
            temperature=r.temperature, top_p=r.top_p, seed=r.seed, tierset=job.tierset,
        )
        try:
            for piece in pieces:
                if job.first_token_s is None:
                    job.first_token_s = time.perf_counter() - job.queued_at
                    self.stats.ttft_sum_s += job.first_token_s
                    self.stats.ttft_count += 1
                job.loop.call_soon_threadsafe(job.pieces.put_nowait, piece)
                if job.cancelled.is_set():
                    return
        finally:
            pieces.close()


def is_done(item: object) -> bool:
    return item is _DONE
