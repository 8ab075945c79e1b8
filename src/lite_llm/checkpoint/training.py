"""Training state (optimizer, scheduler, RNG) stored as safetensors + JSON, never pickle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CheckpointError

_STRUCTURE = "__structure__"


@dataclass
class TrainingState:
    """Everything needed to resume training besides the weights.

    ``tensors`` go to ``training/state.safetensors`` and ``meta`` (JSON-serialisable: step,
    scheduler counters, hyper-parameters...) to ``training/state.json``.

    For nested state such as ``optimizer.state_dict()`` use :meth:`from_nested` /
    :meth:`to_nested`, which flatten dicts (any str/int/float/bool/None keys), lists, tuples,
    tensors and JSON scalars into the two parts and rebuild them exactly::

        ts = TrainingState.from_nested({"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": 100})
        state = loaded.training.to_nested(); opt.load_state_dict(state["optimizer"])
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_nested(cls, state: Any, meta: dict[str, Any] | None = None) -> "TrainingState":
        tensors: dict[str, torch.Tensor] = {}
        structure = _flatten(state, "state", tensors)
        out_meta = dict(meta or {})
        out_meta[_STRUCTURE] = structure
        return cls(tensors=tensors, meta=out_meta)

    def to_nested(self) -> Any:
        if _STRUCTURE not in self.meta:
            raise CheckpointError("this training state was not made with TrainingState.from_nested; read .tensors and .meta directly")
        return _unflatten(self.meta[_STRUCTURE], self.tensors)


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path
        while key in tensors:
            key += "_"
        tensors[key] = obj
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)):
        return obj if type(obj) in (int, float) else (float(obj) if isinstance(obj, float) else int(obj))
    if type(obj).__module__ == "numpy" and getattr(obj, "ndim", None) == 0:
        return obj.item()  # numpy scalar
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (str, int, float, bool))):
                raise CheckpointError(f"training state key {k!r} at {path} is a {type(k).__name__}; keys must be strings, numbers, booleans or None")
            items.append([k, _flatten(v, f"{path}.{k}", tensors)])
        return {"__dict__": items}
    raise CheckpointError(
        f"training state value at {path} is a {type(obj).__name__}, which cannot be stored without pickle; convert it to tensors, numbers, strings, lists or dicts"
    )


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    return obj
