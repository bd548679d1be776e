"""Multi-exit (early-exit) convolutional image classifier, in plain torch (no torchvision).

A stem, then stages that each halve the resolution, with an exit (global average pooling + linear) after each stage
in `config.exit_layers`. Training (`forward` with labels) minimises a weighted sum of the per-exit cross-entropies,
like [`MultiExitForSequenceClassification`], and the outputs use the same field names, so one trainer handles both.
[`MultiExitForImageClassification.predict_with_exits`] really exits (rows leave the batch), with the same policies,
budget thresholds and model-internal ensembling (Meronen et al., 2024, https://huggingface.co/papers/2302.06359) as
the sequence model: the policy code is shared, not copied.
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

from .configuration_multi_exit_cnn import MultiExitImageConfig
from .exit_laplace import ExitLaplaceMixin, LinkApprox, capture_exit_features
from .exit_policies import EarlyExitPrediction, ExitPolicy, _EarlyExitRun


def _conv_output_size(size: int, stride: int) -> int:
    """Output size of a 3x3 convolution with padding 1: `floor((size - 1) / stride) + 1` (`ceil(size / 2)` at 2)."""
    return (size - 1) // stride + 1


@dataclass
class MultiExitImageClassifierOutput(ModelOutput):
    """Output of [`MultiExitForImageClassification.forward`] (the fields of `MultiExitSequenceClassifierOutput`).

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            Weighted sum of the per-exit cross-entropies, weights `config.normalized_exit_loss_weights` (sum 1).
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Logits of the final exit (after the last stage).
        exit_logits (`tuple(torch.FloatTensor)`, one of shape `(batch_size, num_labels)` per exit):
            Logits of every exit, in the order of `config.exit_layers`; `exit_logits[-1]` is `logits`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The stem's output then each stage's output, `(batch_size, C_i, H_i, W_i)`: `1 + num_hidden_layers` maps.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    exit_logits: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class MultiExitConvBlock(nn.Module):
    """`ReLU(BatchNorm(Conv3x3(x)))` with padding 1; the convolution has no bias (BatchNorm adds one)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.activation = nn.ReLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(hidden_states)))  # (bs, C_out, H_out, W_out)


def build_conv_stages(config) -> tuple[MultiExitConvBlock, nn.ModuleList]:
    """The stem and the stages of `config` (`num_channels`, `stem_channels`, `stage_channels`, `convs_per_stage`):
    each stage is a stride-2 block then `convs_per_stage - 1` stride-1 blocks (shared with the KD-layer CNN)."""
    stem = MultiExitConvBlock(config.num_channels, config.stem_channels, stride=1)
    stages, in_channels = [], config.stem_channels
    for channels in config.stage_channels:
        blocks = [MultiExitConvBlock(in_channels, channels, stride=2)]
        blocks += [MultiExitConvBlock(channels, channels, stride=1) for _ in range(config.convs_per_stage - 1)]
        stages.append(nn.Sequential(*blocks))
        in_channels = channels
    return stem, nn.ModuleList(stages)


class MultiExitImageHead(nn.Module):
    """One exit: global average pooling over the feature map, then `Linear(channels, num_labels)`.

    Pooling makes the exit cheap (`2 C K` FLOPs) and independent of the image size.
    """

    def __init__(self, channels: int, num_labels: int):
        super().__init__()
        self.classifier = nn.Linear(channels, num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(hidden_states))  # (bs, num_labels)

    def features(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The input of `classifier`, the pooled feature map `(bs, C)`: what the per-exit Laplace is fitted on."""
        return hidden_states.mean(dim=(2, 3))


class MultiExitImagePreTrainedModel(ExitLaplaceMixin, PreTrainedModel):
    """Base class of the multi-exit image models: config class, input name, weight init and the per-exit Laplace
    approximation ([`ExitLaplaceMixin`]: `fit_exit_laplace`, saved and loaded with the model).

    There is no separate base model: the exits read the stages directly, so `base_model_prefix` stays empty.
    """

    config_class = MultiExitImageConfig
    main_input_name = "pixel_values"
    # Heads trained in full when a PEFT adapter is put on the stages (see modeling_multi_exit._hf_kd_heads).
    _hf_kd_heads = ("exits",)

    def _init_weights(self, module):
        """Kaiming-normal (fan-out, ReLU) convolutions as ResNet; BatchNorm at identity; linear layers
        Normal(0, `config.initializer_range`) with zero bias."""
        super()._init_weights(module)
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class MultiExitForImageClassification(MultiExitImagePreTrainedModel):
    """A small CNN with a classification head after each stage in `config.exit_layers`.

    Train it with `forward(pixel_values, labels=...)` (weighted multi-exit cross-entropy) and run adaptive inference
    with [`~MultiExitForImageClassification.predict_with_exits`].

    Args:
        config ([`MultiExitImageConfig`]): the network and the exits.

    Example:

    ```python
    >>> import torch
    >>> from hf_kd import MultiExitForImageClassification, MultiExitImageConfig
    >>> model = MultiExitForImageClassification(MultiExitImageConfig(num_labels=10)).eval()
    >>> pred = model.predict_with_exits(torch.rand(4, 1, 28, 28), policy="max_prob", threshold=0.9)
    >>> pred.exit_index.shape
    torch.Size([4])
    ```
    """

    def __init__(self, config: MultiExitImageConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.stem, self.stages = build_conv_stages(config)
        self.exits = nn.ModuleList(
            [MultiExitImageHead(config.stage_channels[stage - 1], config.num_labels) for stage in config.exit_layers]
        )
        self.post_init()

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if pixel_values is None or pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            shape = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(
                f"pixel_values must have shape (batch_size, {self.config.num_channels}, height, width) "
                f"(config.num_channels = {self.config.num_channels}), got {shape}."
            )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> MultiExitImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): the images.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices in `[0, num_labels)`. When given, the loss is `sum_j w_j * CE(exit_logits[j], labels)`
                with `w = config.normalized_exit_loss_weights` (uniform by default; they sum to 1).
            output_hidden_states (`bool`, *optional*, defaults to `config.output_hidden_states`):
                Also return the stem's and every stage's feature maps.

        Returns:
            [`MultiExitImageClassifierOutput`] (or a tuple `(loss?, logits, exit_logits, hidden_states?)` when
            `return_dict=False`).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        self._check_pixel_values(pixel_values)
        exit_of_stage = {stage: j for j, stage in enumerate(self.config.exit_layers)}
        hidden = self.stem(pixel_values)  # (bs, C_stem, H, W)
        hidden_states = (hidden,)
        exit_logits = ()
        for s, stage in enumerate(self.stages):
            hidden = stage(hidden)  # (bs, C_s, H_s, W_s)
            hidden_states += (hidden,)
            j = exit_of_stage.get(s + 1)
            if j is not None:
                exit_logits += (self.exits[j](hidden),)  # (bs, num_labels)
        logits = exit_logits[-1]

        loss = None
        if labels is not None:
            labels = labels.to(logits.device).view(-1)
            weights = self.config.normalized_exit_loss_weights
            loss = sum(w * F.cross_entropy(z, labels) for w, z in zip(weights, exit_logits))

        hidden_states = hidden_states if output_hidden_states else None
        return MultiExitImageClassifierOutput(
            loss=loss, logits=logits, exit_logits=exit_logits, hidden_states=hidden_states
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Adaptive inference
    # ----------------------------------------------------------------------------------------------------------------

    def _block_flops(self, height: int, width: int) -> tuple[float, list[float], list[float]]:
        """FLOPs of one image `(height, width)`: stem, each stage, each exit head (formula in `predict_with_exits`)."""
        stem = 2.0 * 9 * self.config.num_channels * self.config.stem_channels * height * width
        stages, in_channels = [], self.config.stem_channels
        for channels in self.config.stage_channels:
            height, width = _conv_output_size(height, 2), _conv_output_size(width, 2)
            per_stage = 2.0 * 9 * in_channels * channels * height * width  # the stride-2 convolution
            per_stage += (self.config.convs_per_stage - 1) * 2.0 * 9 * channels * channels * height * width
            stages.append(per_stage)
            in_channels = channels
        heads = [2.0 * self.config.stage_channels[stage - 1] * self.num_labels for stage in self.config.exit_layers]
        return stem, stages, heads

    def exit_flops(self, image_size: int | tuple[int, int] | None = None) -> list[float]:
        r"""Estimated forward FLOPs of one image up to and including each exit.

        Exit `j` (after stage `s_j = config.exit_layers[j]`) costs the stem, stages `1..s_j` and the heads of exits
        `0..j` (an image that leaves at exit `j` has evaluated all of them), with the formula of
        [`~MultiExitForImageClassification.predict_with_exits`]. These are the `exit_flops` of
        [`hf_kd.early_exit.budgeted_evaluation`] and the FLOPs behind the MIE weights.

        Args:
            image_size (`int` or `tuple[int, int]`, *optional*, defaults to `config.image_size`):
                Input height and width (an `int` for square images).

        Returns:
            `list[float]`, one cumulative FLOPs count per exit (non-decreasing).
        """
        image_size = self.config.image_size if image_size is None else image_size
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
            raise ValueError(
                f"image_size must be an integer >= 1 or a (height, width) pair of them, got {image_size!r}."
            )
        height, width = size
        stem, stages, heads = self._block_flops(height, width)
        return [stem + sum(stages[:stage]) + sum(heads[: j + 1]) for j, stage in enumerate(self.config.exit_layers)]

    def _batch_exit_flops(self, inputs: dict) -> list[float]:
        return self.exit_flops(tuple(int(v) for v in inputs["pixel_values"].shape[2:]))

    @torch.no_grad()
    def predict_exit_probs(
        self, pixel_values: torch.FloatTensor, link_approx: LinkApprox | str | None = None, mie: bool = False
    ) -> torch.Tensor:
        r"""The predictive probabilities of every exit for every image, from one full forward pass.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): the images.
            link_approx ([`LinkApprox`] or `str`, *optional*): `None` (default) for each exit's softmax, `"mc"` or
                `"probit"` for the calibrated per-exit Laplace predictive (`model.exit_laplace`, an error without one).
            mie (`bool`, *optional*, defaults to `False`): model-internal ensembling, weights from `exit_flops` at
                this batch's image size.

        Returns:
            `torch.FloatTensor` of shape `(num_exits, batch_size, num_labels)`, rows summing to 1.
        """
        laplace, _ = self._exit_predictive(link_approx)  # checked before the forward pass
        with capture_exit_features(self) as features:
            exit_logits = self(pixel_values).exit_logits
        exit_flops = self._batch_exit_flops({"pixel_values": pixel_values})
        return self._exit_probs(exit_logits, features, laplace, link_approx, mie, exit_flops)

    @torch.no_grad()
    def predict_with_exits(
        self,
        pixel_values: torch.FloatTensor,
        policy: ExitPolicy | str = ExitPolicy.MAX_PROB,
        threshold: float | None = None,
        patience: int | None = None,
        thresholds: list[float] | None = None,
        mie: bool = False,
        link_approx: LinkApprox | str | None = None,
    ) -> EarlyExitPrediction:
        r"""Adaptive inference: run the stages one at a time and let each image leave at its first confident exit.

        The stem runs first, then stage 1, 2, ... on the rows still in the batch; after a stage with an exit its head
        is evaluated, the rows that satisfy `policy` are recorded and removed, so later stages run on fewer rows.
        Rows left at the final exit all leave there. Without `mie`, up to floating-point noise, each row's logits
        equal `forward(...).exit_logits[j]` at the exit `j` where it left. Runs without gradients; call
        `model.eval()` first (in training mode BatchNorm would use the statistics of the shrinking batch). The
        policies, budget thresholds and MIE are those of [`MultiExitForSequenceClassification.predict_with_exits`]
        (shared code).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): the images.
            policy ([`ExitPolicy`] or `str`, *optional*, defaults to `"max_prob"`):
                `"max_prob"`, `"entropy"`, `"patience"` or `"budget"` (see [`ExitPolicy`]).
            threshold (`float`): required for `"max_prob"` (in [0, 1]) and `"entropy"` (>= 0, in nats).
            patience (`int`): required for `"patience"`, >= 1.
            thresholds (`list[float]`): required for `"budget"`: `num_exits - 1` finite values >= 0, one per
                non-final exit, e.g. from [`hf_kd.early_exit.fit_budget_thresholds`]; above 1 means that nobody exits
                there.
            mie (`bool`, *optional*, defaults to `False`):
                Model-internal ensembling (Meronen et al., 2024): the policy and the output read
                `p̄_j = sum_{i<=j} w_i p_i / sum_{i<=j} w_i` with `w_i = exit_flops[i] / exit_flops[-1]` at this
                batch's image size (`probs = p̄`, `logits = log p̄`).
            link_approx ([`LinkApprox`] or `str`, *optional*):
                `None` (default) for each exit's softmax; `"mc"` or `"probit"` for the fitted per-exit Laplace
                predictive (`model.exit_laplace`), as in [`MultiExitForSequenceClassification.predict_with_exits`].

        Returns:
            [`EarlyExitPrediction`] with `logits` and `probs` `(batch_size, num_labels)`, `exit_layer` (the 1-based
            stage) and `exit_index` `(batch_size,)`, `layers_run` (stage-rows), `flops` and `full_flops`. FLOPs count
            multiply-adds as 2: a 3x3 convolution from `C_in` to `C_out` channels with an `H_out x W_out` output costs
            `2 * 9 * C_in * C_out * H_out * W_out`; each evaluated exit head adds `2 C K` per row (plus the Laplace
            predictive's FLOPs with `link_approx`). BatchNorm, ReLU, pooling and biases are ignored. The stem runs on
            every row.
        """
        self._check_pixel_values(pixel_values)
        laplace, laplace_flops = self._exit_predictive(link_approx)
        batch_size, _, height, width = pixel_values.shape
        stem_flops, stage_flops, head_flops = self._block_flops(height, width)
        hidden = self.stem(pixel_values)  # (bs, C_stem, H, W)
        run = _EarlyExitRun(
            policy,
            threshold,
            patience,
            thresholds,
            mie,
            self.exit_flops((height, width)),
            self.config.exit_layers,
            batch_size,
            self.num_labels,
            pixel_values.device,
            hidden.dtype,
        )
        exit_of_stage = {stage: j for j, stage in enumerate(self.config.exit_layers)}
        layers_run, flops = 0, batch_size * stem_flops
        for s, stage in enumerate(self.stages):
            hidden = stage(hidden)  # (n, C_s, H_s, W_s)
            n = hidden.shape[0]
            layers_run += n
            flops += n * stage_flops[s]
            j = exit_of_stage.get(s + 1)
            if j is None:
                continue
            flops += n * (head_flops[j] + laplace_flops[j])
            features = self.exits[j].features(hidden)  # (n, C_s)
            if laplace is None:
                keep = run.step(j, self.exits[j].classifier(features))
            else:  # the Laplace predictive computes the head's logits itself
                keep = run.step(j, None, laplace.predict_exit(j, features, link_approx))
            if not keep.any():
                break
            hidden = hidden[keep]

        full_flops = batch_size * (stem_flops + sum(stage_flops) + head_flops[-1])
        return run.prediction(layers_run, flops, full_flops)


__all__ = [
    "MultiExitForImageClassification",
    "MultiExitImageClassifierOutput",
    "MultiExitImagePreTrainedModel",
]
