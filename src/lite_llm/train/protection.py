"""Build the forgetting-prevention callbacks a :class:`TrainConfig` asks for.

Replay needs no callback (the trainer draws the rows); EWC, Synaptic Intelligence,
distillation and the freezing schedule are callbacks built here from the config, so the CLI,
scripts and a resumed run all get the same ones from the same config file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import TrainConfig
from .distill import Distillation
from .ewc import EWC, load_ewc
from .freezing import FreezeSchedule
from .synaptic import SynapticIntelligence, load_si
from .callbacks import TrainerCallback

if TYPE_CHECKING:
    import torch

    from ..model import LiteLLM


def protection_callbacks(config: TrainConfig, model: "LiteLLM", *, device: "torch.device | str" = "cpu") -> list[TrainerCallback]:
    """The freezing schedule, EWC, SI and distillation callbacks ``config`` configures (in that
    order), loading the EWC estimate, earlier tasks' SI importance and the teacher from their
    checkpoints onto ``device`` (the trainer's: a teacher or a Fisher on another device would
    be copied every step)."""
    callbacks: list[TrainerCallback] = []
    if config.freeze:
        callbacks.append(FreezeSchedule(model, config.freeze))
    if config.ewc_from is not None:
        callbacks.append(EWC(load_ewc(config.ewc_from).to(device), weight=config.ewc_weight))
    if config.si_strength > 0:
        previous = load_si(config.si_from).to(device) if config.si_from is not None else None
        callbacks.append(SynapticIntelligence(strength=config.si_strength, damping=config.si_damping, previous=previous))
    if config.distill_from is not None:
        from ..checkpoint import load_checkpoint

        teacher = load_checkpoint(config.distill_from, device=device).model
        callbacks.append(
            Distillation(teacher, weight=config.distill_weight, temperature=config.distill_temperature, domains=config.distill_domains or None)
        )
    return callbacks
