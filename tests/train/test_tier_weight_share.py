"""The tier chart and progress line at k_tier = 2: every token uses both tiers, so route counts
are fixed by the tiers' shapes whatever the router does (50/50 for equal shapes); the share of routing weight says what each tier carries."""

from __future__ import annotations

import pytest
import torch

from lite_llm.model import build_model
from lite_llm.train.trainer import RoutingTotals
from tests.conftest import two_tier_config


def test_routing_weight_share_is_the_layers_mean_weight_per_tier():
    model = build_model(two_tier_config(), seed=0)  # k_tier = 2
    with torch.no_grad():  # a tilt towards tier_a, so the weights are far from equal
        for block in model.layers:
            block.ffn.router.heads["tier_a"].tier_bias.fill_(1.0)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    totals = RoutingTotals()
    totals.add(model(ids, labels=ids).routing, grad_accum=1)
    record = totals.record(model.config.tiers)
    # route counts are fixed by the shape (tier_b picks 2 groups x 2 experts, tier_a 1 x 2), not by the router
    assert record["tier_share"] == pytest.approx({"tier_a": 1 / 3, "tier_b": 2 / 3})
    weights = [layer.tier_weights for layer in model(ids, labels=ids).routing]
    want = {t.name: float(sum(w[i] for w in weights) / len(weights)) for i, t in enumerate(model.config.tiers)}
    assert record["tier_weight_share"] == pytest.approx(want, rel=1e-6)
    assert sum(want.values()) == pytest.approx(1.0, rel=1e-6) and want["tier_a"] > 0.6
