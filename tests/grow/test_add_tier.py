"""Adding a tier: old tensors bitwise kept, logits and routes bitwise unchanged, the new tier
never routed to; the three inits; budgets; the checkpoint form (hash and logit checks,
model_version bump, progressive record); the CLI; bad input in one sentence, nothing written.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lite_llm import RoutingConfig
from lite_llm.checkpoint import (
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    verify_checkpoint,
)
from lite_llm.cli import app
from lite_llm.data import ByteTokenizer
from lite_llm.errors import ConfigError, LiteLLMError
from lite_llm.grow import LazyTensors, get_op, stored_names
from lite_llm.grow import tiers as tiers_module
from lite_llm.grow.expand import GrowthError
from lite_llm.grow.tiers import add_tier_checkpoint, tensor_sha256

from ..conftest import two_tier_config
from .helpers import (
    CountingTensors,
    dense_shapes,
    model_from,
    moe_shapes,
    random_model,
    sample_ids,
    stored_state,
)

runner = CliRunner()
MOE = {
    **moe_shapes(),
    "two-tier-config": two_tier_config(),
    "two-tier-k1": two_tier_config(routing=RoutingConfig(k_tier=1, k_group=1, k_expert=2)),
}
NEW = {"tier": "tier_new", "num_groups": 2, "experts_per_group": 3, "expert_hidden": 12}


def add(model, **params):
    """Run add_tier on the model's stored tensors; return (config, input tensors, output tensors, grown model)."""
    source = stored_state(model)
    config, tensors = get_op("add_tier")(model.config, source, **{**NEW, **params})
    assert isinstance(tensors, LazyTensors) and list(tensors) == stored_names(config)
    return config, source, tensors, model_from(config, tensors)


def hidden_of(model, tier=None) -> int:
    return (model.config.tier(tier) if tier else model.config.tiers[0]).expert_hidden


def init_params(model, init: str) -> dict:
    """Parameters for each init mode (copy/upcycle need the source's hidden size)."""
    return {"init": init} if init == "random" else {"init": init, "expert_hidden": hidden_of(model)}


def new_flat_ids(config) -> torch.Tensor:
    """Flat expert ids (as routing reports them) of the last tier."""
    start = sum(t.num_experts for t in config.tiers[:-1])
    return torch.arange(start, start + config.tiers[-1].num_experts)


def tree_sha256(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------- the op
@pytest.mark.parametrize("init", ["random", "copy", "upcycle"])
@pytest.mark.parametrize("shape", sorted(MOE))
def test_every_old_tensor_is_passed_through_bitwise(shape, init):
    model = random_model(MOE[shape])
    config, source, tensors, grown = add(model, **init_params(model, init))
    assert [t.name for t in config.tiers] == [t.name for t in model.config.tiers] + ["tier_new"]
    for name in source:
        assert tensors[name] is source[name], name  # the input's own object, not a copy
        assert tensor_sha256(stored_state(grown)[name]) == tensor_sha256(source[name]), name
    new = [n for n in tensors if n not in source]
    assert new and all(".tier_new." in n for n in new)
    assert len(new) == 8 * len(model.config.moe_layer_indices)  # six head tensors and two banks per MoE layer
    assert config.num_params() == grown.num_params()
    assert get_op("add_tier").exact({"init": init})


@pytest.mark.parametrize("init", ["random", "copy", "upcycle"])
@pytest.mark.parametrize("shape", sorted(MOE))
def test_logits_and_routes_are_bitwise_unchanged_and_the_tier_is_never_routed(shape, init):
    model = random_model(MOE[shape])
    config, _, _, grown = add(model, **init_params(model, init), noise=0.0 if init == "random" else 0.05)
    new_ids = new_flat_ids(config)
    for seed in range(3):
        ids = sample_ids(model.config, batch=4, seq=40, seed=seed)
        for training in (False, True):  # train mode: the grouped_mm path with gradients, aux losses
            model.train(training), grown.train(training)
            want, got = model(ids, return_routes=True), grown(ids, return_routes=True)
            assert torch.equal(want.logits, got.logits), (seed, training)
            for old, new in zip(want.routing, got.routing):
                assert torch.equal(old.routes.expert_ids, new.routes.expert_ids)
                assert torch.equal(old.routes.weights, new.routes.weights)
                assert not new.expert_routes[new_ids].any() and new.tier_routes[-1] == 0
                assert new.tier_probs[-1] == 0.0


def test_new_head_is_seeded_normal_with_an_unroutable_tier_bias():
    model = random_model(MOE["two-tier"])
    _, _, a, _ = add(model, seed=3)
    _, _, b, _ = add(model, seed=3)
    _, _, c, _ = add(model, seed=4, unroutable_bias=-5e4)
    head = "layers.1.ffn.router.heads.tier_new."
    for gate, rows in (("tier_gate", 1), ("group_gate", 2), ("expert_gate", 6)):
        assert a[head + gate].shape == (rows, 36)
        assert torch.equal(a[head + gate], b[head + gate]) and not torch.equal(a[head + gate], c[head + gate])
    assert float(a[head + "expert_gate"].std()) == pytest.approx(model.config.init_std, rel=0.3)
    assert not torch.equal(a[head + "expert_gate"], a["layers.0.ffn.router.heads.tier_new.expert_gate"])  # per-tensor streams
    assert a[head + "tier_bias"].tolist() == [-1e4] and c[head + "tier_bias"].tolist() == [-5e4]
    assert not a[head + "group_bias"].any() and not a[head + "expert_bias"].any()
    assert a[head + "group_bias"].shape == (2,) and a[head + "expert_bias"].shape == (6,)


def test_random_experts_are_initialised_like_reset_parameters():
    model = random_model(MOE["two-tier"])
    config, _, tensors, _ = add(model, num_groups=4, experts_per_group=4, expert_hidden=24, seed=1)
    bank = "layers.2.ffn.experts.tier_new."
    assert tensors[bank + "gate_up_proj"].shape == (16, 48, 36) and tensors[bank + "down_proj"].shape == (16, 36, 24)
    cfg = model.config
    assert float(tensors[bank + "gate_up_proj"].std()) == pytest.approx(cfg.init_std, rel=0.1)
    assert float(tensors[bank + "down_proj"].std()) == pytest.approx(cfg.init_std / (2 * cfg.n_layers) ** 0.5, rel=0.1)
    assert config.tiers[-1].placement == "warm" and config.tiers[-1].budget is None


@pytest.mark.parametrize("source_tier, default", [(None, "tier_a"), ("tier_b", "tier_b")])
def test_copy_cycles_through_the_source_tiers_experts(source_tier, default):
    model = random_model(MOE["two-tier"])  # tier_a: 2x3 experts of hidden 20; tier_b: 3x2 of hidden 14
    hidden = hidden_of(model, default)
    _, source, tensors, _ = add(model, init="copy", source_tier=source_tier, num_groups=2, experts_per_group=5, expert_hidden=hidden)
    for kind in ("gate_up_proj", "down_proj"):
        old, new = source[f"layers.0.ffn.experts.{default}.{kind}"], tensors[f"layers.0.ffn.experts.tier_new.{kind}"]
        assert new.shape[0] == 10
        for e in range(10):
            assert torch.equal(new[e], old[e % old.shape[0]])


def test_upcycle_makes_every_expert_the_source_mean():
    model = random_model(MOE["two-tier"])
    _, source, tensors, _ = add(model, init="upcycle", source_tier="tier_b", expert_hidden=14)
    for kind in ("gate_up_proj", "down_proj"):
        mean = source[f"layers.2.ffn.experts.tier_b.{kind}"].double().mean(0).float()
        new = tensors[f"layers.2.ffn.experts.tier_new.{kind}"]
        assert all(torch.equal(new[e], mean) for e in range(6))


def test_noise_makes_copies_differ_reproducibly():
    model = random_model(MOE["two-tier"])
    _, source, a, _ = add(model, init="copy", expert_hidden=20, experts_per_group=3, noise=0.01, seed=1)
    _, _, b, _ = add(model, init="copy", expert_hidden=20, experts_per_group=3, noise=0.01, seed=1)
    name = "layers.1.ffn.experts.tier_new.gate_up_proj"
    old = source["layers.1.ffn.experts.tier_a.gate_up_proj"]
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], old)
    assert float((a[name] - old).abs().max()) < 0.1 * float(old.abs().max())


def test_k_overrides_and_k_tier():
    model = random_model(MOE["two-tier"])  # routing k_tier=2
    config, _, _, _ = add(model, k_group=2, k_expert=3)
    assert (config.tiers[-1].k_group, config.tiers[-1].k_expert, config.routing.k_tier) == (2, 3, 2)
    assert config.routing == model.config.routing  # k_tier stays unless given
    config, _, _, grown = add(model, k_tier=3)
    assert config.routing.k_tier == 3
    ids = sample_ids(model.config, batch=4, seq=40)
    with torch.no_grad():
        assert float((model(ids).logits - grown(ids).logits).abs().max()) <= 1e-5


def test_a_k_tier_that_changes_the_routing_needs_change_routing_and_is_not_exact():
    model = random_model(MOE["two-tier-k1"])  # two tiers, one per token
    with pytest.raises(ConfigError, match=r"^k_tier=2 changes which tiers every token uses \(it would mix 2 of the 2 existing tiers instead of 1\)"):
        add(model, k_tier=2)
    config, _, _, grown = add(model, k_tier=2, change_routing=True)
    assert config.routing.k_tier == 2 and not get_op("add_tier").exact({"k_tier": 2, "change_routing": True})
    ids = sample_ids(model.config, batch=4, seq=40)
    with torch.no_grad():
        assert float((model(ids).logits - grown(ids).logits).abs().max()) > 1e-3  # routing changed by design
    lowered = random_model(MOE["two-tier"])  # k_tier=2: lowering it changes the routing too
    with pytest.raises(ConfigError, match=r"^k_tier=1 changes which tiers every token uses \(it would mix 1 of the 2 existing tiers instead of 2\)"):
        add(lowered, k_tier=1)
    with pytest.raises(ConfigError, match="^add_tier's change_routing must be true or false, got 'yes'"):
        add(model, k_tier=2, change_routing="yes")


def test_change_routing_in_a_recipe_is_recorded_as_not_exact_with_its_loss_jump(tmp_path):
    from lite_llm.grow.expand import expand_checkpoint
    from lite_llm.grow.recipe import GrowthStep

    path = save_checkpoint(tmp_path / "src", random_model(MOE["two-tier-k1"]))
    out = expand_checkpoint(path, tmp_path / "out", [GrowthStep("add_tier", {**NEW, "k_tier": 2, "change_routing": True})])
    (record,) = out.records
    assert record["exact"] is False and record["preservation"]["max_abs"] > 1e-3
    assert isinstance(record["preservation"]["loss_jump"], float)


def test_a_tier_that_widens_the_slots_is_bitwise_too():
    """The router renormalises slot by slot, so more (empty) slots do not change old routes."""
    model = random_model(MOE["two-tier"])
    _, _, _, grown = add(model, num_groups=3, experts_per_group=3, k_group=3)
    ids = sample_ids(model.config, batch=4, seq=48)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, grown(ids).logits)


def test_is_lazy_and_keeps_the_dtype():
    model = random_model(MOE["partial-moe-tied"]).to(torch.bfloat16)


    source = CountingTensors(stored_state(model))
    config, tensors = get_op("add_tier")(model.config, source, **NEW)
    assert source.reads == [] and list(tensors) == stored_names(config)
    assert all(tensors[name].dtype == torch.bfloat16 for name in tensors)


def test_chains_after_upcycle():
    dense = random_model(dense_shapes()["gqa2-untied"])
    config, tensors = get_op("upcycle")(dense.config, stored_state(dense), num_experts=4, tier="tier_1b")
    config, tensors = get_op("add_tier")(config, tensors, **NEW)
    assert [t.name for t in config.tiers] == ["tier_1b", "tier_new"]
    ids = sample_ids(dense.config)
    with torch.no_grad():
        assert float((dense(ids).logits - model_from(config, tensors)(ids).logits).abs().max()) <= 1e-5


def test_created_at_is_a_utc_timestamp():
    model = random_model(MOE["two-tier"])
    config, _, _, _ = add(model)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", config.tiers[-1].created_at)
    assert all(t.created_at is None for t in config.tiers[:-1])  # the old tiers are untouched


# ----------------------------------------------------------------------------------- budgets
def test_budget_within_is_silent_and_recorded():
    model = random_model(MOE["two-tier"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config, _, _, _ = add(model, budget="1M")
    assert config.tiers[-1].budget == 1_000_000 and config.tiers[-1].budget_mode == "strict"


def test_budget_strict_is_one_sentence_naming_tier_size_and_budget():
    model = random_model(MOE["two-tier"])
    need = model.config.d_model * (1 + 2 + 6) * 3 + 6 * 3 * 36 * 12 * 3  # router + experts, three MoE layers
    with pytest.raises(ConfigError) as info:
        get_op("add_tier")(model.config, stored_state(model), **NEW, budget="10k")
    assert str(info.value) == f"tiers[tier_new] needs {need / 1000:.3g}K parameters ({need}) but its budget is 10K; raise the budget or use fewer/smaller experts"


def test_budget_advisory_warns_once_about_the_new_tier():
    model = random_model(MOE["two-tier"])
    with pytest.warns(UserWarning, match=r"tiers\[tier_new\] needs .* but its budget is 10K") as record:
        config, _, _, _ = add(model, budget="10k", budget_mode="advisory")
    assert len(record) == 1 and config.tiers[-1].budget_mode == "advisory"


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "shape, params, message",
    [
        ("two-tier", {"tier": "tier_a"}, "tier 'tier_a' already exists; choose a new name"),
        ("two-tier", {"init": "copy", "source_tier": "tier_x"}, "unknown source tier 'tier_x'; this model has tiers tier_a, tier_b"),
        (
            "two-tier",
            {"init": "copy"},
            "init 'copy' copies experts of hidden size 20 from tier 'tier_a', but the new tier's expert_hidden is 12; use expert_hidden=20 or init 'random'",
        ),
        (
            "two-tier",
            {"init": "upcycle", "source_tier": "tier_b"},
            "init 'upcycle' copies experts of hidden size 14 from tier 'tier_b', but the new tier's expert_hidden is 12; use expert_hidden=14 or init 'random'",
        ),
        (
            "gqa2-untied",
            {},
            "add_tier adds a tier to a mixture-of-experts model, but this model is dense (it has no tiers); use upcycle to make its FFNs the first tier",
        ),
        ("two-tier", {"init": "zeros"}, "add_tier's init must be one of 'random', 'copy', 'upcycle', got 'zeros'"),
        ("two-tier", {"source_tier": "tier_b"}, "source_tier applies to init 'copy' or 'upcycle', not 'random'; leave it out or choose another init"),
        ("two-tier", {"noise": 0.1}, "noise applies to init 'copy' or 'upcycle' (random experts already differ); leave it out or choose another init"),
        ("two-tier", {"unroutable_bias": -10}, "unroutable_bias must be <= -1000 so that the new tier's routing probability is exactly 0, got -10"),
        ("two-tier", {"num_groups": 0}, "add_tier's num_groups must be a positive integer, got 0"),
        ("two-tier", {"k_expert": 4}, "tiers[tier_new].k_expert=4 must be between 1 and experts_per_group=3"),
        ("two-tier", {"k_tier": 4}, "routing.k_tier=4 is larger than the number of tiers (3)"),
        ("two-tier", {"tier": "Tier-X"}, "tier name 'Tier-X' must be lower-case"),
        ("two-tier", {"placement": "lukewarm"}, "tiers[tier_new].placement must be one of hot, warm, cold, archive, got 'lukewarm'"),
        ("two-tier", {"count": 2}, "growth method 'add_tier' has no parameter 'count'"),
    ],
)
def test_bad_parameters_are_one_sentence(shape, params, message):
    model = random_model({**MOE, **dense_shapes()}[shape])
    with pytest.raises(ConfigError) as info:
        get_op("add_tier")(model.config, stored_state(model), **{**NEW, **params})
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------- on disk
@pytest.fixture
def source(tmp_path):
    model = random_model(MOE["two-tier"])
    path = save_checkpoint(tmp_path / "src", model, tokenizer=ByteTokenizer(), progressive={"training": {"step": 9, "tokens": 4321}})
    return model, path


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_checkpoint_keeps_tensors_and_logits_and_bumps_the_version(source, tmp_path):
    model, path = source
    out = add_tier_checkpoint(path, tmp_path / "out", **NEW, budget="1M")
    assert verify_checkpoint(out) == []
    before, after = read_manifest(path), read_manifest(out)
    assert (before["model_version"], after["model_version"]) == ("1.0.0", "1.1.0")
    meta = after["tiers"]["tier_new"]
    assert meta["created_at"].endswith("Z") and meta["placement"] == "warm" and meta["budget"] == 1_000_000
    # Shards of the dense part and the old tiers are the same files, byte for byte.
    old = {s["path"]: s["sha256"] for s in before["shards"]}
    new = {s["path"]: s["sha256"] for s in after["shards"]}
    assert all(new[p] == sha for p, sha in old.items())
    assert {p for p in new if p not in old} == {"tier-tier_new-router.safetensors", "tier-tier_new-experts.safetensors"}
    loaded = load_checkpoint(out)
    assert loaded.tokenizer is not None
    for seed in range(3):
        ids = sample_ids(model.config, batch=3, seq=30, seed=seed)
        assert torch.equal(logits(model, ids), logits(loaded.model, ids))
    state = stored_state(loaded.model)
    assert all(torch.equal(state[n], t) for n, t in stored_state(model).items())


def test_checkpoint_records_the_growth_in_progressive(source, tmp_path):
    _, path = source
    out = add_tier_checkpoint(path, tmp_path / "out", **{**NEW, "init": "copy", "source_tier": "tier_b", "expert_hidden": 14})
    progressive = json.loads((out / "progressive.json").read_text())
    assert progressive["training"] == {"step": 9, "tokens": 4321}
    (record,) = progressive["expansions"]
    assert record["method"] == "add_tier" and record["exact"] is True and record["tier"] == "tier_new"
    assert record["params"]["init"] == "copy" and record["params"]["source_tier"] == "tier_b"
    assert record["created_at"] == read_manifest(out)["tiers"]["tier_new"]["created_at"]
    assert record["source_manifest_sha256"] == hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    assert (record["model_version_before"], record["model_version_after"]) == ("1.0.0", "1.1.0")
    assert record["preservation"]["bitwise"] and record["preservation"]["max_abs"] == 0.0
    assert record["params_after"] - record["params_before"] == record["tier_params"]
    assert record["old_tensors_verified"] == "sha256" and record["note"] is None


def test_adding_twice_bumps_again_and_keeps_both_records(source, tmp_path):
    model, path = source
    first = add_tier_checkpoint(path, tmp_path / "one", **NEW)
    second = add_tier_checkpoint(first, tmp_path / "two", **{**NEW, "tier": "tier_more", "num_groups": 1})
    assert read_manifest(second)["model_version"] == "1.2.0"
    assert [r["tier"] for r in load_checkpoint(second).progressive["expansions"]] == ["tier_new", "tier_more"]
    ids = sample_ids(model.config)
    assert torch.equal(logits(model, ids), logits(load_checkpoint(second).model, ids))


def test_large_models_skip_the_logit_check_but_still_hash(source, tmp_path):
    _, path = source
    out = add_tier_checkpoint(path, tmp_path / "out", **NEW, max_validate_params=0)
    (record,) = load_checkpoint(out).progressive["expansions"]
    assert record["preservation"] is None and record["note"].startswith("logits not compared")


def test_a_tensor_that_does_not_hash_like_the_source_stops_the_commit(source, tmp_path, monkeypatch):
    _, path = source
    real = tiers_module._source_digests

    def tampered(src, verify):
        digests = real(src, verify)
        digests["layers.1.ffn.experts.tier_a.down_proj"] = "0" * 64
        return digests

    monkeypatch.setattr(tiers_module, "_source_digests", tampered)
    with pytest.raises(GrowthError, match="tensor layers.1.ffn.experts.tier_a.down_proj of the output does not hash like the source's; nothing was written"):
        add_tier_checkpoint(path, tmp_path / "out", **NEW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_refuses_a_nonempty_output_and_the_source_itself(source, tmp_path):
    _, path = source
    with pytest.raises(LiteLLMError, match="is the source checkpoint; write the grown model to a new directory"):
        add_tier_checkpoint(path, path, **NEW)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(LiteLLMError, match="already exists and is not empty"):
        add_tier_checkpoint(path, tmp_path / "full", **NEW)


# ----------------------------------------------------------------------------------- CLI
def test_cli_adds_a_tier(source, tmp_path):
    model, path = source
    out = tmp_path / "out"
    args = ["add-tier", str(path), "--tier", "tier_10b", "--groups", "2", "--experts-per-group", "4", "--expert-hidden", "14"]
    args += ["--budget", "1M", "--placement", "cold", "--init", "copy", "--source-tier", "tier_b", "--k-expert", "2", "--seed", "3", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for text in ("tier_10b", "1.1.0", "1M", "cold"):
        assert text in result.output
    loaded = load_checkpoint(out)
    tier = loaded.config.tier("tier_10b")
    assert (tier.num_groups, tier.experts_per_group, tier.expert_hidden, tier.placement, tier.k_expert) == (2, 4, 14, "cold", 2)
    ids = sample_ids(model.config)
    assert torch.equal(logits(model, ids), logits(loaded.model, ids))


@pytest.mark.parametrize("source_tier", [None, "tier_b"])
def test_cli_takes_the_shape_it_is_not_given_from_the_source_tier(source, tmp_path, source_tier):
    model, path = source
    reference = model.config.tier(source_tier or model.config.tiers[0].name)
    out = tmp_path / "out"
    args = ["add-tier", str(path), "--tier", "tier_new", "--experts-per-group", "5", "-o", str(out)]
    result = runner.invoke(app, args + (["--source-tier", source_tier, "--init", "upcycle"] if source_tier else []))
    assert result.exit_code == 0, result.output
    tier = load_checkpoint(out).config.tier("tier_new")
    assert (tier.num_groups, tier.experts_per_group, tier.expert_hidden) == (reference.num_groups, 5, reference.expert_hidden)


CLI_BASE = ["--groups", "2", "--experts-per-group", "3", "--expert-hidden", "12"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tier", "tier_a"], "tier 'tier_a' already exists; choose a new name"),
        (["--tier", "tier_big", "--budget", "10k"], "tiers[tier_big] needs 24.3K parameters (24300) but its budget is 10K; raise the budget or use fewer/smaller experts"),
        (["--tier", "tier_big", "--init", "copy", "--source-tier", "tier_x"], "unknown source tier 'tier_x'; this model has tiers tier_a, tier_b"),
        (
            ["--tier", "tier_big", "--init", "copy"],
            "init 'copy' copies experts of hidden size 20 from tier 'tier_a', but the new tier's expert_hidden is 12; use expert_hidden=20 or init 'random'",
        ),
    ],
)
def test_cli_bad_input_is_one_sentence_and_leaves_everything_as_it_was(source, tmp_path, args, message):
    _, path = source
    before = tree_sha256(path)
    out = tmp_path / "out"
    result = runner.invoke(app, ["add-tier", str(path), *CLI_BASE, *args, "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split()) and "error:" in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert tree_sha256(path) == before


def test_cli_refuses_a_dense_model(tmp_path):
    path = save_checkpoint(tmp_path / "dense", random_model(dense_shapes()["gqa2-untied"]))
    out = tmp_path / "out"
    result = runner.invoke(app, ["add-tier", str(path), "--tier", "tier_1b", *CLI_BASE, "-o", str(out)])
    assert result.exit_code == 1
    assert "error: add_tier adds a tier to a mixture-of-experts model, but this model is dense (it has no tiers); use upcycle to make its FFNs the first tier" in " ".join(
        result.output.split()
    )
    assert not out.exists()
