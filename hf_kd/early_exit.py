"""Adaptive-inference maths for early-exit models: budget thresholds, model-internal ensembling, offline simulation.

Pure functions on per-exit probabilities, no models. They implement the budgeted ("dynamic") evaluation of MSDNet
(Huang et al., 2018, https://huggingface.co/papers/1703.09844) as used by Meronen et al., "Fixing Overconfidence in
Dynamic Neural Networks" (WACV 2024, https://huggingface.co/papers/2302.06359; official code AaltoML/calibrated-dnn):

1. [`budget_exit_fractions`]: a budget level `b` sets the target fraction `pi_k` of examples leaving at exit `k`.
2. [`fit_budget_thresholds`]: thresholds that realise those fractions on validation confidences.
3. [`model_internal_ensemble`] (MIE): the predictive at exit `k` is the FLOPs-weighted mean of the exits up to `k`.
4. [`simulate_exits`]: apply any [`ExitPolicy`] offline to the probabilities of every exit (one forward pass gives a
   whole accuracy/FLOPs curve); [`budgeted_evaluation`] runs 1-3 for many budgets and reports accuracy, NLPD, ECE
   and expected FLOPs per budget.

Shapes: `K` exits, `N` examples, `C` classes. Per-exit probabilities are `(K, N, C)` (a tensor, an array, or a list
of `K` arrays `(N, C)`), every row a distribution. The per-exit decision and the MIE kernel are shared with
`predict_with_exits` of the multi-exit models (they live in [`hf_kd.modeling.exit_policies`] so that a saved
model stays loadable without hf_kd), so offline simulation and real early exits decide identically.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from .metrics import _check_labels, expected_calibration_error, negative_log_likelihood
from .modeling.exit_policies import (
    ExitPolicy,
    _check_exit_policy,
    _exit_decision,
    _mie_weights,
    _model_internal_ensemble,
)

__all__ = [
    "BUDGET_ECE_BINS",
    "NO_EXIT_THRESHOLD",
    "ExitPolicy",
    "SimulatedExits",
    "budget_exit_fractions",
    "budgeted_evaluation",
    "fit_budget_thresholds",
    "model_internal_ensemble",
    "simulate_exits",
]

NO_EXIT_THRESHOLD = 2.0
"""Budget threshold of an exit that no example should take: above any probability. MSDNet's code uses 1e8; a finite
value keeps thresholds valid for `predict_with_exits`, which rejects non-finite ones."""

BUDGET_ECE_BINS = 10
"""Bins of the ECE reported by [`budgeted_evaluation`], as in Meronen et al. (equal-width bins of
[`hf_kd.metrics.expected_calibration_error`])."""

# Float rows of probabilities sum to 1 only up to rounding (same tolerance as hf_kd.metrics).
_ROW_SUM_ATOL = 1e-3
# floor(N * pi_k) with a tolerance, so that N * pi_k = 1.9999999999999996 (an exact 2 after rounding) counts as 2.
_FLOOR_ATOL = 1e-9


class SimulatedExits(NamedTuple):
    """Output of [`simulate_exits`], in the array type of its input (torch or numpy).

    Attributes:
        exit_index (`(N,)` int64): 0-based exit where each example leaves.
        probs (`(N, C)`): the probabilities of that exit (the ones passed in, e.g. MIE-ensembled).
    """

    exit_index: torch.Tensor | np.ndarray
    probs: torch.Tensor | np.ndarray


def _exit_probs_tensor(exit_probs, name: str) -> tuple[torch.Tensor, bool]:
    """`(K, N, C)` floating tensor from a tensor, an array or a list of `K` `(N, C)`; and whether the input was numpy.

    Checks the shape, finiteness, non-negativity and that every row sums to 1 (within 1e-3).
    """
    if isinstance(exit_probs, (list, tuple)):
        if not exit_probs:
            raise ValueError(f"{name} must hold one (N, C) array per exit, got an empty {type(exit_probs).__name__}.")
        as_numpy = not isinstance(exit_probs[0], torch.Tensor)
        items = [torch.as_tensor(p) for p in exit_probs]
        shapes = {tuple(p.shape) for p in items}
        if len(shapes) != 1:
            raise ValueError(f"every exit of {name} must have the same (N, C) shape, got {sorted(shapes)}.")
        probs = torch.stack(items)
    else:
        as_numpy = not isinstance(exit_probs, torch.Tensor)
        probs = torch.as_tensor(exit_probs)
    if as_numpy or not probs.is_floating_point():
        probs = probs.to(torch.float64)
    if probs.ndim != 3 or 0 in probs.shape:
        raise ValueError(
            f"{name} must have shape (num_exits, N, num_classes) with every size >= 1, got {tuple(probs.shape)}."
        )
    if not torch.isfinite(probs).all():
        raise ValueError(f"{name} must be finite, got {int((~torch.isfinite(probs)).sum())} non-finite value(s).")
    if (probs < 0).any():
        raise ValueError(f"{name} must hold probabilities, got a negative value.")
    off = ((probs.sum(-1) - 1).abs() > _ROW_SUM_ATOL).nonzero()
    if len(off):
        k, i = off[0].tolist()
        raise ValueError(
            f"{name} rows must sum to 1 (within {_ROW_SUM_ATOL}); exit {k}, row {i} sums to "
            f"{float(probs[k, i].sum()):.6g}. Pass probabilities, e.g. softmax(logits), not logits."
        )
    return probs, as_numpy


def _exit_flops_tensor(exit_flops, num_exits: int) -> torch.Tensor:
    """Validated per-exit cumulative FLOPs `(K,)` float64: finite and > 0."""
    try:
        flops = torch.as_tensor(exit_flops, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"exit_flops must be a list of numbers, got {exit_flops!r}.") from None
    if flops.ndim != 1 or flops.numel() != num_exits:
        raise ValueError(f"exit_flops must hold one value per exit ({num_exits}), got shape {tuple(flops.shape)}.")
    if not (torch.isfinite(flops).all() and (flops > 0).all()):
        raise ValueError(f"exit_flops must be finite and > 0, got {flops.tolist()}.")
    return flops


def budget_exit_fractions(budget_level: float, num_exits: int, base: float = 20) -> list[float]:
    r"""Target fraction of the examples that leaves at each exit for a budget level (MSDNet budgeted protocol).

    `q = budget_level / base` and `pi_k ∝ q^k` for `k = 1..K`, normalised to sum to 1 (Huang et al., 2018; Meronen et
    al., 2024, PAPERS.md 6c). `q < 1` sends most examples out early (a small budget), `q = 1` is uniform and `q > 1`
    keeps most examples to the end. The reference sweeps `budget_level = 1..39` with `base = 20`. Computed in float64
    in log space, so large `K` does not overflow.

    Args:
        budget_level (`float`): the budget level `b`, > 0.
        num_exits (`int`): number of exits `K`, >= 1.
        base (`float`, *optional*, defaults to 20): `q = b / base`, > 0.

    Returns:
        `list[float]` of length `K`: non-negative, summing to 1.

    Example:

    ```python
    >>> [round(f, 4) for f in budget_exit_fractions(10, 3)]  # q = 0.5: 4/7, 2/7, 1/7
    [0.5714, 0.2857, 0.1429]
    ```
    """
    for name, value in (("budget_level", budget_level), ("base", base)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    if isinstance(num_exits, bool) or not isinstance(num_exits, int) or num_exits < 1:
        raise ValueError(f"num_exits must be an integer >= 1, got {num_exits!r}.")
    log_q = math.log(budget_level / base)
    logits = log_q * np.arange(1, num_exits + 1, dtype=np.float64)
    # Subtracting the maximum keeps exp() in range; it cancels in the normalisation.
    weights = np.exp(logits - logits.max())
    return (weights / weights.sum()).tolist()


def fit_budget_thresholds(confidences, fractions: Sequence[float]) -> list[float]:
    r"""Per-exit confidence thresholds that make a target fraction of validation examples leave at each exit.

    The MSDNet reference (`dynamic_find_threshold` in Huang et al.'s code, unchanged in Meronen et al.'s): for
    `k = 1..K-1` in order, among the examples that have not exited yet, sort the confidences at exit `k` in
    decreasing order and set `T_k` to the `n_k`-th one, `n_k = floor(N * pi_k)`; then every not-yet-exited example
    with `confidence_k >= T_k` exits at `k` (ties may take more than `n_k`). The last exit takes everyone left. At test
    time an example leaves at the first `k` with `confidence_k >= T_k`, the `"budget"` [`ExitPolicy`], so these are
    the `thresholds` of `predict_with_exits(..., policy="budget")` and [`simulate_exits`]. When `n_k = 0`, or `n_k`
    is larger than the number of examples left (ties took more at earlier exits), `T_k` is [`NO_EXIT_THRESHOLD`]
    (2.0): nobody exits there, as the reference's `1e8`. `floor` has a 1e-9 tolerance so that a product that is an
    integer up to rounding is not rounded down.

    Args:
        confidences (`np.ndarray` or `torch.Tensor` of shape `(N, K)`):
            Confidence of each validation example at each exit: the maximum probability of the exit's final predictive
            (after MIE, temperature scaling or Laplace if used), in [0, 1]. The last column is not used.
        fractions (`Sequence[float]` of length `K`):
            Target fraction of the examples per exit, non-negative and summing to 1, e.g. from
            [`budget_exit_fractions`].

    Returns:
        `list[float]` of length `K - 1`: `T_1..T_{K-1}`, each a confidence of the data or [`NO_EXIT_THRESHOLD`].

    Example:

    ```python
    >>> conf = [[0.9, 0.5, 1.0], [0.8, 0.9, 1.0], [0.3, 0.7, 1.0], [0.2, 0.6, 1.0]]  # 4 examples, 3 exits
    >>> fit_budget_thresholds(conf, [0.25, 0.5, 0.25])  # 1 exits at exit 1 (0.9), then 2 of the 3 left (0.9, 0.7)
    [0.9, 0.7]
    ```
    """
    if isinstance(confidences, torch.Tensor):
        confidences = confidences.detach().to("cpu", torch.float64).numpy()
    confidences = np.asarray(confidences, dtype=np.float64)
    if confidences.ndim != 2 or 0 in confidences.shape:
        raise ValueError(
            f"confidences must have shape (N, num_exits) with N, num_exits >= 1, got {confidences.shape}."
        )
    if not np.all(np.isfinite(confidences)) or confidences.min() < 0 or confidences.max() > 1 + 1e-6:
        raise ValueError(
            "confidences must be probabilities in [0, 1] (the maximum of each exit's predictive), got values in "
            f"[{confidences.min()}, {confidences.max()}]."
        )
    num_examples, num_exits = confidences.shape
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (num_exits,):
        raise ValueError(f"fractions must hold one value per exit ({num_exits}), got shape {fractions.shape}.")
    if not np.all(np.isfinite(fractions)) or (fractions < 0).any() or abs(fractions.sum() - 1) > 1e-6:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions.tolist()}.")

    exited = np.zeros(num_examples, dtype=bool)
    thresholds = []
    for k in range(num_exits - 1):
        count = math.floor(num_examples * fractions[k] + _FLOOR_ATOL)
        remaining = np.sort(confidences[~exited, k])[::-1]  # decreasing
        threshold = float(remaining[count - 1]) if 1 <= count <= remaining.size else NO_EXIT_THRESHOLD
        thresholds.append(threshold)
        exited |= confidences[:, k] >= threshold
    return thresholds


def model_internal_ensemble(exit_probs, flops):
    r"""Model-internal ensembling (MIE) of the exits' predictive distributions (Meronen et al., 2024).

    `w_i = FLOPs_i / FLOPs_K` and `p̄_k = sum_{i<=k} w_i p_i / sum_{i<=k} w_i`, so `p̄_1 = p_1` and the deeper, more
    expensive exits weigh more (`calc_ensemble_logits` in the official code, applied to probabilities).

    Args:
        exit_probs (`torch.Tensor` or `np.ndarray` of shape `(K, N, C)`, or a list of `K` `(N, C)`):
            Per-exit probabilities (softmax, or a calibrated predictive), rows summing to 1.
        flops (`Sequence[float]` of length `K`):
            Cumulative FLOPs of one example up to and including each exit, > 0 (e.g. `model.exit_flops(...)`).

    Returns:
        `(K, N, C)`, the ensembled probabilities `p̄_1..p̄_K`: a torch tensor (the input's dtype and device) for torch
        input, a float64 numpy array otherwise.
    """
    probs, as_numpy = _exit_probs_tensor(exit_probs, "exit_probs")
    weights = _mie_weights(_exit_flops_tensor(flops, probs.shape[0]))
    ensembled = _model_internal_ensemble(probs, weights)
    return ensembled.numpy() if as_numpy else ensembled


def _simulate(probs: torch.Tensor, policy, threshold, patience, thresholds) -> torch.Tensor:
    """Exit index `(N,)` of every example under a validated policy, from checked probabilities `(K, N, C)`."""
    num_exits, num_examples = probs.shape[:2]
    exit_index = torch.full((num_examples,), num_exits - 1, dtype=torch.long, device=probs.device)
    running = torch.ones(num_examples, dtype=torch.bool, device=probs.device)
    previous, counter = None, torch.zeros(num_examples, dtype=torch.long, device=probs.device)
    # Every example is decided at every exit; an example's decisions depend on its own history only, so this equals
    # predict_with_exits, which drops the rows that left.
    for k in range(num_exits - 1):
        done, previous, counter = _exit_decision(
            policy, probs[k], k, threshold, patience, thresholds, previous, counter
        )
        exit_index[running & done] = k
        running &= ~done
    return exit_index


def simulate_exits(
    exit_probs,
    thresholds: Sequence[float] | None = None,
    policy: ExitPolicy | str = ExitPolicy.BUDGET,
    threshold: float | None = None,
    patience: int | None = None,
) -> SimulatedExits:
    r"""Apply an exit policy offline to the probabilities of every exit: where would each example leave?

    The same decisions as `predict_with_exits` of the multi-exit models (the same code), but from the probabilities of
    all exits computed once (e.g. `forward(...).exit_logits`), so a whole accuracy/FLOPs curve over many thresholds
    costs one forward pass. For MIE, pass [`model_internal_ensemble`] of the probabilities.

    Args:
        exit_probs (`torch.Tensor` or `np.ndarray` of shape `(K, N, C)`, or a list of `K` `(N, C)`):
            The predictive of every exit, the one the policy reads.
        thresholds (`Sequence[float]`, *optional*):
            For `policy="budget"` (the default): `K - 1` thresholds, one per non-final exit, e.g. from
            [`fit_budget_thresholds`].
        policy ([`ExitPolicy`] or `str`, *optional*, defaults to `"budget"`):
            `"budget"`, `"max_prob"`, `"entropy"` or `"patience"` (see [`ExitPolicy`]).
        threshold (`float`, *optional*): for `"max_prob"` (in [0, 1]) and `"entropy"` (>= 0, nats).
        patience (`int`, *optional*): for `"patience"`, >= 1.

    Returns:
        [`SimulatedExits`] `(exit_index (N,), probs (N, C))`: torch tensors for torch input, numpy arrays otherwise.
    """
    probs, as_numpy = _exit_probs_tensor(exit_probs, "exit_probs")
    policy, thresholds = _check_exit_policy(policy, threshold, patience, thresholds, probs.shape[0])
    exit_index = _simulate(probs, policy, threshold, patience, thresholds)
    chosen = probs[exit_index, torch.arange(probs.shape[1], device=probs.device)]  # (N, C)
    if as_numpy:
        return SimulatedExits(exit_index.numpy(), chosen.numpy())
    return SimulatedExits(exit_index, chosen)


def budgeted_evaluation(
    val_probs,
    test_probs,
    test_labels,
    exit_flops: Sequence[float],
    budget_levels: Iterable[float] = range(1, 40),
    mie: bool = False,
    base: float = 20,
) -> list[dict]:
    r"""The budgeted ("dynamic") evaluation of Meronen et al. (2024): accuracy, NLPD, ECE and FLOPs per budget.

    For each budget level: target fractions from [`budget_exit_fractions`], thresholds fitted on the validation
    confidences (the maximum of each exit's predictive) with [`fit_budget_thresholds`], then the test examples leave
    at the first exit whose confidence reaches its threshold ([`simulate_exits`], `"budget"` policy) and are scored
    with the probabilities of that exit. With `mie=True` every exit's predictive is first replaced by
    [`model_internal_ensemble`] (weights from `exit_flops`), on both splits, so the confidences, the thresholds and the
    scores all use the ensemble. The thresholds need no validation labels. Computed in float64.

    Args:
        val_probs (`(K, N_val, C)` or a list of `K` `(N_val, C)`): per-exit probabilities on validation data.
        test_probs (`(K, N_test, C)` or a list of `K` `(N_test, C)`): per-exit probabilities on test data.
        test_labels (`(N_test,)`): gold class indices in `[0, C)`.
        exit_flops (`Sequence[float]` of length `K`): cumulative FLOPs of one example up to and including each exit,
            > 0 (e.g. `model.exit_flops(...)`).
        budget_levels (`Iterable[float]`, *optional*, defaults to `range(1, 40)`): the budget levels `b` (> 0), the
            reference's 39 levels by default.
        mie (`bool`, *optional*, defaults to `False`): evaluate the model-internal ensemble.
        base (`float`, *optional*, defaults to 20): `q = b / base` in [`budget_exit_fractions`].

    Returns:
        `list[dict]`, one per budget level, in order, with keys:

        - `budget_level` (the value given) and `thresholds` (`list[float]`, `K - 1`);
        - `exit_fractions` (`list[float]`, `K`): the fraction of test examples leaving at each exit;
        - `accuracy`: top-1 accuracy;
        - `nlpd`: `-mean log p(y | x)` at the chosen exit ([`hf_kd.metrics.negative_log_likelihood`], natural log,
          gold probability clipped at 1e-12);
        - `ece`: [`hf_kd.metrics.expected_calibration_error`] with `ece_bins` = [`BUDGET_ECE_BINS`] (10) bins;
        - `expected_flops`: mean over test examples of `exit_flops` at the chosen exit.
    """
    if not isinstance(mie, bool):
        raise ValueError(f"mie must be True or False, got {mie!r}.")
    val, _ = _exit_probs_tensor(val_probs, "val_probs")
    test, _ = _exit_probs_tensor(test_probs, "test_probs")
    val, test = val.to("cpu", torch.float64), test.to("cpu", torch.float64)
    if val.shape[0] != test.shape[0] or val.shape[2] != test.shape[2]:
        raise ValueError(
            f"val_probs and test_probs must have the same number of exits and classes, got (K, N, C) = "
            f"{tuple(val.shape)} and {tuple(test.shape)}."
        )
    num_exits, num_test, num_classes = test.shape
    labels = _check_labels(test_labels, num_test, num_classes)
    flops = _exit_flops_tensor(exit_flops, num_exits)
    if mie:
        weights = _mie_weights(flops)
        val, test = _model_internal_ensemble(val, weights), _model_internal_ensemble(test, weights)
    val_confidences = val.max(-1).values.T  # (N_val, K)

    results = []
    for budget_level in budget_levels:
        fractions = budget_exit_fractions(budget_level, num_exits, base)
        thresholds = fit_budget_thresholds(val_confidences, fractions)
        exit_index = _simulate(test, ExitPolicy.BUDGET, None, None, thresholds)
        chosen = test[exit_index, torch.arange(num_test)].numpy()  # (N_test, C)
        results.append(
            {
                "budget_level": budget_level,
                "thresholds": thresholds,
                "exit_fractions": (torch.bincount(exit_index, minlength=num_exits) / num_test).tolist(),
                "accuracy": float(np.mean(chosen.argmax(axis=1) == labels)),
                "nlpd": negative_log_likelihood(chosen, labels),
                "ece": expected_calibration_error(chosen, labels, n_bins=BUDGET_ECE_BINS),
                "ece_bins": BUDGET_ECE_BINS,
                "expected_flops": float(flops[exit_index].mean()),
            }
        )
    return results
