"""HSER routing: K bound, joint weights, stable seeded tie-breaks, batch independence."""

from __future__ import annotations


import pytest
import torch

from lite_llm import ModelConfig, RoutingConfig, TierConfig
from lite_llm.model.router import HSERRouter, _topk_by_exact_key, stable_topk

from tests.model.references import stable_topk_reference

from ..conftest import two_tier_config


def _router(cfg: ModelConfig, layer: int = 0, std: float = 0.3) -> HSERRouter:
    router = HSERRouter(cfg, layer)
    gen = torch.Generator().manual_seed(layer)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return router


def _all_tiers(cfg: ModelConfig) -> torch.Tensor:
    return torch.ones(len(cfg.tiers), dtype=torch.bool)


def test_joint_weights_match_a_slow_reference():
    """Check every route's weight against p(t) p(g|t) p(e|t,g) computed one token at a time."""
    cfg = two_tier_config(routing=RoutingConfig(k_tier=2, k_group=1, k_expert=2, renormalize=False))
    router = _router(cfg)
    x = torch.randn(40, cfg.d_model, generator=torch.Generator().manual_seed(5))
    torch.set_grad_enabled(False)
    routes = router(x, _all_tiers(cfg))
    tiers = cfg.tiers
    for n in range(x.shape[0]):
        heads = [router.heads[t.name] for t in tiers]
        p_t = torch.softmax(torch.stack([(h.tier_gate[0] @ x[n]) for h in heads]), 0)
        expected = {}
        for ti in p_t.argsort(descending=True)[: cfg.routing.k_tier].tolist():
            tier, head = tiers[ti], heads[ti]
            p_g = torch.softmax(head.group_gate @ x[n], 0)
            for g in p_g.argsort(descending=True)[: cfg.k_group_of(tier)].tolist():
                logits_e = head.expert_gate[g * tier.experts_per_group : (g + 1) * tier.experts_per_group] @ x[n]
                p_e = torch.softmax(logits_e, 0)
                for e in p_e.argsort(descending=True)[: cfg.k_expert_of(tier)].tolist():
                    flat = router.tier_offsets[ti] + g * tier.experts_per_group + e
                    expected[flat] = float(p_t[ti] * p_g[g] * p_e[e])
        got = {int(i): float(w) for i, w, ok in zip(routes.expert_ids[n], routes.weights[n], routes.valid[n]) if ok}
        assert got.keys() == expected.keys()
        for k in got:
            assert got[k] == pytest.approx(expected[k], rel=1e-5)
    torch.set_grad_enabled(True)


def test_routes_never_exceed_k_and_renormalise():
    cfg = two_tier_config()  # tiers with different k_group: K = 1*2 + 2*2 = 6
    router = _router(cfg)
    x = torch.randn(300, cfg.d_model)
    routes = router(x, _all_tiers(cfg))
    per_token = routes.valid.sum(-1)
    assert per_token.max().item() <= cfg.max_active_experts() == 6
    assert per_token.min().item() >= 1
    torch.testing.assert_close(routes.weights.sum(-1), torch.ones(300))
    assert (routes.weights[~routes.valid] == 0).all()
    assert (routes.expert_ids[~routes.valid] == -1).all()
    # Distinct experts per token.
    for row, ok in zip(routes.expert_ids, routes.valid):
        assert len(set(row[ok].tolist())) == int(ok.sum())


def test_stable_topk_orders_ties_by_rank():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    # rank: candidate 4 wins ties first, then 2, then 1 ...
    assert stable_topk(scores, 3, torch.tensor([1, 4, 2, 3, 0])).tolist() == [[4, 2, 1]]
    assert stable_topk(scores, 3, torch.tensor([0, 1, 2, 3, 4])).tolist() == [[1, 2, 4]]
    assert stable_topk(scores, 4, torch.tensor([3, 4, 0, 1, 2])).tolist() == [[2, 4, 1, 0]]


@pytest.mark.parametrize("topk", [stable_topk, _topk_by_exact_key], ids=["cpu_fast_path", "exact_keys"])
@pytest.mark.parametrize("n", [2, 7, 64, 512])
def test_stable_topk_equals_the_stable_sort_reference(n, topk):
    gen = torch.Generator().manual_seed(n)
    # Few distinct values: many exact ties, plus neighbouring floats that must not be confused;
    # signed zeros (equal, so a tie), -inf (masked candidates) and distinct random scores.
    base = torch.randint(-2, 2, (300, n), generator=gen).float()
    nudged = torch.where(torch.rand(300, n, generator=gen) < 0.2, torch.nextafter(base, torch.tensor(9.0)), base)
    signed = torch.where(torch.rand(300, n, generator=gen) < 0.5, -0.0, 0.0)
    masked = torch.where(torch.rand(300, n, generator=gen) < 0.5, float("-inf"), base)
    # NaNs of both sign bits (x86's inf - inf is a negative NaN): rank orders them, first
    nan = torch.tensor(float("nan"))
    nans = torch.where(torch.rand(300, n, generator=gen) < 0.05, torch.where(torch.rand(300, n, generator=gen) < 0.5, nan, -nan), base)
    scores = torch.cat([base, nudged, signed, masked, nans, torch.randn(300, n, generator=gen) * 1e4])
    rank = torch.randperm(n, generator=gen)
    for k in sorted({1, min(2, n), min(4, n), n}):
        assert torch.equal(topk(scores, k, rank), stable_topk_reference(scores, k, rank))


def _tie_config(seed: int) -> ModelConfig:
    return ModelConfig(
        d_model=16,
        n_heads=2,
        tiers=[TierConfig("t", num_groups=4, experts_per_group=8, expert_hidden=16)],
        routing=RoutingConfig(k_tier=1, k_group=2, k_expert=2, seed=seed),
    )


def test_exact_ties_are_broken_by_the_seeded_hash():
    """All-zero gates make every candidate tie exactly; the seed alone decides the routes."""
    picks = {}
    for seed in range(6):
        cfg = _tie_config(seed)
        router = HSERRouter(cfg, layer=0)  # gates start at zero: exact ties everywhere
        x = torch.randn(10, 16)
        routes = router(x, _all_tiers(cfg))
        rows = {tuple(sorted(r.tolist())) for r in routes.expert_ids}
        assert len(rows) == 1  # every token resolves the tie the same way
        picks[seed] = rows.pop()
        again = HSERRouter(cfg, layer=0)(torch.randn(3, 16), _all_tiers(cfg)).expert_ids
        assert tuple(sorted(again[0].tolist())) == picks[seed]  # reproducible
        # Equal weights for tied experts: (1/2 group) * (1/2 expert) after renormalisation.
        torch.testing.assert_close(routes.weights, torch.full_like(routes.weights, 0.25))
    assert len(set(picks.values())) > 1, "a different seed must break ties differently"
    # ... and the layer index is part of the hash.
    layers = {tuple(sorted(HSERRouter(_tie_config(0), layer=l)(torch.randn(1, 16), _all_tiers(_tie_config(0))).expert_ids[0].tolist())) for l in range(6)}
    assert len(layers) > 1


def test_a_token_routes_the_same_alone_and_in_a_batch():
    cfg = two_tier_config()
    router = _router(cfg, std=0.5)
    tokens = torch.randn(320, cfg.d_model, generator=torch.Generator().manual_seed(7))
    batched = torch.cat([router(chunk, _all_tiers(cfg)).expert_ids for chunk in tokens.split(64)])
    alone = torch.cat([router(t[None], _all_tiers(cfg)).expert_ids for t in tokens])
    assert torch.equal(batched, alone)
    # Also when the same token sits at a different place in a different batch.
    perm = torch.randperm(320, generator=torch.Generator().manual_seed(8))
    shuffled = torch.cat([router(chunk, _all_tiers(cfg)).expert_ids for chunk in tokens[perm].split(64)])
    assert torch.equal(shuffled, batched[perm])


def test_exploration_noise_is_seeded_by_step_not_global_rng():
    cfg = two_tier_config(routing=RoutingConfig(k_tier=2, k_group=1, k_expert=2, noise_std=1.0))
    router = _router(cfg).train()
    x = torch.randn(64, cfg.d_model)
    torch.manual_seed(1)
    a = router(x, _all_tiers(cfg), step=10).expert_ids
    torch.manual_seed(2)
    b = router(x, _all_tiers(cfg), step=10).expert_ids
    c = router(x, _all_tiers(cfg), step=11).expert_ids
    clean = router.eval()(x, _all_tiers(cfg), step=10).expert_ids
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, clean)


def test_negative_bias_makes_a_tier_unroutable():
    cfg = two_tier_config()
    router = _router(cfg)
    router.heads["tier_b"].tier_bias.fill_(-1e4)
    routes = router(torch.randn(100, cfg.d_model), _all_tiers(cfg))
    assert (routes.expert_ids[routes.valid] < router.tier_offsets[1]).all()


def test_balance_loss_is_zero_at_uniform_probabilities_and_positive_otherwise():
    cfg = two_tier_config()
    router = HSERRouter(cfg, 0)  # zero gates: uniform probabilities at every level
    routes = router(torch.randn(20, cfg.d_model), _all_tiers(cfg))
    assert routes.balance_loss.abs().item() < 1e-6
    assert routes.z_loss.item() > 0  # logsumexp of zeros is log(n) > 0
    skewed = _router(cfg, std=2.0)(torch.randn(20, cfg.d_model), _all_tiers(cfg))
    assert skewed.balance_loss.item() > 1e-3


def test_balance_and_z_loss_against_hand_computation():
    """alpha_t KL(u_t||U) + alpha_g sum_t KL(u_g|t||U) + alpha_e sum_tg KL(u_e|tg||U), u = batch means;
    z = coef * (mean lse_t^2 + mean lse_g^2 + mean lse_e^2), computed here head by head."""
    routing = RoutingConfig(k_tier=1, k_group=1, k_expert=2, balance_alpha_tier=0.3, balance_alpha_group=0.2, balance_alpha_expert=0.1, z_loss_coef=0.05)
    cfg = two_tier_config(routing=routing)
    router = _router(cfg, std=0.4)
    x = torch.randn(50, cfg.d_model, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        heads = [router.heads[t.name] for t in cfg.tiers]
        tier_logits = torch.stack([x @ h.tier_gate[0] for h in heads], 1)

        def kl_uniform(p):  # p: (N, n) probabilities
            u = p.mean(0)
            return float((u * (u * u.numel()).log()).sum())

        balance = routing.balance_alpha_tier * kl_uniform(tier_logits.softmax(1))
        lse_t = tier_logits.logsumexp(1).square().mean()
        lse_g, lse_e = [], []
        for tier, head in zip(cfg.tiers, heads):
            group_logits = x @ head.group_gate.T
            balance += routing.balance_alpha_group * kl_uniform(group_logits.softmax(1))
            lse_g.append(group_logits.logsumexp(1))
            for g in range(tier.num_groups):
                rows = head.expert_gate[g * tier.experts_per_group : (g + 1) * tier.experts_per_group]
                expert_logits = x @ rows.T
                balance += routing.balance_alpha_expert * kl_uniform(expert_logits.softmax(1))
                lse_e.append(expert_logits.logsumexp(1))
        z = routing.z_loss_coef * (lse_t + torch.stack(lse_g).square().mean() + torch.stack(lse_e).square().mean())
    routes = router(x, _all_tiers(cfg))
    assert routes.balance_loss.item() == pytest.approx(balance, rel=1e-4)
    assert routes.z_loss.item() == pytest.approx(float(z), rel=1e-4)
