"""Temperature scaling (Guo et al., 2017, https://huggingface.co/papers/1706.04599), fitted on held-out data and
folded into the classifier so that plain `transformers` gives calibrated probabilities.

- [`fit_temperature`] and [`fit_temperature_to_distributions`] are pure: logits in, one temperature out. They minimise
  the NLL of gold labels, or the KL divergence to human label distributions (the DistNLI/ChaosNLI variant), over
  `log T` with L-BFGS on the cached logits.
- [`calibrate_temperature`] runs the model once over a dataset, fits the temperature and reports the metrics before
  and after, on that same data.
- [`fold_temperature`] divides the final classification layer by the temperature: `logits / T = (W / T) x + b / T`,
  and records it in `model.config.hf_kd`, which `save_pretrained` writes to `config.json`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .evaluation import (
    _check_batch_size,
    _check_dataset,
    _check_model,
    _check_n_bins,
    _metrics_of,
    _read_distributions,
    compute_logits,
    read_labels,
)
from .metrics import softmax
from .options import CalibrationObjective, to_enum

if TYPE_CHECKING:
    import datasets


__all__ = [
    "CalibrationObjective",
    "CalibrationResult",
    "calibrate_temperature",
    "find_classification_head",
    "fit_temperature",
    "fit_temperature_to_distributions",
    "fold_temperature",
]

# A fitted temperature outside this range means the calibration data is degenerate (e.g. every example right with a
# wide margin drives T -> 0): clamping keeps the folded weights finite and a warning says why.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e2


def check_temperature(temperature, name: str = "temperature") -> float:
    """Return `temperature` as a float, or raise a `ValueError` unless it is a finite real number > 0."""
    if isinstance(temperature, torch.Tensor) and temperature.numel() == 1:
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"{name} must be a finite number > 0, got {temperature!r} ({type(temperature).__name__})")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _check_logits(logits) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        logits = torch.as_tensor(np.asarray(logits))
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, K) with N >= 1 and K >= 2 classes, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    if not torch.isfinite(logits).all():
        raise ValueError(f"logits must be finite, got {int((~torch.isfinite(logits)).sum())} non-finite value(s)")
    # float64: the objective is a mean over thousands of rows and L-BFGS's line search compares tiny differences.
    return logits.detach().to("cpu", torch.float64)


def _fit(objective: Callable[[torch.Tensor], torch.Tensor], max_iter: int, init_temperature: float) -> float:
    """Minimise `objective(logits / T)` over `log T` with L-BFGS (strong Wolfe line search)."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    init_temperature = check_temperature(init_temperature, "init_temperature")
    # Optimising log T keeps T > 0 without constraints and makes the problem well scaled for T in [0.1, 10].
    log_t = torch.tensor([math.log(init_temperature)], dtype=torch.float64, requires_grad=True)
    bounds = (math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE))
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = objective(torch.exp(log_t.clamp(*bounds)))
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = math.exp(min(max(log_t.item(), bounds[0]), bounds[1]))
    if not math.isfinite(temperature):
        raise RuntimeError("temperature fitting diverged; check the logits and labels")
    if temperature <= MIN_TEMPERATURE * 1.0001 or temperature >= MAX_TEMPERATURE / 1.0001:
        warnings.warn(
            f"The fitted temperature hit the bound {temperature:.3g} (allowed [{MIN_TEMPERATURE}, "
            f"{MAX_TEMPERATURE}]): "
            "the calibration data is probably too small or perfectly separated. Use more held-out data.",
            stacklevel=2,
        )
    return temperature


def fit_temperature(logits, labels, max_iter: int = 100, init_temperature: float = 1.0) -> float:
    r"""
    Fit one temperature `T` minimising the negative log-likelihood `mean_i -log softmax(z_i / T)[y_i]`
    (temperature scaling, Guo et al., 2017, https://huggingface.co/papers/1706.04599).

    The optimisation runs over `log T` with L-BFGS on the given logits (no model, no forward pass), in float64. `T > 1`
    softens over-confident predictions, `T < 1` sharpens under-confident ones; the argmax, hence the accuracy, never
    changes. The result is clamped to `[0.01, 100]` with a warning (the NLL of a perfectly separated set keeps
    falling as `T -> 0`).

    Args:
        logits (`torch.Tensor` or `np.ndarray` of shape `(N, K)`):
            Held-out logits, `K >= 2`.
        labels (`torch.Tensor` or `np.ndarray` of shape `(N,)`):
            Gold class indices in `[0, K)`.
        max_iter (`int`, *optional*, defaults to `100`):
            Maximum L-BFGS iterations.
        init_temperature (`float`, *optional*, defaults to `1.0`):
            Starting point, > 0.

    Returns:
        `float`: the temperature, > 0.

    Example:

    ```python
    >>> T = fit_temperature(validation_logits, validation_labels)
    >>> calibrated_probs = torch.softmax(test_logits / T, dim=-1)
    ```
    """
    logits = _check_logits(logits)
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(np.asarray(labels))
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},) to match the logits, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.to("cpu", torch.long)
    bad = (labels < 0) | (labels >= logits.shape[1])
    if bad.any():
        index = int(bad.nonzero()[0])
        raise ValueError(f"labels must be in [0, {logits.shape[1]}), got {int(labels[index])} at index {index}")
    return _fit(lambda t: F.cross_entropy(logits / t, labels), max_iter, init_temperature)


def fit_temperature_to_distributions(
    logits, target_probs, max_iter: int = 100, init_temperature: float = 1.0
) -> float:
    r"""
    Fit one temperature `T` minimising `mean_i KL(p_i || softmax(z_i / T))` to target (human) label distributions
    `p_i`, as DistNLI's temperature calibration does for data with several annotations per item (ChaosNLI, Nie et al.,
    2020, https://huggingface.co/papers/2010.03532). Same optimiser as [`fit_temperature`].

    Args:
        logits (`torch.Tensor` or `np.ndarray` of shape `(N, K)`):
            Held-out logits, `K >= 2`.
        target_probs (`torch.Tensor` or `np.ndarray` of shape `(N, K)`):
            Target distributions: non-negative rows summing to 1 (within 1e-3); zeros are allowed.
        max_iter (`int`, *optional*, defaults to `100`):
            Maximum L-BFGS iterations.
        init_temperature (`float`, *optional*, defaults to `1.0`):
            Starting point, > 0.

    Returns:
        `float`: the temperature, > 0.
    """
    logits = _check_logits(logits)
    target = torch.as_tensor(np.asarray(target_probs.cpu() if isinstance(target_probs, torch.Tensor) else target_probs,
                                        dtype=np.float64))
    if target.shape != logits.shape:
        raise ValueError(f"target_probs must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}")
    if not torch.isfinite(target).all() or (target < 0).any():
        raise ValueError("target_probs must be finite and non-negative")
    sums = target.sum(dim=1)
    off = ((sums - 1).abs() > 1e-3).nonzero()
    if len(off):
        row = int(off[0])
        raise ValueError(f"target_probs rows must sum to 1 (within 1e-3); row {row} sums to {sums[row].item():.6g}")
    target = target / sums[:, None]
    # kl_div(log q, p) = sum p (log p - log q); terms with p = 0 are 0, so zero shares in human labels are fine.
    return _fit(
        lambda t: F.kl_div(F.log_softmax(logits / t, dim=1), target, reduction="batchmean"), max_iter, init_temperature
    )


@dataclass
class CalibrationResult:
    """
    Outcome of [`calibrate_temperature`].

    Args:
        temperature (`float`):
            The fitted temperature; divide logits by it (or fold it with [`fold_temperature`]).
        objective (`str`):
            `"nll"` or `"kl"`.
        num_examples (`int`):
            Rows of the calibration data.
        n_bins (`int`):
            Bins of the ECE/MCE in `before` and `after`.
        before (`dict[str, float]`):
            Metrics of the uncalibrated model on the calibration data (see [`hf_kd.UncertaintyReport`]).
        after (`dict[str, float]`):
            The same metrics at the fitted temperature.
        calibrated_on (`str`, *optional*):
            Description of the calibration data, e.g. `"rotten_tomatoes/validation"`.
    """

    temperature: float
    objective: str
    num_examples: int
    n_bins: int
    before: dict[str, float]
    after: dict[str, float]
    calibrated_on: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate_temperature(
    model: nn.Module,
    dataset: datasets.Dataset,
    objective: str | CalibrationObjective = "nll",
    n_bins: int = 15,
    batch_size: int = 64,
    label_column: str = "label",
    human_distribution_column: str = "human_label_dist",
    data_collator: Callable | None = None,
    calibrated_on: str | None = None,
    max_iter: int = 100,
) -> CalibrationResult:
    r"""
    Fit a temperature for `model` on held-out data (temperature scaling, Guo et al., 2017,
    https://huggingface.co/papers/1706.04599).

    The model runs once over `dataset` (batched, no gradients, [`hf_kd.evaluation.compute_logits`]); the temperature is
    then fitted on the cached logits with L-BFGS ([`fit_temperature`] or [`fit_temperature_to_distributions`]). The
    model is not modified: apply the result with [`fold_temperature`]. Use data the model was not trained on (a
    validation split), and report the effect on other data (the test split).

    Args:
        model (`nn.Module`):
            A sequence classifier whose output has `logits` of shape `(batch, num_labels)`.
        dataset ([`~datasets.Dataset`]):
            Tokenized held-out data with gold labels (objective `"nll"`) or human label distributions (`"kl"`).
        objective (`str` or [`CalibrationObjective`], *optional*, defaults to `"nll"`):
            `"nll"`: fit to the gold labels. `"kl"`: fit to the human label distributions in
            `human_distribution_column`.
        n_bins (`int`, *optional*, defaults to `15`):
            Bins of the ECE/MCE reported before and after.
        batch_size (`int`, *optional*, defaults to `64`):
            Rows per forward pass.
        label_column (`str`, *optional*, defaults to `"label"`):
            Column of gold class indices (needed for both objectives: the metrics use it).
        human_distribution_column (`str`, *optional*, defaults to `"human_label_dist"`):
            Column of human label distributions (objective `"kl"`, and KL/JS metrics when present).
        data_collator (`Callable`, *optional*):
            See [`hf_kd.evaluation.compute_logits`].
        calibrated_on (`str`, *optional*):
            Description of the data, stored in the result and later in `config.hf_kd`.
        max_iter (`int`, *optional*, defaults to `100`):
            Maximum L-BFGS iterations.

    Returns:
        [`CalibrationResult`]: the temperature with the metrics before and after on `dataset`.

    Raises:
        `ValueError`: the data has no labels (or no distributions for `"kl"`), or a bad argument.

    Example:

    ```python
    >>> from hf_kd import calibrate_temperature, fold_temperature
    >>> result = calibrate_temperature(student, tokenized["validation"], calibrated_on="rotten_tomatoes/validation")
    >>> result.temperature, result.before["ece"], result.after["ece"]
    >>> fold_temperature(student, result.temperature, calibrated_on=result.calibrated_on)
    >>> student.save_pretrained("student-calibrated")  # calibrated for anyone who loads it with transformers
    ```
    """
    objective = to_enum(CalibrationObjective, objective, "objective")
    _check_model(model)
    _check_dataset(dataset)
    _check_n_bins(n_bins)
    _check_batch_size(batch_size)
    # Read the targets before the forward pass: a dataset without labels fails in milliseconds, not after minutes.
    labels = read_labels(dataset, label_column, "calibrate_temperature")
    has_human = human_distribution_column in dataset.column_names
    if objective is CalibrationObjective.KL and not has_human:
        raise ValueError(
            f"objective='kl' fits to human label distributions, but the dataset has no {human_distribution_column!r} "
            f"column (columns: {dataset.column_names}). Pass human_distribution_column= or use objective='nll'."
        )

    logits = compute_logits(model, dataset, batch_size, data_collator, desc="Calibration logits").double()
    human = _read_distributions(dataset, human_distribution_column, logits.shape[1]) if has_human else None
    if objective is CalibrationObjective.NLL:
        temperature = fit_temperature(logits, labels, max_iter=max_iter)
    else:
        temperature = fit_temperature_to_distributions(logits, human, max_iter=max_iter)
    return CalibrationResult(
        temperature=temperature,
        objective=objective.value,
        num_examples=len(labels),
        n_bins=n_bins,
        before=_metrics_of(softmax(logits), labels, n_bins, human),
        after=_metrics_of(softmax(logits, temperature), labels, n_bins, human),
        calibrated_on=calibrated_on,
    )


# --------------------------------------------------------------------------------------------------------------------
# Folding
# --------------------------------------------------------------------------------------------------------------------

# Where transformers' sequence classifiers keep the layer that outputs the logits: BERT, DistilBERT, ALBERT, ELECTRA
# (`classifier` is a Linear), RoBERTa, MPNet, DeBERTa-v2 and XLM-R (`classifier.out_proj` inside a head module),
# GPT-2, Llama, Mistral and Qwen (`score`, a Linear without bias).
_HEAD_NAMES = ("classifier", "classifier.out_proj", "score")


def find_classification_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """
    Find the final `nn.Linear` that produces a sequence classifier's logits.

    Looks, in order, at `model.classifier`, `model.classifier.out_proj` and `model.score`, and accepts the first that
    is an `nn.Linear` with `out_features == model.config.num_labels`.

    Args:
        model (`nn.Module`):
            A transformers sequence classifier (with a `config.num_labels`).

    Returns:
        `tuple[str, nn.Linear]`: the module's dotted name and the module.

    Raises:
        `ValueError`: no such layer (the message lists what was found).
    """
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    if not isinstance(num_labels, int):
        raise ValueError(
            f"{type(model).__name__} has no config.num_labels: fold_temperature needs a transformers sequence "
            "classifier (AutoModelForSequenceClassification)."
        )
    seen = []
    for name in _HEAD_NAMES:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear) and module.out_features == num_labels:
            return name, module
        seen.append(f"{name}: {type(module).__name__}" + (
            f"(out_features={module.out_features})" if isinstance(module, nn.Linear) else ""))
    raise ValueError(
        f"Could not find the final classification layer of {type(model).__name__}: expected an nn.Linear with "
        f"out_features == num_labels ({num_labels}) at one of {list(_HEAD_NAMES)}; found "
        f"{seen or 'none of them'}. Temperature folding needs the logits to be the output of a linear layer (for a "
        "PEFT model, merge the adapters first with merge_and_unload())."
    )


def fold_temperature(
    model: nn.Module,
    temperature: float | CalibrationResult,
    calibrated_on: str | None = None,
    allow_refold: bool = False,
) -> nn.Module:
    r"""
    Fold a temperature into the final classification layer, in place: `W <- W / T`, `b <- b / T`, so that the model
    outputs `logits / T` (temperature scaling, Guo et al., 2017, https://huggingface.co/papers/1706.04599) and anyone
    who loads it with plain `transformers` gets calibrated probabilities.

    The temperature is recorded as `model.config.hf_kd = {"temperature": T, "calibrated_on": ...,
    "method": "temperature_scaling"}` (kept by `save_pretrained`; other keys of `config.hf_kd` are preserved). A model
    whose config already records a temperature is refused unless `allow_refold=True`: folding twice compounds the
    temperatures, and the record then holds their product (the total factor between the original and current logits).

    Args:
        model (`nn.Module`):
            A transformers sequence classifier (see [`find_classification_head`] for the supported heads).
        temperature (`float` or [`CalibrationResult`]):
            The temperature, a finite number > 0, or the result of [`calibrate_temperature`] itself (its
            `temperature` is folded and its `calibrated_on` recorded), so that
            `fold_temperature(model, calibrate_temperature(model, validation))` works.
        calibrated_on (`str`, *optional*):
            Description of the calibration data, e.g. `"rotten_tomatoes/validation"`; defaults to a given
            [`CalibrationResult`]'s `calibrated_on`.
        allow_refold (`bool`, *optional*, defaults to `False`):
            Fold into a model that is already calibrated.

    Returns:
        `nn.Module`: the same model, modified in place.

    Raises:
        `ValueError`: a temperature that is not a finite number > 0, a model already calibrated, or no final linear
        layer with `num_labels` outputs.
    """
    if isinstance(temperature, CalibrationResult):
        calibrated_on = temperature.calibrated_on if calibrated_on is None else calibrated_on
        temperature = temperature.temperature
    temperature = check_temperature(temperature)
    name, head = find_classification_head(model)
    previous = getattr(model.config, "hf_kd", None) or {}
    if not isinstance(previous, dict):
        raise ValueError(f"model.config.hf_kd must be a dict, got {type(previous).__name__}: {previous!r}")
    if previous.get("temperature") is not None and not allow_refold:
        raise ValueError(
            "This model is already calibrated: config.hf_kd records temperature "
            f"{previous['temperature']} (calibrated on {previous.get('calibrated_on')!r}). Folding {temperature} "
            "would compound them; pass "
            "allow_refold=True to do it anyway, or start from the uncalibrated model."
        )
    with torch.no_grad():
        head.weight.div_(temperature)
        if head.bias is not None:
            head.bias.div_(temperature)
    total = temperature * float(previous.get("temperature") or 1.0)
    model.config.hf_kd = {
        **previous,
        "temperature": total,
        "calibrated_on": calibrated_on,
        "method": "temperature_scaling",
        "folded_into": name,
    }
    return model
