"""hf_kd.prediction_sets: AVCS (Jazbec et al., 2024) and RAPS against naive per-example references, the metrics'
conventions on hand examples, the threshold search, and bad input."""

import math

import numpy as np
import pytest
import torch

from hf_kd.prediction_sets import (
    _avcs_sets,
    _dirichlet_on_support,
    avcs_prediction_sets,
    calibration_split,
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
    thresholds, scale, offset = fit_avcs_thresholds(logits, labels, alpha=0.1, nested=nested)
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
    result = fit_avcs_thresholds(logits, labels, alpha=0.1, scales=scales, offsets=offsets)
    assert (result.scale, result.offset, result.thresholds) == (scale, offset, expected)
    # The transform is applied to the logits: the sets equal those of pre-transformed logits.
    np.testing.assert_array_equal(
        avcs_prediction_sets(logits, result.thresholds, 0.1, scale=scale, offset=offset).sets,
        avcs_prediction_sets(scale * (logits + offset), result.thresholds, 0.1).sets,
    )


def test_threshold_search_warns_when_the_start_misses_the_target():
    logits = np.full((2, 30, 3), -1.0)  # every logit below the ReLU: empty sets
    labels = np.zeros(30, dtype=int)
    with pytest.warns(UserWarning, match="initial thresholds"):
        assert fit_avcs_thresholds(logits, labels, alpha=0.1, scales=(1.0, 4.0)) == ([1.0, 1.0], 1.0, 0.0)


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
    with pytest.raises(ValueError, match="18 examples, too few for alpha=0.05.*at least 19"):
        fit_avcs_thresholds(logits, labels, alpha=0.05)
    with pytest.raises(ValueError, match="too few for alpha=0.05"):
        raps_prediction_sets(logits, labels, logits, alpha=0.05)
    fit_avcs_thresholds(logits, labels, alpha=0.1)  # 18 >= 9: fine


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
        fit_avcs_thresholds(logits, labels, scales=())
