"""A transformers sequence classifier with letKD KD layers applied per token.

Görgün, Gürbüz & Alatan, "Knowledge Distillation Layer that Lets the Student Decide", BMVC 2023
(https://huggingface.co/papers/2309.02843). The paper's KD layer transforms every position of a CNN feature map; here
every token of a transformer layer's hidden states is a position. The wrapped classifier (the "backbone", e.g. a
`BertForSequenceClassification` built from a teacher's layers) runs unchanged: forward hooks on its encoder layers
replace a layer's output by the KD layer's output, so the following layers, the pooler and the head read the
transformed states, and the backbone's weights keep their own names (a checkpoint of the plain classifier loads into
it). The KD layers' losses need the teacher and are added by `DistillTrainer` (`letkd=1` or `2`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_kd_layer import KDLayerConfig
from .kd_layer import CosineConv1x1, build_kd_layers


@dataclass
class KDLayerSequenceClassifierOutput(ModelOutput):
    """Output of [`KDLayerForSequenceClassification.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given): the backbone's loss.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`).
        kd_layer_scores (`dict[str, torch.FloatTensor]`):
            Per KD layer location, its template scores `(num_tokens, K)`: one row per token with
            `attention_mask != 0`, in `(b, l)` order (padding has no row).
        kd_features (`dict[str, torch.FloatTensor]`, *optional*, returned when `output_kd_features=True`):
            The hidden states entering each KD layer, `(batch_size, seq_len, hidden_size)`.
        hidden_states, attentions: the backbone's, when asked for (hidden states after the KD layers).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    kd_layer_scores: dict[str, torch.FloatTensor] | None = None
    kd_features: dict[str, torch.FloatTensor] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The `ModuleList` of transformer layers of `model` (`*.encoder.layer`, BERT-like encoders and MPNet)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (name == "encoder.layer" or name.endswith(".encoder.layer")):
            return module
    raise ValueError(
        f"{type(model).__name__} has no transformer layers at '*.encoder.layer' (BERT, MiniLM, RoBERTa, MPNet, ...): "
        "per-token KD layers are inserted after those layers."
    )


class _KDLayerHook:
    """Forward hook of one encoder layer: replaces the layer's output by the output of the KD layer at `location`.

    An object holding its model, not a closure, so `copy.deepcopy(model)` gives hooks that call the copy's KD layers.
    """

    def __init__(self, model: KDLayerForSequenceClassification, location: str):
        self.model, self.location = model, location

    def __call__(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output  # (bs, L, h)
        state = self.model._kd_state
        attention_mask = state["attention_mask"] if state is not None else None
        new_hidden, scores = self.model.kd_layers[self.location](hidden, attention_mask)
        if state is not None:
            state["kd_features"][self.location] = hidden
            state["kd_layer_scores"][self.location] = scores
        return (new_hidden,) + tuple(output[1:]) if isinstance(output, tuple) else new_hidden


class KDLayerPreTrainedModel(PreTrainedModel):
    """Base class of the KD-layer sequence classifiers: config class, weight init and the backbone prefix."""

    config_class = KDLayerConfig
    base_model_prefix = "backbone"
    _supports_sdpa = True

    def _init_weights(self, module):
        """Normal(0, `initializer_range`) linear weights and zero biases; cosine 1x1 convolutions
        N(0, 2 / in_features) with their initial scale."""
        super()._init_weights(module)
        if isinstance(module, CosineConv1x1):
            module.reset_parameters()


class KDLayerForSequenceClassification(KDLayerPreTrainedModel):
    """A sequence classifier whose encoder layers are followed by letKD KD layers, applied per token.

    Build it around a trained classifier with [`~KDLayerForSequenceClassification.from_backbone`] (e.g. a student
    made from a teacher's layers with `hf_kd.student.student_from_teacher_layers`). Only the tokens of
    `attention_mask` go through the KD layers: padding keeps its hidden states, stays out of the BatchNorm statistics,
    and has no template scores (so the KD loss is averaged over real tokens only). Call the wrapper, not
    `model.backbone` directly: the wrapper passes the attention mask to the KD layers.

    Args:
        config ([`KDLayerConfig`]): the backbone's config and the KD layers.

    Example:

    ```python
    >>> from hf_kd.modeling import KDLayerForSequenceClassification
    >>> model = KDLayerForSequenceClassification.from_backbone(
    ...     "my-org/minilm-l3-student", kd_layer_templates={"penultimate": 1024}
    ... )
    ```
    """

    def __init__(self, config: KDLayerConfig):
        super().__init__(config)
        if config.backbone_config is None:
            raise ValueError("KDLayerConfig.backbone_config is required to build a KDLayerForSequenceClassification.")
        self.num_labels = config.num_labels
        self.backbone = AutoModelForSequenceClassification.from_config(config.backbone_config)
        hidden = config.backbone_config.hidden_size
        self.kd_layers = build_kd_layers(config, {"intermediate": hidden, "penultimate": hidden})
        layers = encoder_layers(self.backbone)
        after = {"penultimate": len(layers), "intermediate": config.intermediate_layer}
        self._kd_state = None
        for location in config.kd_layer_templates:
            layers[after[location] - 1].register_forward_hook(_KDLayerHook(self, location))
        self.post_init()

    @classmethod
    def from_backbone(
        cls,
        name_or_path_or_model,
        kd_layer_templates: dict[str, int],
        backbone_kwargs: dict | None = None,
        **kwargs,
    ) -> KDLayerForSequenceClassification:
        """Put KD layers (freshly initialised) on a sequence classifier, keeping its weights.

        Args:
            name_or_path_or_model (`str`, `os.PathLike` or `PreTrainedModel`):
                A Hub id or folder loaded with `AutoModelForSequenceClassification.from_pretrained`, or a loaded
                sequence classifier (copied, not modified).
            kd_layer_templates (`dict[str, int]`): `{location: K}`, see [`KDLayerConfig`].
            backbone_kwargs (`dict`, *optional*): keyword arguments of `from_pretrained` (`num_labels`, ...).
            kwargs: other [`KDLayerConfig`] arguments (`intermediate_layer`, `kd_layer_residual_weights`, ...).

        Returns:
            [`KDLayerForSequenceClassification`] in training mode, with the classifier's weights and dtype.
        """
        if isinstance(name_or_path_or_model, (str, os.PathLike)):
            backbone = AutoModelForSequenceClassification.from_pretrained(
                name_or_path_or_model, **(backbone_kwargs or {})
            )
        elif isinstance(name_or_path_or_model, PreTrainedModel):
            backbone = name_or_path_or_model
        else:
            raise TypeError(
                f"from_backbone expects a Hub id, a local path or a PreTrainedModel, got {type(name_or_path_or_model)}."
            )
        config = KDLayerConfig(backbone_config=backbone.config.to_dict(), kd_layer_templates=kd_layer_templates, **kwargs)
        model = cls(config)
        model.backbone.load_state_dict(backbone.state_dict())
        model.train()
        return model.to(dtype=next(backbone.parameters()).dtype)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_kd_features: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> KDLayerSequenceClassifierOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): token ids.
            attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*): 1 for tokens, 0 for padding;
                the KD layers transform the tokens only.
            token_type_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*): segment ids.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): passed to the backbone for its loss.
            output_kd_features (`bool`, *optional*, defaults to `False`): also return the states entering each KD layer.
            output_hidden_states (`bool`, *optional*): the backbone's hidden states (after the KD layers).
            kwargs: passed to the backbone (`position_ids`, `inputs_embeds`, `output_attentions`, ...).

        Returns:
            [`KDLayerSequenceClassifierOutput`] (a tuple when `return_dict=False`).
        """
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **kwargs}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if output_hidden_states is not None:
            inputs["output_hidden_states"] = output_hidden_states
        self._kd_state = {"attention_mask": attention_mask, "kd_features": {}, "kd_layer_scores": {}}
        try:
            out = self.backbone(**inputs, return_dict=True)
        finally:
            state, self._kd_state = self._kd_state, None
        output = KDLayerSequenceClassifierOutput(
            loss=out.loss,
            logits=out.logits,
            kd_layer_scores=state["kd_layer_scores"],
            kd_features=state["kd_features"] if output_kd_features else None,
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )
        return output


__all__ = ["KDLayerForSequenceClassification", "KDLayerPreTrainedModel", "KDLayerSequenceClassifierOutput"]
