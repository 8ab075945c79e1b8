"""The expert store against the model holding every expert: logits and greedy text bitwise
equal under every budget and policy, evictions inside one forward pass, faults as one sentence.

Oracle: the same checkpoint loaded whole by ``load_checkpoint``.  Routing is fixed by the
checkpoint, so the store changes only where the expert weights come from — any difference
in the numbers is a bug."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lite_llm import ModelConfig, build_model
from lite_llm.checkpoint import load_checkpoint, save_checkpoint
from lite_llm.config import RoutingConfig, TierConfig
from lite_llm.data import ByteTokenizer
from lite_llm.errors import ConfigError, LiteLLMError
from lite_llm.generate import generate_ids
from lite_llm.store import ExpertFileChanged, load_with_store, parse_bytes

# Two tiers of 8 experts over 3 layers; k=2 experts per group in 2 groups: 4 experts per token.
CONFIG = ModelConfig(
    name="store-test", vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=128, max_seq_len=256,
    tiers=[
        TierConfig("tier_a", num_groups=2, experts_per_group=4, expert_hidden=64),
        TierConfig("tier_b", num_groups=2, experts_per_group=4, expert_hidden=32, placement="cold"),
    ],
    routing=RoutingConfig(k_tier=2, k_group=2, k_expert=2),
)
EXPERT_A = (2 * 64 * 64 + 64 * 64) * 4  # bytes of one tier_a expert in fp32
PROMPT = torch.arange(3, 3 + 2 * 90).remainder(256).view(2, 90)  # 180 rows: grouped_mm in the prefill


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = build_model(CONFIG, seed=3)
    with torch.no_grad():  # spread the expert biases so that routes vary across experts
        for block in model.layers:
            for head in block.ffn.router.heads.values():
                head.expert_bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(block.layer))
    path = tmp_path_factory.mktemp("store") / "ckpt"
    save_checkpoint(path, model, tokenizer=ByteTokenizer())
    return path


@pytest.fixture(scope="module")
def resident(checkpoint):
    return load_checkpoint(checkpoint).model.eval()


def _logits(model, ids=PROMPT, tierset=None):
    with torch.no_grad():
        return model(ids, tierset=tierset).logits


@pytest.mark.parametrize("policy", ["lru", "layer-cycle"])
@pytest.mark.parametrize("hot,warm", [(EXPERT_A, 0), (2 * EXPERT_A, 3 * EXPERT_A), (10 * EXPERT_A, 0), ("1GB", "1GB")])
def test_logits_are_bitwise_those_of_the_resident_model(checkpoint, resident, policy, hot, warm):
    stored = load_with_store(checkpoint, hot_budget=hot, warm_budget=warm, policy=policy)
    assert torch.equal(_logits(stored.model), _logits(resident))
    assert torch.equal(_logits(stored.model, tierset="tier_a"), _logits(resident, tierset="tier_a"))
    stats = stored.store.stats()
    if parse_bytes(hot) < 16 * EXPERT_A:  # fewer experts fit than one layer's prompt touches: evictions inside a forward
        assert stats.hot.evictions > 0
    assert stats.hot.peak_bytes <= parse_bytes(hot)
    assert stats.cold_bytes > 0


def test_greedy_text_is_bitwise_that_of_the_resident_model(checkpoint, resident):
    stored = load_with_store(checkpoint, hot_budget=10 * EXPERT_A, warm_budget=30 * EXPERT_A)  # of 48 experts
    prompt = list(range(10, 40))
    want = list(generate_ids(resident, prompt, 24))
    assert list(generate_ids(stored.model, prompt, 24)) == want
    stats = stored.store.stats()
    assert stats.hot.hits > 0 and stats.warm.hits > 0 and stats.hot.evictions > 0


def test_the_model_holds_no_expert_weights(checkpoint):
    stored = load_with_store(checkpoint, hot_budget=EXPERT_A)
    names = [n for n, _ in stored.model.named_parameters()]
    assert names and not any(".experts." in n for n in names)
    assert all(p.device.type == "cpu" for p in stored.model.parameters())


def test_a_budget_below_one_expert_is_refused_with_the_minimum(checkpoint):
    with pytest.raises(ConfigError, match=f"the least that works is {EXPERT_A} bytes"):
        load_with_store(checkpoint, hot_budget=EXPERT_A - 1)
    with pytest.raises(ConfigError, match="cannot read '12 parsecs' as a hot budget"):
        load_with_store(checkpoint, hot_budget="12 parsecs")


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "ckpt"
    shutil.copytree(checkpoint, out)
    return out


def test_a_shard_deleted_after_loading_is_one_sentence_and_no_output(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path)
    stored = load_with_store(path, hot_budget=EXPERT_A)
    (path / "tier-tier_a-experts.safetensors").unlink()
    with pytest.raises(ExpertFileChanged, match=r"expert \d+ of tier tier_a in layer 0 cannot be read: .*tier-tier_a-experts.safetensors was deleted"):
        _logits(stored.model)


def test_a_shard_rewritten_after_loading_is_one_sentence_and_no_output(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path)
    stored = load_with_store(path, hot_budget=EXPERT_A)
    shard = path / "tier-tier_b-experts.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8:] = b"\x00" * 8
    shard.write_bytes(bytes(data))
    with pytest.raises(ExpertFileChanged, match="tier-tier_b-experts.safetensors changed after the model was loaded"):
        _logits(stored.model)


def test_a_corrupt_dense_shard_is_refused_at_load(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path)
    shard = path / "dense.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(LiteLLMError, match="dense.safetensors"):
        load_with_store(path, hot_budget="1MB")


def test_training_through_the_store_is_refused(checkpoint):
    stored = load_with_store(checkpoint, hot_budget="1MB")
    x = stored.model.embed(PROMPT).detach().requires_grad_(True)
    with pytest.raises(RuntimeError, match="for inference"):
        stored.model.layers[0].ffn(x, stored.model.allowed_tiers(None))


def test_prefetch_guesses_the_next_layer_and_never_changes_the_text(checkpoint, resident):
    from lite_llm.store import Prefetcher

    prompt = list(range(50, 70))
    want = list(generate_ids(resident, prompt, 16))
    stored = load_with_store(checkpoint, hot_budget=4 * EXPERT_A, warm_budget=20 * EXPERT_A)
    prefetcher = Prefetcher(stored.model, stored.store, extra=2)
    try:
        assert list(generate_ids(stored.model, prompt, 16)) == want
        prefetcher.wait()
        good = prefetcher.stats
        assert good.used > 0 and good.guessed > 0 and 0.3 < good.recall <= 1.0  # the next router on this layer's output
    finally:
        prefetcher.close()

    # guesses from the wrong layer's router (every guess a different expert): bytes wasted, text unchanged
    stored = load_with_store(checkpoint, hot_budget=4 * EXPERT_A, warm_budget=20 * EXPERT_A)
    prefetcher = Prefetcher(stored.model, stored.store, extra=0)
    for block in stored.model.layers:
        real = block.ffn.router.expert_probabilities
        block.ffn.router.expert_probabilities = lambda x, allowed, real=real: real(x, allowed).flip(-1)
    try:
        assert list(generate_ids(stored.model, prompt, 16)) == want
        prefetcher.wait()
        assert prefetcher.stats.recall < good.recall and prefetcher.stats.wasted_bytes > 0
    finally:
        prefetcher.close()


def test_a_prefill_tells_the_policy_how_many_prompt_tokens_used_each_expert(checkpoint, resident):
    """The prompt's routes are known before decoding starts: one forward over the prompt leaves
    the policy with each expert's row count, which the resident model's routing reports."""
    stored = load_with_store(checkpoint, hot_budget="1GB", warm_budget="1GB", policy="layer-cycle")
    with torch.no_grad():
        stored.model(PROMPT)
        routing = resident(PROMPT).routing
    policy = stored.store.hot.policy
    offsets = {0: ("tier_a", 0), 8: ("tier_b", 8)}
    checked = 0
    for layer_routing in routing:
        for flat, n in enumerate(layer_routing.expert_routes.tolist()):
            tier, start = offsets[8 if flat >= 8 else 0]
            assert policy.decayed_uses((layer_routing.layer, tier, flat - start)) == n
            checked += n > 1
    assert checked > 0  # some expert was used by several rows, so a count of one access each would differ


def test_the_policy_keeps_the_expert_the_prompt_used_most():
    """Closed form: two experts of one layer, prefilled with 5 and 1 uses; the next eviction
    takes the one used once, and value() is uses x (1 - decay) / distance."""
    from lite_llm.store.policies import LayerCycle

    policy = LayerCycle(n_layers=2, half_life=128.0)
    policy.touch((0, "t", 1), uses=5)
    policy.touch((0, "t", 2), uses=1)
    assert policy.victim([(0, "t", 1), (0, "t", 2)]) == (0, "t", 2)
    decay = 0.5 ** (1 / 128)
    assert policy.value((0, "t", 1)) == pytest.approx(5 * (1 - decay) / 2)  # layer 0 comes round after 2 layer visits


def test_a_single_moe_layer_still_decays_once_per_visit():
    """Closed form: with one MoE layer the layer never changes between tokens; an expert accessed
    again starts the next visit, so an expert last used one visit ago has half its use at a
    half-life of one visit (it used to keep its whole count forever)."""
    from lite_llm.store.policies import LayerCycle

    policy = LayerCycle(n_layers=1, half_life=1.0)
    policy.touch((0, "t", 1))
    policy.touch((0, "t", 2))  # the same visit
    policy.touch((0, "t", 1))  # the next token's visit
    assert policy.decayed_uses((0, "t", 2)) == pytest.approx(0.5)
    assert policy.decayed_uses((0, "t", 1)) == pytest.approx(1.5)
    policy.touch((0, "t", 3))  # still the second visit
    policy.touch((0, "t", 3), uses=2)  # a third
    assert policy.decayed_uses((0, "t", 2)) == pytest.approx(0.25) and policy.decayed_uses((0, "t", 3)) == pytest.approx(2.5)


def test_serving_decode_steps_prefetch_as_generate_does_and_wasted_bytes_were_read(checkpoint, resident):
    """The server's batched decode computes each block by hand; the prefetcher, attached as
    forward hooks, must still guess at every step (it guessed on the prompt only), and the bytes
    it counts as wasted are bytes it read — never more than the store read from disk."""
    from lite_llm.serve.batched import decode_step, new_row_cache, prefill
    from lite_llm.store import Prefetcher

    prompt = list(range(50, 70))
    stored = load_with_store(checkpoint, hot_budget=4 * EXPERT_A, warm_budget=20 * EXPERT_A)
    prefetcher = Prefetcher(stored.model, stored.store, extra=2)
    calls = []
    real = stored.store.warm_up
    stored.store.warm_up = lambda keys, on_read=None: calls.append(len(keys)) or real(keys, on_read)
    try:
        cache = new_row_cache(stored.model, len(prompt), 64)
        logits, _ = prefill(stored.model, prompt, cache, None)
        after_prompt = len(calls)
        ids, want = list(prompt), list(generate_ids(resident, prompt, 10))
        for i in range(10):
            token = int(logits.argmax())
            ids.append(token)
            logits, _ = decode_step(stored.model, [token], [len(ids) - 1], [cache], stored.model.allowed_tiers(None)[None])
            logits = logits[0]
        assert ids[len(prompt):] == want  # a guess only fills a cache
        prefetcher.wait()
        assert len(calls) == after_prompt + 10 * (CONFIG.n_layers - 1)  # every decode step guesses each next MoE layer
        assert 0 <= prefetcher.stats.wasted_bytes <= stored.store.cold.bytes_read
    finally:
        prefetcher.close()


def test_the_budgets_are_checked_for_the_tiers_the_tierset_may_use(checkpoint):
    """tier_b's experts are half tier_a's: a hot budget of one tier_b expert serves only:tier_b,
    and the check named tier_a's size, a tier that TierSet never reads."""
    expert_b = (2 * 32 * 64 + 64 * 32) * 4
    with pytest.raises(ConfigError, match=f"the least that works is {EXPERT_A} bytes"):
        load_with_store(checkpoint, hot_budget=expert_b)
    stored = load_with_store(checkpoint, hot_budget=expert_b, tierset="only:tier_b")
    assert stored.store.allowed_tiers == ["tier_b"]


def test_a_warm_budget_below_one_expert_is_refused_and_prefetch_needs_a_warm_level(checkpoint):
    from lite_llm.store import load_for_inference

    with pytest.raises(ConfigError, match=f"a warm budget of .* cannot hold one expert; the least that works is {EXPERT_A} bytes"):
        load_with_store(checkpoint, hot_budget="1MB", warm_budget=EXPERT_A // 2)
    assert load_with_store(checkpoint, hot_budget="1MB", warm_budget=0).store.warm.budget == 0  # 0: no warm level
    with pytest.raises(LiteLLMError, match="a warm budget of 0 has none"):
        load_for_inference(checkpoint, hot_budget="1MB", warm_budget="0", prefetch=True)


@pytest.mark.parametrize("hot", [EXPERT_A, 2 * EXPERT_A, 5 * EXPERT_A])
def test_the_experts_a_grouped_matmul_stacks_stay_within_the_hot_budget(checkpoint, resident, monkeypatch, hot):
    """A grouped matmul stacks the experts it fetched into one tensor: a copy beside the hot
    level's.  The hot experts and that copy together must stay within --hot-budget (they reached
    twice it), and the logits stay bitwise the resident model's."""
    import lite_llm.model.expert_source as source

    stored = load_with_store(checkpoint, hot_budget=hot)
    seen = []
    real = source.grouped_experts

    def grouped(rows, counts, w_gu, w_d):
        held = {t.data_ptr() for weights, _ in stored.store.hot.entries.values() for t in weights}
        copy = 0 if w_gu.data_ptr() in held else w_gu.nbytes + w_d.nbytes  # one expert's is a view of its hot weights
        seen.append(stored.store.hot.used + copy)
        return real(rows, counts, w_gu, w_d)

    monkeypatch.setattr(source, "grouped_experts", grouped)
    assert torch.equal(_logits(stored.model), _logits(resident))
    assert seen and max(seen) <= parse_bytes(hot)
