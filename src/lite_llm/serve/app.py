"""The HTTP server: an OpenAI-compatible FastAPI app in front of the batching engine.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as server-sent events
ending with ``data: [DONE]``, or whole), ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

Behaviour under pressure, and why it is built so:

* a client that leaves stops its generation within a decode step or two: a streamed
  response flags its job as soon as Starlette's disconnect listener hears the client go
  (:class:`GenerationStream`); a whole response polls ``request.is_disconnected()`` while it
  waits; the engine drops flagged rows at the next token boundary.  Starlette's own reaction
  to a disconnect, cancelling the generator, cannot be relied on: anyio delivers that
  cancellation only while the task waits on a future not yet done, and when every decode step
  puts a piece of text the engine (which runs on the loop) completes that future before each
  delivery attempt — the generator was never cancelled and the row decoded to ``max_tokens``
  for nobody.  The generator's ``finally`` still flags the job too (it is what a server that
  reports disconnects by failing ``send`` reaches);
* the engine's queue is bounded: a request that finds it full is answered 429 with
  ``Retry-After`` at once, before any work;
* every bad request is a 4xx with OpenAI's error body (:mod:`.protocol`), and the server
  carries on: 400 for a body that is not JSON (nested too deep for the parser included) or a
  string that is not Unicode (a lone surrogate escape such as ``"\\ud800"``), 415 for a body sent
  as anything but JSON, 413 for one over ``max_body_bytes`` (refused from its Content-Length
  before it is read, or as soon as it grows past the limit), and 404/405 for a path or method
  the server does not have;
* a prompt long enough to take a while to tokenize (a few hundred kB of text) is tokenized on a
  worker thread — the Rust tokenizer's batch call releases the GIL — so the requests decoding
  meanwhile keep streaming instead of stalling for seconds behind it;
* SIGTERM: uvicorn stops accepting, lets in-flight responses finish (the engine keeps
  running them), then the lifespan's shutdown drains and stops the engine.  A second Ctrl-C
  (`lite-llm serve` calls :meth:`Engine.abort`) ends every request in flight at the next token
  boundary — a stream with an error event and ``[DONE]``, a whole response with a 503 — so the
  connections close and the server exits at once, without a traceback.
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import TierSet
from ..data.tokenizer import render_chat
from ..errors import LiteLLMError, PromptError
from ..generate import check_prompt
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
MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body larger than this is a 413 (`lite-llm serve --max-body-size`)
THREAD_TOKENIZE_CHARS = 64 * 1024  # a text longer than this is tokenized off the event loop
ROUTES = "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health and GET /metrics"


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
    param = "latency_budget_ms" if latency_ms is not None else "memory_budget"  # the field the request gave
    if checkpoint is None:
        raise APIError(
            "choosing a TierSet by budget needs the TierSet profile of a local checkpoint, and this server serves one from a URL; "
            "send tier_set instead", param=param, code="no_tier_profile",
        )
    table = load_profile(checkpoint)
    if table is None:
        raise APIError(
            f"the checkpoint has no TierSet profile to choose by budget; {profile_hint}, or send tier_set instead",
            param=param, code="no_tier_profile",
        )
    try:
        return tuple(choose(table, latency_ms, memory_bytes).tiers)
    except LiteLLMError as exc:
        raise APIError(str(exc), param=param, code="budget_unmet") from None


class Server:
    """What the handlers share: the engine, the tokenizer, the model's limits, the counters."""

    def __init__(
        self, engine: Engine, *, model_name: str, checkpoint: Path | None = None, store: Any = None, max_body_bytes: int = MAX_BODY_BYTES
    ) -> None:
        self.engine = engine
        self.max_body_bytes = max_body_bytes
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

    async def encode(self, text: str, *, special: bool) -> list[int]:
        """``text``'s ids (with the tokenizer's own special tokens when ``special``, as
        ``encode_prompt`` gives them; without, as ``encode``).  A long text is tokenized on a
        worker thread through the Rust tokenizer's batch call, which releases the GIL (its
        single-text call does not): the event loop, which drives the engine, keeps streaming the
        other requests' tokens meanwhile.  Same ids either way."""
        backend = getattr(self.tokenizer, "backend", None)
        if len(text) > THREAD_TOKENIZE_CHARS and hasattr(backend, "encode_batch"):
            encoded = await asyncio.to_thread(backend.encode_batch, [text], add_special_tokens=special)
            return list(encoded[0].ids)
        return list(self.tokenizer.encode_prompt(text) if special else self.tokenizer.encode(text))

    async def prompt_ids(self, request: Any) -> list[int]:
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
            return await self.encode(text, special=False)
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
        return await self.encode(prompt, special=True) if prompt else []  # with the BOS transformers' tokenizer(prompt) adds

    def echo_text(self, request: Any, ids: list[int]) -> str:
        """The prompt's text as a completion with ``echo`` repeats it: as sent, or decoded from its ids."""
        prompt = request.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(ids, skip_special_tokens=True)

    async def job(self, request: Any, sink) -> tuple[Job, int]:
        limit = self.config.max_seq_len
        scoring = request.max_tokens == 0  # echo only (parse_request saw to it): the whole context may be prompt
        ids = await self.prompt_ids(request)
        try:
            ids = check_prompt(ids, limit, room=0 if scoring else 1)
        except PromptError as exc:  # empty, or longer than the context
            raise APIError(str(exc), param="messages" if isinstance(request, ChatRequest) else "prompt",
                           code="context_length_exceeded" if ids else None) from None
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


def create_app(
    engine: Engine, *, model_name: str, checkpoint: Path | None = None, store: Any = None, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """The FastAPI app serving ``engine``; its lifespan starts the engine and drains it at
    shutdown.  A request body over ``max_body_bytes`` is answered 413."""
    server = Server(engine, model_name=model_name, checkpoint=checkpoint, store=store, max_body_bytes=max_body_bytes)

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
        # counted by route, not by the path asked for: a scan of made-up paths must not grow /metrics
        server.requests.add(getattr(request.scope.get("route"), "path", "other"), exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own answers (no such path, wrong method) in OpenAI's error body too."""
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            error = APIError(f"there is no {where} on this server; it answers {ROUTES}", status=404, code="not_found")
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            error = APIError(f"{request.url.path} does not take {request.method}; use {allowed or 'another method'}",
                             status=405, code="method_not_allowed", headers=exc.headers)
        else:
            error = APIError(f"{where} failed: {exc.detail}", status=exc.status_code, headers=exc.headers)
        return await api_error(request, error)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        """A bug's 500, in OpenAI's error body (Starlette still logs the traceback)."""
        error = APIError(f"the server failed on this request ({type(exc).__name__}); it is logged", status=500, type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": server.model_name, "running": engine.running, "queued": engine.queue_depth}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(engine, server.requests, server.store), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {
            "id": server.model_name, "object": "model", "created": server.started, "owned_by": "lite-llm",
            "max_model_len": server.config.max_seq_len, "tiers": [t.name for t in server.config.tiers],
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:  # the openai client's models.retrieve
        if model != server.model_name:
            raise APIError(f"The model `{model}` does not exist; this server serves `{server.model_name}` (GET /v1/models)",
                           status=404, param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(server, request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(server, request, ChatRequest)

    return app


class GenerationStream(StreamingResponse):
    """A streamed generation that stops its job the moment the client is heard leaving (see
    the module's notes: the generator's cancellation may never land while text keeps coming)."""

    def __init__(self, job: Job, content: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.job = job

    async def listen_for_disconnect(self, receive: Any) -> None:
        await super().listen_for_disconnect(receive)
        self.job.cancel()  # the engine drops the row at the next token boundary; the stream then ends


async def _generate(server: Server, http: Request, kind: type) -> Response:
    """Parse, validate, queue, and answer one generation request (whole or streamed)."""
    path = http.url.path
    body = await _read_json(http, server.max_body_bytes)
    request = parse_request(kind, body)
    check_model(request, server.model_name)
    events: EventChannel[Event] = EventChannel(asyncio.get_running_loop())
    job, _ = await server.job(request, events.put)  # the engine puts (on this loop), this handler takes
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
        return GenerationStream(job, _sse(job, events, renderer, echo, shown), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **served_by})
    response = await _whole(http, job, events, rid, name, kind is ChatRequest, echo, shown)
    response.headers.update(served_by)
    return response


async def _read_json(http: Request, limit: int) -> Any:
    """The request's JSON body: a 415 when it is declared as something else, a 413 past
    ``limit`` bytes (from Content-Length before reading, else as soon as it grows past it), a
    400 when it does not parse (nested too deep for the parser included) or holds a string
    that is not Unicode."""
    declared = http.headers.get("content-type")
    if declared:
        media = declared.split(";", 1)[0].strip().lower()
        if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
            raise APIError(f"the request body must be JSON sent as Content-Type: application/json, not {media or declared!r}",
                           status=415, code="unsupported_media_type")
    too_large = f"the request body is larger than this server takes ({limit:,} bytes); send a shorter prompt"
    length = http.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(too_large, status=413, code="request_too_large")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(too_large, status=413, code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError("the request body is not valid JSON") from None
    except RecursionError:
        raise APIError("the request body is nested too deeply to read as JSON") from None
    if b"\\u" in raw:  # only an escape makes a lone surrogate (raw UTF-8 cannot hold one)
        bad = _lone_surrogate(body)
        if bad is not None:
            raise APIError(f"the request body holds a string that is not valid Unicode (a lone surrogate, {bad!r})")
    return body


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in a decoded JSON value's strings and keys, or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return item[exc.start]
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


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
                    raise APIError(f"generation failed: {event.message}", status=event.status, type="server_error",
                                   code="shutting_down" if event.status == 503 else None)
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
