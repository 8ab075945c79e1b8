"""Refusals and tolerances: corrupt, truncated or missing shards, malformed manifests, versions."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lite_llm import CheckpointError, ModelConfig, TierConfig, build_model
from lite_llm.checkpoint import load_checkpoint, read_manifest, save_checkpoint, verify_checkpoint
from lite_llm.checkpoint import manifest as manifest_module

from .conftest import TINY_SHARDS, assert_one_sentence, edit_manifest, flip_byte, input_ids, state_equal, truncate


@pytest.mark.parametrize("shard", TINY_SHARDS)
def test_flipped_byte_in_any_shard_is_refused(saved, shard):
    flip_byte(saved / shard)
    with pytest.raises(CheckpointError, match="is corrupt \\(sha256 mismatch\\); restore it from a backup or re-save") as info:
        load_checkpoint(saved)
    assert shard in str(info.value)
    assert_one_sentence(info.value)
    problems = verify_checkpoint(saved)
    assert len(problems) == 1 and shard in problems[0] and "sha256 mismatch" in problems[0]


def test_flipped_header_byte_is_refused(saved):
    flip_byte(saved / "dense.safetensors", offset=20)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(saved)


def test_without_verify_a_flipped_data_byte_goes_unnoticed_but_structure_is_still_checked(saved, model):
    flip_byte(saved / "dense.safetensors")
    loaded = load_checkpoint(saved, verify=False)
    assert not state_equal(model, loaded.model)
    truncate(saved / "tier-tier_1b-experts.safetensors")
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(saved, verify=False)


def test_truncated_shard_is_refused(saved):
    shard = saved / "tier-tier_10b-experts.safetensors"
    size = shard.stat().st_size
    truncate(shard)
    with pytest.raises(CheckpointError, match=f"is truncated \\({size // 2} of {size} bytes\\)") as info:
        load_checkpoint(saved)
    assert_one_sentence(info.value)
    assert any("truncated" in p and shard.name in p for p in verify_checkpoint(saved))


def test_missing_shard_is_refused(saved):
    (saved / "tier-tier_1b-router.safetensors").unlink()
    with pytest.raises(CheckpointError, match="tier-tier_1b-router.safetensors is missing; restore it") as info:
        load_checkpoint(saved)
    assert_one_sentence(info.value)
    problems = verify_checkpoint(saved)
    assert len(problems) == 1 and "is missing" in problems[0]


def test_shard_dropped_from_manifest_and_disk_is_a_missing_tensor(saved):
    edit_manifest(saved, lambda m: m.update(shards=[s for s in m["shards"] if s["path"] != "tier-tier_1b-experts.safetensors"]))
    (saved / "tier-tier_1b-experts.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lacks tensor\\(s\\) layers.0.ffn.experts.tier_1b.gate_up_proj") as info:
        load_checkpoint(saved)
    assert_one_sentence(info.value)
    assert any("lacks tensor layers.0.ffn.experts.tier_1b.gate_up_proj" in p for p in verify_checkpoint(saved))


def test_missing_directory_and_manifest_are_refused(tmp_path, saved):
    with pytest.raises(CheckpointError, match="does not exist; check the path") as info:
        load_checkpoint(tmp_path / "nowhere")
    assert_one_sentence(info.value)
    (saved / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="has no manifest.json") as info:
        load_checkpoint(saved)
    assert_one_sentence(info.value)
    assert len(verify_checkpoint(saved)) == 1


def test_malformed_manifest_json_is_refused(saved):
    text = (saved / "manifest.json").read_text()
    (saved / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="manifest.json is not valid JSON .*; restore it from a backup or re-save") as info:
        read_manifest(saved)
    assert_one_sentence(info.value)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(saved)
    assert "not valid JSON" in verify_checkpoint(saved)[0]


@pytest.mark.parametrize("field", ["format", "format_version", "model_config", "shards"])
def test_manifest_missing_a_required_field_is_refused(saved, field):
    edit_manifest(saved, lambda m: m.pop(field))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(saved)
    assert field in str(info.value) or "not a lite-llm checkpoint manifest" in str(info.value)
    assert_one_sentence(info.value)


def test_shard_path_outside_the_checkpoint_is_refused(saved):
    edit_manifest(saved, lambda m: m["shards"][0].update(path="../elsewhere/dense.safetensors"))
    with pytest.raises(CheckpointError, match="outside the checkpoint") as info:
        load_checkpoint(saved)
    assert_one_sentence(info.value)


def test_future_major_version_is_refused(saved):
    edit_manifest(saved, lambda m: m.update(format_version="2.0.0", shards="a new layout"))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(saved)
    assert str(info.value).endswith("was written by format 2.0.0; this lite-llm reads 1.x; upgrade lite-llm")
    assert_one_sentence(info.value)


def test_future_minor_version_with_unknown_fields_loads(saved, model):
    def newer(m):
        m["format_version"] = "1.4.2"
        m["signature"] = {"alg": "ed25519"}
        m["model_config"]["sliding_window"] = 4096
        m["model_config"]["routing"]["capacity_factor"] = 1.25
        m["model_config"]["tiers"][0]["storage_class"] = "nvme"
        m["tiers"]["tier_1b"]["quant_scale"] = 0.5
        m["shards"][0]["compression"] = "none"
        m["shards"].append({"path": "tier-tier_1b-lora.safetensors", "tier": "tier_1b", "kind": "lora", "sha256": "0" * 64, "tensors": {"x": {}}})
        m["shards"].append({"path": "tier-tier_100b-experts.safetensors", "tier": "tier_100b", "kind": "experts", "sha256": "0" * 64, "tensors": {}})

    edit_manifest(saved, newer)
    loaded = load_checkpoint(saved)
    assert state_equal(model, loaded.model)
    assert loaded.manifest["signature"] == {"alg": "ed25519"}
    ids = input_ids()
    assert torch.equal(model(ids).logits, loaded.model(ids).logits)


def test_unknown_kind_is_refused_at_our_own_version(saved):
    edit_manifest(saved, lambda m: m["shards"][0].update(kind="lora"))
    with pytest.raises(CheckpointError, match="unknown kind 'lora'"):
        load_checkpoint(saved)


def test_tier_needing_a_newer_reader_is_skipped(tmp_path):
    cfg = ModelConfig.from_preset("tiny")
    cfg = cfg.replace(tiers=[cfg.tiers[0], TierConfig(**{**cfg.tiers[1].__dict__, "min_reader_version": "1.1.0"})])
    model = build_model(cfg, seed=3)
    path = save_checkpoint(tmp_path / "ckpt", model)
    edit_manifest(path, lambda m: m.update(format_version="1.1.0"))
    with pytest.warns(UserWarning, match="tier_10b that need a newer lite-llm reader"):
        loaded = load_checkpoint(path)
    assert loaded.skipped_tiers == ["tier_10b"] and loaded.tiers == ["tier_1b"]
    assert [t.name for t in loaded.config.tiers] == ["tier_1b"]
    ids = input_ids()
    assert torch.equal(model(ids, tierset="tier_1b").logits, loaded.model(ids).logits)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="need a newer lite-llm reader") as info:
        load_checkpoint(path, tierset="tier_10b")
    assert_one_sentence(info.value)


def test_older_manifest_missing_newer_fields_loads_with_defaults(saved, model, monkeypatch):
    monkeypatch.setattr(manifest_module, "FORMAT_VERSION", "1.3.0")  # we are a newer reader

    def older(m):
        for key in ("tiers", "num_params", "created_at", "lite_llm_version", "files"):
            m.pop(key)
        for key in ("attention_bias", "init_std", "moe_layers"):
            m["model_config"].pop(key)
        m["model_config"]["routing"].pop("z_loss_coef")
        for tier in m["model_config"]["tiers"]:
            for key in ("min_reader_version", "created_at", "description", "quantization"):
                tier.pop(key)
        for shard in m["shards"]:
            shard.pop("dtype")
            shard.pop("bytes")

    edit_manifest(saved, older)
    (saved / "progressive.json").unlink()
    loaded = load_checkpoint(saved)
    assert state_equal(model, loaded.model)
    assert loaded.config == model.config
    assert loaded.progressive == {"training": {}, "expansions": [], "curriculum": None, "layer_importance": None}
    assert loaded.manifest["tiers"]["tier_10b"]["placement"] == "warm"
    assert loaded.manifest["num_params"] is None and loaded.manifest["files"] == []
    assert verify_checkpoint(saved) == []


def test_corrupt_progressive_json_is_refused(saved):
    flip_byte(saved / "progressive.json", offset=0)
    with pytest.raises(CheckpointError, match="progressive.json is corrupt \\(sha256 mismatch\\)"):
        load_checkpoint(saved)


def test_invalid_model_config_is_a_checkpoint_error(saved):
    edit_manifest(saved, lambda m: m["model_config"].update(n_heads=5))
    with pytest.raises(CheckpointError, match="holds an invalid model_config") as info:
        load_checkpoint(saved)
    assert_one_sentence(info.value)


def test_shape_mismatch_is_reported(tmp_path, model):
    path = save_checkpoint(tmp_path / "ckpt", model)
    other = save_checkpoint(tmp_path / "other", build_model(ModelConfig.from_preset("tiny", vocab_size=128)))
    shutil.copy(other / "dense.safetensors", path / "dense.safetensors")
    edit_manifest(path, lambda m: m["shards"].__setitem__(0, read_manifest(other)["shards"][0]))
    with pytest.raises(CheckpointError, match="embed.weight .* has shape \\(128, 64\\) but the config needs \\(256, 64\\)") as info:
        load_checkpoint(path)
    assert_one_sentence(info.value)
    assert any("has shape (128, 64)" in p for p in verify_checkpoint(path))


def test_error_messages_name_the_file_and_the_remedy(saved):
    flip_byte(saved / "dense.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(saved)
    msg = str(info.value)
    assert str(saved / "dense.safetensors") in msg and "re-save" in msg
    assert json.loads((saved / "manifest.json").read_text())  # the manifest itself was not touched
