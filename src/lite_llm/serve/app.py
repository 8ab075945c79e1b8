"""The OpenAI-compatible HTTP server: ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (streamed as server-sent events ending ``data: [DONE]``), ``/health``
and ``/metrics`` (Prometheus text).

Bad input is HTTP 400 with OpenAI's error body (``{"error": {"message", "type", "param",
"code"}}``) and the server keeps serving; a full queue is 429 with ``Retry-After``.  Requests
are generated one at a time by :class:`~.engine.Engine` (no continuous batching yet).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..config import TierSet
from ..errors import LiteLLMError
from .engine import Engine, Job, QueueFull, is_done
from .protocol import BadRequest, GenerationRequest, check_tier_set, parse_request


def error_response(status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def build_app(model: Any, tokenizer: Any, *, checkpoint: Path, model_name: str, max_queue: int = 16, store: Any = None) -> FastAPI:
    """The server for one loaded model (``checkpoint`` is read for its TierSet profile)."""
    engine = Engine(model, tokenizer, max_queue=max_queue, store=store)
    app = FastAPI(title="Lite LLM", docs_url=None, redoc_url=None)
    app.state.engine = engine
    started = time.time()

    @app.on_event("shutdown")
    def _drain() -> None:  # uvicorn has let in-flight requests finish; stop the worker
        engine.close()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started), "owned_by": "lite-llm"}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        return _metrics_text(engine)

    async def generate(request: Request, chat: bool) -> Any:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error_response(400, "the request body is not valid JSON")
        try:
            req = parse_request(body, chat=chat)
            tierset = _tierset_for(req, model.config, checkpoint)
            if chat and not getattr(tokenizer, "chat_template", None):
                raise BadRequest("this model's tokenizer has no chat template; use /v1/completions with a prompt", "messages")
            prompt_ids = engine.prompt_ids(req)
            limit = model.config.max_seq_len
            if len(prompt_ids) + req.max_tokens > limit:
                raise BadRequest(
                    f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({req.max_tokens}) exceeds the model's context of {limit} tokens; "
                    f"ask for at most {max(limit - len(prompt_ids), 0)} tokens", "max_tokens",
                )
        except LiteLLMError as err:
            return error_response(400, str(err), param=getattr(err, "param", None))
        try:
            job = engine.submit(req, tierset, prompt_ids)
        except QueueFull:
            return error_response(429, "the server is busy (its queue is full); retry shortly", kind="rate_limit_error", headers={"Retry-After": "1"})
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            return StreamingResponse(_stream(request, job, rid, model_name), media_type="text/event-stream")
        try:
            text = "".join([piece async for piece in _pieces(job)])
        except BaseException:
            job.cancelled.set()  # the client left while waiting: stop its generation
            raise
        if job.error is not None:
            return error_response(500, f"generation failed: {job.error}", kind="server_error")
        return _whole_response(job, rid, model_name, text)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, chat=True)

    return app


def _tierset_for(req: GenerationRequest, config: Any, checkpoint: Path) -> TierSet:
    """The request's TierSet: named, or chosen from the checkpoint's profile to fit its budgets."""
    if req.latency_budget_ms is None and req.memory_budget is None:
        return check_tier_set(config, req.tier_set)
    from .selection import choose, load_profile

    table = load_profile(checkpoint)
    if table is None:
        raise BadRequest("latency and memory budgets need a TierSet profile; run `lite-llm tiers profile CKPT --data ...` first", "latency_budget_ms")
    try:
        picked = choose(table, req.latency_budget_ms, req.memory_budget)
    except LiteLLMError as err:
        raise BadRequest(str(err), "latency_budget_ms") from None
    return check_tier_set(config, list(picked.tiers))


async def _pieces(job: Job) -> AsyncIterator[str]:
    while True:
        item = await job.pieces.get()
        if is_done(item):
            return
        yield item  # type: ignore[misc]


def _usage(job: Job) -> dict[str, int]:
    p, c = int(job.outcome.get("prompt_tokens", len(job.prompt_ids))), int(job.outcome.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _whole_response(job: Job, rid: str, model_name: str, text: str) -> dict[str, Any]:
    finish = job.outcome.get("finish_reason", "length")
    if job.request.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model_name, "choices": [choice], "usage": _usage(job)}


async def _stream(request: Request, job: Job, rid: str, model_name: str) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text piece, a last one with ``finish_reason``, the
    usage chunk when asked, then ``data: [DONE]``.  Leaving (disconnect or cancellation, a
    ``BaseException``) stops the job's generation."""
    chat, created = job.request.chat, int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            d: dict[str, Any] = {}
            if role:
                d["role"] = "assistant"
            if delta is not None:
                d["content"] = delta
            choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        body = {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [choice]}
        if job.request.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            yield chunk("", None, role=True)
        async for piece in _pieces(job):
            if await request.is_disconnected():
                job.cancelled.set()
                return
            yield chunk(piece, None)
        if job.error is not None:
            yield f"data: {json.dumps({'error': {'message': f'generation failed: {job.error}', 'type': 'server_error'}})}\n\n"
            return
        yield chunk(None if chat else "", job.outcome.get("finish_reason", "length"))
        if job.request.include_usage:
            usage = {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [], "usage": _usage(job)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    except BaseException:
        job.cancelled.set()
        raise


def _metrics_text(engine: Engine) -> str:
    s = engine.stats
    lines = [
        "# HELP lite_llm_requests_total Generation requests accepted.", "# TYPE lite_llm_requests_total counter",
        f"lite_llm_requests_total {s.requests}",
        "# HELP lite_llm_requests_cancelled_total Requests whose client left before the end.", "# TYPE lite_llm_requests_cancelled_total counter",
        f"lite_llm_requests_cancelled_total {s.cancelled}",
        "# HELP lite_llm_generated_tokens_total Tokens generated.", "# TYPE lite_llm_generated_tokens_total counter",
        f"lite_llm_generated_tokens_total {s.generated_tokens}",
        "# HELP lite_llm_tokens_per_second Tokens generated per second of generation.", "# TYPE lite_llm_tokens_per_second gauge",
        f"lite_llm_tokens_per_second {s.generated_tokens / s.busy_s if s.busy_s else 0.0}",
        "# HELP lite_llm_queue_depth Requests waiting for the engine.", "# TYPE lite_llm_queue_depth gauge",
        f"lite_llm_queue_depth {engine.queue_depth}",
        "# HELP lite_llm_time_to_first_token_seconds Time from arrival to the first text.", "# TYPE lite_llm_time_to_first_token_seconds summary",
        f"lite_llm_time_to_first_token_seconds_sum {s.ttft_sum_s}", f"lite_llm_time_to_first_token_seconds_count {s.ttft_count}",
    ]
    if engine.store is not None:
        hot = engine.store.stats().hot
        lines += ["# HELP lite_llm_expert_store_hit_rate Hot-level hit rate of the expert store.", "# TYPE lite_llm_expert_store_hit_rate gauge",
                  f"lite_llm_expert_store_hit_rate {hot.hit_rate}"]
    return "\n".join(lines) + "\n"
