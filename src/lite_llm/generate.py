"""KV-cached sampling: greedy, temperature, top-k and top-p, repetition penalty, seeded, in a
chosen TierSet; stops on any of the tokenizer's end-of-sequence ids or on a stop string."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, Iterator, Protocol, Sequence

import torch

from .config import TierSet
from .errors import PromptError, SamplingError
from .model.layers import KV_ROOM

if TYPE_CHECKING:
    from .model import LiteLLM


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already cover top_p.
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: Sequence[int], penalty: float) -> torch.Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: the logit of every token already in
    the sequence (prompt included) is divided by ``penalty`` when positive and multiplied by it
    when negative, so with ``penalty > 1`` a repeat is always less likely."""
    if penalty == 1.0 or not len(seen_ids):
        return logits
    index = torch.tensor(list(seen_ids), device=logits.device, dtype=torch.long)
    score = logits.gather(-1, index)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(-1, index, score)


FREQUENCY_PENALTY_RANGE = (-2.0, 2.0)
"""The presence and frequency penalties accepted (OpenAI's bounds)."""
LOGIT_BIAS_RANGE = (-100.0, 100.0)
"""The logit biases accepted (OpenAI's bounds: -100 bans a token, +100 all but forces it)."""


def apply_presence_frequency_penalties(
    logits: torch.Tensor, generated_ids: Sequence[int], presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's presence and frequency penalties, counted over the tokens generated so far (not
    the prompt; vLLM's rule): ``logits[j] -= frequency * count[j] + presence * (count[j] > 0)``.
    Tokens not generated yet keep their logits bitwise."""
    if (presence == 0.0 and frequency == 0.0) or not len(generated_ids):
        return logits
    ids, counts = torch.unique(torch.tensor(list(generated_ids), dtype=torch.long), return_counts=True)
    ids = ids.to(logits.device)
    score = logits.gather(-1, ids) - (frequency * counts.to(logits.device, logits.dtype) + presence)
    return logits.scatter(-1, ids, score)


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float] | None) -> torch.Tensor:
    """OpenAI's ``logit_bias``: ``bias[j]`` added to token j's logit before the penalties and
    sampling (vLLM's order).  Ids must lie in the vocabulary (the server and ``generate_ids`` check them)."""
    if not bias:
        return logits
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.scatter(-1, ids, logits.gather(-1, ids) + values)


GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily (vLLM's rule): dividing by 1e-45 overflows the
logits to inf and the softmax to NaN."""
PENALTY_RANGE = (0.01, 100.0)
"""The repetition penalties accepted: beyond them a logit overflows as it is divided or
multiplied, and no model is steered usefully."""


def sample_token(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator
) -> int:
    """The next token from one position's logits (V,): the argmax when ``temperature`` is 0
    (or below :data:`GREEDY_BELOW`), else a draw from the filtered, tempered softmax with
    ``generator`` (a CPU generator).  One function for :func:`generate_ids` and the server,
    so both draw bitwise alike."""
    if temperature < GREEDY_BELOW:
        return int(logits.argmax())
    filtered = _filter_logits(logits.float() / temperature, top_k, top_p)
    return int(torch.multinomial(filtered.softmax(-1).cpu(), 1, generator=generator))


class SamplingSettings(Protocol):
    """What :func:`next_token` reads of a request's settings: :class:`Sampling` (what
    :func:`generate_ids` builds) and the server's ``SamplingParams`` both have these fields, so
    the server hands its own params over as they are (it may import this layer; not the reverse)."""

    @property
    def temperature(self) -> float: ...
    @property
    def top_k(self) -> int | None: ...
    @property
    def top_p(self) -> float | None: ...
    @property
    def repetition_penalty(self) -> float: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def logit_bias(self) -> dict[int, float] | None: ...


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of one :func:`generate_ids` call, as :func:`next_token` reads them."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None


def next_token(
    logits: torch.Tensor, seen: Sequence[int], prompt_len: int, params: SamplingSettings, generator: torch.Generator
) -> int:
    """The next token from one position's raw logits (V,): ``logit_bias``, then
    ``repetition_penalty`` over ``seen`` (prompt and generated tokens), then the presence and
    frequency penalties over the generated ones (``seen[prompt_len:]``), then
    :func:`sample_token` (vLLM's order).

    The one sampling pipeline of :func:`generate_ids` and the server's engine: both call it, so
    a request to the server draws bitwise the tokens ``generate_ids`` gives it alone by
    construction, not by two copies of this sequence kept in step by hand."""
    logits = apply_logit_bias(logits, params.logit_bias)
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.presence_penalty or params.frequency_penalty:  # else no O(length) slice per token
        logits = apply_presence_frequency_penalties(logits, seen[prompt_len:], params.presence_penalty, params.frequency_penalty)
    return sample_token(logits, params.temperature, params.top_k, params.top_p, generator)


def check_prompt(prompt_ids: Sequence[int], context: int, *, room: int = 1) -> list[int]:
    """The prompt as a list, refused when empty or when it leaves no room in the context for
    ``room`` new tokens (cutting it silently would answer a question nobody asked; ``room=0``
    is a prompt only scored, which may fill the context)."""
    if isinstance(prompt_ids, str):
        raise PromptError("the prompt is text; give token ids (encode it with the checkpoint's tokenizer, or use generate_text)")
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:  # transformers' (1, S) input_ids
            prompt_ids = prompt_ids[0]
        if prompt_ids.dim() != 1 or prompt_ids.is_floating_point():
            raise PromptError(f"the prompt must be a 1-D (or 1 x S) tensor of integer token ids, got shape {tuple(prompt_ids.shape)} of {prompt_ids.dtype}")
        prompt_ids = prompt_ids.tolist()
    try:
        ids = [int(i) for i in prompt_ids]
    except (TypeError, ValueError):
        raise PromptError("the prompt must be a sequence of integer token ids") from None
    if not ids:
        raise PromptError("the prompt is empty; give at least one token of text")
    if len(ids) > context - room:
        raise PromptError(f"the prompt is {len(ids)} tokens but the model's context is {context}; shorten it to at most {context - room} tokens")
    return ids


def check_sampling(
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    spell: Callable[[str], str] = str,
) -> None:
    """Refuse sampling settings no sampler can use, in one sentence naming the setting as the
    caller's user knows it (``spell``: the argument's name by default; the CLI passes its flag,
    so a bad flag is refused before a slow load)."""
    if not 0 <= temperature < float("inf"):
        raise SamplingError(f"{spell('temperature')} must be 0 (greedy) or a finite positive number, got {temperature}")
    if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
        raise SamplingError(f"{spell('top_k')} must be a whole number >= 1 (or None for no limit), got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise SamplingError(f"{spell('top_p')} must be above 0 and at most 1 (the probability mass kept; 1 keeps every token), got {top_p!r}")
    if not PENALTY_RANGE[0] <= repetition_penalty <= PENALTY_RANGE[1]:
        raise SamplingError(
            f"{spell('repetition_penalty')} must be between {PENALTY_RANGE[0]:g} and {PENALTY_RANGE[1]:g} "
            f"(1 is off, 1.1-1.3 discourages repeats), got {repetition_penalty}"
        )
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not FREQUENCY_PENALTY_RANGE[0] <= value <= FREQUENCY_PENALTY_RANGE[1]:
            raise SamplingError(f"{spell(name)} must be between {FREQUENCY_PENALTY_RANGE[0]:g} and {FREQUENCY_PENALTY_RANGE[1]:g}, got {value}")


@torch.no_grad()
def generate_ids(
    model: "LiteLLM",
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    tierset: TierSet | str | None = None,
    eos_id: int | None = None,
    eos_ids: Collection[int] = (),
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time.  ``temperature == 0`` is greedy decoding.

    The prompt is prefilled once; each new token costs one single-position forward through
    the KV cache.  It runs on the device the model is on.  Sampling draws from a CPU generator
    seeded by ``seed`` (same seed, same text, on any device: CUDA's generator is another
    algorithm, and one draw per token costs nothing next to the forward).
    Generation ends after yielding any id in ``eos_ids`` (or ``eos_id``); the end token itself
    is yielded, as transformers' ``generate`` returns it.  ``logit_bias``, then
    ``repetition_penalty``, then OpenAI's ``presence_penalty``/``frequency_penalty`` are applied
    to the raw logits before temperature and filtering (vLLM's order; the server's too).
    """
    check_sampling(
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
    )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    bad = [t for t in (logit_bias or {}) if not 0 <= int(t) < model.config.vocab_size]
    if bad:
        raise SamplingError(f"logit_bias names token {bad[0]}, outside the vocabulary (0..{model.config.vocab_size - 1})")
    stop_ids = {int(i) for i in eos_ids} | ({int(eos_id)} if eos_id is not None else set())
    ids = check_prompt(prompt_ids, model.config.max_seq_len)
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - len(ids))
    if max_new_tokens <= 0:
        return
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    gen = torch.Generator().manual_seed(seed)
    settings = Sampling(temperature, top_k, top_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias)
    model.setup_kv_cache(batch=1, max_len=len(ids) + max_new_tokens, reserve=len(ids) + KV_ROOM)
    try:
        logits = model(torch.tensor([ids], device=device), tierset=tierset, start_pos=0).logits[0, -1]
        pos = len(ids)
        seen = list(ids)
        for _ in range(max_new_tokens):
            token = next_token(logits, seen, len(ids), settings, gen)
            yield token
            if token in stop_ids:
                break
            seen.append(token)
            logits = model(torch.tensor([[token]], device=device), tierset=tierset, start_pos=pos).logits[0, -1]
            pos += 1
    finally:
        model.clear_kv_cache()
        model.train(was_training)


def generate_text(
    model: "LiteLLM",
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    stop: str | Sequence[str] = (),
    prompt_ids: Sequence[int] | None = None,
    **kwargs,
) -> Iterator[str]:
    """Yield decoded text pieces as tokens arrive.

    Generation stops on any of the tokenizer's ``eos_ids``; the end token is not printed.  A
    stop string ends it too, and the text is cut just before it (see :class:`TextStream`).
    ``prompt_ids`` (a rendered chat prompt, say) replaces the encoding of ``prompt``.
    """
    ids = list(prompt_ids) if prompt_ids is not None else prompt_start(tokenizer, prompt)
    eos_ids = tuple(getattr(tokenizer, "eos_ids", ()) or ())
    text = TextStream(tokenizer, stop)
    for token in generate_ids(model, ids, max_new_tokens, eos_ids=eos_ids, **kwargs):
        if token in eos_ids:
            break
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            return
    piece = text.finish()
    if piece:
        yield piece


def prompt_start(tokenizer, prompt: str) -> list[int]:
    """A plain prompt's ids as transformers' ``tokenizer(prompt)`` gives them (with the BOS a
    Llama 3 tokenizer adds).  An empty prompt starts from the beginning-of-sequence token, as
    transformers' ``generate`` without inputs does, or else from the end-of-document token
    that separates documents in training (GPT-2's convention), so it samples a fresh document."""
    ids = list(tokenizer.encode_prompt(prompt))
    if ids:
        return ids
    start = getattr(tokenizer, "bos_id", None)
    start = tokenizer.eos_id if start is None else start
    if start is None:
        raise PromptError("the prompt is empty and the tokenizer has no beginning- or end-of-sequence token to start from; give some text")
    return [int(start)]


class TextStream:
    """New token ids in, printable text pieces out — what `lite-llm generate` prints and what
    the server streams, from one piece of code so the two never disagree.

    Text that could still be the start of a stop string is held back until it is decided; at
    a stop string the text is cut just before it and :attr:`stopped` turns true.  Byte tokens
    are decoded incrementally, so a multi-byte character is given once it is complete; other
    tokenizers' text is re-decoded from all new ids (a character split across tokens waits
    for the rest).  Special tokens (``<|im_start|>`` and the like) are left out of the text,
    as transformers' text-generation pipeline and vLLM leave them out by default.
    """

    def __init__(self, tokenizer, stop: str | Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in ((stop,) if isinstance(stop, str) else stop) if s]  # one string is one stop, as transformers' stop_strings
        byte = getattr(tokenizer, "kind", "") == "byte"
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if byte else None
        self._new: list[int] = []
        self._text = ""
        self._shown = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """The text that ``token`` makes final (possibly empty)."""
        if self.stopped:
            return ""
        if self._decoder is not None:
            self._text += self._decoder.decode(bytes([token]))
        else:
            self._new.append(token)
            self._text = self.tokenizer.decode(self._new, skip_special_tokens=True)
            if self._text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                return ""
        cut = _first_stop(self._text, self.stops)
        if cut is not None:
            self.stopped = True
            return self._advance(cut)
        return self._advance(len(self._text) - _held_back(self._text, self.stops))

    def finish(self) -> str:
        """The text still held back, once no more tokens will come."""
        if self.stopped:
            return ""
        if self._decoder is not None:
            self._text += self._decoder.decode(b"", final=True)
        elif self._new:
            self._text = self.tokenizer.decode(self._new, skip_special_tokens=True)
        cut = _first_stop(self._text, self.stops)
        self.stopped = cut is not None
        return self._advance(len(self._text) if cut is None else cut)

    def _advance(self, end: int) -> str:
        if end <= self._shown:
            return ""
        piece = self._text[self._shown : end]
        self._shown = end
        return piece


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string begins in ``text`` (None when none occurs)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
