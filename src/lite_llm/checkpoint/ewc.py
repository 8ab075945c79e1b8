"""The EWC folder of a checkpoint: a diagonal Fisher and the weights it was measured at.

Stored as ``ewc/`` beside the weights: tensors ``fisher/<name>`` and ``anchor/<name>`` for every
parameter, and what produced them (domain, estimator, samples, sequence length, seed) under
``"ewc"`` in ``progressive.json``.  Training reads it (:mod:`lite_llm.train.ewc`), growth
carries it (:mod:`lite_llm.grow.carry`); neither needs the other.

The layout is not EWC's alone: any importance that penalises ``sum_i w_i (theta_i -
theta*_i)^2`` — Synaptic Intelligence's path-integral importance (:mod:`lite_llm.train.synaptic`)
— is the same pair of tensors per parameter, so it is stored, read and carried through growth by
the same code, in its own directory (``si/``, tensors ``importance/<name>`` and
``anchor/<name>``): one :class:`ImportanceFormat` per kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError

@dataclass(frozen=True)
class ImportanceFormat:
    """Where one kind of per-parameter importance lives in a checkpoint.

    ``directory`` is the extra tensor directory and the key of its description in
    ``progressive.json``; the tensors are ``<key>/<name>`` (the importance) and
    ``anchor/<name>`` (the weights it holds).  ``what`` names it in messages and ``make`` says
    how to get one (``{checkpoint}`` is filled in)."""

    directory: str
    key: str
    what: str
    make: str


EWC_FORMAT = ImportanceFormat("ewc", "fisher", "EWC estimate", "make one with `lite-llm ewc estimate {checkpoint} --data DIR --domain NAME -o OUT`")
SI_FORMAT = ImportanceFormat(
    "si", "importance", "SI importance", "train with train.si_strength > 0 (--si-strength): every checkpoint of such a run holds its consolidated importance"
)
IMPORTANCE_FORMATS = (EWC_FORMAT, SI_FORMAT)  # what growth carries and a run started from a checkpoint does not inherit


@dataclass
class FisherEstimate:
    """A diagonal Fisher and the weights it was measured at, by parameter name (or any other
    per-weight importance and the weights it holds: SI's is kept in the same container)."""

    fisher: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.fisher) != set(self.anchor):
            raise ConfigError("an importance estimate (EWC or SI) needs an anchor for every importance tensor and no other; they name different parameters")
        for name, f in self.fisher.items():
            if f.shape != self.anchor[name].shape:
                raise ConfigError(f"the importance and anchor of {name} have different shapes {tuple(f.shape)} and {tuple(self.anchor[name].shape)}")

    def to(self, device: torch.device | str) -> "FisherEstimate":
        """This estimate with its tensors on ``device`` (itself when they are there already):
        training adds the penalty beside the weights, on their device."""
        device = torch.device(device)
        if all(t.device == device for t in (*self.fisher.values(), *self.anchor.values())):
            return self
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return FisherEstimate(move(self.fisher), move(self.anchor), dict(self.meta))

    def to_tensors(self, fmt: ImportanceFormat = EWC_FORMAT) -> dict[str, torch.Tensor]:
        """The flat safetensors form stored in ``fmt.directory`` (``ewc/``; on CPU, so checkpoints stay device-independent)."""
        out = {f"{fmt.key}/{k}": v.detach().float().cpu().contiguous() for k, v in self.fisher.items()}
        out.update({f"anchor/{k}": v.detach().float().cpu().contiguous() for k, v in self.anchor.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any] | None = None, fmt: ImportanceFormat = EWC_FORMAT) -> "FisherEstimate":
        prefix = f"{fmt.key}/"
        fisher = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        anchor = {k[len("anchor/"):]: v for k, v in tensors.items() if k.startswith("anchor/")}
        return cls(fisher, anchor, dict(meta or {}))


def has_ewc(manifest: Mapping[str, Any], fmt: ImportanceFormat = EWC_FORMAT) -> bool:
    """Whether a checkpoint's manifest lists the directory of ``fmt`` (``ewc/``)."""
    return any(f.get("kind") == "extra" and f.get("name") == fmt.directory for f in manifest.get("files", []))


def save_ewc(source: str | Path, estimate: FisherEstimate, output: str | Path, fmt: ImportanceFormat = EWC_FORMAT, *, overwrite: bool = False) -> Path:
    """A copy of the checkpoint ``source`` with ``estimate`` in its ``fmt.directory`` (``ewc/``),
    written atomically to ``output`` (the source is left as it is) by the derived-checkpoint
    pipeline.  The source's other extra directories (another kind of importance) come along."""
    from ..model.shapes import parameter_names, tensor_shapes
    from .derived import copied_tokenizer, derive
    from .lazy import check_sound, open_checkpoint
    from .load import load_extra
    from .save import write_checkpoint

    src = open_checkpoint(source, verify=False)
    shapes = tensor_shapes(src.config)
    params = parameter_names(src.config)
    for kind, tensors in ((fmt.key, estimate.fisher), ("anchor", estimate.anchor)):
        missing = [n for n in params if n not in tensors]
        extra = sorted(set(tensors) - set(params))
        wrong = [n for n in params if n in tensors and tuple(tensors[n].shape) != tuple(shapes[n])]
        if missing or extra or wrong:
            what = (f"lacks {', '.join(missing[:3])}" if missing else f"has parameters the model lacks ({', '.join(extra[:3])})" if extra
                    else f"has {wrong[0]} of shape {tuple(tensors[wrong[0]].shape)} where the model's is {tuple(shapes[wrong[0]])}")
            raise ConfigError(f"the {fmt.what}'s {kind} {what} for the model of {source}; make it on that checkpoint's model")
    progressive = dict(src.progressive)
    progressive[fmt.directory] = dict(estimate.meta)
    extra_dirs = {
        f["name"]: load_extra(src.path, f["name"], manifest=src.manifest)
        for f in src.manifest.get("files", [])
        if f.get("kind") == "extra" and f.get("name") != fmt.directory
    }
    extra_dirs[fmt.directory] = estimate.to_tensors(fmt)

    def write(verified: Any) -> Path:
        return write_checkpoint(
            output,
            src.config,
            src.tensors,
            tokenizer=copied_tokenizer(src),
            progressive=progressive,
            extra_dirs=extra_dirs,
            before_commit=verified.result if verified is not None else None,
            model_version=src.manifest.get("model_version", "1.0.0"),
        )

    return derive(
        src.path, Path(output), write, check_source=lambda: check_sound(src.path), what=f"the checkpoint with its {fmt.what}", overwrite=overwrite
    )


def load_ewc(checkpoint: str | Path, fmt: ImportanceFormat = EWC_FORMAT) -> FisherEstimate:
    """The importance of kind ``fmt`` (the EWC estimate) stored in ``checkpoint`` (hashes verified)."""
    from .lazy import open_checkpoint
    from .load import load_extra

    src = open_checkpoint(checkpoint, verify=False)  # the manifest and progressive.json only
    if not has_ewc(src.manifest, fmt):
        raise CheckpointError(f"checkpoint {checkpoint} holds no {fmt.what}; {fmt.make.format(checkpoint=checkpoint)}")
    return FisherEstimate.from_tensors(load_extra(src.path, fmt.directory, manifest=src.manifest), src.progressive.get(fmt.directory), fmt)
