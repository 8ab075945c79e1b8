"""Training: the loop, its configuration, schedule, compute accounting and metrics."""

from .config import TrainConfig
from .flops import flops_per_token
from .freezing import PartialFreeze, freeze_parameters
from .metrics import MetricsLogger, read_metrics
from .schedule import lr_at
from .trainer import Trainer, TrainerCallback, TrainResult, run_training

__all__ = [
    "MetricsLogger",
    "PartialFreeze",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainerCallback",
    "flops_per_token",
    "freeze_parameters",
    "lr_at",
    "read_metrics",
    "run_training",
]
