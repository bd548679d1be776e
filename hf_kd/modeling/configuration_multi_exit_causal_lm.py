"""Configuration of the multi-exit (early-exit) causal language model.

A multi-exit causal LM reads next-token logits after some decoder layers of a Llama-family backbone (Llama, Qwen2,
Mistral, SmolLM2: decoder layers at `model.layers`, a final norm at `model.norm`, an LM head at `lm_head`), through
the backbone's own final norm and (tied) LM head, as LayerSkip (Elhoushi et al., 2024,
https://huggingface.co/papers/2404.16710) and CALM (Schuster et al., 2022, https://huggingface.co/papers/2207.07061)
do. An optional small per-exit adapter can be trained on top, e.g. with the backbone frozen.
"""

from __future__ import annotations

from enum import Enum

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_multi_exit import (
    _as_backbone_config,
    _check_exit_layers,
    _check_exit_loss_weights,
    _check_option,
    _MultiExitConfigMixin,
)


class ExitAdapterType(str, Enum):
    """The per-exit adapter of a [`MultiExitForCausalLM`] (`MultiExitCausalLMConfig.exit_adapter`), applied to the
    hidden state `h` of the exit's layer before the shared final norm and LM head. Both start as the identity (their
    last matrix is zero-initialised), so an untrained adapter changes no logit."""

    LINEAR = "linear"
    """`h + W h`, `W` `(hidden, hidden)` zero-initialised: `hidden^2` parameters per exit (332K for SmolLM2-135M)."""
    LOW_RANK = "low_rank"
    """`h + B (A h)`, `A` `(rank, hidden)` normal-initialised, `B` `(hidden, rank)` zero-initialised (LoRA's start):
    `2 * hidden * rank` parameters per exit."""


def _check_exit_values(values, exit_layers, name: str, low: float, high: float | None) -> dict[str, float] | None:
    """`values` `{exit_layer: value}` with string keys (JSON's), each layer an exit and each value in `[low, high]`
    (`(low, inf)` when `high` is `None`)."""
    if values is None:
        return None
    checked = {}
    for layer, value in dict(values).items():
        if exit_layers is not None and int(layer) not in exit_layers:
            raise ValueError(f"{name} has layer {layer}, which is not an exit: exit_layers={exit_layers}.")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not (low <= value <= high if high is not None else value > low):
            allowed = f"[{low}, {high}]" if high is not None else f"> {low}"
            raise ValueError(f"{name}[{layer}] must be a number {allowed}, got {value!r}.")
        checked[str(int(layer))] = float(value)
    return checked


class MultiExitCausalLMConfig(_MultiExitConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a [`MultiExitForCausalLM`]: a Llama-family decoder with next-token exits after the layers listed
    in `exit_layers`.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            The configuration of the causal-LM backbone (e.g. `LlamaConfig`, `Qwen2Config`, `MistralConfig`): it must
            have `num_hidden_layers`, `hidden_size` and `vocab_size`. A `dict` must hold a `model_type`. Required to
            build a model; there is no default backbone.
        exit_layers (`list[int]`, *optional*, defaults to every layer `[1, ..., num_hidden_layers]`):
            1-based numbers of decoder layers after which an exit sits: exit `j` reads the output of layer
            `exit_layers[j]`. They must be increasing without repeats; **the last layer is always added** (when not
            given), so `exit_layers[-1]` is `num_hidden_layers` and the last exit is the backbone's own output (its
            logits are the backbone's, bit for bit). Unsorted, repeated, out-of-range or non-integer layers are an
            error.
        exit_adapter ([`ExitAdapterType`] or `str`, *optional*):
            `None` (default): every exit is the backbone's final norm + LM head, shared (LayerSkip's choice: no new
            parameters, and the exits learn only by training the backbone). `"linear"` or `"low_rank"`: each early
            exit also gets a residual adapter on its hidden state before the shared norm and head, zero-initialised
            so that it starts as the identity; the final exit never gets one (it stays the backbone's output, so a
            frozen backbone keeps its final logits). An adapter is what learns when the backbone is frozen.
        exit_adapter_rank (`int`, *optional*, defaults to `64`):
            Rank of the `"low_rank"` adapter (ignored otherwise).
        exit_loss_weights (`list[float]`, *optional*, defaults to uniform):
            Non-negative weight of each exit's loss, one per exit (the final one included), normalised to sum to 1.
        initializer_range (`float`, *optional*):
            Standard deviation of the adapters' normal initialisation. Defaults to the backbone's, else 0.02.
        exit_thresholds (`dict[int, float]`, *optional*):
            Confidence threshold in `[0, 1]` per early exit layer, for `generate(early_exit="confident")`; usually
            set by [`MultiExitForCausalLM.fit_exit_thresholds`] (Learn-then-Test). Stored with string keys, as JSON
            writes them.
        exit_temperatures (`dict[int, float]`, *optional*):
            Temperature (> 0) per exit layer that divides the exit's logits before its confidence is computed, in
            `fit_exit_thresholds` and `generate(early_exit="confident")`; `1.0` for an exit not listed.
        kwargs:
            Passed to [`PreTrainedConfig`].

    Example:

    ```python
    >>> from transformers import LlamaConfig
    >>> from hf_kd.modeling import MultiExitCausalLMConfig

    >>> backbone = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
    >>> MultiExitCausalLMConfig(backbone_config=backbone, exit_layers=[2]).exit_layers
    [2, 4]
    ```
    """

    model_type = "hf_kd_multi_exit_causal_lm"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", optional=True)
    }

    def __init__(
        self,
        backbone_config=None,
        exit_layers=None,
        exit_adapter=None,
        exit_adapter_rank=64,
        exit_loss_weights=None,
        initializer_range=None,
        exit_thresholds=None,
        exit_temperatures=None,
        **kwargs,
    ):
        self.backbone_config = backbone_config = _as_backbone_config(backbone_config)
        depth = None
        if backbone_config is not None:
            depth = getattr(backbone_config, "num_hidden_layers", None)
            missing = [
                name for name in ("num_hidden_layers", "hidden_size", "vocab_size")
                if getattr(backbone_config, name, None) is None
            ]
            if missing or getattr(backbone_config, "is_encoder_decoder", False):
                raise ValueError(
                    f"backbone_config ({type(backbone_config).__name__}) is not a decoder-only causal LM config "
                    f"(missing {missing}, is_encoder_decoder={getattr(backbone_config, 'is_encoder_decoder', False)}):"
                    " a multi-exit causal LM needs a Llama-family decoder (Llama, Qwen2, Mistral, SmolLM2)."
                )
        checked = _check_exit_layers(exit_layers, depth, unit="layer", owner="the backbone")
        if exit_layers is not None and list(exit_layers) != sorted(set(exit_layers)):
            # A list in another order or with repeats is probably a mistake (which exit is which?): say so, do not
            # reorder it silently.
            raise ValueError(
                f"exit_layers must be increasing layer numbers without repeats, got {list(exit_layers)}; "
                f"e.g. {sorted(set(exit_layers))}."
            )
        self.exit_layers = exit_layers = checked
        self.exit_adapter = None if exit_adapter is None else _check_option(ExitAdapterType, exit_adapter, "exit_adapter")
        if isinstance(exit_adapter_rank, bool) or not isinstance(exit_adapter_rank, int) or exit_adapter_rank < 1:
            raise ValueError(f"exit_adapter_rank must be an int >= 1, got {exit_adapter_rank!r}.")
        self.exit_adapter_rank = exit_adapter_rank
        self.exit_loss_weights = _check_exit_loss_weights(exit_loss_weights, exit_layers)
        if initializer_range is None:
            initializer_range = getattr(backbone_config, "initializer_range", None) or 0.02
        self.initializer_range = initializer_range
        self.exit_thresholds = _check_exit_values(exit_thresholds, exit_layers, "exit_thresholds", 0.0, 1.0)
        self.exit_temperatures = _check_exit_values(exit_temperatures, exit_layers, "exit_temperatures", 0.0, None)
        # The trainers and metrics read a causal LM's vocabulary from `config.vocab_size`.
        kwargs.pop("vocab_size", None)
        self.vocab_size = getattr(backbone_config, "vocab_size", None)
        # The wrapper has no embeddings of its own: the backbone ties its LM head to its embeddings itself.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)


__all__ = ["ExitAdapterType", "MultiExitCausalLMConfig"]
