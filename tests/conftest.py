"""Shared fixtures: small configs and deterministic inputs."""

from __future__ import annotations

import pytest
import torch

from lite_llm import ModelConfig, RoutingConfig, TierConfig

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def two_tier_config(**overrides) -> ModelConfig:
    """Two tiers of unequal shape (exercises the padded router path), GQA, untied head."""
    fields = dict(
        vocab_size=97,
        d_model=48,
        n_layers=2,
        n_heads=6,
        n_kv_heads=2,
        intermediate_size=96,
        max_seq_len=128,
        tiers=[
            TierConfig("tier_a", num_groups=2, experts_per_group=3, expert_hidden=32),
            TierConfig("tier_b", num_groups=3, experts_per_group=4, expert_hidden=40, k_group=2),
        ],
        routing=RoutingConfig(k_tier=2, k_group=1, k_expert=2),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig.from_preset("tiny")


@pytest.fixture
def mixed_config() -> ModelConfig:
    return two_tier_config()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A real two-domain dataset (stdlib code and pydoc prose), capped for speed."""
    from lite_llm.data import ByteTokenizer, prepare_data

    out = tmp_path_factory.mktemp("data") / "std"
    prepare_data({"code": "stdlib-code", "prose": "stdlib-docs"}, out, ByteTokenizer(), max_bytes_per_domain=400_000)
    return out


# The CLI's --device defaults to auto (a GPU when there is one).  The suite's CLI tests compare
# runs bitwise, which holds on the CPU; pin them there so they mean the same on a GPU machine
# (tests/test_devices.py asks for CUDA explicitly where it tests it).
import os  # noqa: E402

os.environ.setdefault("LITE_LLM_DEVICE", "cpu")
