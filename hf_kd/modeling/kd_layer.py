"""The KD layer of letKD: a learnable feature transform that lets the student decide how to use the teacher.

Görgün, Gürbüz & Alatan, "Knowledge Distillation Layer that Lets the Student Decide", BMVC 2023
(https://huggingface.co/papers/2309.02843; official code adagorgun/letKD-framework, `valueLayer.py` and
`tools.Conv2dCos`). At one location of the student (the penultimate features, and optionally an intermediate block),
the features `x` of every position are matched against `K` learned templates by a cosine 1x1 convolution; the scores
are supervised by the teacher's soft decisions (`hf_kd.kd_layer_targets`), pass through BatchNorm and ReLU, and a
second cosine 1x1 convolution turns them back into a `d`-dimensional "value" that is added to `x`. The transformed
features are what the rest of the student reads, at training and at inference.

This file lives in `hf_kd/modeling/` (not in the package root) because the KD-layer models import it and
`save_pretrained` copies a model's sibling modules next to its weights, so a saved student loads with
`trust_remote_code=True` where hf_kd is not installed.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init


class CosineConv1x1(nn.Module):
    r"""A 1x1 convolution whose output is a scaled cosine similarity: `scale * <x / |x|, w_k / |w_k|>`.

    The official `Conv2dCos`: both the input (per position) and each output filter are L2-normalised, the filters are
    multiplied by one learnable scalar `scale`, and there is no bias. Works on channel-last positions: an input of
    shape `(..., in_features)` gives `(..., out_features)`.

    Args:
        in_features (`int`): input channels `d`.
        out_features (`int`): output channels (templates `K`, or `d` for the value convolution).
        scale (`float`): initial value of the learnable scale (letKD: 3.0 for the templates, 1.0 for the values).

    Weights are initialised from `N(0, 2 / in_features)` (std `sqrt(2 / in_features)`), as in the official code; the
    scale starts at `scale`.
    """

    def __init__(self, in_features: int, out_features: int, scale: float):
        super().__init__()
        self.in_features, self.out_features, self.initial_scale = in_features, out_features, float(scale)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.scale = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # transformers.initialization skips tensors already loaded from a checkpoint (`_is_hf_initialized`).
        init.normal_(self.weight, mean=0.0, std=math.sqrt(2.0 / self.in_features))
        init.constant_(self.scale, self.initial_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.normalize(self.weight, dim=1) * self.scale  # (out, in)
        if self.in_features <= self.out_features:
            return F.linear(F.normalize(x, dim=-1), weight)  # (..., out)
        # <x / |x|, w> = <x, w> / |x|: dividing the narrower output is the same number, and much cheaper for the
        # values (K = 4096 inputs, d outputs) than normalising the K-wide input (and its backward).
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize's eps
        return F.linear(x, weight) / norm

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class KDLayer(nn.Module):
    r"""
    The letKD KD layer (Görgün et al., 2023, https://huggingface.co/papers/2309.02843) for one student location.

    For the features `x` of each position (a pixel of a CNN feature map or a token of a transformer layer):

    ```
    s   = CosConv1x1_{d -> K}(x)                 # template scores, learnable scale (init 3.0)
    v   = CosConv1x1_{K -> d}(ReLU(BN_K(s)))     # values, learnable scale (init 1.0)
    x^  = x + residual_weight * v                # fed forward, at training and at inference
    ```

    `s` are logits over the `K` templates; training supervises `softmax(s)` with the teacher's assignment of the same
    position (`KL(p_T || softmax(s))` averaged over positions, [`hf_kd.losses.kd_layer_loss`]). BatchNorm normalises
    each of the `K` scores over all positions of the batch (what the official `BatchNorm2d` on `(B, K, H, W)` does).

    Inputs:

    - CNN feature maps `(batch, d, height, width)`: every position takes part; `scores` has one row per position in
      `(b, h, w)` order, `(batch * height * width, K)`.
    - Transformer hidden states `(batch, seq_len, d)`, applied per token: only the tokens with `attention_mask != 0`
      take part. Padding tokens are left unchanged (`x^ = x`), do not enter the BatchNorm statistics, and have no row
      in `scores`: `(num_tokens, K)` in `(b, l)` order, so the loss averages over real tokens only.
    - Flat positions `(num_positions, d)`.

    Args:
        hidden_size (`int`): channels `d` of the features at this location.
        num_templates (`int`): templates `K` (letKD: 4096 at the penultimate location, 8 per class at the intermediate).
        score_scale (`float`, *optional*, defaults to 3.0): initial scale of the template scores (official `scale_cls`).
        value_scale (`float`, *optional*, defaults to 1.0): initial scale of the value convolution.
        residual_weight (`float`, *optional*, defaults to 1.0):
            Fixed weight of `v` in the residual (official `value_ratio`: 1.0, except 0.1 / 0.2 for ResNet50 ->
            MobileNetV2 on CIFAR-100).

    Example:

    ```python
    >>> import torch
    >>> from hf_kd import KDLayer
    >>> layer = KDLayer(hidden_size=64, num_templates=512)
    >>> out, scores = layer(torch.randn(2, 64, 4, 4))
    >>> out.shape, scores.shape
    (torch.Size([2, 64, 4, 4]), torch.Size([32, 512]))
    ```
    """

    def __init__(
        self,
        hidden_size: int,
        num_templates: int,
        score_scale: float = 3.0,
        value_scale: float = 1.0,
        residual_weight: float = 1.0,
    ):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_templates", num_templates)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        self.hidden_size, self.num_templates, self.residual_weight = hidden_size, num_templates, float(residual_weight)
        self.templates = CosineConv1x1(hidden_size, num_templates, scale=score_scale)
        self.norm = nn.BatchNorm1d(num_templates)
        self.values = CosineConv1x1(num_templates, hidden_size, scale=value_scale)

    def transform_positions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`x` `(num_positions, d)` -> (`x^` `(num_positions, d)`, `scores` `(num_positions, K)`)."""
        scores = self.templates(x)  # (N, K)
        values = self.values(F.relu(self.norm(scores)))  # (N, d)
        return x + self.residual_weight * values, scores

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden_states (`torch.Tensor`): `(batch, d, height, width)`, `(batch, seq_len, d)` or `(num_positions, d)`.
            attention_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*):
                For token inputs only: 1 for tokens, 0 for padding. Defaults to every token.

        Returns:
            `tuple(torch.Tensor, torch.Tensor)`: the transformed features (same shape as `hidden_states`) and the
            template scores, one row per position that took part (see the class docstring for the order).
        """
        d = self.hidden_size
        if hidden_states.dim() == 4:
            if attention_mask is not None:
                raise ValueError("attention_mask is only accepted with token inputs (batch, seq_len, hidden).")
            if hidden_states.shape[1] != d:
                raise ValueError(
                    f"KDLayer expects {d} channels at dim 1 of a feature map, got shape {tuple(hidden_states.shape)}."
                )
            batch, _, height, width = hidden_states.shape
            flat = hidden_states.permute(0, 2, 3, 1).reshape(-1, d)  # (B*H*W, d)
            out, scores = self.transform_positions(flat)
            return out.reshape(batch, height, width, d).permute(0, 3, 1, 2), scores
        if hidden_states.shape[-1] != d or hidden_states.dim() not in (2, 3):
            raise ValueError(
                f"KDLayer expects (batch, {d}, height, width) feature maps, (batch, seq_len, {d}) token states or "
                f"(num_positions, {d}) features, got shape {tuple(hidden_states.shape)}."
            )
        if hidden_states.dim() == 2 or attention_mask is None:
            out, scores = self.transform_positions(hidden_states.reshape(-1, d))
            return out.reshape(hidden_states.shape), scores
        if attention_mask.shape != hidden_states.shape[:2]:
            raise ValueError(
                f"attention_mask must have shape {tuple(hidden_states.shape[:2])}, got {tuple(attention_mask.shape)}."
            )
        valid = attention_mask != 0  # (B, L)
        out, scores = self.transform_positions(hidden_states[valid])  # (num_tokens, d), (num_tokens, K)
        # Padding keeps its input: it never enters the BatchNorm statistics nor the loss.
        return hidden_states.masked_scatter(valid.unsqueeze(-1), out), scores

    def extra_repr(self) -> str:
        return f"residual_weight={self.residual_weight}"


def build_kd_layers(config, channels: dict[str, int]) -> nn.ModuleDict:
    """One [`KDLayer`] per location of `config.kd_layer_templates`, with `channels[location]` input channels and the
    config's `kd_layer_score_scale` and `kd_layer_residual_weights` (shared by the KD-layer image and text models)."""
    return nn.ModuleDict(
        {
            location: KDLayer(
                channels[location],
                num_templates,
                score_scale=config.kd_layer_score_scale,
                residual_weight=config.kd_layer_residual_weights[location],
            )
            for location, num_templates in config.kd_layer_templates.items()
        }
    )


__all__ = ["CosineConv1x1", "KDLayer", "build_kd_layers"]
