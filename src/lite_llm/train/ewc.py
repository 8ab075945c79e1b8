"""Elastic weight consolidation (Kirkpatrick et al., 2017): remember a domain by its Fisher.

The penalty ``lambda * sum_i F_i (theta_i - theta*_i)^2`` keeps each parameter near its anchor
``theta*`` in proportion to how much the old domain's likelihood depends on it, measured by the
diagonal of the Fisher information ``F``.  Two estimators, both *empirical* (the gradient of
the log-likelihood of the observed next tokens, not of tokens sampled from the model):

* ``"sample"`` (default): ``F = mean_n g_n^2`` where ``g_n`` is the gradient of sequence ``n``'s
  mean next-token loss.  One backward per sequence: exact for what it claims, slower.
* ``"batch"``: ``F = B * mean_b gbar_b^2`` over micro-batches of ``B`` sequences, ``gbar_b`` the
  gradient of the micro-batch's mean loss.  ``E[B gbar^2] = var(g) + B E[g]^2``, so it matches
  ``"sample"`` when the mean gradient is small (a trained model) and over-weights parameters
  with a consistent gradient otherwise; ``B`` times fewer backwards.

The estimate is stored in a checkpoint's ``ewc/`` directory: tensors ``fisher/<name>`` and
``anchor/<name>`` for every parameter, and what produced them (domain, estimator, samples,
sequence length, seed) under ``"ewc"`` in ``progressive.json``.  Growth carries both through
the same map as the weights (:mod:`lite_llm.grow.carry`).

The layout is not EWC's alone: any importance that penalises ``sum_i w_i (theta_i -
theta*_i)^2`` (Synaptic Intelligence's path-integral importance, :mod:`.synaptic`) is the same
pair of tensors per parameter, so it is stored, read and carried through growth by the same
code, in its own directory (an :class:`ImportanceFormat`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError, ConfigError
from .trainer import TrainerCallback

if TYPE_CHECKING:
    from ..data import TokenData
    from ..model import LiteLLM, ModelOutput
    from .trainer import Trainer

ESTIMATORS = ("sample", "batch")


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
    "si", "importance", "SI importance", "train with train.si_strength > 0: every checkpoint of such a run holds its consolidated importance"
)
IMPORTANCE_FORMATS = (EWC_FORMAT, SI_FORMAT)  # what growth carries and a run does not inherit
EWC_DIR = EWC_FORMAT.directory


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

    def to_tensors(self, fmt: ImportanceFormat = EWC_FORMAT) -> dict[str, torch.Tensor]:
        """The flat safetensors form stored in ``fmt.directory`` (``ewc/``)."""
        out = {f"{fmt.key}/{k}": v.float().contiguous() for k, v in self.fisher.items()}
        out.update({f"anchor/{k}": v.float().contiguous() for k, v in self.anchor.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any] | None = None, fmt: ImportanceFormat = EWC_FORMAT) -> "FisherEstimate":
        prefix = f"{fmt.key}/"
        fisher = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        anchor = {k[len("anchor/"):]: v for k, v in tensors.items() if k.startswith("anchor/")}
        return cls(fisher, anchor, dict(meta or {}))


def estimate_fisher(
    model: "LiteLLM",
    data: "TokenData",
    domain: str,
    *,
    samples: int = 256,
    seq_len: int = 128,
    estimator: str = "sample",
    batch_size: int = 16,
    seed: int = 0,
    split: str = "train",
) -> FisherEstimate:
    """The diagonal empirical Fisher of ``model`` on ``samples`` sequences of ``domain``
    (see the module docstring for the two estimators), anchored at the current weights.

    The sequences are the ones ``data.sample_batch`` draws for ``seed`` (step 0), so an estimate
    is reproducible.  The model runs in eval mode (no routing noise); only the language-model
    loss counts (the load-balancing terms are not the domain's likelihood).
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown Fisher estimator {estimator!r}; choose {' or '.join(ESTIMATORS)}")
    if samples < 1 or batch_size < 1:
        raise ConfigError(f"Fisher samples and batch size must be positive, got {samples} and {batch_size}")
    if domain not in data.domains:
        raise ConfigError(f"unknown domain {domain!r} for the Fisher; the data has {', '.join(data.domains)}")
    sequences, _ = data.sample_batch(split, {domain: 1.0}, samples, seq_len, seed=seed, step=0)
    params = dict(model.named_parameters())
    trainable = {n: p.requires_grad for n, p in params.items()}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    chunk = 1 if estimator == "sample" else batch_size
    was_training = model.training
    model.eval()
    try:
        for p in params.values():
            p.requires_grad_(True)
        names, tensors = list(params), list(params.values())
        for start in range(0, samples, chunk):
            batch = sequences[start : start + chunk]
            loss = model(batch, labels=batch).lm_loss
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            # mean over micro-batches of B * gbar^2 = sum of B^2 gbar^2 / samples (B = 1: per sample)
            weight = batch.shape[0] ** 2 / samples
            for name, g in zip(names, grads):
                if g is not None:
                    fisher[name].add_(g.float().square(), alpha=weight)
    finally:
        for n, p in params.items():
            p.requires_grad_(trainable[n])
        model.train(was_training)
    anchor = {n: p.detach().float().clone() for n, p in params.items()}
    meta = {"domain": domain, "estimator": estimator, "samples": samples, "seq_len": seq_len, "seed": seed, "split": split}
    if estimator == "batch":
        meta["batch_size"] = batch_size
    return FisherEstimate(fisher, anchor, meta)


def ewc_penalty(model: "LiteLLM", estimate: FisherEstimate) -> torch.Tensor:
    """``sum_i F_i (theta_i - theta*_i)^2`` over the parameters the estimate covers (without
    lambda).  Parameters that do not require grad are skipped: they cannot move."""
    params = dict(model.named_parameters())
    total = torch.zeros((), dtype=torch.float32)
    for name, f in estimate.fisher.items():
        p = params.get(name)
        if p is None or not p.requires_grad:
            continue
        total = total + (f * (p.float() - estimate.anchor[name]).square()).sum()
    return total


class EWC(TrainerCallback):
    """Adds ``weight * ewc_penalty`` to the loss of every micro-batch."""

    name = "ewc"

    def __init__(self, estimate: FisherEstimate, *, weight: float) -> None:
        if not weight > 0:
            raise ConfigError(f"the EWC weight (lambda) must be positive, got {weight}")
        self.estimate, self.weight = estimate, float(weight)

    def on_train_begin(self, trainer: "Trainer") -> None:
        check_fits(trainer.model, self.estimate, EWC_FORMAT)

    def extra_loss(self, trainer: "Trainer", step: int, batch: torch.Tensor, output: "ModelOutput") -> torch.Tensor | None:
        return self.weight * ewc_penalty(trainer.model, self.estimate)

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "estimate": self.estimate.meta}


def check_fits(model: "LiteLLM", estimate: FisherEstimate, fmt: ImportanceFormat) -> None:
    """One sentence when ``estimate`` names a parameter ``model`` lacks or has another shape
    (an estimate of the model before growth, reused instead of carried)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(estimate.fisher) - set(params))
    if unknown:
        raise ConfigError(
            f"the {fmt.what} names parameter(s) the model lacks ({', '.join(unknown[:3])}); make it on this model or grow it with the model"
        )
    for name, f in estimate.fisher.items():
        if f.shape != params[name].shape:
            raise ConfigError(
                f"the {fmt.what} of {name} has shape {tuple(f.shape)} but the model's parameter has {tuple(params[name].shape)}; "
                f"grow the checkpoint that holds the estimate (lite-llm expand carries {fmt.directory}/) instead of reusing an old one"
            )


def save_ewc(source: str | Path, estimate: FisherEstimate, output: str | Path, fmt: ImportanceFormat = EWC_FORMAT) -> Path:
    """A copy of the checkpoint ``source`` with ``estimate`` in its ``fmt.directory`` (``ewc/``),
    written atomically to ``output`` (the source is left as it is; its other extra
    directories, such as another kind of importance, are copied along)."""
    from ..checkpoint.save import write_checkpoint
    from ..checkpoint.lazy import open_checkpoint
    from ..checkpoint.load import load_extra
    from ..grow.expand import check_new_output, copied_tokenizer
    from ..model.shapes import parameter_names, tensor_shapes

    src = open_checkpoint(source)
    check_new_output(Path(output), src.path, f"the checkpoint with its {fmt.what}")
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
    return write_checkpoint(
        output,
        src.config,
        src.tensors,
        tokenizer=copied_tokenizer(src),
        progressive=progressive,
        extra_dirs=extra_dirs,
        model_version=src.manifest.get("model_version", "1.0.0"),
    )


def has_ewc(manifest: Mapping[str, Any], fmt: ImportanceFormat = EWC_FORMAT) -> bool:
    """Whether a checkpoint's manifest lists the directory of ``fmt`` (``ewc/``)."""
    return any(f.get("kind") == "extra" and f.get("name") == fmt.directory for f in manifest.get("files", []))


def load_ewc(checkpoint: str | Path, fmt: ImportanceFormat = EWC_FORMAT) -> FisherEstimate:
    """The importance of kind ``fmt`` (the EWC estimate) stored in ``checkpoint`` (hashes verified)."""
    from ..checkpoint.lazy import open_checkpoint
    from ..checkpoint.load import load_extra

    src = open_checkpoint(checkpoint, verify=False)  # the manifest and progressive.json only
    if not has_ewc(src.manifest, fmt):
        raise CheckpointError(f"checkpoint {checkpoint} holds no {fmt.what}; {fmt.make.format(checkpoint=checkpoint)}")
    return FisherEstimate.from_tensors(load_extra(src.path, fmt.directory, manifest=src.manifest), src.progressive.get(fmt.directory), fmt)

