"""Generation: the KV-cached loop against a cache-free reference, sampling controls, seeds."""

from __future__ import annotations

import pytest
import torch

from lite_llm import ModelConfig, build_model
from lite_llm.data import ByteTokenizer
from lite_llm.errors import PromptError
from lite_llm.generate import _filter_logits, generate_ids, generate_text


def _reference_greedy(model, prompt, n, tierset=None):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), tierset=tierset).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_with_kv_cache_matches_full_recompute():
    model = build_model(ModelConfig.from_preset("tiny"), seed=4).eval()
    prompt = [5, 17, 99, 3, 250]
    for tierset in (None, "only:tier_10b"):
        fast = list(generate_ids(model, prompt, 24, temperature=0.0, tierset=tierset))
        assert fast == _reference_greedy(model, prompt, 24, tierset)


def test_sampling_is_seeded():
    model = build_model(ModelConfig.from_preset("tiny"), seed=4)
    a = list(generate_ids(model, [1, 2, 3], 30, temperature=1.0, seed=7))
    b = list(generate_ids(model, [1, 2, 3], 30, temperature=1.0, seed=7))
    c = list(generate_ids(model, [1, 2, 3], 30, temperature=1.0, seed=8))
    assert a == b and a != c


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    kept = torch.isfinite(_filter_logits(logits, top_k=2, top_p=None))
    assert kept.tolist() == [True, True, False, False, False]
    # top_p=0.8: 0.5 + 0.2 < 0.8, so the 0.15 token is still needed; the rest are dropped.
    kept = torch.isfinite(_filter_logits(logits, top_k=None, top_p=0.8))
    assert kept.tolist() == [True, True, True, False, False]
    model = build_model(ModelConfig.from_preset("tiny"), seed=4)
    greedy = list(generate_ids(model, [1, 2], 10, temperature=0.0))
    assert list(generate_ids(model, [1, 2], 10, temperature=1.0, top_k=1)) == greedy


def test_generate_text_streams_whole_characters():
    model = build_model(ModelConfig.from_preset("tiny"), seed=4)
    pieces = list(generate_text(model, ByteTokenizer(), "héllo", 40, temperature=1.0, seed=1))
    assert "".join(pieces) == ByteTokenizer().decode(list(generate_ids(model, ByteTokenizer().encode("héllo"), 40, temperature=1.0, seed=1)))


def test_a_prompt_that_fills_the_context_is_refused_not_cut():
    """Cutting a long prompt silently would answer another question; the server refuses it
    with a 400, and the library says the same in one sentence."""
    cfg = ModelConfig.from_preset("tiny", max_seq_len=32)
    model = build_model(cfg, seed=4)
    with pytest.raises(PromptError, match="the prompt is 32 tokens but the model's context is 32; shorten it to at most 31"):
        list(generate_ids(model, list(range(32)), 10))
    with pytest.raises(PromptError, match="the prompt is empty"):
        list(generate_ids(model, [], 10))
    assert len(list(generate_ids(model, list(range(31)), 10))) == 1  # one position left: one token


def test_a_kv_cache_that_grows_gives_the_tokens_of_one_allocated_whole(monkeypatch):
    """Caches start ``KV_ROOM`` past the prompt and double as they fill; the tokens must be
    those of a cache allocated whole (the old way) and of a full recompute."""
    import lite_llm.generate as gen
    from lite_llm.model.layers import KVCache

    model = build_model(ModelConfig.from_preset("tiny"), seed=4).eval()
    prompt = [5, 17, 99, 3, 250]
    whole = list(generate_ids(model, prompt, 40, temperature=0.9, seed=2))
    monkeypatch.setattr(gen, "KV_ROOM", 1)  # 6 positions at first, then 12, 24, 45
    assert list(generate_ids(model, prompt, 40, temperature=0.9, seed=2)) == whole
    assert list(generate_ids(model, prompt, 40)) == _reference_greedy(model, prompt, 40)

    grown, full = KVCache(1, 2, 45, 4, torch.float32, reserve=3), KVCache(1, 2, 45, 4, torch.float32)
    for start in range(0, 45, 5):
        k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
        for got, want in zip(grown.update(start, k, v), full.update(start, k, v)):
            assert torch.equal(got, want)
    assert grown.allocated == 45
    with pytest.raises(ValueError, match="holds 45 positions but generation reached 46"):
        grown.update(45, k[:, :, :1], v[:, :, :1])


def test_a_request_that_may_fill_the_context_does_not_hold_its_cache_from_the_start():
    from lite_llm.model.layers import KV_ROOM
    from lite_llm.serve.batched import new_row_cache

    model = build_model(ModelConfig.from_preset("tiny", max_seq_len=4096), seed=4)
    cache = new_row_cache(model, 10, 4096)
    assert {layer.allocated for layer in cache} == {10 + KV_ROOM} and {layer.max_len for layer in cache} == {4096}


def _grad_during_forward(run) -> list[tuple[bool, bool]]:
    model = build_model(ModelConfig.from_preset("tiny"), seed=4)
    seen: list[tuple[bool, bool]] = []
    hook = model.register_forward_hook(lambda mod, args, out: seen.append((torch.is_grad_enabled(), out.logits.requires_grad)))
    try:
        run(model)
    finally:
        hook.remove()
    assert seen, "the model was never called"
    return seen


def test_generate_ids_decodes_without_autograd():
    """A resident model's parameters require grad: a decode step with autograd on builds a graph
    that the KV cache keeps alive (1.6x the time and +150 MB over 300 tokens of `small`, seen
    when the decorator once slid onto the function above it)."""
    seen = _grad_during_forward(lambda m: list(generate_ids(m, [1, 2, 3], 4)))
    assert seen == [(False, False)] * len(seen)


def test_generate_text_decodes_without_autograd():
    seen = _grad_during_forward(lambda m: list(generate_text(m, ByteTokenizer(), "def ", 4)))
    assert seen == [(False, False)] * len(seen)
