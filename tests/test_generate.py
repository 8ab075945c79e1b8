"""Generation: the KV-cached loop against a cache-free reference, sampling controls, seeds."""

from __future__ import annotations

import torch

from lite_llm import ModelConfig, build_model
from lite_llm.data import ByteTokenizer
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


def test_prompt_longer_than_the_context_is_truncated_from_the_left():
    cfg = ModelConfig.from_preset("tiny", max_seq_len=32)
    model = build_model(cfg, seed=4)
    out = list(generate_ids(model, list(range(100)), 10))
    assert len(out) == 1  # 31 prompt tokens kept; one position left
