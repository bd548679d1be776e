"""Temperature scaling (Guo et al., 2017, https://huggingface.co/papers/1706.04599), fitted on held-out data and
folded into the classifier so that plain `transformers` gives calibrated probabilities.

- [`fit_temperature`] and [`fit_temperature_to_distributions`] are pure: logits in, one temperature out. They minimise
  the NLL of gold labels, or the KL divergence to human label distributions (the DistNLI/ChaosNLI variant), over
  `log T` with L-BFGS on the cached logits.
- [`calibrate_temperature`] runs the model once over a dataset, fits the temperature and reports the metrics before
  and after, on that same data.
- [`calibrate_exit_temperatures`] does the same for every exit of a multi-exit causal LM, one temperature per exit
  fitted on the next-token NLL of the completion tokens, with token ECE, NLL and Brier per exit before and after.
- [`fold_temperature`] divides the final classification layer by the temperature: `logits / T = (W / T) x + b / T`,
  and records it in `model.config.hf_kd`, which `save_pretrained` writes to `config.json`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import asdict, dataclass, field
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
from .lm_data import LMDataCollator
from .metrics import softmax, token_calibration_metrics, token_calibration_statistics
from .options import CalibrationObjective, to_enum

if TYPE_CHECKING:
    import datasets


__all__ = [
    "CalibrationObjective",
    "CalibrationResult",
    "ExitCalibrationResult",
    "calibrate_exit_temperatures",
    "calibrate_temperature",
    "find_classification_head",
    "fit_exit_temperature",
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


# --------------------------------------------------------------------------------------------------------------------
# Early-exit causal LMs: one temperature per exit, fitted on next-token NLL
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ExitCalibrationResult:
    """
    Outcome of [`calibrate_exit_temperatures`].

    Args:
        exit_layers (`list[int]`): the model's `config.exit_layers` (the final layer last).
        temperatures (`list[float]`): one fitted temperature per exit; divide that exit's logits by it.
        num_tokens (`int`): counted tokens of the calibration data (each exit is fitted on all of them).
        n_bins (`int`): bins of the token ECE.
        before (`list[dict[str, float]]`): per exit, at `T = 1`: `token_ece`, `nll` (mean next-token NLL, nats),
            `brier` (multi-class Brier score over the vocabulary, `sum_k (p_k - y_k)^2`, mean over tokens),
            `token_accuracy` and `mean_confidence` (mean top-1 probability).
        after (`list[dict[str, float]]`): the same at the fitted temperatures (`token_accuracy` is unchanged).
        calibrated_on (`str`, *optional*): description of the data.
        reliability (`list[dict[str, dict]]`): per exit, `{"before": bins, "after": bins}`, the
            [`hf_kd.metrics.reliability_bins`] of the top-1 next-token confidence (lists, `None` for an empty bin),
            for [`hf_kd.plots.plot_reliability_diagram`].
    """

    exit_layers: list[int]
    temperatures: list[float]
    num_tokens: int
    n_bins: int
    before: list[dict[str, float]]
    after: list[dict[str, float]]
    calibrated_on: str | None = None
    reliability: list[dict[str, dict]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _token_statistics_at(head: Callable, hidden: torch.Tensor, targets: torch.Tensor, beta: float,
                         chunk_size: int) -> tuple[float, float, float]:
    """`(f, f', f'')` of the mean NLL `f(beta) = mean_i [logsumexp(beta z_i) - beta z_i[y_i]]` of the logits
    `z = head(hidden)`, computed `chunk_size` tokens at a time (float64): `f' = mean(E_p[z] - z_y)`,
    `f'' = mean(Var_p(z)) >= 0` with `p = softmax(beta z)`, so Newton's method on the convex `f` needs no line search
    beyond a step-halving safeguard."""
    total = first = second = 0.0
    for start in range(0, hidden.shape[0], chunk_size):
        z = head(hidden[start : start + chunk_size]).double()
        gold = z.gather(-1, targets[start : start + chunk_size, None]).squeeze(-1)
        log_p = torch.log_softmax(beta * z, dim=-1)
        p = log_p.exp()
        mean_z = (p * z).sum(-1)
        total += float((-log_p.gather(-1, targets[start : start + chunk_size, None]).squeeze(-1)).sum())
        first += float((mean_z - gold).sum())
        second += float(((p * z * z).sum(-1) - mean_z**2).sum())
    n = hidden.shape[0]
    return total / n, first / n, second / n


def _fit_token_temperature(head: Callable, hidden: torch.Tensor, targets: torch.Tensor, max_iter: int,
                           chunk_size: int) -> float:
    """The temperature minimising the mean next-token NLL of `head(hidden) / T` (Newton on `beta = 1 / T`)."""
    low, high = 1.0 / MAX_TEMPERATURE, 1.0 / MIN_TEMPERATURE
    beta = 1.0
    value, gradient, curvature = _token_statistics_at(head, hidden, targets, beta, chunk_size)
    for _ in range(max_iter):
        if abs(gradient) < 1e-9 or curvature <= 0:
            break
        step = gradient / curvature
        while True:  # halve the step until the NLL does not increase (Newton may overshoot far from the optimum)
            candidate = min(max(beta - step, low), high)
            new = _token_statistics_at(head, hidden, targets, candidate, chunk_size)
            if new[0] <= value + 1e-12 or abs(step) < 1e-12:
                break
            step /= 2
        converged = abs(candidate - beta) < 1e-7 * max(1.0, beta)
        beta, (value, gradient, curvature) = candidate, new
        if converged:
            break
    temperature = 1.0 / beta
    if temperature <= MIN_TEMPERATURE * 1.0001 or temperature >= MAX_TEMPERATURE / 1.0001:
        warnings.warn(
            f"The fitted temperature hit the bound {temperature:.3g} (allowed [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]):"
            " the calibration text is probably too small. Use more held-out text.",
            stacklevel=3,
        )
    return temperature


def _token_calibration_metrics(head: Callable, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                               n_bins: int, chunk_size: int) -> tuple[dict[str, float], dict[str, list]]:
    """[`hf_kd.metrics.token_calibration_metrics`] of `softmax(head(hidden) / temperature)`, `chunk_size` tokens at
    a time; the reliability bins as JSON-ready lists (`None` for an empty bin)."""
    chunks = [
        token_calibration_statistics(head(hidden[start : start + chunk_size]), targets[start : start + chunk_size],
                                     temperature)
        for start in range(0, hidden.shape[0], chunk_size)
    ]
    statistics = {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}
    metrics, bins = token_calibration_metrics(statistics, n_bins)
    return metrics, {key: [None if math.isnan(v) else v for v in np.asarray(values, dtype=float).tolist()]
                     for key, values in bins.items()}


def _check_exit_calibration_args(model: nn.Module, dataset, batch_size: int, max_iter: int,
                                 chunk_size: int) -> list[int]:
    """The model's `config.exit_layers`, after checking the arguments shared by the exit calibrations."""
    _check_dataset(dataset)
    _check_batch_size(batch_size)
    for name, value in (("max_iter", max_iter), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    exit_layers = list(getattr(getattr(model, "config", None), "exit_layers", None) or [])
    if not exit_layers or not hasattr(model, "exit_logits_from_hidden"):
        raise TypeError(
            f"calibrating the exits needs a multi-exit causal LM (MultiExitForCausalLM: config.exit_layers and "
            f"exit_logits_from_hidden), got {type(model).__name__}. For a classifier use calibrate_temperature."
        )
    if "labels" not in dataset.column_names:
        raise ValueError(
            f"the dataset has no 'labels' column (columns: {dataset.column_names}): calibration needs the next "
            "tokens, -100 on the tokens that do not count."
        )
    return exit_layers


def _exit_hidden_states(model: nn.Module, dataset, layers: list[int], batch_size: int,
                        data_collator: Callable | None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One pass of the backbone over `dataset` (no gradients, eval mode, the mode restored): the raw output of each
    of `layers` at every counted position, `(num_tokens, hidden)` float32 on the CPU per layer, and the targets
    `(num_tokens,)`. Only the hidden states are kept, not the vocabulary-sized logits."""
    if data_collator is None:
        data_collator = LMDataCollator(getattr(model.config.backbone_config, "pad_token_id", None) or 0)

    columns = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
    decoder_layers = model.backbone.model.layers
    captured: dict[int, torch.Tensor] = {}
    # The raw output of each exit layer (the last layer's too: transformers returns it after the final norm).
    hooks = [
        decoder_layers[layer - 1].register_forward_hook(
            lambda module, args, output, layer=layer: captured.__setitem__(
                layer, output[0] if isinstance(output, tuple) else output
            )
        )
        for layer in layers
    ]
    hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    targets = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                rows = [dict(row) for row in dataset.select_columns(columns).select(
                    range(start, min(start + batch_size, len(dataset))))]
                batch = {k: v.to(device) for k, v in data_collator(rows).items()}
                labels = batch.pop("labels")
                model.backbone.model(**batch, use_cache=False)
                counted = labels[:, 1:] != -100  # position t predicts token t + 1
                targets.append(labels[:, 1:][counted].cpu())
                for layer in layers:
                    hidden[layer].append(captured[layer][:, :-1][counted].float().cpu())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    targets = torch.cat(targets).long()
    if targets.numel() == 0:
        raise ValueError("no token is counted (every label is -100): there is nothing to calibrate on")
    return {layer: torch.cat(states) for layer, states in hidden.items()}, targets


def _exit_head(model: nn.Module, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The logits of the exit at `layer` from its layer's raw output, on the CPU (no gradients)."""
    device = next(model.parameters()).device
    head_dtype = next(model.backbone.lm_head.parameters()).dtype

    def head(chunk):
        with torch.no_grad():
            return model.exit_logits_from_hidden(chunk.to(device, head_dtype), layer).cpu()

    return head


def fit_exit_temperature(
    model: nn.Module,
    dataset: datasets.Dataset,
    exit_index: int = -1,
    batch_size: int = 8,
    data_collator: Callable | None = None,
    max_iter: int = 50,
    chunk_size: int = 256,
) -> float:
    r"""
    Fit the temperature of one exit of a multi-exit causal LM (by default the final exit) on held-out text, as
    [`calibrate_exit_temperatures`] does for every exit, running the backbone once and keeping only that exit's
    hidden states. [`EarlyExitTrainer`] calls it for `final_exit_temperature="fitted"`.

    Args:
        model ([`MultiExitForCausalLM`]): see [`calibrate_exit_temperatures`].
        dataset ([`~datasets.Dataset`]): tokenized held-out text with `input_ids`, `labels` (unshifted, `-100`
            where not counted) and optionally `attention_mask`.
        exit_index (`int`, *optional*, defaults to `-1`): the exit, an index into `config.exit_layers` (`-1`: final).
        batch_size, data_collator, max_iter, chunk_size: as in [`calibrate_exit_temperatures`].

    Returns:
        `float`: the temperature minimising the exit's mean next-token NLL, in `[0.01, 100]`.
    """
    exit_layers = _check_exit_calibration_args(model, dataset, batch_size, max_iter, chunk_size)
    if isinstance(exit_index, bool) or not isinstance(exit_index, int) or not -len(exit_layers) <= exit_index < len(
        exit_layers
    ):
        raise ValueError(f"exit_index must index exit_layers={exit_layers}, got {exit_index!r}")
    layer = exit_layers[exit_index]
    hidden, targets = _exit_hidden_states(model, dataset, [layer], batch_size, data_collator)
    return _fit_token_temperature(_exit_head(model, layer), hidden[layer], targets, max_iter, chunk_size)


def calibrate_exit_temperatures(
    model: nn.Module,
    dataset: datasets.Dataset,
    n_bins: int = 15,
    batch_size: int = 8,
    data_collator: Callable | None = None,
    calibrated_on: str | None = None,
    max_iter: int = 50,
    chunk_size: int = 256,
    temperatures: list[float] | None = None,
) -> ExitCalibrationResult:
    r"""
    Fit one temperature per exit of a multi-exit causal LM on held-out text: [`calibrate_temperature`] generalised to
    exits and tokens (temperature scaling, Guo et al., 2017, https://huggingface.co/papers/1706.04599, with every
    counted next-token prediction as one example).

    The model runs once over `dataset` (no gradients); the raw output of each exit's layer at every counted position
    (`labels[:, t + 1] != -100`, i.e. completion tokens) is kept, `(num_tokens, hidden)` per exit, not the
    vocabulary-sized logits. Each exit's temperature then minimises its mean next-token NLL, by Newton's method on
    `1 / T` (the NLL is convex in it), recomputing the exit's logits (`model.exit_logits_from_hidden`) `chunk_size`
    tokens at a time. The model is not modified; a temperature outside `[0.01, 100]` is clamped with a warning.

    Args:
        model ([`MultiExitForCausalLM`]):
            A model with `config.exit_layers`, `backbone.model.layers` and `exit_logits_from_hidden`.
        dataset ([`~datasets.Dataset`]):
            Tokenized held-out text with `input_ids`, `labels` (the input ids, `-100` on the prompt and padding;
            not shifted) and optionally `attention_mask`, e.g. from [`hf_kd.lm_data.tokenize_lm_dataset`].
        n_bins (`int`, *optional*, defaults to `15`): bins of the token ECE.
        batch_size (`int`, *optional*, defaults to `8`): rows per forward pass.
        data_collator (`Callable`, *optional*):
            Turns a list of rows into a batch of tensors; defaults to right padding (the backbone's `pad_token_id`,
            else 0; `labels` -100; `attention_mask` 0).
        calibrated_on (`str`, *optional*): description of the data, stored in the result.
        max_iter (`int`, *optional*, defaults to `50`): maximum Newton steps per exit.
        chunk_size (`int`, *optional*, defaults to `256`): tokens per logits chunk (peak memory about four float64
            `(chunk_size, vocab)` tensors).
        temperatures (`list[float]`, *optional*):
            One temperature per exit to evaluate instead of fitting (e.g. a fit on validation text, evaluated on test
            text): `after` then holds the metrics at these temperatures.

    Returns:
        [`ExitCalibrationResult`] with the temperatures and each exit's token ECE, NLL, Brier before and after, on
        `dataset` (report on other text for honest numbers).

    Example:

    ```python
    >>> from hf_kd import calibrate_exit_temperatures
    >>> result = calibrate_exit_temperatures(model, tokenized["validation"], calibrated_on="bbc/validation")
    >>> result.temperatures, [m["token_ece"] for m in result.before], [m["token_ece"] for m in result.after]
    ```
    """
    _check_n_bins(n_bins)
    exit_layers = _check_exit_calibration_args(model, dataset, batch_size, max_iter, chunk_size)
    if temperatures is not None:
        if len(temperatures) != len(exit_layers):
            raise ValueError(
                f"temperatures has {len(temperatures)} values but the model has {len(exit_layers)} exits "
                f"(exit_layers={exit_layers})."
            )
        temperatures = [check_temperature(t, "temperatures[{}]".format(j)) for j, t in enumerate(temperatures)]
    hidden, targets = _exit_hidden_states(model, dataset, exit_layers, batch_size, data_collator)

    fitted, before, after, reliability = [], [], [], []
    for j, layer in enumerate(exit_layers):
        head = _exit_head(model, layer)
        if temperatures is None:
            temperature = _fit_token_temperature(head, hidden[layer], targets, max_iter, chunk_size)
        else:
            temperature = temperatures[j]
        fitted.append(temperature)
        raw, raw_bins = _token_calibration_metrics(head, hidden[layer], targets, 1.0, n_bins, chunk_size)
        scaled, scaled_bins = _token_calibration_metrics(head, hidden[layer], targets, temperature, n_bins, chunk_size)
        before.append(raw)
        after.append(scaled)
        reliability.append({"before": raw_bins, "after": scaled_bins})
    return ExitCalibrationResult(
        exit_layers=exit_layers,
        temperatures=fitted,
        num_tokens=int(targets.numel()),
        n_bins=n_bins,
        before=before,
        after=after,
        calibrated_on=calibrated_on,
        reliability=reliability,
    )
