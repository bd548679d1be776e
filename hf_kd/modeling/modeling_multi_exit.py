"""Multi-exit (early-exit) sequence classifier on top of any transformers encoder.

One classification head ("exit") sits after each layer listed in `config.exit_layers`. Training (`forward` with
labels) minimises a weighted sum of the per-exit cross-entropies, as in DeeBERT (Xin et al., 2020,
https://huggingface.co/papers/2004.12993) and PABEE (Zhou et al., 2020, https://huggingface.co/papers/2006.04152).
[`MultiExitForSequenceClassification.predict_with_exits`] really exits: it runs the layers one at a time and drops the
rows that have exited, so later layers run on fewer rows. Confidence-based exits are overconfident out of the box;
Meronen et al. (2024, https://huggingface.co/papers/2302.06359) calibrate each exit (last-layer Laplace, model-internal
ensembling) before thresholding.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_multi_exit import MultiExitConfig

try:  # transformers >= 4.53
    from transformers.masking_utils import create_bidirectional_mask
except ImportError:  # pragma: no cover - older transformers
    create_bidirectional_mask = None

# Backbones whose layers `predict_with_exits` can run one at a time (`config.model_type` -> layout). MiniLM checkpoints
# are `bert`.
_STEPWISE_BERT_LIKE = ("bert",)
_STEPWISE_MPNET = ("mpnet",)


class ExitPolicy(str, Enum):
    """When an example leaves at an exit during [`MultiExitForSequenceClassification.predict_with_exits`].

    Whatever the policy, every example still in the batch leaves at the final exit.
    """

    MAX_PROB = "max_prob"
    """Exit when the exit's largest softmax probability is `>= threshold` (`threshold` in [0, 1]); the confidence
    criterion of the budgeted MSDNet evaluation used by Meronen et al. (2024)."""
    ENTROPY = "entropy"
    """Exit when the entropy (nats) of the exit's softmax is `< threshold` (`threshold >= 0`), as DeeBERT
    (Xin et al., 2020)."""
    PATIENCE = "patience"
    """PABEE (Zhou et al., 2020): a counter starts at 0 at the first exit; at each later exit it is incremented if
    the argmax equals the previous exit's argmax and reset to 0 otherwise; exit when it reaches `patience` (an int
    >= 1), i.e. after `patience` consecutive unchanged predictions (`patience + 1` agreeing exits)."""


@dataclass
class MultiExitSequenceClassifierOutput(ModelOutput):
    """Output of [`MultiExitForSequenceClassification.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            Weighted sum of the per-exit cross-entropies, weights `config.normalized_exit_loss_weights` (sum 1).
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Logits of the final exit (after the last layer).
        exit_logits (`tuple(torch.FloatTensor)`, one of shape `(batch_size, num_labels)` per exit):
            Logits of every exit, in the order of `config.exit_layers`; `exit_logits[-1]` is `logits`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The backbone's hidden states, embeddings then one per layer, each `(batch_size, seq_len, hidden_size)`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    exit_logits: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class EarlyExitPrediction(ModelOutput):
    """Output of [`MultiExitForSequenceClassification.predict_with_exits`].

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Each example's logits at the exit where it left.
        exit_layer (`torch.LongTensor` of shape `(batch_size,)`):
            1-based index of the layer after which each example left.
        exit_index (`torch.LongTensor` of shape `(batch_size,)`):
            0-based index of that exit in `config.exit_layers`.
        layers_run (`int`):
            Layer-rows computed: the sum over examples of the number of layers each ran (`batch_size * num_layers`
            without early exits).
        flops (`float`):
            Estimated forward FLOPs (multiply-adds count 2) of the layers and exit heads actually run. Per layer and
            per token: `8 h^2 + 4 h I + 4 L h` (Q, K, V, output projections; the two feed-forward matmuls with
            intermediate size `I`; the `QK^T` and attention-times-V products over the padded length `L`), i.e.
            `24 h^2 + 4 L h` for BERT-like layers with `I = 4 h`. Each evaluated exit head adds `2 h K` per row
            (`2 h^2 + 2 h K` for the `"pooler"` head). Embeddings, layer norms, softmax and activations are ignored.
        full_flops (`float`):
            The same estimate for running every layer on every row with the final head only (the static model), so
            `flops / full_flops` is the relative cost.
    """

    logits: torch.FloatTensor | None = None
    exit_layer: torch.LongTensor | None = None
    exit_index: torch.LongTensor | None = None
    layers_run: int | None = None
    flops: float | None = None
    full_flops: float | None = None


class MultiExitHead(nn.Module):
    """One exit: reads the first-token ([CLS]) hidden state of its layer.

    `"linear"`: `classifier(dropout(h[:, 0]))`; `"pooler"`: `classifier(dropout(tanh(dense(h[:, 0]))))`.
    """

    def __init__(self, config: MultiExitConfig):
        super().__init__()
        hidden_size = config.backbone_config.hidden_size
        self.dense = nn.Linear(hidden_size, hidden_size) if config.exit_head_type == "pooler" else None
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(hidden_size, config.num_labels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        pooled = hidden_states[:, 0]  # (bs, hidden)
        if self.dense is not None:
            pooled = torch.tanh(self.dense(pooled))
        return self.classifier(self.dropout(pooled))  # (bs, num_labels)


class MultiExitPreTrainedModel(PreTrainedModel):
    """Base class of the multi-exit models: config class, weight init and the backbone prefix."""

    config_class = MultiExitConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module):
        """Normal(0, `config.initializer_range`) linear weights, zero biases (the backbone keeps its own init)."""
        super()._init_weights(module)


class MultiExitForSequenceClassification(MultiExitPreTrainedModel):
    """An encoder backbone with a classification head after each layer in `config.exit_layers`.

    Build it from a pretrained encoder with [`~MultiExitForSequenceClassification.from_backbone`], train it with
    `forward(..., labels=...)` (weighted multi-exit cross-entropy) and run adaptive inference with
    [`~MultiExitForSequenceClassification.predict_with_exits`].

    Args:
        config ([`MultiExitConfig`]): the backbone config and the exits.

    Example:

    ```python
    >>> from hf_kd.modeling import MultiExitForSequenceClassification
    >>> model = MultiExitForSequenceClassification.from_backbone(
    ...     "sentence-transformers/all-MiniLM-L6-v2", exit_layers=[2, 4], num_labels=3
    ... )
    >>> model.config.exit_layers
    [2, 4, 6]
    ```
    """

    def __init__(self, config: MultiExitConfig):
        super().__init__(config)
        if config.backbone_config is None:
            raise ValueError(
                "MultiExitConfig.backbone_config is required to build a MultiExitForSequenceClassification."
            )
        self.num_labels = config.num_labels
        try:  # the pooler is not used by the exits: leave it out when the backbone allows it (no unused parameters)
            self.backbone = AutoModel.from_config(config.backbone_config, add_pooling_layer=False)
        except TypeError:
            self.backbone = AutoModel.from_config(config.backbone_config)
        self.exits = nn.ModuleList([MultiExitHead(config) for _ in config.exit_layers])
        self.post_init()

    @classmethod
    def from_backbone(
        cls,
        name_or_path_or_model,
        exit_layers: list[int] | None = None,
        num_labels: int = 2,
        backbone_kwargs: dict | None = None,
        **kwargs,
    ) -> MultiExitForSequenceClassification:
        """Put exits on a pretrained encoder; the exit heads are freshly initialised.

        Args:
            name_or_path_or_model (`str`, `os.PathLike` or `PreTrainedModel`):
                A Hub id or local folder loaded with `AutoModel.from_pretrained`, or a loaded model: a base encoder
                (e.g. `BertModel`) or a model with a head (e.g. `BertForSequenceClassification`), of which only the
                base model (`model.base_model`) is kept. The backbone must have `config.num_hidden_layers` and return
                one hidden state per layer.
            exit_layers (`list[int]`, *optional*, defaults to every layer):
                1-based layers after which an exit sits; the last layer is always added.
            num_labels (`int`, *optional*, defaults to 2): number of classes.
            backbone_kwargs (`dict`, *optional*):
                Keyword arguments of `AutoModel.from_pretrained` (`revision`, `cache_dir`, `local_files_only`, ...).
            kwargs:
                Other [`MultiExitConfig`] arguments (`classifier_dropout`, `exit_head_type`, `exit_loss_weights`,
                `id2label`, ...).

        Returns:
            [`MultiExitForSequenceClassification`] in training mode, with the backbone's weights and dtype.
        """
        if isinstance(name_or_path_or_model, (str, os.PathLike)):
            backbone = AutoModel.from_pretrained(name_or_path_or_model, **(backbone_kwargs or {}))
        elif isinstance(name_or_path_or_model, PreTrainedModel):
            backbone = name_or_path_or_model.base_model
        else:
            raise TypeError(
                f"from_backbone expects a Hub id, a local path or a PreTrainedModel, got {type(name_or_path_or_model)}."
            )
        backbone_config = backbone.config
        if getattr(backbone_config, "num_hidden_layers", None) is None:
            raise ValueError(
                f"The backbone ({type(backbone).__name__}) config has no `num_hidden_layers`: a multi-exit model needs "
                "an encoder with a stack of layers that returns one hidden state per layer."
            )
        config = MultiExitConfig(
            backbone_config=backbone_config.to_dict(), exit_layers=exit_layers, num_labels=num_labels, **kwargs
        )
        model = cls(config)
        state = backbone.state_dict()
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith("pooler.")]
        if missing or unexpected:
            raise ValueError(
                f"Could not copy the backbone weights into the multi-exit model: missing {missing}, "
                f"unexpected {unexpected}."
            )
        return model.to(dtype=next(backbone.parameters()).dtype)

    def _backbone_hidden_states(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds):
        inputs = {"attention_mask": attention_mask, "output_hidden_states": True, "return_dict": True}
        if input_ids is not None:
            inputs["input_ids"] = input_ids
        if inputs_embeds is not None:
            inputs["inputs_embeds"] = inputs_embeds
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        outputs = self.backbone(**inputs)
        hidden_states = getattr(outputs, "hidden_states", None)
        depth = self.config.backbone_config.num_hidden_layers
        if hidden_states is None or len(hidden_states) != depth + 1:
            got = "none" if hidden_states is None else len(hidden_states)
            raise ValueError(
                f"The backbone ({type(self.backbone).__name__}) must return its hidden states with "
                f"output_hidden_states=True (embeddings + {depth} layers = {depth + 1}), got {got}."
            )
        return hidden_states

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MultiExitSequenceClassifierOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): token ids.
            attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*): 1 for tokens, 0 for padding.
            token_type_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*): segment ids (BERT).
            position_ids, inputs_embeds: passed to the backbone.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices in `[0, num_labels)`. When given, the loss is
                `sum_j w_j * CE(exit_logits[j], labels)` with `w = config.normalized_exit_loss_weights` (uniform
                `1 / num_exits` by default; they sum to 1).
            output_hidden_states (`bool`, *optional*, defaults to `config.output_hidden_states`):
                Also return the backbone's hidden states.

        Returns:
            [`MultiExitSequenceClassifierOutput`] (or a tuple `(loss?, logits, exit_logits, hidden_states?)` when
            `return_dict=False`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        hidden_states = self._backbone_hidden_states(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds
        )
        exit_logits = tuple(
            head(hidden_states[layer]) for head, layer in zip(self.exits, self.config.exit_layers)
        )  # num_exits x (bs, num_labels)
        logits = exit_logits[-1]

        loss = None
        if labels is not None:
            if self.config.problem_type not in (None, "single_label_classification"):
                raise ValueError(
                    f"MultiExitForSequenceClassification trains with cross-entropy only, got "
                    f"problem_type={self.config.problem_type!r}."
                )
            labels = labels.to(logits.device).view(-1)
            weights = self.config.normalized_exit_loss_weights
            loss = sum(w * F.cross_entropy(z.view(-1, self.num_labels), labels) for w, z in zip(weights, exit_logits))

        hidden_states = hidden_states if output_hidden_states else None
        if not return_dict:
            output = (logits, exit_logits) + ((hidden_states,) if hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return MultiExitSequenceClassifierOutput(
            loss=loss, logits=logits, exit_logits=exit_logits, hidden_states=hidden_states
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Adaptive inference
    # ----------------------------------------------------------------------------------------------------------------

    def _stepwise_layout(self) -> str:
        model_type = getattr(self.config.backbone_config, "model_type", None)
        encoder = getattr(self.backbone, "encoder", None)
        has_layers = hasattr(self.backbone, "embeddings") and isinstance(
            getattr(encoder, "layer", None), nn.ModuleList
        )
        if model_type in _STEPWISE_BERT_LIKE and has_layers:
            if getattr(self.config.backbone_config, "is_decoder", False):
                raise NotImplementedError(
                    "predict_with_exits needs a bidirectional encoder; the backbone is a decoder."
                )
            return "bert"
        if model_type in _STEPWISE_MPNET and has_layers and hasattr(encoder, "compute_position_bias"):
            return "mpnet"
        raise NotImplementedError(
            f"predict_with_exits runs the backbone layer by layer and supports BERT-like (BERT, MiniLM) and MPNet "
            f"backbones; got model_type={model_type!r} ({type(self.backbone).__name__}). Use forward() for the "
            "logits of every exit."
        )

    def _flops_per_token_layer(self, seq_len: int) -> float:
        cfg = self.config.backbone_config
        h = cfg.hidden_size
        inter = getattr(cfg, "intermediate_size", None) or 4 * h
        return 8.0 * h * h + 4.0 * h * inter + 4.0 * seq_len * h

    def _flops_head(self) -> float:
        h = self.config.backbone_config.hidden_size
        return 2.0 * h * self.num_labels + (2.0 * h * h if self.config.exit_head_type == "pooler" else 0.0)

    def _exit_mask(self, mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
        if create_bidirectional_mask is None:  # pragma: no cover - transformers < 4.53
            return self.backbone.get_extended_attention_mask(mask, hidden.shape[:2])
        return create_bidirectional_mask(config=self.backbone.config, inputs_embeds=hidden, attention_mask=mask)

    @torch.no_grad()
    def predict_with_exits(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        policy: ExitPolicy | str = ExitPolicy.MAX_PROB,
        threshold: float | None = None,
        patience: int | None = None,
    ) -> EarlyExitPrediction:
        r"""Adaptive inference: run the layers one at a time and let each example leave at its first confident exit.

        The backbone's embeddings run first, then layer 1, 2, ... on the rows still in the batch; after an exit layer
        its head is evaluated, the rows that satisfy `policy` are recorded and removed, so later layers run on fewer
        rows. Rows left at the final exit all leave there. Up to floating-point noise, each row's logits equal
        `forward(...).exit_logits[j]` at the exit `j` where it left. Runs without gradients; call `model.eval()`
        first (dropout is not switched off here). Supports BERT-like (BERT, MiniLM) and MPNet backbones.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): token ids.
            attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*, defaults to all ones):
                1 for tokens, 0 for padding.
            token_type_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
                Segment ids (BERT-like only; ignored by MPNet).
            policy ([`ExitPolicy`] or `str`, *optional*, defaults to `"max_prob"`):
                `"max_prob"` (exit when max softmax prob `>= threshold`, the MSDNet-style confidence of Meronen et al.),
                `"entropy"` (exit when entropy `< threshold`, DeeBERT) or `"patience"` (PABEE).
            threshold (`float`): required for `"max_prob"` (in [0, 1]) and `"entropy"` (>= 0, in nats).
            patience (`int`): required for `"patience"`, >= 1.

        Returns:
            [`EarlyExitPrediction`] with `logits` `(batch_size, num_labels)`, `exit_layer` and `exit_index`
            `(batch_size,)`, `layers_run`, `flops` and `full_flops` (see [`EarlyExitPrediction`] for the FLOPs formula).
        """
        policy = ExitPolicy(policy)
        if policy is ExitPolicy.PATIENCE:
            if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
                raise ValueError(f"policy='patience' needs an integer patience >= 1, got {patience!r}.")
        else:
            if threshold is None or isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
                raise ValueError(f"policy={policy.value!r} needs a numeric threshold, got {threshold!r}.")
            if not math.isfinite(threshold):
                raise ValueError(f"threshold must be finite, got {threshold}.")
            if policy is ExitPolicy.MAX_PROB and not 0.0 <= threshold <= 1.0:
                raise ValueError(f"policy='max_prob' needs a threshold in [0, 1], got {threshold}.")
            if policy is ExitPolicy.ENTROPY and threshold < 0:
                raise ValueError(f"policy='entropy' needs a threshold >= 0 (nats), got {threshold}.")

        layout = self._stepwise_layout()
        backbone = self.backbone
        batch_size, seq_len = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if layout == "bert":
            hidden = backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # (bs, L, h)
            position_bias = None
        else:
            hidden = backbone.embeddings(input_ids=input_ids)  # (bs, L, h)
            position_bias = backbone.encoder.compute_position_bias(hidden)  # (bs, heads, L, L)

        exit_of_layer = {layer: j for j, layer in enumerate(self.config.exit_layers)}
        last_exit = len(self.config.exit_layers) - 1
        logits_out = hidden.new_zeros(batch_size, self.num_labels)
        exit_layer = torch.zeros(batch_size, dtype=torch.long, device=device)
        exit_index = torch.zeros(batch_size, dtype=torch.long, device=device)
        rows = torch.arange(batch_size, device=device)  # original indices of the rows still running
        mask = attention_mask
        previous = None  # PABEE: argmax at the previous exit, (n,)
        counter = torch.zeros(batch_size, dtype=torch.long, device=device)
        layers_run, flops = 0, 0.0
        per_row_layer = seq_len * self._flops_per_token_layer(seq_len)

        for i, layer_module in enumerate(backbone.encoder.layer):
            extended_mask = self._exit_mask(mask, hidden)
            if layout == "bert":
                out = layer_module(hidden, extended_mask)
            else:
                out = layer_module(hidden, extended_mask, position_bias)
            hidden = out[0] if isinstance(out, tuple) else out
            n = hidden.shape[0]
            layers_run += n
            flops += n * per_row_layer
            j = exit_of_layer.get(i + 1)
            if j is None:
                continue
            logits = self.exits[j](hidden)  # (n, K)
            flops += n * self._flops_head()
            if j == last_exit:
                done = torch.ones(n, dtype=torch.bool, device=device)
            elif policy is ExitPolicy.MAX_PROB:
                done = logits.softmax(-1).max(-1).values >= threshold
            elif policy is ExitPolicy.ENTROPY:
                log_p = logits.log_softmax(-1)
                done = -(log_p.exp() * log_p).sum(-1) < threshold
            else:
                prediction = logits.argmax(-1)
                if previous is not None:
                    counter = torch.where(prediction == previous, counter + 1, torch.zeros_like(counter))
                previous = prediction
                done = counter >= patience
            finished = rows[done]
            logits_out[finished] = logits[done].to(logits_out.dtype)
            exit_layer[finished] = i + 1
            exit_index[finished] = j
            keep = ~done
            if not keep.any():
                break
            rows, hidden, mask = rows[keep], hidden[keep], mask[keep]
            counter = counter[keep]
            if previous is not None:
                previous = previous[keep]
            if position_bias is not None:
                position_bias = position_bias[keep]

        depth = len(backbone.encoder.layer)
        full_flops = batch_size * (depth * per_row_layer + self._flops_head())
        return EarlyExitPrediction(
            logits=logits_out,
            exit_layer=exit_layer,
            exit_index=exit_index,
            layers_run=layers_run,
            flops=flops,
            full_flops=full_flops,
        )


__all__ = [
    "EarlyExitPrediction",
    "ExitPolicy",
    "MultiExitForSequenceClassification",
    "MultiExitPreTrainedModel",
    "MultiExitSequenceClassifierOutput",
]
