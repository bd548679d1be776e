"""hf_kd: distil, self-distil and early-exit Hugging Face models, and ship them calibrated."""

from . import data, early_exit, losses, metrics, prediction_sets, self_kd
from .calibration import CalibrationResult, calibrate_temperature, fit_temperature, fold_temperature
from .evaluation import UncertaintyReport, evaluate_uncertainty
from .hub import generate_model_card, push_to_hub, update_model_card
from .lm_data import LMDataCollator, lm_chat_dataset, lm_text_dataset, tokenize_lm_dataset
from .losses import LMLossParts, kd_loss, lm_kd_loss, sparse_lm_kd_loss
from .metrics import (
    lm_metrics,
    make_compute_metrics,
    make_exit_compute_metrics,
    make_lm_compute_metrics,
    preprocess_lm_logits_for_metrics,
)
from .modeling import (
    EarlyExitPrediction,
    ExitPolicy,
    KDLayer,
    KDLayerConfig,
    KDLayerForImageClassification,
    KDLayerForSequenceClassification,
    KDLayerImageConfig,
    MultiExitConfig,
    MultiExitForImageClassification,
    MultiExitForSequenceClassification,
    MultiExitImageConfig,
    MultiExitLaplace,
)
from .student import drop_layers, make_student
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
    "LMDataCollator",
    "LMLossParts",
    "LetKDConfig",
    "LetKDTrainer",
    "MultiExitConfig",
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
    "drop_layers",
    "early_exit",
    "evaluate_uncertainty",
    "fit_temperature",
    "fold_temperature",
    "generate_model_card",
    "kd_loss",
    "lm_chat_dataset",
    "lm_kd_loss",
    "lm_metrics",
    "lm_text_dataset",
    "losses",
    "make_compute_metrics",
    "make_exit_compute_metrics",
    "make_lm_compute_metrics",
    "make_student",
    "metrics",
    "prediction_sets",
    "preprocess_lm_logits_for_metrics",
    "push_to_hub",
    "self_kd",
    "sparse_lm_kd_loss",
    "tokenize_lm_dataset",
    "update_model_card",
]
