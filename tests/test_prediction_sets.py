"""hf_kd.prediction_sets: AVCS (Jazbec et al., 2024) and RAPS against naive per-example references, the metrics'
conventions on hand examples, the threshold search and its coverage rules (closed forms, and the coverage on synthetic
data whose truth is known), and bad input."""

import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from hf_kd.prediction_sets import (
    CoverageRule,
    _avcs_sets,
    _dirichlet_on_support,
    avcs_prediction_sets,
    calibration_split,
    coverage_target,
    fit_avcs_thresholds,
    min_calibration_size,
    prediction_set_metrics,
    raps_prediction_sets,
    relu_concentrations,
    running_intersection,
)


def exit_logits(num_exits=3, n=200, num_classes=5, seed=0, sharpen=None):
    """Per-exit logits whose top class is the label more often at deeper exits; returns (logits, labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    logits = rng.normal(0.0, 1.0, (num_exits, n, num_classes)) + 2.0
    for k in range(num_exits):
        logits[k, np.arange(n), labels] += 1.0 + (k if sharpen is None else sharpen[k])
    return logits, labels


def naive_avcs(concentrations, samples, alpha):
    """The official algorithm, one example and one exit at a time, with given plug-in samples."""
    num_exits, n, num_classes = concentrations.shape
    sets = np.zeros(concentrations.shape, dtype=bool)
    for i in range(n):
        ratio = np.ones(num_classes)
        for k in range(num_exits):
            r = np.full(num_classes, np.inf)
            support = np.where(concentrations[k, i] > 0)[0]
            a = concentrations[k, i, support]
            r[support] = (a / a.sum()) / samples[k, i, support]
            ratio = ratio * r
            sets[k, i] = ratio <= 1 / alpha
    return sets


def test_relu_concentrations():
    logits = np.array([[[2.0, 0.5, -1.0, 1.0]], [[3.0, 1.5, 0.2, -0.5]]])  # (2 exits, 1 example, 4 classes)
    np.testing.assert_array_equal(
        relu_concentrations(logits, [1.0, 0.0]), [[[2.0, 0.0, 0.0, 1.0]], [[3.0, 1.5, 0.2, 0.0]]]
    )


def test_avcs_matches_the_official_loop():
    logits, _ = exit_logits(n=60)
    concentrations = relu_concentrations(logits, [2.0, 2.5, 3.0])
    samples = _dirichlet_on_support(concentrations, seed=0)
    result = _avcs_sets(concentrations, samples, alpha=0.05)
    np.testing.assert_array_equal(result.sets, naive_avcs(concentrations, samples, 0.05))
    # The public function draws exactly these samples.
    public = avcs_prediction_sets(logits, [2.0, 2.5, 3.0], alpha=0.05, seed=0)
    np.testing.assert_array_equal(public.sets, result.sets)
    np.testing.assert_array_equal(public.nested_sets, np.logical_and.accumulate(result.sets, axis=0))


def test_plug_in_samples_are_dirichlet_on_the_support():
    concentrations = np.broadcast_to(np.array([3.0, 0.0, 1.0, 6.0]), (1, 20000, 4)).copy()
    samples = _dirichlet_on_support(concentrations, seed=1)
    np.testing.assert_allclose(samples.sum(-1), 1.0)
    assert (samples[..., 1] == 0).all()
    np.testing.assert_allclose(samples[0].mean(0), [0.3, 0.0, 0.1, 0.6], atol=5e-3)
    # Dir variance of component k: a_k (A - a_k) / (A^2 (A + 1)), A = 10.
    np.testing.assert_allclose(samples[0].var(0)[[0, 3]], [3 * 7 / 1100, 6 * 4 / 1100], rtol=0.05)


def test_avcs_edge_cases():
    # One class above the threshold: pi = 1 = E[pi], R = 1, the set is that class. None: the set stays empty.
    logits = np.array([[[5.0, 0.1, 0.2], [0.1, 0.2, 0.3]], [[0.0, 4.0, 6.0], [5.0, 5.0, 5.0]]])
    result = avcs_prediction_sets(logits, [1.0, 1.0])
    np.testing.assert_array_equal(result.sets[0], [[True, False, False], [False, False, False]])
    assert result.log_ratios[0, 0, 0] == 0.0
    assert not result.sets[1, 1].any()  # empty at exit 1 stays empty (R = inf is absorbing)
    assert not result.sets[1, 0, 0]  # class 0 left the support at exit 1


def test_nested_sets_are_nested_and_raw_ones_are_not_always():
    logits, labels = exit_logits(num_exits=5, n=300, seed=3, sharpen=[0.0, 3.0, 0.0, 3.0, 0.0])
    result = avcs_prediction_sets(logits, [1.0] * 5, alpha=0.1)
    nested = prediction_set_metrics(result.nested_sets, labels)
    assert nested["nestedness"] == [1.0] * 5 and nested["fully_nested"] == 1.0
    raw = prediction_set_metrics(result.sets, labels)
    assert raw["fully_nested"] < 1.0  # R_l < 1 lets labels come back at later exits
    assert all(a >= b for a, b in zip(raw["coverage"], nested["coverage"]))


def test_metrics_conventions_on_a_hand_example():
    # 2 examples, 3 exits, 3 classes.
    sets = np.array(
        [
            [[1, 1, 0], [1, 0, 0]],
            [[1, 0, 1], [0, 1, 0]],  # ex 0: {0, 2} vs {0, 1}: 1 of 2 kept; ex 1: {1} vs {0}: empty ∩, non-empty -> 0
            [[0, 0, 0], [1, 0, 0]],  # ex 0: empty set -> 1; ex 1: {0} vs ∩ = {} -> 0
        ],
        dtype=bool,
    )
    labels = np.array([0, 0])
    m = prediction_set_metrics(sets, labels)
    assert m["coverage"] == [1.0, 0.5, 0.5]
    assert m["size"] == [1.5, 1.5, 0.5]
    assert m["nestedness"] == [1.0, 0.25, 0.5]
    assert m["fully_nested"] == 0.0 and m["all_exit_coverage"] == 0.0
    np.testing.assert_array_equal(running_intersection(sets)[2], [[0, 0, 0], [0, 0, 0]])
    nested = np.array([[[1, 1, 0]], [[1, 0, 0]], [[1, 0, 0]]], dtype=bool)
    m = prediction_set_metrics(nested, np.array([0]))
    assert m["nestedness"] == [1.0, 1.0, 1.0] and m["fully_nested"] == 1.0 and m["all_exit_coverage"] == 1.0


def naive_greedy_search(logits, labels, alpha, init, step, nested):
    thresholds = [init] * logits.shape[0]

    def ok(t):
        r = avcs_prediction_sets(logits, t, alpha)
        s = r.nested_sets if nested else r.sets
        return all(np.mean(s[k, np.arange(len(labels)), labels]) > 1 - alpha for k in range(len(t)))

    for k in range(len(thresholds)):
        while True:
            thresholds[k] += step
            if thresholds[k] > logits[k].max() + step or not ok(thresholds):
                thresholds[k] -= step
                break
    return thresholds


@pytest.mark.parametrize("nested", [True, False])
def test_threshold_search_is_the_official_greedy_search(nested):
    logits, labels = exit_logits(n=150, seed=4)
    logits = 3 * logits  # wide Dirichlets: room for the thresholds to rise
    thresholds, scale, offset = fit_avcs_thresholds(logits, labels, alpha=0.1, nested=nested, coverage_rule="empirical")
    assert (scale, offset) == (1.0, 0.0) and thresholds == naive_greedy_search(logits, labels, 0.1, 1.0, 0.5, nested)
    assert thresholds[0] > 1.0  # the search moved
    result = avcs_prediction_sets(logits, thresholds, alpha=0.1)
    coverage = prediction_set_metrics(result.nested_sets if nested else result.sets, labels)["coverage"]
    assert min(coverage) > 0.9


def test_transform_search_picks_the_smallest_calibration_sets():
    logits, labels = exit_logits(n=150, seed=4)
    logits = logits / 2 - 1.0  # small, partly negative logits: the paper's transform misses the target
    scales, offsets = (1.0, 4.0), (0.0, 2.0)
    sizes = {}
    for offset in offsets:
        for scale in scales:
            u = scale * (logits + offset)
            r = avcs_prediction_sets(u, [1.0] * 3, alpha=0.1)
            if min(prediction_set_metrics(r.nested_sets, labels)["coverage"]) > 0.9:
                t = naive_greedy_search(u, labels, 0.1, 1.0, 0.5, True)
                sizes[(scale, offset)] = (avcs_prediction_sets(u, t, 0.1).nested_sets.sum(-1).mean(), t)
    assert (1.0, 0.0) not in sizes and len(sizes) >= 2
    (scale, offset), (_, expected) = min(sizes.items(), key=lambda item: item[1][0])
    result = fit_avcs_thresholds(logits, labels, alpha=0.1, scales=scales, offsets=offsets, coverage_rule="empirical")
    assert (result.scale, result.offset, result.thresholds) == (scale, offset, expected)
    # The transform is applied to the logits: the sets equal those of pre-transformed logits.
    np.testing.assert_array_equal(
        avcs_prediction_sets(logits, result.thresholds, 0.1, scale=scale, offset=offset).sets,
        avcs_prediction_sets(scale * (logits + offset), result.thresholds, 0.1).sets,
    )


def test_threshold_search_refuses_sets_empty_everywhere():
    # Every logit below the ReLU: empty sets for every example at every exit. This used to be only a warning
    # ("... best worst-exit coverage 0.0000") and returned thresholds that predict nothing.
    logits = np.full((2, 30, 3), -1.0)
    labels = np.zeros(30, dtype=int)
    with pytest.raises(ValueError, match=r"empty for every one of the 30 calibration examples at every exit"):
        fit_avcs_thresholds(logits, labels, alpha=0.1, scales=(1.0, 4.0))


def test_threshold_search_warns_with_target_and_achieved_coverage():
    # Class 0 (the gold class of the first 15 rows) is never in a set, class 1 always: coverage 15 of 30 at best.
    logits = np.tile(np.array([-1.0, 5.0, -1.0]), (2, 30, 1))
    labels = np.array([0] * 15 + [1] * 15)
    with pytest.warns(UserWarning) as record:
        assert fit_avcs_thresholds(logits, labels, alpha=0.1, scales=(1.0, 4.0)) == ([1.0, 1.0], 1.0, 0.0)
    message = str(record[0].message)
    target = coverage_target(30, 0.1, "binomial", 0.1 / 2)
    assert f"target {target} of 30 examples covered at every exit" in message
    assert "achieved at best 15 (0.5000" in message


def exact_binomial_tail(n, alpha, k):
    """P(Bin(n, 1 - alpha) >= k) as an exact fraction (alpha a short decimal), by summing the probabilities."""
    p = 1 - Fraction(str(alpha))
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))


def test_coverage_targets_closed_forms():
    # By hand, n = 45, alpha = 0.05: 43/45 = 0.956 > 0.95 >= 42/45; ceil(46 * 0.95) = ceil(43.7) = 44;
    # P(X >= 45) = 0.95^45 = 0.0994 <= 0.1 < P(X >= 44) = 0.0994 + 45 * 0.05 * 0.95^44 = 0.335.
    assert [coverage_target(45, 0.05, rule) for rule in CoverageRule] == [43, 44, 45]
    # n = 20, alpha = 0.1: 19/20 > 0.9 = 18/20; ceil(21 * 0.9) = 19; 0.9^20 = 0.122 > 0.1, so no count is enough.
    assert [coverage_target(20, 0.1, rule) for rule in CoverageRule] == [19, 19, 21]
    # n = 516, alpha = 0.05 (a Rotten Tomatoes calibration split): 491/516 = 0.9516 > 0.95 >= 490/516;
    # ceil(517 * 0.95) = ceil(491.15) = 492; P(X >= 497) = 0.098 <= 0.1 < P(X >= 496) = 0.141.
    assert coverage_target(516, 0.05, "empirical") == 491
    assert coverage_target(516, 0.05, "conformal") == 492
    assert coverage_target(516, 0.05) == coverage_target(516, 0.05, "binomial", 0.1) == 497
    # The binomial count against exact sums of the binomial probabilities (rational arithmetic, no scipy).
    for n, alpha, delta in ((45, 0.05, 0.1), (100, 0.1, 0.1), (516, 0.05, 0.05), (300, 0.02, 0.2)):
        k = coverage_target(n, alpha, "binomial", delta)
        assert exact_binomial_tail(n, alpha, k) <= Fraction(str(delta)) < exact_binomial_tail(n, alpha, k - 1)
    # The fewest calibration examples: (1 - alpha)^n <= delta for the binomial rule (0.95^45 = 0.0994, 0.95^44 =
    # 0.105; 0.9^22 = 0.098, 0.9^21 = 0.109), n >= 1/alpha - 1 otherwise.
    assert coverage_target(44, 0.05) == 45 > 44
    assert min_calibration_size(0.05, "binomial", 0.1) == 45 and min_calibration_size(0.1, "binomial", 0.1) == 22
    assert min_calibration_size(0.05, "empirical") == min_calibration_size(0.05) == 19


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 3000),
    alpha=st.floats(0.005, 0.5),
    delta=st.floats(0.005, 0.5),
    smaller=st.floats(0.1, 1.0),
)
def test_coverage_targets_are_ordered(n, alpha, delta, smaller):
    empirical, conformal, binomial = (coverage_target(n, alpha, rule, delta) for rule in CoverageRule)
    assert 1 <= empirical <= conformal <= binomial <= n + 1
    assert empirical / n > 1 - alpha and (empirical == 1 or (empirical - 1) / n <= 1 - alpha)
    assert coverage_target(n, alpha, "binomial", delta * smaller) >= binomial  # a smaller delta asks for more
    if n >= min_calibration_size(alpha, "binomial", delta):
        assert binomial <= n
    fewest = min_calibration_size(alpha, "binomial", delta)  # the smallest n at which the full count passes
    assert coverage_target(fewest, alpha, "binomial", delta) <= fewest
    assert fewest == 1 or coverage_target(fewest - 1, alpha, "binomial", delta) > fewest - 1


def test_stricter_rules_accept_fewer_configurations():
    """On the same data: what a stricter rule returns also passes the official check, its calibration coverage
    reaches its own (higher) target, and the first exit's threshold (the same chain for every rule) is no higher."""
    for seed in range(4):
        logits, labels = exit_logits(n=300, seed=seed)
        logits = 3 * logits
        fits = {rule.value: fit_avcs_thresholds(logits, labels, alpha=0.1, step=0.25, coverage_rule=rule)
                for rule in CoverageRule}
        first = [fit.thresholds[0] for fit in fits.values()]  # empirical, conformal, binomial
        assert first == sorted(first, reverse=True)
        for rule, fit in fits.items():
            sets = avcs_prediction_sets(logits, fit.thresholds, 0.1).nested_sets
            covered = sets[:, np.arange(300), labels].sum(axis=1)
            assert covered.min() >= coverage_target(300, 0.1, rule) >= coverage_target(300, 0.1, "empirical")
        assert fits["binomial"].thresholds != fits["empirical"].thresholds  # the correction changed something


def synthetic_exit_logits(rng, n, num_exits):
    """A known data-generating process (4 classes, the label's logit higher at deeper exits): fresh draws give the
    true coverage of any fixed AVCS configuration."""
    labels = rng.integers(0, 4, n)
    logits = rng.normal(0.0, 1.0, (num_exits, n, 4)) + 2.0
    for k in range(num_exits):
        logits[k, np.arange(n), labels] += 1.0 + k
    return 3 * logits, labels


def true_coverages(rule, num_exits, repeats, step, scales=(1.0,)):
    """Per calibration draw (n = 200, alpha = 0.1): the worst-exit coverage of the fitted nested sets on 10,000
    fresh examples (the truth up to a Monte-Carlo error of about 0.003)."""
    fresh, fresh_labels = synthetic_exit_logits(np.random.default_rng(12345), 10_000, num_exits)
    worst = []
    for repeat in range(repeats):
        logits, labels = synthetic_exit_logits(np.random.default_rng(repeat), 200, num_exits)
        fit = fit_avcs_thresholds(logits, labels, alpha=0.1, step=step, scales=scales, coverage_rule=rule)
        sets = avcs_prediction_sets(fresh, fit.thresholds, 0.1, seed=1, scale=fit.scale, offset=fit.offset)
        worst.append(min(prediction_set_metrics(sets.nested_sets, fresh_labels)["coverage"]))
    return np.array(worst)


def test_binomial_rule_is_a_valid_fixed_sequence_test_on_one_exit():
    """With one exit and one transform the search is fixed-sequence testing of binomial tests, so the fitted sets
    miss 1 - alpha with probability <= delta over the calibration draw. 80 draws: the number of misses must not be
    improbably high for Bin(80, 0.1) (p >= 0.001, i.e. at most 17); the paper's rule overfits and misses far more
    often (the check has power)."""
    misses = {rule: int((true_coverages(rule, 1, 80, 0.1) < 0.9).sum()) for rule in ("binomial", "empirical")}
    assert binom.sf(misses["binomial"] - 1, 80, 0.1) >= 0.001, misses
    assert binom.sf(misses["empirical"] - 1, 80, 0.1) < 0.001, misses


def test_binomial_rule_splits_delta_over_the_transforms():
    """With P (scale, offset) pairs the binomial rule tests each at delta / P (Bonferroni): the chosen pair's
    thresholds are those of a search of that pair alone at delta / P, and the target is higher than at delta."""
    logits, labels = exit_logits(n=300, seed=2)
    scales, offsets = (1.0, 2.0, 4.0), (0.0, 1.0)
    fit = fit_avcs_thresholds(logits, labels, alpha=0.1, scales=scales, offsets=offsets, delta=0.1)
    alone = fit_avcs_thresholds(logits, labels, alpha=0.1, scales=(fit.scale,), offsets=(fit.offset,), delta=0.1 / 6)
    assert alone == fit
    sets = avcs_prediction_sets(logits, fit.thresholds, 0.1, scale=fit.scale, offset=fit.offset).nested_sets
    covered = sets[:, np.arange(300), labels].sum(axis=1)
    assert covered.min() >= coverage_target(300, 0.1, "binomial", 0.1 / 6) > coverage_target(300, 0.1, "binomial", 0.1)
    # The split raises the fewest calibration examples too: 0.9^n <= 0.1 / 6 needs n >= 39 (22 for one pair).
    small, small_labels = exit_logits(n=30, seed=2)
    fit_avcs_thresholds(small, small_labels, alpha=0.1)
    with pytest.raises(ValueError, match=r"30 examples.*at least 39 .*delta=0.1 split over 6 \(scale, offset\) pairs"):
        fit_avcs_thresholds(small, small_labels, alpha=0.1, scales=scales, offsets=offsets)


def test_binomial_rule_is_valid_over_several_transforms_on_one_exit():
    """One exit and three logit scales: Bonferroni over three fixed-sequence tests, so the chosen pair's sets miss
    1 - alpha with probability <= delta over the calibration draw (the count of misses in 60 draws must not be
    improbably high for Bin(60, 0.1))."""
    misses = int((true_coverages("binomial", 1, 60, 0.1, scales=(1.0, 2.0, 4.0)) < 0.9).sum())
    assert binom.sf(misses - 1, 60, 0.1) >= 0.001, misses


def test_binomial_rule_keeps_the_marginal_coverage_of_the_full_search():
    """Three exits and two logit scales (the search's later chains start where data-driven ones stopped): averaged
    over 40 calibration draws, the worst-exit coverage of the binomial rule's sets is above 1 - alpha by more than 3
    standard errors, where the paper's rule falls below it (overfitting the 200 calibration examples)."""
    binomial = true_coverages("binomial", 3, 40, 0.25, scales=(1.0, 2.0))
    empirical = true_coverages("empirical", 3, 40, 0.25, scales=(1.0, 2.0))
    assert binomial.mean() - 3 * binomial.std(ddof=1) / math.sqrt(40) > 0.9, binomial.mean()
    assert empirical.mean() < 0.9 and (binomial >= empirical).mean() > 0.9, empirical.mean()


def naive_raps(cal, cal_labels, test, alpha, lam, k_reg, u_cal, u_test):
    """The official baseline code, per example, with given uniforms."""
    n, c = cal.shape
    reg = np.array([0.0] * k_reg + [lam] * (c - k_reg))
    scores = []
    for i in range(n):
        order = np.argsort(-cal[i], kind="stable")
        srt = cal[i][order] + reg
        rank = int(np.where(order == cal_labels[i])[0][0])
        scores.append(srt[: rank + 1].sum() - u_cal[i] * srt[rank])
    qhat = np.quantile(scores, math.ceil((n + 1) * (1 - alpha)) / n, method="higher")
    sets = np.zeros(test.shape, dtype=bool)
    for i in range(test.shape[0]):
        order = np.argsort(-test[i], kind="stable")
        srt = test[i][order] + reg
        sets[i, order] = srt.cumsum() - u_test[i] * srt <= qhat
    return sets


def test_raps_matches_the_official_code():
    logits, labels = exit_logits(num_exits=2, n=120, num_classes=8, seed=5)
    probs = torch.as_tensor(logits).softmax(-1).numpy()
    cal, test = probs[:, :50], probs[:, 50:]
    sets = raps_prediction_sets(cal, labels[:50], test, alpha=0.1, seed=7)
    rng = np.random.default_rng(7)
    for k in range(2):
        u_cal, u_test = rng.random(50), rng.random((70, 1))[:, 0]
        np.testing.assert_array_equal(sets[k], naive_raps(cal[k], labels[:50], test[k], 0.1, 0.01, 5, u_cal, u_test))


@pytest.mark.parametrize("randomized", [True, False])
def test_raps_covers_exchangeable_data(randomized):
    logits, labels = exit_logits(num_exits=2, n=6000, num_classes=6, seed=6)
    probs = torch.as_tensor(logits).softmax(-1).numpy()
    cal_idx, test_idx = calibration_split(6000, 0.3, seed=0)
    sets = raps_prediction_sets(probs[:, cal_idx], labels[cal_idx], probs[:, test_idx], 0.1, randomized=randomized)
    coverage = prediction_set_metrics(sets, labels[test_idx])["coverage"]
    assert all(0.88 <= c <= 0.93 for c in coverage), coverage
    intersect = prediction_set_metrics(running_intersection(sets), labels[test_idx])
    assert intersect["fully_nested"] == 1.0 and intersect["coverage"][-1] <= coverage[-1]


def test_calibration_split():
    cal, rest = calibration_split(10, 0.2, seed=0)
    assert len(cal) == 2 and len(rest) == 8 and sorted(np.concatenate([cal, rest]).tolist()) == list(range(10))
    np.testing.assert_array_equal(calibration_split(10, 0.2, seed=0)[0], cal)


def test_min_calibration_size():
    assert min_calibration_size(0.05) == 19
    assert min_calibration_size(0.1) == 9
    assert min_calibration_size(0.5) == 1
    for alpha in (0.05, 0.1, 0.2, 0.3, 0.01):
        n = min_calibration_size(alpha)
        assert math.ceil((n + 1) * (1 - alpha) - 1e-9) <= n and (n == 1 or math.ceil(n * (1 - alpha) - 1e-9) > n - 1)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, True, "0.05", float("nan")])
def test_alpha_outside_the_unit_interval(alpha):
    logits, labels = exit_logits(n=40)
    with pytest.raises(ValueError, match=r"alpha .* must be a number in \(0, 1\)"):
        avcs_prediction_sets(logits, [1.0] * 3, alpha=alpha)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        fit_avcs_thresholds(logits, labels, alpha=alpha)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        raps_prediction_sets(logits, labels, logits, alpha=alpha)


def test_calibration_split_too_small_for_alpha():
    logits, labels = exit_logits(n=18)
    for rule in ("empirical", "conformal"):
        with pytest.raises(ValueError, match="18 examples, too few for alpha=0.05.*at least 19"):
            fit_avcs_thresholds(logits, labels, alpha=0.05, coverage_rule=rule)
    with pytest.raises(ValueError, match="too few for alpha=0.05"):
        raps_prediction_sets(logits, labels, logits, alpha=0.05)
    fit_avcs_thresholds(logits, labels, alpha=0.1, coverage_rule="empirical")  # 18 >= 9: fine
    # The binomial rule needs (1 - alpha)^n <= delta: 22 examples for alpha = 0.1, delta = 0.1.
    with pytest.raises(ValueError, match="18 examples, too few for alpha=0.1.*at least 22 with coverage_rule='binom"):
        fit_avcs_thresholds(logits, labels, alpha=0.1)
    logits, labels = exit_logits(n=22)
    fit_avcs_thresholds(logits, labels, alpha=0.1)


def test_other_bad_input():
    logits, labels = exit_logits(n=40)
    with pytest.raises(ValueError, match="thresholds must hold 3"):
        avcs_prediction_sets(logits, [1.0, 1.0])
    with pytest.raises(ValueError, match="thresholds must hold 3"):
        avcs_prediction_sets(logits, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="3 dimensions"):
        avcs_prediction_sets(logits[0], [1.0])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        fit_avcs_thresholds(logits, labels + 5)
    with pytest.raises(ValueError, match="same exits and classes"):
        raps_prediction_sets(logits, labels, logits[:2])
    with pytest.raises(ValueError, match="finite"):
        avcs_prediction_sets(np.full((1, 2, 2), np.nan), [1.0])
    with pytest.raises(ValueError, match="scale must be"):
        avcs_prediction_sets(logits, [1.0] * 3, scale=0.0)
    with pytest.raises(ValueError, match="offset must be"):
        avcs_prediction_sets(logits, [1.0] * 3, offset=float("inf"))
    with pytest.raises(ValueError, match="at least one value"):
        fit_avcs_thresholds(logits, labels, scales=(), coverage_rule="empirical")
    with pytest.raises(ValueError, match=r"one of \('empirical', 'conformal', 'binomial'\), got 'bonferroni'"):
        fit_avcs_thresholds(logits, labels, coverage_rule="bonferroni")
    for delta in (0.0, 1.0, "0.1", True):
        with pytest.raises(ValueError, match=rf"delta .* must be a number in \(0, 1\), got {re.escape(repr(delta))}"):
            fit_avcs_thresholds(logits, labels, delta=delta)
    assert coverage_target(516, 0.05, "binomial", np.float32(0.1)) == 497  # numpy scalars are numbers too
    with pytest.raises(ValueError, match="num_examples must be an integer >= 1"):
        coverage_target(0, 0.1)
