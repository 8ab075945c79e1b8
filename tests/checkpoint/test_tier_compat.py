"""Tiers and compatibility: a checkpoint grown by a tier serves its old TierSets bitwise as
before, a reader that predates a tier skips it and still loads the rest bitwise, and a
checkpoint written before ``model_version`` existed loads with the default."""

from __future__ import annotations

import json

import pytest
import torch

from lite_llm import ModelConfig, build_model
from lite_llm.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from lite_llm.checkpoint.manifest import (
    MODEL_VERSION_DEFAULT,
    next_minor_version,
    reader_version,
)
from lite_llm.checkpoint.save import write_checkpoint
from lite_llm.errors import CheckpointError
from lite_llm.grow.tiers import add_tier_checkpoint

from .conftest import (
    assert_one_sentence,
    edit_manifest,
    input_ids,
    state_equal,
    tiny_model,
)

NEW_TIER = {"tier": "tier_100b", "num_groups": 2, "experts_per_group": 2, "expert_hidden": 48}


def logits(model, ids, tierset=None):
    with torch.no_grad():
        return model(ids, tierset=tierset).logits


def _built(config: ModelConfig):
    return build_model(config, seed=3)


@pytest.fixture
def grown_pair(tmp_path):
    """(before, after): the tiny two-tier checkpoint, and it with tier_100b added."""
    before = save_checkpoint(tmp_path / "before", tiny_model())
    after = add_tier_checkpoint(before, tmp_path / "after", **NEW_TIER)
    return before, after


# ----------------------------------------------------------------------------------- (a) TierSet
def test_a_tierset_of_the_old_tiers_loads_the_old_model_bitwise(tmp_path):
    config = ModelConfig.from_preset("tiny")
    model = _built(config.replace(tiers=config.tiers[:1]))
    before = save_checkpoint(tmp_path / "before", model)
    after = add_tier_checkpoint(before, tmp_path / "after", **{**NEW_TIER, "tier": "tier_10b"})
    old, subset = load_checkpoint(before), load_checkpoint(after, tierset="tier_1b")
    assert subset.tiers == ["tier_1b"] and subset.skipped_tiers == []
    assert state_equal(old.model, subset.model)
    for seed in range(3):
        ids = input_ids(seed=seed)
        assert torch.equal(logits(old.model, ids), logits(subset.model, ids))
        assert torch.equal(logits(old.model, ids), logits(load_checkpoint(after).model, ids))  # all tiers: the new one is unroutable


def test_every_old_tierset_of_a_two_tier_model_is_unchanged(grown_pair):
    before, after = grown_pair
    for tierset in ("tier_1b", "tier_10b", "tier_1b,tier_10b"):
        old, new = load_checkpoint(before, tierset=tierset), load_checkpoint(after, tierset=tierset)
        assert state_equal(old.model, new.model)
        ids = input_ids(seed=1)
        assert torch.equal(logits(old.model, ids), logits(new.model, ids))
    # The grown model with every tier allowed still computes the old function.
    ids = input_ids(seed=2)
    assert torch.equal(logits(load_checkpoint(before).model, ids), logits(load_checkpoint(after).model, ids))


# ----------------------------------------------------------------------------------- (b) old readers
def newer_than_ours() -> str:
    major, minor, _ = reader_version()
    return f"{major}.{minor + 1}.0"


def test_a_reader_that_predates_the_tier_skips_it_and_loads_the_rest_bitwise(grown_pair):
    before, after = grown_pair

    def mark(manifest):
        (tier,) = [t for t in manifest["model_config"]["tiers"] if t["name"] == "tier_100b"]
        tier["min_reader_version"] = newer_than_ours()

    edit_manifest(after, mark)
    with pytest.warns(UserWarning, match=r"tier\(s\) tier_100b that need a newer lite-llm reader; loading without them"):
        loaded = load_checkpoint(after)
    assert loaded.skipped_tiers == ["tier_100b"] and loaded.tiers == ["tier_1b", "tier_10b"]
    old = load_checkpoint(before)
    assert state_equal(old.model, loaded.model)
    for seed in range(3):
        ids = input_ids(seed=seed)
        assert torch.equal(logits(old.model, ids), logits(loaded.model, ids))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as info:
        load_checkpoint(after, tierset="tier_100b")
    assert "tier_100b" in str(info.value) and "need a newer lite-llm reader" in str(info.value)
    assert_one_sentence(info.value)


# ----------------------------------------------------------------------------------- (c) no model_version
def test_a_checkpoint_from_before_model_version_loads_with_the_default(tmp_path):
    model = tiny_model()
    path = save_checkpoint(tmp_path / "old", model)
    assert json.loads((path / "manifest.json").read_text())["model_version"] == MODEL_VERSION_DEFAULT == "1.0.0"
    edit_manifest(path, lambda m: m.pop("model_version"))
    assert "model_version" not in json.loads((path / "manifest.json").read_text())
    assert read_manifest(path)["model_version"] == "1.0.0"
    loaded = load_checkpoint(path)
    assert loaded.manifest["model_version"] == "1.0.0" and state_equal(model, loaded.model)
    grown = add_tier_checkpoint(path, tmp_path / "grown", **NEW_TIER)
    assert read_manifest(grown)["model_version"] == "1.1.0"


def test_model_version_is_written_checked_and_bumped(tmp_path):
    model = tiny_model()
    path = save_checkpoint(tmp_path / "v", model, model_version="2.3.4")
    assert read_manifest(path)["model_version"] == "2.3.4"
    assert next_minor_version("2.3.4") == "2.4.0" and next_minor_version("1.0.0") == "1.1.0"
    with pytest.raises(CheckpointError) as info:
        write_checkpoint(tmp_path / "bad", model.config, model.state_dict(), model_version="v2")
    assert str(info.value) == "model_version must be a major.minor.patch version such as 1.1.0, got 'v2'"
    assert not (tmp_path / "bad").exists()
    edit_manifest(path, lambda m: m.update(model_version="two"))
    with pytest.raises(CheckpointError) as info:
        read_manifest(path)
    assert "has model_version 'two', which is not a major.minor.patch version" in str(info.value)
    assert_one_sentence(info.value)
