"""hf_kd: distil, self-distil and early-exit Hugging Face models, and ship them calibrated."""

__version__ = "0.1.0.dev0"

from . import data, losses, metrics
from .losses import kd_loss
from .metrics import make_compute_metrics
from .trainer import DistillConfig, DistillTrainer

__all__ = ["DistillConfig", "DistillTrainer", "data", "kd_loss", "losses", "make_compute_metrics", "metrics"]
