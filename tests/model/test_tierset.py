"""TierSets: masked tiers are never selected, get exactly zero gradient, and do not change the output."""

from __future__ import annotations

import pytest
import torch

from lite_llm import ModelConfig, RoutingConfig, TierConfig, TierSetError, build_model

from ..conftest import two_tier_config


def test_masked_tier_is_never_selected_and_gets_zero_gradient():
    cfg = two_tier_config()
    model = build_model(cfg, seed=2)
    ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    out = model(ids, tierset="only:tier_a", labels=ids, return_routes=True)
    out.loss.backward()
    for layer in out.routing:
        ids_used = layer.routes.expert_ids[layer.routes.valid]
        assert (ids_used < 6).all()  # tier_a holds flat ids 0..5
        assert layer.tier_routes[1].item() == 0
        assert layer.tier_probs[1].item() == 0.0
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
        if "tier_b" in name:
            assert p.grad is None or not p.grad.any(), name
        if "tier_a" in name and "experts" in name:
            assert p.grad is not None and p.grad.any(), name


def test_output_with_tierset_a_does_not_depend_on_tier_b_existing():
    with_b = two_tier_config()
    without_b = two_tier_config(tiers=with_b.tiers[:1], routing=RoutingConfig(k_tier=1, k_group=1, k_expert=2))
    big = build_model(with_b, seed=5)
    small = build_model(without_b, seed=6)
    # Copy every tensor the small model has from the big one.
    small.load_state_dict({k: v for k, v in big.state_dict().items() if k in small.state_dict()})
    ids = torch.randint(0, with_b.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    a = big(ids, tierset="tier_a").logits
    b = small(ids).logits
    assert torch.equal(a, b)


def test_tier_b_before_tier_a_does_not_change_tier_a_routing():
    """Tie-breaks hash tier names, not positions: adding a tier in front changes nothing."""
    a_only = ModelConfig(d_model=16, n_heads=2, tiers=[TierConfig("tier_a", 2, 4, 16)], routing=RoutingConfig(k_group=1, k_expert=2))
    b_then_a = a_only.replace(tiers=[TierConfig("tier_b", 2, 4, 16), TierConfig("tier_a", 2, 4, 16)])
    m1, m2 = build_model(a_only), build_model(b_then_a)
    for layer1, layer2 in zip(m1.layers, m2.layers):
        with torch.no_grad():  # exact ties everywhere: only the tie-break decides
            for layer in (layer1, layer2):
                layer.ffn.router.heads["tier_a"].group_gate.zero_()
                layer.ffn.router.heads["tier_a"].expert_gate.zero_()
    x = torch.randn(4, 16)
    r1 = m1.layers[0].ffn.router(x, torch.tensor([True]))
    r2 = m2.layers[0].ffn.router(x, torch.tensor([False, True]))
    assert torch.equal(r1.expert_ids, r2.expert_ids - 8)


def test_unknown_tier_is_a_clear_error():
    model = build_model(two_tier_config())
    with pytest.raises(TierSetError, match="TierSet names unknown tier\\(s\\) tier_z; this model has tier_a, tier_b"):
        model(torch.zeros(1, 4, dtype=torch.long), tierset="tier_z")
