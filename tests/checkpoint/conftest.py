"""Fixtures for checkpoint tests: small models, a saved checkpoint, inputs, byte-level tampering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lite_llm import ModelConfig, build_model
from lite_llm.checkpoint import save_checkpoint

TINY_SHARDS = [
    "dense.safetensors",
    "tier-tier_1b-router.safetensors",
    "tier-tier_1b-experts.safetensors",
    "tier-tier_10b-router.safetensors",
    "tier-tier_10b-experts.safetensors",
]


def tiny_model(seed: int = 1):
    return build_model(ModelConfig.from_preset("tiny"), seed=seed)


def tied_dense_model(seed: int = 1):
    return build_model(ModelConfig.from_preset("tiny-dense", tie_embeddings=True), seed=seed)


def input_ids(vocab: int = 256, shape=(2, 24), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) - 5 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def edit_manifest(path: Path, fn) -> None:
    manifest_path = path / "manifest.json"
    data = json.loads(manifest_path.read_text())
    fn(data)
    manifest_path.write_text(json.dumps(data, indent=2))


def assert_one_sentence(exc: BaseException) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg, msg
    assert ". " not in msg and not msg.endswith("."), msg


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def saved(tmp_path, model) -> Path:
    return save_checkpoint(tmp_path / "ckpt", model)
