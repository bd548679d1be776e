"""transformers-style models of hf_kd, registered with the Auto classes.

Importing this package registers:

- `MultiExitConfig` (`model_type="hf_kd_multi_exit"`) with `AutoConfig` and `MultiExitForSequenceClassification`
  with `AutoModelForSequenceClassification`;
- `MultiExitImageConfig` (`model_type="hf_kd_multi_exit_cnn"`) with `AutoConfig` and
  `MultiExitForImageClassification` with `AutoModelForImageClassification`;
- `KDLayerConfig` (`model_type="hf_kd_kd_layer"`) with `AutoConfig` and `KDLayerForSequenceClassification` with
  `AutoModelForSequenceClassification` (letKD KD layers per token);
- `KDLayerImageConfig` (`model_type="hf_kd_kd_layer_cnn"`) with `AutoConfig` and `KDLayerForImageClassification` with
  `AutoModelForImageClassification` (a CNN with letKD KD layers);

- `MultiExitCausalLMConfig` (`model_type="hf_kd_multi_exit_causal_lm"`) with `AutoConfig` and `MultiExitForCausalLM`
  with `AutoModelForCausalLM` (a Llama-family decoder with next-token exits);

and marks all of them for `auto_map`, so a saved or pushed multi-exit model records its classes in config.json (and
`save_pretrained` copies the modeling files next to the weights, for `trust_remote_code=True`).
"""

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
)

from .configuration_kd_layer import KDLayerConfig
from .configuration_kd_layer_cnn import KDLayerImageConfig
from .configuration_multi_exit import MultiExitConfig
from .configuration_multi_exit_causal_lm import ExitAdapterType, MultiExitCausalLMConfig
from .configuration_multi_exit_cnn import MultiExitImageConfig
from .early_exit_generation import (
    EarlyExitGenerateOutput,
    ExitThresholdFit,
    confident_generate,
    fit_exit_thresholds,
    self_speculative_generate,
)
from .exit_laplace import KronPrior, LinkApprox, MultiExitLaplace
from .exit_policies import EarlyExitPrediction, ExitPolicy
from .kd_layer import KDLayer
from .modeling_kd_layer import (
    KDLayerForSequenceClassification,
    KDLayerPreTrainedModel,
    KDLayerSequenceClassifierOutput,
)
from .modeling_kd_layer_cnn import (
    KDLayerForImageClassification,
    KDLayerImageClassifierOutput,
    KDLayerImagePreTrainedModel,
)
from .modeling_multi_exit import (
    MultiExitForSequenceClassification,
    MultiExitPreTrainedModel,
    MultiExitSequenceClassifierOutput,
)
from .modeling_multi_exit_causal_lm import (
    ExitAdapter,
    MultiExitCausalLMOutputWithPast,
    MultiExitCausalLMPreTrainedModel,
    MultiExitForCausalLM,
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

AutoConfig.register(MultiExitCausalLMConfig.model_type, MultiExitCausalLMConfig, exist_ok=True)
AutoModelForCausalLM.register(MultiExitCausalLMConfig, MultiExitForCausalLM, exist_ok=True)
MultiExitCausalLMConfig.register_for_auto_class()
MultiExitForCausalLM.register_for_auto_class("AutoModelForCausalLM")

AutoConfig.register(KDLayerConfig.model_type, KDLayerConfig, exist_ok=True)
AutoModelForSequenceClassification.register(KDLayerConfig, KDLayerForSequenceClassification, exist_ok=True)
KDLayerConfig.register_for_auto_class()
KDLayerForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

AutoConfig.register(KDLayerImageConfig.model_type, KDLayerImageConfig, exist_ok=True)
AutoModelForImageClassification.register(KDLayerImageConfig, KDLayerForImageClassification, exist_ok=True)
KDLayerImageConfig.register_for_auto_class()
KDLayerForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "EarlyExitGenerateOutput",
    "EarlyExitPrediction",
    "ExitAdapter",
    "ExitAdapterType",
    "ExitPolicy",
    "ExitThresholdFit",
    "KDLayer",
    "KDLayerConfig",
    "KDLayerForImageClassification",
    "KDLayerForSequenceClassification",
    "KDLayerImageClassifierOutput",
    "KDLayerImageConfig",
    "KDLayerImagePreTrainedModel",
    "KDLayerPreTrainedModel",
    "KDLayerSequenceClassifierOutput",
    "KronPrior",
    "LinkApprox",
    "MultiExitCausalLMConfig",
    "MultiExitCausalLMOutputWithPast",
    "MultiExitCausalLMPreTrainedModel",
    "MultiExitConfig",
    "MultiExitForCausalLM",
    "MultiExitForImageClassification",
    "MultiExitForSequenceClassification",
    "MultiExitImageClassifierOutput",
    "MultiExitImageConfig",
    "MultiExitImagePreTrainedModel",
    "MultiExitLaplace",
    "MultiExitPreTrainedModel",
    "MultiExitSequenceClassifierOutput",
    "confident_generate",
    "fit_exit_thresholds",
    "self_speculative_generate",
]
