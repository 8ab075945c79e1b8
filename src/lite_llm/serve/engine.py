"""Continuous batching: one driver owns the model and a running batch of sequences.

Two drivers run the same scheduling iteration (:meth:`Engine._iterate`): a thread of its own
(:meth:`Engine.start`, for library callers), or the server's event loop (:meth:`Engine.run`).
The server uses the loop: on a small model the decode step is mostly Python, so a separate
engine thread would take turns with the loop on the GIL and pay a cross-thread wake-up and a
GIL handoff for every token it streams (BENCHMARKS.md, "Serving").  Either way exactly one
thread at a time touches the model, its KV caches and (when in use) the expert store.

The loop, at every token boundary: admit waiting requests while the batch has room (each is
prefilled alone — the call ``generate_ids`` makes — and samples its first token), drop rows
whose client left, then run one decode step for every running row
(:func:`~.batched.decode_step`) and sample each row's next token with its own settings and
its own seeded ``torch.Generator``.  A row leaves when it stops; the others carry on.  Each
request therefore gets bitwise the tokens ``generate_ids`` gives it alone, whatever else is in
the batch (``batched.py`` says why the arithmetic allows it).

Events go back through the request's ``sink`` (the server hands the engine a callable that
puts them on the request's :class:`~.channel.EventChannel`), so the engine knows nothing about
HTTP.  A sink must not block: on the loop it would stop the server.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import torch

from ..config import TierSet
from ..errors import LiteLLMError
from ..generate import TextStream, next_token
from .batched import decode_step, new_row_cache, prefill

if TYPE_CHECKING:
    from ..model import LiteLLM


class QueueFullError(LiteLLMError):
    """The engine's waiting queue is full; the client should retry later."""


class EngineStoppedError(LiteLLMError):
    """The engine is draining or stopped and takes no new request."""


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation (validated by the protocol layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: no logprobs; n: each generated token's, with the n likeliest
    prompt_logprobs: bool = False  # also the prompt's tokens' (with the same n): echo with logprobs
    # max_tokens == 0 generates nothing: the prompt is scored (prompt_logprobs) or merely echoed


class TokenLogprob(NamedTuple):
    """One token's log-probability under the model's raw logits (before logit bias, penalties,
    temperature and filters: vLLM's default "raw logprobs"), and the ``top`` likeliest tokens
    there as (id, logprob), likeliest first.  The first prompt token has none: ``None``."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class Event:
    """One thing that happened to a request: text to send, the end, or an error.

    With ``SamplingParams.logprobs`` set, each text or done event carries ``logprobs``: the
    entries of every token sampled since the previous event (a token whose text is held back —
    a possible stop-string prefix, an unfinished character — rides with the event that sends
    it; the end-of-sequence token and the tokens of a stop string ride with the next event,
    the last at the latest).  So the entries of all events together are one per generated
    token, in order.  The first event carries ``prompt_logprobs`` when asked for."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" (done only)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""  # error only
    status: int = 500  # error only: the HTTP status a whole response answers it with (503: the server is stopping)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class Job:
    """A request inside the engine: its inputs, its row state, and where its events go."""

    prompt_ids: list[int]
    params: SamplingParams
    tierset: TierSet
    sink: Callable[[Event], None]
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # row state, owned by the engine's driver
    cache: Any = None
    generator: torch.Generator | None = None
    text: TextStream | None = None
    seen: list[int] = field(default_factory=list)
    position: int = 0
    last_token: int = 0
    generated: int = 0
    finished: bool = False
    logprobs: list[TokenLogprob] = field(default_factory=list)  # sampled since the last event
    prompt_logprobs: list[TokenLogprob] | None = None  # until the first event takes them

    def cancel(self) -> None:
        """Ask the engine to drop this request at the next token boundary (thread-safe)."""
        self.cancelled.set()


# Time-to-first-token histogram buckets, seconds (Prometheus convention: upper bounds).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class EngineStats:
    """Counters the engine keeps (read by ``/metrics`` and the tests; written by the engine's
    driver only, so plain ints suffice)."""

    requests_admitted: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefills: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sum of batch sizes over decode steps
    max_batch_seen: int = 0
    ttft_count: int = 0
    ttft_sum: float = 0.0
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    tier_routes: dict[str, int] = field(default_factory=dict)
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))  # (time, tokens)

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_count += 1
        self.ttft_sum += seconds
        for i, bound in enumerate(TTFT_BUCKETS):
            if seconds <= bound:
                self.ttft_buckets[i] += 1

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds."""
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= window]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span


class Engine:
    """The running batch.  ``submit`` from any thread; the driver (:meth:`start` or :meth:`run`)
    does the rest."""

    def __init__(self, model: "LiteLLM", tokenizer: Any, *, max_batch: int = 8, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 0:
            raise LiteLLMError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.eos_ids = frozenset(int(i) for i in (getattr(tokenizer, "eos_ids", ()) or ()))
        self.tier_names = [t.name for t in model.config.tiers]
        self.stats = EngineStats(tier_routes={name: 0 for name in self.tier_names})
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._aborting = False  # set by :meth:`abort`, acted on at the next token boundary
        self._thread: threading.Thread | None = None
        self._wake: Callable[[], None] | None = None  # set while :meth:`run` drives the engine

    # ------------------------------------------------------------------------ control
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lite-llm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Drain: finish every admitted and waiting request, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            if self._wake is not None:
                self._wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def abort(self) -> None:
        """Stop now rather than drain: at the next token boundary every running and waiting
        request ends with an error event (status 503) and the engine takes no new one.  Safe to
        call from a signal handler (``lite-llm serve`` calls it on a second Ctrl-C): it only sets
        flags, which the driver reads; an idle engine has nothing to end."""
        self._stopping = True
        self._aborting = True

    @property
    def aborted(self) -> bool:
        return self._aborting

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFullError` when the batch is full and ``max_queue``
        requests already wait for a place in it."""
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down and takes no new request; retry on another replica")
            if len(self._running) + len(self._waiting) >= self.max_batch + self.max_queue:
                raise QueueFullError(f"the server is at capacity ({len(self._waiting)} requests waiting); retry shortly")
            self._waiting.append(job)
            self._cond.notify_all()
            if self._wake is not None:
                self._wake()

    # ------------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        """The engine thread: wait for work, then one scheduling iteration after another."""
        while True:
            with self._cond:
                while not self._waiting and not self._running and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._waiting and not self._running:
                    return
            self._iterate()

    async def run(self) -> None:
        """Drive the engine on the running event loop instead of a thread, until :meth:`stop`
        has been called and every request is done.

        Why: on a small model the decode step is mostly Python, so an engine thread and the
        server's event loop take turns on the GIL, and each token handed across threads costs a
        wake-up of the loop and a GIL handoff back — measured at ~0.3 ms per 3.6 ms token.  On
        the loop itself a token reaches its client's stream without leaving the thread; between
        iterations the loop serves its sockets (at most one decode step, or one prefill, late).
        """
        loop = asyncio.get_running_loop()
        work = asyncio.Event()

        def wake() -> None:  # submit and stop may come from any thread
            if _on_loop_thread(loop):
                work.set()
            else:
                loop.call_soon_threadsafe(work.set)

        with self._cond:
            self._wake = wake
        try:
            while True:
                with self._cond:
                    idle = not self._waiting and not self._running
                    if idle and self._stopping:
                        return
                    if idle:
                        work.clear()
                if idle:
                    await work.wait()
                    continue
                self._iterate()
                await asyncio.sleep(0)  # let the loop write what this step produced and read new requests
        finally:
            with self._cond:
                self._wake = None

    def _iterate(self) -> None:
        """One token boundary: admit what fits, drop the cancelled, one decode step for the rest."""
        with self._cond:
            if self._aborting:
                doomed = [*self._running, *self._waiting]
                self._running, admitted = [], []
                self._waiting.clear()
            else:
                doomed = []
        for job in doomed:
            if not job.finished:
                self._fail(job, "the server was stopped before this request finished", status=503)
        with self._cond:
            admitted = []
            while self._waiting and len(self._running) < self.max_batch:
                admitted.append(self._waiting.popleft())
                self._running.append(admitted[-1])  # counted against capacity from now on
        with torch.no_grad():
            for job in admitted:
                self._admit(job)
            self._running = [job for job in self._running if not job.finished and not self._drop_if_cancelled(job)]
            if self._running:
                self._step(self._running)
                self._running = [job for job in self._running if not job.finished]

    def _admit(self, job: Job) -> None:
        if self._drop_if_cancelled(job):
            return
        p = job.params
        if p.max_tokens == 0 and not p.prompt_logprobs:  # an echo: nothing to compute
            self.stats.requests_admitted += 1
            self._finish(job, "length")
            return
        score = p.prompt_logprobs and p.logprobs is not None
        try:
            job.cache = new_row_cache(self.model, len(job.prompt_ids), len(job.prompt_ids) + p.max_tokens)
            logits, routes = prefill(self.model, job.prompt_ids, job.cache, job.tierset, every_position=score)
            if score:
                job.prompt_logprobs = prompt_logprobs(logits, job.prompt_ids, p.logprobs)
                logits = logits[-1]
        except Exception as exc:  # one bad request must not stop the server
            self._fail(job, exc)
            return
        self.stats.requests_admitted += 1
        self.stats.prefills += 1
        self.stats.prompt_tokens += len(job.prompt_ids)
        self._count_routes(routes)
        if p.max_tokens == 0:
            self._finish(job, "length")
            return
        job.generator = torch.Generator().manual_seed(p.seed)
        job.text = TextStream(self.tokenizer, p.stop)
        job.seen = list(job.prompt_ids)
        job.position = len(job.prompt_ids)
        self._take(job, logits)

    def _step(self, jobs: Sequence[Job]) -> None:
        allowed = self.model.allowed_rows([job.tierset for job in jobs]) if self.model.config.is_moe else None
        try:
            logits, routes = decode_step(
                self.model, [j.last_token for j in jobs], [j.position for j in jobs], [j.cache for j in jobs], allowed
            )
        except Exception as exc:
            for job in jobs:
                self._fail(job, exc)
            return
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(jobs)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(jobs))
        self._count_routes(routes)
        for row, job in enumerate(jobs):
            job.position += 1
            self._take(job, logits[row])

    def _take(self, job: Job, logits: torch.Tensor) -> None:
        """Sample ``job``'s next token from its logits (V,) and tell its client what it made."""
        p = job.params
        try:  # generate_ids' own sampling function, so both draw bitwise alike
            token = next_token(logits, job.seen, len(job.prompt_ids), p, job.generator)
            if p.logprobs is not None:
                job.logprobs.append(token_logprob(logits, token, p.logprobs))  # the raw logits
        except Exception as exc:  # one bad request must not stop the server
            self._fail(job, exc)
            return
        job.generated += 1
        self.stats.generated_tokens += 1
        self.stats.recent.append((time.perf_counter(), 1))
        if job.generated == 1:
            self.stats.observe_ttft(time.perf_counter() - job.submitted)
        if token in self.eos_ids:
            self._send_held_text(job)
            self._finish(job, "stop")
            return
        piece = job.text.push(token)
        if piece:
            self._send(job, Event("text", text=piece))
        if job.text.stopped:
            self._finish(job, "stop")
        elif job.generated >= p.max_tokens:
            self._send_held_text(job)
            self._finish(job, "stop" if job.text.stopped else "length")
        else:
            job.seen.append(token)
            job.last_token = token

    def _send_held_text(self, job: Job) -> None:
        """Send the text held back as a possible stop-string prefix (or an unfinished
        character), now that no more tokens will come."""
        tail = job.text.finish()
        if tail:
            self._send(job, Event("text", text=tail))

    def _send(self, job: Job, event: Event) -> None:
        """Give ``event`` to the client, with the logprobs gathered since the last one."""
        if job.params.logprobs is not None:
            event.logprobs, job.logprobs = job.logprobs, []
            event.prompt_logprobs, job.prompt_logprobs = job.prompt_logprobs, None
        job.sink(event)

    def _finish(self, job: Job, reason: str) -> None:
        job.finished = True
        job.cache = None
        self.stats.requests_finished += 1
        self._send(job, Event("done", finish_reason=reason, prompt_tokens=len(job.prompt_ids), completion_tokens=job.generated))

    def _drop_if_cancelled(self, job: Job) -> bool:
        if not job.cancelled.is_set():
            return False
        job.finished = True
        job.cache = None
        self.stats.requests_cancelled += 1
        self._send(job, Event("done", finish_reason="cancelled", prompt_tokens=len(job.prompt_ids), completion_tokens=job.generated))
        return True

    def _fail(self, job: Job, exc: Exception | str, status: int = 500) -> None:
        job.finished = True
        job.cache = None
        self.stats.requests_failed += 1
        job.sink(Event("error", message=str(exc) or type(exc).__name__, status=status))

    def _count_routes(self, routes: torch.Tensor) -> None:
        for name, n in zip(self.tier_names, routes.tolist()):
            self.stats.tier_routes[name] += int(n)


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability under one position's raw logits (V,), in float32, with the
    ``top`` likeliest tokens."""
    lp = logits.float().log_softmax(-1)
    best = torch.topk(lp, min(top, lp.shape[-1])) if top else None
    return TokenLogprob(token, float(lp[token]), list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else [])


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], top: int) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the tokens before it, from the prefill's
    logits at every position (S, V); the first token has none."""
    lp = logits[:-1].float().log_softmax(-1)
    ids = torch.tensor(list(prompt_ids[1:]), dtype=torch.long, device=lp.device)
    chosen = lp.gather(-1, ids[:, None])[:, 0].tolist()
    if top:
        best = torch.topk(lp, min(top, lp.shape[-1]))
        tops = [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(int(prompt_ids[0]), None, None)] + [
        TokenLogprob(int(t), c, b) for t, c, b in zip(prompt_ids[1:], chosen, tops)
    ]


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
