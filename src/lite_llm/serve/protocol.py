"""The OpenAI request bodies the server accepts, checked into one :class:`GenerationRequest`.

OpenAI's fields (``prompt``/``messages``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop``, ``n``, ``stream``, ``stream_options``) and Lite LLM's own beside them, as vLLM puts
its own (``extra_body`` in the openai client): ``tier_set`` (``"upto:tier_1b"``, a list of
tier names, ...) or ``latency_budget_ms`` / ``memory_budget``.  Unknown fields are ignored, as
OpenAI's server ignores them; a known field of the wrong type is a :class:`BadRequest` naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig, TierSet
from ..store.sizes import parse_bytes
from ..errors import LiteLLMError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


class BadRequest(LiteLLMError):
    """A request the server answers with HTTP 400 (``param`` names the field at fault)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class GenerationRequest:
    """One request, checked: what the engine generates and how the answer is shaped."""

    chat: bool
    prompt: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float | None = None
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    tier_set: str | list[str] | None = None
    latency_budget_ms: float | None = None
    memory_budget: int | None = None
    model: str = ""


def _typed(body: dict, name: str, types: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in types:
        raise BadRequest(f"'{name}' must be {what}, not {value!r}", name)
    if not isinstance(value, types):
        raise BadRequest(f"'{name}' must be {what}, not {value!r}", name)
    return value


def parse_request(body: Any, *, chat: bool) -> GenerationRequest:
    """Check a completions (``chat=False``) or chat-completions body."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    req = GenerationRequest(chat=chat, model=str(body.get("model") or ""))
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BadRequest("each message must be an object with a string 'role' and a string 'content'", "messages")
        req.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string", "prompt")
        req.prompt = prompt
    max_tokens = _typed(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens", (int,), "a whole number")
    if max_tokens is not None:
        if max_tokens < 1:
            raise BadRequest(f"'max_tokens' must be at least 1, not {max_tokens}", "max_tokens")
        req.max_tokens = max_tokens
    temperature = _typed(body, "temperature", (int, float), "a number from 0 to 2")
    if temperature is not None:
        if not (0 <= temperature <= 2):
            raise BadRequest(f"'temperature' must be from 0 to 2, not {temperature}", "temperature")
        req.temperature = float(temperature)
    top_p = _typed(body, "top_p", (int, float), "a number in (0, 1]")
    if top_p is not None:
        if not (0 < top_p <= 1):
            raise BadRequest(f"'top_p' must be in (0, 1], not {top_p}", "top_p")
        req.top_p = None if top_p == 1 else float(top_p)
    seed = _typed(body, "seed", (int,), "a whole number")
    if seed is not None:
        if seed < 0:
            raise BadRequest(f"'seed' must be 0 or more, not {seed}", "seed")
        req.seed = seed
    n = _typed(body, "n", (int,), "1")
    if n not in (None, 1):
        raise BadRequest(f"'n' must be 1 (one choice per request), not {n}", "n")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
            raise BadRequest("'stop' must be a string or a list of up to 4 strings", "stop")
        req.stop = [s for s in stops if s]
    stream = _typed(body, "stream", (bool,), "true or false")
    req.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object such as {\"include_usage\": true}", "stream_options")
        req.include_usage = bool(options.get("include_usage"))
    _parse_tier_fields(body, req)
    return req


def _parse_tier_fields(body: dict, req: GenerationRequest) -> None:
    tier_set = body.get("tier_set")
    if tier_set is not None and not (isinstance(tier_set, str) or (isinstance(tier_set, list) and all(isinstance(t, str) for t in tier_set))):
        raise BadRequest("'tier_set' must be a TierSet string such as \"upto:tier_1b\" or a list of tier names", "tier_set")
    req.tier_set = tier_set
    latency = _typed(body, "latency_budget_ms", (int, float), "a positive number of milliseconds per token")
    if latency is not None and not (latency > 0 and math.isfinite(latency)):
        raise BadRequest(f"'latency_budget_ms' must be a positive number, not {latency}", "latency_budget_ms")
    req.latency_budget_ms = None if latency is None else float(latency)
    memory = body.get("memory_budget")
    if memory is not None:
        try:
            req.memory_budget = parse_bytes(memory, "memory_budget")
        except (LiteLLMError, ValueError, TypeError):
            raise BadRequest(f"'memory_budget' must be a size such as \"512MB\" or a number of bytes, not {memory!r}", "memory_budget") from None
    if tier_set is not None and (req.latency_budget_ms is not None or req.memory_budget is not None):
        raise BadRequest("give either 'tier_set' or budgets ('latency_budget_ms', 'memory_budget'), not both", "tier_set")


def check_tier_set(config: ModelConfig, tier_set: str | list[str] | None) -> TierSet:
    """The request's TierSet, resolved against the model (an unknown tier is a 400)."""
    try:
        ts = TierSet.coerce(tier_set if tier_set is not None else "all")
        ts.resolve(config)
    except LiteLLMError as err:
        raise BadRequest(str(err), "tier_set") from None
    return ts
