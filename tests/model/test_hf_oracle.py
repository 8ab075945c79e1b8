"""Oracle equivalence with Hugging Face transformers' Llama and Mixtral, same weights."""

from __future__ import annotations

import pytest
import torch

from lite_llm import ModelConfig, RoutingConfig, TierConfig, build_model
from lite_llm.interop import from_hf_state_dict, hf_config_dict, to_hf_state_dict
from lite_llm.model.moe import TieredMoE

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402


def _hf_llama(cfg: ModelConfig) -> LlamaForCausalLM:
    fields = {k: v for k, v in hf_config_dict(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


@pytest.mark.parametrize(
    "shape",
    [
        dict(d_model=48, n_heads=6, n_kv_heads=2, tie_embeddings=False),  # GQA, 3 query heads per KV head
        dict(d_model=64, n_heads=4, n_kv_heads=1, tie_embeddings=True),  # MQA, tied head
        dict(d_model=40, n_heads=4, n_kv_heads=2, head_dim=12, tie_embeddings=False),  # head_dim != d/heads
    ],
    ids=["gqa3", "mqa-tied", "free-head-dim"],
)
def test_dense_model_matches_llama(shape):
    cfg = ModelConfig(vocab_size=101, n_layers=3, intermediate_size=72, rope_theta=50000.0, norm_eps=1e-6, **shape)
    ours = build_model(cfg, seed=3).eval()
    # Perturb the norms so that a swapped or missing norm cannot hide behind all-ones weights.
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    theirs = _hf_llama(cfg)
    result = theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert not result.missing_keys or result.missing_keys == ["lm_head.weight"] and cfg.tie_embeddings
    assert not result.unexpected_keys
    ids = torch.randint(0, cfg.vocab_size, (3, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(ids).logits
        b = theirs(ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    # ... and the mapping is a bijection on the weights.
    back = from_hf_state_dict(theirs.state_dict(), cfg)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back[name], tensor), name


def test_kv_cached_decoding_matches_full_forward():
    cfg = ModelConfig.from_preset("tiny")
    model = build_model(cfg, seed=1).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        model.setup_kv_cache(batch=2, max_len=32)
        prefix = model(ids[:, :12], start_pos=0).logits
        chunk = model(ids[:, 12:16], start_pos=12).logits  # a multi-token chunk after a prefix
        steps = [model(ids[:, i : i + 1], start_pos=i).logits for i in range(16, 20)]
        model.clear_kv_cache()
    incremental = torch.cat([prefix, chunk, *steps], dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)


def test_tiered_moe_block_matches_mixtral_sparse_block():
    d, hidden, experts = 48, 40, 6
    cfg = ModelConfig(
        d_model=d,
        n_heads=4,
        tiers=[TierConfig("tier_0", num_groups=1, experts_per_group=experts, expert_hidden=hidden)],
        routing=RoutingConfig(k_tier=1, k_group=1, k_expert=2, renormalize=True),
    )
    ours = TieredMoE(cfg, layer=0).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    mixtral = MixtralSparseMoeBlock(
        MixtralConfig(hidden_size=d, intermediate_size=hidden, num_local_experts=experts, num_experts_per_tok=2)
    ).eval()
    head, bank = ours.router.heads["tier_0"], ours.experts["tier_0"]
    mixtral.load_state_dict(
        {"gate.weight": head.expert_gate.detach(), "experts.gate_up_proj": bank.gate_up_proj.detach(), "experts.down_proj": bank.down_proj.detach()}
    )
    x = torch.randn(3, 17, d, generator=gen)
    with torch.no_grad():
        a, routes = ours(x, allowed=torch.ones(1, dtype=torch.bool))
        b = mixtral(x)
    assert (routes.valid.sum(-1) == 2).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
