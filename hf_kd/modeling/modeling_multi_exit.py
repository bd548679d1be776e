"""Multi-exit (early-exit) sequence classifier on top of any transformers encoder.

One classification head ("exit") sits after each layer listed in `config.exit_layers`. Training (`forward` with
labels) minimises a weighted sum of the per-exit cross-entropies, as in DeeBERT (Xin et al., 2020,
https://huggingface.co/papers/2004.12993) and PABEE (Zhou et al., 2020, https://huggingface.co/papers/2006.04152).
[`MultiExitForSequenceClassification.predict_with_exits`] really exits: it runs the layers one at a time and drops the
rows that have exited, so later layers run on fewer rows (and, with right padding, on shorter sequences).
Confidence-based exits are overconfident out of the box; Meronen et al. (2024,
https://huggingface.co/papers/2302.06359) calibrate each exit and ensemble the exits run so far (model-internal
ensembling, `mie=True`) before thresholding, and evaluate with per-exit budget thresholds (`policy="budget"`, fitted
by `hf_kd.early_exit`).

The exit policies, their per-exit decision and the MIE kernel are in `exit_policies.py`, shared with the image model
(`modeling_multi_exit_cnn.py`), the exit Laplace and `hf_kd.early_exit`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_multi_exit import ExitHeadType, ExitPooling, MultiExitConfig
from .exit_laplace import ExitLaplaceMixin, LinkApprox, capture_exit_features
from .exit_policies import EarlyExitPrediction, ExitPolicy, _EarlyExitRun

# Backbones whose layers `predict_with_exits` can run one at a time (`config.model_type` -> layout). MiniLM checkpoints
# are `bert`.
_STEPWISE_BERT_LIKE = ("bert",)
_STEPWISE_MPNET = ("mpnet",)


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


@contextlib.contextmanager
def _without_zero3_init():
    """Build models whole even in a DeepSpeed ZeRO-3 run (transformers otherwise builds them into shards with
    `zero.Init`, and a shard cannot be copied into another model). DeepSpeed shards the result when training starts.
    `hf_kd.distributed.zero3_init(None)` does the same; it is not imported here because a modeling file must load with
    `trust_remote_code` without hf_kd."""
    import transformers.integrations.deepspeed as hf_deepspeed

    previous = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = previous


class MultiExitHead(nn.Module):
    """One exit: pools its layer's hidden states (`config.exit_pooling`: masked mean or [CLS]) into `u`, then
    `"linear"`: `classifier(dropout(u))`; `"pooler"`: `classifier(dropout(tanh(dense(u))))`.
    """

    def __init__(self, config: MultiExitConfig):
        super().__init__()
        hidden_size = config.backbone_config.hidden_size
        self.dense = nn.Linear(hidden_size, hidden_size) if config.exit_head_type == ExitHeadType.POOLER else None
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(hidden_size, config.num_labels)
        self.pooling = config.exit_pooling

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`hidden_states` `(bs, seq_len, hidden)`, `attention_mask` `(bs, seq_len)` (1 = token) -> `(bs, K)`."""
        return self.classifier(self.features(hidden_states, attention_mask))  # (bs, num_labels)

    def features(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The input of `classifier` `(bs, hidden)`: what the per-exit Laplace approximation is fitted on."""
        if self.pooling == ExitPooling.CLS:
            pooled = hidden_states[:, 0]  # (bs, hidden)
        elif attention_mask is None:
            pooled = hidden_states.mean(1)
        else:
            weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)  # (bs, seq_len, 1)
            pooled = (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        if self.dense is not None:
            pooled = torch.tanh(self.dense(pooled))
        return self.dropout(pooled)


class MultiExitPreTrainedModel(ExitLaplaceMixin, PreTrainedModel):
    """Base class of the multi-exit sequence models: config class, weight init, the backbone prefix and the per-exit
    Laplace approximation ([`ExitLaplaceMixin`]: `fit_exit_laplace`, saved and loaded with the model)."""

    config_class = MultiExitConfig
    base_model_prefix = "backbone"
    # Heads trained in full (and saved with the adapter) when a PEFT adapter goes on the backbone: hf_kd's trainers
    # add them to PEFT's `modules_to_save`, leaf by leaf (hf_kd.peft_utils.head_module_names).
    _hf_kd_heads = ("exits",)
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
            [`MultiExitForSequenceClassification`] in training mode, with the backbone's weights and dtype. In a
            DeepSpeed ZeRO-3 run it is built whole (not into `zero.Init` shards), so that it is the same model as in
            a single-process run; DeepSpeed shards it when training starts.
        """
        if isinstance(name_or_path_or_model, (str, os.PathLike)):
            with _without_zero3_init():
                backbone = AutoModel.from_pretrained(name_or_path_or_model, **(backbone_kwargs or {}))
        elif isinstance(name_or_path_or_model, PreTrainedModel):
            if any(hasattr(p, "ds_id") for p in name_or_path_or_model.parameters()):
                raise ValueError(
                    "from_backbone got a model partitioned by DeepSpeed ZeRO-3, whose weights cannot be copied: pass "
                    "its Hub id or path instead (from_backbone builds the model whole; DeepSpeed shards it in training)."
                )
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
        with _without_zero3_init():
            model = cls(config)
        missing, unexpected = model.backbone.load_state_dict(backbone.state_dict(), strict=False)
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

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
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
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        hidden_states = self._backbone_hidden_states(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds
        )
        exit_logits = tuple(
            head(hidden_states[layer], attention_mask) for head, layer in zip(self.exits, self.config.exit_layers)
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
        return 2.0 * h * self.num_labels + (2.0 * h * h if self.config.exit_head_type == ExitHeadType.POOLER else 0.0)

    def exit_flops(self, seq_len: int) -> list[float]:
        r"""Estimated forward FLOPs of one example of padded length `seq_len` up to and including each exit.

        Exit `j` (after layer `l_j = config.exit_layers[j]`) costs `l_j * seq_len * (8 h^2 + 4 h I + 4 seq_len h)`
        for the layers plus `(j + 1)` exit heads (`2 h K` each, `2 h^2 + 2 h K` for `"pooler"` heads), the formula of
        [`~MultiExitForSequenceClassification.predict_with_exits`]: an example that leaves at exit `j` has evaluated
        every head up to `j`. These are the `exit_flops` of [`hf_kd.early_exit.budgeted_evaluation`] and the FLOPs
        behind the MIE weights `w_j = exit_flops[j] / exit_flops[-1]` (Meronen et al., 2024).

        Args:
            seq_len (`int`): padded sequence length, >= 1.

        Returns:
            `list[float]`, one cumulative FLOPs count per exit (non-decreasing).
        """
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}.")
        per_row_layer = seq_len * self._flops_per_token_layer(seq_len)
        return [
            layer * per_row_layer + (j + 1) * self._flops_head() for j, layer in enumerate(self.config.exit_layers)
        ]

    def _batch_exit_flops(self, inputs: dict) -> list[float]:
        return self.exit_flops(int(inputs["input_ids"].shape[1]))

    @torch.no_grad()
    def predict_exit_probs(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        link_approx: LinkApprox | str | None = None,
        mie: bool = False,
    ) -> torch.Tensor:
        r"""The predictive probabilities of every exit for every example, from one full forward pass.

        Args:
            input_ids, attention_mask, token_type_ids: as in `forward`.
            link_approx ([`LinkApprox`] or `str`, *optional*): `None` (default) for each exit's softmax, `"mc"` or
                `"probit"` for the calibrated per-exit Laplace predictive (`model.exit_laplace`, an error without one).
            mie (`bool`, *optional*, defaults to `False`): model-internal ensembling of the exits' predictives, weights
                from `exit_flops` at this batch's padded length (as `predict_with_exits`).

        Returns:
            `torch.FloatTensor` of shape `(num_exits, batch_size, num_labels)`, rows summing to 1.
        """
        laplace, _ = self._exit_predictive(link_approx)  # checked before the forward pass
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        with capture_exit_features(self) as features:
            exit_logits = self(**inputs).exit_logits
        return self._exit_probs(exit_logits, features, laplace, link_approx, mie, self._batch_exit_flops(inputs))

    def _exit_mask(self, mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
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
        thresholds: list[float] | None = None,
        mie: bool = False,
        link_approx: LinkApprox | str | None = None,
    ) -> EarlyExitPrediction:
        r"""Adaptive inference: run the layers one at a time and let each example leave at its first confident exit.

        The backbone's embeddings run first, then layer 1, 2, ... on the rows still in the batch; after an exit layer
        its head is evaluated, the rows that satisfy `policy` are recorded and removed, so later layers run on fewer
        rows. Rows left at the final exit all leave there. Without `mie`, up to floating-point noise, each row's
        logits equal `forward(...).exit_logits[j]` at the exit `j` where it left. Runs without gradients; call
        `model.eval()` first (dropout is not switched off here). Supports BERT-like (BERT, MiniLM) and MPNet backbones.

        When the padding is on the right (every `attention_mask` row is ones then zeros), the sequence is also cut to
        the longest row still in the batch each time rows leave, so short examples left behind no longer pay for the
        padding of the long ones that exited: a real wall-clock speed-up. Padded keys are masked out of attention, so
        the results do not change (up to floating-point noise); left padding is never cut.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): token ids.
            attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*, defaults to all ones):
                1 for tokens, 0 for padding.
            token_type_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
                Segment ids (BERT-like only; ignored by MPNet).
            policy ([`ExitPolicy`] or `str`, *optional*, defaults to `"max_prob"`):
                `"max_prob"` (exit when max prob `>= threshold`), `"entropy"` (exit when entropy `< threshold`,
                DeeBERT), `"patience"` (PABEE) or `"budget"` (exit `k` has its own threshold `thresholds[k]`, the
                budgeted MSDNet protocol of Meronen et al.).
            threshold (`float`): required for `"max_prob"` (in [0, 1]) and `"entropy"` (>= 0, in nats).
            patience (`int`): required for `"patience"`, >= 1.
            thresholds (`list[float]`): required for `"budget"`: `num_exits - 1` finite values >= 0, one per
                non-final exit, e.g. from [`hf_kd.early_exit.fit_budget_thresholds`]; above 1 means that nobody exits
                there.
            mie (`bool`, *optional*, defaults to `False`):
                Model-internal ensembling (Meronen et al., 2024, https://huggingface.co/papers/2302.06359): at exit
                `j` the policy reads `p̄_j = sum_{i<=j} w_i p_i / sum_{i<=j} w_i` (the softmaxes `p_i` of the exits
                run so far, `w_i = exit_flops(seq_len)[i] / exit_flops(seq_len)[-1]` at this batch's padded length),
                and the output is the ensemble (`probs = p̄`, `logits = log p̄`).
            link_approx ([`LinkApprox`] or `str`, *optional*):
                `None` (default): each exit's predictive is the softmax of its logits. `"mc"` or `"probit"`: the
                predictive of the fitted per-exit last-layer Laplace approximation (`model.exit_laplace`, from
                [`~ExitLaplaceMixin.fit_exit_laplace`] or loaded with the model), with each exit's selected
                temperature and prior (Meronen et al., 2024); the policy and MIE read it and `logits = log probs`.
                An error when the model has no fitted Laplace.

        Returns:
            [`EarlyExitPrediction`] with `logits` and `probs` `(batch_size, num_labels)`, `exit_layer` and
            `exit_index` `(batch_size,)`, `layers_run`, `flops` and `full_flops`. FLOPs count multiply-adds as 2. Per
            layer and per token: `8 h^2 + 4 h I + 4 L h` (Q, K, V, output projections; the two feed-forward matmuls
            with intermediate size `I`; the `QK^T` and attention-times-V products over the current padded length
            `L`, which shrinks when the sequence is cut), i.e. `24 h^2 + 4 L h` for BERT-like layers with `I = 4 h`.
            Each evaluated exit head adds `2 h K` per row (`2 h^2 + 2 h K` for the `"pooler"` head), and with
            `link_approx` the Laplace predictive's FLOPs ([`MultiExitLaplace.predictive_flops`]). Embeddings, layer
            norms, softmax and activations are ignored. `full_flops` uses the input's padded length.
        """
        layout = self._stepwise_layout()
        laplace, laplace_flops = self._exit_predictive(link_approx)
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
        run = _EarlyExitRun(
            policy,
            threshold,
            patience,
            thresholds,
            mie,
            self.exit_flops(seq_len),
            self.config.exit_layers,
            batch_size,
            self.num_labels,
            device,
            hidden.dtype,
        )

        # Right padding: every row is a prefix of ones, so a row's tokens are its first `lengths[row]` positions.
        lengths = (attention_mask != 0).sum(-1)  # (bs,)
        positions = torch.arange(seq_len, device=device)
        right_padded = bool(torch.equal(attention_mask != 0, positions < lengths[:, None]))

        exit_of_layer = {layer: j for j, layer in enumerate(self.config.exit_layers)}
        mask = attention_mask
        extended_mask = self._exit_mask(mask, hidden)
        layers_run, flops = 0, 0.0
        for i, layer_module in enumerate(backbone.encoder.layer):
            if layout == "bert":
                out = layer_module(hidden, extended_mask)
            else:
                out = layer_module(hidden, extended_mask, position_bias)
            hidden = out[0] if isinstance(out, tuple) else out
            n, length = hidden.shape[:2]
            layers_run += n
            flops += n * length * self._flops_per_token_layer(length)
            j = exit_of_layer.get(i + 1)
            if j is None:
                continue
            flops += n * (self._flops_head() + laplace_flops[j])
            features = self.exits[j].features(hidden, mask)  # (n, hidden)
            if laplace is None:
                keep = run.step(j, self.exits[j].classifier(features))
            else:  # the Laplace predictive computes the head's logits itself
                keep = run.step(j, None, laplace.predict_exit(j, features, link_approx))
            if not keep.any():
                break
            if keep.all():
                continue
            hidden, mask, lengths = hidden[keep], mask[keep], lengths[keep]
            if position_bias is not None:
                position_bias = position_bias[keep]
            if right_padded:
                # At least 1 column: the first token (the "cls" exits read h[:, 0]) even for all-padding rows.
                length = max(int(lengths.max()), 1)
                if length < hidden.shape[1]:
                    hidden, mask = hidden[:, :length], mask[:, :length]
                    if position_bias is not None:  # relative positions of the kept tokens are unchanged
                        position_bias = position_bias[:, :, :length, :length]
            extended_mask = self._exit_mask(mask, hidden)

        depth = len(backbone.encoder.layer)
        full_flops = batch_size * (depth * seq_len * self._flops_per_token_layer(seq_len) + self._flops_head())
        return run.prediction(layers_run, flops, full_flops)


__all__ = [
    "EarlyExitPrediction",
    "ExitPolicy",
    "MultiExitForSequenceClassification",
    "MultiExitPreTrainedModel",
    "MultiExitSequenceClassifierOutput",
]
