"""hf_kd: distil, self-distil and early-exit Hugging Face models, and ship them calibrated."""

from . import data, early_exit, losses, metrics, prediction_sets, self_kd
from .calibration import CalibrationResult, calibrate_temperature, fit_temperature, fold_temperature
from .evaluation import UncertaintyReport, evaluate_uncertainty
from .hub import generate_model_card, push_to_hub, update_model_card
from .losses import kd_loss
from .metrics import make_compute_metrics, make_exit_compute_metrics
from .modeling import (
    EarlyExitPrediction,
    ExitPolicy,
    KDLayer,
    KDLayerConfig,
    KDLayerForImageClassification,
    KDLayerForSequenceClassification,
    KDLayerImageConfig,
    MultiExitCausalLMConfig,
    MultiExitConfig,
    MultiExitForCausalLM,
    MultiExitForImageClassification,
    MultiExitForSequenceClassification,
    MultiExitImageConfig,
    MultiExitLaplace,
)
from .trainer import (
    DistillConfig,
    DistillTrainer,
    EarlyExitConfig,
    EarlyExitTrainer,
    LetKDConfig,
    LetKDTrainer,
    SelfKDConfig,
    SelfKDTrainer,
    TinyBERTConfig,
    TinyBERTTrainer,
)
from .version import __version__ as __version__

__all__ = [
    "CalibrationResult",
    "DistillConfig",
    "DistillTrainer",
    "EarlyExitConfig",
    "EarlyExitPrediction",
    "EarlyExitTrainer",
    "ExitPolicy",
    "KDLayer",
    "KDLayerConfig",
    "KDLayerForImageClassification",
    "KDLayerForSequenceClassification",
    "KDLayerImageConfig",
    "LetKDConfig",
    "LetKDTrainer",
    "MultiExitCausalLMConfig",
    "MultiExitConfig",
    "MultiExitForCausalLM",
    "MultiExitForImageClassification",
    "MultiExitForSequenceClassification",
    "MultiExitImageConfig",
    "MultiExitLaplace",
    "SelfKDConfig",
    "SelfKDTrainer",
    "TinyBERTConfig",
    "TinyBERTTrainer",
    "UncertaintyReport",
    "calibrate_temperature",
    "data",
    "early_exit",
    "evaluate_uncertainty",
    "fit_temperature",
    "fold_temperature",
    "generate_model_card",
    "kd_loss",
    "losses",
    "make_compute_metrics",
    "make_exit_compute_metrics",
    "metrics",
    "prediction_sets",
    "push_to_hub",
    "self_kd",
    "update_model_card",
]
