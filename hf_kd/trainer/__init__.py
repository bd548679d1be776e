"""Trainer/config pairs, one file each (TRL's layout)."""

from .distill_config import DistillConfig
from .distill_trainer import DistillTrainer
from .early_exit_config import EarlyExitConfig
from .early_exit_trainer import EarlyExitTrainer
from .letkd_config import LetKDConfig
from .letkd_trainer import LetKDTrainer
from .self_kd_config import SelfKDConfig
from .self_kd_trainer import SelfKDTrainer
from .tinybert_config import TinyBERTConfig
from .tinybert_trainer import TinyBERTTrainer

__all__ = [
    "DistillConfig",
    "DistillTrainer",
    "EarlyExitConfig",
    "EarlyExitTrainer",
    "LetKDConfig",
    "LetKDTrainer",
    "SelfKDConfig",
    "SelfKDTrainer",
    "TinyBERTConfig",
    "TinyBERTTrainer",
]
