"""Validation loss and bits per byte, per domain.

Bits per byte (bpb) makes models with different tokenizers comparable:
``bpb = (mean loss in nats per token) / ln 2 / (bytes per token of the tokens scored)``.
A byte-level model that has learned nothing scores 8 (log2 of 256)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from ..config import TierSet

if TYPE_CHECKING:  # the data layer is only needed for its type here
    from ..data import TokenData
    from ..model import LiteLLM


@dataclass
class DomainScore:
    loss: float  # mean next-token cross-entropy, nats per token
    bpb: float  # bits per byte
    tokens: int  # tokens scored

    def to_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "bpb": self.bpb, "tokens": self.tokens}


@torch.no_grad()
def evaluate(
    model: "LiteLLM",
    data: "TokenData",
    domains: Iterable[str] | None = None,
    *,
    batch_size: int = 16,
    seq_len: int = 128,
    max_batches: int | None = 8,
    tierset: TierSet | str | None = None,
) -> dict[str, DomainScore]:
    """Score ``model`` on the validation split of each domain (the same windows every call),
    on the device the model is on (load or move it there: ``load_checkpoint(..., device=)``)."""
    device = next(model.parameters()).device

    def lm_loss(batch: torch.Tensor) -> float:
        batch = batch.to(device)  # the same tensor on the CPU
        return float(model(batch, labels=batch, tierset=tierset).lm_loss)

    was_training = model.training
    model.eval()
    try:
        return score_domains(lm_loss, data, domains, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches)
    finally:
        model.train(was_training)


def score_domains(
    lm_loss: Callable[[torch.Tensor], float],
    data: "TokenData",
    domains: Iterable[str] | None = None,
    *,
    batch_size: int = 16,
    seq_len: int = 128,
    max_batches: int | None = 8,
) -> dict[str, DomainScore]:
    """Loss and bits per byte of each domain's validation windows, given the mean LM loss of
    one batch (``lm_loss``): a model's forward, or a pipeline's forward through its stages."""
    scores: dict[str, DomainScore] = {}
    for domain in domains or data.domains:
        total, count, scored_bytes = 0.0, 0, 0
        for batch in data.val_batches(domain, batch_size, seq_len, max_batches):
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += lm_loss(batch) * n
            count += n
            scored_bytes += data.bytes_of(batch[:, 1:])  # the predicted tokens' text
        loss = total / max(count, 1)
        per_token = scored_bytes / count if scored_bytes else data.bytes_per_token(domain, "val")
        scores[domain] = DomainScore(loss, loss / math.log(2) / per_token, count)
    return scores
