"""KV-cached sampling: greedy, temperature, top-k and top-p, seeded, in a chosen TierSet."""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from .config import TierSet

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
) -> Iterator[int]:
    """Yield new token ids one at a time.  ``temperature == 0`` is greedy decoding.

    The prompt is prefilled once; each new token costs one single-position forward through
    the KV cache.  Sampling draws from a generator seeded by ``seed`` (same seed, same text).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    limit = model.config.max_seq_len
    ids = list(prompt_ids)[-(limit - 1) :] or [0]
    max_new_tokens = min(max_new_tokens, limit - len(ids))
    if max_new_tokens <= 0:
        return
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    model.setup_kv_cache(batch=1, max_len=len(ids) + max_new_tokens)
    try:
        logits = model(torch.tensor([ids], device=device), tierset=tierset, start_pos=0).logits[0, -1]
        pos = len(ids)
        for _ in range(max_new_tokens):
            if temperature == 0:
                token = int(logits.argmax())
            else:
                filtered = _filter_logits(logits.float() / temperature, top_k, top_p)
                token = int(torch.multinomial(filtered.softmax(-1), 1, generator=gen))
            yield token
            if eos_id is not None and token == eos_id:
                break
            logits = model(torch.tensor([[token]], device=device), tierset=tierset, start_pos=pos).logits[0, -1]
            pos += 1
    finally:
        model.clear_kv_cache()
        model.train(was_training)


def generate_text(model: "LiteLLM", tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> Iterator[str]:
    """Yield decoded text pieces as tokens arrive (byte tokens are decoded incrementally, so a
    multi-byte character is printed once it is complete)."""
    ids = tokenizer.encode(prompt)
    if getattr(tokenizer, "kind", "") == "byte":
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token in generate_ids(model, ids, max_new_tokens, eos_id=getattr(tokenizer, "eos_id", None), **kwargs):
            piece = decoder.decode(bytes([token]))
            if piece:
                yield piece
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail
        return
    new: list[int] = []
    shown = ""
    for token in generate_ids(model, ids, max_new_tokens, eos_id=getattr(tokenizer, "eos_id", None), **kwargs):
        new.append(token)
        text = tokenizer.decode(new)
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            yield text[len(shown) :]
            shown = text
    text = tokenizer.decode(new)
    if len(text) > len(shown):
        yield text[len(shown) :]
