"""The OpenAI wire format: request models, their validation, error bodies and response objects.

Requests are parsed here, not by FastAPI's signature machinery, so that every way a body can be
wrong — not JSON, a field of the wrong type (types are strict: ``"stream": "yes"`` or ``"max_tokens": true`` is refused,
not converted), ``n != 1``, an unknown tier, ``max_tokens`` past
the context — answers HTTP 400 with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` (FastAPI would say 422 in its own shape,
which OpenAI clients do not read).  Lite LLM's own fields sit beside OpenAI's, as vLLM's do:
``tier_set``, ``latency_budget_ms``, ``memory_budget``, ``top_k``, ``repetition_penalty``.

OpenAI's fields are either implemented — ``model`` (another name than the one served is a
404, as OpenAI and vLLM answer), ``max_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``logprobs`` (and chat's
``top_logprobs``), ``echo``, ``stream``, ``stream_options`` — or, when one this server does not
implement is set to anything but its default (``n``, ``best_of``, ``suffix``,
``response_format``, ``tools``, ``tool_choice``, ``functions``, ``function_call``), answered 400
naming it: a client is never told 200 for a request it did not get.  So is a field no request
model here has (a typo, another server's option), with a did-you-mean; only nulls and
OpenAI's bookkeeping fields (:data:`IGNORED_FIELDS`) are taken and ignored.  Inside a message or
a content part, unknown keys (``name``) are ignored.
"""

from __future__ import annotations

import difflib
import json
import math
import secrets
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import LiteLLMError
from ..generate import FREQUENCY_PENALTY_RANGE, LOGIT_BIAS_RANGE, PENALTY_RANGE


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
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo (checked in parse_request)
    # the numbers' ranges are checked in parse_request, so that NaN gets a message that says so
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias
    response_format: Any = None  # only {"type": "text"}
    n: int | None = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: str | None = None
    # Lite LLM's own (extra_body in the openai client)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float | None = 1.0
    tier_set: Union[str, list[str], None] = None
    latency_budget_ms: float | None = Field(None, gt=0)
    memory_budget: Union[int, float, str, None] = None  # bytes (2e9 is read as 2000000000) or a size such as "2GB"

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling_seed(self) -> int:
        """The request's seed, or a fresh random one (OpenAI: no seed, no reproducibility)."""
        return self.seed if self.seed is not None else secrets.randbits(63)

    def bias(self) -> dict[int, float]:
        """``logit_bias`` with int keys (checked in parse_request; the vocabulary in the app)."""
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)  # the likeliest tokens to list at each position
    best_of: int | None = None  # only 1
    suffix: str | None = None  # not supported

    def top_logprobs_n(self) -> int | None:
        return self.logprobs


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
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
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # not supported: no function calling
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None

    def top_logprobs_n(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def parse_request(model: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body against ``model``, or raise a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    _refuse_unknown_fields(model, body)
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        raise _invalid(exc.errors()) from None
    if isinstance(request, ChatRequest):
        for i, message in enumerate(request.messages):
            if message.role != "assistant" and "content" not in message.model_fields_set:
                raise APIError(f"messages[{i}] has no content; a {message.role} message needs one", param=f"messages.{i}.content")
    _check_numbers(request)
    _refuse_unsupported(request)
    if request.stream_options is not None and not request.stream:
        raise APIError("stream_options is only allowed when stream is true", param="stream_options")
    if request.max_tokens == 0 and not getattr(request, "echo", False):
        raise APIError("max_tokens must be at least 1; 0 is allowed only with echo=true (to score the prompt)", param="max_tokens")
    for key, value in (request.logit_bias or {}).items():
        if not key.strip().lstrip("-").isdigit():
            raise APIError(f"logit_bias keys must be token ids written as integers, got {key!r}", param="logit_bias")
        low, high = LOGIT_BIAS_RANGE
        if not (math.isfinite(value) and low <= value <= high):
            raise APIError(f"logit_bias values must be finite numbers between {low:g} and {high:g}, got {value!r} for token {key}", param="logit_bias")
    if isinstance(request, ChatRequest) and request.top_logprobs and not request.logprobs:
        raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
    if request.tier_set is not None and (request.latency_budget_ms is not None or request.memory_budget is not None):
        raise APIError(
            "give either tier_set or latency_budget_ms/memory_budget, not both: the budgets choose the TierSet", param="tier_set"
        )
    return request


# What a field that may take several shapes must be, said once for all its shapes (pydantic
# reports a failed union as one error per shape, tagged with the shape's type).
_SHAPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "content": 'a string, a list of text parts ({"type": "text", "text": ...}) or null',
    "stop": "a string, a list of strings or null",
    "tier_set": "a TierSet name such as \"upto:tier_1b\", a list of tier names or null",
    "memory_budget": "a number of bytes, a size such as \"2GB\" or null",
}


def _invalid(errors: list[dict[str, Any]]) -> APIError:
    """The 400 for a body pydantic refused: the first bad field, in one sentence."""
    first = errors[0]
    path = list(first.get("loc", ()))
    field = str(path[0]) if path else None
    if first.get("type") == "missing":
        return APIError(f"the request is missing the required field '{field}'", param=field)
    for error in errors:  # a chat content part of another type than text: say that, not which shape failed
        loc = error.get("loc", ())
        if error.get("type") == "literal_error" and "content" in loc and loc[-1] == "type":
            return APIError(f"content parts of type {error.get('input')!r} are not supported: this server takes text only "
                            '({"type": "text", "text": ...})', param=field)
    for i, part in enumerate(path):
        if part in _SHAPES and i + 1 < len(path) and isinstance(path[i + 1], str):  # the next element names a shape of the union
            where = ".".join(str(p) for p in path[: i + 1])
            return APIError(f"field '{where}' must be {_SHAPES[part]}", param=field)
    loc = ".".join(str(p) for p in path)
    return APIError(f"field '{loc}' is invalid: {first.get('msg', 'is invalid')}", param=field)


# field: (default when null, lowest, highest, whether the lowest itself is refused)
_NUMBERS = {
    "temperature": (1.0, 0.0, 2.0, False),
    "top_p": (1.0, 0.0, 1.0, True),
    "presence_penalty": (0.0, *FREQUENCY_PENALTY_RANGE, False),
    "frequency_penalty": (0.0, *FREQUENCY_PENALTY_RANGE, False),
    "repetition_penalty": (1.0, *PENALTY_RANGE, False),
}


def _check_numbers(request: _Sampling) -> None:
    """Null means the default; anything else must be finite and in range (NaN compares false
    with everything, so pydantic's bounds would call it too large)."""
    for name, (default, low, high, open_low) in _NUMBERS.items():
        value = getattr(request, name)
        if value is None:
            setattr(request, name, default)
            continue
        if math.isfinite(value) and (low < value if open_low else low <= value) and value <= high:
            continue
        between = f"greater than {low:g} and at most {high:g}" if open_low else f"between {low:g} and {high:g}"
        raise APIError(f"{name} must be a finite number {between}, got {value!r}", param=name)


# OpenAI fields that change nothing this server computes (bookkeeping and caching hints):
# taken and ignored, as OpenAI itself takes them.  Any other field the request model does not
# have is a 400: a typo ("temprature") or another server's option ("ignore_eos", "min_p") would
# otherwise be a 200 that silently did something else than asked.
IGNORED_FIELDS = frozenset({"metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "parallel_tool_calls"})


def _refuse_unknown_fields(model: type[BaseModel], body: dict[str, Any]) -> None:
    known = set(model.model_fields)
    for name, value in body.items():
        if name in known or name in IGNORED_FIELDS or value is None:  # null is "not given", as clients send it
            continue
        close = difflib.get_close_matches(str(name), sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; remove it"
        raise APIError(f"field {name!r} is not supported by this server (it would be ignored){hint}", param=str(name))


def _refuse_unsupported(request: _Sampling) -> None:
    """A 400 naming the first OpenAI field that asks for something this server does not do."""
    if request.n not in (None, 1):
        raise APIError(f"this server generates one choice per request; n must be 1, got {request.n}", param="n")
    if getattr(request, "best_of", None) not in (None, 1):
        raise APIError(f"this server generates one sequence per request; best_of must be 1, got {request.best_of}", param="best_of")
    if getattr(request, "suffix", None):
        raise APIError("suffix is not supported: this server only continues a prompt, it does not fill in before a suffix", param="suffix")
    rf = request.response_format
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise APIError('response_format is not supported: this server does not constrain its output; only {"type": "text"} is accepted',
                       param="response_format")
    for name in ("tools", "functions"):
        if getattr(request, name, None):
            raise APIError(f"{name} are not supported: this server does not call functions", param=name)
    for name in ("tool_choice", "function_call"):
        if getattr(request, name, None) not in (None, "none"):
            raise APIError(f"{name} is not supported: this server does not call functions", param=name)


def check_model(request: _Sampling, served: str) -> None:
    """A 404 when ``model`` names another model than the one served (a missing one is fine)."""
    if request.model is not None and request.model != served:
        raise APIError(
            f"The model `{request.model}` does not exist; this server serves `{served}` (GET /v1/models)",
            status=404, param="model", code="model_not_found",
        )


# ------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_body(
    rid: str, model: str, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int, logprobs: dict | None = None
) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(
    rid: str, model: str, text: str, finish_reason: str | None, with_usage: bool, created: int, logprobs: dict | None = None
) -> dict:
    chunk = {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def chat_body(
    rid: str, model: str, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int, logprobs: dict | None = None
) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(
    rid: str, model: str, delta: dict, finish_reason: str | None, with_usage: bool, created: int, logprobs: dict | None = None
) -> dict:
    chunk = {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
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
    of a string per token rather than of a whole nested dict).  A chunk that carries logprobs
    is rendered whole."""

    def __init__(self, rid: str, model: str, *, chat: bool, with_usage: bool) -> None:
        self.rid, self.model, self.chat, self.with_usage = rid, model, chat, with_usage
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"
        rendered = json.dumps(self._chunk(_TEXT_SLOT, None), ensure_ascii=False)
        self._before, self._after = rendered.split(json.dumps(_TEXT_SLOT, ensure_ascii=False))

    def _chunk(self, text: str, finish_reason: str | None, *, role: bool = False, logprobs: dict | None = None) -> dict:
        if not self.chat:
            return completion_chunk(self.rid, self.model, text, finish_reason, self.with_usage, self.created, logprobs)
        delta = {"role": "assistant", "content": text} if role else ({"content": text} if finish_reason is None else {})
        return chat_chunk(self.rid, self.model, delta, finish_reason, self.with_usage, self.created, logprobs)

    def opening(self) -> str:
        """Chat streams start with the assistant's role and empty content, as OpenAI's do."""
        return sse(self._chunk("", None, role=True)) if self.chat else ""

    def text(self, piece: str, logprobs: dict | None = None) -> str:
        if logprobs is not None:
            return sse(self._chunk(piece, None, logprobs=logprobs))
        return f"data: {self._before}{json.dumps(piece, ensure_ascii=False)}{self._after}\n\n"

    def finish(self, reason: str | None, prompt_tokens: int, completion_tokens: int, logprobs: dict | None = None) -> str:
        """The chunk with the finish reason (and the logprobs of tokens no text chunk carried),
        the usage chunk when asked for, and ``[DONE]``."""
        out = sse(self._chunk("", reason, logprobs=logprobs))
        if self.with_usage:
            out += sse(usage_chunk(self.rid, self.model, self.object, prompt_tokens, completion_tokens, self.created))
        return out + SSE_DONE

    def error(self, message: str) -> str:
        return sse({"error": {"message": f"generation failed: {message}", "type": "server_error", "param": None, "code": None}}) + SSE_DONE


SSE_DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
