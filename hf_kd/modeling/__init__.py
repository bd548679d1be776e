"""transformers-style models of hf_kd, registered with the Auto classes.

Importing this package registers `MultiExitConfig` (`model_type="hf_kd_multi_exit"`) with `AutoConfig` and
`MultiExitForSequenceClassification` with `AutoModelForSequenceClassification`, and marks both for `auto_map`, so a
saved or pushed multi-exit model records its classes in config.json.
"""

from transformers import AutoConfig, AutoModelForSequenceClassification

from .configuration_multi_exit import MultiExitConfig
from .modeling_multi_exit import (
    EarlyExitPrediction,
    ExitPolicy,
    MultiExitForSequenceClassification,
    MultiExitPreTrainedModel,
    MultiExitSequenceClassifierOutput,
)

AutoConfig.register(MultiExitConfig.model_type, MultiExitConfig, exist_ok=True)
AutoModelForSequenceClassification.register(MultiExitConfig, MultiExitForSequenceClassification, exist_ok=True)
MultiExitConfig.register_for_auto_class()
MultiExitForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "EarlyExitPrediction",
    "ExitPolicy",
    "MultiExitConfig",
    "MultiExitForSequenceClassification",
    "MultiExitPreTrainedModel",
    "MultiExitSequenceClassifierOutput",
]
