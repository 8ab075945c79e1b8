"""The HTTP server: an OpenAI-compatible FastAPI app in front of the batching engine.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as server-sent events
ending with ``data: [DONE]``, or whole), ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

Behaviour under pressure, and why it is built so:

* a client that leaves stops its generation within one decode step: a streamed response's
  generator is cancelled by Starlette when the client disconnects (``asyncio.CancelledError``
  is a ``BaseException``, so only ``finally`` sees it) and its ``finally`` flags the job; a
  whole response polls ``request.is_disconnected()`` while it waits; the engine drops flagged
  rows at the next token boundary;
* the engine's queue is bounded: a request that finds it full is answered 429 with
  ``Retry-After`` at once, before any work;
* every bad request is a 400 with OpenAI's error body (:mod:`.protocol`), and the server
  carries on;
* SIGTERM: uvicorn stops accepting, lets in-flight responses finish (the engine keeps
  running them), then the lifespan's shutdown drains and stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..config import TierSet
from ..data.tokenizer import render_chat
from ..errors import LiteLLMError
from .engine import EngineStoppedError, Engine, Event, Job, QueueFullError, SamplingParams, TokenLogprob
from .logprobs import LogprobFormat, TokenTexts
from .metrics import RequestCounter, render_metrics
from .channel import EventChannel
from .protocol import (
    APIError, ChatRequest, CompletionRequest, StreamRenderer, chat_body, check_model, completion_body, new_id, parse_request,
)
from .selection import choose, load_profile, tierset_label

TIER_SET_HEADER = "X-Lite-LLM-Tier-Set"  # on every answer: the TierSet that served it (chosen by budget or asked for)
DISCONNECT_POLL_S = 0.05  # how often a whole (non-streamed) response checks that its client is still there
RETRY_AFTER_S = 1


def budget_tiers(checkpoint: Path | None, latency_ms: float | None, memory: int | str | None) -> tuple[str, ...]:
    """The TierSet that meets a request's latency and memory budgets, from the checkpoint's
    TierSet profile (``lite-llm tiers profile``); a 400 when there is no profile or nothing fits."""
    profile_hint = f"run `lite-llm tiers profile {checkpoint or 'CKPT'}` first"
    memory_bytes: int | None = None
    if memory is not None:
        from ..store.sizes import parse_bytes

        try:
            memory_bytes = parse_bytes(memory, "memory_budget")
        except LiteLLMError as exc:
            raise APIError(str(exc), param="memory_budget") from None
    table = load_profile(checkpoint) if checkpoint is not None else None
    if table is None:
        raise APIError(
            f"the checkpoint has no TierSet profile to choose by budget; {profile_hint}, or send tier_set instead",
            param="latency_budget_ms", code="no_tier_profile",
        )
    try:
        return tuple(choose(table, latency_ms, memory_bytes).tiers)
    except LiteLLMError as exc:
        raise APIError(str(exc), param="latency_budget_ms", code="budget_unmet") from None


class Server:
    """What the handlers share: the engine, the tokenizer, the model's limits, the counters."""

    def __init__(
        self, engine: Engine, *, model_name: str, checkpoint: Path | None = None, store: Any = None
    ) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.config = engine.model.config
        self.model_name = model_name
        self.checkpoint = checkpoint
        self.store = store
        self.requests = RequestCounter()
        self.started = int(time.time())
        self.token_texts = TokenTexts(self.tokenizer)  # what logprobs show for each token

    # ------------------------------------------------------------------ request -> job
    def tierset(self, request: Any) -> TierSet:
        if request.latency_budget_ms is not None or request.memory_budget is not None:
            return TierSet.of(*budget_tiers(self.checkpoint, request.latency_budget_ms, request.memory_budget))
        try:
            ts = TierSet.coerce(request.tier_set)
            ts.resolve(self.config)
        except LiteLLMError as exc:
            raise APIError(str(exc), param="tier_set", code="unknown_tier") from None
        return ts

    def prompt_ids(self, request: Any) -> list[int]:
        if isinstance(request, ChatRequest):
            if not getattr(self.tokenizer, "chat_template", None):
                raise APIError(
                    "this model has no chat template, so it cannot serve chat completions; use /v1/completions with a plain prompt",
                    param="messages", code="no_chat_template",
                )
            try:
                text = render_chat(self.tokenizer, [{"role": m.role, "content": m.text()} for m in request.messages])
            except LiteLLMError as exc:
                raise APIError(str(exc), param="messages") from None
            return list(self.tokenizer.encode(text))
        prompt = request.prompt
        while isinstance(prompt, list) and not (prompt and all(isinstance(p, int) for p in prompt)):  # a batch: [text] or [[ids]] (lm-eval)
            if len(prompt) != 1:
                raise APIError(f"this server takes one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list):  # token ids
            bad = [p for p in prompt if not 0 <= p < self.config.vocab_size]
            if bad:
                raise APIError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})", param="prompt")
            return list(prompt)
        return list(self.tokenizer.encode_prompt(prompt)) if prompt else []  # with the BOS transformers' tokenizer(prompt) adds

    def echo_text(self, request: Any, ids: list[int]) -> str:
        """The prompt's text as a completion with ``echo`` repeats it: as sent, or decoded from its ids."""
        prompt = request.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(ids, skip_special_tokens=True)

    def job(self, request: Any, sink) -> tuple[Job, int]:
        ids = self.prompt_ids(request)
        if not ids:
            raise APIError("the prompt is empty; send at least one token of text", param="prompt")
        limit = self.config.max_seq_len
        scoring = request.max_tokens == 0  # echo only (parse_request saw to it): the whole context may be prompt
        if len(ids) > limit or (len(ids) == limit and not scoring):
            raise APIError(f"the prompt is {len(ids)} tokens but the model's context is {limit}; shorten it", param="prompt")
        bias = request.bias()
        bad = [t for t in bias if not 0 <= t < self.config.vocab_size]
        if bad:
            raise APIError(f"logit_bias names token {bad[0]}, outside the vocabulary (0..{self.config.vocab_size - 1})", param="logit_bias")
        asked = request.max_tokens
        if isinstance(request, ChatRequest) and request.max_completion_tokens is not None:
            asked = request.max_completion_tokens
        room = limit - len(ids)
        if asked is None:
            asked = room if isinstance(request, ChatRequest) else min(16, room)  # OpenAI's defaults: the rest, or 16
        elif asked > room:
            raise APIError(
                f"max_tokens={asked} plus the prompt's {len(ids)} tokens exceeds the model's context of {limit}; ask for at most {room}",
                param="max_tokens", code="context_length_exceeded",
            )
        top = request.top_logprobs_n()
        params = SamplingParams(
            max_tokens=asked, temperature=request.temperature, top_p=request.top_p if request.top_p < 1 else None,
            top_k=request.top_k, seed=request.sampling_seed(), stop=request.stops(), repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty, logit_bias=bias,
            logprobs=top, prompt_logprobs=bool(getattr(request, "echo", False)) and top is not None,
        )
        return Job(ids, params, self.tierset(request), sink), len(ids)


def create_app(engine: Engine, *, model_name: str, checkpoint: Path | None = None, store: Any = None) -> FastAPI:
    """The FastAPI app serving ``engine``; its lifespan starts the engine and drains it at shutdown."""
    server = Server(engine, model_name=model_name, checkpoint=checkpoint, store=store)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        driver = asyncio.create_task(engine.run(), name="lite-llm-engine")  # the engine runs on this loop
        try:
            yield
        finally:
            engine.stop()  # drain: the driver ends once every admitted and waiting request is done
            await driver

    app = FastAPI(title="Lite LLM", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        server.requests.add(request.url.path, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": server.model_name, "running": engine.running, "queued": engine.queue_depth}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(engine, server.requests, server.store), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{
                "id": server.model_name, "object": "model", "created": server.started, "owned_by": "lite-llm",
                "max_model_len": server.config.max_seq_len, "tiers": [t.name for t in server.config.tiers],
            }],
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(server, request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(server, request, ChatRequest)

    return app


async def _generate(server: Server, http: Request, kind: type) -> Response:
    """Parse, validate, queue, and answer one generation request (whole or streamed)."""
    path = http.url.path
    try:
        body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError("the request body is not valid JSON") from None
    request = parse_request(kind, body)
    check_model(request, server.model_name)
    events: EventChannel[Event] = EventChannel(asyncio.get_running_loop())
    job, _ = server.job(request, events.put)  # the engine puts (on this loop), this handler takes
    echo = server.echo_text(request, job.prompt_ids) if getattr(request, "echo", False) else ""
    top = job.params.logprobs
    shown = None if top is None else LogprobFormat(server.token_texts, chat=kind is ChatRequest, top=top, text_start=len(echo))
    try:
        server.engine.submit(job)
    except QueueFullError as exc:
        raise APIError(str(exc), status=429, type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except EngineStoppedError as exc:
        raise APIError(str(exc), status=503, type="server_error", code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    rid = new_id("chatcmpl" if kind is ChatRequest else "cmpl")
    name = server.model_name
    server.requests.add(path, 200)
    order = [t.name for t in server.config.tiers]
    served_by = {TIER_SET_HEADER: tierset_label(job.tierset.resolve(server.config), order) if order else "all"}
    if request.stream:
        with_usage = bool(request.stream_options and request.stream_options.include_usage)
        renderer = StreamRenderer(rid, name, chat=kind is ChatRequest, with_usage=with_usage)
        return StreamingResponse(_sse(job, events, renderer, echo, shown), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **served_by})
    response = await _whole(http, job, events, rid, name, kind is ChatRequest, echo, shown)
    response.headers.update(served_by)
    return response


async def _whole(
    http: Request, job: Job, events: EventChannel[Event], rid: str, name: str, chat: bool, echo: str, shown: LogprobFormat | None
) -> Response:
    """Wait for the whole text, watching for the client leaving meanwhile."""
    pieces: list[str] = [echo]
    scored: list[TokenLogprob] = []  # the prompt's (echo with logprobs)
    sampled: list[TokenLogprob] = []
    checked = time.monotonic()
    try:
        while True:
            try:
                arrived = await asyncio.wait_for(events.take(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                arrived = []
            if not arrived or time.monotonic() - checked >= DISCONNECT_POLL_S:  # text may arrive faster than the poll
                checked = time.monotonic()
                if await http.is_disconnected():
                    job.cancel()
                    return Response(status_code=499)
            for event in arrived:
                scored.extend(event.prompt_logprobs or ())
                sampled.extend(event.logprobs or ())
                if event.kind == "text":
                    pieces.append(event.text)
                elif event.kind == "error":
                    raise APIError(f"generation failed: {event.message}", status=500, type="server_error")
                else:
                    build = chat_body if chat else completion_body
                    logprobs = shown.render(sampled, prompt=scored) if shown is not None else None
                    return JSONResponse(build(rid, name, "".join(pieces), event.finish_reason, event.prompt_tokens, event.completion_tokens,
                                              logprobs))
    finally:
        job.cancel()  # a no-op once the job is done; stops it when this handler is cancelled


async def _sse(
    job: Job, events: EventChannel[Event], renderer: StreamRenderer, echo: str = "", shown: LogprobFormat | None = None
) -> AsyncIterator[str]:
    """Server-sent events: the echoed prompt first (with its logprobs when asked for), one chunk
    per text piece (with the logprobs of the tokens sampled since the last chunk), a final chunk
    with the finish reason, the usage chunk when asked for, then ``data: [DONE]``.  Whatever
    arrived while the last write was going out is written together (still one event per piece)."""
    try:
        opening = renderer.opening()
        if opening:
            yield opening
        while True:
            out: list[str] = []
            for event in await events.take():
                if echo and event.kind != "error":
                    out.append(renderer.text(echo, shown.render((), prompt=event.prompt_logprobs) if shown is not None else None))
                    echo = ""
                if event.kind == "text":
                    out.append(renderer.text(event.text, shown.render(event.logprobs or ()) if shown is not None else None))
                    continue
                left = shown.render(event.logprobs) if shown is not None and event.logprobs else None
                out.append(renderer.error(event.message) if event.kind == "error" else
                           renderer.finish(event.finish_reason, event.prompt_tokens, event.completion_tokens, left))
                yield "".join(out)
                return
            yield "".join(out)
    finally:
        job.cancel()  # the client left (CancelledError / GeneratorExit) or the stream ended: either way, no more tokens
