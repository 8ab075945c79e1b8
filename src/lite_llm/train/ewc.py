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

The estimate is stored in a checkpoint's ``ewc/`` directory (:mod:`lite_llm.checkpoint.ewc`);
growth carries it through the same map as the weights (:mod:`lite_llm.grow.carry`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint.ewc import EWC_FORMAT, FisherEstimate, ImportanceFormat, load_ewc, save_ewc
from ..errors import ConfigError
from .callbacks import TrainerCallback

if TYPE_CHECKING:
    from ..data import TokenData
    from ..model import LiteLLM, ModelOutput
    from .trainer import Trainer

ESTIMATORS = ("sample", "batch")
__all__ = ["ESTIMATORS", "EWC", "FisherEstimate", "check_fits", "check_values", "estimate_fisher", "ewc_penalty", "load_ewc", "save_ewc"]
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
    if seq_len < 2:  # one token predicts nothing: the loss and every gradient would be 0
        raise ConfigError(f"Fisher sequences need at least 2 tokens (a token and the one it predicts), got seq_len {seq_len}")
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


def check_fits(model: "LiteLLM", estimate: FisherEstimate, fmt: ImportanceFormat) -> None:
    """One sentence when ``estimate`` (of kind ``fmt``) names a parameter ``model`` lacks, has
    another shape, or lacks one of the model's: an estimate of the model before growth, reused
    instead of carried."""
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
    # An estimate covers every parameter of the model it was made on (and growth carries it to
    # every new one).  One that lacks some was made before a growth that added them: after a
    # depth growth the old names remain with their shapes but hold other blocks (LLaMA-Pro's
    # layers.1 is a new identity block, the old layers.1 is now layers.2), so applying it
    # would anchor the wrong weights.
    missing = [name for name in params if name not in estimate.fisher]
    if missing:
        raise ConfigError(
            f"the {fmt.what} has no entry for {len(missing)} of the model's parameters ({', '.join(missing[:2])}), so it was made "
            f"before a growth that added them and its names now hold other weights; use the grown checkpoint's estimate "
            f"(lite-llm expand carries {fmt.directory}/) or make a new one on this model"
        )
    check_values(estimate, fmt)


def check_values(estimate: FisherEstimate, fmt: ImportanceFormat) -> None:
    """One sentence when an importance is negative or not finite, or an anchor not finite (a
    file written by another tool, an estimate of a diverged model): a negative weight would
    reward moving away from the anchor and a non-finite one makes every step's loss non-finite,
    so each step would be skipped and the run would end having learnt nothing."""
    for name, f in estimate.fisher.items():
        if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise ConfigError(
                f"the {fmt.what} of {name} has negative or non-finite entries; an importance must be finite and >= 0, so make the estimate again"
            )
        if not bool(torch.isfinite(estimate.anchor[name]).all()):
            raise ConfigError(f"the {fmt.what}'s anchor of {name} has non-finite entries (it was taken from a diverged model); make the estimate again")


class EWC(TrainerCallback):
    """Adds ``weight * ewc_penalty`` to the loss of every micro-batch."""

    name = "ewc"

    def __init__(self, estimate: FisherEstimate, *, weight: float) -> None:
        if not weight > 0:
            raise ConfigError(f"the EWC weight (lambda) must be positive, got {weight}")
        self.estimate, self.weight = estimate, float(weight)

    def on_train_begin(self, trainer: "Trainer") -> None:
        self.estimate = self.estimate.to(trainer.device)  # Fisher and anchor beside the weights
        check_fits(trainer.model, self.estimate, EWC_FORMAT)

    def extra_loss(self, trainer: "Trainer", step: int, batch: torch.Tensor, output: "ModelOutput") -> torch.Tensor | None:
        return self.weight * ewc_penalty(trainer.model, self.estimate)

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "estimate": self.estimate.meta}
