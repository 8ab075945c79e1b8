"""Lite LLM: language models that grow.

The whole public path to a model::

    from lite_llm import ModelConfig, build_model
    model = build_model(ModelConfig.from_preset("tiny"))
    out = model(input_ids, tierset="upto:tier_1b", labels=input_ids)
"""

import os

# Bitwise reproducibility: MKL/OpenMP may otherwise shrink their thread teams under load, which
# changes GEMM blocking and so the rounding of results between otherwise identical runs.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")

# Idle OpenMP threads sleep instead of spinning when other processes compete for the CPUs, so a
# run beside them does not collapse; read once when torch loads, hence here, before anything
# below imports it (see lite_llm.runtime.threads).
from .runtime.threads import set_openmp_defaults  # noqa: E402 - must precede torch

set_openmp_defaults()

from .config import ModelConfig, RoutingConfig, TierConfig, TierSet
from .errors import CheckpointError, ConfigError, LiteLLMError, TierSetError
from .model import LiteLLM, ModelOutput, build_model

from .version import __version__

__all__ = [
    "CheckpointError",
    "ConfigError",
    "LiteLLM",
    "LiteLLMError",
    "ModelConfig",
    "ModelOutput",
    "RoutingConfig",
    "TierConfig",
    "TierSet",
    "TierSetError",
    "build_model",
]
