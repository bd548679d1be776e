"""Intermediate-layer distillation of TinyBERT (Jiao et al., 2020, https://huggingface.co/papers/1909.10351).

Besides the logits, TinyBERT's task distillation matches what the student computes inside (PAPERS.md section 7; the
losses and layer map are read in the official code, `TinyBERT/task_distill.py`):

```
L_embd = MSE(E_S W, E_T)                            # embedding-layer output
L_hidn = sum_m MSE(H_S^m W, H_T^g(m))               # output of student layer m, m = 1..M
L_attn = sum_m MSE(A_S^m, A_T^g(m))                 # pre-softmax attention scores of layer m, per head
```

`W` is one learned `Linear(d_S -> d_T)` shared by the embedding and every layer (TinyBERT's `fit_dense`) and `g`
maps the student's M layers onto the teacher's N (uniform by default, [`uniform_layer_map`]). Everything here is a
pure function of tensors or a small module, except [`IntermediateDistiller`], which runs both forwards for
[`TinyBERTTrainer`] and returns the three losses.

Pre-softmax scores: transformers 5 runs attention through SDPA (or flash) kernels that never materialise the scores,
and `output_attentions` returns post-softmax probabilities. [`record_attention_scores`] therefore hooks each
self-attention module, takes the exact inputs its kernel receives (hidden states, the mask the model built, MPNet's
relative position bias) and computes `Q K^T * scaling (+ bias) (+ mask)` with the module's own projections, which is
what the eager kernel feeds its softmax (tested against it). This works whatever `attn_implementation` is set, and
inside the module's forward, where sharded parameters (FSDP, ZeRO-3) are gathered.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import nn

from .losses import _check_reduction, _reduce, _upcast
from .options import TinyBERTProjection, to_enum

__all__ = [
    "IntermediateDistiller",
    "IntermediateProjection",
    "attention_score_mse",
    "check_layer_map",
    "encoder_layers",
    "hidden_state_mse",
    "pre_softmax_attention_scores",
    "record_attention_scores",
    "self_attention_module",
    "uniform_layer_map",
]

# TinyBERT's code sets every attention score <= -100 to 0 in both models: masked entries (its additive mask is
# -10000) then add no error.
MASKED_SCORE_THRESHOLD = -100.0

# ---- layer maps ----------------------------------------------------------------------------------------------------


def uniform_layer_map(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """
    TinyBERT's uniform layer map: student layer `m` (1-based) learns from teacher layer `ceil(m * N / M)`.

    With `N` a multiple of `M` this is the official code's `m * (N // M)` (12 -> 4: `[3, 6, 9, 12]`; 6 -> 3:
    `[2, 4, 6]`). Otherwise the layers stay spread out and the last student layer still maps to the last teacher layer
    (6 -> 4: `[2, 3, 5, 6]`), where the code's `N // M` would use only the teacher's first layers. A student deeper
    than its teacher reuses teacher layers (3 -> 6: `[1, 1, 2, 2, 3, 3]`).

    Args:
        num_student_layers (`int`): `M`, >= 1.
        num_teacher_layers (`int`): `N`, >= 1.

    Returns:
        `list[int]` of length `M`: 1-based teacher layer numbers, non-decreasing, ending with `N`.
    """
    for name, value in (("num_student_layers", num_student_layers), ("num_teacher_layers", num_teacher_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return [-(-m * num_teacher_layers // num_student_layers) for m in range(1, num_student_layers + 1)]


def check_layer_map(layer_map, num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """
    Validate an explicit layer map: one 1-based teacher layer number in `[1, N]` per student layer.

    Raises:
        `ValueError`: naming the bad entries and the accepted range, or the wrong length.
    """
    layer_map = list(layer_map)
    if len(layer_map) != num_student_layers:
        raise ValueError(
            f"intermediate_layer_map must give one teacher layer per student layer: the student has "
            f"{num_student_layers} layers, the map {len(layer_map)} entries ({layer_map})"
        )
    bad = [v for v in layer_map if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= num_teacher_layers]
    if bad:
        raise ValueError(
            f"intermediate_layer_map entries must be teacher layer numbers in [1, {num_teacher_layers}] (1-based: the "
            f"teacher has {num_teacher_layers} layers; 0 would be the embeddings, see embedding_loss_weight), got "
            f"{bad} in {layer_map}"
        )
    return layer_map


# ---- losses (pure functions) ---------------------------------------------------------------------------------------


def _item_mask(batch_size: int, item_mask, device) -> torch.Tensor:
    if item_mask is None:
        return torch.ones(batch_size, dtype=torch.bool, device=device)
    if item_mask.shape != (batch_size,):
        raise ValueError(f"item_mask must have shape ({batch_size},), got {tuple(item_mask.shape)}")
    return item_mask.to(device=device, dtype=torch.bool)


def _token_mask(shape: tuple[int, int], attention_mask, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(shape, dtype=torch.float32, device=device)
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(
            f"attention_mask must have shape {tuple(shape)} (batch, seq_len), got {tuple(attention_mask.shape)}"
        )
    return attention_mask.to(device=device, dtype=torch.float32)


def hidden_state_mse(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    item_mask: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""
    Hidden-state (or embedding) MSE of TinyBERT (https://huggingface.co/papers/1909.10351), per example:
    `mean over real tokens t and features d of (h_S[t, d] - h_T[t, d])^2`.

    The student's states must already be projected to the teacher's width. TinyBERT's code pads every sequence to 128
    tokens and averages over all positions, padding included; here only real tokens count (`attention_mask`), so the
    loss does not depend on how much padding a batch has. Without padding the two are the same number.

    Args:
        student_hidden (`torch.Tensor` of shape `(batch, seq_len, d_T)`): projected student states.
        teacher_hidden (`torch.Tensor` of shape `(batch, seq_len, d_T)`): teacher states.
        attention_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*): 1 for real tokens, 0 for padding.
            Defaults to every token.
        item_mask (`torch.BoolTensor` of shape `(batch,)`, *optional*): examples to count (e.g. `labels != -100`,
            so that the normaliser matches [`~transformers.Trainer`]'s `num_items_in_batch`). Defaults to all.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): when given, the loss is the sum over this batch's
            counted examples divided by it (exact under gradient accumulation), as in [`hf_kd.losses.kd_loss`].
        reduction (`str`, *optional*, defaults to `"mean"`): `"mean"`, `"sum"` or `"none"` (per example).

    Returns:
        `torch.Tensor`: a float32 scalar, or `(batch,)` for `reduction="none"` (0 at uncounted examples).
    """
    _check_reduction(reduction, num_items_in_batch)
    if student_hidden.shape != teacher_hidden.shape or student_hidden.dim() != 3:
        raise ValueError(
            "student and teacher hidden states must both have shape (batch, seq_len, hidden), got "
            f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}: project the student to the teacher's width"
        )
    batch, seq_len, width = student_hidden.shape
    tokens = _token_mask((batch, seq_len), attention_mask, student_hidden.device)
    items = _item_mask(batch, item_mask, student_hidden.device)
    squared = (_upcast(student_hidden) - _upcast(teacher_hidden)).pow(2).sum(-1)  # (batch, seq_len)
    per_item = (squared * tokens).sum(-1) / (tokens.sum(-1).clamp_min(1) * width)
    return _reduce(torch.where(items, per_item, 0.0), items, reduction, num_items_in_batch)


def attention_score_mse(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    item_mask: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""
    Attention-score MSE of TinyBERT (https://huggingface.co/papers/1909.10351) on **pre-softmax** scores, per example:
    `mean over heads and real (query, key) pairs of (A_S - A_T)^2`.

    As in TinyBERT's code, every score `<= -100` (the masked entries, once the additive mask is applied) is set to 0 in
    both models before the difference. TinyBERT then averages over all `128 x 128` positions, padding included; here
    only pairs of real tokens count, so padding does not dilute the loss (identical without padding).

    Args:
        student_scores (`torch.Tensor` of shape `(batch, heads, seq_len, seq_len)`): see
            [`pre_softmax_attention_scores`].
        teacher_scores (`torch.Tensor`, same shape): the teacher's scores (same number of heads).
        attention_mask, item_mask, num_items_in_batch, reduction: as in [`hidden_state_mse`].

    Returns:
        `torch.Tensor`: a float32 scalar, or `(batch,)` for `reduction="none"`.
    """
    _check_reduction(reduction, num_items_in_batch)
    if student_scores.shape != teacher_scores.shape or student_scores.dim() != 4:
        raise ValueError(
            "student and teacher attention scores must both have shape (batch, heads, seq_len, seq_len), got "
            f"{tuple(student_scores.shape)} and {tuple(teacher_scores.shape)}"
        )
    batch, heads, seq_len, _ = student_scores.shape
    tokens = _token_mask((batch, seq_len), attention_mask, student_scores.device)
    items = _item_mask(batch, item_mask, student_scores.device)
    student_scores, teacher_scores = _upcast(student_scores), _upcast(teacher_scores)
    student_scores = torch.where(student_scores <= MASKED_SCORE_THRESHOLD, 0.0, student_scores)
    teacher_scores = torch.where(teacher_scores <= MASKED_SCORE_THRESHOLD, 0.0, teacher_scores)
    pairs = tokens[:, None, :, None] * tokens[:, None, None, :]  # (batch, 1, seq_len, seq_len)
    per_item = ((student_scores - teacher_scores).pow(2) * pairs).sum((1, 2, 3))
    per_item = per_item / (heads * tokens.sum(-1).pow(2)).clamp_min(1)
    return _reduce(torch.where(items, per_item, 0.0), items, reduction, num_items_in_batch)


# ---- where the layers and their attention live ---------------------------------------------------------------------

# (query, key) projection names of the self-attention modules whose scores are `Q K^T * scaling (+ bias) + mask`:
# BERT-style encoders (BERT, MiniLM, RoBERTa, ELECTRA, XLM-R, ...) and MPNet.
_QK_NAMES = (("query", "key"), ("q", "k"))


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """
    The transformer layers of an encoder: the `ModuleList` at `*.encoder.layer` (BERT, MiniLM, RoBERTa, MPNet,
    ELECTRA, ...; also under a PEFT or DDP wrapper).

    Raises:
        `ValueError`: when the model has no such list (or several).
    """
    found = [
        m
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and (n == "encoder.layer" or n.endswith(".encoder.layer"))
    ]
    if len(found) != 1:
        raise ValueError(
            f"Intermediate-layer distillation needs an encoder whose layers live in a ModuleList at '*.encoder.layer' "
            f"(BERT, MiniLM, RoBERTa, MPNet, ...); {type(model).__name__} has {len(found)} such lists."
        )
    return found[0]


def _qk_names(module: nn.Module) -> tuple[str, str] | None:
    for q, k in _QK_NAMES:
        if isinstance(getattr(module, q, None), nn.Module) and isinstance(getattr(module, k, None), nn.Module):
            if hasattr(module, "num_attention_heads") and hasattr(module, "attention_head_size"):
                return q, k
    return None


def self_attention_module(layer: nn.Module) -> nn.Module:
    """
    The self-attention module of one encoder layer: the first submodule with query/key projections (`query`/`key` in
    BERT-style models, `q`/`k` in MPNet) and `num_attention_heads` / `attention_head_size` attributes.

    Raises:
        `ValueError`: for a layer without one (e.g. DeBERTa's disentangled attention, whose scores have other terms).
    """
    for module in layer.modules():
        if _qk_names(module) is not None:
            return module
    raise ValueError(
        f"Attention-score distillation supports BERT-style (query/key) and MPNet (q/k) self-attention; found none in "
        f"{type(layer).__name__}. Set attention_loss_weight=0 to distil hidden states only."
    )


def pre_softmax_attention_scores(
    module: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    The scores a self-attention module feeds its softmax: `Q K^T * scaling (+ position_bias) (+ mask)`.

    Computed with the module's own query/key projections, exactly as transformers' eager attention (BERT-style:
    `eager_attention_forward`; MPNet: `MPNetSelfAttention.forward`) computes them, whatever attention kernel the model
    actually runs.

    Args:
        module (`nn.Module`): a self-attention module, see [`self_attention_module`].
        hidden_states (`torch.Tensor` of shape `(batch, seq_len, hidden)`): the module's input.
        attention_mask (`torch.Tensor`, *optional*): the mask the model passes to the module: additive float
            (eager: 0 or a large negative number) or boolean (SDPA: `True` = attend), broadcastable to
            `(batch, heads, seq_len, seq_len)`. Masked entries become `finfo.min`, below TinyBERT's -100 threshold.
        position_bias (`torch.Tensor` of shape `(batch, heads, seq_len, seq_len)`, *optional*): MPNet's relative
            position bias.

    Returns:
        `torch.Tensor` of shape `(batch, heads, seq_len, seq_len)`.
    """
    names = _qk_names(module)
    if names is None:
        raise ValueError(f"{type(module).__name__} has no query/key projections; see self_attention_module")
    head_size = module.attention_head_size
    shape = (*hidden_states.shape[:-1], -1, head_size)
    query = getattr(module, names[0])(hidden_states).view(shape).transpose(1, 2)
    key = getattr(module, names[1])(hidden_states).view(shape).transpose(1, 2)
    scaling = getattr(module, "scaling", None) or head_size**-0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    return scores


@contextmanager
def record_attention_scores(modules: dict[int, nn.Module], compute_in_forward: bool = False):
    """
    Record the pre-softmax attention scores of the given self-attention modules during the forward run inside.

    Forward pre-hooks take each module's inputs (hidden states, mask, MPNet's position bias) and
    [`pre_softmax_attention_scores`] turns them into scores, which keep their autograd graph.

    By default the scores are computed when the context exits, outside the model's forward: inside a layer run under
    gradient checkpointing the computation would either have no gradient (reentrant checkpointing runs the first
    forward without autograd) or break the recomputation check (non-reentrant checkpointing expects the backward's
    recomputation to save the same tensors). The captured inputs are the layer's real input tensors, with their
    graph, so gradients reach the query/key weights and everything below. `compute_in_forward=True` computes them in
    the hook instead, where sharded parameters (ZeRO-3) are gathered: for a frozen teacher run without gradients.

    Args:
        modules (`dict[int, nn.Module]`): `{layer_number: self_attention_module}`.
        compute_in_forward (`bool`, *optional*, defaults to `False`): compute inside the module's forward.

    Yields:
        `dict[int, torch.Tensor]`: `{layer_number: scores (batch, heads, seq_len, seq_len)}`, filled when the context
        exits (or during the forward with `compute_in_forward=True`).
    """
    scores: dict[int, torch.Tensor] = {}
    captured: dict[int, tuple] = {}

    def make_hook(number: int, signature: inspect.Signature):
        def hook(module, args, kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            inputs = (module, bound["hidden_states"], bound.get("attention_mask"), bound.get("position_bias"))
            if compute_in_forward:
                scores[number] = pre_softmax_attention_scores(*inputs)
            else:
                captured[number] = inputs

        return hook

    handles = [
        module.register_forward_pre_hook(make_hook(n, inspect.signature(module.forward)), with_kwargs=True)
        for n, module in modules.items()
    ]
    try:
        yield scores
    finally:
        for handle in handles:
            handle.remove()
    for number, inputs in captured.items():
        scores[number] = pre_softmax_attention_scores(*inputs)


# ---- the projection W and the orchestration ------------------------------------------------------------------------


class IntermediateProjection(nn.Module):
    r"""
    TinyBERT's `fit_dense`: one `Linear(d_S -> d_T)` mapping the student's hidden states (embedding output and every
    layer) to the teacher's width (https://huggingface.co/papers/1909.10351). The paper has separate `W_e` and `W_h`;
    the official code, which produced the published models, shares one, and so does this module.

    It is a training-time aid: [`TinyBERTTrainer`] trains it with the student's optimizer and saves it beside the
    student (`intermediate_projection.safetensors`, for resuming), never inside it, so the student stays a plain
    model for `from_pretrained`; inference and the prediction-layer stage do not use it.

    Args:
        student_hidden_size (`int`): `d_S`.
        teacher_hidden_size (`int`): `d_T`.
        kind ([`~hf_kd.options.TinyBERTProjection`] or `str`, *optional*, defaults to `"linear"`):
            `"linear"`: a learned `Linear(d_S, d_T)`, initialised like TinyBERT's (normal, std `init_std`, zero bias),
            except that equal widths start from the identity (a student built from the teacher's layers is already
            in the teacher's space). `"identity"`: no parameters, widths must be equal.
        init_std (`float`, *optional*, defaults to `0.02`): std of the initial weights (BERT's `initializer_range`).
    """

    def __init__(
        self,
        student_hidden_size: int,
        teacher_hidden_size: int,
        kind: TinyBERTProjection | str = "linear",
        init_std: float = 0.02,
    ):
        super().__init__()
        kind = to_enum(TinyBERTProjection, kind, "intermediate_projection")
        if kind is TinyBERTProjection.IDENTITY and student_hidden_size != teacher_hidden_size:
            raise ValueError(
                f"intermediate_projection='identity' needs equal widths, but the student's hidden size is "
                f"{student_hidden_size} and the teacher's {teacher_hidden_size}: use 'linear' (a learned projection)."
            )
        self.kind, self.init_std = kind, init_std
        self.student_hidden_size, self.teacher_hidden_size = student_hidden_size, teacher_hidden_size
        self.dense = nn.Linear(student_hidden_size, teacher_hidden_size) if kind is TinyBERTProjection.LINEAR else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.dense is None:
            return
        with torch.no_grad():
            if self.student_hidden_size == self.teacher_hidden_size:
                self.dense.weight.copy_(torch.eye(self.student_hidden_size))
            else:
                self.dense.weight.normal_(0.0, self.init_std)
            self.dense.bias.zero_()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(..., d_S)` -> `(..., d_T)`."""
        if self.dense is None:
            return hidden_states
        return self.dense(hidden_states.to(self.dense.weight.dtype))


class IntermediateDistiller:
    r"""
    The intermediate-layer losses of TinyBERT (https://huggingface.co/papers/1909.10351) for one teacher/student pair,
    as [`TinyBERTTrainer`] uses them.

    Student layer `m` (1-based) learns from teacher layer `layer_map[m - 1]`: its output through the shared projection
    ([`IntermediateProjection`]) against the teacher layer's output ([`hidden_state_mse`]), and its pre-softmax
    attention scores against that teacher layer's ([`attention_score_mse`], same number of heads needed). The
    embedding outputs (index 0 of `hidden_states`) are matched through the same projection. The hidden and attention
    losses are summed over layers, as in TinyBERT.

    Args:
        student (`PreTrainedModel`): encoder classifier with layers at `*.encoder.layer`.
        teacher (`PreTrainedModel`): same kind, any width and depth; fed the same token positions (same tokenizer, or
            ids mapped one to one by [`TinyBERTTrainer`]).
        layer_map (`list[int]`, *optional*): one 1-based teacher layer per student layer. Defaults to
            [`uniform_layer_map`].
        hidden_weight, attention_weight, embedding_weight (`float`, *optional*, default to `1.0`): loss weights; a
            weight of 0 skips that loss (and its hooks).
        projection (`str`, *optional*, defaults to `"linear"`): see [`IntermediateProjection`].

    Raises:
        `ValueError`: out-of-range layer maps, different head counts with `attention_weight > 0`, unsupported models.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        layer_map: list[int] | None = None,
        hidden_weight: float = 1.0,
        attention_weight: float = 1.0,
        embedding_weight: float = 1.0,
        projection: str = "linear",
    ):
        num_student, num_teacher = len(encoder_layers(student)), len(encoder_layers(teacher))
        self.layer_map = (
            uniform_layer_map(num_student, num_teacher)
            if layer_map is None
            else check_layer_map(layer_map, num_student, num_teacher)
        )
        self.weights = {"hidden": hidden_weight, "attention": attention_weight, "embedding": embedding_weight}
        if attention_weight > 0:
            student_heads = self_attention_module(encoder_layers(student)[0]).num_attention_heads
            teacher_heads = self_attention_module(encoder_layers(teacher)[0]).num_attention_heads
            if student_heads != teacher_heads:
                raise ValueError(
                    f"Attention-score distillation compares heads one to one, but the student has {student_heads} "
                    f"heads and the teacher {teacher_heads}: set attention_loss_weight=0, or use a student with "
                    f"{teacher_heads} heads."
                )
        init_std = getattr(student.config, "initializer_range", 0.02)
        self.projection = IntermediateProjection(
            student.config.hidden_size, teacher.config.hidden_size, projection, init_std
        )

    def _attention_modules(self, model: nn.Module, numbers: list[int]) -> dict[int, nn.Module]:
        if self.weights["attention"] <= 0:
            return {}
        layers = encoder_layers(model)
        return {n: self_attention_module(layers[n - 1]) for n in numbers}

    def __call__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_inputs: dict,
        teacher_inputs: dict,
        projection: nn.Module | None = None,
        item_mask: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        unwrapped_student: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """
        Run the student (with gradients) and the teacher (without) and compute the intermediate losses.

        Args:
            student, teacher (`nn.Module`): the models to call (possibly DDP-wrapped).
            student_inputs, teacher_inputs (`dict`): their batches (same sequence length).
            projection (`nn.Module`, *optional*): the projection to call, e.g. a DDP-wrapped `self.projection`.
            item_mask, num_items_in_batch: as in [`hidden_state_mse`].
            unwrapped_student (`nn.Module`, *optional*): the student's own module, where the attention hooks go.

        Returns:
            `(student_logits, teacher_logits, losses)`: `losses` maps `"hidden"`, `"attention"`, `"embedding"` (those
            with a positive weight) to unweighted scalars.
        """
        projection = projection if projection is not None else self.projection
        unwrapped_student = unwrapped_student if unwrapped_student is not None else student
        student_numbers = list(range(1, len(self.layer_map) + 1))
        with record_attention_scores(self._attention_modules(unwrapped_student, student_numbers)) as student_scores:
            student_out = student(**student_inputs, output_hidden_states=True)
        teacher_modules = self._attention_modules(getattr(teacher, "module", teacher), sorted(set(self.layer_map)))
        with torch.no_grad(), record_attention_scores(teacher_modules, compute_in_forward=True) as teacher_scores:
            teacher_out = teacher(**teacher_inputs, output_hidden_states=True)
        for who, out in (("student", student_out), ("teacher", teacher_out)):
            if getattr(out, "hidden_states", None) is None:
                raise ValueError(f"The {who} returned no hidden_states with output_hidden_states=True.")

        mask = student_inputs.get("attention_mask")
        common = dict(attention_mask=mask, item_mask=item_mask, num_items_in_batch=num_items_in_batch)
        losses = {}
        # (student index, teacher index) into `hidden_states`: 0 is the embedding output. All student states go
        # through one projection call: a DDP-wrapped module must run forward once per backward.
        pairs = [(0, 0)] if self.weights["embedding"] > 0 else []
        if self.weights["hidden"] > 0:
            pairs += list(zip(student_numbers, self.layer_map, strict=True))
        if pairs:
            projected = projection(torch.stack([student_out.hidden_states[s] for s, _ in pairs]))
            per_pair = [
                hidden_state_mse(projected[k], teacher_out.hidden_states[t], **common)
                for k, (_, t) in enumerate(pairs)
            ]
            if self.weights["embedding"] > 0:
                losses["embedding"] = per_pair.pop(0)
            if self.weights["hidden"] > 0:
                losses["hidden"] = torch.stack(per_pair).sum()
        if self.weights["attention"] > 0:
            losses["attention"] = torch.stack(
                [
                    attention_score_mse(student_scores[m], teacher_scores[t], **common)
                    for m, t in zip(student_numbers, self.layer_map, strict=True)
                ]
            ).sum()
        return student_out.logits, teacher_out.logits, losses

    def weighted_sum(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """`sum_k weight_k * losses[k]`."""
        return sum(self.weights[k] * v for k, v in losses.items())
