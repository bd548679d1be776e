"""Trainer/config pairs, one file each (TRL's layout)."""

from .distill_config import DistillConfig
from .distill_trainer import DistillTrainer

__all__ = ["DistillConfig", "DistillTrainer"]
