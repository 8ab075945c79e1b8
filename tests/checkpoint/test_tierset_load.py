"""Loading a TierSet: only its shards are read, and the model equals the full one under that TierSet."""

from __future__ import annotations

import pytest
import torch

from lite_llm import RoutingConfig, TierSet, TierSetError, build_model
from lite_llm.checkpoint import load_checkpoint, save_checkpoint
from lite_llm.checkpoint import load as load_module

from ..conftest import two_tier_config
from .conftest import flip_byte, input_ids, truncate


@pytest.mark.parametrize("tierset", ["tier_1b", "upto:tier_1b", ["tier_1b"], TierSet.only("tier_1b")])
def test_tierset_load_reads_only_its_shards(saved, model, tierset):
    flip_byte(saved / "tier-tier_10b-router.safetensors")
    truncate(saved / "tier-tier_10b-experts.safetensors")
    loaded = load_checkpoint(saved, tierset=tierset)
    assert loaded.tiers == ["tier_1b"] and loaded.skipped_tiers == []
    assert [t.name for t in loaded.config.tiers] == ["tier_1b"] and loaded.config.routing.k_tier == 1
    assert not any("tier_10b" in name for name in loaded.model.state_dict())
    ids = input_ids()
    assert torch.equal(loaded.model(ids).logits, model(ids, tierset="tier_1b").logits)
    with pytest.raises(Exception, match="sha256 mismatch|truncated"):
        load_checkpoint(saved)


def test_tierset_load_never_opens_other_shards(saved, monkeypatch):
    opened = []
    real = load_module.check_file

    def spy(path, *args, **kwargs):
        opened.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(load_module, "check_file", spy)
    load_checkpoint(saved, tierset="tier_10b")
    assert not any("tier_1b" in name for name in opened)
    assert "tier-tier_10b-experts.safetensors" in opened and "dense.safetensors" in opened


def test_second_tier_alone_matches_the_full_model(saved, model):
    (saved / "tier-tier_1b-experts.safetensors").unlink()
    loaded = load_checkpoint(saved, tierset="only:tier_10b")
    ids = input_ids(seed=3)
    assert torch.equal(loaded.model(ids).logits, model(ids, tierset="tier_10b").logits)


def test_k_tier_is_clamped_to_the_loaded_tiers(tmp_path):
    cfg = two_tier_config()  # k_tier=2, tiers of unequal shape
    assert cfg.routing.k_tier == 2
    model = build_model(cfg, seed=7)
    path = save_checkpoint(tmp_path / "ckpt", model)
    loaded = load_checkpoint(path, tierset="tier_a")
    assert loaded.config.routing.k_tier == 1
    assert loaded.config.routing == RoutingConfig(**{**cfg.routing.__dict__, "k_tier": 1})
    ids = input_ids(vocab=cfg.vocab_size)
    assert torch.equal(loaded.model(ids).logits, model(ids, tierset="tier_a").logits)


def test_unknown_tier_in_tierset_is_a_tierset_error(saved):
    with pytest.raises(TierSetError, match="unknown tier\\(s\\) tier_99b"):
        load_checkpoint(saved, tierset="tier_99b")
