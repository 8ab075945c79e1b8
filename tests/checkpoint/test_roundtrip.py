"""Round trips: weights, logits, manifest, shards, progressive state, tokenizer, extras."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lite_llm
from lite_llm import ModelConfig, build_model
from lite_llm.checkpoint import FORMAT_VERSION, load_checkpoint, read_manifest, save_checkpoint, verify_checkpoint

from .conftest import TINY_SHARDS, input_ids, state_equal, tied_dense_model, tiny_model


@pytest.mark.parametrize("make", [tiny_model, tied_dense_model], ids=["tiny", "tiny-dense-tied"])
def test_round_trip_is_bitwise(tmp_path, make):
    model = make()
    path = save_checkpoint(tmp_path / "ckpt", model)
    loaded = load_checkpoint(path)
    assert state_equal(model, loaded.model)
    assert loaded.config == model.config
    assert loaded.model.num_params() == model.num_params()
    assert loaded.skipped_tiers == [] and loaded.training is None and loaded.tokenizer is None
    ids = input_ids()
    assert torch.equal(model(ids).logits, loaded.model(ids).logits)
    if model.config.tie_embeddings:
        assert loaded.model.lm_head.weight is loaded.model.embed.weight
    # The loaded weights are ordinary trainable parameters that own their memory.
    for p in loaded.model.parameters():
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad
    with torch.no_grad():
        loaded.model.embed.weight.add_(1.0)
    assert verify_checkpoint(path) == []


def test_round_trip_keeps_dtypes(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "ckpt", model))
    assert state_equal(model, loaded.model)
    assert loaded.model.embed.weight.dtype == torch.bfloat16


def test_tied_embedding_is_stored_once(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", tied_dense_model())
    names = [n for s in read_manifest(path)["shards"] for n in s["tensors"]]
    assert "embed.weight" in names and "lm_head.weight" not in names
    assert [s["path"] for s in read_manifest(path)["shards"]] == ["dense.safetensors"]


def test_manifest_lists_every_shard_with_its_sha256(saved, model):
    manifest = read_manifest(saved)
    assert manifest["format"] == "lite-llm-checkpoint" and manifest["format_version"] == FORMAT_VERSION == "1.0.0"
    assert manifest["lite_llm_version"] == lite_llm.__version__ and manifest["created_at"]
    assert manifest["model_config"] == model.config.to_dict()
    assert manifest["num_params"] == model.num_params()
    on_disk = sorted(p.name for p in saved.glob("*.safetensors"))
    assert sorted(s["path"] for s in manifest["shards"]) == on_disk == sorted(TINY_SHARDS)
    state = model.state_dict()
    listed = {}
    for shard in manifest["shards"]:
        data = (saved / shard["path"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        assert shard["bytes"] == len(data)
        assert shard["dtype"] == "float32"
        with safe_open(saved / shard["path"], "pt") as f:
            assert sorted(f.keys()) == sorted(shard["tensors"])
        for name, info in shard["tensors"].items():
            assert info == {"dtype": "float32", "shape": list(state[name].shape)}
            listed[name] = shard
    assert sorted(listed) == sorted(state)
    # Ownership: a tier's router heads and experts live in that tier's shards only.
    for name, shard in listed.items():
        if ".router.heads." in name:
            tier = name.split(".router.heads.")[1].split(".")[0]
            assert (shard["tier"], shard["kind"]) == (tier, "router")
        elif ".experts." in name:
            tier = name.split(".experts.")[1].split(".")[0]
            assert (shard["tier"], shard["kind"]) == (tier, "experts")
        else:
            assert (shard["tier"], shard["kind"]) == ("dense", "dense")
    for tier in model.config.tiers:
        meta = manifest["tiers"][tier.name]
        assert meta["num_params"] == model.config.tier_params(tier)
        assert meta["placement"] == tier.placement and meta["budget"] == tier.budget
        assert (meta["k_group"], meta["k_expert"]) == (2, 2)
    for entry in manifest["files"]:
        assert entry["sha256"] == hashlib.sha256((saved / entry["path"]).read_bytes()).hexdigest()


def test_large_groups_are_split_into_numbered_pieces(tmp_path, model):
    limit = 40_000
    path = save_checkpoint(tmp_path / "ckpt", model, max_shard_bytes=limit)
    shards = read_manifest(path)["shards"]
    experts = sorted(s["path"] for s in shards if s["tier"] == "tier_1b" and s["kind"] == "experts")
    assert experts == [f"tier-tier_1b-experts-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    for s in shards:
        sizes = [torch.Size(t["shape"]).numel() * 4 for t in s["tensors"].values()]
        assert len(sizes) == 1 or sum(sizes) <= limit
    assert sorted(p.name for p in path.glob("*.safetensors")) == sorted(s["path"] for s in shards)
    loaded = load_checkpoint(path)
    assert state_equal(model, loaded.model)
    assert load_checkpoint(path, tierset="tier_1b").tiers == ["tier_1b"]


def test_progressive_defaults_are_filled(tmp_path, model):
    path = save_checkpoint(tmp_path / "a", model)
    assert load_checkpoint(path).progressive == {"training": {}, "expansions": [], "curriculum": None, "layer_importance": None}
    given = {"expansions": [{"op": "add_tier", "tier": "tier_10b", "step": 100}], "training": {"tokens": 12345}, "mine": [1, 2]}
    path = save_checkpoint(tmp_path / "b", model, progressive=given)
    progressive = load_checkpoint(path).progressive
    assert progressive == {**given, "curriculum": None, "layer_importance": None}
    assert json.loads((path / "progressive.json").read_text())["expansions"] == given["expansions"]


def test_extra_dirs_round_trip(tmp_path, model):
    fisher = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) for i, (name, p) in enumerate(model.named_parameters())}
    path = save_checkpoint(tmp_path / "ckpt", model, extra_dirs={"ewc": fisher})
    assert (path / "ewc" / "tensors.safetensors").is_file()
    loaded = load_checkpoint(path)
    assert loaded.extra_dirs == ["ewc"]
    back = loaded.load_extra("ewc")
    assert sorted(back) == sorted(fisher) and all(torch.equal(back[k], fisher[k]) for k in fisher)


class FakeTokenizer:
    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab

    def save(self, directory) -> None:
        Path(directory, "vocab.json").write_text(json.dumps(self.vocab))


def test_tokenizer_is_saved_and_loaded_through_lite_llm_data(tmp_path, model, monkeypatch):
    path = save_checkpoint(tmp_path / "ckpt", model, tokenizer=FakeTokenizer(["a", "b"]))
    assert json.loads((path / "tokenizer" / "vocab.json").read_text()) == ["a", "b"]
    fake = types.ModuleType("lite_llm.data")
    fake.load_tokenizer = lambda d: FakeTokenizer(json.loads(Path(d, "vocab.json").read_text()))
    monkeypatch.setitem(sys.modules, "lite_llm.data", fake)
    assert load_checkpoint(path).tokenizer.vocab == ["a", "b"]


def test_tokenizer_is_none_without_lite_llm_data(tmp_path, model, monkeypatch):
    path = save_checkpoint(tmp_path / "ckpt", model, tokenizer=FakeTokenizer(["a"]))
    monkeypatch.setitem(sys.modules, "lite_llm.data", None)  # import fails
    with pytest.warns(UserWarning, match="lite_llm.data is not available"):
        assert load_checkpoint(path).tokenizer is None


def test_grown_model_with_moe_layers_subset_round_trips(tmp_path):
    cfg = ModelConfig.from_preset("tiny", n_layers=3, moe_layers=[1], tie_embeddings=True)
    model = build_model(cfg, seed=4)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "ckpt", model))
    assert state_equal(model, loaded.model)
    ids = input_ids()
    assert torch.equal(model(ids).logits, loaded.model(ids).logits)


def test_shared_storage_without_tie_in_config_is_stored_twice(tmp_path, model):
    model.lm_head.weight = model.embed.weight  # tied by hand, config says untied
    loaded = load_checkpoint(save_checkpoint(tmp_path / "ckpt", model))
    assert torch.equal(loaded.model.lm_head.weight, model.embed.weight)
    assert loaded.model.lm_head.weight is not loaded.model.embed.weight
