"""Head growth: whole KV groups copied (split, copy) or query heads added inside groups (gqa)."""

from __future__ import annotations

import pytest
import torch

from lite_llm.errors import ConfigError
from lite_llm.grow import get_op, stored_names

from .helpers import (
    assert_same_function,
    dense_shapes,
    grow,
    moe_shapes,
    random_model,
    sample_ids,
    stored_state,
)

SHAPES = {**dense_shapes(), **moe_shapes()}


def grow_heads(model, **params):
    return grow(model, "heads", **params)



def targets(config, method: str) -> list[int]:
    """Two sizes per method: one more group (or one more head per group), and enough to give
    some heads two copies."""
    step = config.kv_groups if method in ("split", "copy") else config.n_kv_heads
    return [config.n_heads + step, 2 * config.n_heads + step]


def heads_of(weight: torch.Tensor, head_dim: int) -> list[torch.Tensor]:
    """The per-head row blocks of a (heads*head_dim, d) projection."""
    return list(weight.split(head_dim, dim=0))


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("method", ["split", "copy", "gqa"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_heads_growth_is_exact(shape, method, which):
    model = random_model(SHAPES[shape])
    cfg = model.config
    n_heads = targets(cfg, method)[which]
    grown = grow_heads(model, n_heads=n_heads, mode=method)
    new = grown.config
    assert new.n_heads == n_heads and new.head_dim == cfg.head_dim and new.d_model == cfg.d_model
    if method == "gqa":
        assert new.n_kv_heads == cfg.n_kv_heads
    else:
        assert new.kv_groups == cfg.kv_groups
    assert_same_function(model, grown)


def test_heads_output_is_lazy_and_in_stored_order():
    config = moe_shapes()["two-tier"]
    new_config, out = get_op("heads")(config, stored_state(random_model(config)), n_heads=9)
    assert list(out) == stored_names(new_config)
    assert get_op("heads").exact({"n_heads": 9, "mode": "gqa"})


def test_gqa_keeps_every_new_query_head_inside_its_group():
    model = random_model(dense_shapes()["gqa3-tied"])  # 6 heads, 3 KV heads: 2 per group
    cfg = model.config
    hd = cfg.head_dim
    grown = grow_heads(model, n_heads=15, mode="gqa")  # 5 per group
    src, out = stored_state(model), stored_state(grown)
    for layer in range(cfg.n_layers):
        old_q = heads_of(src[f"layers.{layer}.attn.q_proj.weight"], hd)
        new_q = heads_of(out[f"layers.{layer}.attn.q_proj.weight"], hd)
        for h, rows in enumerate(new_q):
            group = h // 5
            same_group = old_q[group * 2 : group * 2 + 2]
            assert any(torch.equal(rows, old) for old in same_group), (layer, h)
        for g in range(3):  # old head (g, j) now sits at g*5 + j
            for j in range(2):
                assert torch.equal(new_q[g * 5 + j], old_q[g * 2 + j])
        assert torch.equal(out[f"layers.{layer}.attn.k_proj.weight"], src[f"layers.{layer}.attn.k_proj.weight"])


def test_split_copies_whole_groups_and_splits_o_proj_unequally():
    model = random_model(dense_shapes()["gqa2-untied"])  # 4 heads, 2 KV heads, head_dim 10
    hd = model.config.head_dim
    grown = grow_heads(model, n_heads=6, mode="split", split=0.6)  # one more group: copy of group 0
    src, out = stored_state(model), stored_state(grown)
    assert grown.config.n_kv_heads == 3
    q, k = out["layers.0.attn.q_proj.weight"], out["layers.0.attn.k_proj.weight"]
    assert torch.equal(q[4 * hd : 6 * hd], src["layers.0.attn.q_proj.weight"][: 2 * hd])
    assert torch.equal(k[2 * hd :], src["layers.0.attn.k_proj.weight"][:hd])
    o, old_o = out["layers.0.attn.o_proj.weight"], src["layers.0.attn.o_proj.weight"]
    torch.testing.assert_close(o[:, :hd], 0.6 * old_o[:, :hd])
    torch.testing.assert_close(o[:, 4 * hd : 5 * hd], 0.4 * old_o[:, :hd])
    assert torch.equal(o[:, 2 * hd : 4 * hd], old_o[:, 2 * hd : 4 * hd])  # group 1 has no copy
    assert not torch.allclose(o[:, :hd], o[:, 4 * hd : 5 * hd])


def test_copy_adds_silent_heads_and_biases_follow_their_rows():
    model = random_model(dense_shapes()["mha-bias"])  # 3 heads, MHA, attention bias
    hd = model.config.head_dim
    grown = grow_heads(model, n_heads=5, mode="copy")
    src, out = stored_state(model), stored_state(grown)
    assert not out["layers.1.attn.o_proj.weight"][:, 3 * hd :].any()
    assert torch.equal(out["layers.1.attn.o_proj.weight"][:, : 3 * hd], src["layers.1.attn.o_proj.weight"])
    for proj in ("q", "k", "v"):
        bias, old = out[f"layers.1.attn.{proj}_proj.bias"], src[f"layers.1.attn.{proj}_proj.bias"]
        assert torch.equal(bias[3 * hd : 4 * hd], old[:hd]) and torch.equal(bias[4 * hd :], old[hd : 2 * hd])


def loss_grads(model) -> dict[str, torch.Tensor]:
    model.zero_grad()
    ids = sample_ids(model.config)
    model(ids, labels=ids).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["split", "gqa"])
def test_added_heads_receive_gradient(method):
    model = random_model(dense_shapes()["gqa2-untied"])  # 4 heads, 2 KV heads
    hd = model.config.head_dim
    grown = grow_heads(model, n_heads=8, mode=method)
    grads = loss_grads(grown)
    q = grads["layers.0.attn.q_proj.weight"]
    new_heads = [h for h in range(8) if h not in ((0, 1, 4, 5) if method == "gqa" else (0, 1, 2, 3))]
    for h in new_heads:
        assert q[h * hd : (h + 1) * hd].abs().sum() > 0, h
    o = grads["layers.0.attn.o_proj.weight"]
    assert o[:, new_heads[0] * hd : (new_heads[0] + 1) * hd].abs().sum() > 0


def test_silent_copies_learn_through_o_proj():
    """Copies with zero o_proj columns get no gradient on q/k/v at step 0 (nothing reads their
    output), but their o_proj columns do, which is what brings them to life."""
    model = random_model(dense_shapes()["gqa2-untied"])
    hd = model.config.head_dim
    grads = loss_grads(grow_heads(model, n_heads=6, mode="copy"))
    assert grads["layers.1.attn.o_proj.weight"][:, 4 * hd :].abs().sum() > 0
    assert not grads["layers.1.attn.q_proj.weight"][4 * hd :].any()


@pytest.mark.parametrize(
    "shape, params, message",
    [
        ("gqa2-untied", {"n_heads": 4}, "n_heads must be an integer larger than the current 4"),
        ("gqa2-untied", {"n_heads": 2}, "larger than the current 4"),
        ("gqa2-untied", {"n_heads": 5}, "n_heads=5 would break groups: mode 'split' copies whole KV groups of 2 query heads"),
        ("gqa3-tied", {"n_heads": 7, "mode": "copy"}, r"must be a multiple of 2 \(e\.g\. 8\)"),
        ("gqa3-tied", {"n_heads": 8, "mode": "gqa"}, "n_heads=8 is a GQA growth that would break groups"),
        ("mqa-tied", {"n_heads": 7, "mode": "split"}, "multiple of 5"),
        ("gqa2-untied", {"n_heads": 6, "mode": "tile"}, "unknown heads growth mode 'tile'; choose one of split, copy, gqa"),
        ("gqa2-untied", {"n_heads": 6, "split": 0.5}, "split must not be 0.5"),
        ("gqa2-untied", {"n_heads": 6, "split": 0.0}, "split must be a fraction strictly between 0 and 1"),
    ],
)
def test_heads_bad_parameters(shape, params, message):
    model = random_model(SHAPES[shape])
    with pytest.raises(ConfigError, match=message):
        grow_heads(model, **params)
