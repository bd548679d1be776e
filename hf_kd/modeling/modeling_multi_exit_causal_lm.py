"""Multi-exit (early-exit) causal language model on top of a Llama-family decoder.

Exit `j` reads the output `h` of decoder layer `config.exit_layers[j]` and predicts the next token with the backbone's
own final norm and (tied) LM head, `lm_head(norm(h))`, optionally after a small per-exit adapter: the shared-head
exits of LayerSkip (Elhoushi et al., 2024, https://huggingface.co/papers/2404.16710) and CALM (Schuster et al., 2022,
https://huggingface.co/papers/2207.07061). The last exit is the backbone's own output. Training the exits (per-exit
losses, distillation from the final exit or a teacher, a frozen backbone) is [`hf_kd.EarlyExitTrainer`]'s job;
generation that skips layers (`generate(early_exit=...)`) is in the sibling `early_exit_generation.py`.

This file imports only torch, transformers and its sibling configuration files, so a saved model loads with
`trust_remote_code=True` where hf_kd is not installed.
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_multi_exit_causal_lm import ExitAdapterType, MultiExitCausalLMConfig
from .early_exit_generation import (
    ExitThresholdFit,
    confident_generate,
    fit_exit_thresholds,
    self_speculative_generate,
)
from .modeling_multi_exit import _without_zero3_init


@dataclass
class MultiExitCausalLMOutputWithPast(ModelOutput):
    """Output of [`MultiExitForCausalLM.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            `sum_j w_j * CE_j` with `w = config.normalized_exit_loss_weights` and `CE_j` the mean next-token
            cross-entropy of exit `j` over the counted tokens (labels shifted by one, `-100` ignored); only the final
            exit's when `output_exit_logits=False`.
        logits (`torch.FloatTensor` of shape `(batch_size, kept_len, vocab_size)`):
            The final exit's logits: exactly the backbone's own (`kept_len` is `seq_len`, or `logits_to_keep`).
        exit_logits (`tuple(torch.FloatTensor)`, *optional*, one `(batch_size, kept_len, vocab_size)` per exit):
            Logits of every exit in the order of `config.exit_layers`; `exit_logits[-1]` is `logits`. `None` when
            `output_exit_logits=False`.
        past_key_values ([`~transformers.Cache`], *optional*):
            The backbone's KV cache (with `use_cache=True`), passed through.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The backbone's hidden states: embeddings, then the output of each decoder layer (the last one after the
            final norm, as transformers returns it), each `(batch_size, seq_len, hidden_size)`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    exit_logits: tuple[torch.FloatTensor, ...] | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class ExitAdapter(nn.Module):
    """A residual adapter on an exit's hidden state `h` `(..., hidden)`: `h + up(h)` (`"linear"`) or `h + up(down(h))`
    (`"low_rank"`). `up` is zero-initialised, so an untrained adapter is the identity."""

    def __init__(self, hidden_size: int, kind: str, rank: int):
        super().__init__()
        if kind == ExitAdapterType.LINEAR:
            self.down, self.up = None, nn.Linear(hidden_size, hidden_size, bias=False)
        else:
            self.down, self.up = nn.Linear(hidden_size, rank, bias=False), nn.Linear(rank, hidden_size, bias=False)
        # How MultiExitCausalLMPreTrainedModel._init_weights initialises each matrix (it sees the Linear modules).
        self.up._hf_kd_init = "zeros"
        if self.down is not None:
            self.down._hf_kd_init = "normal"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        features = hidden_states if self.down is None else self.down(hidden_states)
        return hidden_states + self.up(features)


def _decoder_parts(model: nn.Module) -> str | None:
    """`None` when `model` has the Llama-family layout (`model.layers`, `model.norm`, `lm_head`), else what is
    missing."""
    inner = getattr(model, "model", None)
    missing = []
    if not isinstance(getattr(inner, "layers", None), nn.ModuleList):
        missing.append("decoder layers at `model.layers`")
    if not isinstance(getattr(inner, "norm", None), nn.Module):
        missing.append("a final norm at `model.norm`")
    if not isinstance(getattr(model, "lm_head", None), nn.Module):
        missing.append("an LM head at `lm_head`")
    return ", ".join(missing) or None


class MultiExitCausalLMPreTrainedModel(PreTrainedModel):
    """Base class of [`MultiExitForCausalLM`]: config class, the adapters' init and the backbone prefix."""

    config_class = MultiExitCausalLMConfig
    base_model_prefix = "backbone"
    # Modules trained in full (and saved with a PEFT adapter) when a PEFT adapter goes on the backbone.
    _hf_kd_heads = ("exit_adapters",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module):
        """Adapters: `down` Normal(0, `config.initializer_range`), `up` zero (identity at start); other modules as
        transformers does (the backbone's weights are then loaded over them)."""
        # transformers.initialization skips tensors already loaded from a checkpoint (`_is_hf_initialized`).
        role = getattr(module, "_hf_kd_init", None)
        if role == "zeros":
            init.zeros_(module.weight)
        elif role == "normal":
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        else:
            super()._init_weights(module)


class MultiExitForCausalLM(MultiExitCausalLMPreTrainedModel):
    """A Llama-family causal LM with next-token exits after the decoder layers in `config.exit_layers`.

    Build it from a pretrained decoder with [`~MultiExitForCausalLM.from_backbone`]. The interface that generation
    code uses:

    - `model.backbone`: the wrapped `...ForCausalLM` (decoder layers at `backbone.model.layers`, final norm at
      `backbone.model.norm`, LM head at `backbone.lm_head`);
    - `model.config.exit_layers`: sorted 1-based layer numbers after which an exit sits, **the last layer included**;
    - [`~MultiExitForCausalLM.exit_logits_from_hidden`]: an exit's logits from the (pre-norm) output of its layer.

    `generate` is the backbone's own, or with `early_exit=` greedy decoding that skips layers: `"self_speculative"`
    (LayerSkip, lossless) or `"confident"` (CALM, with thresholds from
    [`~MultiExitForCausalLM.fit_exit_thresholds`]).

    Args:
        config ([`MultiExitCausalLMConfig`]): the backbone config and the exits.

    Example:

    ```python
    >>> from hf_kd.modeling import MultiExitForCausalLM
    >>> model = MultiExitForCausalLM.from_backbone("HuggingFaceTB/SmolLM2-135M-Instruct", exit_layers=[8, 15])
    >>> model.config.exit_layers
    [8, 15, 30]
    >>> out = model(**tokenizer("The capital of France is", return_tensors="pt"))
    >>> [logits.shape[-1] for logits in out.exit_logits]  # next-token logits after layers 8, 15 and 30
    [49152, 49152, 49152]
    ```
    """

    def __init__(self, config: MultiExitCausalLMConfig):
        super().__init__(config)
        if config.backbone_config is None:
            raise ValueError("MultiExitCausalLMConfig.backbone_config is required to build a MultiExitForCausalLM.")
        self.backbone = AutoModelForCausalLM.from_config(config.backbone_config)
        missing = _decoder_parts(self.backbone)
        if missing:
            raise ValueError(
                f"The backbone {type(self.backbone).__name__} lacks {missing}: MultiExitForCausalLM supports "
                "Llama-family decoders (Llama, Qwen2, Mistral, SmolLM2)."
            )
        # transformers renamed `past_key_values` to `cache` (5.x): forward passes the cache under the backbone's name.
        parameters = inspect.signature(self.backbone.model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        hidden_size = config.backbone_config.hidden_size
        # Keyed by exit layer; empty without adapters (a module either way, for PEFT's modules_to_save and the trainers).
        self.exit_adapters = nn.ModuleDict()
        if config.exit_adapter is not None:
            for layer in config.exit_layers[:-1]:  # the final exit stays the backbone's own output
                self.exit_adapters[str(layer)] = ExitAdapter(hidden_size, config.exit_adapter, config.exit_adapter_rank)
        self.post_init()

    @classmethod
    def from_backbone(
        cls,
        name_or_path_or_model,
        exit_layers: list[int] | None = None,
        exit_adapter: ExitAdapterType | str | None = None,
        backbone_kwargs: dict | None = None,
        **kwargs,
    ) -> MultiExitForCausalLM:
        """Put exits on a pretrained Llama-family causal LM.

        Args:
            name_or_path_or_model (`str`, `os.PathLike` or `PreTrainedModel`):
                A Hub id or local folder loaded with `AutoModelForCausalLM.from_pretrained`, or a loaded
                `...ForCausalLM` (its weights are copied: the given model is left as it is). It must have decoder
                layers at `model.layers`, a final norm at `model.norm` and an LM head at `lm_head` (Llama, Qwen2,
                Mistral, SmolLM2); anything else (an encoder, a base model without LM head) is an error.
            exit_layers (`list[int]`, *optional*, defaults to every layer):
                1-based layers after which an exit sits; the last layer is always added.
            exit_adapter (`str`, *optional*): `None`, `"linear"` or `"low_rank"`, see [`MultiExitCausalLMConfig`].
            backbone_kwargs (`dict`, *optional*):
                Keyword arguments of `AutoModelForCausalLM.from_pretrained` (`revision`, `dtype`, ...).
            kwargs:
                Other [`MultiExitCausalLMConfig`] arguments (`exit_adapter_rank`, `exit_loss_weights`).

        Returns:
            [`MultiExitForCausalLM`] in training mode with the backbone's weights and dtype; the adapters (if any)
            are the identity.
        """
        if isinstance(name_or_path_or_model, (str, os.PathLike)):
            with _without_zero3_init():
                try:
                    backbone = AutoModelForCausalLM.from_pretrained(name_or_path_or_model, **(backbone_kwargs or {}))
                except ValueError as err:  # e.g. "Unrecognized configuration class ... for AutoModelForCausalLM"
                    raise ValueError(
                        f"{name_or_path_or_model!r} does not load as a causal LM ({err}): MultiExitForCausalLM needs a "
                        "Llama-family decoder (Llama, Qwen2, Mistral, SmolLM2)."
                    ) from err
        elif isinstance(name_or_path_or_model, PreTrainedModel):
            backbone = name_or_path_or_model
        else:
            raise TypeError(
                f"from_backbone expects a Hub id, a local path or a PreTrainedModel, got {type(name_or_path_or_model)}."
            )
        missing = _decoder_parts(backbone)
        if missing:
            raise ValueError(
                f"The backbone {type(backbone).__name__} lacks {missing}: MultiExitForCausalLM needs a Llama-family "
                "decoder-only causal LM (Llama, Qwen2, Mistral, SmolLM2), not an encoder or a model without LM head."
            )
        config = MultiExitCausalLMConfig(
            backbone_config=backbone.config.to_dict(), exit_layers=exit_layers, exit_adapter=exit_adapter, **kwargs
        )
        with _without_zero3_init():
            model = cls(config)
        model.backbone.load_state_dict(backbone.state_dict())
        if getattr(backbone, "generation_config", None) is not None:  # its generation defaults (EOS, sampling)
            model.backbone.generation_config = copy.deepcopy(backbone.generation_config)
        return model.to(dtype=next(backbone.parameters()).dtype)

    def generate(
        self,
        *args,
        early_exit: str | None = None,
        exit_layer: int | None = None,
        num_draft_tokens: int = 4,
        thresholds: dict[int, float] | None = None,
        temperatures: dict[int, float] | None = None,
        **kwargs,
    ):
        """
        Generate text. Without `early_exit` this is the backbone's own `generate` (every token runs every layer, all
        of transformers' options). With it, greedy decoding that skips layers:

        - `"self_speculative"`: [`self_speculative_generate`] (LayerSkip): layers `1..exit_layer` draft
          `num_draft_tokens` tokens that the remaining layers verify; the output is exactly greedy decoding's.
        - `"confident"`: [`confident_generate`] (CALM): each token leaves at the first exit whose confidence clears
          its threshold (`thresholds`, else `config.exit_thresholds`), the skipped layers' KV computed later.

        Args:
            args, kwargs: for the backbone's `generate`; with `early_exit`, only `input_ids` (first positional or
                keyword), `attention_mask` (left padding), `max_new_tokens`, `eos_token_id`, `pad_token_id` and
                `do_sample=False`.
            early_exit (`str`, *optional*): `None`, `"self_speculative"` or `"confident"`.
            exit_layer (`int`, *optional*): the draft exit of `"self_speculative"` (an early exit of the model).
            num_draft_tokens (`int`, *optional*, defaults to `4`): tokens drafted per cycle by `"self_speculative"`.
            thresholds (`dict[int, float]`, *optional*), temperatures (`dict[int, float]`, *optional*):
                per-exit confidence thresholds and temperatures of `"confident"` (default: the config's).

        Returns:
            The backbone's `generate` output, or [`EarlyExitGenerateOutput`] with `early_exit`.
        """
        if early_exit is None:
            return self.backbone.generate(*args, **kwargs)
        methods = {"self_speculative": self_speculative_generate, "confident": confident_generate}
        if early_exit not in methods:
            raise ValueError(f"early_exit must be None or one of {sorted(methods)}, got {early_exit!r}.")
        if kwargs.pop("do_sample", False):
            raise ValueError(
                f"early_exit={early_exit!r} decodes greedily only: drop do_sample=True (sampling is available without "
                "early_exit, through the backbone's generate)."
            )
        if args:
            if "input_ids" in kwargs or len(args) > 1:
                raise ValueError("With early_exit pass input_ids once, as the only positional argument.")
            kwargs["input_ids"] = args[0]
        accepted = {"input_ids", "attention_mask", "max_new_tokens", "eos_token_id", "pad_token_id"}
        unsupported = sorted(set(kwargs) - accepted)
        if unsupported:
            raise ValueError(
                f"generate(early_exit={early_exit!r}) does not support {unsupported}; it accepts {sorted(accepted)} "
                "(greedy decoding)."
            )
        if "input_ids" not in kwargs:
            raise ValueError("generate(early_exit=...) needs input_ids.")
        kwargs.setdefault("max_new_tokens", self.generation_config.max_new_tokens or 20)
        if early_exit == "self_speculative":
            if exit_layer is None:
                raise ValueError(
                    f"early_exit='self_speculative' needs exit_layer, one of the early exits {self.config.exit_layers[:-1]}."
                )
            return self_speculative_generate(self, exit_layer=exit_layer, num_draft_tokens=num_draft_tokens, **kwargs)
        return confident_generate(self, thresholds=thresholds, temperatures=temperatures, **kwargs)

    def fit_exit_thresholds(self, texts_or_input_ids, epsilon: float, delta: float, **kwargs) -> ExitThresholdFit:
        """
        Fit per-exit confidence thresholds with [`fit_exit_thresholds`] (Learn-then-Test: with probability at least
        `1 - delta`, each early exit's rate of tokens leaving there with another prediction than the final exit is at
        most `epsilon`) and store them as `config.exit_thresholds` (and the temperatures used as
        `config.exit_temperatures`), which `save_pretrained` keeps and `generate(early_exit="confident")` reads.

        Args:
            texts_or_input_ids, epsilon, delta, kwargs: see [`fit_exit_thresholds`] (`tokenizer` for texts).

        Returns:
            [`ExitThresholdFit`].
        """
        fit = fit_exit_thresholds(self, texts_or_input_ids, epsilon, delta, **kwargs)
        self.config.exit_thresholds = {str(layer): value for layer, value in fit.thresholds.items()}
        self.config.exit_temperatures = (
            None if fit.temperatures is None else {str(layer): value for layer, value in fit.temperatures.items()}
        )
        return fit

    @classmethod
    def can_generate(cls) -> bool:
        """`True`: `generate` is the backbone's (so transformers' `pipeline("text-generation")` accepts the model)."""
        return True

    @property
    def generation_config(self):
        """The backbone's generation config (its EOS, BOS and pad tokens, its defaults): `generate` is its own."""
        backbone = self._modules.get("backbone")
        return None if backbone is None else backbone.generation_config

    @generation_config.setter
    def generation_config(self, value):
        # PreTrainedModel.__init__ sets one from the wrapper's config before the backbone exists: the backbone keeps
        # its own (built from the backbone config, or loaded with the weights).
        backbone = self._modules.get("backbone")
        if backbone is not None and value is not None:
            backbone.generation_config = value

    def _check_exit_layer(self, exit_layer) -> None:
        if exit_layer not in self.config.exit_layers:
            raise ValueError(
                f"exit_layer={exit_layer!r} is not an exit of this model: exit_layers={self.config.exit_layers}."
            )

    def exit_logits_from_hidden(self, hidden_states: torch.Tensor, exit_layer: int) -> torch.Tensor:
        """The next-token logits of the exit after layer `exit_layer`.

        Args:
            hidden_states (`torch.Tensor` of shape `(..., hidden_size)`):
                The raw output of decoder layer `exit_layer` (before the final norm).
            exit_layer (`int`): one of `config.exit_layers` (1-based).

        Returns:
            `torch.Tensor` of shape `(..., vocab_size)`: `lm_head(norm(adapter(h)))`, with the exit's adapter when the
            model has adapters and `exit_layer` is not the last layer. For the last layer this is the backbone's own
            computation.
        """
        self._check_exit_layer(exit_layer)
        if str(exit_layer) in self.exit_adapters:
            hidden_states = self.exit_adapters[str(exit_layer)](hidden_states)
        return self.backbone.lm_head(self.backbone.model.norm(hidden_states))

    def _forward_up_to(self, last_layer, input_ids, attention_mask, position_ids, inputs_embeds, labels, use_cache,
                       past_key_values, logits_to_keep, output_exit_logits, output_hidden_states, kwargs):
        """`forward(last_layer=...)`: the backbone's own forward (its mask, position and rotary code) with its layer
        list cut after `last_layer` and its final norm made the identity for the call, the raw outputs of the exit
        layers read by forward hooks of ours. (Not `output_hidden_states`: transformers installs its recording hooks
        once, on the layers present at the first call, which would then be the cut list.)"""
        self._check_exit_layer(last_layer)
        depth = self.config.backbone_config.num_hidden_layers
        if last_layer == depth:
            raise ValueError(f"last_layer={last_layer} is the last layer: call the model without last_layer.")
        for name, value in (("labels", labels), ("past_key_values", past_key_values)):
            if value is not None:
                raise ValueError(f"last_layer={last_layer} computes the early exits only: {name} is not supported.")
        if use_cache or not output_exit_logits or output_hidden_states:
            raise ValueError(
                f"last_layer={last_layer} needs use_cache=False, output_exit_logits=True and no output_hidden_states."
            )
        decoder = self.backbone.model
        layers, norm = decoder.layers, decoder.norm
        exit_layers = [layer for layer in self.config.exit_layers if layer <= last_layer]
        raw = {}

        def keep_output(layer):
            def hook(module, args, output):
                raw[layer] = output[0] if isinstance(output, tuple) else output

            return hook

        handles = [layers[layer - 1].register_forward_hook(keep_output(layer)) for layer in exit_layers]
        decoder.layers, decoder.norm = nn.ModuleList(list(layers)[:last_layer]), nn.Identity()
        try:
            decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    inputs_embeds=inputs_embeds, use_cache=False, output_hidden_states=False, output_attentions=False,
                    return_dict=True, **kwargs)
        finally:
            decoder.layers, decoder.norm = layers, norm
            for handle in handles:
                handle.remove()
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        exit_logits = tuple(self.exit_logits_from_hidden(raw[layer][:, keep], layer) for layer in exit_layers)
        return MultiExitCausalLMOutputWithPast(logits=exit_logits[-1], exit_logits=exit_logits)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_exit_logits: bool = True,
        output_hidden_states: bool | None = None,
        last_layer: int | None = None,
        **kwargs,
    ) -> MultiExitCausalLMOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): token ids.
            attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*): 1 for tokens, 0 for padding.
            position_ids, inputs_embeds, use_cache: passed to the backbone.
            past_key_values ([`~transformers.Cache`], *optional*): the backbone's KV cache, passed through.
            labels (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
                The input ids as labels (**not** shifted: position `t` predicts `labels[:, t + 1]`), `-100` for
                tokens that do not count (prompt, padding). With labels the loss is the weighted sum of the exits'
                mean next-token cross-entropies, weights `config.normalized_exit_loss_weights`.
            logits_to_keep (`int`, *optional*, defaults to `0`):
                Compute the logits of the last `logits_to_keep` positions only (`0`: all), for every exit.
            output_exit_logits (`bool`, *optional*, defaults to `True`):
                Compute every exit's logits. `False` runs the backbone alone (no hidden states kept, no extra LM-head
                products: each exit's full-vocabulary logits cost one LM-head matmul) and returns `exit_logits=None`.
            output_hidden_states (`bool`, *optional*, defaults to `config.output_hidden_states`):
                Also return the backbone's hidden states.
            last_layer (`int`, *optional*):
                An early exit's layer: run decoder layers `1..last_layer` only. `exit_logits` then holds the exits up
                to it and `logits` is that exit's (the final layers, norm and logits are never computed). For
                training the early exits of a frozen backbone whose final exit has nothing to learn; not with
                `labels`, a cache, `output_hidden_states` or `output_exit_logits=False`.

        Returns:
            [`MultiExitCausalLMOutputWithPast`] (or a tuple when `return_dict=False`).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        kwargs[self._cache_argument] = past_key_values
        if last_layer is not None:
            return self._forward_up_to(last_layer, input_ids, attention_mask, position_ids, inputs_embeds, labels,
                                       use_cache, past_key_values, logits_to_keep, output_exit_logits,
                                       output_hidden_states, kwargs)
        outputs = self.backbone.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_exit_logits or output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        # Slicing before the head: with logits_to_keep only the kept positions pay for the vocabulary projection.
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.backbone.lm_head(outputs.last_hidden_state[:, keep])  # the backbone's own final logits
        exit_logits = None
        if output_exit_logits:
            depth = self.config.backbone_config.num_hidden_layers
            hidden_states = outputs.hidden_states
            if hidden_states is None or len(hidden_states) != depth + 1:
                got = "none" if hidden_states is None else len(hidden_states)
                raise ValueError(
                    f"The backbone ({type(self.backbone).__name__}) must return embeddings + {depth} layer outputs "
                    f"with output_hidden_states=True, got {got}."
                )
            # hidden_states[l] is the raw output of layer l (l < depth); the last entry is already normed, so the
            # final exit is `logits` itself.
            exit_logits = tuple(
                self.exit_logits_from_hidden(hidden_states[layer][:, keep], layer)
                for layer in self.config.exit_layers[:-1]
            ) + (logits,)

        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need the logits of every position: use logits_to_keep=0 with labels.")
            shifted = labels[:, 1:].to(logits.device).reshape(-1)
            per_exit = exit_logits if exit_logits is not None else (logits,)
            weights = self.config.normalized_exit_loss_weights if exit_logits is not None else [1.0]
            loss = sum(
                w * F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]).float(), shifted, ignore_index=-100)
                for w, z in zip(weights, per_exit)
            )
        return MultiExitCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            exit_logits=exit_logits,
            past_key_values=getattr(outputs, self._cache_argument, None),
            hidden_states=outputs.hidden_states if output_hidden_states else None,
        )


__all__ = [
    "ExitAdapter",
    "MultiExitCausalLMOutputWithPast",
    "MultiExitCausalLMPreTrainedModel",
    "MultiExitForCausalLM",
]
