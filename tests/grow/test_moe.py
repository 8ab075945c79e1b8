"""MoE growth: upcycling keeps the dense function, added experts stay unroutable, masks find
the old experts.

Tolerance: an upcycled block computes ``w1*f(x) + w2*f(x)`` with fp32 weights renormalised to
sum to one within an ulp, and the fused gate/up expert matmul rounds unlike the dense FFN's two
matmuls: a few fp32 ulps per layer.  Logits are compared within ``1e-6 * max(1, max|logit|)``
(the random test models have logits up to ~3.5, where an fp32 ulp is 2.4e-7).
"""

from __future__ import annotations


import pytest
import torch

from lite_llm.errors import ConfigError
from lite_llm.grow import LazyTensors, get_op, stored_names
from lite_llm.grow.moe import old_expert_mask

from .helpers import (
    CountingTensors,
    dense_shapes,
    grow,
    model_from,
    moe_shapes,
    random_model,
    sample_ids,
    stored_state,
)

DENSE, MOE = dense_shapes(), moe_shapes()


def assert_same_function(a, b, ids=None) -> None:
    ids = sample_ids(a.config) if ids is None else ids
    with torch.no_grad():
        want, got = a(ids).logits, b(ids).logits
    scale = max(1.0, float(want.abs().max()))
    diff = float((want - got).abs().max())
    assert diff <= 1e-6 * scale, f"max abs logit diff {diff:.3g} exceeds {1e-6 * scale:.3g}"


def apply(model, method: str, **params):
    """Run the op on the model's stored tensors; check the output is the new model's exact
    name list (in order) and dtype, then build the grown model."""
    config, tensors = get_op(method)(model.config, stored_state(model), **params)
    assert isinstance(tensors, LazyTensors)
    assert list(tensors) == stored_names(config)
    return config, tensors, model_from(config, tensors)




# ----------------------------------------------------------------------------------- upcycle
@pytest.mark.parametrize("groups, experts", [(1, 8), (2, 4)])
@pytest.mark.parametrize("shape", sorted(DENSE))
def test_upcycle_keeps_the_function(shape, groups, experts):
    model = random_model(DENSE[shape])
    config, _, grown = apply(model, "upcycle", num_experts=experts, num_groups=groups, k_expert=2)
    tier = config.tiers[0]
    assert (tier.name, tier.num_groups, tier.experts_per_group, tier.expert_hidden) == ("tier_0", groups, experts, model.config.intermediate_size)
    assert config.moe_layers is None and config.routing.renormalize and config.routing.k_tier == 1
    assert config.num_params() == grown.num_params()
    assert_same_function(model, grown)
    assert get_op("upcycle").exact({"num_experts": experts})


def test_upcycle_copies_the_ffn_into_every_expert_and_zeroes_the_biases():
    model = random_model(DENSE["gqa2-untied"])
    src = stored_state(model)
    _, tensors, _ = apply(model, "upcycle", num_experts=3, num_groups=2, router_init="zeros")
    gate_up = tensors["layers.1.ffn.experts.tier_0.gate_up_proj"]
    down = tensors["layers.1.ffn.experts.tier_0.down_proj"]
    fused = torch.cat([src["layers.1.ffn.gate_proj.weight"], src["layers.1.ffn.up_proj.weight"]])
    assert gate_up.shape == (6, 2 * 72, 40) and down.shape == (6, 40, 72)
    for e in range(6):
        assert torch.equal(gate_up[e], fused) and torch.equal(down[e], src["layers.1.ffn.down_proj.weight"])
    head = "layers.1.ffn.router.heads.tier_0."
    for name, shape in (("tier_gate", (1, 40)), ("group_gate", (2, 40)), ("expert_gate", (6, 40)), ("tier_bias", (1,)), ("group_bias", (2,)), ("expert_bias", (6,))):
        assert tensors[head + name].shape == shape and not tensors[head + name].any()


def test_upcycle_router_is_seeded_normal_at_init_std():
    model = random_model(DENSE["gqa2-untied"])
    _, a, _ = apply(model, "upcycle", seed=3)
    _, b, _ = apply(model, "upcycle", seed=3)
    _, c, _ = apply(model, "upcycle", seed=4)
    name = "layers.0.ffn.router.heads.tier_0.expert_gate"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    assert not torch.equal(a[name], a["layers.1.ffn.router.heads.tier_0.expert_gate"])  # per-tensor streams
    assert float(a[name].std()) == pytest.approx(model.config.init_std, rel=0.25)


def test_upcycle_chosen_layers_only():
    model = random_model(DENSE["gqa3-tied"])  # 4 layers
    config, tensors, grown = apply(model, "upcycle", num_experts=4, layers=[2, 0])
    assert config.moe_layers == [0, 2]
    assert "layers.1.ffn.gate_proj.weight" in tensors and "layers.0.ffn.gate_proj.weight" not in tensors
    assert config.num_params() == grown.num_params()
    assert_same_function(model, grown)
    config, _, _ = apply(model, "upcycle", num_experts=4, layers=[0, 1, 2, 3])
    assert config.moe_layers is None


def test_upcycle_passes_budget_placement_and_routing_through():
    model = random_model(DENSE["mha-bias"])
    config, _, _ = apply(model, "upcycle", num_experts=4, num_groups=2, k_group=2, k_expert=3, tier="tier_1b", budget="10M", placement="warm")
    tier = config.tier("tier_1b")
    assert (tier.budget, tier.placement) == (10_000_000, "warm")
    assert (config.routing.k_group, config.routing.k_expert) == (2, 3)
    with pytest.raises(ConfigError, match=r"tiers\[tier_0\] needs .* but its budget is 1"):
        get_op("upcycle")(model.config, stored_state(model), budget=1)


def test_upcycle_with_noise_is_close_reproducible_and_not_exact():
    model = random_model(DENSE["gqa2-untied"])
    _, a, grown = apply(model, "upcycle", num_experts=4, noise=0.01, seed=1)
    _, b, _ = apply(model, "upcycle", num_experts=4, noise=0.01, seed=1)
    _, c, _ = apply(model, "upcycle", num_experts=4, noise=0.01, seed=2)
    name = "layers.0.ffn.experts.tier_0.gate_up_proj"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    assert not torch.equal(a[name][0], a[name][1])  # the copies now differ
    ids = sample_ids(model.config)
    with torch.no_grad():
        want, got = model(ids).logits, grown(ids).logits
    diff = float((want - got).abs().max())
    assert 1e-4 < diff < 0.1 * float(want.abs().max())
    assert not get_op("upcycle").exact({"noise": 0.01})


def test_upcycle_is_lazy_and_keeps_the_dtype():
    model = random_model(DENSE["mqa-tied"]).to(torch.bfloat16)
    source = CountingTensors(stored_state(model))
    config, tensors = get_op("upcycle")(model.config, source, num_experts=2)
    assert source.reads == [] and list(tensors) == stored_names(config)  # nothing computed until asked for
    tensors["layers.1.ffn.experts.tier_0.gate_up_proj"]
    assert sorted(set(source.reads)) == ["layers.1.ffn.gate_proj.weight", "layers.1.ffn.up_proj.weight"]
    assert all(tensors[name].dtype == torch.bfloat16 for name in tensors)


def test_upcycled_router_and_experts_all_get_gradient():
    model = random_model(DENSE["gqa2-untied"])
    grown = grow(model, "upcycle", num_experts=8).train()
    ids = sample_ids(model.config, batch=4, seq=32)
    grown(ids, labels=ids).loss.backward()
    checked = 0
    for name, p in grown.named_parameters():
        if ".router." in name or ".experts." in name:
            assert p.grad is not None, name
            dead = [r for r in range(p.shape[0]) if not p.grad[r].any()]
            assert not dead, f"{name}: rows {dead} got no gradient"
            checked += 1
    assert checked == 3 * 5  # tier/group/expert gates and two banks per layer


@pytest.mark.parametrize(
    "shape, params, message",
    [
        ("two-tier", {}, r"already has tiers \(tier_a, tier_b\); use add_experts to add experts to a tier, or add_tier to add a tier"),
        ("gqa2-untied", {"layers": [0, 9]}, r"layer indices \[9\] are out of range for a model with 3 layers"),
        ("gqa2-untied", {"layers": []}, "upcycle's layers is empty"),
        ("gqa2-untied", {"num_experts": 2, "k_expert": 3}, "k_expert=3 is larger than num_experts=2"),
        ("gqa2-untied", {"num_groups": 1, "k_group": 2}, "k_group=2 is larger than num_groups=1"),
        ("gqa2-untied", {"num_experts": 0}, r"num_experts \(experts per group\) must be a positive integer, got 0"),
        ("gqa2-untied", {"router_init": "xavier"}, "router_init must be one of 'normal', 'zeros', got 'xavier'"),
        ("gqa2-untied", {"noise": -0.1}, "noise must be a number >= 0"),
        ("gqa2-untied", {"tier": "Tier-0"}, "tier name 'Tier-0' must be lower-case"),
        ("gqa2-untied", {"count": 2}, "has no parameter 'count'"),
    ],
)
def test_upcycle_bad_parameters(shape, params, message):
    model = random_model({**DENSE, **MOE}[shape])
    with pytest.raises(ConfigError, match=message):
        get_op("upcycle")(model.config, stored_state(model), **params)


# ----------------------------------------------------------------------------------- add_experts
def new_expert_ids(old_config, new_config, tier_name):
    """Flat ids (over all tiers, as routing reports them) of the experts add_experts made."""
    ids, offset = [], 0
    for tier in new_config.tiers:
        old = old_config.tier(tier.name)
        if tier.name == tier_name:
            for g in range(tier.num_groups):
                ids += [offset + g * tier.experts_per_group + e for e in range(old.experts_per_group, tier.experts_per_group)]
        offset += tier.num_experts
    return ids


@pytest.mark.parametrize("init", ["copy", "random"])
@pytest.mark.parametrize("shape, tier", [("two-tier", "tier_a"), ("two-tier", "tier_b"), ("partial-moe-tied", "tier_0")])
def test_add_experts_keeps_the_function_and_never_routes_to_them(shape, tier, init):
    model = random_model(MOE[shape])
    config, _, grown = apply(model, "add_experts", tier=tier, count=3, init=init, noise=0.05 if init == "copy" else 0.0)
    old = model.config.tier(tier)
    assert config.tier(tier).experts_per_group == old.experts_per_group + 3
    assert config.num_params() == grown.num_params()
    assert_same_function(model, grown)
    # A bigger batch, in training mode (the grouped_mm path with gradients), routes the same.
    ids = sample_ids(model.config, batch=4, seq=48, seed=5)
    out = grown.train()(ids, return_routes=True)
    new = new_expert_ids(model.config, config, tier)
    for layer in out.routing:
        assert not layer.expert_routes[new].any(), f"layer {layer.layer} routed to a new expert"
        assert not torch.isin(layer.routes.expert_ids, torch.tensor(new)).any()
    assert get_op("add_experts").exact({"tier": tier, "count": 3, "init": init})


def test_add_experts_layout_copy_and_router_rows():
    model = random_model(MOE["two-tier"])  # tier_b: 3 groups x 2 experts
    src = stored_state(model)
    _, tensors, _ = apply(model, "add_experts", tier="tier_b", count=3, router_init="copy", unroutable_bias=-5e4)
    bank, head = "layers.2.ffn.experts.tier_b.", "layers.2.ffn.router.heads.tier_b."
    old_gu = src[bank + "gate_up_proj"].view(3, 2, 28, 36)
    new_gu = tensors[bank + "gate_up_proj"].view(3, 5, 28, 36)
    old_gate, new_gate = src[head + "expert_gate"].view(3, 2, 36), tensors[head + "expert_gate"].view(3, 5, 36)
    for g in range(3):
        for e in range(5):
            s = e if e < 2 else (e - 2) % 2  # old expert e, or new expert j=e-2 copies (g, j % E)
            assert torch.equal(new_gu[g, e], old_gu[g, s])
            assert torch.equal(new_gate[g, e], old_gate[g, s])
    bias = tensors[head + "expert_bias"].view(3, 5)
    assert torch.equal(bias[:, :2], src[head + "expert_bias"].view(3, 2))
    assert (bias[:, 2:] == -5e4).all()
    # the other tier and the group/tier gates are untouched
    assert torch.equal(tensors["layers.2.ffn.experts.tier_a.down_proj"], src["layers.2.ffn.experts.tier_a.down_proj"])
    assert torch.equal(tensors[head + "group_gate"], src[head + "group_gate"])


def test_add_experts_random_init_and_zero_router_rows():
    model = random_model(MOE["partial-moe-tied"])  # tier_0: 1 group x 4 experts, layer 1 only
    _, a, _ = apply(model, "add_experts", tier="tier_0", count=2, init="random", router_init="zeros", seed=7)
    _, b, _ = apply(model, "add_experts", tier="tier_0", count=2, init="random", router_init="zeros", seed=7)
    bank = "layers.1.ffn.experts.tier_0."
    assert torch.equal(a[bank + "down_proj"], b[bank + "down_proj"])
    cfg = model.config
    new_up, new_down = a[bank + "gate_up_proj"][4:], a[bank + "down_proj"][4:]
    assert float(new_up.std()) == pytest.approx(cfg.init_std, rel=0.2)
    assert float(new_down.std()) == pytest.approx(cfg.init_std / (2 * cfg.n_layers) ** 0.5, rel=0.2)
    assert not a["layers.1.ffn.router.heads.tier_0.expert_gate"][4:].any()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"tier": "tier_x", "count": 1}, "unknown tier 'tier_x'; this model has tiers tier_a, tier_b"),
        ({"tier": "tier_a", "count": 0}, "add_experts' count must be a positive integer, got 0"),
        ({"tier": "tier_a", "count": 1, "init": "zeros"}, "add_experts' init must be one of 'copy', 'random', got 'zeros'"),
        ({"tier": "tier_a", "count": 1, "router_init": "normal"}, "router_init must be one of 'copy', 'zeros'"),
        ({"tier": "tier_a", "count": 1, "unroutable_bias": -10}, "unroutable_bias must be <= -1000"),
        ({"tier": "tier_a", "count": 1, "noise": -1}, "noise must be a number >= 0"),
    ],
)
def test_add_experts_bad_parameters(params, message):
    model = random_model(MOE["two-tier"])
    with pytest.raises(ConfigError, match=message):
        get_op("add_experts")(model.config, stored_state(model), **params)


def test_add_experts_on_a_dense_model_says_to_upcycle():
    model = random_model(DENSE["mha-bias"])
    with pytest.raises(ConfigError, match=r"unknown tier 'tier_0'; this model has tiers \(none: upcycle it first\)"):
        get_op("add_experts")(model.config, stored_state(model), tier="tier_0", count=1)


def test_upcycle_then_add_experts_chains_lazily():
    model = random_model(DENSE["gqa2-untied"])
    config, tensors = get_op("upcycle")(model.config, stored_state(model), num_experts=4)
    config, tensors = get_op("add_experts")(config, tensors, tier="tier_0", count=2)
    assert list(tensors) == stored_names(config)
    assert_same_function(model, model_from(config, tensors))


# ----------------------------------------------------------------------------------- masks
def test_old_expert_mask_marks_the_old_rows():
    model = random_model(MOE["two-tier"])
    config, _, grown = apply(model, "add_experts", tier="tier_b", count=1)
    masks = old_expert_mask(model.config, config)
    state, src = stored_state(grown), stored_state(model)
    assert len(masks) == 3 * 2 * 4  # layers x tiers x (expert_gate, expert_bias, gate_up, down)
    expected_b = torch.tensor([True, True, False] * 3)
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == state[name].shape[:1]
        assert torch.equal(mask, expected_b) if ".tier_b." in name else mask.all()
        assert torch.equal(state[name][mask], src[name])  # the masked rows are the old tensor, in order


def test_old_expert_mask_of_an_upcycle_and_of_a_partial_moe():
    dense = random_model(DENSE["mha-bias"])
    config, _, _ = apply(dense, "upcycle", num_experts=2)
    masks = old_expert_mask(dense.config, config)
    assert masks and not any(m.any() for m in masks.values())  # every expert is new
    moe = MOE["partial-moe-tied"]
    grown = get_op("add_experts")(moe, stored_state(random_model(moe)), tier="tier_0", count=2)[0]
    masks = old_expert_mask(moe, grown)
    assert {n.split(".")[1] for n in masks} == {"1"}
    assert torch.equal(masks["layers.1.ffn.experts.tier_0.down_proj"], torch.tensor([True] * 4 + [False] * 2))


def test_old_expert_mask_refuses_a_shrunk_tier():
    moe = MOE["partial-moe-tied"]
    grown = get_op("add_experts")(moe, stored_state(random_model(moe)), tier="tier_0", count=2)[0]
    with pytest.raises(ConfigError, match=r"tier tier_0 went from 1x6 to 1x4"):
        old_expert_mask(grown, moe)
