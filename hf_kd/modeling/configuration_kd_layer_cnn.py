"""Configuration of the small CNN image classifier with letKD KD layers.

The network of [`MultiExitImageConfig`] (a stem, then stages that each halve the resolution) with a single classifier
(global average pooling + linear) after the last stage, and letKD KD layers (Görgün et al., 2023,
https://huggingface.co/papers/2309.02843) at the paper's two locations: after the first block of the last stage
("intermediate", ResNet's `layer3[0]`) and after the last stage ("penultimate", what the classifier reads). Without
KD layers it is a plain CNN, e.g. the teacher.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from .configuration_kd_layer import _check_kd_layer_residual_weights, _check_kd_layer_templates
from .configuration_multi_exit_cnn import _set_cnn_layout


class KDLayerImageConfig(PreTrainedConfig):
    r"""
    Configuration of a [`KDLayerForImageClassification`].

    Every convolution is 3x3 with padding 1, no bias, then BatchNorm and ReLU (the blocks of
    [`MultiExitForImageClassification`]). The stem keeps the resolution; each stage starts with a stride-2
    convolution (28 -> 14 -> 7 -> 4 with three stages) and adds `convs_per_stage - 1` stride-1 convolutions. The
    classifier is global average pooling then `Linear(stage_channels[-1], num_labels)`.

    Args:
        num_channels (`int`, *optional*, defaults to 1): channels of the input images.
        image_size (`int`, *optional*, defaults to 28): height and width of the input images (documentation only; any
            size works).
        stem_channels (`int`, *optional*, defaults to 16): output channels of the stem.
        stage_channels (`list[int]`, *optional*, defaults to `[32, 64, 128]`): output channels of each stage.
        convs_per_stage (`int`, *optional*, defaults to 2): convolutions per stage (>= 2 for an intermediate KD layer,
            which sits after the first one of the last stage).
        kd_layer_templates (`dict[str, int]`, *optional*):
            `{location: K}` with locations `"intermediate"` and `"penultimate"`; none means a plain CNN. letKD uses 4096
            penultimate templates and 8 per class (`8 * num_labels`) at the intermediate location.
        kd_layer_residual_weights (`dict[str, float]`, *optional*, defaults to 1.0 each): weight of each KD layer's
            values in its residual (official `value_ratio`).
        kd_layer_score_scale (`float`, *optional*, defaults to 3.0): initial scale of the template scores.
        num_labels (`int`, *optional*, defaults to 2): number of classes.
        kwargs: passed to [`PreTrainedConfig`].

    Example:

    ```python
    >>> from hf_kd.modeling import KDLayerForImageClassification, KDLayerImageConfig
    >>> config = KDLayerImageConfig(stage_channels=[16, 32, 64], num_labels=10,
    ...                             kd_layer_templates={"penultimate": 4096, "intermediate": 80})
    >>> model = KDLayerForImageClassification(config)
    ```
    """

    model_type = "hf_kd_kd_layer_cnn"
    keys_to_ignore_at_inference = ["kd_layer_scores", "kd_features", "hidden_states"]

    def __init__(
        self,
        num_channels=1,
        image_size=28,
        stem_channels=16,
        stage_channels=(32, 64, 128),
        convs_per_stage=2,
        kd_layer_templates=None,
        kd_layer_residual_weights=None,
        kd_layer_score_scale=3.0,
        num_labels=None,
        **kwargs,
    ):
        _set_cnn_layout(self, num_channels, image_size, stem_channels, stage_channels, convs_per_stage)
        self.kd_layer_templates = _check_kd_layer_templates(kd_layer_templates)
        if "intermediate" in self.kd_layer_templates and self.convs_per_stage < 2:
            raise ValueError(
                "An intermediate KD layer sits after the first convolution of the last stage, which needs "
                f"convs_per_stage >= 2 (with 1 it would be the penultimate location), got {self.convs_per_stage}."
            )
        self.kd_layer_residual_weights = _check_kd_layer_residual_weights(
            kd_layer_residual_weights, self.kd_layer_templates
        )
        if not kd_layer_score_scale > 0:
            raise ValueError(f"kd_layer_score_scale must be > 0, got {kd_layer_score_scale!r}.")
        self.kd_layer_score_scale = float(kd_layer_score_scale)
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        super().__init__(**kwargs)


__all__ = ["KDLayerImageConfig"]
