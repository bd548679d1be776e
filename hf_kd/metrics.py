"""Calibration and uncertainty metrics, and a `compute_metrics` factory for [`~transformers.Trainer`].

Every function takes numpy arrays or torch tensors and returns numpy values (Python floats for scalars), computed in
float64. Unless an argument is named `logits`, it holds **probabilities** of shape `(N, K)`: `N` examples, `K`
classes, rows summing to 1. Labels are integer class indices of shape `(N,)` in `[0, K)`.

Binned metrics are built from per-bin counts and sums ([`reliability_bins`]), so results from several shards can be
merged exactly by adding counts and count-weighted means before dividing.

The same metrics are shipped as Hugging Face `evaluate` modules (`hf_kd/evaluate_metrics/<name>/`, one per metric,
named like the function each wraps): [`module_path`] gives the folder to pass to `evaluate.load`.
"""

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.special import rel_entr

__all__ = [
    "brier_score",
    "classification_metrics",
    "confidence_preservation",
    "exit_calibration_report",
    "expected_calibration_error",
    "group_accuracies",
    "human_distribution_divergence",
    "lm_exit_token_statistics",
    "lm_metrics",
    "lm_metrics_from_token_statistics",
    "lm_token_statistics",
    "make_lm_compute_metrics",
    "make_lm_exit_compute_metrics",
    "make_compute_metrics",
    "make_exit_compute_metrics",
    "maximum_calibration_error",
    "module_path",
    "negative_log_likelihood",
    "predictive_entropy",
    "preprocess_lm_logits_for_metrics",
    "reliability_bins",
    "softmax",
    "token_calibration_metrics",
    "token_calibration_statistics",
]

# The `evaluate` modules shipped in hf_kd/evaluate_metrics/, each named after the function it wraps.
EVALUATE_MODULES = (
    "expected_calibration_error",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "brier_score",
    "predictive_entropy",
    "confidence_preservation",
    "human_distribution_divergence",
    "prediction_set_metrics",
    "lm_metrics",
)

# Rows of float32 (or float16) softmax outputs sum to 1 only up to rounding; 1e-3 still rejects logits or unnormalised
# scores passed by mistake.
_ROW_SUM_ATOL = 1e-3

# ChaosNLI (easonnie/ChaosNLI, src/evaluation/tools.py) floors model probabilities at this value before renormalising.
_CHAOSNLI_PROB_FLOOR = 1e-15


def module_path(name: str) -> str:
    """
    The local folder of one of hf_kd's `evaluate` metric modules, for `evaluate.load` (works offline).

    Only builds the path (this module never imports `evaluate`); the module scripts import `hf_kd.metrics` and
    compute with the function of the same name, so their results are this module's.

    Args:
        name (`str`):
            One of `EVALUATE_MODULES`: `"expected_calibration_error"`, `"maximum_calibration_error"`,
            `"negative_log_likelihood"`, `"brier_score"`, `"predictive_entropy"`, `"confidence_preservation"`,
            `"human_distribution_divergence"`, `"prediction_set_metrics"` or `"lm_metrics"`.

    Returns:
        `str`: the folder `hf_kd/evaluate_metrics/<name>`, which holds `<name>.py` and its metric card `README.md`.

    Example:

    ```python
    >>> import evaluate
    >>> from hf_kd.metrics import module_path
    >>> ece = evaluate.load(module_path("expected_calibration_error"), n_bins=10)
    >>> ece.compute(predictions=[[0.75, 0.25], [0.25, 0.75]], references=[0, 0])
    {'expected_calibration_error': 0.25, 'n_bins': 10}
    ```
    """
    if name not in EVALUATE_MODULES:
        raise ValueError(f"unknown hf_kd evaluate module {name!r}; expected one of {', '.join(EVALUATE_MODULES)}")
    return str(Path(__file__).resolve().parent / "evaluate_metrics" / name)


def _as_float_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        # bf16 has no numpy counterpart: convert on the torch side.
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite, got {int(np.sum(~np.isfinite(x)))} non-finite value(s)")
    return x


def _check_probs(probs, name: str = "probs") -> np.ndarray:
    probs = _as_float_array(probs, name)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"{name} must have shape (N, K) with N >= 1 and K >= 1, got {probs.shape}")
    negative = np.flatnonzero((probs < 0).any(axis=1))
    if negative.size:
        raise ValueError(f"{name} must be non-negative probabilities; row {negative[0]} has a negative entry")
    off = np.flatnonzero(np.abs(probs.sum(axis=1) - 1.0) > _ROW_SUM_ATOL)
    if off.size:
        i = off[0]
        raise ValueError(
            f"{name} rows must sum to 1 (within {_ROW_SUM_ATOL}); row {i} sums to {probs[i].sum():.6g}. "
            "Pass probabilities, e.g. softmax(logits), not logits."
        )
    return probs


def _check_labels(labels, num_examples: int, num_classes: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.shape != (num_examples,):
        raise ValueError(f"labels must have shape ({num_examples},) to match the probabilities, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))):
            raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(
            f"labels must be in [0, {num_classes}) (the number of classes); got {labels[bad[0]]} at index {bad[0]}"
        )
    return labels


def _check_n_bins(n_bins) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}")


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """
    Numerically stable softmax over the last axis, in float64.

    Args:
        logits (`np.ndarray` or `torch.Tensor` of shape `(..., K)`):
            Unnormalised scores.
        temperature (`float`, *optional*, defaults to `1.0`):
            The logits are divided by it before the softmax. Must be > 0.

    Returns:
        `np.ndarray` of shape `(..., K)` and dtype float64: probabilities summing to 1 over the last axis.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _as_float_array(logits, "logits")
    if z.ndim == 0 or z.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., K) with K >= 1, got {z.shape}")
    z = z / temperature
    # Subtracting the row maximum keeps exp() from overflowing; the result is unchanged mathematically.
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def reliability_bins(probs, labels, n_bins: int = 15) -> dict[str, np.ndarray]:
    """
    Per-bin statistics of top-label confidence, the data behind reliability diagrams, ECE and MCE.

    Confidence is the maximum probability of each row, and a prediction is correct when the argmax (the first one on
    ties, as `np.argmax`) equals the label. Bins are equal-width on `[0, 1]`: with `n = n_bins` and edges
    `np.linspace(0, 1, n + 1)`, bin `b` holds the confidences in `(b/n, (b+1)/n]`, right-closed, and the first bin
    also holds confidence 0. A confidence of exactly 1 falls in the last bin.

    Args:
        probs (`np.ndarray` or `torch.Tensor` of shape `(N, K)`):
            Predicted probabilities.
        labels (`np.ndarray` or `torch.Tensor` of shape `(N,)`):
            Gold class indices in `[0, K)`.
        n_bins (`int`, *optional*, defaults to `15`):
            Number of equal-width bins, at least 1.

    Returns:
        `dict[str, np.ndarray]`, each of shape `(n_bins,)`:
        - `bin_lower`, `bin_upper`: the bin edges;
        - `count`: number of examples in the bin (int64);
        - `accuracy`: fraction of correct predictions in the bin, NaN for an empty bin;
        - `confidence`: mean confidence in the bin, NaN for an empty bin.

        To merge shards, add the counts and the count-weighted `accuracy`/`confidence` (taking empty bins as 0).
    """
    _check_n_bins(n_bins)
    probs = _check_probs(probs)
    labels = _check_labels(labels, *probs.shape)
    return _confidence_bins(probs.max(axis=1), probs.argmax(axis=1) == labels, n_bins)


def _confidence_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    """[`reliability_bins`] from each prediction's top-1 `confidence` `(N,)` and whether it is `correct` `(N,)`."""
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(side="left") returns i with edges[i-1] < c <= edges[i]: right-closed bins, decided against the very
    # edges that are reported. Confidence 0 gives i = 0 and is clipped into the first bin.
    bin_index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bin_index, minlength=n_bins)
    sum_correct = np.bincount(bin_index, weights=correct, minlength=n_bins)
    sum_confidence = np.bincount(bin_index, weights=confidence, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(count > 0, sum_correct / count, np.nan)
        mean_confidence = np.where(count > 0, sum_confidence / count, np.nan)
    return {
        "bin_lower": edges[:-1],
        "bin_upper": edges[1:],
        "count": count,
        "accuracy": accuracy,
        "confidence": mean_confidence,
    }


def _calibration_gaps(bins: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Weights `|B_b| / N` and gaps `|acc_b - conf_b|` of the non-empty bins."""
    nonempty = bins["count"] > 0
    weights = bins["count"][nonempty] / bins["count"].sum()
    gaps = np.abs(bins["accuracy"][nonempty] - bins["confidence"][nonempty])
    return weights, gaps


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """
    Top-label expected calibration error ([Guo et al., 2017](https://huggingface.co/papers/1706.04599)).

    `ECE = sum_b |B_b| / N * |acc_b - conf_b|`, over the equal-width confidence bins of [`reliability_bins`]:
    confidence = max probability, correct = (argmax == label), bin `b` = `(b/n_bins, (b+1)/n_bins]` (the first bin
    includes 0). Empty bins contribute nothing. Always state `n_bins` when reporting an ECE.

    Args:
        probs (`np.ndarray` or `torch.Tensor` of shape `(N, K)`):
            Predicted probabilities.
        labels (`np.ndarray` or `torch.Tensor` of shape `(N,)`):
            Gold class indices in `[0, K)`.
        n_bins (`int`, *optional*, defaults to `15`):
            Number of equal-width bins, at least 1.

    Returns:
        `float` in `[0, 1]`.
    """
    weights, gaps = _calibration_gaps(reliability_bins(probs, labels, n_bins))
    return float(np.sum(weights * gaps))


def maximum_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """
    Maximum calibration error ([Naeini et al., 2015](https://ojs.aaai.org/index.php/AAAI/article/view/9602)):
    `max_b |acc_b - conf_b|` over the **non-empty** bins of [`reliability_bins`] (same binning as
    [`expected_calibration_error`]).

    Args:
        probs (`np.ndarray` or `torch.Tensor` of shape `(N, K)`):
            Predicted probabilities.
        labels (`np.ndarray` or `torch.Tensor` of shape `(N,)`):
            Gold class indices in `[0, K)`.
        n_bins (`int`, *optional*, defaults to `15`):
            Number of equal-width bins, at least 1.

    Returns:
        `float` in `[0, 1]`.
    """
    _, gaps = _calibration_gaps(reliability_bins(probs, labels, n_bins))
    return float(gaps.max())


def negative_log_likelihood(probs, labels, eps: float = 1e-12) -> float:
    """
    Mean negative log-likelihood of the gold labels, `mean_i -log(p_i[y_i])`, natural log.

    The gold probability is clipped to `[eps, 1]` before the log, so a zero probability gives a large finite value
    (`-log(1e-12) ~ 27.6`) instead of `inf`; clipping never changes probabilities above `eps`.

    Args:
        probs (`np.ndarray` or `torch.Tensor` of shape `(N, K)`):
            Predicted probabilities.
        labels (`np.ndarray` or `torch.Tensor` of shape `(N,)`):
            Gold class indices in `[0, K)`.
        eps (`float`, *optional*, defaults to `1e-12`):
            Lower clipping bound of the gold probability, > 0.

    Returns:
        `float` >= 0.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    probs = _check_probs(probs)
    labels = _check_labels(labels, *probs.shape)
    gold = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(gold, eps, 1.0))))


def brier_score(probs, labels) -> float:
    """
    Multi-class Brier score ([Brier, 1950](https://doi.org/10.1175/1520-0493(1950)078<0001:VOFEIT>2.0.CO;2)):
    `mean_i sum_k (p_ik - onehot(y_i)_k)^2`, in `[0, 2]`.

    For two classes this is twice the binary Brier score `mean_i (p_i1 - y_i)^2` that
    `sklearn.metrics.brier_score_loss(y, p[:, 1])` returns, because both classes' squared errors are equal and summed.

    Args:
        probs (`np.ndarray` or `torch.Tensor` of shape `(N, K)`):
            Predicted probabilities.
        labels (`np.ndarray` or `torch.Tensor` of shape `(N,)`):
            Gold class indices in `[0, K)`.

    Returns:
        `float` in `[0, 2]`.
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, *probs.shape)
    one_hot = np.zeros_like(probs)
    one_hot[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(np.sum((probs - one_hot) ** 2, axis=1)))


def predictive_entropy(probs, reduction: str = "mean"):
    """
    Predictive (Shannon) entropy `H(p) = -sum_k p_k log p_k` in nats, with `0 log 0 = 0`.

    The measure of [Sultan, 2023](https://huggingface.co/papers/2301.12609) (mean over the evaluation set). Note that
    ChaosNLI's stored `entropy` field uses log base 2; divide by `log(2)` to compare.

    Args:
        probs (`np.ndarray` or `torch.Tensor` of shape `(N, K)`):
            Predicted probabilities.
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"` returns the mean over examples as a `float`; `"none"` returns the per-example entropies.

    Returns:
        `float`, or `np.ndarray` of shape `(N,)` for `reduction="none"`.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    probs = _check_probs(probs)
    # where(p > 0): 0 * log(0) is NaN in floating point, but its limit, the convention for entropy, is 0.
    per_example = -np.sum(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0), axis=1)
    return per_example if reduction == "none" else float(per_example.mean())


def confidence_preservation(teacher_probs, student_probs, labels, class_index: int | None = 0) -> float:
    """
    Confidence-preservation statistic sigma of
    [Vengertsev & Sherman, 2024](https://huggingface.co/papers/2401.11365).

    For each example, `delta(x) = p_T(c | x) - p_S(c | x)`; sigma is the population standard deviation
    (`np.std(delta, ddof=0)`) of delta over the examples where **both** the teacher's and the student's argmax equal
    the gold label. With the default `class_index=0`, `c` is class 0, exactly the reference code
    (`TinyBERT/metrics.py::pairwise_conf_delta`). The confidence-preservation property holds when sigma on the
    training set is at most a threshold kappa (0.05 in the reference experiments).

    With `class_index=None`, `c` is the gold label of each example, which on the both-correct subset is each model's
    top-label confidence. This is a different statistic, even for two classes: delta then changes sign with the
    gold class (`p_T(1) - p_S(1) = -(p_T(0) - p_S(0))`), which changes the standard deviation whenever the mean
    delta is not zero. For two classes `class_index=0` and `class_index=1` give the same sigma; for more classes
    a fixed class index only measures that one class, and `None` is the natural generalisation.

    Args:
        teacher_probs (`np.ndarray` or `torch.Tensor` of shape `(N, K)`):
            Teacher probabilities.
        student_probs (`np.ndarray` or `torch.Tensor` of shape `(N, K)`):
            Student probabilities.
        labels (`np.ndarray` or `torch.Tensor` of shape `(N,)`):
            Gold class indices in `[0, K)`.
        class_index (`int` or `None`, *optional*, defaults to `0`):
            The class whose probability is compared, in `[0, K)`, or `None` for the gold class.

    Returns:
        `float` >= 0, or NaN when no example is predicted correctly by both models (sigma is undefined there; NaN
        keeps it from passing a `sigma <= kappa` check).
    """
    teacher_probs = _check_probs(teacher_probs, "teacher_probs")
    student_probs = _check_probs(student_probs, "student_probs")
    if teacher_probs.shape != student_probs.shape:
        raise ValueError(
            f"teacher_probs and student_probs must have the same shape, got {teacher_probs.shape} and "
            f"{student_probs.shape}"
        )
    num_examples, num_classes = teacher_probs.shape
    labels = _check_labels(labels, num_examples, num_classes)
    if class_index is not None and not 0 <= class_index < num_classes:
        raise ValueError(f"class_index must be None or in [0, {num_classes}), got {class_index}")

    both_correct = (teacher_probs.argmax(axis=1) == labels) & (student_probs.argmax(axis=1) == labels)
    if not both_correct.any():
        return float("nan")
    column = labels if class_index is None else np.full(num_examples, class_index)
    rows = np.arange(num_examples)
    delta = teacher_probs[rows, column] - student_probs[rows, column]
    return float(np.std(delta[both_correct], ddof=0))


def human_distribution_divergence(human_probs, model_probs) -> dict[str, float]:
    """
    Divergence between human label distributions and model predictions, with exactly the conventions of ChaosNLI
    ([Nie et al., 2020](https://huggingface.co/papers/2010.03532), `easonnie/ChaosNLI` `src/evaluation/tools.py`).

    - Model probabilities are floored at `1e-15`, then each row is renormalised (so the KL stays finite).
    - `kl`: mean over examples of `KL(human || model)` = `scipy.stats.entropy(p_human, p_model)`, natural log.
    - `js_distance`: mean over examples of the Jensen-Shannon **distance**
      `scipy.spatial.distance.jensenshannon(p_human, p_model)`: the square root of the JS divergence, natural log.

    Like scipy, each human row is also divided by its sum. Computed vectorised; it matches the per-row scipy calls
    to about 1e-12 relative.

    Args:
        human_probs (`np.ndarray` or `torch.Tensor` of shape `(N, K)`):
            Human label distributions (e.g. ChaosNLI's 100-annotation `label_dist`); zeros are allowed.
        model_probs (`np.ndarray` or `torch.Tensor` of shape `(N, K)`):
            Model probabilities, e.g. [`softmax`] of the logits.

    Returns:
        `dict[str, float]` with keys `kl` and `js_distance`.

    Raises:
        `ValueError`: on a shape mismatch, or a row that is negative or does not sum to 1 (the error names the row).
    """
    human = _check_probs(human_probs, "human_probs")
    model = _check_probs(model_probs, "model_probs")
    if human.shape != model.shape:
        raise ValueError(
            f"human_probs and model_probs must have the same shape, got {human.shape} and {model.shape}"
        )
    human = human / human.sum(axis=1, keepdims=True)
    model = np.maximum(model, _CHAOSNLI_PROB_FLOOR)
    model = model / model.sum(axis=1, keepdims=True)

    # rel_entr(p, q) = p log(p / q), and 0 where p = 0: the terms scipy.stats.entropy sums.
    kl = rel_entr(human, model).sum(axis=1)
    mixture = (human + model) / 2.0
    js_divergence = (rel_entr(human, mixture).sum(axis=1) + rel_entr(model, mixture).sum(axis=1)) / 2.0
    # Rounding can leave the divergence of (nearly) equal rows at -1e-17; scipy's sqrt of it is NaN, the distance 0.
    return {"kl": float(kl.mean()), "js_distance": float(np.sqrt(np.maximum(js_divergence, 0.0)).mean())}


def group_accuracies(predictions, labels, groups) -> dict[str, float]:
    """
    Accuracy per group and its worst case and mean, the group-robustness metrics of DEDIER
    ([Tiwari et al., WACV 2024](https://huggingface.co/papers/2310.18590)) and of the group-DRO literature
    (Sagawa et al., 2020, https://huggingface.co/papers/1911.08731).

    A group is typically a (class, spurious attribute) pair, e.g. (waterbird, land background). Only groups that
    have examples are reported; an empty group has no accuracy and does not enter the worst case or the mean.

    Args:
        predictions (`np.ndarray` or `torch.Tensor` of shape `(N,)`):
            Predicted class indices (e.g. `logits.argmax(-1)`).
        labels (`np.ndarray` or `torch.Tensor` of shape `(N,)`):
            Gold class indices. Drop ignored (`-100`) rows before calling.
        groups (`np.ndarray` or `torch.Tensor` of shape `(N,)`):
            Integer group id of each example (any integers).

    Returns:
        `dict[str, float]`:
        - `worst_group_accuracy`: the minimum over groups of the group accuracy (WGA);
        - `mean_group_accuracy`: the unweighted mean of the group accuracies, DEDIER's "unbiased" accuracy and its
          model-selection criterion;
        - `group_{g}_accuracy` for every group id `g`, in increasing order of `g`.

    Example:

    ```python
    >>> from hf_kd.metrics import group_accuracies
    >>> group_accuracies([0, 1, 1, 0], [0, 1, 0, 0], groups=[0, 0, 1, 1])
    {'worst_group_accuracy': 0.5, 'mean_group_accuracy': 0.75, 'group_0_accuracy': 1.0, 'group_1_accuracy': 0.5}
    ```
    """
    arrays = []
    for name, values in (("predictions", predictions), ("labels", labels), ("groups", groups)):
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        values = np.asarray(values)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"{name} must have shape (N,) with N >= 1, got {values.shape}")
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got dtype {values.dtype}")
        arrays.append(values)
    predictions, labels, groups = arrays
    if not predictions.shape == labels.shape == groups.shape:
        raise ValueError(
            f"predictions, labels and groups must have the same shape, got {predictions.shape}, {labels.shape} and "
            f"{groups.shape}"
        )
    correct = predictions == labels
    per_group = {int(g): float(correct[groups == g].mean()) for g in np.unique(groups)}
    values = list(per_group.values())
    results = {"worst_group_accuracy": min(values), "mean_group_accuracy": float(np.mean(values))}
    results.update({f"group_{g}_accuracy": accuracy for g, accuracy in per_group.items()})
    return results


def classification_metrics(probs, labels, n_bins: int = 15) -> dict[str, float]:
    """
    The metrics every hf_kd evaluation reports for one model: `accuracy`, `ece` and `mce` (`n_bins` equal-width
    bins), `nll`, `brier` and `entropy` (mean, nats).

    Args:
        probs (`np.ndarray` or `torch.Tensor` of shape `(N, K)`): predicted probabilities.
        labels (`np.ndarray` or `torch.Tensor` of shape `(N,)`): class indices in `[0, K)`.
        n_bins (`int`, *optional*, defaults to `15`): bins of ECE and MCE.
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs.shape[0], probs.shape[1])
    return {
        "accuracy": float(np.mean(probs.argmax(axis=1) == labels)),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "mce": maximum_calibration_error(probs, labels, n_bins),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        "entropy": predictive_entropy(probs),
    }


def warn_if_teacher_disagrees(teacher_accuracy: float, sigma: float, num_examples: int) -> None:
    """Warn loudly when a teacher's evaluation looks like a label mix-up rather than a weak teacher.

    A teacher accuracy of 0 (on a dataset of two or more rows) or an undefined sigma (no example classified right by
    both models) usually means the teacher's label ids are not the dataset's: e.g. `fresh = 1` for the teacher and
    `fresh = 0` in data encoded with `class_encode_column`, which sorts the names. Called by
    [`make_compute_metrics`] and [`hf_kd.UncertaintyReport.from_logits`].
    """
    problems = []
    if teacher_accuracy == 0 and num_examples > 1:
        problems.append(f"the teacher classifies none of the {num_examples} examples right (teacher_accuracy 0)")
    if isinstance(sigma, float) and math.isnan(sigma):
        problems.append("sigma is NaN: no example is classified right by both the teacher and the student")
    if problems:
        warnings.warn(
            "; ".join(problems) + ". Check that the teacher's label ids are the dataset's (teacher.config.label2id "
            "against dataset.features['label'].names); if they are not, remap the data with "
            "hf_kd.data.align_labels(dataset, teacher.config.label2id).",
            UserWarning,
            stacklevel=3,
        )


def make_compute_metrics(n_bins: int = 15, class_index: int | None = 0):
    """
    Build a `compute_metrics` function for [`~transformers.Trainer`].

    The returned function takes a [`~transformers.EvalPrediction`] (only its `predictions` and `label_ids` are
    read). `predictions` is either the student logits `(N, K)`, or a tuple `(student_logits,)` or
    `(student_logits, teacher_logits)` with both arrays of shape `(N, K)`. Rows whose label is `-100` are dropped.
    Probabilities are `softmax(logits)` at temperature 1. It calls the functions of this module directly, not their
    `evaluate` modules ([`module_path`]): same numbers, 50-160x less time per evaluation
    (docs/benchmarks/evaluate_overhead.md).

    It returns a flat `dict[str, float]` (the `Trainer` adds the `eval_` prefix):

    - `accuracy`, `ece`, `mce`, `nll`, `brier`, `entropy`: student metrics, see [`expected_calibration_error`],
      [`maximum_calibration_error`], [`negative_log_likelihood`], [`brier_score`] and [`predictive_entropy`];
    - `ece_bins`: the number of equal-width ECE/MCE bins (`n_bins`, as a float), so reports can state it;
    - with teacher logits, also `sigma` ([`confidence_preservation`], NaN when no example is correct for both),
      `teacher_accuracy`, `teacher_entropy` and `teacher_ece`.

    Args:
        n_bins (`int`, *optional*, defaults to `15`):
            Number of equal-width bins for ECE and MCE.
        class_index (`int` or `None`, *optional*, defaults to `0`):
            Passed to [`confidence_preservation`]: `0` reproduces Vengertsev & Sherman's reference code.

    Returns:
        `Callable[[EvalPrediction], dict[str, float]]`.

    Example:

    ```python
    >>> from hf_kd.metrics import make_compute_metrics
    >>> trainer = Trainer(model=model, args=args, eval_dataset=ds, compute_metrics=make_compute_metrics(n_bins=15))
    ```
    """
    _check_n_bins(n_bins)

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions = eval_pred.predictions
        if isinstance(predictions, (tuple, list)):
            if not 1 <= len(predictions) <= 2:
                raise ValueError(
                    "predictions must be logits or a tuple (student_logits,) or (student_logits, teacher_logits), "
                    f"got a tuple of length {len(predictions)}"
                )
            student_logits = predictions[0]
            teacher_logits = predictions[1] if len(predictions) == 2 else None
        else:
            student_logits, teacher_logits = predictions, None

        student_logits = _as_float_array(student_logits, "student_logits")
        if student_logits.ndim != 2:
            raise ValueError(f"student logits must have shape (N, K), got {student_logits.shape}")
        if teacher_logits is not None:
            teacher_logits = _as_float_array(teacher_logits, "teacher_logits")
            if teacher_logits.shape != student_logits.shape:
                raise ValueError(
                    f"teacher logits must have the student logits' shape {student_logits.shape}, "
                    f"got {teacher_logits.shape}"
                )

        labels = np.asarray(eval_pred.label_ids)
        if labels.shape != student_logits.shape[:1]:
            raise ValueError(f"label_ids must have shape ({student_logits.shape[0]},), got {labels.shape}")
        keep = labels != -100
        if not keep.any():
            raise ValueError(f"all {len(labels)} label_ids are -100 (ignored): there is nothing to evaluate")
        labels = labels[keep]
        probs = softmax(student_logits[keep])

        results = {**classification_metrics(probs, labels, n_bins), "ece_bins": float(n_bins)}
        if teacher_logits is not None:
            teacher_probs = softmax(teacher_logits[keep])
            results["sigma"] = confidence_preservation(teacher_probs, probs, labels, class_index=class_index)
            results["teacher_accuracy"] = float(np.mean(teacher_probs.argmax(axis=1) == labels))
            results["teacher_entropy"] = predictive_entropy(teacher_probs)
            results["teacher_ece"] = expected_calibration_error(teacher_probs, labels, n_bins)
            warn_if_teacher_disagrees(results["teacher_accuracy"], results["sigma"], len(labels))
        return results

    return compute_metrics


def make_exit_compute_metrics(n_bins: int = 15, with_teacher: bool = False, with_human: bool = False):
    """
    Build a `compute_metrics` function for [`EarlyExitTrainer`] and [`SelfKDTrainer`]: the metrics of every exit of a
    multi-exit model.

    The returned function takes a [`~transformers.EvalPrediction`] whose `predictions` is the tuple
    `(final_logits, exit_0_logits, ..., exit_{L-1}_logits)` and, when `with_teacher=True`,
    `(final_logits, exit_0_logits, ..., exit_{L-1}_logits, teacher_logits)`, every array of shape `(N, K)`
    (`exit_{L-1}_logits` are the final logits again: that is what [`EarlyExitTrainer.compute_loss`] returns). With
    `with_human=True` the logits are followed by the human label distributions `(N, K)` (what
    [`SelfKDTrainer.compute_loss`] returns; rows of NaN for examples without them). Rows whose label is `-100` are
    dropped.

    It returns a flat `dict[str, float]` (the `Trainer` adds the `eval_` prefix):

    - the final exit's metrics, exactly those of [`make_compute_metrics`] (`accuracy`, `ece`, `mce`, `nll`, `brier`,
      `entropy`, `ece_bins`, and with a teacher `sigma`, `teacher_accuracy`, `teacher_entropy`, `teacher_ece`);
    - for every exit `i`: `exit_{i}_accuracy`, `exit_{i}_ece` (`n_bins` equal-width bins), `exit_{i}_nll` and
      `exit_{i}_entropy` (mean predictive entropy, nats), the per-exit view of DeeBERT (Xin et al., 2020,
      https://huggingface.co/papers/2004.12993) and PABEE (Zhou et al., 2020,
      https://huggingface.co/papers/2006.04152).
    - when `predictions` ends (before the group ids) with a 3-D array `(N, L, K)`, the calibrated per-exit
      probabilities of a model with a fitted per-exit Laplace approximation (Meronen et al., 2024,
      https://huggingface.co/papers/2302.06359; [`EarlyExitTrainer`] appends them): `exit_{i}_laplace_accuracy`,
      `exit_{i}_laplace_ece` and `exit_{i}_laplace_nll`.
    - when `predictions` ends with a 1-D integer array of shape `(N,)` (the evaluation set's `group` column, which
      [`EarlyExitTrainer`] appends when the dataset has one; logits are always 2-D, so the two cannot be confused):
      the final exit's [`group_accuracies`], `worst_group_accuracy`, `mean_group_accuracy` and `group_{g}_accuracy`.
    - with `with_human=True`, on the examples that have a human distribution (none: nothing is added): the final
      exit's `kl` and `js_distance` ([`human_distribution_divergence`], ChaosNLI's conventions), and `exit_{i}_kl`,
      `exit_{i}_js_distance` for every exit.

    Args:
        n_bins (`int`, *optional*, defaults to `15`):
            Number of equal-width bins for ECE and MCE.
        with_teacher (`bool`, *optional*, defaults to `False`):
            Whether the logits are followed by the teacher's logits.
        with_human (`bool`, *optional*, defaults to `False`):
            Whether the last 2-D element of `predictions` is the human label distributions.

    Returns:
        `Callable[[EvalPrediction], dict[str, float]]`.

    Example:

    ```python
    >>> from hf_kd.metrics import make_exit_compute_metrics
    >>> compute_metrics = make_exit_compute_metrics(n_bins=15)
    ```
    """
    _check_n_bins(n_bins)
    final_metrics = make_compute_metrics(n_bins)

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions = eval_pred.predictions
        groups = calibrated = None
        if isinstance(predictions, (tuple, list)) and np.ndim(predictions[-1]) == 1:
            groups, predictions = np.asarray(predictions[-1]), tuple(predictions[:-1])
        human = None
        if with_human:
            if not isinstance(predictions, (tuple, list)) or len(predictions) < 3:
                raise ValueError("with_human=True: predictions must end with the human label distributions")
            # NaN rows mark examples without a human distribution: not _as_float_array, which rejects them.
            human, predictions = np.asarray(predictions[-1], dtype=np.float64), tuple(predictions[:-1])
        if isinstance(predictions, (tuple, list)) and np.ndim(predictions[-1]) == 3:
            calibrated, predictions = np.asarray(predictions[-1]), tuple(predictions[:-1])
        min_length = 3 if with_teacher else 2
        if not isinstance(predictions, (tuple, list)) or len(predictions) < min_length:
            raise ValueError(
                "predictions must be a tuple (final_logits, exit_0_logits, ..., exit_{L-1}_logits"
                + (", teacher_logits)" if with_teacher else ")")
                + f" with at least {min_length} arrays, got "
                + (f"a tuple of length {len(predictions)}" if isinstance(predictions, (tuple, list)) else "one array")
            )
        teacher_logits = predictions[-1] if with_teacher else None
        exit_logits = predictions[1:-1] if with_teacher else predictions[1:]
        final = (predictions[0], teacher_logits) if with_teacher else (predictions[0],)
        results = final_metrics(type(eval_pred)(predictions=final, label_ids=eval_pred.label_ids))

        labels = np.asarray(eval_pred.label_ids)
        keep = labels != -100  # final_metrics has checked the labels' shape and that some are kept
        for i, logits in enumerate(exit_logits):
            logits = _as_float_array(logits, f"exit_{i}_logits")
            if logits.shape != np.shape(predictions[0]):
                raise ValueError(
                    f"exit_{i}_logits must have the final logits' shape {np.shape(predictions[0])}, got {logits.shape}"
                )
            probs = softmax(logits[keep])
            results[f"exit_{i}_accuracy"] = float(np.mean(probs.argmax(axis=1) == labels[keep]))
            results[f"exit_{i}_ece"] = expected_calibration_error(probs, labels[keep], n_bins)
            results[f"exit_{i}_nll"] = negative_log_likelihood(probs, labels[keep])
            results[f"exit_{i}_entropy"] = predictive_entropy(probs)
        if calibrated is not None:
            if calibrated.shape != (labels.shape[0], len(exit_logits), np.shape(predictions[0])[1]):
                raise ValueError(
                    f"the calibrated per-exit probabilities must have shape (N, num_exits, num_labels) = "
                    f"{(labels.shape[0], len(exit_logits), np.shape(predictions[0])[1])}, got {calibrated.shape}"
                )
            for i in range(len(exit_logits)):
                probs = _check_probs(calibrated[keep, i], f"exit_{i} calibrated probabilities")
                results[f"exit_{i}_laplace_accuracy"] = float(np.mean(probs.argmax(axis=1) == labels[keep]))
                results[f"exit_{i}_laplace_ece"] = expected_calibration_error(probs, labels[keep], n_bins)
                results[f"exit_{i}_laplace_nll"] = negative_log_likelihood(probs, labels[keep])
        if human is not None:
            results.update(_human_metrics(human, labels, [predictions[0], *exit_logits]))
        if groups is not None:
            if groups.shape != labels.shape:
                raise ValueError(f"the group ids must have the labels' shape {labels.shape}, got {groups.shape}")
            final_predictions = np.asarray(predictions[0])[keep].argmax(axis=1)
            results.update(group_accuracies(final_predictions, labels[keep], groups[keep]))
        return results

    return compute_metrics


def _human_metrics(human: np.ndarray, labels: np.ndarray, logits: list) -> dict[str, float]:
    """`kl`, `js_distance` of `logits[0]` (the final exit) and `exit_{i}_kl`, `exit_{i}_js_distance` of
    `logits[1 + i]`, on the labelled rows that have a human distribution (no NaN)."""
    if human.shape != np.shape(logits[0]):
        raise ValueError(f"the human label distributions must have the logits' shape {np.shape(logits[0])}, "
                         f"got {human.shape}")
    keep = (labels != -100) & np.isfinite(human).all(axis=1)
    if not keep.any():
        return {}
    results = {}
    for i, exit_logits in enumerate(logits):
        divergence = human_distribution_divergence(human[keep], softmax(_as_float_array(exit_logits, "logits")[keep]))
        prefix = "" if i == 0 else f"exit_{i - 1}_"
        results.update({prefix + name: value for name, value in divergence.items()})
    return results


# --------------------------------------------------------------------------------------------------------------------
# Causal language models: next-token metrics
# --------------------------------------------------------------------------------------------------------------------

# The columns of lm_token_statistics, in order.
_LM_STATISTICS = ("confidence", "correct", "nll", "entropy", "agreement")


@torch.no_grad()
def lm_token_statistics(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    teacher_top1: torch.Tensor | None = None,
):
    r"""
    Per-token statistics of next-token predictions, all that [`lm_metrics`] needs: five numbers per token instead of
    a vocabulary-sized row, so that an evaluation loop can keep them for a whole dataset.

    Logits and labels are **aligned** (as in [`hf_kd.losses.lm_kd_loss`]: the caller shifts, `labels[b, i]` is the
    token that position `i` predicts). Probabilities are `softmax(logits)` at temperature 1, computed in float32.

    Args:
        student_logits (`torch.Tensor` of shape `(batch, seq, vocab)`):
            The student's logits.
        labels (`torch.Tensor` of shape `(batch, seq)`):
            Gold next tokens, `-100` where nothing is counted (their statistics are computed but meaningless).
        teacher_logits (`torch.Tensor` of shape `(batch, seq, vocab)`, *optional*):
            The teacher's logits over the same vocabulary.
        teacher_top1 (`torch.Tensor` of shape `(batch, seq)` and integer dtype, *optional*):
            Instead of `teacher_logits`: the teacher's top-1 token id at each position (any value where nothing is
            counted), e.g. the first of the top-k ids a causal-LM teacher-logit cache holds. Only `agreement` uses
            the teacher.

    Returns:
        `torch.Tensor` of shape `(batch, seq, 5)`, float32: the student's top-1 confidence (its largest
        probability), whether its top-1 token is the gold token (0/1), the gold token's negative log-likelihood, the
        entropy of its next-token distribution (nats), and whether its top-1 token is the teacher's (0/1; NaN without
        a teacher).
    """
    if teacher_logits is not None and teacher_top1 is not None:
        raise ValueError("pass teacher_logits or teacher_top1, not both")
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError(
            f"student_logits must have shape (batch, seq, vocab) and labels (batch, seq), got "
            f"{tuple(student_logits.shape)} and {tuple(labels.shape)}"
        )
    log_probs = torch.log_softmax(student_logits.float(), dim=-1)
    top_log_prob, top = log_probs.max(dim=-1)
    gold = labels.clamp(min=0).long().unsqueeze(-1)
    nll = -log_probs.gather(-1, gold).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    if teacher_top1 is not None:
        if teacher_top1.shape != labels.shape or teacher_top1.is_floating_point():
            raise ValueError(
                f"teacher_top1 must hold integer token ids of shape {tuple(labels.shape)}, got "
                f"{tuple(teacher_top1.shape)} ({teacher_top1.dtype})"
            )
        agreement = (teacher_top1.to(top.device) == top).float()
    elif teacher_logits is None:
        agreement = torch.full_like(nll, float("nan"))
    else:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits must have the student's shape {tuple(student_logits.shape)}, got "
                f"{tuple(teacher_logits.shape)}"
            )
        agreement = (teacher_logits.argmax(dim=-1) == top).float()
    correct = (top == labels).float()
    return torch.stack([top_log_prob.exp(), correct, nll, entropy, agreement], dim=-1)


def lm_metrics_from_token_statistics(statistics: np.ndarray, n_bins: int = 15) -> dict[str, float]:
    """
    [`lm_metrics`] from the per-token statistics of the counted tokens, so that a caller can evaluate batch by batch
    and keep only `(num_tokens, 5)` floats instead of vocabulary-sized logits.

    Args:
        statistics (`np.ndarray` of shape `(num_tokens, 5)`): rows of [`lm_token_statistics`] of counted tokens only
            (`labels != -100`), concatenated over batches; an all-NaN agreement column leaves `top1_agreement` out.
        n_bins (`int`, *optional*, defaults to `15`): number of ECE bins.

    Returns:
        `dict[str, float]`: as [`lm_metrics`].
    """
    if len(statistics) == 0:
        raise ValueError("no token is counted (every label is -100): there is nothing to evaluate")
    confidence, correct, nll, entropy, agreement = (statistics[:, i].astype(np.float64) for i in range(5))
    weights, gaps = _calibration_gaps(_confidence_bins(confidence, correct > 0.5, n_bins))
    results = {
        "perplexity": float(np.exp(nll.mean())),
        "token_accuracy": float(correct.mean()),
        "token_ece": float(np.sum(weights * gaps)),
        "token_entropy": float(entropy.mean()),
        "ece_bins": float(n_bins),
    }
    if not np.isnan(agreement).any():
        results["top1_agreement"] = float(agreement.mean())
    return results


def lm_metrics(student_logits, labels, teacher_logits=None, n_bins: int = 15) -> dict[str, float]:
    r"""
    Next-token metrics of a causal language model over the counted tokens (`labels != -100`).

    - `perplexity`: `exp(mean token NLL)` of the gold tokens;
    - `token_accuracy`: fraction of tokens whose top-1 prediction is the gold token;
    - `token_ece`: token-level ECE, the top-label ECE of Guo et al. (2017, https://huggingface.co/papers/1706.04599)
      with every counted token as one prediction (confidence: the top-1 next-token probability; correct: it is the
      gold token), in `n_bins` equal-width bins as [`reliability_bins`];
    - `token_entropy`: mean entropy (nats) of the next-token distribution;
    - `top1_agreement` (with `teacher_logits`): fraction of tokens where the student's and the teacher's top-1 tokens
      are the same;
    - `ece_bins`: `n_bins`, as a float, so reports can state it.

    Args:
        student_logits (`torch.Tensor` or `np.ndarray` of shape `(batch, seq, vocab)`):
            Student logits, **aligned** with `labels` (the caller shifts: pass `logits[:, :-1]`, `labels[:, 1:]`).
        labels (`torch.Tensor` or `np.ndarray` of shape `(batch, seq)`):
            Gold next tokens, `-100` for tokens that are not counted (prompt, padding).
        teacher_logits (`torch.Tensor` or `np.ndarray` of shape `(batch, seq, vocab)`, *optional*):
            The teacher's logits, same shape.
        n_bins (`int`, *optional*, defaults to `15`):
            Number of ECE bins.

    Returns:
        `dict[str, float]`.
    """
    _check_n_bins(n_bins)
    labels = torch.as_tensor(labels)
    statistics = lm_token_statistics(
        torch.as_tensor(student_logits), labels, None if teacher_logits is None else torch.as_tensor(teacher_logits)
    )
    return lm_metrics_from_token_statistics(statistics[labels != -100].numpy(), n_bins)


def preprocess_lm_logits_for_metrics(logits, labels: torch.Tensor) -> torch.Tensor:
    """
    `preprocess_logits_for_metrics` of [`~transformers.Trainer`] for a causal LM: reduce each evaluation batch's
    logits `(batch, seq, vocab)` (and the teacher's, when `logits` is a tuple `(student, teacher)`) to their
    [`lm_token_statistics`] `(batch, seq, 5)`, so that the evaluation loop never accumulates vocabulary-sized tensors.
    The teacher's part may also be its top-1 token ids `(batch, seq)` (integer), as a cached [`hf_kd.DistillTrainer`]
    evaluation passes them: then `top1_agreement` is known without the teacher's full logits.

    `labels` are the model's own, **not shifted** (`labels[b, t]` is predicted at `t - 1`); the result is aligned
    with them: row `t` holds the statistics of the prediction of token `t`, and row 0 (no prediction) is NaN.
    """
    student_logits, teacher_logits = (logits[0], logits[1] if len(logits) > 1 else None) if isinstance(
        logits, (tuple, list)
    ) else (logits, None)
    teacher = {}
    if teacher_logits is not None:
        # Integer (batch, seq): the teacher's top-1 ids (a cached run); else its logits (batch, seq, vocab).
        is_top1 = teacher_logits.dim() == 2 and not teacher_logits.is_floating_point()
        teacher = {"teacher_top1" if is_top1 else "teacher_logits": teacher_logits[:, :-1]}
    statistics = lm_token_statistics(student_logits[:, :-1], labels[:, 1:], **teacher)
    first = torch.full_like(statistics[:, :1], float("nan"))
    return torch.cat([first, statistics], dim=1)


def make_lm_compute_metrics(n_bins: int = 15):
    """
    Build the `compute_metrics` of a causal-LM [`~transformers.Trainer`] whose `preprocess_logits_for_metrics` is
    [`preprocess_lm_logits_for_metrics`]: its `predictions` are the per-token statistics `(N, seq, 5)` and its
    `label_ids` the unshifted labels `(N, seq)`, `-100` where not counted (Trainer pads both with -100). Returns the
    metrics of [`lm_metrics`] (`perplexity`, `token_accuracy`, `token_ece`, `token_entropy`, `top1_agreement` when
    the statistics carry the teacher's, `ece_bins`).

    Args:
        n_bins (`int`, *optional*, defaults to `15`):
            Number of ECE bins.

    Example:

    ```python
    >>> from hf_kd.metrics import make_lm_compute_metrics, preprocess_lm_logits_for_metrics
    >>> trainer = Trainer(model=lm, args=args, eval_dataset=ds, compute_metrics=make_lm_compute_metrics(),
    ...                   preprocess_logits_for_metrics=preprocess_lm_logits_for_metrics)
    ```
    """
    _check_n_bins(n_bins)

    def compute_metrics(eval_pred) -> dict[str, float]:
        statistics = np.asarray(eval_pred.predictions)
        labels = np.asarray(eval_pred.label_ids)
        if statistics.ndim != 3 or statistics.shape[-1] != len(_LM_STATISTICS) or statistics.shape[:2] != labels.shape:
            raise ValueError(
                f"predictions must be the per-token statistics (N, seq, {len(_LM_STATISTICS)}) of "
                f"preprocess_lm_logits_for_metrics, aligned with label_ids {labels.shape}; got {statistics.shape}. "
                "Pass preprocess_logits_for_metrics=preprocess_lm_logits_for_metrics to the Trainer."
            )
        counted = labels != -100
        counted[:, 0] = False  # the first token is never predicted
        return lm_metrics_from_token_statistics(statistics[counted], n_bins)

    return compute_metrics


@torch.no_grad()
def lm_exit_token_statistics(exit_logits, labels: torch.Tensor) -> torch.Tensor:
    r"""
    The [`lm_token_statistics`] of every exit of a multi-exit causal LM, each exit's `agreement` column being its
    top-1 agreement with the **final exit** (the last of `exit_logits`): what [`make_lm_exit_compute_metrics`] reads.

    Args:
        exit_logits (sequence of `torch.Tensor` of shape `(batch, seq, vocab)`):
            The exits' logits, shallowest first, the final exit last.
        labels (`torch.Tensor` of shape `(batch, seq)`):
            The model's own labels, **not shifted** (`labels[b, t]` is predicted at `t - 1`), `-100` where not counted.

    Returns:
        `torch.Tensor` of shape `(batch, seq, num_exits, 5)`, float32, aligned with `labels` as
        [`preprocess_lm_logits_for_metrics`]: row `t` holds the statistics of the prediction of token `t`, row 0 is NaN.
    """
    final = exit_logits[-1][:, :-1]
    statistics = torch.stack(
        [lm_token_statistics(logits[:, :-1], labels[:, 1:], final) for logits in exit_logits], dim=2
    )  # (batch, seq - 1, num_exits, 5)
    first = torch.full_like(statistics[:, :1], float("nan"))
    return torch.cat([first, statistics], dim=1)


def make_lm_exit_compute_metrics(n_bins: int = 15):
    """
    Build the `compute_metrics` of [`EarlyExitTrainer`] for a multi-exit causal LM ([`MultiExitForCausalLM`]): its
    `predictions` are the [`lm_exit_token_statistics`] `(N, seq, num_exits, 5)` and its `label_ids` the unshifted
    labels `(N, seq)`, `-100` where not counted.

    Returns the final exit's [`lm_metrics`] unprefixed (`perplexity`, `token_accuracy`, `token_ece`, `token_entropy`,
    `ece_bins`) and, for every exit `i` (the final one last), `exit_{i}_perplexity`, `exit_{i}_token_accuracy`
    (next-token accuracy), `exit_{i}_token_ece` (`n_bins` bins), `exit_{i}_token_entropy` and
    `exit_{i}_top1_agreement` (the fraction of counted tokens whose top-1 token is the final exit's).

    Args:
        n_bins (`int`, *optional*, defaults to `15`): number of ECE bins.
    """
    _check_n_bins(n_bins)

    def compute_metrics(eval_pred) -> dict[str, float]:
        statistics = np.asarray(eval_pred.predictions)
        labels = np.asarray(eval_pred.label_ids)
        if statistics.ndim != 4 or statistics.shape[-1] != len(_LM_STATISTICS) or statistics.shape[:2] != labels.shape:
            raise ValueError(
                f"predictions must be the per-exit token statistics (N, seq, num_exits, {len(_LM_STATISTICS)}) of "
                f"lm_exit_token_statistics, aligned with label_ids {labels.shape}; got {statistics.shape}."
            )
        counted = labels != -100
        counted[:, 0] = False  # the first token is never predicted
        counted_statistics = statistics[counted]  # (tokens, num_exits, 5)
        num_exits = statistics.shape[2]
        results = {}
        for i in range(num_exits):
            metrics = lm_metrics_from_token_statistics(counted_statistics[:, i], n_bins)
            bins = metrics.pop("ece_bins")
            results.update({f"exit_{i}_{name}": value for name, value in metrics.items()})
            if i == num_exits - 1:
                results.update({name: value for name, value in metrics.items() if name != "top1_agreement"})
                results["ece_bins"] = bins
        return results

    return compute_metrics


# --------------------------------------------------------------------------------------------------------------------
# Next-token calibration of the exits of an early-exit causal LM, before and after temperature scaling
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def token_calibration_statistics(logits: torch.Tensor, targets: torch.Tensor,
                                 temperature: float = 1.0) -> dict[str, torch.Tensor]:
    r"""
    Per-token calibration statistics of `p = softmax(logits / temperature)` (float64), from which
    [`token_calibration_metrics`] computes the ECE, NLL and Brier score. Chunks of tokens can be processed separately
    and their statistics concatenated: the metrics of the concatenation are those of the whole.

    Args:
        logits (`torch.Tensor` of shape `(num_tokens, vocab)`):
            One row per counted next-token prediction (already shifted: row `n` predicts `targets[n]`).
        targets (`torch.Tensor` of shape `(num_tokens,)`):
            The gold next tokens, in `[0, vocab)`.
        temperature (`float`, *optional*, defaults to `1.0`):
            Divides the logits (temperature scaling, Guo et al., 2017, https://huggingface.co/papers/1706.04599).

    Returns:
        `dict[str, torch.Tensor]`, each of shape `(num_tokens,)`, on the CPU: `confidence` (top-1 probability),
        `correct` (bool: the top-1 token, the first on ties, is the target), `nll` (`-log p[y]`, nats) and `brier`
        (the full-vocabulary Brier score `sum_k (p_k - onehot(y)_k)^2 = sum_k p_k^2 - 2 p_y + 1`, in `[0, 2]`).
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be (num_tokens, vocab) and targets (num_tokens,), got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    p = log_p.exp()
    gold = targets.long().to(logits.device)[:, None]
    confidence, top = p.max(dim=-1)
    # The full-vocabulary Brier score, not the top-label one (`(conf - correct)^2`): it is the proper scoring rule of
    # the whole next-token distribution, the one that brier_score reports for classifiers; the top-label view is what
    # the ECE and the reliability diagrams already show.
    return {
        "confidence": confidence.cpu(),
        "correct": (top == gold.squeeze(-1)).cpu(),
        "nll": (-log_p.gather(-1, gold).squeeze(-1)).cpu(),
        "brier": ((p * p).sum(-1) - 2 * p.gather(-1, gold).squeeze(-1) + 1).cpu(),
    }


def token_calibration_metrics(statistics: dict[str, torch.Tensor],
                              n_bins: int = 15) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    r"""
    Next-token calibration metrics from [`token_calibration_statistics`] (possibly concatenated over chunks).

    Args:
        statistics (`dict[str, torch.Tensor]`): `confidence`, `correct`, `nll`, `brier`, each `(num_tokens,)`.
        n_bins (`int`, *optional*, defaults to `15`): equal-width confidence bins of the ECE (as
            [`reliability_bins`]; Guo et al., 2017, https://huggingface.co/papers/1706.04599).

    Returns:
        `(metrics, bins)`: `metrics` holds `token_ece`, `nll` (mean, nats), `brier` (mean full-vocabulary Brier
        score), `token_accuracy` and `mean_confidence` as floats; `bins` is the [`reliability_bins`] output of the
        top-1 confidences, for a token reliability diagram ([`hf_kd.plots.plot_reliability_diagram`]).
    """
    _check_n_bins(n_bins)
    confidence = statistics["confidence"].double().numpy()
    correct = statistics["correct"].numpy()
    if confidence.size == 0:
        raise ValueError("no token to compute calibration metrics on")
    bins = _confidence_bins(confidence, correct, n_bins)
    weights, gaps = _calibration_gaps(bins)
    metrics = {
        "token_ece": float(np.sum(weights * gaps)),
        "nll": float(statistics["nll"].double().mean()),
        "brier": float(statistics["brier"].double().mean()),
        "token_accuracy": float(correct.mean()),
        "mean_confidence": float(confidence.mean()),
    }
    return metrics, bins


def exit_calibration_report(exit_logits, targets: torch.Tensor, temperatures, n_bins: int = 15) -> list[dict]:
    r"""
    Per-exit next-token calibration of an early-exit causal LM before and after temperature scaling: for every exit,
    the token ECE, NLL and full-vocabulary Brier score at `T = 1` and at its temperature (Guo et al., 2017,
    https://huggingface.co/papers/1706.04599; per-exit temperatures as in "Knowledge Distillation Using Early Exit
    LLMs: experiments on confidence scoring"). [`hf_kd.calibration.calibrate_exit_temperatures`] fits the
    temperatures and returns the same numbers without holding vocabulary-sized logits in memory.

    Args:
        exit_logits (sequence of `torch.Tensor` of shape `(num_tokens, vocab)`):
            Each exit's logits at the counted positions, shallowest exit first, already aligned with `targets`
            (for a batch `(batch, seq, vocab)` and unshifted labels: `logits[:, :-1][labels[:, 1:] != -100]`).
        targets (`torch.Tensor` of shape `(num_tokens,)`): the gold next tokens.
        temperatures (sequence of `float`): one temperature `> 0` per exit (fitted on held-out text).
        n_bins (`int`, *optional*, defaults to `15`): bins of the token ECE.

    Returns:
        `list[dict]`, one per exit: `temperature`, `before` and `after` (the [`token_calibration_metrics`] at `T = 1`
        and at `temperature`), `reliability_before` and `reliability_after` (their bins).
    """
    if len(exit_logits) != len(temperatures):
        raise ValueError(f"got {len(exit_logits)} exits but {len(temperatures)} temperatures")
    report = []
    for logits, temperature in zip(exit_logits, temperatures):
        before, bins_before = token_calibration_metrics(token_calibration_statistics(logits, targets, 1.0), n_bins)
        after, bins_after = token_calibration_metrics(
            token_calibration_statistics(logits, targets, temperature), n_bins
        )
        report.append({"temperature": float(temperature), "before": before, "after": after,
                       "reliability_before": bins_before, "reliability_after": bins_after})
    return report
