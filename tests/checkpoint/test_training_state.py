"""Training state: tensors and JSON metadata round trip bitwise, optimizer state included."""

from __future__ import annotations

import json

import pytest
import torch

from lite_llm import CheckpointError
from lite_llm.checkpoint import TrainingState, load_checkpoint, load_training_state, save_checkpoint

from .conftest import tiny_model


def test_raw_training_state_round_trips_bitwise(tmp_path, model):
    tensors = {
        "adam.exp_avg.embed": torch.randn(256, 64, generator=torch.Generator().manual_seed(0)),
        "adam.step": torch.tensor(17.0),
        "rng.torch": torch.get_rng_state(),
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "ints": torch.arange(7, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }
    meta = {"step": 17, "lr": 3e-4, "schedule": {"name": "cosine", "warmup": 10}, "note": "é", "tiny": 1e-300, "best": float("inf")}
    path = save_checkpoint(tmp_path / "ckpt", model, training=TrainingState(tensors, meta))
    assert (path / "training" / "state.safetensors").is_file() and (path / "training" / "state.json").is_file()
    assert load_checkpoint(path).training is None  # only on request
    loaded = load_checkpoint(path, load_training=True).training
    assert loaded.meta == meta
    assert sorted(loaded.tensors) == sorted(tensors)
    for name, t in tensors.items():
        assert loaded.tensors[name].dtype == t.dtype and torch.equal(loaded.tensors[name], t), name
    assert load_training_state(path).meta == meta


def _adamw_like_state(model) -> dict:
    """The shape of ``torch.optim.AdamW(...).state_dict()`` after a step (int keys, tuples, tensors),
    built by hand: constructing a real torch optimizer imports torch._dynamo (seconds)."""
    gen = torch.Generator().manual_seed(2)
    params = list(model.parameters())
    state = {
        i: {"step": torch.tensor(3.0), "exp_avg": torch.randn(p.shape, generator=gen), "exp_avg_sq": torch.rand(p.shape, generator=gen)}
        for i, p in enumerate(params)
    }
    group = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False, "foreach": None,
             "maximize": False, "capturable": False, "differentiable": False, "fused": None, "params": list(range(len(params)))}
    return {"state": state, "param_groups": [group]}


def test_nested_optimizer_state_round_trips_bitwise(tmp_path):
    model = tiny_model(seed=5)
    opt_state = _adamw_like_state(model)
    rng = torch.get_rng_state()
    state = TrainingState.from_nested({"optimizer": opt_state, "rng": rng, "step": 3, "np": 1.5}, meta={"run": "test"})
    assert all(isinstance(t, torch.Tensor) for t in state.tensors.values())
    path = save_checkpoint(tmp_path / "ckpt", model, training=state)

    loaded = load_checkpoint(path, load_training=True)
    nested = loaded.training.to_nested()
    assert loaded.training.meta["run"] == "test" and nested["step"] == 3 and torch.equal(nested["rng"], rng)
    assert nested["optimizer"]["param_groups"] == opt_state["param_groups"]
    assert nested["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)  # tuples stay tuples
    assert sorted(nested["optimizer"]["state"]) == sorted(opt_state["state"])  # int keys stay ints
    for key, st in opt_state["state"].items():
        for field, value in st.items():
            assert torch.equal(nested["optimizer"]["state"][key][field], value)
    json.dumps(loaded.training.meta)  # plain JSON


def test_unstorable_training_values_are_refused(model):
    with pytest.raises(CheckpointError, match="cannot be stored without pickle"):
        TrainingState.from_nested({"fn": lambda: 0})


def test_training_state_is_hash_checked(tmp_path, model):
    path = save_checkpoint(tmp_path / "ckpt", model, training=TrainingState({"x": torch.ones(4)}, {"step": 3}))
    data = bytearray((path / "training" / "state.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "training" / "state.safetensors").write_bytes(bytes(data))
    load_checkpoint(path)  # weights alone are fine
    with pytest.raises(CheckpointError, match="training state .* is corrupt \\(sha256 mismatch\\)"):
        load_checkpoint(path, load_training=True)
