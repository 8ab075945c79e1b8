"""The EWC folder of a checkpoint: a diagonal Fisher and the weights it was measured at.

Stored as ``ewc/`` beside the weights: tensors ``fisher/<name>`` and ``anchor/<name>`` for every
parameter, and what produced them (domain, estimator, samples, sequence length, seed) under
``"ewc"`` in ``progressive.json``.  Training reads it (:mod:`lite_llm.train.ewc`), growth
carries it (:mod:`lite_llm.grow.carry`); neither needs the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError

EWC_DIR = "ewc"


@dataclass
class FisherEstimate:
    """A diagonal Fisher and the weights it was measured at, by parameter name."""

    fisher: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.fisher) != set(self.anchor):
            raise ConfigError("an EWC estimate needs an anchor for every Fisher tensor and no other; they name different parameters")
        for name, f in self.fisher.items():
            if f.shape != self.anchor[name].shape:
                raise ConfigError(f"EWC Fisher and anchor of {name} have different shapes {tuple(f.shape)} and {tuple(self.anchor[name].shape)}")

    def to(self, device: torch.device | str) -> "FisherEstimate":
        """This estimate with its tensors on ``device`` (itself when they are there already):
        training adds the penalty beside the weights, on their device."""
        device = torch.device(device)
        if all(t.device == device for t in (*self.fisher.values(), *self.anchor.values())):
            return self
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return FisherEstimate(move(self.fisher), move(self.anchor), dict(self.meta))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The flat safetensors form stored in ``ewc/`` (on CPU, so checkpoints stay device-independent)."""
        out = {f"fisher/{k}": v.detach().float().cpu().contiguous() for k, v in self.fisher.items()}
        out.update({f"anchor/{k}": v.detach().float().cpu().contiguous() for k, v in self.anchor.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any] | None = None) -> "FisherEstimate":
        fisher = {k[len("fisher/"):]: v for k, v in tensors.items() if k.startswith("fisher/")}
        anchor = {k[len("anchor/"):]: v for k, v in tensors.items() if k.startswith("anchor/")}
        return cls(fisher, anchor, dict(meta or {}))


def has_ewc(manifest: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's manifest lists an ``ewc/`` directory."""
    return any(f.get("kind") == "extra" and f.get("name") == EWC_DIR for f in manifest.get("files", []))


def save_ewc(source: str | Path, estimate: FisherEstimate, output: str | Path) -> Path:
    """A copy of the checkpoint ``source`` with ``estimate`` in its ``ewc/`` directory, written
    atomically to ``output`` (the source is left as it is) by the derived-checkpoint pipeline."""
    from ..model.shapes import parameter_names, tensor_shapes
    from .derived import copied_tokenizer, derive
    from .lazy import check_sound, open_checkpoint
    from .save import write_checkpoint

    src = open_checkpoint(source, verify=False)
    shapes = tensor_shapes(src.config)
    params = parameter_names(src.config)
    for kind, tensors in (("Fisher", estimate.fisher), ("anchor", estimate.anchor)):
        missing = [n for n in params if n not in tensors]
        extra = sorted(set(tensors) - set(params))
        wrong = [n for n in params if n in tensors and tuple(tensors[n].shape) != tuple(shapes[n])]
        if missing or extra or wrong:
            what = (f"lacks {', '.join(missing[:3])}" if missing else f"has parameters the model lacks ({', '.join(extra[:3])})" if extra
                    else f"has {wrong[0]} of shape {tuple(tensors[wrong[0]].shape)} where the model's is {tuple(shapes[wrong[0]])}")
            raise ConfigError(f"the EWC {kind} {what} for the model of {source}; estimate it on that checkpoint's model")
    progressive = dict(src.progressive)
    progressive["ewc"] = dict(estimate.meta)

    def write(verified: Any) -> Path:
        return write_checkpoint(
            output,
            src.config,
            src.tensors,
            tokenizer=copied_tokenizer(src),
            progressive=progressive,
            extra_dirs={EWC_DIR: estimate.to_tensors()},
            before_commit=verified.result if verified is not None else None,
            model_version=src.manifest.get("model_version", "1.0.0"),
        )

    return derive(src.path, Path(output), write, check_source=lambda: check_sound(src.path), what="the checkpoint with its EWC estimate")


def load_ewc(checkpoint: str | Path) -> FisherEstimate:
    """The EWC estimate stored in ``checkpoint`` (hashes verified)."""
    from .lazy import open_checkpoint
    from .load import load_extra

    src = open_checkpoint(checkpoint, verify=False)  # the manifest and progressive.json only
    if not has_ewc(src.manifest):
        raise CheckpointError(
            f"checkpoint {checkpoint} holds no EWC estimate; make one with `lite-llm ewc estimate {checkpoint} --data DIR --domain NAME -o OUT`"
        )
    return FisherEstimate.from_tensors(load_extra(src.path, EWC_DIR, manifest=src.manifest), src.progressive.get("ewc"))
