"""Trainer/config pairs, one file each (TRL's layout)."""

from .distill_config import DistillConfig
from .distill_trainer import DistillTrainer
from .early_exit_config import EarlyExitConfig
from .early_exit_trainer import EarlyExitTrainer
from .self_kd_config import SelfKDConfig
from .self_kd_trainer import SelfKDTrainer

__all__ = ["DistillConfig", "DistillTrainer", "EarlyExitConfig", "EarlyExitTrainer", "SelfKDConfig", "SelfKDTrainer"]
