import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from scipy.spatial.distance import jensenshannon
from sklearn.metrics import brier_score_loss, log_loss

from hf_kd.metrics import (
    brier_score,
    confidence_preservation,
    expected_calibration_error,
    human_distribution_divergence,
    make_compute_metrics,
    maximum_calibration_error,
    negative_log_likelihood,
    predictive_entropy,
    reliability_bins,
    softmax,
)


def _random_probs(seed=0, n=200, k=4, scale=2.0):
    rng = np.random.default_rng(seed)
    probs = scipy.special.softmax(rng.normal(scale=scale, size=(n, k)), axis=1)
    labels = rng.integers(0, k, size=n)
    return probs, labels


def _naive_bins(probs, labels, n_bins):
    """Independent reference: an explicit loop over bins (lo, hi], with confidence 0 in the first bin."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    confidences = [max(row) for row in probs]
    correct = [int(np.argmax(row) == y) for row, y in zip(probs, labels)]
    gaps, weights = [], []
    for b in range(n_bins):
        members = [
            i for i, c in enumerate(confidences) if edges[b] < c <= edges[b + 1] or (b == 0 and c == 0.0)
        ]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            conf = sum(confidences[i] for i in members) / len(members)
            gaps.append(abs(acc - conf))
            weights.append(len(members) / len(probs))
    return gaps, weights


def _naive_ece(probs, labels, n_bins):
    gaps, weights = _naive_bins(probs, labels, n_bins)
    return sum(g * w for g, w in zip(gaps, weights))


def _binary(confidences_class0):
    c = np.asarray(confidences_class0, dtype=float)
    return np.stack([c, 1 - c], axis=1)


# ----- softmax -----


def test_softmax_matches_scipy_and_is_stable():
    logits = np.random.default_rng(0).normal(size=(5, 3))
    np.testing.assert_allclose(softmax(logits), scipy.special.softmax(logits, axis=1), rtol=1e-12)
    np.testing.assert_allclose(softmax(logits, temperature=2.0), scipy.special.softmax(logits / 2, axis=1))
    extreme = softmax(np.array([[1e4, -1e4, 0.0]]))
    assert np.all(np.isfinite(extreme)) and extreme[0, 0] == 1.0
    assert softmax(torch.tensor(logits, dtype=torch.bfloat16)).dtype == np.float64
    with pytest.raises(ValueError, match="0"):
        softmax(logits, temperature=0)


# ----- ECE / MCE / reliability bins -----


@pytest.mark.parametrize("n_bins", [1, 3, 10, 15])
def test_ece_and_mce_match_naive_loop(n_bins):
    probs, labels = _random_probs()
    gaps, _ = _naive_bins(probs, labels, n_bins)
    assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(_naive_ece(probs, labels, n_bins))
    assert maximum_calibration_error(probs, labels, n_bins) == pytest.approx(max(gaps))


def test_ece_matches_naive_loop_on_bin_edges():
    # Confidences on exact multiples of 0.1 exercise the right-closed edges.
    c = np.repeat(np.round(np.arange(5, 11) / 10, 1), 3)
    probs = _binary(c)
    labels = np.tile([0, 1, 0], 6)
    assert expected_calibration_error(probs, labels, 10) == pytest.approx(_naive_ece(probs, labels, 10))
    bins = reliability_bins(probs, labels, 10)
    np.testing.assert_array_equal(bins["count"], [0, 0, 0, 0, 3, 3, 3, 3, 3, 3])


def test_ece_closed_form_example():
    # Bin (0.8, 0.9]: confidence 0.9, 1 of 2 correct -> gap 0.4. Bin (0.5, 0.6]: confidence 0.6, 2 of 2 correct
    # -> gap 0.4. ECE = 0.5 * 0.4 + 0.5 * 0.4 = 0.4.
    probs = _binary([0.9, 0.9, 0.6, 0.6])
    labels = np.array([0, 1, 0, 0])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.4)
    # Weights differ when the gaps differ: 3 items at 0.7 with 1 correct (gap 0.7 - 1/3), 1 item at 0.55 correct.
    probs = _binary([0.7, 0.7, 0.7, 0.55])
    labels = np.array([0, 1, 1, 0])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.75 * (0.7 - 1 / 3) + 0.25 * 0.45)
    assert maximum_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.45)
    # With one bin the ECE is |accuracy - mean confidence|.
    assert expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(abs(0.5 - 0.6625))


def test_perfectly_calibrated_is_zero():
    # 10 items at confidence 0.8 with 8 correct, 4 at 0.5 (ties pick class 0) with 2 correct.
    probs = _binary([0.8] * 10 + [0.5] * 4)
    labels = np.array([0] * 8 + [1] * 2 + [0, 0, 1, 1])
    assert expected_calibration_error(probs, labels, 10) == pytest.approx(0.0, abs=1e-12)
    assert maximum_calibration_error(probs, labels, 10) == pytest.approx(0.0, abs=1e-12)


def test_all_wrong_confident_equals_mean_confidence():
    probs = _binary([0.95, 0.9, 0.99, 0.7])
    labels = np.ones(4, dtype=int)
    for n_bins in (1, 10, 15):
        assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(np.mean([0.95, 0.9, 0.99, 0.7]))


def test_single_class_and_single_example():
    probs = np.ones((3, 1))
    labels = np.zeros(3, dtype=int)
    assert expected_calibration_error(probs, labels) == 0.0
    assert brier_score(probs, labels) == 0.0
    assert predictive_entropy(probs) == 0.0
    assert expected_calibration_error(np.array([[0.3, 0.7]]), np.array([1])) == pytest.approx(0.3)


def test_reliability_bins_layout_and_empty_bins():
    probs = _binary([0.55, 0.5, 1.0, 0.95, 0.9])
    labels = np.array([0, 1, 0, 0, 1])
    bins = reliability_bins(probs, labels, n_bins=4)
    assert set(bins) == {"bin_lower", "bin_upper", "count", "accuracy", "confidence"}
    np.testing.assert_allclose(bins["bin_lower"], [0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(bins["bin_upper"], [0.25, 0.5, 0.75, 1.0])
    # 0.5 is the upper edge of bin 1 (right-closed); 1.0 falls in the last bin.
    np.testing.assert_array_equal(bins["count"], [0, 1, 1, 3])
    assert np.isnan(bins["accuracy"][0]) and np.isnan(bins["confidence"][0])
    np.testing.assert_allclose(bins["accuracy"][1:], [0.0, 1.0, 2 / 3])
    np.testing.assert_allclose(bins["confidence"][1:], [0.5, 0.55, (1.0 + 0.95 + 0.9) / 3])
    assert bins["count"].sum() == 5
    assert np.isfinite(expected_calibration_error(probs, labels, n_bins=4))


def test_zero_confidence_goes_to_first_bin():
    # max prob is never 0 for real distributions, but the convention must still hold for the binning itself.
    bins = reliability_bins(np.array([[1.0, 0.0]]), np.array([0]), n_bins=3)
    np.testing.assert_array_equal(bins["count"], [0, 0, 1])


def test_ece_invariant_to_row_order():
    probs, labels = _random_probs(1)
    perm = np.random.default_rng(1).permutation(len(labels))
    assert expected_calibration_error(probs[perm], labels[perm]) == pytest.approx(
        expected_calibration_error(probs, labels), abs=1e-15
    )


def test_bins_from_shards_merge_to_the_full_result():
    probs, labels = _random_probs(2, n=120)
    full = reliability_bins(probs, labels, 10)
    shards = [reliability_bins(probs[s], labels[s], 10) for s in (slice(0, 50), slice(50, 120))]
    count = sum(b["count"] for b in shards)
    np.testing.assert_array_equal(count, full["count"])
    for key in ("accuracy", "confidence"):
        merged = sum(np.nan_to_num(b[key]) * b["count"] for b in shards)
        with np.errstate(invalid="ignore"):
            np.testing.assert_allclose(merged / count, full[key], rtol=1e-12)
    recombined = (np.concatenate([probs[:50], probs[50:]]), np.concatenate([labels[:50], labels[50:]]))
    assert expected_calibration_error(*recombined) == expected_calibration_error(probs, labels)


def test_torch_inputs_equal_numpy_inputs():
    probs, labels = _random_probs(3, n=30)
    assert expected_calibration_error(torch.tensor(probs), torch.tensor(labels)) == pytest.approx(
        expected_calibration_error(probs, labels)
    )
    assert negative_log_likelihood(torch.tensor(probs, dtype=torch.float32), torch.tensor(labels)) == pytest.approx(
        negative_log_likelihood(probs, labels), rel=1e-6
    )


# ----- NLL, Brier, entropy -----


def test_nll_matches_sklearn_and_clips():
    probs, labels = _random_probs(4, n=50, k=3)
    assert negative_log_likelihood(probs, labels) == pytest.approx(log_loss(labels, probs, labels=[0, 1, 2]))
    assert negative_log_likelihood(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(-math.log(1e-12))
    assert negative_log_likelihood(np.array([[1.0, 0.0]]), np.array([0])) == 0.0


def test_brier_binary_is_twice_sklearn():
    probs, labels = _random_probs(5, n=40, k=2)
    assert brier_score(probs, labels) == pytest.approx(2 * brier_score_loss(labels, probs[:, 1]))


def test_brier_multiclass_matches_sklearn_and_range():
    probs, labels = _random_probs(6, n=40, k=4)
    assert brier_score(probs, labels) == pytest.approx(
        brier_score_loss(labels, probs, labels=[0, 1, 2, 3], scale_by_half=False)
    )
    assert brier_score(np.eye(3), np.arange(3)) == 0.0
    assert brier_score(np.eye(3), np.array([1, 2, 0])) == 2.0


def test_entropy_matches_scipy():
    probs, _ = _random_probs(7, n=20, k=5)
    probs[0] = [0.5, 0.5, 0.0, 0.0, 0.0]  # zeros: 0 log 0 = 0
    expected = scipy.stats.entropy(probs, axis=1)
    np.testing.assert_allclose(predictive_entropy(probs, reduction="none"), expected, rtol=1e-12)
    assert predictive_entropy(probs) == pytest.approx(expected.mean())
    assert predictive_entropy(np.full((2, 4), 0.25)) == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="sum"):
        predictive_entropy(probs, reduction="sum")


# ----- confidence preservation (Vengertsev & Sherman 2024) -----


def test_confidence_preservation_hand_example():
    teacher = _binary([0.9, 0.8, 0.3, 0.6, 0.2])
    student = _binary([0.7, 0.75, 0.4, 0.4, 0.05])
    labels = np.array([0, 0, 1, 0, 1])
    # Both correct on items 0, 1, 2, 4 (item 3: the student predicts class 1).
    # delta (class 0) = 0.2, 0.05, -0.1, 0.15 -> mean 0.075, population std below.
    deltas = np.array([0.2, 0.05, -0.1, 0.15])
    expected = math.sqrt(np.mean((deltas - deltas.mean()) ** 2))
    assert confidence_preservation(teacher, student, labels) == pytest.approx(expected)
    # Class 1 flips every delta's sign: same std for two classes.
    assert confidence_preservation(teacher, student, labels, class_index=1) == pytest.approx(expected)
    # Gold-class deltas: 0.2, 0.05, +0.1, -0.15 (signs follow the gold class) -> a different statistic.
    gold = np.array([0.2, 0.05, 0.1, -0.15])
    assert confidence_preservation(teacher, student, labels, class_index=None) == pytest.approx(gold.std())
    assert gold.std() != pytest.approx(expected)


def test_confidence_preservation_nan_when_never_both_correct():
    teacher = _binary([0.9, 0.2])
    student = _binary([0.1, 0.9])
    assert math.isnan(confidence_preservation(teacher, student, np.array([0, 0])))


def test_confidence_preservation_multiclass_gold_is_top_label_confidence():
    probs_t, labels = _random_probs(8, n=60, k=3)
    probs_s = softmax(np.log(probs_t) + np.random.default_rng(8).normal(scale=0.3, size=probs_t.shape))
    both = (probs_t.argmax(1) == labels) & (probs_s.argmax(1) == labels)
    expected = np.std(probs_t.max(1)[both] - probs_s.max(1)[both])
    assert confidence_preservation(probs_t, probs_s, labels, class_index=None) == pytest.approx(expected)
    with pytest.raises(ValueError, match="got 3"):
        confidence_preservation(probs_t, probs_s, labels, class_index=3)


# ----- ChaosNLI divergences -----


def test_human_distribution_divergence_matches_scipy_loop():
    rng = np.random.default_rng(9)
    human = rng.multinomial(100, [0.5, 0.3, 0.2], size=30) / 100.0
    human[:3] = [[1.0, 0.0, 0.0], [0.0, 0.4, 0.6], [0.0, 0.0, 1.0]]
    model = scipy.special.softmax(rng.normal(scale=3, size=(30, 3)), axis=1)
    model[3] = [1.0, 0.0, 0.0]  # exercises the 1e-15 floor
    model[4] = [0.0, 0.0, 1.0]

    floored = np.maximum(model, 1e-15)
    floored /= floored.sum(axis=1, keepdims=True)
    kl = np.mean([scipy.stats.entropy(h, m) for h, m in zip(human, floored)])
    js = np.mean([jensenshannon(h, m) for h, m in zip(human, floored)])

    result = human_distribution_divergence(human, model)
    assert set(result) == {"kl", "js_distance"}
    np.testing.assert_allclose(result["kl"], kl, rtol=1e-9)
    np.testing.assert_allclose(result["js_distance"], js, rtol=1e-9)
    assert np.isfinite(result["kl"])


def test_human_distribution_divergence_identical_is_zero():
    human = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    result = human_distribution_divergence(human, human)
    assert result["kl"] == pytest.approx(0.0, abs=1e-12)
    assert result["js_distance"] == pytest.approx(0.0, abs=1e-6)
    # Two near-uniform rows 1e-13 apart: the divergence rounds below 0, whose square root would be NaN (found by the
    # property test); the distance is then 0.
    near = np.array([[0.20000000000005022, 0.20000000000018314, 0.19999999999970988, 0.20000000000013113,
                      0.1999999999999257]])
    other = np.array([[0.19999999999985912, 0.1999999999998967, 0.19999999999994234, 0.20000000000008789,
                       0.2000000000002141]])
    assert human_distribution_divergence(near, other)["js_distance"] == pytest.approx(0.0, abs=1e-6)


def test_human_distribution_divergence_validation():
    human = np.array([[0.2, 0.8], [0.5, 0.4], [1.0, 0.0]])
    model = np.full((3, 2), 0.5)
    with pytest.raises(ValueError, match="row 1"):
        human_distribution_divergence(human, model)
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        human_distribution_divergence(np.full((3, 3), 1 / 3), model)
    with pytest.raises(ValueError, match="row 0"):
        human_distribution_divergence(np.array([[1.2, -0.2]]), np.array([[0.5, 0.5]]))


# ----- validation shared by the metric functions -----


@pytest.mark.parametrize(
    "fn", [expected_calibration_error, maximum_calibration_error, negative_log_likelihood, brier_score]
)
def test_input_validation(fn):
    probs, labels = _random_probs(10, n=5, k=3)
    with pytest.raises(ValueError, match=r"got 3 at index 2.*\[0, 3\)|\[0, 3\).*got 3 at index 2"):
        fn(probs, np.array([0, 1, 3, 0, 1]))
    with pytest.raises(ValueError, match="-1"):
        fn(probs, np.array([0, 1, -1, 0, 1]))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        fn(probs, labels[:4])
    with pytest.raises(ValueError, match=r"\(0, 3\)"):
        fn(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="row 0 sums to"):
        fn(probs * 3, labels)  # unnormalised scores instead of probabilities
    with pytest.raises(ValueError, match="dtype"):
        fn(probs, labels + 0.5)


@pytest.mark.parametrize("n_bins", [0, -3, 2.5])
def test_bad_n_bins(n_bins):
    probs, labels = _random_probs(11, n=5)
    with pytest.raises(ValueError, match=str(n_bins)):
        expected_calibration_error(probs, labels, n_bins=n_bins)
    with pytest.raises(ValueError, match=str(n_bins)):
        make_compute_metrics(n_bins=n_bins)


# ----- make_compute_metrics -----


def _eval_pred(predictions, label_ids):
    # Duck-typed transformers.EvalPrediction: importing transformers here would cost seconds.
    return SimpleNamespace(predictions=predictions, label_ids=label_ids)


def test_compute_metrics_student_only():
    rng = np.random.default_rng(12)
    logits = rng.normal(size=(20, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=20)
    labels[[2, 7]] = -100
    metrics = make_compute_metrics(n_bins=10)(_eval_pred(logits, labels))

    keep = labels != -100
    probs, y = softmax(logits[keep]), labels[keep]
    assert set(metrics) == {"accuracy", "ece", "mce", "nll", "brier", "entropy", "ece_bins"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == y))
    assert metrics["ece"] == pytest.approx(_naive_ece(probs, y, 10))
    assert metrics["mce"] == pytest.approx(maximum_calibration_error(probs, y, 10))
    assert metrics["nll"] == pytest.approx(negative_log_likelihood(probs, y))
    assert metrics["brier"] == pytest.approx(brier_score(probs, y))
    assert metrics["entropy"] == pytest.approx(predictive_entropy(probs))
    assert metrics["ece_bins"] == 10.0
    # A one-element tuple is the same as bare logits.
    assert make_compute_metrics(n_bins=10)(_eval_pred((logits,), labels)) == metrics


def test_compute_metrics_with_teacher():
    rng = np.random.default_rng(13)
    teacher = rng.normal(scale=3, size=(30, 2))
    student = teacher + rng.normal(scale=0.5, size=(30, 2))
    labels = teacher.argmax(1)
    labels[:4] = 1 - labels[:4]
    labels[5] = -100
    metrics = make_compute_metrics()(_eval_pred((student, teacher), labels))

    keep = labels != -100
    p_t, p_s, y = softmax(teacher[keep]), softmax(student[keep]), labels[keep]
    assert {"sigma", "teacher_accuracy", "teacher_entropy", "teacher_ece"} <= set(metrics)
    assert metrics["ece_bins"] == 15.0
    assert metrics["sigma"] == pytest.approx(confidence_preservation(p_t, p_s, y, class_index=0))
    assert metrics["teacher_accuracy"] == pytest.approx(25 / 29)
    assert metrics["teacher_entropy"] == pytest.approx(predictive_entropy(p_t))
    assert metrics["teacher_ece"] == pytest.approx(expected_calibration_error(p_t, y, 15))


def test_compute_metrics_warns_when_the_teacher_gets_nothing_right():
    # A teacher whose label ids are swapped against the data: accuracy 0 and sigma NaN, which used to pass quietly.
    rng = np.random.default_rng(14)
    teacher = rng.normal(scale=3, size=(20, 2))
    labels = 1 - teacher.argmax(1)
    with pytest.warns(UserWarning, match=r"teacher classifies none of the 20 examples right.*sigma is NaN.*"
                      r"align_labels\(dataset, teacher.config.label2id\)"):
        metrics = make_compute_metrics()(_eval_pred((teacher, teacher), labels))
    assert metrics["teacher_accuracy"] == 0 and math.isnan(metrics["sigma"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a teacher that gets examples right: no warning
        make_compute_metrics()(_eval_pred((teacher, teacher), teacher.argmax(1)))


def test_compute_metrics_validation():
    compute = make_compute_metrics()
    logits = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        compute(_eval_pred((logits, np.zeros((4, 2))), np.zeros(4, dtype=int)))
    with pytest.raises(ValueError, match="length 3"):
        compute(_eval_pred((logits, logits, logits), np.zeros(4, dtype=int)))
    with pytest.raises(ValueError, match="-100"):
        compute(_eval_pred(logits, np.full(4, -100)))
    with pytest.raises(ValueError, match="got 5"):
        compute(_eval_pred(logits, np.array([0, 1, 5, 2])))
