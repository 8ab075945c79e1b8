"""Distillation to a frozen teacher: keep what the model did on old domains while it learns.

``loss += weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged over the
positions of the rows drawn from ``domains`` (every row when ``domains`` is None).  The T^2
factor keeps the gradient's scale independent of the temperature (Hinton et al., 2015).  The
teacher is typically the checkpoint before growth; it runs under ``no_grad`` in eval mode.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..data.compat import same_encoding
from ..errors import ConfigError
from .callbacks import TrainerCallback

if TYPE_CHECKING:
    from ..model import LiteLLM, ModelOutput
    from .trainer import Trainer


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of T^2 * KL(teacher || student) at temperature T (0 when equal)."""
    t = float(temperature)
    log_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return kl.mean() * t * t


class Distillation(TrainerCallback):
    """Adds :func:`distillation_loss` against ``teacher`` on the rows of ``domains``."""

    name = "distillation"

    def __init__(
        self, teacher: "LiteLLM", *, weight: float = 1.0, temperature: float = 2.0, domains: list[str] | None = None, tokenizer: Any = None
    ) -> None:
        if not 0 < weight < math.inf or not 0 < temperature < math.inf:
            raise ConfigError(f"distillation weight and temperature must be positive finite numbers, got {weight} and {temperature}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.weight, self.temperature = float(weight), float(temperature)
        self.domains = set(domains) if domains else None
        self.tokenizer = tokenizer  # the teacher's, when known: compared with the run's

    def on_train_begin(self, trainer: "Trainer") -> None:
        self.teacher.to(trainer.device)  # the teacher runs beside the student
        student, teacher = trainer.model.config.vocab_size, self.teacher.config.vocab_size
        if student != teacher:
            raise ConfigError(
                f"the distillation teacher has a vocabulary of {teacher} tokens but the model has {student}; distil from a checkpoint with the same tokenizer"
            )
        if self.tokenizer is not None and trainer.tokenizer is not None and not same_encoding(self.tokenizer, trainer.tokenizer):
            # equal sizes, other words: the teacher's distribution would be over other tokens
            raise ConfigError(
                f"the distillation teacher's tokenizer ({self.tokenizer.kind}, {self.tokenizer.vocab_size} tokens) is not the one the run's data "
                "was made with, so its predictions are of other tokens; distil from a checkpoint with the same tokenizer"
            )
        context = self.teacher.config.max_seq_len
        if trainer.config.seq_len > context:
            raise ConfigError(
                f"the distillation teacher's context is {context} tokens but train.seq_len is {trainer.config.seq_len}; "
                f"train with --seq-len {context} or less, or distil from a teacher with a longer context"
            )

    def extra_loss(self, trainer: "Trainer", step: int, batch: torch.Tensor, output: "ModelOutput") -> torch.Tensor | None:
        rows = list(range(batch.shape[0]))
        if self.domains is not None:
            rows = [i for i, d in enumerate(trainer.batch_domains) if d in self.domains]
            if not rows:
                return None
        index = torch.tensor(rows, device=batch.device)
        with torch.no_grad():
            teacher_logits = self.teacher(batch[index], tierset=None).logits
        return self.weight * distillation_loss(output.logits[index], teacher_logits, self.temperature)

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "temperature": self.temperature, "domains": sorted(self.domains) if self.domains else None}
