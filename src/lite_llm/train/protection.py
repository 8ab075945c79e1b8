"""Build the forgetting-prevention callbacks a :class:`TrainConfig` asks for.

Replay needs no callback (the trainer draws the rows); EWC, Synaptic Intelligence,
distillation and the freezing schedule are callbacks built here from the config, so the CLI,
scripts and a resumed run all get the same ones from the same config file
(:meth:`Trainer.from_config`).  :func:`check_protections` is the trainer's guard that a config
asking for one is never trained without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import TrainConfig
from .distill import Distillation
from .ewc import EWC, load_ewc
from .freezing import FreezeSchedule
from .synaptic import SynapticIntelligence, load_si
from .callbacks import TrainerCallback
from ..errors import ConfigError

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

        loaded = load_checkpoint(config.distill_from, device=device)
        callbacks.append(
            Distillation(
                loaded.model, weight=config.distill_weight, temperature=config.distill_temperature, domains=config.distill_domains or None,
                tokenizer=loaded.tokenizer,
            )
        )
    return callbacks


def check_protections(config: TrainConfig, callbacks: list[TrainerCallback]) -> None:
    """Raise :class:`ConfigError` if ``config`` configures a protection no callback provides:
    a run told to keep EWC on must not silently train without it."""
    wanted = {
        "freeze": (bool(config.freeze), FreezeSchedule),
        "ewc_from": (config.ewc_from is not None, EWC),
        "si_strength": (config.si_strength > 0, SynapticIntelligence),
        "distill_from": (config.distill_from is not None, Distillation),
    }
    missing = [key for key, (asked, kind) in wanted.items() if asked and not any(isinstance(c, kind) for c in callbacks)]
    if missing:
        raise ConfigError(
            f"train.{missing[0]} is set but no {wanted[missing[0]][1].__name__} callback was given; "
            "build the trainer with Trainer.from_config(...) (or pass protection_callbacks(config, model))"
        )
