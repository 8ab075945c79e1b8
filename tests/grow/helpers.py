"""Shared helpers for growth tests: model shapes, applying an op, comparing functions."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lite_llm import ModelConfig, RoutingConfig, TierConfig
from lite_llm.grow import get_op
from lite_llm.model import LiteLLM, build_model
from lite_llm.model import stored_state as lite_stored_state


def dense_shapes() -> dict[str, ModelConfig]:
    """Dense configs of several shapes: GQA with 2 and 3 groups, MQA, MHA, tied and untied,
    non-power-of-two sizes, head_dim independent of d_model, attention bias."""
    return {
        "gqa2-untied": ModelConfig(vocab_size=61, d_model=40, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=72, max_seq_len=64),
        "gqa3-tied": ModelConfig(
            vocab_size=53, d_model=36, n_layers=4, n_heads=6, n_kv_heads=3, head_dim=10, intermediate_size=50, max_seq_len=64, tie_embeddings=True
        ),
        "mha-bias": ModelConfig(vocab_size=47, d_model=24, n_layers=2, n_heads=3, intermediate_size=44, max_seq_len=64, attention_bias=True),
        "mqa-tied": ModelConfig(vocab_size=50, d_model=30, n_layers=2, n_heads=5, n_kv_heads=1, head_dim=6, intermediate_size=33, max_seq_len=64, tie_embeddings=True),
    }


def moe_shapes() -> dict[str, ModelConfig]:
    """Tiered-MoE configs: two unequal tiers, and one tier in a subset of layers."""
    return {
        "two-tier": ModelConfig(
            vocab_size=59,
            d_model=36,
            n_layers=3,
            n_heads=6,
            n_kv_heads=2,
            intermediate_size=60,
            max_seq_len=64,
            tiers=[
                TierConfig("tier_a", num_groups=2, experts_per_group=3, expert_hidden=20),
                TierConfig("tier_b", num_groups=3, experts_per_group=2, expert_hidden=14, k_group=2),
            ],
            routing=RoutingConfig(k_tier=2, k_group=1, k_expert=2),
        ),
        "partial-moe-tied": ModelConfig(
            vocab_size=41,
            d_model=28,
            n_layers=3,
            n_heads=4,
            head_dim=8,
            n_kv_heads=2,
            intermediate_size=42,
            max_seq_len=64,
            tie_embeddings=True,
            tiers=[TierConfig("tier_0", num_groups=1, experts_per_group=4, expert_hidden=18)],
            routing=RoutingConfig(k_tier=1, k_group=1, k_expert=2),
            moe_layers=[1],
        ),
    }


def random_model(config: ModelConfig, seed: int = 0) -> LiteLLM:
    """A model with every weight random, norms and router gates included (norm scales of one
    and zero biases would hide mistakes in how growth treats them)."""
    model = build_model(config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "router" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def stored_state(model: LiteLLM) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores (tied head excluded), as independent copies."""
    return {k: v.clone() for k, v in lite_stored_state(model).items()}


def model_from(config: ModelConfig, tensors) -> LiteLLM:
    """Build a model of ``config`` holding ``tensors`` (strict: every name, every shape)."""
    model = LiteLLM(config)
    state = dict(tensors)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()


def grow(model: LiteLLM, method: str, **params) -> LiteLLM:
    config, tensors = get_op(method)(model.config, stored_state(model), **params)
    return model_from(config, tensors)


def sample_ids(config: ModelConfig, batch: int = 3, seq: int = 17, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_logit_diff(a: LiteLLM, b: LiteLLM, ids: torch.Tensor | None = None) -> float:
    ids = sample_ids(a.config) if ids is None else ids
    return float((a(ids).logits - b(ids).logits).abs().max())


def assert_same_function(model: LiteLLM, grown: LiteLLM, tolerance: float = 1e-5) -> None:
    """Logits equal to fp32 rounding (max abs and MSE), and the config counts the parameters
    the grown model holds."""
    ids = sample_ids(model.config)
    with torch.no_grad():
        a, b = model(ids).logits, grown(ids).logits
    assert float((a - b).abs().max()) <= tolerance
    assert float((a - b).square().mean()) <= 1e-12
    assert grown.config.num_params() == grown.num_params()


class CountingTensors(Mapping):
    """An input mapping that records which tensors are read (to check that growth is lazy)."""

    def __init__(self, tensors):
        self.tensors, self.reads = tensors, []

    def __getitem__(self, name):
        self.reads.append(name)
        return self.tensors[name]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


def break_llama_pro(monkeypatch, *, scale: float = 1.01, on_produce=None) -> None:
    """Register, for this test, a ``llama_pro`` still claimed exact whose grown ``embed.weight``
    is scaled by ``scale`` (so the check must refuse it); ``on_produce(name)`` runs whenever a
    grown tensor is produced (to see, or hold up, the writer)."""
    import dataclasses
    import functools

    from lite_llm.grow import registry
    from lite_llm.grow.tensors import LazyTensors

    real = registry.get_op("llama_pro")

    @functools.wraps(real.fn)
    def broken(config, tensors, **params):
        new_config, new_tensors = real.fn(config, tensors, **params)

        def producer(name):
            def produce():
                if on_produce is not None:
                    on_produce(name)
                t = new_tensors[name]
                return t * scale if name == "embed.weight" else t

            return produce

        return new_config, LazyTensors({name: producer(name) for name in new_tensors})

    monkeypatch.setitem(registry._REGISTRY, "llama_pro", dataclasses.replace(real, fn=broken))


class RefusalMidWrite:
    """A check that refuses once the writer is under way, and the writer's side of that meeting:
    ``writer_step`` (called at each unit of the writer's work: a tensor produced, a raw copy)
    holds the first unit until the refusal is in, so what the writer does after it shows."""

    def __init__(self) -> None:
        import threading

        self.writing, self.failed = threading.Event(), threading.Event()
        self.steps = 0

    def refuse(self, *args, **kwargs) -> None:
        from lite_llm.grow.expand import GrowthError

        self.writing.wait(10)  # fail once the writer is under way
        try:
            raise GrowthError("refused by the test")
        finally:
            self.failed.set()

    def writer_step(self, *args) -> None:
        import time

        self.steps += 1
        if self.steps == 1:
            self.writing.set()
            self.failed.wait(10)
            time.sleep(0.3)  # the check's future is marked failed just after the event
