"""The hooks a training loop offers: protections (EWC, SI, replay, distillation, freezing), the
curriculum and user code subclass :class:`TrainerCallback`, so none of them needs the trainer
module and the trainer needs none of them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..model import ModelOutput
    from .trainer import Trainer


class TrainerCallback:
    """Hooks into the loop.  Override what you need; every hook is optional."""

    name = "callback"

    def on_train_begin(self, trainer: "Trainer") -> None: ...

    def on_step_begin(self, trainer: "Trainer", step: int) -> None: ...

    def lr_scale(self, trainer: "Trainer", step: int) -> float:
        """A factor on the scheduled learning rate of ``step`` (a curriculum phase's)."""
        return 1.0

    def extra_loss(self, trainer: "Trainer", step: int, batch: torch.Tensor, output: "ModelOutput") -> torch.Tensor | None:
        return None

    def on_before_step(self, trainer: "Trainer", step: int) -> None:
        """After the step's backward passes, before gradient clipping and the optimizer step
        (skipped steps never get here): each parameter's ``.grad`` holds the gradient of the
        step's whole loss, which a callback may read or change."""

    def on_step_end(self, trainer: "Trainer", step: int, record: dict[str, Any]) -> None: ...

    def on_eval(self, trainer: "Trainer", step: int, scores: dict[str, Any]) -> None: ...

    def checkpoint_dirs(self, trainer: "Trainer", progressive: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
        """Extra tensor directories to store in every checkpoint the trainer saves (the
        callback may describe them in ``progressive``, that checkpoint's ``progressive.json``)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensor state that resuming needs (stored bitwise with the optimizer's, not as JSON)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...
