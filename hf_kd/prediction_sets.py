"""Prediction sets for early-exit classifiers: anytime-valid confidence sequences (AVCS) and the RAPS baseline.

Pure functions on the per-exit logits (or probabilities) of a multi-exit classifier, no models. Shapes: `K` exits,
`N` examples, `C` classes; per-exit arrays are `(K, N, C)`, prediction sets are boolean masks `(K, N, C)` (`True` =
the class is in the set).

- [`avcs_prediction_sets`]: the post-hoc AVCS of Jazbec et al., "Early-Exit Neural Networks with Nested Prediction
  Sets" (UAI 2024, https://huggingface.co/papers/2311.05931; official code metodj/EENN-AVCS). At exit `l` the
  logits pass a ReLU with threshold `tau_l` and become Dirichlet concentrations `alpha_l`; with a plug-in sample
  `pi_l ~ Dir(alpha_l)` on the support, `R_l(y) = (alpha_l,y / sum_k alpha_l,k) / pi_l,y` is a predictive likelihood
  ratio (`+inf` off the support), `R_t = prod_{l<=t} R_l` a product martingale, and
  `C_t = {y : R_t(y) <= 1/alpha}`. Ville's inequality makes `P(exists t : y* not in C_t) <= alpha` when the model's
  predictive is right; `R_l < 1` can let a label come back, so `C_t` is not nested, and the running intersection
  `C_1 ∩ ... ∩ C_t`, valid under the same argument, is nested by construction (both are returned).
- [`fit_avcs_thresholds`]: the official greedy search of the ReLU thresholds (start at 1, raise each exit's by 0.5
  while the calibration coverage stays above a target at every exit), run on a calibration split only; optionally
  also over a logit scale and offset (an extension for logits that do not suit ReLU Dirichlets, see
  [`avcs_prediction_sets`]). The target is set by a [`CoverageRule`] ([`coverage_target`]): the paper's (calibration
  coverage `> 1 - alpha`, `coverage_rule="empirical"`), the conformal level, or hf_kd's default, a binomial
  (Clopper-Pearson) lower confidence bound `>= 1 - alpha` (its error level split over the logit transforms tried),
  which keeps the search from overfitting a small calibration split (the paper's rule does: on synthetic data,
  `n = 200`, `alpha = 0.1`, its sets' coverage on new data fell below `1 - alpha` for 41-58 % of the calibration
  draws, against 5-11 % with the binomial rule).
- [`raps_prediction_sets`]: regularised adaptive prediction sets (Angelopoulos et al., 2021,
  https://huggingface.co/papers/2009.14193), split-conformal per exit, the paper's baseline (`lam_reg = 0.01`,
  `k_reg = 5`, randomised); [`running_intersection`] gives "RAPS-intersect".
- [`prediction_set_metrics`]: per-exit marginal coverage, mean set size and nestedness (the official conventions),
  plus the fraction of fully nested trajectories and the coverage at every exit at once.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from scipy.stats import binom

from .options import CoverageRule, to_enum

__all__ = [
    "AVCSSets",
    "AVCSThresholds",
    "CoverageRule",
    "avcs_prediction_sets",
    "calibration_split",
    "coverage_target",
    "fit_avcs_thresholds",
    "min_calibration_size",
    "prediction_set_metrics",
    "raps_prediction_sets",
    "relu_concentrations",
    "running_intersection",
]


class AVCSSets(NamedTuple):
    """Output of [`avcs_prediction_sets`].

    Attributes:
        sets (`np.ndarray` of shape `(K, N, C)`, bool): `C_t = {y : R_t(y) <= 1/alpha}` at every exit `t` (the
            official definition; not always nested).
        nested_sets (`np.ndarray` of shape `(K, N, C)`, bool): the running intersection `C_1 ∩ ... ∩ C_t`.
        log_ratios (`np.ndarray` of shape `(K, N, C)`, float64): `log R_t(y)`, `+inf` for labels that left a
            support.
    """

    sets: np.ndarray
    nested_sets: np.ndarray
    log_ratios: np.ndarray


def _as_array(x, name: str, ndim: int, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    elif isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
        x = np.stack([t.detach().cpu().numpy() for t in x])
    x = np.asarray(x)
    if x.ndim != ndim or 0 in x.shape:
        raise ValueError(f"{name} must have {ndim} dimensions with every size >= 1, got shape {x.shape}.")
    if dtype is np.float64:
        if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
            raise ValueError(f"{name} must hold finite numbers.")
        return x.astype(np.float64)
    return x


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha (the miscoverage level) must be a number in (0, 1), got {alpha!r}.")
    return float(alpha)


def _check_rule(coverage_rule, delta) -> tuple[CoverageRule, float]:
    rule = to_enum(CoverageRule, coverage_rule, "coverage_rule")
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise ValueError(f"delta (the binomial rule's error level) must be a number in (0, 1), got {delta!r}.")
    return rule, float(delta)


def coverage_target(
    num_examples: int, alpha: float, coverage_rule: CoverageRule | str = CoverageRule.BINOMIAL, delta: float = 0.1
) -> int:
    r"""The fewest covered calibration examples, out of `num_examples` (`n`), with which [`fit_avcs_thresholds`]
    accepts a configuration at an exit (`n + 1` when no count is enough).

    - `"empirical"`: the smallest `k` with `k / n > 1 - alpha` (the official search's check, in floating point).
    - `"conformal"`: `ceil((n + 1)(1 - alpha))`, the level of split-conformal prediction (Vovk et al., 2005;
      Angelopoulos & Bates, https://huggingface.co/papers/2107.07511): for one threshold on a nested family of sets,
      picked on `n` exchangeable calibration examples, it makes the test coverage `>= 1 - alpha` in expectation. The
      AVCS search tunes `K` thresholds (and a scale and offset), so there it is only a floor.
    - `"binomial"`: the smallest `k` with `P(Bin(n, 1 - alpha) >= k) <= delta`, i.e. the exact one-sided binomial
      test of "true coverage `< 1 - alpha`" rejects at level `delta`, equivalently (by the duality of the
      Clopper-Pearson interval) the `1 - delta` lower confidence bound on the coverage is `>= 1 - alpha`; never below
      the conformal level. A configuration fixed in advance that passes has true coverage `>= 1 - alpha` with
      probability `>= 1 - delta` over the calibration draw (a PAC, or training-conditional, guarantee: Vovk, 2012,
      "Conditional validity of inductive conformal predictors"; Park et al., 2020,
      https://huggingface.co/papers/2001.00106; Bates et al., 2021, https://huggingface.co/papers/2101.02703), about
      `z_{1 - delta} sqrt(alpha (1 - alpha) / n)` above `1 - alpha` (0.963 for `n = 516`, 0.957 for `n = 2000`, at
      `alpha = 0.05`, `delta = 0.1`). Requiring it at every exit is an intersection-union test (no correction over
      the exits), and raising one exit's threshold until the first failure is fixed-sequence testing, which needs
      no correction either (Learn then Test, Angelopoulos et al., 2021, https://huggingface.co/papers/2110.01052).
      When [`fit_avcs_thresholds`] tries `P` `(scale, offset)` pairs and keeps the one with the smallest sets, it asks
      for this count at `delta / P` (Bonferroni: with probability `>= 1 - delta` no pair's tested configuration that
      passes has true coverage `< 1 - alpha`, whichever pair is then chosen). The search's remaining data-driven step
      (later exits' chains start where earlier ones stopped) is not covered by that argument: there the margin is a
      safeguard against overfitting the calibration split, not a proof, and its effect is measured
      (`tests/test_prediction_sets.py`, `docs/benchmarks/exit_uncertainty.md`).

    The three targets are ordered `empirical <= conformal <= binomial` for every `n`, `alpha` and `delta`.

    Args:
        num_examples (`int`): `n`, the calibration examples, `>= 1`.
        alpha (`float`): miscoverage level in (0, 1).
        coverage_rule ([`CoverageRule`] or `str`, *optional*, defaults to `"binomial"`).
        delta (`float`, *optional*, defaults to 0.1): error level of the binomial bound, in (0, 1).

    Returns:
        `int` in `[1, n + 1]`.
    """
    alpha = _check_alpha(alpha)
    rule, delta = _check_rule(coverage_rule, delta)
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
        raise ValueError(f"num_examples must be an integer >= 1, got {num_examples!r}.")
    n = int(num_examples)
    # The official check compares the float mean k / n (exactly rounded) with the float 1 - alpha; the same here.
    empirical = next(k for k in range(max(1, math.floor(n * (1 - alpha)) - 1), n + 1) if k / n > 1 - alpha)
    if rule is CoverageRule.EMPIRICAL:
        return empirical
    conformal = max(empirical, min(math.ceil((n + 1) * (1 - alpha) - 1e-9), n + 1))
    if rule is CoverageRule.CONFORMAL:
        return conformal
    counts = np.arange(n + 2)
    passing = np.flatnonzero(binom.sf(counts - 1, n, 1 - alpha) <= delta)  # sf(k - 1) = P(X >= k)
    return max(conformal, int(passing[0]) if passing.size else n + 1)


def min_calibration_size(
    alpha: float, coverage_rule: CoverageRule | str = CoverageRule.CONFORMAL, delta: float = 0.1
) -> int:
    r"""The fewest calibration examples for which a coverage of `1 - alpha` can be certified.

    With the default `"conformal"` (and `"empirical"`): the smallest `n` with `ceil((n + 1)(1 - alpha)) <= n`, i.e.
    `n >= 1/alpha - 1` (19 for `alpha = 0.05`). With fewer, the conformal quantile of RAPS is undefined, and an
    empirical coverage above `1 - alpha` means that every example is covered. With `"binomial"` ([`coverage_target`]):
    also `(1 - alpha)^n <= delta`, so that covering all `n` examples passes the binomial test, i.e.
    `n >= log(delta) / log(1 - alpha)` (45 for `alpha = 0.05`, `delta = 0.1`). The default is RAPS's minimum;
    [`fit_avcs_thresholds`] defaults to the binomial rule, whose minimum needs `coverage_rule="binomial"` here.

    Args:
        alpha (`float`): miscoverage level in (0, 1).
        coverage_rule ([`CoverageRule`] or `str`, *optional*, defaults to `"conformal"`).
        delta (`float`, *optional*, defaults to 0.1): error level of the binomial rule, in (0, 1).

    Returns:
        `int`, the fewest calibration examples.
    """
    alpha = _check_alpha(alpha)
    rule, delta = _check_rule(coverage_rule, delta)
    n = max(1, math.ceil(1 / alpha - 1 - 1e-9))
    while math.ceil((n + 1) * (1 - alpha) - 1e-9) > n:
        n += 1
    if rule is CoverageRule.BINOMIAL:
        n = max(n, math.floor(math.log(delta) / math.log1p(-alpha)) - 1)
        while coverage_target(n, alpha, rule, delta) > n:
            n += 1
    return n


def _check_calibration(
    num_examples: int,
    alpha: float,
    coverage_rule: CoverageRule = CoverageRule.CONFORMAL,
    delta: float = 0.1,
    num_pairs: int = 1,
) -> None:
    needed = min_calibration_size(alpha, coverage_rule, delta / num_pairs)
    if num_examples < needed:
        split, level = (f" split over {num_pairs} (scale, offset) pairs", f"delta / {num_pairs}") if num_pairs > 1 else (
            "", "delta")
        rule = (
            f"with coverage_rule='binomial' and delta={delta}{split} (n >= log({level}) / log(1 - alpha))"
            if coverage_rule is CoverageRule.BINOMIAL
            else "(n >= 1/alpha - 1)"
        )
        raise ValueError(
            f"the calibration split has {num_examples} examples, too few for alpha={alpha}: a coverage of "
            f"1 - alpha = {1 - alpha:g} needs at least {needed} {rule}. Use more calibration data or a larger alpha"
            + (" or delta" + (", or fewer (scale, offset) pairs." if num_pairs > 1 else ".")
               if coverage_rule is CoverageRule.BINOMIAL else ".")
        )


def _check_labels(labels, num_examples: int, num_classes: int) -> np.ndarray:
    labels = _as_array(labels, "labels", 1, dtype=None)
    if labels.shape != (num_examples,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {num_examples} integer class indices, got {labels.dtype} {labels.shape}.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}].")
    return labels.astype(np.int64)


def _check_thresholds(thresholds, num_exits: int) -> np.ndarray:
    values = np.asarray(thresholds, dtype=np.float64)
    if values.shape != (num_exits,) or not np.all(np.isfinite(values)) or (values < 0).any():
        raise ValueError(f"thresholds must hold {num_exits} finite values >= 0 (one per exit), got {thresholds!r}.")
    return values


def calibration_split(num_examples: int, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random split of `range(num_examples)` into `(calibration, evaluation)` indices, the calibration part
    `floor(fraction * num_examples)` long (Jazbec et al. calibrate on 20 % of the test set, seed 0)."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}.")
    order = np.random.default_rng(seed).permutation(num_examples)
    size = int(fraction * num_examples)
    return np.sort(order[:size]), np.sort(order[size:])


def _check_transform(scale, offset) -> tuple[float, float]:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}.")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ValueError(f"offset must be a finite number, got {offset!r}.")
    return float(scale), float(offset)


def relu_concentrations(exit_logits, thresholds, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """Dirichlet concentrations `alpha_l(x)_k = u_k if u_k >= tau_l else 0` with `u = scale * (z_l(x) + offset)`,
    `(K, N, C)`: the thresholded ReLU of Jazbec et al. (who use `scale = 1`, `offset = 0`); `thresholds` holds one
    `tau_l >= 0` per exit, in units of `u`."""
    scale, offset = _check_transform(scale, offset)
    logits = scale * (_as_array(exit_logits, "exit_logits", 3) + offset)
    tau = _check_thresholds(thresholds, logits.shape[0])
    return np.where(logits >= tau[:, None, None], np.maximum(logits, 0.0), 0.0)


class AVCSThresholds(NamedTuple):
    """Output of [`fit_avcs_thresholds`]: the per-exit ReLU `thresholds` and the logit `scale` and `offset` they go
    with (the arguments of [`avcs_prediction_sets`])."""

    thresholds: list[float]
    scale: float
    offset: float


def avcs_prediction_sets(
    exit_logits, thresholds, alpha: float = 0.05, seed: int = 0, scale: float = 1.0, offset: float = 0.0
) -> AVCSSets:
    r"""Anytime-valid prediction sets of an early-exit classifier (Jazbec et al., 2024).

    With `alpha_l = `[`relu_concentrations`]`(z_l, tau_l)`, support `S_l = {k : alpha_l,k > 0}` and one plug-in
    sample `pi_l ~ Dir(alpha_l |S_l)` per example and exit: `log R_l(y) = log(alpha_l,y / sum_k alpha_l,k) -
    log pi_l,y` on `S_l` (`0` for a single-class support) and `+inf` off it; `log R_t = sum_{l<=t} log R_l` and
    `C_t = {y : log R_t(y) <= log(1/alpha)}`. An empty support gives an empty set from then on. The samples are drawn
    with `numpy.random.default_rng(seed)` (Gamma draws normalised on the support), so the sets are a deterministic
    function of the inputs and the seed.

    Args:
        exit_logits (`(K, N, C)` array or tensor, or a list of `K` `(N, C)`): logits of every exit.
        thresholds (`Sequence[float]` of length `K`): the ReLU thresholds `tau_l >= 0`, e.g. from
            [`fit_avcs_thresholds`].
        alpha (`float`, *optional*, defaults to 0.05): miscoverage level, in (0, 1).
        seed (`int`, *optional*, defaults to 0).
        scale (`float`, *optional*, defaults to 1.0), offset (`float`, *optional*, defaults to 0.0): the ReLU reads
            `scale * (z + offset)`; the paper uses the logits as they are. Both are an extension for models whose
            logits do not suit ReLU Dirichlets: softmax ignores a constant added to every logit, but the ReLU does
            not, so a class with a logit `<= 0` can never be in a set (with centred logits, e.g. a binary head's
            `(a, -a)`, every set has at most one class), which `offset > 0` counters; and the Dirichlet's spread
            shrinks as its concentrations grow, so small logits draw plug-in samples far from their mean and exclude
            true labels, which `scale > 1` counters. Chosen with the thresholds by [`fit_avcs_thresholds`].

    Returns:
        [`AVCSSets`]: `sets` (official, not always nested), `nested_sets` (running intersection) and `log_ratios`.
    """
    alpha = _check_alpha(alpha)
    concentrations = relu_concentrations(exit_logits, thresholds, scale, offset)  # (K, N, C)
    return _avcs_sets(concentrations, _dirichlet_on_support(concentrations, seed), alpha)


def _dirichlet_on_support(concentrations: np.ndarray, seed: int) -> np.ndarray:
    """One `Dir(alpha |support)` sample per row of `concentrations` `(..., C)`, zero off the support (normalised
    Gamma draws); a row with an empty support gets zeros."""
    support = concentrations > 0
    gamma = np.where(support, np.random.default_rng(seed).standard_gamma(np.where(support, concentrations, 1.0)), 0.0)
    total = gamma.sum(-1, keepdims=True)
    return np.divide(gamma, total, out=np.zeros_like(gamma), where=total > 0)


def _avcs_sets(concentrations: np.ndarray, samples: np.ndarray, alpha: float) -> AVCSSets:
    """The sets of [`avcs_prediction_sets`] from the concentrations and the plug-in samples `(K, N, C)`."""
    support = concentrations > 0
    total = concentrations.sum(-1, keepdims=True)
    mean = np.divide(concentrations, total, out=np.zeros_like(concentrations), where=total > 0)  # E[pi] on S
    # A Gamma draw can underflow to 0 for a tiny concentration: R = inf, the label leaves (as numpy's dirichlet).
    valid = support & (samples > 0)
    log_ratio = np.full(concentrations.shape, np.inf)
    log_ratio[valid] = np.log(mean[valid]) - np.log(samples[valid])
    log_ratios = np.cumsum(log_ratio, axis=0)
    sets = log_ratios <= math.log(1 / alpha)
    return AVCSSets(sets=sets, nested_sets=running_intersection(sets), log_ratios=log_ratios)


def fit_avcs_thresholds(
    cal_logits,
    cal_labels,
    alpha: float = 0.05,
    init: float = 1.0,
    step: float = 0.5,
    seed: int = 0,
    nested: bool = True,
    scales: Sequence[float] = (1.0,),
    offsets: Sequence[float] = (0.0,),
    coverage_rule: CoverageRule | str = CoverageRule.BINOMIAL,
    delta: float = 0.1,
) -> AVCSThresholds:
    r"""Search the ReLU thresholds of [`avcs_prediction_sets`] on a calibration split (`find_relu_thresholds` of the
    official code), and optionally the logit scale and offset.

    For one `(scale, offset)`: every threshold starts at `init`; then for `l = 1..K` in order, `tau_l` is raised by
    `step` while the calibration coverage reaches the target at **every** exit, and set back one step at the first
    miss (or once `tau_l` passes the largest transformed calibration logit of exit `l`, where every set there is
    empty). Larger thresholds give sparser Dirichlets, hence smaller sets. The target is [`coverage_target`]`(N_cal,
    alpha, coverage_rule, delta)` covered examples: `coverage_rule="empirical"` is the official search (coverage
    `> 1 - alpha`), which raises the thresholds until the calibration coverage *just* stays above `1 - alpha` and so
    overfits a small split (on synthetic data, `N_cal = 200`, `alpha = 0.1`, its coverage on new data fell below
    `1 - alpha` for 41-58 % of the calibration draws, against 5-11 % with the binomial rule); the default
    `"binomial"` asks for a `1 - delta` lower confidence bound on the coverage `>= 1 - alpha` instead, a margin of
    about `z_{1 - delta} sqrt(alpha (1 - alpha) / N_cal)` (see [`coverage_target`] for what it guarantees and
    what not); `"conformal"` only asks for the conformal level `ceil((N_cal + 1)(1 - alpha))`. A stricter target
    accepts fewer configurations: every configuration it accepts also passes the official check. With `nested=True`
    (default) the coverage checked is that of the nested sets (the running intersection, which the official search
    does not use; it is never larger, so both kinds then keep the coverage on the calibration data); `nested=False`
    checks the official `C_t`. Calibrate on data that is not evaluated (the official notebook searched on all logits).

    With several `scales` and `offsets` (an extension; the defaults are the paper's transform), every pair whose
    initial thresholds reach the target is searched, and the pair with the smallest mean set size over the exits on
    the calibration data wins (ties: the earlier pair, offsets outer, scales inner). The binomial rule then tests at
    `delta / P` for `P` pairs (Bonferroni, see [`coverage_target`]), so trying more transforms costs a slightly
    higher target rather than the guarantee.

    Args:
        cal_logits (`(K, N_cal, C)`): per-exit logits of the calibration split.
        cal_labels (`(N_cal,)`): their gold classes.
        alpha (`float`, *optional*, defaults to 0.05): miscoverage level in (0, 1); `N_cal` must be at least
            [`min_calibration_size`]`(alpha, coverage_rule, delta / P)`: 45 for `alpha = 0.05` with the default
            binomial rule at `delta = 0.1` and one pair (104 for 20 pairs), 19 with the other rules.
        init (`float`, *optional*, defaults to 1.0), step (`float`, *optional*, defaults to 0.5): the search grid.
        seed (`int`, *optional*, defaults to 0): seed of the Dirichlet samples (the same at every step).
        nested (`bool`, *optional*, defaults to `True`): check the coverage of the nested sets.
        scales (`Sequence[float]`, *optional*, defaults to `(1.0,)`), offsets (`Sequence[float]`, *optional*,
            defaults to `(0.0,)`): the logit transforms to try (see [`avcs_prediction_sets`]), e.g. `(1, 4, 16)` and
            `(0, 1, 2, 4)`.
        coverage_rule ([`CoverageRule`] or `str`, *optional*, defaults to `"binomial"`): `"binomial"`,
            `"conformal"` or `"empirical"` (the paper's).
        delta (`float`, *optional*, defaults to 0.1): the binomial rule's error level, in (0, 1), over all the
            pairs together.

    Returns:
        [`AVCSThresholds`] `(thresholds, scale, offset)`. When no pair reaches the target at the initial thresholds,
        a warning (stating the target and the coverage achieved) is raised and the initial thresholds are returned
        with the pair of the highest worst-exit coverage.

    Raises:
        `ValueError`: bad arguments, or sets that are empty for every calibration example at every exit at the
        initial thresholds of the best pair (nothing would be predicted: e.g. a briefly trained model with every
        logit <= 0 under the paper's transform).
    """
    alpha = _check_alpha(alpha)
    rule, delta = _check_rule(coverage_rule, delta)
    logits = _as_array(cal_logits, "cal_logits", 3)
    num_exits, num_examples, num_classes = logits.shape
    labels = _check_labels(cal_labels, num_examples, num_classes)
    if not (math.isfinite(init) and init >= 0 and math.isfinite(step) and step > 0):
        raise ValueError(f"init must be >= 0 and step > 0, got init={init!r}, step={step!r}.")
    pairs = [_check_transform(scale, offset) for offset in offsets for scale in scales]
    if not pairs:
        raise ValueError(f"scales and offsets must each hold at least one value, got {scales!r} and {offsets!r}.")
    # Every pair is searched and the smallest sets win: the binomial rule splits delta over the pairs (Bonferroni),
    # so that the choice among them does not spend the margin.
    _check_calibration(num_examples, alpha, rule, delta, len(pairs))
    target = coverage_target(num_examples, alpha, rule, delta / len(pairs))

    def evaluate(thresholds, scale, offset) -> tuple[int, float]:
        """(worst-exit number of covered examples, mean set size) on the calibration data."""
        result = avcs_prediction_sets(logits, thresholds, alpha, seed, scale, offset)
        sets = result.nested_sets if nested else result.sets
        return int(sets[:, np.arange(num_examples), labels].sum(axis=1).min()), float(sets.sum(-1).mean())

    start = [float(init)] * num_exits
    at_start = [evaluate(start, *pair)[0] for pair in pairs]
    best = None  # (mean size, thresholds, pair)
    for (scale, offset), covered in zip(pairs, at_start):
        if covered < target:
            continue
        thresholds = list(start)
        for exit_index in range(num_exits):
            ceiling = scale * (float(logits[exit_index].max()) + offset)
            while True:
                thresholds[exit_index] += step
                if thresholds[exit_index] > ceiling + step or evaluate(thresholds, scale, offset)[0] < target:
                    thresholds[exit_index] -= step
                    break
        size = evaluate(thresholds, scale, offset)[1]
        if best is None or size < best[0]:
            best = (size, thresholds, (scale, offset))
    if best is None:
        scale, offset = pairs[int(np.argmax(at_start))]
        tried = f"coverage_rule={rule.value!r}, alpha={alpha:g}, initial thresholds {init}, every (scale, offset) tried"
        start_sets = avcs_prediction_sets(logits, start, alpha, seed, scale, offset)
        if not (start_sets.nested_sets if nested else start_sets.sets).any():
            # Nothing to keep: sets that are empty for every example at every exit predict nothing.
            raise ValueError(
                f"the AVCS sets are empty for every one of the {num_examples} calibration examples at every exit "
                f"({tried}): every transformed logit is <= 0, so no label enters the support (typical of a briefly "
                "trained model). Train the model longer, or search a larger offset or scale (e.g. "
                "offsets=(0, 1, 2, 4), scales=(1, 4, 16)) or a smaller init."
            )
        warnings.warn(
            f"the AVCS sets miss the coverage target on the calibration data already at the initial thresholds "
            f"({tried}): target {target} of {num_examples} examples covered at every exit "
            f"({target / num_examples:.4f}), achieved at best {max(at_start)} ({max(at_start) / num_examples:.4f}, "
            f"worst exit, scale {scale}, offset {offset}): keeping them. A label whose transformed logit is <= 0 "
            "never enters the support; a larger offset or scale, or a smaller init, may help.",
            stacklevel=2,
        )
        return AVCSThresholds(start, scale, offset)
    _, thresholds, (scale, offset) = best
    return AVCSThresholds(thresholds, scale, offset)


def raps_prediction_sets(
    cal_probs,
    cal_labels,
    probs,
    alpha: float = 0.05,
    lam_reg: float = 0.01,
    k_reg: int = 5,
    randomized: bool = True,
    allow_zero_sets: bool = True,
    seed: int = 0,
) -> np.ndarray:
    r"""RAPS conformal prediction sets, calibrated separately at every exit (the baseline of Jazbec et al., 2024).

    Regularised adaptive prediction sets (Angelopoulos et al., 2021), as the official baseline code: classes sorted by
    decreasing probability, the sorted probabilities plus `lam_reg` from rank `k_reg + 1` on; calibration score of an
    example = the regularised cumulative mass up to its label, minus `U * ` its label's regularised mass
    (`U ~ U(0, 1)`, randomised); `q = ` the `ceil((n + 1)(1 - alpha)) / n` quantile (method "higher") of the `n`
    scores; a test class is in the set when its regularised cumulative mass minus `U * ` its own is `<= q` (one `U`
    per test example). With `randomized=False` the scores and sets use the plain cumulative mass (the standard
    non-randomised RAPS).

    Args:
        cal_probs (`(K, N_cal, C)`): per-exit probabilities of the calibration split.
        cal_labels (`(N_cal,)`): its gold classes; `N_cal >= `[`min_calibration_size`]`(alpha)`.
        probs (`(K, N, C)`): per-exit probabilities of the examples to build sets for.
        alpha (`float`, *optional*, defaults to 0.05): miscoverage level in (0, 1).
        lam_reg (`float`, *optional*, defaults to 0.01), k_reg (`int`, *optional*, defaults to 5): the regulariser.
        randomized (`bool`, *optional*, defaults to `True`).
        allow_zero_sets (`bool`, *optional*, defaults to `True`): `False` always keeps the top class.
        seed (`int`, *optional*, defaults to 0): seed of the uniform draws (`numpy.random.default_rng`).

    Returns:
        `np.ndarray` of shape `(K, N, C)`, bool.
    """
    alpha = _check_alpha(alpha)
    cal = _as_array(cal_probs, "cal_probs", 3)
    test = _as_array(probs, "probs", 3)
    if cal.shape[0] != test.shape[0] or cal.shape[2] != test.shape[2]:
        raise ValueError(
            f"cal_probs and probs must have the same exits and classes, got {cal.shape} and {test.shape}."
        )
    num_exits, num_cal, num_classes = cal.shape
    labels = _check_labels(cal_labels, num_cal, num_classes)
    _check_calibration(num_cal, alpha)
    if (
        not (math.isfinite(lam_reg) and lam_reg >= 0)
        or isinstance(k_reg, bool)
        or not isinstance(k_reg, int)
        or k_reg < 0
    ):
        raise ValueError(f"lam_reg must be >= 0 and k_reg an integer >= 0, got {lam_reg!r} and {k_reg!r}.")
    reg = np.where(np.arange(num_classes) < k_reg, 0.0, lam_reg)[None, :]  # (1, C), by rank
    level = math.ceil((num_cal + 1) * (1 - alpha)) / num_cal
    rng = np.random.default_rng(seed)
    sets = np.zeros(test.shape, dtype=bool)
    for k in range(num_exits):
        order = np.argsort(-cal[k], axis=1, kind="stable")
        sorted_reg = np.take_along_axis(cal[k], order, axis=1) + reg
        rank = np.argmax(order == labels[:, None], axis=1)
        cumulative = sorted_reg.cumsum(axis=1)[np.arange(num_cal), rank]
        own = sorted_reg[np.arange(num_cal), rank]
        scores = cumulative - rng.random(num_cal) * own if randomized else cumulative
        qhat = np.quantile(scores, min(level, 1.0), method="higher")

        order = np.argsort(-test[k], axis=1, kind="stable")
        sorted_reg = np.take_along_axis(test[k], order, axis=1) + reg
        cumulative = sorted_reg.cumsum(axis=1)
        if randomized:
            cumulative = cumulative - rng.random((test.shape[1], 1)) * sorted_reg
        included = cumulative <= qhat
        if not allow_zero_sets:
            included[:, 0] = True
        np.put_along_axis(sets[k], order, included, axis=1)
    return sets


def _as_sets(sets) -> np.ndarray:
    """Boolean `(K, N, C)` membership masks; 0/1 numbers are accepted, anything else (scores, probabilities) is an
    error rather than being read as "non-zero = in the set"."""
    sets = _as_array(sets, "sets", 3, dtype=None)
    if sets.dtype != bool:
        if not np.issubdtype(sets.dtype, np.number) or not np.isin(sets, (0, 1)).all():
            raise ValueError(
                f"sets must be boolean membership masks (or 0/1), got dtype {sets.dtype} with values other than 0 and "
                "1: threshold scores or probabilities into sets first (e.g. raps_prediction_sets)."
            )
        sets = sets.astype(bool)
    return sets


def running_intersection(sets) -> np.ndarray:
    """`C_1 ∩ ... ∩ C_t` for every exit `t`: boolean `(K, N, C)` -> `(K, N, C)`, nested by construction."""
    sets = _as_sets(sets)
    return np.logical_and.accumulate(sets, axis=0)


def prediction_set_metrics(sets, labels) -> dict[str, list[float] | float]:
    r"""Coverage, size and nestedness of per-exit prediction sets (the conventions of Jazbec et al.'s code).

    Args:
        sets (`(K, N, C)` bool): the set of every example at every exit.
        labels (`(N,)`): gold classes.

    Returns:
        `dict` with, per exit (lists of length `K`): `coverage` (mean of `1[y in C_t]`), `size` (mean `|C_t|`),
        `nestedness` (mean of `|C_t ∩ (C_1 ∩ ... ∩ C_{t-1})| / |C_t|`, with 1 for an empty `C_t`, so that 0 means an
        empty intersection under a non-empty set; 1 at the first exit); and two numbers: `fully_nested` (fraction of
        examples whose sets never grow back, `C_1 ⊇ C_2 ⊇ ... ⊇ C_K`) and `all_exit_coverage` (fraction whose label is
        in the set at every exit, the anytime guarantee's event).
    """
    sets = _as_sets(sets)
    num_exits, num_examples, num_classes = sets.shape
    labels = _check_labels(labels, num_examples, num_classes)
    hit = sets[:, np.arange(num_examples), labels]  # (K, N)
    sizes = sets.sum(-1)  # (K, N)
    previous = np.concatenate([np.ones_like(sets[:1]), running_intersection(sets)[:-1]])  # ∩_{s<t} C_s, (K, N, C)
    kept = (sets & previous).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        nestedness = np.where(sizes == 0, 1.0, kept / sizes)
    return {
        "coverage": hit.mean(axis=1).tolist(),
        "size": sizes.mean(axis=1).tolist(),
        "nestedness": nestedness.mean(axis=1).tolist(),
        "fully_nested": float((nestedness == 1).all(axis=0).mean()),
        "all_exit_coverage": float(hit.all(axis=0).mean()),
    }
