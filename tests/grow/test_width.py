"""Width growth: hidden size by tiling (integer factor) and LEMON padding, FFN neuron splitting."""

from __future__ import annotations

import math

import pytest
import torch

from lite_llm import ModelConfig, TierConfig
from lite_llm.errors import ConfigError
from lite_llm.grow import get_op, stored_names
from lite_llm.grow.width import split_fractions

from .helpers import (
    CountingTensors,
    assert_same_function,
    dense_shapes,
    grow,
    max_logit_diff,
    model_from,
    moe_shapes,
    random_model,
    sample_ids,
    stored_state,
)

SHAPES = {**dense_shapes(), **moe_shapes()}



def loss_grads(model) -> dict[str, torch.Tensor]:
    """Gradients of the LM loss on a sample batch, by parameter name."""
    model.zero_grad()
    ids = sample_ids(model.config)
    model(ids, labels=ids).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def width_sizes(d: int) -> dict[str, int]:
    return {"x2": 2 * d, "x3": 3 * d, "pad": d + 10}


# ----------------------------------------------------------------------------- hidden size


@pytest.mark.parametrize("size", ["x2", "x3", "pad"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_width_is_exact(shape, size):
    model = random_model(SHAPES[shape])
    d_model = width_sizes(model.config.d_model)[size]
    grown = grow(model, "width", d_model=d_model)
    assert grown.config.d_model == d_model
    assert grown.config.head_dim == model.config.head_dim
    assert_same_function(model, grown)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_width_pad_mode_is_exact_at_an_integer_factor(shape):
    model = random_model(SHAPES[shape])
    d = model.config.d_model
    grown = grow(model, "width", d_model=2 * d, mode="pad")
    assert not stored_state(grown)["embed.weight"][:, d:].any()  # new dimensions start at zero, not as copies
    assert_same_function(model, grown)


def test_width_tiling_layout_and_tied_final_norm():
    model = random_model(dense_shapes()["gqa3-tied"])  # d = 36, tied
    src, out = stored_state(model), stored_state(grow(model, "width", d_model=108))
    assert torch.equal(out["embed.weight"], src["embed.weight"].repeat(1, 3))
    assert torch.equal(out["layers.0.attn.o_proj.weight"], src["layers.0.attn.o_proj.weight"].repeat(3, 1))
    q = src["layers.1.attn.q_proj.weight"]
    torch.testing.assert_close(out["layers.1.attn.q_proj.weight"], torch.cat([q * share for share in split_fractions(3, 0.6)], dim=1))
    assert torch.equal(out["layers.0.ffn_norm.weight"], src["layers.0.ffn_norm.weight"].repeat(3))
    torch.testing.assert_close(out["norm.weight"], src["norm.weight"].repeat(3) / 3)  # the tied head's 1/k


def test_width_tiling_copies_drift_apart_under_adam():
    """Equal reader shares (W/k) would give every copy of a residual dimension the same
    gradient at every step, so AdamW would keep them identical forever (the grown model a small
    one in disguise); the default unequal shares let them drift apart after the first step."""
    model = random_model(dense_shapes()["gqa2-untied"])  # d = 40
    grown = grow(model, "width", d_model=80).train()
    opt = torch.optim.AdamW(grown.parameters(), lr=1e-2)
    ids = sample_ids(grown.config)
    embed = dict(grown.named_parameters())["embed.weight"]
    for _ in range(3):
        grown(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    drift = (embed[:, :40] - embed[:, 40:]).abs().max()
    assert drift > 0.1 * embed.abs().mean()


def test_width_padding_rescales_norms_and_eps():
    model = random_model(dense_shapes()["gqa2-untied"])  # d = 40
    grown = grow(model, "width", d_model=50)
    src, out = stored_state(model), stored_state(grown)
    assert grown.config.norm_eps == pytest.approx(model.config.norm_eps * 40 / 50)
    g = out["layers.0.attn_norm.weight"]
    torch.testing.assert_close(g[:40], src["layers.0.attn_norm.weight"] * math.sqrt(40 / 50))
    assert not out["embed.weight"][:, 40:].any() and not out["layers.1.ffn.down_proj.weight"][40:].any()
    assert out["layers.0.attn.k_proj.weight"][:, 40:].std() > 0.5 * model.config.init_std  # seeded noise, not zeros
    assert torch.equal(out["lm_head.weight"][:, :40], src["lm_head.weight"])


@pytest.mark.parametrize("d_model", [80, 50])
def test_width_noise_changes_the_function_a_little_and_reproducibly(d_model):
    model = random_model(dense_shapes()["gqa2-untied"])
    noisy = grow(model, "width", d_model=d_model, noise=0.01, seed=3)
    diff = max_logit_diff(model, noisy)
    assert 1e-4 < diff < 0.5
    again = grow(model, "width", d_model=d_model, noise=0.01, seed=3)
    other = grow(model, "width", d_model=d_model, noise=0.01, seed=4)
    assert max_logit_diff(noisy, again) == 0.0
    assert max_logit_diff(noisy, other) > 0.0
    op = get_op("width")
    assert op.exact({"d_model": d_model}) and not op.exact({"d_model": d_model, "noise": 1.0})


def test_width_padding_lets_gradient_reach_the_new_dimensions():
    """The new dims carry zeros at first, so readers' new columns (which multiply them) get no
    gradient at step 0; but the noisy reader columns send gradient back to the new dims, so the
    writers' new rows — the ones that will make them non-zero — do."""
    model = random_model(dense_shapes()["gqa2-untied"])  # d = 40
    grads = loss_grads(grow(model, "width", d_model=50))
    for name in ("embed.weight", "layers.0.attn.o_proj.weight", "layers.2.ffn.down_proj.weight"):
        new = grads[name][:, 40:] if name.startswith("embed") else grads[name][40:]
        assert new.abs().sum() > 0, name
    assert not grads["layers.0.attn.q_proj.weight"][:, 40:].any()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"d_model": 40}, "d_model must be an integer larger than the current 40"),
        ({"d_model": 30}, "larger than the current 40"),
        ({"d_model": 80, "noise": -1.0}, "noise must be a non-negative number"),
        ({"d_model": 80, "split": 0.5}, "split must not be 0.5: equal shares keep the copies identical"),
        ({"d_model": 80, "mode": "copy"}, "unknown width mode 'copy'; choose one of auto, tile, pad"),
        ({"d_model": 50, "mode": "tile"}, "width mode 'tile' needs d_model a multiple of the current 40, got 50"),
    ],
)
def test_width_bad_parameters(params, message):
    model = random_model(dense_shapes()["gqa2-untied"])
    with pytest.raises(ConfigError, match=message):
        grow(model, "width", **params)


def test_width_refuses_to_break_a_strict_tier_budget():
    config = moe_shapes()["two-tier"]
    tier = config.tiers[0]
    budgeted = config.replace(tiers=[TierConfig(**{**tier.__dict__, "budget": config.tier_params(tier)}), config.tiers[1]])
    with pytest.raises(ConfigError, match=r"width growth to d_model=72 would give tiers\[tier_a\] .* over its strict budget .* raise it first with a budget step \(lite-llm expand CKPT --method budget --set tier=tier_a"):
        get_op("width")(budgeted, stored_state(random_model(budgeted)), d_model=72)


# ----------------------------------------------------------------------------- laziness, order, dtype




@pytest.mark.parametrize(
    "op, params",
    [("width", {"d_model": 72}), ("width", {"d_model": 50}), ("ffn_width", {"intermediate_size": 60, "expert_hidden": {"tier_0": 25}})],
)
def test_growth_is_lazy_ordered_and_keeps_dtype(op, params):
    config = moe_shapes()["partial-moe-tied"]
    state = {k: v.to(torch.bfloat16) for k, v in stored_state(random_model(config)).items()}
    source = CountingTensors(state)
    new_config, out = get_op(op)(config, source, **params)
    assert source.reads == []  # nothing is read until a tensor is asked for
    assert list(out) == stored_names(new_config)
    first = next(iter(out))
    assert out[first].dtype == torch.bfloat16 and len(source.reads) == 1
    assert all(out[name].dtype == torch.bfloat16 for name in out)


# ----------------------------------------------------------------------------- FFN width


def ffn_params(config: ModelConfig) -> dict:
    """Grow every FFN the config has: dense width to 2I+3 (three copies of some neurons),
    experts to 2H+1 — per tier by name for the first tier, for all tiers otherwise."""
    params: dict = {}
    if len(config.moe_layer_indices) < config.n_layers:
        params["intermediate_size"] = 2 * config.intermediate_size + 3
    if config.tiers:
        first = config.tiers[0]
        if len(config.tiers) == 1:
            params["expert_hidden"] = {first.name: 2 * first.expert_hidden + 1}
        else:
            params["expert_hidden"] = max(t.expert_hidden for t in config.tiers) + 7
    return params


@pytest.mark.parametrize("mode", ["split", "paired_noise", "fresh"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_ffn_width_is_exact(shape, mode):
    model = random_model(SHAPES[shape])
    params = ffn_params(model.config)
    grown = grow(model, "ffn_width", mode=mode, **params)
    if "intermediate_size" in params:
        assert grown.config.intermediate_size == params["intermediate_size"]
    assert_same_function(model, grown)
    assert get_op("ffn_width").exact({"mode": mode})


def test_ffn_fresh_neurons_are_new_not_copies():
    model = random_model(dense_shapes()["gqa2-untied"])
    H = model.config.intermediate_size
    src, out = stored_state(model), stored_state(grow(model, "ffn_width", intermediate_size=2 * H, mode="fresh", seed=1))
    up, down = out["layers.0.ffn.up_proj.weight"], out["layers.0.ffn.down_proj.weight"]
    assert torch.equal(up[:H], src["layers.0.ffn.up_proj.weight"]) and torch.equal(down[:, :H], src["layers.0.ffn.down_proj.weight"])
    assert not down[:, H:].any()
    assert 0.5 * model.config.init_std < up[H:].std() < 2 * model.config.init_std
    assert not torch.allclose(up[H:], up[:H])


def test_ffn_split_shares_are_asymmetric_and_sum_to_one():
    model = random_model(dense_shapes()["mha-bias"])  # I = 44
    src = stored_state(model)
    out = stored_state(grow(model, "ffn_width", intermediate_size=2 * 44 + 3, split=0.6))
    down, old = out["layers.0.ffn.down_proj.weight"], src["layers.0.ffn.down_proj.weight"]
    torch.testing.assert_close(down[:, 0], 0.6 * old[:, 0])
    torch.testing.assert_close(down[:, 44], 0.24 * old[:, 0])
    torch.testing.assert_close(down[:, 88], 0.16 * old[:, 0])
    torch.testing.assert_close(down[:, 3], 0.6 * old[:, 3])  # two copies: 0.6 / 0.4
    torch.testing.assert_close(down[:, 47], 0.4 * old[:, 3])
    assert not torch.allclose(down[:, 3], down[:, 47])
    assert torch.equal(out["layers.0.ffn.gate_proj.weight"][47], src["layers.0.ffn.gate_proj.weight"][3])
    assert torch.equal(out["layers.1.ffn.up_proj.weight"][88], src["layers.1.ffn.up_proj.weight"][0])
    assert split_fractions(3, 0.6) == pytest.approx([0.6, 0.24, 0.16])


def test_ffn_expert_split_keeps_gate_and_up_halves_apart():
    config = moe_shapes()["partial-moe-tied"]  # tier_0: H = 18
    model = random_model(config)
    src = stored_state(model)["layers.1.ffn.experts.tier_0.gate_up_proj"]
    grown = grow(model, "ffn_width", expert_hidden={"tier_0": 20})
    out = stored_state(grown)
    gate_up, down = out["layers.1.ffn.experts.tier_0.gate_up_proj"], out["layers.1.ffn.experts.tier_0.down_proj"]
    assert gate_up.shape == (4, 40, 28) and grown.config.tier("tier_0").expert_hidden == 20
    assert torch.equal(gate_up[:, 18], src[:, 0]) and torch.equal(gate_up[:, 20 + 19], src[:, 18 + 1])
    old_down = stored_state(model)["layers.1.ffn.experts.tier_0.down_proj"]
    torch.testing.assert_close(down[..., 1] + down[..., 19], old_down[..., 1])
    assert not torch.allclose(down[..., 1], down[..., 19])


def test_ffn_paired_noise_is_zero_sum_and_reproducible():
    model = random_model(dense_shapes()["gqa2-untied"])  # I = 72
    src = stored_state(model)["layers.0.ffn.down_proj.weight"]
    out = stored_state(grow(model, "ffn_width", intermediate_size=100, mode="paired_noise", noise=1.0, seed=5))
    down = out["layers.0.ffn.down_proj.weight"]
    torch.testing.assert_close(down[:, 2] + down[:, 74], src[:, 2])
    assert not torch.allclose(down[:, 2], down[:, 74])
    assert torch.equal(down[:, 50], src[:, 50])  # a neuron without copies is untouched
    again = stored_state(grow(model, "ffn_width", intermediate_size=100, mode="paired_noise", noise=1.0, seed=5))
    assert torch.equal(again["layers.0.ffn.down_proj.weight"], down)


def test_ffn_noise_copies_is_inexact_bounded_and_reproducible():
    model = random_model(dense_shapes()["gqa2-untied"])
    noisy = grow(model, "ffn_width", intermediate_size=100, mode="noise_copies", noise=0.1, seed=1)
    assert 1e-4 < max_logit_diff(model, noisy) < 0.5
    assert max_logit_diff(noisy, grow(model, "ffn_width", intermediate_size=100, mode="noise_copies", noise=0.1, seed=1)) == 0.0
    assert max_logit_diff(noisy, grow(model, "ffn_width", intermediate_size=100, mode="noise_copies", noise=0.1, seed=2)) > 0.0
    assert not get_op("ffn_width").exact({"mode": "noise_copies"})


def test_ffn_split_copies_get_different_gradients():
    model = random_model(dense_shapes()["gqa2-untied"])  # I = 72
    grads = loss_grads(grow(model, "ffn_width", intermediate_size=80))
    gate = grads["layers.0.ffn.gate_proj.weight"]
    assert gate[72:].abs().sum() > 0
    assert not torch.allclose(gate[72], gate[0])  # shares 0.6 / 0.4: the copies drift apart


@pytest.mark.parametrize(
    "shape, params, message",
    [
        ("gqa2-untied", {"intermediate_size": 50}, r"intermediate_size must be an integer larger than the current 72"),
        ("gqa2-untied", {}, "ffn_width needs intermediate_size and/or expert_hidden"),
        ("gqa2-untied", {"intermediate_size": 80, "split": 0.5}, "split must not be 0.5"),
        ("gqa2-untied", {"intermediate_size": 80, "split": 1.2}, "split must be a fraction strictly between 0 and 1"),
        ("gqa2-untied", {"intermediate_size": 80, "mode": "copy"}, "unknown ffn_width mode 'copy'"),
        ("gqa2-untied", {"intermediate_size": 80, "mode": "paired_noise", "noise": 0.0}, "needs noise > 0"),
        ("gqa2-untied", {"expert_hidden": 40}, "this model has no tiers of experts"),
        ("two-tier", {"expert_hidden": {"tier_c": 40}}, "expert_hidden names unknown tier"),
        ("two-tier", {"expert_hidden": 16}, r"tiers\[tier_a\]\.expert_hidden must be an integer larger than the current 20"),
    ],
)
def test_ffn_width_bad_parameters(shape, params, message):
    model = random_model(SHAPES[shape])
    with pytest.raises(ConfigError, match=message):
        grow(model, "ffn_width", **params)


def test_ffn_width_refuses_to_break_a_strict_tier_budget():
    config = moe_shapes()["partial-moe-tied"]
    tier = config.tiers[0]
    budgeted = config.replace(tiers=[TierConfig(**{**tier.__dict__, "budget": config.tier_params(tier)})])
    with pytest.raises(ConfigError, match=r"ffn_width growth would give tiers\[tier_0\] .* over its strict budget"):
        get_op("ffn_width")(budgeted, stored_state(random_model(budgeted)), expert_hidden=20)
    grown = model_from(*get_op("ffn_width")(budgeted, stored_state(random_model(budgeted)), intermediate_size=50))
    assert grown.config.intermediate_size == 50  # dense growth does not touch the tier


def test_ffn_width_intermediate_size_on_an_all_moe_model_grows_every_tier():
    """Every block is MoE: intermediate_size names the experts' new size (it used to change a
    config field no tensor uses, parameters unchanged, recorded as exact)."""
    model = random_model(moe_shapes()["two-tier"])  # tier_a: hidden 20, tier_b: 14, every layer MoE
    by_field = grow(model, "ffn_width", intermediate_size=40)
    by_tiers = grow(model, "ffn_width", expert_hidden={"tier_a": 40, "tier_b": 40})
    assert [t.expert_hidden for t in by_field.config.tiers] == [40, 40]
    assert by_field.config.num_params() == by_tiers.config.num_params() > model.config.num_params()
    a, b = stored_state(by_field), stored_state(by_tiers)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert_same_function(model, by_field)
    one = grow(model, "ffn_width", intermediate_size=30, tier="tier_b")
    assert [t.expert_hidden for t in one.config.tiers] == [20, 30]
    partial = random_model(moe_shapes()["partial-moe-tied"])  # dense layers too: intermediate_size is theirs
    with pytest.raises(ConfigError, match="^tier='tier_0' names the tier whose experts grow, but no expert size was given"):
        grow(partial, "ffn_width", intermediate_size=50, tier="tier_0")


@pytest.mark.parametrize("shape", ["gqa3-tied", "gqa2-untied"])
@pytest.mark.parametrize("d_model", ["double", "odd"])  # tiling, and zero padding
def test_the_widened_tables_are_made_row_range_by_row_range_bitwise(shape, d_model, tmp_path, monkeypatch):
    """From a checkpoint on disk the grown embedding and head (tiling; padding: the embedding) are
    made a few rows at a time from the source's rows (never reading the whole source table),
    bitwise equal to widening the whole tensor in memory (the oracle); their rows are readable
    without making them, also through a later step that passes them on."""
    from lite_llm.checkpoint import save_checkpoint
    from lite_llm.checkpoint.lazy import open_checkpoint
    from lite_llm.checkpoint.stream import SafetensorsReader
    from lite_llm.data import ByteTokenizer
    from lite_llm.grow import tensors as lazy

    config = dense_shapes()[shape]
    model = random_model(config)
    size = 2 * config.d_model if d_model == "double" else config.d_model + 8
    in_memory = get_op("width")(config, stored_state(model), d_model=size)[1]
    stored = open_checkpoint(save_checkpoint(tmp_path / "src", model, tokenizer=ByteTokenizer()), verify=False).tensors
    new_config, grown = get_op("width")(config, stored, d_model=size)
    deeper = get_op("llama_pro")(new_config, grown, target_layers=new_config.n_layers + 1)[1]
    monkeypatch.setattr(lazy, "ROW_CHUNK_BYTES", 3 * config.d_model * 4)  # three source rows a chunk: many chunks
    read: list[str] = []
    real_get = SafetensorsReader.get
    monkeypatch.setattr(SafetensorsReader, "get", lambda self, name: read.append(name) or real_get(self, name))
    # Padding gives an untied head fresh random columns, drawn over the whole tensor: made whole.
    tables = [n for n in ("embed.weight", "lm_head.weight") if n in grown and (d_model == "double" or n == "embed.weight")]
    for name in tables:
        assert torch.equal(grown[name], in_memory[name]), name
        rows = lazy.row_reader(deeper, name)
        assert rows is not None and rows.shape == tuple(in_memory[name].shape)
        assert torch.equal(rows(5, 9), in_memory[name][5:9])
    assert not [n for n in read if n in tables]


@pytest.mark.parametrize("method", ["width", "llama_pro"])
def test_the_writer_takes_the_tables_range_by_range_and_writes_the_same_files(method, tmp_path, monkeypatch):
    """``expand_checkpoint`` hands the writer an embedding-sized table as row ranges (a widened
    one computed from the source's rows, one passed on read from its file) instead of whole: the
    whole table is never made or read, and the shard files are byte for byte those of writing
    each table whole (the oracle, with the row path switched off), with the same manifest hashes."""
    import json

    from lite_llm.checkpoint import save_checkpoint
    from lite_llm.checkpoint.stream import SafetensorsReader
    from lite_llm.data import ByteTokenizer
    from lite_llm.grow import expand as expand_module
    from lite_llm.grow import tensors as lazy
    from lite_llm.grow.expand import expand_checkpoint
    from lite_llm.grow.recipe import GrowthStep

    config = dense_shapes()["gqa2-untied"]
    src = save_checkpoint(tmp_path / "src", random_model(config), tokenizer=ByteTokenizer())
    step = GrowthStep("width", {"d_model": 2 * config.d_model}) if method == "width" else GrowthStep("llama_pro", {"target_layers": config.n_layers + 1})
    monkeypatch.setattr(lazy, "ROW_CHUNK_BYTES", 3 * config.d_model * 4)  # three source rows a chunk
    tables = ("embed.weight", "lm_head.weight")
    read: list[str] = []
    real_get = SafetensorsReader.get
    monkeypatch.setattr(SafetensorsReader, "get", lambda self, name: read.append(name) or real_get(self, name))
    made_whole: list[str] = []
    real_call = lazy.RowWise.__call__
    monkeypatch.setattr(lazy.RowWise, "__call__", lambda self: made_whole.append(self.name) or real_call(self))
    by_rows = expand_checkpoint(src, tmp_path / "by-rows", [step], validate="never").path
    assert not [n for n in read if n in tables] and made_whole == []

    monkeypatch.setattr(expand_module, "row_chunks", lambda *args: None)
    whole = expand_checkpoint(src, tmp_path / "whole", [step], validate="never").path
    assert (made_whole if method == "width" else [n for n in read if n in tables])  # the oracle made or read them whole
    shards = [s["path"] for s in json.loads((whole / "manifest.json").read_text())["shards"]]
    for name in shards:
        assert (by_rows / name).read_bytes() == (whole / name).read_bytes(), name
    hashes = [[s["sha256"] for s in json.loads((p / "manifest.json").read_text())["shards"]] for p in (by_rows, whole)]
    assert hashes[0] == hashes[1]
