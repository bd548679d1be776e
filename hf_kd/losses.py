"""Pure helper functions for knowledge-distillation loss computation.

Tensors in, tensor out: nothing here touches a model, an optimizer or a [`~transformers.Trainer`], so every function
can be tested against closed forms. All losses are computed in (at least) float32 whatever the input dtype, and all
of them take the same two arguments that control how per-item losses are reduced:

- `reduction`: `"mean"` (over valid items), `"sum"` or `"none"` (one value per item, 0 at ignored items).
- `num_items_in_batch`: the number of valid items across all gradient-accumulation micro-batches (and devices), as
  [`~transformers.Trainer`] passes it to `compute_loss`. When given, the loss is `sum / num_items_in_batch`, so that
  summing the micro-batch losses gives the mean over the whole effective batch.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .options import (
    DistillDivergence,
    LMCacheTail,
    LMLossType,
    OtherExitLoss,
    RecalibrationLoss,
    Reduction,
    SourceCorrection,
    to_enum,
)

__all__ = [
    "LMHeadInputs",
    "LMLossParts",
    "LMLossType",
    "cached_span_log_probs",
    "cached_span_top_k",
    "cached_uld_loss",
    "dedier_weights",
    "hybrid_loss",
    "kd_layer_loss",
    "kd_loss",
    "label_smoothing_targets",
    "lm_kd_loss",
    "self_kd_loss",
    "shifted_logits",
    "soft_cross_entropy",
    "span_log_probs",
    "sparse_lm_kd_loss",
    "uld_loss",
]

def _upcast(x: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 softmax over many classes loses the small probabilities that carry the "dark knowledge", and
    # T^2-scaled KL terms overflow fp16: always compute in at least float32 (float64 inputs stay float64).
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_tensors(**tensors) -> None:
    """`TypeError` naming the first argument that is not a `torch.Tensor` (a list or an array would otherwise fail
    later with an `AttributeError` on `.shape`)."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}; wrap it with torch.as_tensor")


def _bad_class_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Flat bool mask of the labels that are neither in `[0, num_classes)` nor `-100` (no device synchronisation)."""
    if labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    flat = labels.reshape(-1)
    return (flat != -100) & ((flat < 0) | (flat >= num_classes))


def _raise_bad_class_labels(labels: torch.Tensor, bad: torch.Tensor, num_classes: int) -> None:
    # cross_entropy would raise `IndexError: Target 5 is out of bounds` on CPU, a device-side assert on CUDA.
    index = int(bad.nonzero()[0, 0])
    raise ValueError(
        f"labels must be in [0, {num_classes}) or -100 (ignored), got {labels.reshape(-1)[index].item()} at index "
        f"{index}"
    )


def _check_class_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Integer class indices in `[0, num_classes)` or `-100` (ignored), else a `ValueError` naming the first bad
    label and its index."""
    bad = _bad_class_labels(labels, num_classes)
    if bad.any():
        _raise_bad_class_labels(labels, bad, num_classes)


def _nonfinite(x: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
    """`(items, C)` bool mask of the NaN/inf entries of `x` flattened to rows; with `items` (a bool mask over the
    flattened items) only those rows (ignored items never reach the loss, so they may hold anything)."""
    bad = ~torch.isfinite(x.reshape(-1, x.shape[-1]))
    return bad if items is None else bad & items.reshape(-1, 1).to(bad.device)


def _raise_nonfinite(x: torch.Tensor, bad: torch.Tensor, name: str, hint: str = "") -> None:
    item = int(bad.any(dim=-1).nonzero()[0, 0])
    value = x.reshape(-1, x.shape[-1])[item][bad[item]][0].item()
    raise ValueError(f"{name} contain NaN or inf ({value} in item {item}){hint}")


def _check_finite(x: torch.Tensor, name: str, hint: str = "") -> None:
    """`ValueError` naming the first item (row of the flattened leading dimensions) holding a NaN or an inf."""
    bad = _nonfinite(x)
    if bad.any():
        _raise_nonfinite(x, bad, name, hint)


def _check_reduction(reduction: str, num_items_in_batch) -> None:
    to_enum(Reduction, reduction, "reduction")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(
            f"num_items_in_batch replaces the 'mean' reduction and cannot be combined with reduction={reduction!r}"
        )


def _normalizer(num_items_in_batch, num_valid: torch.Tensor) -> torch.Tensor | int:
    """Denominator of the "mean" reduction: `num_items_in_batch` when given, else the local number of valid items."""
    if num_items_in_batch is None:
        # clamp_min(1): a micro-batch made only of ignored items (padding) gives a loss of 0, not 0/0 = NaN.
        return num_valid.clamp_min(1)
    if isinstance(num_items_in_batch, torch.Tensor):
        # Trainer passes a 0-dim tensor; under DataParallel each replica receives a 1-element slice of it. Its value
        # is not checked here because reading it would force a device-host synchronisation at every step.
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                "num_items_in_batch must be an int or a single-element tensor, "
                f"got a tensor of shape {tuple(num_items_in_batch.shape)}"
            )
        return num_items_in_batch.reshape(()).to(num_valid.device)
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int) or num_items_in_batch < 1:
        raise ValueError(f"num_items_in_batch must be a positive int or a tensor, got {num_items_in_batch!r}")
    return num_items_in_batch


def _reduce(per_item: torch.Tensor, valid: torch.Tensor, reduction: str, num_items_in_batch) -> torch.Tensor:
    """Reduce flat per-item losses (already 0 at invalid items)."""
    if reduction == "none":
        return per_item
    total = per_item.sum()
    if reduction == "sum":
        return total
    return total / _normalizer(num_items_in_batch, valid.sum())


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    num_items_in_batch: torch.Tensor | int | None = None,
    reduction: str = "mean",
    sample_weights: torch.Tensor | None = None,
    divergence: str = "kl",
) -> torch.Tensor:
    r"""
    Knowledge-distillation loss of [Hinton et al., 2015](https://huggingface.co/papers/1503.02531):

    ```
    loss = alpha * T^2 * KL(softmax(teacher_logits / T) || softmax(student_logits / T))
           + (1 - alpha) * CE(labels, student_logits)
    ```

    The KL divergence is summed over classes for each item (what `torch.nn.KLDivLoss(reduction="batchmean")` does
    for a 2-D batch). The `T^2` factor keeps the gradient of the soft term on the same scale as the hard term's when
    the temperature changes, since the soft-target gradient scales as `1/T^2`. The cross-entropy uses the raw
    (temperature 1) student logits.

    Args:
        student_logits (`torch.Tensor` of shape `(N, C)` or `(B, L, C)`):
            Student logits. Any number of leading dimensions is accepted; they are flattened into items.
        teacher_logits (`torch.Tensor`, same shape as `student_logits`):
            Teacher logits. Gradients are not blocked here: pass a detached tensor (or one computed under
            `torch.no_grad()`) if the teacher must not be trained.
        labels (`torch.Tensor` of shape `(N,)` or `(B, L)`, *optional*, defaults to `None`):
            Gold class indices, with `-100` marking items to ignore. Ignored items contribute to neither term and are
            not counted by the `"mean"` reduction. When `None`, only the soft term is returned, with weight 1:
            `alpha` is then ignored (the convention of torchdistill and TRL's `GKDTrainer`), and every item is valid.
        temperature (`float`, *optional*, defaults to `2.0`):
            Softmax temperature `T` of the soft term. Must be > 0.
        alpha (`float`, *optional*, defaults to `0.5`):
            Weight of the soft term, in `[0, 1]`; the hard term gets `1 - alpha`. `alpha=1` is pure distillation
            (DEDIER's setting), `alpha=0` plain cross-entropy.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*, defaults to `None`):
            Number of valid items over all gradient-accumulation micro-batches, as [`~transformers.Trainer`] passes
            it to `compute_loss`. When given, the loss is the sum over this micro-batch's valid items divided by it,
            which makes the accumulated loss equal to the mean over the full effective batch. Only valid with
            `reduction="mean"`, which it replaces.
        reduction (`str` or [`~hf_kd.options.Reduction`], *optional*, defaults to `"mean"`):
            `"mean"` (mean over valid items; 0 when there is none), `"sum"`, or `"none"` (per-item losses of shape
            `student_logits.shape[:-1]`, 0 at ignored items).
        sample_weights (`torch.Tensor` of shape `student_logits.shape[:-1]`, *optional*, defaults to `None`):
            Per-item weights `w` (e.g. DEDIER's, see [`dedier_weights`]) multiplying each item's loss before the
            reduction. The `"mean"` reduction stays a plain mean of `w * loss` over the valid items (or
            `sum / num_items_in_batch`): it is **not** normalised by `sum(w)`, as in DEDIER's code, so up-weighting
            some items raises the loss scale rather than down-weighting the others.
        divergence (`str` or [`~hf_kd.options.DistillDivergence`], *optional*, defaults to `"kl"`):
            The soft term's divergence between the teacher's and the student's tempered distributions: `"kl"`,
            `KL(p_t || p_s)` (Hinton's), or `"js"`, the Jensen-Shannon divergence
            `(KL(p_t || m) + KL(p_s || m)) / 2` with `m = (p_t + p_s) / 2` (natural log, symmetric, at most `log 2`;
            an alternative of the self-distillation of Park et al., 2024, https://huggingface.co/papers/2406.09719).
            Both are scaled by `T^2`.

    Returns:
        `torch.Tensor`: a scalar, or per-item losses for `reduction="none"`, in float32 (float64 for float64 inputs).

    Raises:
        `ValueError`: if `temperature <= 0`, `alpha` is outside `[0, 1]`, `divergence` is unknown, the logits' shapes
        differ or have no class dimension, `labels` or `sample_weights` does not have shape
        `student_logits.shape[:-1]`, a label is outside `[0, num_classes)` and not `-100`, or `teacher_logits`
        contain NaN or inf. `TypeError`: an argument that is not a tensor.

    Example:

    ```python
    >>> import torch
    >>> from hf_kd.losses import kd_loss
    >>> logits = torch.randn(4, 3)
    >>> kd_loss(logits, logits).item()  # KL(p || p) = 0
    0.0
    ```
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0.0, 1.0], got {alpha}")
    to_enum(DistillDivergence, divergence, "divergence")
    _check_reduction(reduction, num_items_in_batch)
    _check_tensors(student_logits=student_logits, teacher_logits=teacher_logits)
    if labels is not None:
        _check_tensors(labels=labels)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() < 2:
        raise ValueError(f"logits must have shape (..., num_classes), got {tuple(student_logits.shape)}")
    if labels is not None and labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    if labels is not None and labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape {tuple(student_logits.shape[:-1])} (the logits' leading dimensions), "
            f"got {tuple(labels.shape)}"
        )
    if sample_weights is not None and sample_weights.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"sample_weights must have shape {tuple(student_logits.shape[:-1])} (the logits' leading dimensions), "
            f"got {tuple(sample_weights.shape)}"
        )
    # A NaN or inf teacher logit would silently poison every student gradient (an inf one makes the KL term
    # 0 * inf = NaN), and an out-of-range label is an IndexError (a device-side assert on CUDA): fail loudly, with
    # one device synchronisation for both checks. Ignored items (-100) are left out: they never reach the loss.
    num_classes = student_logits.shape[-1]
    bad_teacher = _nonfinite(teacher_logits, None if labels is None else labels != -100)
    bad_labels = _bad_class_labels(labels, num_classes) if labels is not None else None
    if (bad_teacher.any() if bad_labels is None else bad_teacher.any() | bad_labels.any()).item():
        if bad_labels is not None and bad_labels.any():
            _raise_bad_class_labels(labels, bad_labels, num_classes)
        _raise_nonfinite(teacher_logits, bad_teacher, "teacher_logits", ": check the teacher's dtype (fp16 overflow) "
                         "and inputs")

    item_shape = student_logits.shape[:-1]
    student = _upcast(student_logits).reshape(-1, num_classes)
    teacher = _upcast(teacher_logits).reshape(-1, num_classes)

    # log_softmax on both sides with log_target=True: with logits of +-1e4 a plain softmax underflows to exact 0 and
    # p * log(p) becomes 0 * -inf = NaN, whereas log-probabilities stay finite.
    student_log_probs = F.log_softmax(student / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher / temperature, dim=-1)
    soft = _divergence(teacher_log_probs, student_log_probs, divergence) * temperature**2

    if labels is None:
        per_item = soft
        valid = torch.ones_like(per_item, dtype=torch.bool)
    else:
        flat_labels = labels.reshape(-1).long()
        valid = flat_labels != -100
        hard = F.cross_entropy(student, flat_labels, ignore_index=-100, reduction="none")
        per_item = alpha * soft + (1 - alpha) * hard
    if sample_weights is not None:
        per_item = per_item * sample_weights.reshape(-1).to(per_item)
    if labels is not None:
        # where, not multiplication by the mask: inf/NaN at padded positions must not leak into the loss.
        per_item = torch.where(valid, per_item, torch.zeros_like(per_item))

    loss = _reduce(per_item, valid, reduction, num_items_in_batch)
    return loss.reshape(item_shape) if reduction == "none" else loss


def _divergence(target_log_probs: torch.Tensor, log_probs: torch.Tensor, divergence: str) -> torch.Tensor:
    """Per-row `KL(p_target || p)` or Jensen-Shannon divergence of two `(N, C)` log-probability tensors."""
    if divergence == "kl":
        return F.kl_div(log_probs, target_log_probs, reduction="none", log_target=True).sum(-1)
    # log m = log((p_t + p_s) / 2), in log space so that one-hot rows stay finite.
    log_mixture = torch.logaddexp(target_log_probs, log_probs) - math.log(2.0)
    to_target = F.kl_div(log_mixture, target_log_probs, reduction="none", log_target=True).sum(-1)
    to_model = F.kl_div(log_mixture, log_probs, reduction="none", log_target=True).sum(-1)
    return (to_target + to_model) / 2


def label_smoothing_targets(labels: torch.Tensor, num_classes: int, epsilon: float) -> torch.Tensor:
    r"""
    Label-smoothed targets `(1 - epsilon) * onehot(labels) + epsilon / num_classes`
    ([Szegedy et al., 2016](https://huggingface.co/papers/1512.00567)).

    Convention: `epsilon` is spread uniformly over **all** `num_classes` classes, the gold class included, so the gold
    class gets `1 - epsilon + epsilon / num_classes`. This is the convention of
    `torch.nn.functional.cross_entropy(..., label_smoothing=epsilon)`, so that
    `soft_cross_entropy(logits, label_smoothing_targets(labels, C, eps))` equals
    `F.cross_entropy(logits, labels, label_smoothing=eps)`. (Some implementations spread `epsilon` over the `C - 1`
    wrong classes instead.)

    Args:
        labels (`torch.Tensor` of integer dtype and any shape `(...)`):
            Gold class indices in `[0, num_classes)`, or `-100` for items to ignore.
        num_classes (`int`):
            Number of classes `C`, at least 1.
        epsilon (`float`):
            Smoothing mass, in `[0, 1]`. `0` gives one-hot targets, `1` the uniform distribution.

    Returns:
        `torch.Tensor` of shape `(..., num_classes)` and dtype float32: the target distributions. Rows of ignored
        items (`-100`) are all zero, which [`soft_cross_entropy`] treats as "ignore this item".

    Raises:
        `ValueError`: if `epsilon` is outside `[0, 1]`, `num_classes < 1`, or a label is outside
        `[0, num_classes)` and not `-100`.
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0.0, 1.0], got {epsilon}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    _check_tensors(labels=labels)
    _check_class_labels(labels, num_classes)
    labels = labels.long()
    valid = labels != -100
    one_hot = F.one_hot(torch.where(valid, labels, torch.zeros_like(labels)), num_classes).float()
    targets = (1.0 - epsilon) * one_hot + epsilon / num_classes
    return targets * valid.unsqueeze(-1)


def soft_cross_entropy(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""
    Cross-entropy against a target distribution, `-sum_c target_probs[..., c] * log_softmax(logits)[..., c]` per item.

    Used with label-smoothed targets ([`label_smoothing_targets`]), and with self-distillation or re-calibration
    targets. Unlike `torch.nn.functional.cross_entropy` with probability targets, it supports ignored items and the
    `num_items_in_batch` normalisation of [`~transformers.Trainer`].

    Args:
        logits (`torch.Tensor` of shape `(N, C)` or `(B, L, C)`):
            Model logits; leading dimensions are flattened into items.
        target_probs (`torch.Tensor`, same shape as `logits`):
            Target distributions (non-negative rows summing to 1; row sums are not checked, to avoid a second device
            synchronisation, but NaN/inf entries are: they would otherwise be skipped as zero weights, silently).
            An all-zero row marks an ignored item: it contributes 0 and is not counted by the `"mean"` reduction.
            Gradients flow into `target_probs` if it requires them; detach teacher targets yourself.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*, defaults to `None`):
            Number of valid items over all gradient-accumulation micro-batches; when given, the loss is
            `sum / num_items_in_batch`. Only valid with `reduction="mean"`, which it replaces. See [`kd_loss`].
        reduction (`str` or [`~hf_kd.options.Reduction`], *optional*, defaults to `"mean"`):
            `"mean"` (over valid items; 0 when there is none), `"sum"`, or `"none"` (per-item losses of shape
            `logits.shape[:-1]`).

    Returns:
        `torch.Tensor`: a scalar, or per-item losses for `reduction="none"`, in float32 (float64 for float64 inputs).

    Raises:
        `ValueError`: if the shapes differ, `logits` has no class dimension, or `reduction` is unknown.
    """
    _check_reduction(reduction, num_items_in_batch)
    _check_tensors(logits=logits, target_probs=target_probs)
    if logits.shape != target_probs.shape:
        raise ValueError(
            f"logits and target_probs must have the same shape, got {tuple(logits.shape)} and "
            f"{tuple(target_probs.shape)}"
        )
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (..., num_classes), got {tuple(logits.shape)}")
    _check_finite(target_probs, "target_probs")

    item_shape = logits.shape[:-1]
    num_classes = logits.shape[-1]
    log_probs = F.log_softmax(_upcast(logits).reshape(-1, num_classes), dim=-1)
    targets = _upcast(target_probs).reshape(-1, num_classes)
    # A zero target weight times a -inf log-probability would be NaN; such a class contributes nothing, so skip it.
    per_item = -torch.where(targets > 0, targets * log_probs, torch.zeros_like(log_probs)).sum(-1)
    valid = targets.sum(-1) > 0

    loss = _reduce(per_item, valid, reduction, num_items_in_batch)
    return loss.reshape(item_shape) if reduction == "none" else loss


def kd_layer_loss(scores: torch.Tensor, target_probs: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    r"""
    The loss of a letKD KD layer (Görgün et al., 2023, https://huggingface.co/papers/2309.02843):
    `KL(p_T || softmax(scores))` summed over the `K` templates at each position, averaged over positions.

    This is the official `F.kl_div(log_softmax(scores), p_T, reduction="batchmean")` on positions flattened to rows:
    a CNN's `B * H * W` pixels or a transformer's real (non-padding) tokens, as [`hf_kd.KDLayer`] returns them.

    Args:
        scores (`torch.Tensor` of shape `(N, K)`): the KD layer's template scores (logits), one row per position.
        target_probs (`torch.Tensor` of shape `(N, K)`): the teacher's distributions over the templates
            ([`hf_kd.kd_layer_targets`]); gradients flow into them if they require any.
        reduction (`str` or [`~hf_kd.options.Reduction`], *optional*, defaults to `"mean"`): `"mean"` over
            positions (0 when `N = 0`), `"sum"`, or `"none"` (one value per position).

    Returns:
        `torch.Tensor`: a scalar (or `(N,)` for `"none"`), in float32 (float64 for float64 inputs).

    Raises:
        `ValueError`: shapes that differ or are not 2-D, or an unknown `reduction`.
    """
    _check_reduction(reduction, None)
    _check_tensors(scores=scores, target_probs=target_probs)
    if scores.shape != target_probs.shape or scores.dim() != 2:
        raise ValueError(
            f"scores and target_probs must both have shape (num_positions, num_templates), got {tuple(scores.shape)} "
            f"and {tuple(target_probs.shape)}"
        )
    log_probs = F.log_softmax(_upcast(scores), dim=-1)
    targets = _upcast(target_probs)
    # KL = sum p log p - sum p log q, with 0 log 0 = 0 (p is clamped inside the log only) and a -inf log-probability
    # (a -inf score) kept from meeting a zero target weight (0 * -inf = NaN). Few passes over the (N, K) tensors,
    # K being 4096 in letKD (torch.special.xlogy is twice as slow on CPU).
    finfo = torch.finfo(log_probs.dtype)
    entropy_term = (targets * targets.clamp_min(finfo.tiny).log()).sum(-1)
    per_item = entropy_term - (targets * log_probs.clamp_min(finfo.min)).sum(-1)
    return _reduce(per_item, torch.ones_like(per_item, dtype=torch.bool), reduction, None)


def dedier_weights(
    readout_logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    alpha: float = 0.2,
    beta: float = 3.0,
) -> torch.Tensor:
    r"""
    One DEDIER re-weighting step ([Tiwari et al., WACV 2024](https://huggingface.co/papers/2310.18590), "Using Early
    Readouts to Mediate Featural Bias in Distillation"): samples that an early readout gets wrong are up-weighted
    by how confident it was.

    ```
    q         = softmax(readout_logits)
    margin    = q_(1) - q_(2)                     # top-1 minus top-2 probability, in [0, 1]
    misread   = argmax(q) != labels
    new_w     = exp(beta * margin^alpha)  where misread
              = weights                   elsewhere (unchanged: initialised to 1 and never reset)
    ```

    For two classes `margin = |q_0 - q_1|`, the paper code's "confidence". For `K > 2` classes the top-1 minus
    top-2 gap is the natural generalisation (it equals `|q_0 - q_1|` when `K = 2`, is 0 on a tie, 1 on a one-hot
    readout). Note the formula is `exp(beta * margin^alpha)`, not `exp(beta * margin * alpha)`: with a small `alpha`,
    `margin^alpha ~ 1` and every misread sample gets about `e^beta` (a JTT-like constant up-weight, softly gated by the
    readout's confidence). A misread sample's weight is **replaced**, not multiplied, so weights stay in
    `[1, e^beta]` when they start at 1.

    Args:
        readout_logits (`torch.Tensor` of shape `(N, K)`, `K >= 2`):
            The early readout's logits on the training samples.
        labels (`torch.Tensor` of shape `(N,)`):
            Gold class indices; `-100` rows are never misread (their weight is unchanged).
        weights (`torch.Tensor` of shape `(N,)`):
            The current weights (all 1 before the first step).
        alpha (`float`, *optional*, defaults to `0.2`):
            Exponent of the margin, `>= 0` (PAPERS.md: 0.2 for MultiNLI, 0.05 Waterbirds, 0.1 CelebA, 0.05 Jigsaw).
            `alpha = 0` gives every misread sample `e^beta` (`0^0 = 1`).
        beta (`float`, *optional*, defaults to `3.0`):
            Scale in the exponent, `>= 0` (3 for MultiNLI and Jigsaw, 4 Waterbirds, 3.5 CelebA). `beta = 0` keeps
            every weight at 1.

    Returns:
        `torch.Tensor` of shape `(N,)`, dtype and device of `weights`: the new weights (a new tensor; `weights` is
        not modified).

    Example:

    ```python
    >>> import torch
    >>> from hf_kd.losses import dedier_weights
    >>> logits = torch.tensor([[2.0, 0.0], [2.0, 0.0]])  # both read as class 0, q = (0.881, 0.119)
    >>> dedier_weights(logits, torch.tensor([0, 1]), torch.ones(2), alpha=1.0, beta=1.0)  # row 1 is misread
    tensor([1.0000, 2.1417])
    ```
    """
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    if not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    _check_tensors(readout_logits=readout_logits, labels=labels, weights=weights)
    if readout_logits.dim() != 2 or readout_logits.shape[1] < 2:
        raise ValueError(f"readout_logits must have shape (N, K) with K >= 2, got {tuple(readout_logits.shape)}")
    num_samples = readout_logits.shape[0]
    if labels.shape != (num_samples,) or weights.shape != (num_samples,):
        raise ValueError(
            f"labels and weights must have shape ({num_samples},), got {tuple(labels.shape)} and "
            f"{tuple(weights.shape)}"
        )
    _check_class_labels(labels, readout_logits.shape[1])
    _check_finite(readout_logits, "readout_logits", ": a NaN readout would make that sample's weight NaN")
    probs = F.softmax(_upcast(readout_logits), dim=-1)
    top2 = probs.topk(2, dim=-1)
    margin = top2.values[:, 0] - top2.values[:, 1]  # (N,), in [0, 1]
    labels = labels.to(probs.device).long()
    # argmax, not topk's index: on ties topk may return any of the tied classes, argmax the first, as the metrics.
    misread = (labels != -100) & (probs.argmax(dim=-1) != labels)
    upweight = torch.exp(beta * margin.pow(alpha))
    return torch.where(misread.to(weights.device), upweight.to(weights), weights)


def self_kd_loss(
    exit_logits,
    labels: torch.Tensor,
    source_exit: int,
    lmbda: float = 0.6,
    temperature: float = 1.0,
    divergence: str = "kl",
    source_correction: str = "source_wrong_main_right",
    other_exits: str = "ce",
    recalibrate: torch.Tensor | None = None,
    recalibration_loss: str = "replace",
    num_items_in_batch: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""
    The self-distillation objective of Park et al., "Self-Knowledge Distillation for Learning Ambiguity" (2024,
    https://huggingface.co/papers/2406.09719), Phases B and C, on the exits of a multi-exit model (one classifier
    per layer). With `p_L` the main (final) classifier, `p_s` the source layer's, `sg` a stopped gradient and `D` the
    `divergence` at temperature `T` (scaled by `T^2`, as in [`kd_loss`]):

    ```
    main:    L_main = (1 - lmbda) * CE(y, p_L) + lmbda * D(sg[p_s] || p_L)
    source:  L_src  = CE(y, p_s) + c(x) * D(sg[p_L] || p_s)
             c(x)   = [argmax p_s != y and argmax p_L == y]   ("source_wrong_main_right")
                    = [argmax p_s != y]                       ("source_wrong")
    others:  sum_j CE(y, p_j) over the other exits            (other_exits="ce"; nothing with "none")
    Phase C, for the samples x in the re-calibration set A (`recalibrate`), towards the uniform u over K classes:
             L_main(x) = KL(u || p_L)                          ("replace": the gold label's pull is removed)
             L_main(x) = L_main(x) + KL(u || p_L)              ("add")
    loss   = mean over labelled samples of L_main + L_src + others
    ```

    Only the main classifier is re-calibrated; the source and the other exits keep their losses on A. `KL(u || p_L)`
    equals `CE(u, p_L) - log K`, so its minimum is 0 at the uniform prediction.

    Args:
        exit_logits (sequence of `torch.Tensor` of shape `(batch, num_labels)`):
            Logits of every exit, shallowest first; the last one is the main classifier.
        labels (`torch.Tensor` of shape `(batch,)`):
            Gold class indices, `-100` for ignored rows (they contribute nothing and are not counted).
        source_exit (`int`):
            0-based index of the source layer's exit in `exit_logits`, not the last one.
        lmbda (`float`, *optional*, defaults to `0.6`):
            Weight `lambda` in `[0, 1]` of the distillation term of the main classifier (the paper's 0.6).
        temperature (`float`, *optional*, defaults to `1.0`):
            Temperature `T > 0` of both distillation terms (not of the re-calibration term, which is at `T = 1`).
        divergence (`str` or [`~hf_kd.options.DistillDivergence`], *optional*, defaults to `"kl"`):
            `"kl"` (teacher first) or `"js"`; see [`kd_loss`].
        source_correction (`str` or [`~hf_kd.options.SourceCorrection`], *optional*, defaults to
            `"source_wrong_main_right"`):
            Which samples teach the source layer from the main classifier, see `c(x)` above.
        other_exits (`str` or [`~hf_kd.options.OtherExitLoss`], *optional*, defaults to `"ce"`):
            `"ce"`: the exits that are neither the source nor the main classifier keep their cross-entropy; `"none"`:
            they get no loss (their heads stop learning; their layers still learn through the deeper exits).
        recalibrate (`torch.Tensor` of shape `(batch,)` and dtype `bool`, *optional*):
            Which samples of the batch are in the re-calibration set; `None` outside Phase C.
        recalibration_loss (`str` or [`~hf_kd.options.RecalibrationLoss`], *optional*, defaults to `"replace"`):
            `"replace"` or `"add"`, see above.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*):
            Number of labelled rows of the accumulated batch; the loss is then `sum / num_items_in_batch` (see
            [`kd_loss`]).

    Returns:
        `(loss, parts)`: the scalar loss (float32, or float64 for float64 logits), and `parts`, detached per-part means
        over the labelled rows of this batch: `main_loss`, `source_loss`, `other_exits_loss` (0 without other exits),
        `source_correction_fraction` (share of rows with `c(x) = 1`) and `recalibrated_fraction`.

    Raises:
        `ValueError`: fewer than 2 exits, a `source_exit` that is not a non-final exit, `lmbda` outside `[0, 1]`, an
        unknown option, or a `recalibrate` mask of the wrong shape.
    """
    num_exits = len(exit_logits)
    if num_exits < 2:
        raise ValueError(f"self-distillation needs at least 2 exits (a source and the main classifier), got {num_exits}")
    if isinstance(source_exit, bool) or not isinstance(source_exit, int) or not 0 <= source_exit < num_exits - 1:
        raise ValueError(f"source_exit must be a non-final exit index in [0, {num_exits - 1}), got {source_exit!r}")
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda must be in [0.0, 1.0], got {lmbda}")
    source_correction = to_enum(SourceCorrection, source_correction, "source_correction")
    other_exits = to_enum(OtherExitLoss, other_exits, "other_exits")
    recalibration_loss = to_enum(RecalibrationLoss, recalibration_loss, "recalibration_loss")
    _check_tensors(labels=labels, **{f"exit_logits[{i}]": logits for i, logits in enumerate(exit_logits)})
    main, source = exit_logits[-1], exit_logits[source_exit]
    _check_class_labels(labels, main.shape[-1])
    labels = labels.reshape(-1).long()
    if recalibrate is not None and recalibrate.shape != labels.shape:
        raise ValueError(f"recalibrate must have shape {tuple(labels.shape)}, got {tuple(recalibrate.shape)}")
    valid = labels != -100

    def soft(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return kd_loss(student, teacher.detach(), None, temperature, reduction="none", divergence=divergence)

    def cross_entropy(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_upcast(logits), labels, ignore_index=-100, reduction="none")

    main_item = (1 - lmbda) * cross_entropy(main) + lmbda * soft(main, source)
    recalibrated = torch.zeros_like(valid)
    if recalibrate is not None:
        recalibrated = recalibrate.to(valid.device).bool() & valid
        # Zero logits are the uniform distribution: kd_loss without labels is KL(u || p_L) at T = 1.
        towards_uniform = kd_loss(main, torch.zeros_like(main), None, 1.0, reduction="none")
        if recalibration_loss is RecalibrationLoss.REPLACE:
            main_item = torch.where(recalibrated, towards_uniform, main_item)
        else:
            main_item = main_item + recalibrated * towards_uniform

    with torch.no_grad():
        source_wrong = source.argmax(-1) != labels
        correct = source_wrong & valid
        if source_correction is SourceCorrection.SOURCE_WRONG_MAIN_RIGHT:
            correct = correct & (main.argmax(-1) == labels)
    source_item = cross_entropy(source) + correct * soft(source, main)

    others = [z for j, z in enumerate(exit_logits[:-1]) if j != source_exit] if other_exits is OtherExitLoss.CE else []
    other_item = sum((cross_entropy(z) for z in others), torch.zeros_like(source_item))

    per_item = main_item + source_item + other_item
    # where, not multiplication by the mask: inf/NaN at ignored rows must not leak into the loss.
    per_item = torch.where(valid, per_item, torch.zeros_like(per_item))
    loss = _reduce(per_item, valid, "mean", num_items_in_batch)

    count = valid.sum().clamp_min(1)
    with torch.no_grad():
        parts = {
            "main_loss": torch.where(valid, main_item, 0.0).sum() / count,
            "source_loss": torch.where(valid, source_item, 0.0).sum() / count,
            "other_exits_loss": torch.where(valid, other_item, 0.0).sum() / count,
            "source_correction_fraction": correct.sum() / count,
            "recalibrated_fraction": recalibrated.sum() / count,
        }
    return loss, {k: v.detach() for k, v in parts.items()}


# ----- causal language models: token-level distillation over a vocabulary -----


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`(a * b).sum(-1)` for `(N, V)` tensors, as N dot products (no `(N, V)` temporary)."""
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).reshape(a.shape[0])


class LMLossParts(NamedTuple):
    """
    What [`lm_kd_loss`] and [`sparse_lm_kd_loss`] return with `return_parts=True`, from one pass over the tokens.

    Attributes:
        loss (`torch.Tensor`): the loss itself, exactly what `return_parts=False` returns (differentiable).
        kd (`torch.Tensor`): the soft term `T^2 * D(p_T, p_S)`, detached, as a mean over the counted tokens of this
            call (what the same call with `alpha=1` and no `num_items_in_batch` returns).
        ce (`torch.Tensor`): the cross-entropy with the gold tokens, detached, as a mean over the same tokens (what
            `alpha=0` and no `num_items_in_batch` returns).
    """

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


def _lm_chunk(
    student_rows: Callable[[], torch.Tensor],
    teacher_rows: Callable[[], torch.Tensor],
    targets: torch.Tensor,
    options: tuple,
    needs_grad: tuple[bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Sums of the divergence and of the cross-entropy over one chunk of counted rows, and the gradients of
    `alpha T^2 divergence + (1 - alpha) CE` w.r.t. the chunk's student and teacher logits.

    `student_rows()` and `teacher_rows()` return the chunk's `(N, V)` logits in float32 (or wider): callables, so that
    this function holds the only reference and can free each one as soon as it is used.

    `options` is `(loss_type, beta, temperature, alpha, parts)`: with `parts` both sums are computed whatever
    `alpha` (for the logged loss parts), else only the terms `alpha` weighs. Returns `(divergence_sum,
    cross_entropy_sum, teacher_all_finite, grad_student_rows, grad_teacher_rows)`, each gradient `(N, V)` in float32
    (None when not needed). Closed forms, with `a = log p_S`, `b = log p_T` at temperature T, `D` the per-row
    divergence, and the softmax Jacobian folded in (d/dlogits = (g - p * sum(g)) / T for a gradient g w.r.t. the
    log-probabilities):

        forward  KL(p_T || p_S):  d/ds = (p_S - p_T) / T                    d/dt = p_T (b - a - D) / T
        reverse  KL(p_S || p_T):  d/ds = p_S (a - b - D) / T                d/dt = (p_T - p_S) / T
        jsd      (M = beta p_T + (1 - beta) p_S):
                                  d/ds = (1 - beta) p_S (a - log M - KL(p_S || M)) / T
                                  d/dt = beta p_T (b - log M - KL(p_T || M)) / T
        CE (T = 1):               d/ds = softmax(s) - onehot(label)

    Written with in-place operations so that a chunk holds about five (N, V) float32 tensors at its peak, gathered
    rows included (docs/benchmarks/lm_kd_loss.md).
    """
    loss_type, beta, temperature, alpha, parts = options
    need_student, need_teacher = needs_grad
    student = student_rows()
    divergence_sum = cross_entropy_sum = student.new_zeros(())
    grad_student = grad_teacher = None
    log_s = None
    with_divergence = alpha > 0 or parts
    if alpha < 1 or parts:  # the CE first: then the gathered student rows can be freed before the divergence's tensors exist
        log_q = F.log_softmax(student, dim=-1)  # untempered
        cross_entropy_sum = -log_q.gather(-1, targets[:, None]).sum()
        if with_divergence and temperature == 1.0:
            log_s = log_q
        if need_student and alpha < 1:
            grad_student = log_q.exp() if log_s is not None else log_q.exp_()
            grad_student[torch.arange(grad_student.shape[0], device=grad_student.device), targets] -= 1.0
            grad_student.mul_(1.0 - alpha)
        del log_q
    teacher = teacher_rows()
    teacher_finite = torch.isfinite(teacher).all()
    if not with_divergence:
        return divergence_sum, cross_entropy_sum, teacher_finite, grad_student, grad_teacher
    # A divergence computed for the logged parts only (alpha = 0) has no gradient.
    need_student, need_teacher = need_student and alpha > 0, need_teacher and alpha > 0
    if loss_type is LMLossType.JSD and beta in (0.0, 1.0):
        # TRL's generalized_jsd_loss special-cases the end points as the two KLs: the mixture formula itself tends to
        # 0 there (M becomes p_S or p_T), so jsd is discontinuous at beta = 0 and 1, by that convention.
        loss_type = LMLossType.FORWARD_KL if beta == 0.0 else LMLossType.REVERSE_KL
    scale = alpha * temperature  # d(alpha T^2 D)/dlogits = alpha T^2 (1/T) (...)
    if log_s is None:
        log_s = F.log_softmax(student / temperature if temperature != 1.0 else student, dim=-1)
    log_t = F.log_softmax(teacher / temperature if temperature != 1.0 else teacher, dim=-1)
    del student, teacher

    def add_student(grad):
        nonlocal grad_student
        grad_student = grad.mul_(scale) if grad_student is None else grad_student.add_(grad, alpha=scale)

    if loss_type is LMLossType.FORWARD_KL:
        p_t = log_t.exp()
        difference = log_t.sub_(log_s)  # b - a (log_t is not needed after this)
        divergence = _row_dot(difference, p_t)
        if need_teacher:
            grad_teacher = difference.sub_(divergence[:, None]).mul_(p_t).mul_(scale)
        del difference
        if need_student:
            add_student(log_s.exp_().sub_(p_t))
    elif loss_type is LMLossType.REVERSE_KL:
        p_s = log_s.exp()
        if need_teacher:
            grad_teacher = log_t.exp().sub_(p_s).mul_(scale)
        difference = log_s.sub_(log_t)  # a - b (log_s is not needed after this)
        del log_t
        divergence = _row_dot(difference, p_s)
        if need_student:
            add_student(difference.sub_(divergence[:, None]).mul_(p_s))
    else:
        log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
        p_t = log_t.exp()
        to_teacher = log_t.sub_(log_m)  # b - log M (log_t is not needed after this)
        kl_teacher = _row_dot(to_teacher, p_t)
        if need_teacher:
            grad_teacher = to_teacher.sub_(kl_teacher[:, None]).mul_(p_t).mul_(beta * scale)
        del to_teacher, p_t
        p_s = log_s.exp()
        to_student = log_s.sub_(log_m)  # a - log M
        del log_m
        kl_student = _row_dot(to_student, p_s)
        if need_student:
            add_student(to_student.sub_(kl_student[:, None]).mul_(p_s).mul_(1.0 - beta))
        divergence = beta * kl_teacher + (1.0 - beta) * kl_student
    return divergence.sum(), cross_entropy_sum, teacher_finite, grad_student, grad_teacher


class LMHeadInputs(NamedTuple):
    """
    The logits of a causal LM given as what makes them, `hidden_states @ weight.T`, for [`lm_kd_loss`] and
    [`sparse_lm_kd_loss`] to project chunk by chunk: the full `(batch, seq, vocab)` logits, and their gradient, are
    then never made (the "fused linear" loss of Liger-Kernel and of TRL's `DistillationTrainer`, here without
    recomputing the projection in backward).

    Attributes:
        hidden_states (`torch.Tensor` of shape `(batch, seq, hidden)`):
            The final hidden states (after the model's final norm), what the LM head reads.
        weight (`torch.Tensor` of shape `(vocab, hidden)`):
            The LM head's weight (`model.get_output_embeddings().weight`; tied to the input embeddings in many
            models, which is fine: its gradient reaches the shared parameter). A head with a bias, logit soft-capping or
            logit scaling is not a plain `hidden @ weight.T` and cannot be given this way.
    """

    hidden_states: torch.Tensor
    weight: torch.Tensor


def shifted_logits(logits: torch.Tensor | LMHeadInputs, device=None) -> torch.Tensor | LMHeadInputs:
    """
    Positions `0 .. seq - 2` of a causal LM's logits, each of which predicts the label one position on: what the
    token losses take with `labels[:, 1:]`.

    Args:
        logits (`torch.Tensor` of shape `(batch, seq, vocab)` or [`LMHeadInputs`]): the logits, or what makes them.
        device (`torch.device` or `str`, *optional*): where to put the result (default: where it is).

    Returns:
        The same kind as `logits`, `(batch, seq - 1, ...)`; an [`LMHeadInputs`] keeps its `weight` whole.
    """
    if isinstance(logits, LMHeadInputs):
        return LMHeadInputs(logits.hidden_states[:, :-1].to(device), logits.weight.to(device))
    return logits[:, :-1].to(device)


def _check_head_inputs(name: str, value) -> None:
    """`TypeError`/`ValueError` naming `name` unless `value` is a tensor, or an [`LMHeadInputs`] of a 3-D
    `hidden_states` and a 2-D `weight` with the same hidden size."""
    if not isinstance(value, LMHeadInputs):
        _check_tensors(**{name: value})
        return
    _check_tensors(**{f"{name}.hidden_states": value.hidden_states, f"{name}.weight": value.weight})
    hidden, weight = value
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"{name} must be LMHeadInputs(hidden_states of shape (batch, seq, hidden), weight of shape (vocab, hidden)), "
            f"got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )


def _logits_shape(value) -> tuple[int, ...]:
    """The `(batch, seq, vocab)` shape of logits given as a tensor or as [`LMHeadInputs`]."""
    if isinstance(value, LMHeadInputs):
        return (*value.hidden_states.shape[:2], value.weight.shape[0])
    return tuple(value.shape)


def _logits_dtype(value) -> torch.dtype:
    return value.hidden_states.dtype if isinstance(value, LMHeadInputs) else value.dtype


class _ChunkedTokenLoss(torch.autograd.Function):
    """
    `alpha T^2 sum_i D_i + (1 - alpha) sum_i CE_i` over the counted positions, computed `chunk_size` rows at a time
    by `chunk_loss` ([`_lm_chunk`] for [`lm_kd_loss`], [`_sparse_lm_chunk`] for [`sparse_lm_kd_loss`]); also returns
    the two sums (non-differentiable, for the logged loss parts) and whether the teacher's rows were finite.

    Each side comes as logits `(batch, seq, vocab)` with `head=None`, or as hidden states `(batch, seq, hidden)` with
    the LM head's `(vocab, hidden)` weight as `head` ([`LMHeadInputs`]), projected here one chunk of rows at a time.
    The gradient of each chunk is computed in closed form right after its loss and written into one buffer shaped
    like the input (with a head: `grad_rows @ head` into the hidden states' buffer, and `grad_rows.T @ rows` added
    to the head's); `backward` only scales those buffers. So the float32 intermediates of a chunk are freed before
    the next chunk starts: nothing of size `(batch, seq, vocab)` is kept for backward except the logits' gradient
    itself, which autograd needs in any case, and with a head not even that. (Plain autograd through the chunks keeps
    every chunk's intermediates until backward, i.e. several full-size float32 tensors; checkpointing each chunk frees
    them but runs every chunk's forward twice: see docs/benchmarks/lm_kd_loss.md.)
    """

    @staticmethod
    def forward(ctx, student, student_head, teacher, teacher_head, rows, chunk_loss, weights, chunk_size, grad_enabled):
        # forward always runs with grad mode off: whether the caller records a graph comes in as `grad_enabled`.
        # `teacher` is None for the sparse loss (its cached targets never get a gradient).
        sides = ((student, student_head), (teacher, teacher_head))
        needs = ctx.needs_input_grad
        needs_grad = tuple(grad_enabled and (needs[2 * i] or needs[2 * i + 1]) for i in range(2))
        gradients = [None] * 4  # student, student_head, teacher, teacher_head
        dtype = torch.promote_types(student.dtype, torch.float32)
        sums = student.new_zeros(2, dtype=dtype)  # divergence, cross-entropy
        teacher_finite = torch.ones((), dtype=torch.bool, device=student.device)
        batch_index, position_index = rows
        for start in range(0, batch_index.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            chunk_rows = (batch_index[chunk], position_index[chunk])

            def gather(side, chunk_rows=chunk_rows):
                values, head = side
                values = values[chunk_rows]
                # The projection in the model's dtype, as its own LM head would compute it, then upcast.
                return _upcast(values if head is None else F.linear(values, head))

            divergence, cross_entropy, finite, *grads = chunk_loss(
                lambda: gather(sides[0]), (lambda: gather(sides[1])) if teacher is not None else None, chunk,
                needs_grad,
            )
            sums[0] += divergence
            sums[1] += cross_entropy
            teacher_finite &= finite
            for i, ((values, head), grad) in enumerate(zip(sides, grads)):
                if grad is None:
                    continue
                if needs[2 * i]:  # the logits' (or hidden states') buffer, allocated at the first counted chunk
                    if gradients[2 * i] is None:
                        gradients[2 * i] = torch.zeros_like(values, memory_format=torch.contiguous_format)
                    gradients[2 * i][chunk_rows] = (grad if head is None else grad.to(head.dtype) @ head).to(values.dtype)
                if head is not None and needs[2 * i + 1]:
                    if gradients[2 * i + 1] is None:  # summed over the chunks in float32 at least (bf16 sums drift)
                        gradients[2 * i + 1] = torch.zeros_like(head, dtype=torch.promote_types(head.dtype, dtype))
                    gradients[2 * i + 1].addmm_(grad.T, values[chunk_rows].to(grad.dtype))
        for i in (1, 3):
            if gradients[i] is not None:
                gradients[i] = gradients[i].to(sides[i // 2][1].dtype)
        ctx.save_for_backward(*gradients)
        ctx.mark_non_differentiable(sums, teacher_finite)
        return weights[0] * sums[0] + weights[1] * sums[1], sums, teacher_finite

    @staticmethod
    def backward(ctx, grad_total, grad_sums, grad_finite):
        # In place: a scaled copy would be one more (batch, seq, vocab) tensor. The buffers are this graph's own and
        # are freed with it; a second backward through the same graph is refused by autograd's saved-tensor checks.
        gradients = [None if g is None else g.mul_(grad_total.to(g.dtype)) for g in ctx.saved_tensors]
        return (*gradients, None, None, None, None, None)


def _chunked_token_loss(student_logits, teacher_logits, rows, chunk_loss, options, chunk_size, num_items_in_batch):
    """Run [`_ChunkedTokenLoss`] on logits given as tensors or [`LMHeadInputs`] (`teacher_logits` None for the sparse
    loss) and normalise: the loss (`sum / num_items_in_batch`, or / the number of counted rows), with `options[-1]`
    (`return_parts`) an [`LMLossParts`]. Raises on non-finite teacher rows."""
    _, _, temperature, alpha, parts = options

    def split(logits):
        return (logits.hidden_states, logits.weight) if isinstance(logits, LMHeadInputs) else (logits, None)

    total, sums, teacher_finite = _ChunkedTokenLoss.apply(
        *split(student_logits), *split(teacher_logits), rows, chunk_loss, (alpha * temperature**2, 1.0 - alpha),
        chunk_size, torch.is_grad_enabled(),
    )
    if not teacher_finite.item():
        raise ValueError(
            "teacher_logits contain NaN or inf at a counted position: check the teacher's dtype (fp16 overflow) and "
            "inputs"
        )
    count = torch.tensor(rows[0].shape[0], device=total.device)
    loss = total / _normalizer(num_items_in_batch, count)
    if not parts:
        return loss
    means = sums / count.clamp_min(1)
    return LMLossParts(loss, temperature**2 * means[0], means[1])


def _check_lm_loss_options(loss_type, beta: float, temperature: float, alpha: float, chunk_size: int) -> LMLossType:
    """The checks [`lm_kd_loss`] and [`sparse_lm_kd_loss`] share: `loss_type` as an [`LMLossType`], `beta` and
    `alpha` in `[0, 1]`, `temperature > 0`, `chunk_size` a positive int; a `ValueError` naming the bad value
    otherwise."""
    loss_type = to_enum(LMLossType, loss_type, "loss_type")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0.0, 1.0], got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0.0, 1.0], got {alpha}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return loss_type


def lm_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    loss_type: LMLossType | str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 1.0,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = 128,
    return_parts: bool = False,
) -> torch.Tensor | LMLossParts:
    r"""
    Token-level distillation loss of a causal language model, computed in chunks of tokens.

    For every counted position `i` (`labels[i] != -100`), with `p_T = softmax(teacher_logits[i] / T)` and
    `p_S = softmax(student_logits[i] / T)`:

    ```
    loss_i = alpha * T^2 * D(p_T, p_S) + (1 - alpha) * CE(labels[i], softmax(student_logits[i]))
    loss   = sum_i loss_i / num_items_in_batch    (or / the number of counted positions when it is not given)
    ```

    with `D` chosen by `loss_type`:

    - `"forward_kl"`: `KL(p_T || p_S)`;
    - `"reverse_kl"`: `KL(p_S || p_T)`;
    - `"jsd"`: `beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)` with `M = beta * p_T + (1 - beta) * p_S`, the
      generalised JSD of GKD (Agarwal et al., 2024, https://huggingface.co/papers/2306.13649, Eq. 1) as TRL's
      `generalized_jsd_loss` defines it, including its end points: `beta=0` **is** `KL(p_T || p_S)` and `beta=1`
      **is** `KL(p_S || p_T)` (TRL special-cases them; the formula itself would tend to 0 there). `beta=0.5` is the
      ordinary Jensen-Shannon divergence.

    Differences from TRL's `GKDTrainer` loss: the temperature applies to both distributions *and* the divergence is
    scaled by `T^2` (Hinton's convention, as in [`kd_loss`]; TRL divides by T but does not rescale), and a
    cross-entropy term on the gold tokens can be mixed in with `alpha` (TRL has none; `alpha=1`, the default, is pure
    distillation). The cross-entropy is always at temperature 1. All natural logs, summed over the vocabulary.

    Memory: only the counted rows are gathered, `chunk_size` tokens at a time, and upcast to float32 chunk by chunk;
    each chunk's gradient is computed at once, in closed form, and written into one buffer shaped like
    `student_logits` (what autograd needs anyway), so no other full-size `(batch, seq, vocab)` tensor is made, in the
    forward or for the backward (measured in docs/benchmarks/lm_kd_loss.md). The result is differentiable once with
    respect to `student_logits` (and `teacher_logits` if it requires grad); double backward is not supported. Under
    `torch.no_grad()` no gradient is computed.

    Args:
        student_logits (`torch.Tensor` of shape `(batch, seq, vocab)`):
            Student logits, any float dtype (computed in float32 or wider).
        teacher_logits (`torch.Tensor` of shape `(batch, seq, vocab)`):
            Teacher logits over the **same vocabulary** (same tokenizer). Pass them detached (or computed under
            `torch.no_grad()`) unless the teacher is trained too.
        labels (`torch.Tensor` of shape `(batch, seq)` and integer dtype):
            Gold next tokens **already aligned with the logits**: `labels[b, i]` is the token that position `i`
            predicts. The caller does the causal shift (a model's own `labels` are the input ids; pass
            `logits[:, :-1]` with `labels[:, 1:]`). `-100` marks positions that count for nothing (prompt, padding).
        loss_type ([`~hf_kd.options.LMLossType`] or `str`, *optional*, defaults to `"forward_kl"`):
            `"forward_kl"`, `"reverse_kl"` or `"jsd"`, see above.
        beta (`float`, *optional*, defaults to `0.5`):
            Weight of the teacher in the mixture of `"jsd"`, in `[0, 1]` (ignored by the other loss types).
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature `T > 0` of the divergence.
        alpha (`float`, *optional*, defaults to `1.0`):
            Weight of the divergence, in `[0, 1]`; the cross-entropy gets `1 - alpha`. `alpha=0` is plain
            next-token cross-entropy on the counted tokens.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*):
            Number of counted tokens over all gradient-accumulation micro-batches (and devices), as
            [`~transformers.Trainer`] passes it to `compute_loss`; the loss is then `sum / num_items_in_batch`, so
            summing the micro-batch losses gives the mean over the effective batch (TRL #4719, #6006).
        chunk_size (`int`, *optional*, defaults to `128`):
            Number of tokens processed at once. Besides the gradient buffer, the peak extra memory is about five
            float32 `(chunk_size, vocab)` tensors (~120 MB at 128 x 49,152, SmolLM2; ~640 MB at 128 x 262,144,
            Gemma 3); smaller chunks were no slower on CPU down to 32. The result does not depend on it beyond float
            rounding.
        return_parts (`bool`, *optional*, defaults to `False`):
            Also return the two terms, from the same pass over the tokens: an [`LMLossParts`] `(loss, kd, ce)` with
            `kd` the mean of `T^2 * D` and `ce` the mean cross-entropy over this call's counted tokens (detached),
            i.e. what the calls with `alpha=1` and `alpha=0` (without `num_items_in_batch`) return, at the cost of
            one. Both terms are then computed whatever `alpha` (the one `alpha` zeroes gets no gradient).

    Returns:
        `torch.Tensor`: a scalar in float32 (float64 for float64 logits); 0 when no position is counted. With
        `return_parts=True`, an [`LMLossParts`].

    Raises:
        `ValueError`: logits that are not 3-D or whose `(batch, seq)` differ, different vocabulary sizes, `labels` not
        of shape `(batch, seq)` or not integer, a label outside `[0, vocab)` and not `-100`, an unknown `loss_type`,
        `beta` or `alpha` outside `[0, 1]`, `temperature <= 0`, `chunk_size < 1`, or NaN/inf teacher logits at a
        counted position. `TypeError`: an argument that is not a tensor.

    Example:

    ```python
    >>> import torch
    >>> from hf_kd.losses import lm_kd_loss
    >>> logits = torch.randn(2, 5, 11)
    >>> labels = torch.tensor([[-100, 3, 4, 5, -100], [-100, -100, 1, 2, 3]])
    >>> lm_kd_loss(logits, logits, labels).item()  # KL(p || p) = 0
    0.0
    ```
    """
    loss_type = _check_lm_loss_options(loss_type, beta, temperature, alpha, chunk_size)
    _check_head_inputs("student_logits", student_logits)
    _check_head_inputs("teacher_logits", teacher_logits)
    _check_tensors(labels=labels)
    student_shape, teacher_shape = _logits_shape(student_logits), _logits_shape(teacher_logits)
    for name, shape in (("student_logits", student_shape), ("teacher_logits", teacher_shape)):
        if len(shape) != 3:
            raise ValueError(f"{name} must have shape (batch, seq, vocab), got {shape}")
    if student_shape[:2] != teacher_shape[:2]:
        raise ValueError(
            f"student_logits and teacher_logits must have the same (batch, seq), got {student_shape} and {teacher_shape}"
        )
    vocab = student_shape[-1]
    if teacher_shape[-1] != vocab:
        raise ValueError(
            f"The student's vocabulary has {vocab} entries and the teacher's {teacher_shape[-1]}: token-level "
            "distillation needs the same vocabulary (same tokenizer) on both sides. Distil between models of one "
            "family, or pad the smaller embedding matrix if one tokenizer only extends the other."
        )
    if tuple(labels.shape) != student_shape[:2]:
        raise ValueError(
            f"labels must have shape {student_shape[:2]} (the logits' batch and seq), got {tuple(labels.shape)}"
        )
    _check_class_labels(labels, vocab)

    rows = (labels != -100).nonzero(as_tuple=True)
    targets = labels[rows].long()
    options = (loss_type, float(beta), float(temperature), float(alpha), bool(return_parts))

    def chunk_loss(student_rows, teacher_rows, chunk, needs_grad):
        return _lm_chunk(student_rows, teacher_rows, targets[chunk], options, needs_grad)

    return _chunked_token_loss(student_logits, teacher_logits, rows, chunk_loss, options, chunk_size,
                               num_items_in_batch)


def _sparse_divergence(log_t: torch.Tensor, log_s: torch.Tensor, loss_type: LMLossType, beta: float) -> torch.Tensor:
    """Per-row divergence `D(p_T, p_S)` of two `(N, C)` log-probability tensors (autograd), as [`lm_kd_loss`]
    defines it for each `loss_type` (the JSD end points included)."""
    if loss_type is LMLossType.JSD and beta in (0.0, 1.0):
        loss_type = LMLossType.FORWARD_KL if beta == 0.0 else LMLossType.REVERSE_KL
    if loss_type is LMLossType.FORWARD_KL:
        return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    if loss_type is LMLossType.REVERSE_KL:
        return F.kl_div(log_t, log_s, reduction="none", log_target=True).sum(-1)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    to_teacher = F.kl_div(log_m, log_t, reduction="none", log_target=True).sum(-1)
    to_student = F.kl_div(log_m, log_s, reduction="none", log_target=True).sum(-1)
    return beta * to_teacher + (1.0 - beta) * to_student


def _sparse_lm_chunk(
    student_rows: Callable[[], torch.Tensor],
    targets: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_cells: torch.Tensor,
    options: tuple,
    needs_grad: tuple[bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, None]:
    """[`_lm_chunk`] of [`sparse_lm_kd_loss`]: the sums of the divergence on the partition and of the cross-entropy
    over one chunk of counted rows, and the gradient w.r.t. the chunk's student logits `student_rows()`, `(N, V)` in
    float32.

    `topk_ids` `(N, k)` and `teacher_cells` `(N, C)` are this chunk's: the teacher's top-k ids and its cell logits
    (`C = k + 1` with the bucket tail, its last cell the rest; `C = k` otherwise). The divergence's gradient w.r.t.
    the student's `C` cell logits `g` comes from autograd on those small tensors; it reaches the vocabulary in closed
    form: `d/ds_j = g_j` for the top-k tokens, and for the rest cell `r = logsumexp(s_j, j not in K)`,
    `d/ds_j = g_rest * exp(s_j - r)` outside `K`.
    """
    loss_type, beta, temperature, alpha, parts = options
    need_student = needs_grad[0]
    student = student_rows()
    divergence_sum = cross_entropy_sum = student.new_zeros(())
    grad_student = None
    if alpha < 1 or parts:
        log_q = F.log_softmax(student, dim=-1)
        cross_entropy_sum = -log_q.gather(-1, targets[:, None]).sum()
        if need_student and alpha < 1:
            grad_student = log_q.exp_()
            grad_student[torch.arange(grad_student.shape[0], device=grad_student.device), targets] -= 1.0
            grad_student.mul_(1.0 - alpha)
        del log_q
    finite = torch.ones((), dtype=torch.bool, device=student.device)  # the cache's values were checked when read
    if not (alpha > 0 or parts):
        return divergence_sum, cross_entropy_sum, finite, grad_student, None
    need_student = need_student and alpha > 0  # a divergence computed for the logged parts only has no gradient
    k, vocab = topk_ids.shape[-1], student.shape[-1]
    cells = [student.gather(-1, topk_ids)]
    outside = None
    if teacher_cells.shape[-1] > k:  # the bucket tail: the student's rest cell, exact and with a stable gradient
        outside = student.scatter_(-1, topk_ids, float("-inf"))  # in place: the gathered rows are not needed again
        cells.append(torch.logsumexp(outside, dim=-1, keepdim=True))
    del student
    with torch.enable_grad():  # autograd on the (N, C) cells only
        student_cells = torch.cat(cells, dim=-1).requires_grad_(need_student)
        log_t = F.log_softmax(teacher_cells / temperature, dim=-1)
        log_s = F.log_softmax(student_cells / temperature, dim=-1)
        divergence_sum = _sparse_divergence(log_t, log_s, loss_type, beta).sum()
        grad_cells = torch.autograd.grad(divergence_sum, student_cells)[0] if need_student else None
    if need_student:
        grad_cells = grad_cells * (alpha * temperature**2)
        if outside is None:
            grad = cells[0].new_zeros(cells[0].shape[0], vocab)
        else:
            grad = outside.sub_(cells[1]).exp_().mul_(grad_cells[:, k:])  # 0 at the top-k ids (exp(-inf))
        grad.scatter_add_(-1, topk_ids, grad_cells[:, :k])
        grad_student = grad if grad_student is None else grad_student.add_(grad)
    return divergence_sum.detach(), cross_entropy_sum, finite, grad_student, None


def sparse_lm_kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    teacher_logsumexp: torch.Tensor,
    labels: torch.Tensor,
    loss_type: LMLossType | str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 1.0,
    num_items_in_batch: torch.Tensor | int | None = None,
    tail: str = "bucket",
    chunk_size: int = 128,
    return_parts: bool = False,
) -> torch.Tensor | LMLossParts:
    r"""
    [`lm_kd_loss`] against a sparse teacher: its top-k logits per token (as the causal-LM teacher-logit cache stores
    them) instead of its full `(vocab,)` logits.

    For every counted position `i` (`labels[i] != -100`) the vocabulary is split into the teacher's `k` top tokens
    `K_i` and, with `tail="bucket"`, one more cell "rest" holding every other token. Teacher and student are compared
    on that partition:

    - `tail="bucket"`: each model's distribution over the `k + 1` cells at temperature 1 (the rest cell gets
      `1 - sum_{j in K_i} p(j)`: for the teacher `exp(teacher_logsumexp)` minus the top-k mass, exact; for the student
      `logsumexp` of its logits outside `K_i`), written as `k + 1` "logits" (`z_j`, and `log sum_{j not in K_i}
      exp(z_j)` for the rest) and tempered as a `(k + 1)`-way softmax: `p = softmax(cell_logits / T)`. At `T = 1`
      this is exactly the coarse-graining of the full distributions, so the divergence is a lower bound of the full
      one (data processing inequality), with equality when `k = vocab`. At `T != 1` it is an approximation: tempering
      the rest cell as one token is not tempering the tokens in it (for `T > 1` the true tempered tail holds more
      mass). Teacher and student are treated alike, so the loss is 0 when they agree, at any `T`.
    - `tail="renormalise"`: both distributions restricted to `K_i` and renormalised, `softmax(z_{K_i} / T)` (the rest
      is ignored; `teacher_logsumexp` is not used).

    `loss_i = alpha * T^2 * D(p_T, p_S) + (1 - alpha) * CE(labels[i], softmax(student_logits[i]))` with `D` chosen by
    `loss_type` as in [`lm_kd_loss`] (`"forward_kl"`, `"reverse_kl"`, `"jsd"` with `beta`), summed and divided by
    `num_items_in_batch` (or the number of counted positions). With `k = vocab` both tails equal [`lm_kd_loss`]
    (values and gradients). The cross-entropy uses the student's full logits at temperature 1.

    Memory: as [`lm_kd_loss`], the counted rows are gathered `chunk_size` tokens at a time and upcast chunk by chunk
    (the cross-entropy and the student's rest cell need its log-softmax over the whole vocabulary); each chunk's
    gradient is written into one buffer shaped like `student_logits` at once (autograd runs on the `(chunk_size, k +
    1)` partition only, and the rest cell's gradient reaches the vocabulary in closed form), so no other full-size
    `(batch, seq, vocab)` tensor is made. The result is differentiable once w.r.t. `student_logits`; the teacher's
    top-k logits get no gradient.

    Args:
        student_logits (`torch.Tensor` of shape `(batch, seq, vocab)`):
            Student logits, already aligned with `labels` (the caller shifts).
        topk_ids (`torch.Tensor` of shape `(batch, seq, k)` and integer dtype):
            The teacher's top-k token ids at each position (distinct within a position; read at counted positions
            only).
        topk_logits (`torch.Tensor` of shape `(batch, seq, k)`):
            The teacher's logits of those tokens, at temperature 1.
        teacher_logsumexp (`torch.Tensor` of shape `(batch, seq)`):
            `logsumexp` of **all** the teacher's logits at each position, at temperature 1 (used by `tail="bucket"`).
        labels (`torch.Tensor` of shape `(batch, seq)`):
            Gold next tokens aligned with the logits, `-100` for positions that do not count.
        loss_type, beta, temperature, alpha, num_items_in_batch:
            As in [`lm_kd_loss`].
        tail (`str`, *optional*, defaults to `"bucket"`):
            `"bucket"` or `"renormalise"`, see above.
        chunk_size, return_parts:
            As in [`lm_kd_loss`].

    Returns:
        `torch.Tensor`: a scalar (float32, or float64 for float64 logits); 0 when no position is counted. With
        `return_parts=True`, an [`LMLossParts`].

    Raises:
        `ValueError`: bad shapes, `k` of 0 or above the vocabulary, token ids or labels outside `[0, vocab)`, an
        unknown `loss_type` or `tail`, `beta`/`alpha` outside `[0, 1]`, `temperature <= 0`, `chunk_size < 1`.
    """
    loss_type = _check_lm_loss_options(loss_type, beta, temperature, alpha, chunk_size)
    tail = to_enum(LMCacheTail, tail, "tail")
    _check_head_inputs("student_logits", student_logits)
    _check_tensors(topk_ids=topk_ids, topk_logits=topk_logits, teacher_logsumexp=teacher_logsumexp, labels=labels)
    shape = _logits_shape(student_logits)
    if len(shape) != 3:
        raise ValueError(f"student_logits must have shape (batch, seq, vocab), got {shape}")
    vocab, grid = shape[-1], shape[:2]
    if topk_ids.dim() != 3 or tuple(topk_ids.shape[:2]) != grid or topk_ids.shape != topk_logits.shape:
        raise ValueError(
            f"topk_ids and topk_logits must both have shape {grid + ('k',)}, got {tuple(topk_ids.shape)} and "
            f"{tuple(topk_logits.shape)}"
        )
    k = topk_ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"The teacher's top-k must have 1 <= k <= vocab = {vocab} tokens, got k = {k}")
    if tuple(teacher_logsumexp.shape) != grid or tuple(labels.shape) != grid:
        raise ValueError(
            f"teacher_logsumexp and labels must have shape {grid}, got {tuple(teacher_logsumexp.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if topk_ids.is_floating_point():
        raise ValueError(f"topk_ids must be integer token ids, got dtype {topk_ids.dtype}")
    _check_class_labels(labels, vocab)
    rows = (labels != -100).nonzero(as_tuple=True)
    targets = labels[rows].long()
    ids = topk_ids[rows].long()
    if ((ids < 0) | (ids >= vocab)).any():
        raise ValueError(f"topk_ids at counted positions must be in [0, {vocab}), got values outside it")
    # The teacher's cells, (N, k) or (N, k + 1): small, computed once for all the chunks.
    dtype = torch.promote_types(_logits_dtype(student_logits), torch.float32)
    teacher_cells = topk_logits[rows].detach().to(dtype)
    if tail is LMCacheTail.BUCKET and k < vocab:
        lse = teacher_logsumexp[rows].detach().to(dtype)
        # log of the teacher's rest mass at T = 1, log(1 - sum_K p): clamped away from 0 (float rounding, or a rest
        # that underflowed when the cache was written) so that its log stays finite.
        top_mass = torch.logsumexp(teacher_cells, dim=-1) - lse
        rest = (-torch.expm1(top_mass.clamp(max=0.0))).clamp(min=torch.finfo(dtype).tiny)
        teacher_cells = torch.cat([teacher_cells, (lse + rest.log())[:, None]], dim=-1)
    options = (loss_type, float(beta), float(temperature), float(alpha), bool(return_parts))

    def chunk_loss(student_rows, teacher_rows, chunk, needs_grad):
        return _sparse_lm_chunk(student_rows, targets[chunk], ids[chunk], teacher_cells[chunk], options, needs_grad)

    return _chunked_token_loss(student_logits, None, rows, chunk_loss, options, chunk_size, num_items_in_batch)


# ----- cross-tokenizer distillation (ULD, hybrid) -----


def span_log_probs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    span_starts: torch.Tensor,
    span_ends: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """
    The log-probability vector a causal LM gives each aligned span of its own tokens (the spans of
    [`hf_kd.cross_tokenizer.align_token_spans`]), by the chain rule, as TRL's GOLD does with
    `uld_token_merge_strategy="bayesian"`.

    A span of tokens `[a, b)` gets `log p(. | x_<b-1) + sum_{k=a}^{b-2} log p(x_k | x_<k)`: the full next-token
    distribution of its **last** token (the logits at position `b - 2`, conditioned on the span's earlier tokens as
    they are in the text) plus the sequence log-probability of those earlier tokens. Entry `v` is then the log of the
    probability of the span's text minus its last token followed by token `v`, and the entry of the actual last token
    is the log-probability of the whole span: the vector sums to `p(earlier tokens) <= 1` (not renormalised, so that
    a span the model finds unlikely keeps a small mass). A one-token span is the plain next-token distribution.
    (GOLD's default, `"observed"`, takes the distribution at the span's first position instead, which in its code is
    the logits *at* the first token, i.e. the prediction of the token after it.)

    Args:
        logits (`torch.Tensor` of shape `(batch, seq, vocab)`):
            The model's logits; position `t` predicts token `t + 1`.
        input_ids (`torch.Tensor` of shape `(batch, seq)`):
            The tokens the logits were computed on.
        span_starts, span_ends (`torch.Tensor` of shape `(batch, spans)`):
            Token index of each span's first token and one past its last (`1 <= start < end <= seq`: the first token
            of a row has no prediction); `-1` marks padding (rows with fewer spans), skipped.
        temperature (`float`, *optional*, defaults to `1.0`):
            The logits are divided by it before the softmax (every factor of the chain rule).

    Returns:
        `torch.Tensor` of shape `(num_spans, vocab)`, float32 or wider: one row per valid span, in row-major
        `(batch, spans)` order.
    """
    _check_tensors(logits=logits, input_ids=input_ids, span_starts=span_starts, span_ends=span_ends)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    valid = span_starts >= 0
    rows, spans = valid.nonzero(as_tuple=True)
    starts, ends = span_starts[rows, spans], span_ends[rows, spans]
    if ((starts < 1) | (ends <= starts) | (ends > logits.shape[1])).any():
        raise ValueError(
            f"spans must satisfy 1 <= start < end <= seq ({logits.shape[1]}): the first token of a row has no "
            "prediction"
        )
    scaled = _upcast(logits) / temperature
    # log p(x_k | x_<k) of every token k >= 1 (0 at k = 0), cumulated along the row: a span's earlier tokens are a
    # difference of two prefix sums. The log-normaliser is computed once per position (no (seq, vocab) log-softmax).
    normaliser = torch.logsumexp(scaled[:, :-1], dim=-1)
    token = scaled[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1) - normaliser
    prefix = F.pad(token, (1, 0)).cumsum(-1)  # prefix[:, k] = sum of token log-probs of tokens 1..k
    earlier = prefix[rows, ends - 2] - prefix[rows, starts - 1]
    last = scaled[rows, ends - 2] - normaliser[rows, ends - 2, None]
    return last + earlier[:, None]


def _check_cached_spans(topk_ids, topk_logprobs, tail_logprobs, token_logprobs, span_starts, span_ends):
    """Shape checks of [`cached_span_top_k`]; returns the valid spans' `(rows, starts, ends)`."""
    _check_tensors(topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logprobs=tail_logprobs,
                   token_logprobs=token_logprobs, span_starts=span_starts, span_ends=span_ends)
    if topk_ids.shape != topk_logprobs.shape or topk_ids.dim() != 3:
        raise ValueError(
            f"topk_ids and topk_logprobs must both have shape (batch, seq, k), got {tuple(topk_ids.shape)} and "
            f"{tuple(topk_logprobs.shape)}"
        )
    if tail_logprobs.shape != topk_ids.shape[:2] or token_logprobs.shape != topk_ids.shape[:2]:
        raise ValueError(
            f"tail_logprobs and token_logprobs must have shape {tuple(topk_ids.shape[:2])}, got "
            f"{tuple(tail_logprobs.shape)} and {tuple(token_logprobs.shape)}"
        )
    rows, spans = (span_starts >= 0).nonzero(as_tuple=True)
    starts, ends = span_starts[rows, spans], span_ends[rows, spans]
    seq = topk_ids.shape[1]
    if ((starts < 1) | (ends <= starts) | (ends > seq + 1)).any():
        raise ValueError(
            f"spans must satisfy 1 <= start < end <= seq + 1 ({seq + 1}): the first token of a row has no prediction"
        )
    return rows, starts, ends


def cached_span_top_k(
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprobs: torch.Tensor,
    token_logprobs: torch.Tensor,
    span_starts: torch.Tensor,
    span_ends: torch.Tensor,
    far_tail_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """
    [`span_log_probs`] of a teacher from its cached sparse logits (the cross-tokenizer cache of
    [`hf_kd.teacher.compute_teacher_lm_top_k`] with `span_tensors=True`), kept sparse: for each span, its top-k entries
    and the log of its mass outside them (ULD, Boizard et al., 2024, https://huggingface.co/papers/2402.12030).

    A span of tokens `[a, b)` reads the realised tokens' log-probabilities `token_logprobs[a - 1 .. b - 3]` (the chain
    rule's earlier factors: stored for every token, so this sum is **exact**) and, at position `b - 2`, the top-k
    log-probabilities and the log of the rest of the mass; each gets the earlier factors added, as in
    [`span_log_probs`].

    Args:
        topk_ids (`torch.Tensor` of shape `(batch, seq, k)`, integer):
            The teacher's top-k token ids at each position (position `t` predicts token `t + 1`), read at the
            positions the spans use only.
        topk_logprobs (`torch.Tensor` of shape `(batch, seq, k)`):
            Their log-probabilities at the temperature of the cache pass.
        tail_logprobs (`torch.Tensor` of shape `(batch, seq)`):
            Log of the probability mass outside the top k at each position.
        token_logprobs (`torch.Tensor` of shape `(batch, seq)`):
            Log-probability of the realised next token at each position.
        span_starts, span_ends (`torch.Tensor` of shape `(batch, spans)`):
            As in [`span_log_probs`] (`1 <= start < end <= seq + 1`, `-1` for padding).
        far_tail_logprobs (`torch.Tensor` of shape `(batch, seq)`, *optional*):
            Log of the mass of the tokens ranked at or below the student's vocabulary size (for [`cached_uld_loss`]).

    Returns:
        `(ids, log_probs, tail, far_tail)`: `(num_spans, k)` int64, `(num_spans, k)`, `(num_spans,)` and
        `(num_spans,)` (`None` without `far_tail_logprobs`) float32, one row per valid span in row-major
        `(batch, spans)` order.
    """
    rows, starts, ends = _check_cached_spans(topk_ids, topk_logprobs, tail_logprobs, token_logprobs, span_starts,
                                             span_ends)
    # As span_log_probs: the earlier tokens' log-probs are a difference of prefix sums along the row.
    prefix = F.pad(token_logprobs.float(), (1, 0)).cumsum(-1)  # prefix[:, t] = sum of positions 0..t-1
    earlier = prefix[rows, ends - 2] - prefix[rows, starts - 1]
    last = ends - 2
    far = None if far_tail_logprobs is None else far_tail_logprobs[rows, last].float() + earlier
    return (topk_ids[rows, last].long(), topk_logprobs[rows, last].float() + earlier[:, None],
            tail_logprobs[rows, last].float() + earlier, far)


def cached_span_log_probs(
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprobs: torch.Tensor,
    token_logprobs: torch.Tensor,
    span_starts: torch.Tensor,
    span_ends: torch.Tensor,
    vocab_size: int,
) -> torch.Tensor:
    """
    [`cached_span_top_k`] made dense over the teacher's whole vocabulary, the teacher's side of [`hybrid_loss`] in a
    cached run (Boizard et al., 2024, https://huggingface.co/papers/2402.12030, with GOLD's hybrid): the top-k
    entries exact and the tail mass **spread evenly** over the `vocab_size - k` other tokens (`tail / (vocab - k)`
    each: never above the smallest top-k probability, since every tail token is below it, so the vector sorts as the
    true one in its first `k` places and keeps the true total mass). The hybrid loss needs a value per token for its
    token-by-token KL on the shared vocabulary; [`cached_uld_loss`] needs none. With `k = vocab_size` the result is
    [`span_log_probs`] of the full logits (up to the cache's float16 rounding of the top-k log-probabilities).

    Args:
        topk_ids, topk_logprobs, tail_logprobs, token_logprobs, span_starts, span_ends: as in [`cached_span_top_k`].
        vocab_size (`int`):
            The teacher's vocabulary (the width of its logits), `>= k`.

    Returns:
        `torch.Tensor` of shape `(num_spans, vocab_size)`, float32: one row per valid span, in row-major
        `(batch, spans)` order, as [`span_log_probs`] returns.
    """
    k = topk_ids.shape[-1] if topk_ids.dim() == 3 else 0
    if not 1 <= k <= vocab_size:
        raise ValueError(f"The cached top-k must have 1 <= k <= vocab_size = {vocab_size} tokens, got k = {k}")
    ids, log_probs, tail, _ = cached_span_top_k(topk_ids, topk_logprobs, tail_logprobs, token_logprobs, span_starts,
                                             span_ends)
    out = log_probs.new_empty(len(ids), vocab_size)
    if k == vocab_size:  # the top k is the whole distribution: every entry is overwritten below
        out.fill_(-math.inf)
    else:
        out.copy_((tail - math.log(vocab_size - k))[:, None].expand_as(out))
    return out.scatter_(-1, ids, log_probs)


def cached_uld_loss(
    student_log_probs: torch.Tensor,
    teacher_top_log_probs: torch.Tensor,
    teacher_tail_log_mass: torch.Tensor,
    teacher_far_log_mass: torch.Tensor | None = None,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """
    [`uld_loss`] (Boizard et al., 2024, https://huggingface.co/papers/2402.12030) against a teacher known by its top
    `k` probabilities and the mass of the rest (a cached run, [`cached_span_top_k`]). The sorted L1 is split at rank
    `k`: the first `k` places compare exactly (the teacher's top k sorted are its first `k` sorted entries), and the
    rest compares the two **tail masses** as one bucket,

    `sum_{i <= k} |sort(p_S)_i - sort(p_T)_i| + |sum_{i > k} sort(p_S)_i - tail_T|`.

    The bucket term is a lower bound of the true `sum_{i > k} |sort(p_S)_i - sort(p_T)_i|` (the L1 of two sequences is
    at least the difference of their sums), equal to it when one tail lies above the other rank by rank: the loss is
    never above [`uld_loss`] of the full distributions, and equals it with `k` = the teacher's vocabulary (no tail).
    With `teacher_far_log_mass`, the teacher's mass at sorted ranks past the student's vocabulary `V_S` (0-based
    ranks `>= V_S`, where the zero-padded student has nothing, so the L1 there is exactly that mass), the bucket is
    split there and the bound tightens to `|sum_{k < i <= V_S} sort(p_S)_i - (tail_T - far_T)| + far_T` (`k < V_S`;
    with `k >= V_S` the student has no tail and the tail term is exactly `tail_T`). Without it a teacher whose tail
    is spread over more tokens than the student has (a flat teacher, a high temperature) is undercounted.
    Spreading the tail evenly over the teacher's other tokens instead ([`cached_span_log_probs`]) compares the
    student's decaying tail with a flat one and overstates the loss (by 23 % at `k = 64` on gemma-3-270m into a SmolLM2
    student, against -0.6 % for this bucket: docs/methods/cross_tokenizer.md).

    Args:
        student_log_probs (`torch.Tensor` of shape `(spans, student_vocab)`): as in [`uld_loss`].
        teacher_top_log_probs (`torch.Tensor` of shape `(spans, k)`): the teacher's top-k span log-probabilities
            (any order).
        teacher_tail_log_mass (`torch.Tensor` of shape `(spans,)`): the log of the teacher's span mass outside them.
        teacher_far_log_mass (`torch.Tensor` of shape `(spans,)`, *optional*): the log of the teacher's span mass at
            sorted ranks `>= student_vocab` (part of the tail when `k < student_vocab`).
        reduction, num_items_in_batch: as in [`uld_loss`].

    Returns:
        `torch.Tensor`: a scalar, or `(spans,)` with `reduction="none"`.
    """
    _check_tensors(student_log_probs=student_log_probs, teacher_top_log_probs=teacher_top_log_probs,
                   teacher_tail_log_mass=teacher_tail_log_mass)
    if teacher_far_log_mass is not None:
        _check_tensors(teacher_far_log_mass=teacher_far_log_mass)
    _check_reduction(reduction, num_items_in_batch)
    n = len(student_log_probs)
    if (student_log_probs.dim() != 2 or teacher_top_log_probs.dim() != 2 or len(teacher_top_log_probs) != n
            or teacher_tail_log_mass.shape != (n,)
            or (teacher_far_log_mass is not None and teacher_far_log_mass.shape != (n,))):
        raise ValueError(
            "student_log_probs (spans, vocab), teacher_top_log_probs (spans, k) and teacher_tail_log_mass (spans,) "
            f"must have the same spans, got {tuple(student_log_probs.shape)}, {tuple(teacher_top_log_probs.shape)} "
            f"and {tuple(teacher_tail_log_mass.shape)}"
        )
    k = teacher_top_log_probs.shape[-1]
    student_sorted = _upcast(student_log_probs).exp().sort(dim=-1, descending=True).values
    student_sorted = F.pad(student_sorted, (0, max(k - student_sorted.shape[-1], 0)))  # a smaller student vocabulary
    teacher_sorted = _upcast(teacher_top_log_probs).exp().sort(dim=-1, descending=True).values
    top = (student_sorted[:, :k] - teacher_sorted).abs().sum(-1)
    teacher_tail = _upcast(teacher_tail_log_mass).exp()
    student_vocab = student_log_probs.shape[-1]
    if k >= student_vocab:  # the student has no tail: the L1 over the teacher's is its mass, exactly
        tail = teacher_tail
    elif teacher_far_log_mass is None:
        tail = (student_sorted[:, k:].sum(-1) - teacher_tail).abs()
    else:
        far = _upcast(teacher_far_log_mass).exp()
        tail = (student_sorted[:, k:].sum(-1) - (teacher_tail - far)).abs() + far
    per_span = top + tail
    return _reduce(per_span, torch.ones_like(per_span, dtype=torch.bool), reduction, num_items_in_batch)


def _sorted_l1(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Per-row `sum |sort_desc(p_S) - sort_desc(p_T)|`, the smaller vocabulary padded with zeros."""
    student_sorted = student_probs.sort(dim=-1, descending=True).values
    teacher_sorted = teacher_probs.sort(dim=-1, descending=True).values
    width = max(student_sorted.shape[-1], teacher_sorted.shape[-1])
    student_sorted = F.pad(student_sorted, (0, width - student_sorted.shape[-1]))
    teacher_sorted = F.pad(teacher_sorted, (0, width - teacher_sorted.shape[-1]))
    return (student_sorted - teacher_sorted).abs().sum(-1)


def uld_loss(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Universal Logit Distillation (Boizard et al., 2024, https://huggingface.co/papers/2402.12030): a distance between
    next-token distributions over two **different** vocabularies. Both probability vectors are sorted in descending
    order, the shorter one is padded with zeros, and the loss of a span is the L1 distance
    `sum_i |sort(p_S)_i - sort(p_T)_i|` (the closed form of the Wasserstein-1 distance the paper bounds). It matches
    the *shape* of the teacher's distribution (how peaked it is), not which token gets which mass.

    Args:
        student_log_probs (`torch.Tensor` of shape `(spans, student_vocab)`):
            Log-probabilities of each aligned span under the student ([`span_log_probs`]; rows need not sum to one).
        teacher_log_probs (`torch.Tensor` of shape `(spans, teacher_vocab)`):
            The teacher's, same spans in the same order (no gradient is needed through it).
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"` over spans, `"sum"` or `"none"` (one value per span).
        num_items_in_batch (`int` or `torch.Tensor`, *optional*):
            With `"mean"`: the sum is divided by it instead (exact under gradient accumulation).

    Returns:
        `torch.Tensor`: a scalar, or `(spans,)` with `reduction="none"`.
    """
    _check_tensors(student_log_probs=student_log_probs, teacher_log_probs=teacher_log_probs)
    _check_reduction(reduction, num_items_in_batch)
    if student_log_probs.dim() != 2 or teacher_log_probs.dim() != 2 or len(student_log_probs) != len(teacher_log_probs):
        raise ValueError(
            "student_log_probs and teacher_log_probs must be (spans, vocab) with the same number of spans, got "
            f"{tuple(student_log_probs.shape)} and {tuple(teacher_log_probs.shape)}"
        )
    per_span = _sorted_l1(_upcast(student_log_probs).exp(), _upcast(teacher_log_probs).exp())
    return _reduce(per_span, torch.ones_like(per_span, dtype=torch.bool), reduction, num_items_in_batch)


def hybrid_loss(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor,
    shared_weight: float = 0.5,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Cross-tokenizer loss that is exact where the two vocabularies agree (the hybrid of TRL's GOLD,
    `uld_use_hybrid_loss=True`): per span,
    `shared_weight * KL(q_T || q_S) + (1 - shared_weight) * ULD(rest_S, rest_T)`, where `q` is a model's
    distribution restricted to the shared tokens and renormalised (so the forward KL compares like with like,
    token by token) and `rest` its probabilities outside the shared tokens, compared by sorted L1 as in [`uld_loss`]
    (not renormalised: the rest also carries how much mass each side puts outside the shared vocabulary).

    GOLD uses a generalised JSD on the shared part and, by default, weights `|shared| / teacher_vocab` and its
    complement; here the shared part is the forward KL of [`lm_kd_loss`]'s default and the weights are fixed (`0.5`
    each by default), since with a 262k-token teacher the adaptive weight would make the exact part ~10 % of the loss.

    Args:
        student_log_probs (`torch.Tensor` of shape `(spans, student_vocab)`), teacher_log_probs (`torch.Tensor`
            of shape `(spans, teacher_vocab)`): as in [`uld_loss`].
        student_ids, teacher_ids (`torch.Tensor` of shape `(shared,)`):
            The shared vocabulary: `student_ids[i]` and `teacher_ids[i]` are the same token
            ([`hf_kd.cross_tokenizer.shared_vocabulary_map`]); at least one pair, each id at most once.
        shared_weight (`float`, *optional*, defaults to `0.5`):
            Weight in `[0, 1]` of the exact KL on the shared tokens; `1 - shared_weight` weighs ULD on the rest.
        reduction, num_items_in_batch: as in [`uld_loss`].

    Returns:
        `torch.Tensor`: a scalar, or `(spans,)` with `reduction="none"`.
    """
    _check_tensors(
        student_log_probs=student_log_probs, teacher_log_probs=teacher_log_probs, student_ids=student_ids,
        teacher_ids=teacher_ids,
    )
    _check_reduction(reduction, num_items_in_batch)
    if not 0.0 <= shared_weight <= 1.0:
        raise ValueError(f"shared_weight must be in [0, 1], got {shared_weight}")
    if student_ids.dim() != 1 or student_ids.shape != teacher_ids.shape or len(student_ids) == 0:
        raise ValueError(
            "student_ids and teacher_ids must be 1-d, of the same length and not empty (the shared vocabulary), got "
            f"{tuple(student_ids.shape)} and {tuple(teacher_ids.shape)}: with no shared token use uld_loss"
        )
    if len(student_log_probs) != len(teacher_log_probs):
        raise ValueError(
            f"student_log_probs and teacher_log_probs must have the same spans, got {len(student_log_probs)} and "
            f"{len(teacher_log_probs)}"
        )
    log_s, log_t = _upcast(student_log_probs), _upcast(teacher_log_probs)
    student_ids, teacher_ids = student_ids.to(log_s.device), teacher_ids.to(log_t.device)
    shared_s = log_s[:, student_ids].log_softmax(-1)
    shared_t = log_t[:, teacher_ids].log_softmax(-1)
    kl = (shared_t.exp() * (shared_t - shared_s)).sum(-1)
    rest_s = torch.ones(log_s.shape[-1], dtype=torch.bool, device=log_s.device)
    rest_t = torch.ones(log_t.shape[-1], dtype=torch.bool, device=log_t.device)
    rest_s[student_ids], rest_t[teacher_ids] = False, False
    rest = _sorted_l1(log_s[:, rest_s].exp(), log_t[:, rest_t].exp())
    per_span = shared_weight * kl + (1 - shared_weight) * rest
    return _reduce(per_span, torch.ones_like(per_span, dtype=torch.bool), reduction, num_items_in_batch)
