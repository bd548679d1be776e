"""Configuration of the multi-exit (early-exit) convolutional image classifier.

A small CNN in plain torch: a stem, then stages that each halve the resolution, with an exit (global average pool +
linear) after the stages listed in `exit_layers`. The image counterpart of [`MultiExitConfig`], for early-exit
experiments on small images such as Fashion-MNIST (28x28 grayscale), in the spirit of the MSDNet budgeted protocol of
Meronen et al. (2024, https://huggingface.co/papers/2302.06359).
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from .configuration_multi_exit import (
    _check_exit_layers,
    _check_exit_loss_weights,
    _MultiExitConfigMixin,
)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


def _set_cnn_layout(config, num_channels, image_size, stem_channels, stage_channels, convs_per_stage) -> None:
    """Check and set the CNN layout fields shared by the multi-exit and the KD-layer image configs."""
    config.num_channels = _check_positive_int("num_channels", num_channels)
    config.image_size = _check_positive_int("image_size", image_size)
    config.stem_channels = _check_positive_int("stem_channels", stem_channels)
    if isinstance(stage_channels, int) or not stage_channels:
        raise ValueError(f"stage_channels must be a non-empty list of channel counts, got {stage_channels!r}.")
    config.stage_channels = [_check_positive_int(f"stage_channels[{i}]", c) for i, c in enumerate(stage_channels)]
    config.convs_per_stage = _check_positive_int("convs_per_stage", convs_per_stage)


class MultiExitImageConfig(_MultiExitConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a [`MultiExitForImageClassification`]: a stem, `len(stage_channels)` convolutional stages and an
    exit after each stage listed in `exit_layers`.

    Every convolution is 3x3 with padding 1 and no bias, followed by BatchNorm and ReLU. The stem keeps the
    resolution; each stage starts with a stride-2 convolution (`H -> ceil(H / 2)`: 28 -> 14 -> 7 -> 4 with the
    defaults) and adds `convs_per_stage - 1` stride-1 convolutions. An exit is global average pooling over the stage's
    feature map followed by `Linear(stage_channels[i], num_labels)`.

    Args:
        num_channels (`int`, *optional*, defaults to 1):
            Channels of the input images (1 for grayscale, 3 for RGB).
        image_size (`int`, *optional*, defaults to 28):
            Height and width of the input images. The network itself accepts any size (the exits pool globally); this
            is the size its FLOPs estimate ([`MultiExitForImageClassification.exit_flops`]) assumes by default.
        stem_channels (`int`, *optional*, defaults to 16):
            Output channels of the stem convolution.
        stage_channels (`list[int]`, *optional*, defaults to `[32, 64, 128]`):
            Output channels of each stage; its length is the number of stages, `num_hidden_layers`.
        convs_per_stage (`int`, *optional*, defaults to 2):
            Convolutions per stage: one stride-2 convolution, then `convs_per_stage - 1` stride-1 convolutions.
        exit_layers (`list[int]`, *optional*, defaults to every stage `[1, ..., num_hidden_layers]`):
            1-based indices of the stages after which an exit sits. They are sorted and deduplicated; the last stage
            is always added, so the final exit reads the deepest features.
        num_labels (`int`, *optional*, defaults to 2):
            Number of classes K of every exit (10 for Fashion-MNIST).
        exit_loss_weights (`list[float]`, *optional*, defaults to uniform):
            Non-negative weight of each exit's cross-entropy in the training loss, one per exit (after the last stage
            has been added to `exit_layers`), normalised to sum to 1 as in [`MultiExitConfig`].
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the exits' linear layers (convolutions use Kaiming
            normal initialisation, fan-out, as ResNet).
        kwargs:
            Passed to [`PreTrainedConfig`] (`id2label`, `label2id`, ...).

    Examples:

    ```python
    >>> from hf_kd import MultiExitForImageClassification, MultiExitImageConfig

    >>> config = MultiExitImageConfig(stage_channels=[8, 16, 32], exit_layers=[1], num_labels=10)
    >>> config.exit_layers, config.num_hidden_layers  # the last stage is always an exit
    ([1, 3], 3)
    >>> model = MultiExitForImageClassification(config)
    ```
    """

    model_type = "hf_kd_multi_exit_cnn"

    def __init__(
        self,
        num_channels=1,
        image_size=28,
        stem_channels=16,
        stage_channels=(32, 64, 128),
        convs_per_stage=2,
        exit_layers=None,
        num_labels=None,
        exit_loss_weights=None,
        initializer_range=0.02,
        **kwargs,
    ):
        _set_cnn_layout(self, num_channels, image_size, stem_channels, stage_channels, convs_per_stage)
        self.exit_layers = exit_layers = _check_exit_layers(
            exit_layers, len(self.stage_channels), unit="stage", owner="the network"
        )
        self.exit_loss_weights = _check_exit_loss_weights(exit_loss_weights, exit_layers)
        if not initializer_range > 0:
            raise ValueError(f"initializer_range must be > 0, got {initializer_range!r}.")
        self.initializer_range = initializer_range
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        super().__init__(**kwargs)

    @property
    def num_hidden_layers(self) -> int:
        """Number of stages, `len(stage_channels)` (the unit `exit_layers` counts in)."""
        return len(self.stage_channels)


__all__ = ["MultiExitImageConfig"]
