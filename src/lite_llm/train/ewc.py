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
        """This estimate with its tensors on ``device`` (itself when they are there already)."""
        device = torch.device(device)
        if all(t.device == device for t in (*self.fisher.values(), *self.anchor.values())):
            return self
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return FisherEstimate(move(self.fisher), move(self.anchor), dict(self.meta))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The flat safetensors form stored in ``ewc/``."""
        out = {f"fisher/{k}": v.float().contiguous() for k, v in self.fisher.items()}
        out.update({f"anchor/{k}": v.float().contiguous() for k, v in self.anchor.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any] | None = None) -> "FisherEstimate":
        fisher = {k[len("fisher/"):]: v for k, v in tensors.items() if k.startswith("fisher/")}
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
    sequences = sequences.to(next(iter(params.values())).device)  # where the model is (the same tensor on the CPU)
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
    total = torch.zeros((), dtype=torch.float32, device=next(iter(params.values())).device)
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
        params = dict(trainer.model.named_parameters())
        self.estimate = self.estimate.to(trainer.device)  # Fisher and anchor beside the weights
        unknown = sorted(set(self.estimate.fisher) - set(params))
        if unknown:
            raise ConfigError(
                f"the EWC estimate names parameter(s) the model lacks ({', '.join(unknown[:3])}); estimate it on this model or grow it with the model"
            )
        for name, f in self.estimate.fisher.items():
            if f.shape != params[name].shape:
                raise ConfigError(
                    f"the EWC Fisher of {name} has shape {tuple(f.shape)} but the model's parameter has {tuple(params[name].shape)}; "
                    "grow the checkpoint that holds the estimate (lite-llm expand carries ewc/) instead of reusing an old one"
                )

    def extra_loss(self, trainer: "Trainer", step: int, batch: torch.Tensor, output: "ModelOutput") -> torch.Tensor | None:
        return self.weight * ewc_penalty(trainer.model, self.estimate)

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "estimate": self.estimate.meta}


def save_ewc(source: str | Path, estimate: FisherEstimate, output: str | Path) -> Path:
    """A copy of the checkpoint ``source`` with ``estimate`` in its ``ewc/`` directory, written
    atomically to ``output`` (the source is left as it is)."""
    from ..checkpoint.save import write_checkpoint
    from ..checkpoint.lazy import open_checkpoint
    from ..grow.expand import check_new_output, copied_tokenizer
    from ..model.shapes import parameter_names, tensor_shapes

    src = open_checkpoint(source)
    check_new_output(Path(output), src.path, "the checkpoint with its EWC estimate")
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
    return write_checkpoint(
        output,
        src.config,
        src.tensors,
        tokenizer=copied_tokenizer(src),
        progressive=progressive,
        extra_dirs={EWC_DIR: estimate.to_tensors()},
        model_version=src.manifest.get("model_version", "1.0.0"),
    )


def has_ewc(manifest: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's manifest lists an ``ewc/`` directory."""
    return any(f.get("kind") == "extra" and f.get("name") == EWC_DIR for f in manifest.get("files", []))


def load_ewc(checkpoint: str | Path) -> FisherEstimate:
    """The EWC estimate stored in ``checkpoint`` (hashes verified)."""
    from ..checkpoint.lazy import open_checkpoint
    from ..checkpoint.load import load_extra

    src = open_checkpoint(checkpoint, verify=False)  # the manifest and progressive.json only
    if not has_ewc(src.manifest):
        raise CheckpointError(
            f"checkpoint {checkpoint} holds no EWC estimate; make one with `lite-llm ewc estimate {checkpoint} --data DIR --domain NAME -o OUT`"
        )
    return FisherEstimate.from_tensors(load_extra(src.path, EWC_DIR, manifest=src.manifest), src.progressive.get("ewc"))

