"""transformers-style models of hf_kd, registered with the Auto classes.

Importing this package registers:

- `MultiExitConfig` (`model_type="hf_kd_multi_exit"`) with `AutoConfig` and `MultiExitForSequenceClassification`
  with `AutoModelForSequenceClassification`;
- `MultiExitImageConfig` (`model_type="hf_kd_multi_exit_cnn"`) with `AutoConfig` and
  `MultiExitForImageClassification` with `AutoModelForImageClassification`;

and marks all of them for `auto_map`, so a saved or pushed multi-exit model records its classes in config.json (and
`save_pretrained` copies the modeling files next to the weights, for `trust_remote_code=True`).
"""

from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

from .configuration_multi_exit import MultiExitConfig
from .configuration_multi_exit_cnn import MultiExitImageConfig
from .exit_laplace import KronPrior, LinkApprox, MultiExitLaplace
from .modeling_multi_exit import (
    EarlyExitPrediction,
    ExitPolicy,
    MultiExitForSequenceClassification,
    MultiExitPreTrainedModel,
    MultiExitSequenceClassifierOutput,
)
from .modeling_multi_exit_cnn import (
    MultiExitForImageClassification,
    MultiExitImageClassifierOutput,
    MultiExitImagePreTrainedModel,
)

AutoConfig.register(MultiExitConfig.model_type, MultiExitConfig, exist_ok=True)
AutoModelForSequenceClassification.register(MultiExitConfig, MultiExitForSequenceClassification, exist_ok=True)
MultiExitConfig.register_for_auto_class()
MultiExitForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

AutoConfig.register(MultiExitImageConfig.model_type, MultiExitImageConfig, exist_ok=True)
AutoModelForImageClassification.register(MultiExitImageConfig, MultiExitForImageClassification, exist_ok=True)
MultiExitImageConfig.register_for_auto_class()
MultiExitForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "EarlyExitPrediction",
    "ExitPolicy",
    "KronPrior",
    "LinkApprox",
    "MultiExitConfig",
    "MultiExitForImageClassification",
    "MultiExitForSequenceClassification",
    "MultiExitImageClassifierOutput",
    "MultiExitImageConfig",
    "MultiExitImagePreTrainedModel",
    "MultiExitLaplace",
    "MultiExitPreTrainedModel",
    "MultiExitSequenceClassifierOutput",
]
