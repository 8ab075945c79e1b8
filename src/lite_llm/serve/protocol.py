"""The OpenAI wire format: request models, their validation, error bodies and response objects.

Requests are parsed here, not by FastAPI's signature machinery, so that every way a body can be
wrong — not JSON, a field of the wrong type, ``n != 1``, an unknown tier, ``max_tokens`` past
the context — answers HTTP 400 with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` (FastAPI would say 422 in its own shape,
which OpenAI clients do not read).  Lite LLM's own fields sit beside OpenAI's, as vLLM's do:
``tier_set``, ``latency_budget_ms``, ``memory_budget``, ``top_k``, ``repetition_penalty``.
Unknown fields are ignored, as OpenAI's API ignores them.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import LiteLLMError
from ..generate import PENALTY_RANGE


class APIError(LiteLLMError):
    """An error the server answers with an OpenAI-style body; the message is one sentence."""

    def __init__(
        self, message: str, *, status: int = 400, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------ requests
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: str | None = None
    # Lite LLM's own (extra_body in the openai client)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    tier_set: Union[str, list[str], None] = None
    latency_budget_ms: float | None = Field(None, gt=0)
    memory_budget: Union[int, str, None] = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling_seed(self) -> int:
        """The request's seed, or a fresh random one (OpenAI: no seed, no reproducibility)."""
        return self.seed if self.seed is not None else secrets.randbits(63)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def parse_request(model: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body against ``model``, or raise a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        field = str(first["loc"][0]) if first.get("loc") else None
        detail = first.get("msg", "is invalid")
        if first.get("type") == "missing":
            raise APIError(f"the request is missing the required field '{field}'", param=field) from None
        raise APIError(f"field '{loc}' is invalid: {detail}", param=field) from None
    if request.n != 1:
        raise APIError(f"this server generates one choice per request; n must be 1, got {request.n}", param="n")
    if request.tier_set is not None and (request.latency_budget_ms is not None or request.memory_budget is not None):
        raise APIError(
            "give either tier_set or latency_budget_ms/memory_budget, not both: the budgets choose the TierSet", param="tier_set"
        )
    return request


# ------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(rid: str, model: str, text: str, finish_reason: str | None, with_usage: bool, created: int) -> dict:
    chunk = {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def chat_body(rid: str, model: str, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None, with_usage: bool, created: int) -> dict:
    chunk = {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int, created: int) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


_TEXT_SLOT = "\u0000lite-llm-text\u0000"  # a string no JSON rendering of real text produces


class StreamRenderer:
    """One streamed response's server-sent events, as text ready to write.

    Every chunk of a stream shares its id, ``created`` time and model, so a text chunk is
    rendered once with a placeholder and each piece of text is spliced in (one ``json.dumps``
    of a string per token rather than of a whole nested dict)."""

    def __init__(self, rid: str, model: str, *, chat: bool, with_usage: bool) -> None:
        self.rid, self.model, self.chat, self.with_usage = rid, model, chat, with_usage
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"
        rendered = json.dumps(self._chunk(_TEXT_SLOT, None), ensure_ascii=False)
        self._before, self._after = rendered.split(json.dumps(_TEXT_SLOT, ensure_ascii=False))

    def _chunk(self, text: str, finish_reason: str | None, *, role: bool = False) -> dict:
        if not self.chat:
            return completion_chunk(self.rid, self.model, text, finish_reason, self.with_usage, self.created)
        delta = {"role": "assistant", "content": text} if role else ({"content": text} if finish_reason is None else {})
        return chat_chunk(self.rid, self.model, delta, finish_reason, self.with_usage, self.created)

    def opening(self) -> str:
        """Chat streams start with the assistant's role and empty content, as OpenAI's do."""
        return sse(self._chunk("", None, role=True)) if self.chat else ""

    def text(self, piece: str) -> str:
        return f"data: {self._before}{json.dumps(piece, ensure_ascii=False)}{self._after}\n\n"

    def finish(self, reason: str | None, prompt_tokens: int, completion_tokens: int) -> str:
        """The chunk with the finish reason, the usage chunk when asked for, and ``[DONE]``."""
        out = sse(self._chunk("", reason))
        if self.with_usage:
            out += sse(usage_chunk(self.rid, self.model, self.object, prompt_tokens, completion_tokens, self.created))
        return out + SSE_DONE

    def error(self, message: str) -> str:
        return sse({"error": {"message": f"generation failed: {message}", "type": "server_error", "param": None, "code": None}}) + SSE_DONE


SSE_DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
