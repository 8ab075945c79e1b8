"""The config-computed tensor table agrees with the built modules, name for name, in order."""

from __future__ import annotations

import pytest

from lite_llm import ModelConfig
from lite_llm.model import LiteLLM
from lite_llm.model.shapes import tensor_shapes

from ..conftest import two_tier_config
from ..grow.helpers import dense_shapes, moe_shapes

CONFIGS = {**dense_shapes(), **moe_shapes(), "two-tier-conftest": two_tier_config(), "tiny": ModelConfig.from_preset("tiny"), "small": ModelConfig.from_preset("small")}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tensor_shapes_match_the_model(name):
    config = CONFIGS[name]
    built = [(k, tuple(v.shape)) for k, v in LiteLLM(config).state_dict().items()]
    assert list(tensor_shapes(config).items()) == built
