"""Training: the loop, its configuration, schedule, compute accounting and metrics."""

from .config import TrainConfig
from ..config import flops_per_token
from .distill import Distillation, distillation_loss
from .ewc import EWC, FisherEstimate, estimate_fisher, ewc_penalty, load_ewc, save_ewc
from .freezing import FreezeSchedule, PartialFreeze, freeze_parameters
from .metrics import MetricsLogger, read_metrics
from .schedule import lr_at
from .protection import protection_callbacks
from .synaptic import SynapticIntelligence, load_si
from .callbacks import TrainerCallback
from .trainer import Trainer, TrainResult, replay_rows

__all__ = [
    "Distillation",
    "EWC",
    "FisherEstimate",
    "FreezeSchedule",
    "MetricsLogger",
    "PartialFreeze",
    "SynapticIntelligence",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainerCallback",
    "distillation_loss",
    "estimate_fisher",
    "ewc_penalty",
    "flops_per_token",
    "freeze_parameters",
    "load_ewc",
    "load_si",
    "lr_at",
    "protection_callbacks",
    "read_metrics",
    "replay_rows",
    "save_ewc",
]
