"""Depth growth: LLaMA-Pro is bitwise exact; SOLAR, stack and interpolate follow their plans."""

from __future__ import annotations

import pytest
import torch

from lite_llm.errors import ConfigError
from lite_llm.grow import get_op, layer_importance
from lite_llm.grow.depth import uniform_positions

from .helpers import (
    dense_shapes,
    grow,
    moe_shapes,
    random_model,
    sample_ids,
    stored_state,
)

SHAPES = {**dense_shapes(), **moe_shapes()}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_llama_pro_is_bitwise_exact(shape):
    model = random_model(SHAPES[shape])
    n = model.config.n_layers
    grown = grow(model, "llama_pro", target_layers=2 * n + 1)
    assert grown.config.n_layers == 2 * n + 1
    assert grown.config.num_params() == grown.num_params()
    ids = sample_ids(model.config)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, grown(ids).logits)


def test_llama_pro_places_copies_after_groups_and_keeps_moe_layers():
    model = random_model(moe_shapes()["partial-moe-tied"])  # 3 layers, MoE at layer 1
    grown = grow(model, "llama_pro", positions=[1, 1, 2])
    assert grown.config.n_layers == 6
    assert grown.config.moe_layers == [1, 2, 3]  # layer 1 and its two silenced copies
    copy = stored_state(grown)
    src = stored_state(model)
    for tier_tensor in ("ffn.experts.tier_0.gate_up_proj", "attn.q_proj.weight"):
        assert torch.equal(copy[f"layers.2.{tier_tensor}"], src[f"layers.1.{tier_tensor}"])
    assert not copy["layers.2.ffn.experts.tier_0.down_proj"].any()
    assert not copy["layers.3.attn.o_proj.weight"].any()
    assert torch.equal(copy["layers.4.attn.o_proj.weight"], src["layers.2.attn.o_proj.weight"])


def test_uniform_positions_follow_llama_pro():
    assert uniform_positions(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert uniform_positions(30, 6) == [4, 9, 14, 19, 24, 29]
    assert uniform_positions(5, 2) == [1, 4]


def test_uniform_positions_at_twice_the_depth_or_more_put_several_after_each_block():
    assert uniform_positions(2, 2) == [0, 1]
    assert uniform_positions(2, 4) == [0, 0, 1, 1]  # was [-1, 0, 0, 1]: "layer indices [-1]"
    assert uniform_positions(2, 5) == [0, 0, 1, 1, 1]
    assert uniform_positions(3, 7) == [0, 0, 1, 1, 2, 2, 2]
    for n, new in ((2, 9), (4, 13), (30, 70)):
        positions = uniform_positions(n, new)
        assert len(positions) == new and all(0 <= p < n for p in positions)
        counts = [positions.count(i) for i in range(n)]
        assert max(counts) - min(counts) <= 1  # spread evenly


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_llama_pro_to_three_times_the_depth_is_bitwise_exact(shape):
    model = random_model(SHAPES[shape])
    n = model.config.n_layers
    grown = grow(model, "llama_pro", target_layers=3 * n)
    assert grown.config.n_layers == 3 * n and grown.config.num_params() == grown.num_params()
    src, out = stored_state(model), stored_state(grown)
    for j in range(3 * n):  # block i, then two silenced copies of it
        i, copy = divmod(j, 3)
        assert torch.equal(out[f"layers.{j}.attn.q_proj.weight"], src[f"layers.{i}.attn.q_proj.weight"])
        assert bool(out[f"layers.{j}.attn.o_proj.weight"].any()) is (copy == 0)
    ids = sample_ids(model.config)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, grown(ids).logits)


def test_llama_pro_by_importance_beyond_one_per_block():
    model = random_model(dense_shapes()["gqa2-untied"])  # 3 layers
    grown = grow(model, "llama_pro", target_layers=8, importance=[0.1, 0.9, 0.5])  # 5 new: one each, two more by importance
    silenced = [not stored_state(grown)[f"layers.{j}.attn.o_proj.weight"].any() for j in range(8)]
    assert silenced == [False, True, False, True, True, False, True, True]
    ids = sample_ids(model.config)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, grown(ids).logits)


def test_llama_pro_by_importance_inserts_after_the_most_changing_blocks():
    model = random_model(dense_shapes()["gqa3-tied"])
    scores = layer_importance(model, sample_ids(model.config))
    assert len(scores) == 4 and all(0 <= s <= 2 for s in scores)
    best = max(range(4), key=lambda i: scores[i])
    grown = grow(model, "llama_pro", target_layers=5, importance=scores)
    state, src = stored_state(grown), stored_state(model)
    assert torch.equal(state[f"layers.{best + 1}.attn.q_proj.weight"], src[f"layers.{best}.attn.q_proj.weight"])
    assert not state[f"layers.{best + 1}.attn.o_proj.weight"].any()


def test_solar_plan_and_its_measured_change():
    model = random_model(dense_shapes()["gqa2-untied"])  # 3 layers
    grown = grow(model, "solar", drop=1)  # [0,1] + [1,2]
    src, out = stored_state(model), stored_state(grown)
    assert grown.config.n_layers == 4
    for j, i in enumerate([0, 1, 1, 2]):
        assert torch.equal(out[f"layers.{j}.ffn.down_proj.weight"], src[f"layers.{i}.ffn.down_proj.weight"])
    ids = sample_ids(model.config)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, grown(ids).logits)  # documented: not exact
    assert get_op("solar").exact({}) is False


def test_stack_and_interpolate():
    model = random_model(dense_shapes()["mha-bias"])  # 2 layers
    stacked = stored_state(grow(model, "stack", times=2))
    inter = grow(model, "interpolate", identity=True)
    src = stored_state(model)
    assert torch.equal(stacked["layers.2.attn.q_proj.weight"], src["layers.0.attn.q_proj.weight"])
    ids = sample_ids(model.config)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, inter(ids).logits)
    assert get_op("interpolate").exact({"identity": True}) and not get_op("interpolate").exact({})


@pytest.mark.parametrize(
    "params, message",
    [
        ({"positions": [0, 7]}, r"layer indices \[7\] are out of range for a model with 3 layers"),
        ({"target_layers": 2}, "larger than the current 3 layers"),
        ({}, "needs target_layers"),
        ({"target_layers": 5, "importance": [1.0]}, "importance has 1 scores"),
    ],
)
def test_llama_pro_bad_parameters(params, message):
    model = random_model(dense_shapes()["gqa2-untied"])
    with pytest.raises(ConfigError, match=message):
        grow(model, "llama_pro", **params)


def test_unknown_method_and_parameter():
    with pytest.raises(ConfigError, match="unknown growth method 'llama-pro'; known methods: .*llama_pro"):
        get_op("llama-pro")
    model = random_model(dense_shapes()["gqa2-untied"])
    with pytest.raises(ConfigError, match="has no parameter 'layers'; its parameters are target_layers, positions, importance"):
        grow(model, "llama_pro", layers=4)
    with pytest.raises(ConfigError, match="even number"):
        grow(model, "solar", target_layers=5)
