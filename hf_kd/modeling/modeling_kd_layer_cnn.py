"""A small CNN image classifier with letKD KD layers, in plain torch (no torchvision).

Görgün, Gürbüz & Alatan, "Knowledge Distillation Layer that Lets the Student Decide", BMVC 2023
(https://huggingface.co/papers/2309.02843). The blocks are those of [`MultiExitForImageClassification`]; KD layers
([`KDLayer`]) transform the features after the first block of the last stage ("intermediate") and after the last stage
("penultimate"), and the classifier reads the transformed penultimate features, at training and at inference. Its
`forward` computes cross-entropy only: the KD layers' losses need the teacher and are added by `DistillTrainer`
(`letkd=1` or `2`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_kd_layer_cnn import KDLayerImageConfig
from .kd_layer import CosineConv1x1, build_kd_layers
from .modeling_multi_exit_cnn import build_conv_stages


@dataclass
class KDLayerImageClassifierOutput(ModelOutput):
    """Output of [`KDLayerForImageClassification.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            Cross-entropy of `logits`.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`).
        kd_layer_scores (`dict[str, torch.FloatTensor]`):
            Per KD layer location, its template scores `(batch_size * H * W, K)` (positions in `(b, h, w)` order).
        kd_features (`dict[str, torch.FloatTensor]`, *optional*, returned when `output_kd_features=True`):
            The features entering each location `(batch_size, C, H, W)`, for both locations whether or not a KD layer
            sits there (a teacher's features, or the student's before its KD layers).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The stem's output then each stage's output (after its KD layers), `(batch_size, C_i, H_i, W_i)`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    kd_layer_scores: dict[str, torch.FloatTensor] | None = None
    kd_features: dict[str, torch.FloatTensor] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class KDLayerImagePreTrainedModel(PreTrainedModel):
    """Base class of the KD-layer image models: config class, input name and weight init."""

    config_class = KDLayerImageConfig
    main_input_name = "pixel_values"

    def _init_weights(self, module):
        """Kaiming-normal (fan-out, ReLU) convolutions as ResNet; BatchNorm at identity; linear layers
        Normal(0, 0.02) with zero bias; cosine 1x1 convolutions N(0, 2 / in_features) with their initial scale."""
        super()._init_weights(module)
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, CosineConv1x1):
            module.reset_parameters()


class KDLayerForImageClassification(KDLayerImagePreTrainedModel):
    """A small CNN (stem + stages of 3x3 convolutions) with letKD KD layers and a pooled linear classifier.

    Args:
        config ([`KDLayerImageConfig`]): the network and its KD layers.

    Example:

    ```python
    >>> import torch
    >>> from hf_kd.modeling import KDLayerForImageClassification, KDLayerImageConfig
    >>> model = KDLayerForImageClassification(KDLayerImageConfig(num_labels=10, kd_layer_templates={"penultimate": 64}))
    >>> out = model(torch.rand(2, 1, 28, 28), output_kd_features=True)
    >>> out.logits.shape, out.kd_layer_scores["penultimate"].shape, out.kd_features["penultimate"].shape
    (torch.Size([2, 10]), torch.Size([32, 64]), torch.Size([2, 128, 4, 4]))
    ```
    """

    def __init__(self, config: KDLayerImageConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.stem, self.stages = build_conv_stages(config)
        last = config.stage_channels[-1]
        self.kd_layers = build_kd_layers(config, {"intermediate": last, "penultimate": last})
        self.classifier = nn.Linear(last, config.num_labels)
        self.post_init()

    def _location_after(self, stage: int, block: int) -> str | None:
        """The KD location right after block `block` of stage `stage` (0-based), if any."""
        if stage != len(self.stages) - 1:
            return None
        if block == len(self.stages[stage]) - 1:
            return "penultimate"
        return "intermediate" if block == 0 else None

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_kd_features: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> KDLayerImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): the images.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class indices; the loss is their
                cross-entropy (the KD layers' losses are added by the trainer, which has the teacher).
            output_kd_features (`bool`, *optional*, defaults to `False`):
                Also return the features entering each KD location (`kd_features`).
            output_hidden_states (`bool`, *optional*, defaults to `config.output_hidden_states`):
                Also return the stem's and every stage's feature maps.

        Returns:
            [`KDLayerImageClassifierOutput`] (a tuple when `return_dict=False`).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if pixel_values is None or pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            shape = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(
                f"pixel_values must have shape (batch_size, {self.config.num_channels}, height, width), got {shape}."
            )
        hidden = self.stem(pixel_values)  # (bs, C_stem, H, W)
        hidden_states, kd_features, kd_layer_scores = (hidden,), {}, {}
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                hidden = block(hidden)  # (bs, C_s, H_s, W_s)
                location = self._location_after(s, b)
                if location is None:
                    continue
                kd_features[location] = hidden
                if location in self.kd_layers:
                    hidden, kd_layer_scores[location] = self.kd_layers[location](hidden)  # (bs, C, H, W), (N, K)
            hidden_states += (hidden,)
        logits = self.classifier(hidden.mean(dim=(2, 3)))  # (bs, num_labels)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.to(logits.device).view(-1))
        output = KDLayerImageClassifierOutput(
            loss=loss,
            logits=logits,
            kd_layer_scores=kd_layer_scores,
            kd_features=kd_features if output_kd_features else None,
            hidden_states=hidden_states if output_hidden_states else None,
        )
        return output


__all__ = ["KDLayerForImageClassification", "KDLayerImageClassifierOutput", "KDLayerImagePreTrainedModel"]
