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

import torch
import torch.nn.functional as F

__all__ = ["dedier_weights", "kd_layer_loss", "kd_loss", "label_smoothing_targets", "soft_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 softmax over many classes loses the small probabilities that carry the "dark knowledge", and
    # T^2-scaled KL terms overflow fp16: always compute in at least float32 (float64 inputs stay float64).
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_reduction(reduction: str, num_items_in_batch) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
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
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"` (mean over valid items; 0 when there is none), `"sum"`, or `"none"` (per-item losses of shape
            `student_logits.shape[:-1]`, 0 at ignored items).
        sample_weights (`torch.Tensor` of shape `student_logits.shape[:-1]`, *optional*, defaults to `None`):
            Per-item weights `w` (e.g. DEDIER's, see [`dedier_weights`]) multiplying each item's loss before the
            reduction. The `"mean"` reduction stays a plain mean of `w * loss` over the valid items (or
            `sum / num_items_in_batch`): it is **not** normalised by `sum(w)`, as in DEDIER's code, so up-weighting
            some items raises the loss scale rather than down-weighting the others.

    Returns:
        `torch.Tensor`: a scalar, or per-item losses for `reduction="none"`, in float32 (float64 for float64 inputs).

    Raises:
        `ValueError`: if `temperature <= 0`, `alpha` is outside `[0, 1]`, the logits' shapes differ or have no class
        dimension, `labels` or `sample_weights` does not have shape `student_logits.shape[:-1]`, or `teacher_logits`
        contain NaN.

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
    _check_reduction(reduction, num_items_in_batch)
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
    if torch.isnan(teacher_logits).any():
        # A NaN teacher would silently poison every student gradient; fail loudly instead.
        raise ValueError("teacher_logits contain NaN: check the teacher's dtype (fp16 overflow) and inputs")

    item_shape = student_logits.shape[:-1]
    num_classes = student_logits.shape[-1]
    student = _upcast(student_logits).reshape(-1, num_classes)
    teacher = _upcast(teacher_logits).reshape(-1, num_classes)

    # log_softmax on both sides with log_target=True: with logits of +-1e4 a plain softmax underflows to exact 0 and
    # p * log(p) becomes 0 * -inf = NaN, whereas log-probabilities stay finite.
    student_log_probs = F.log_softmax(student / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher / temperature, dim=-1)
    soft = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)
    soft = soft * temperature**2

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
    if labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    labels = labels.long()
    valid = labels != -100
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(
            f"labels must be in [0, {num_classes}) or -100 (ignored), got {labels[bad][0].item()}"
        )
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
            Target distributions (non-negative rows summing to 1; not checked, to avoid a device synchronisation).
            An all-zero row marks an ignored item: it contributes 0 and is not counted by the `"mean"` reduction.
            Gradients flow into `target_probs` if it requires them; detach teacher targets yourself.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*, defaults to `None`):
            Number of valid items over all gradient-accumulation micro-batches; when given, the loss is
            `sum / num_items_in_batch`. Only valid with `reduction="mean"`, which it replaces. See [`kd_loss`].
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"` (over valid items; 0 when there is none), `"sum"`, or `"none"` (per-item losses of shape
            `logits.shape[:-1]`).

    Returns:
        `torch.Tensor`: a scalar, or per-item losses for `reduction="none"`, in float32 (float64 for float64 inputs).

    Raises:
        `ValueError`: if the shapes differ, `logits` has no class dimension, or `reduction` is unknown.
    """
    _check_reduction(reduction, num_items_in_batch)
    if logits.shape != target_probs.shape:
        raise ValueError(
            f"logits and target_probs must have the same shape, got {tuple(logits.shape)} and "
            f"{tuple(target_probs.shape)}"
        )
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (..., num_classes), got {tuple(logits.shape)}")

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
        reduction (`str`, *optional*, defaults to `"mean"`): `"mean"` over positions (0 when `N = 0`), `"sum"`, or
            `"none"` (one value per position).

    Returns:
        `torch.Tensor`: a scalar (or `(N,)` for `"none"`), in float32 (float64 for float64 inputs).

    Raises:
        `ValueError`: shapes that differ or are not 2-D, or an unknown `reduction`.
    """
    _check_reduction(reduction, None)
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
    if readout_logits.dim() != 2 or readout_logits.shape[1] < 2:
        raise ValueError(f"readout_logits must have shape (N, K) with K >= 2, got {tuple(readout_logits.shape)}")
    num_samples = readout_logits.shape[0]
    if labels.shape != (num_samples,) or weights.shape != (num_samples,):
        raise ValueError(
            f"labels and weights must have shape ({num_samples},), got {tuple(labels.shape)} and "
            f"{tuple(weights.shape)}"
        )
    probs = F.softmax(_upcast(readout_logits), dim=-1)
    top2 = probs.topk(2, dim=-1)
    margin = top2.values[:, 0] - top2.values[:, 1]  # (N,), in [0, 1]
    labels = labels.to(probs.device).long()
    misread = (labels != -100) & (top2.indices[:, 0] != labels)
    upweight = torch.exp(beta * margin.pow(alpha))
    return torch.where(misread.to(weights.device), upweight.to(weights), weights)
