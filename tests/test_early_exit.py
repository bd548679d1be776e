"""hf_kd.early_exit: budget fractions, budget thresholds (MSDNet semantics), MIE, offline simulation, budgeted eval."""

import math

import numpy as np
import pytest
import torch

from hf_kd.early_exit import (
    BUDGET_ECE_BINS,
    NO_EXIT_THRESHOLD,
    ExitPolicy,
    budget_exit_fractions,
    budgeted_evaluation,
    fit_budget_thresholds,
    model_internal_ensemble,
    simulate_exits,
)
from hf_kd.metrics import expected_calibration_error

# 4 validation examples, 3 exits: confidence (max prob) of each example at each exit (>= 0.5: two-class maxima).
CONF = np.array(
    [
        [0.9, 0.95, 1.0],
        [0.8, 0.9, 1.0],
        [0.6, 0.7, 1.0],
        [0.55, 0.6, 1.0],
    ]
)


def two_class_probs(confidences):
    """(K, N, 2) probabilities whose max (class 0) is `confidences.T`, for confidences (N, K) all >= 0.5."""
    conf = torch.as_tensor(np.asarray(confidences).T, dtype=torch.float64)  # (K, N)
    return torch.stack([conf, 1 - conf], dim=-1)


def random_exit_probs(num_exits, num_examples, num_classes, seed, sharpen=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = sharpen * torch.randn(num_exits, num_examples, num_classes, generator=g, dtype=torch.float64)
    return logits.softmax(-1)


# --------------------------------------------------------------------------------------------------- fractions


def test_budget_fractions_hand_values():
    assert budget_exit_fractions(10, 3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])  # q = 0.5
    assert budget_exit_fractions(40, 2) == pytest.approx([1 / 3, 2 / 3])  # q = 2
    assert budget_exit_fractions(20, 5) == pytest.approx([0.2] * 5)  # q = 1: uniform
    assert budget_exit_fractions(3, 2, base=6) == pytest.approx([2 / 3, 1 / 3])
    assert budget_exit_fractions(7, 1) == [1.0]


@pytest.mark.parametrize("num_exits", [2, 4, 7, 60])
def test_budget_fractions_sum_to_one_and_order(num_exits):
    for budget_level in range(1, 40):
        fractions = np.array(budget_exit_fractions(budget_level, num_exits))
        assert fractions.shape == (num_exits,) and np.isfinite(fractions).all() and (fractions >= 0).all()
        assert fractions.sum() == pytest.approx(1.0, abs=1e-12)
        # Small budgets send most examples out early, large ones keep them to the end.
        diffs = np.diff(fractions)
        assert (diffs <= 0).all() if budget_level < 20 else (diffs >= 0).all()


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 3), "budget_level"),
        ((-1.0, 3), "budget_level"),
        ((float("nan"), 3), "budget_level"),
        ((True, 3), "budget_level"),
        ((5, 0), "num_exits"),
        ((5, 2.0), "num_exits"),
        ((5, 3, 0), "base"),
    ],
)
def test_budget_fractions_errors(args, match):
    with pytest.raises(ValueError, match=match):
        budget_exit_fractions(*args)


# --------------------------------------------------------------------------------------------------- thresholds


def test_thresholds_greedy_among_not_yet_exited():
    # pi = [1/4, 1/2, 1/4] of 4: 1 exits at exit 1 (the 0.9), then 2 of the 3 left at exit 2. Among those the
    # confidences are 0.9, 0.7, 0.6, so T_2 = 0.7; sorting all four (0.95 of the example that already left
    # included) would give 0.9 and let only one more exit.
    thresholds = fit_budget_thresholds(CONF, [0.25, 0.5, 0.25])
    assert thresholds == [0.9, 0.7]
    exits = simulate_exits(two_class_probs(CONF), thresholds).exit_index
    assert exits.tolist() == [0, 1, 1, 2]


def test_thresholds_accept_torch_and_match_fractions_on_validation():
    conf = random_exit_probs(4, 200, 6, seed=1).max(-1).values.T  # (N, K) torch
    fractions = budget_exit_fractions(12, 4)
    thresholds = fit_budget_thresholds(conf, fractions)
    assert len(thresholds) == 3
    exits = simulate_exits(random_exit_probs(4, 200, 6, seed=1), thresholds).exit_index
    counts = torch.bincount(exits, minlength=4)
    # Without ties exactly floor(N * pi_k) examples leave at each non-final exit.
    assert counts[:3].tolist() == [math.floor(200 * f) for f in fractions[:3]]


def test_threshold_nobody_when_count_is_zero():
    # floor(4 * 0.1) = 0: nobody exits at exit 1; then floor(4 * 0.5) = 2 of all 4 exit at exit 2.
    thresholds = fit_budget_thresholds(CONF, [0.1, 0.5, 0.4])
    assert thresholds == [NO_EXIT_THRESHOLD, 0.9]
    assert thresholds[0] > 1
    assert simulate_exits(two_class_probs(CONF), thresholds).exit_index.tolist() == [1, 1, 2, 2]


def test_threshold_ties_and_too_few_left_follow_the_reference():
    conf = np.array([[0.8, 0.9, 1.0], [0.8, 0.9, 1.0], [0.8, 0.5, 1.0], [0.55, 0.6, 1.0]])
    # T_1 = 0.8 (1 of 4) but the ties take 3; 2 should exit at exit 2 and only 1 is left: nobody does (MSDNet's 1e8).
    thresholds = fit_budget_thresholds(conf, [0.25, 0.5, 0.25])
    assert thresholds == [0.8, NO_EXIT_THRESHOLD]
    assert simulate_exits(two_class_probs(conf), thresholds).exit_index.tolist() == [0, 0, 0, 2]


def test_threshold_floor_tolerates_rounding():
    # 100 * 0.29 = 28.999999999999996 in floating point: the intended 29 examples leave.
    conf = np.stack([np.linspace(0.5, 0.99, 100), np.full(100, 0.5)], axis=1)
    (threshold,) = fit_budget_thresholds(conf, [0.29, 0.71])
    assert threshold == pytest.approx(np.sort(conf[:, 0])[::-1][28])
    assert int((conf[:, 0] >= threshold).sum()) == 29


def test_thresholds_single_exit_and_errors():
    assert fit_budget_thresholds(np.array([[0.4], [0.9]]), [1.0]) == []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_budget_thresholds(CONF * 2, [0.25, 0.5, 0.25])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_budget_thresholds(np.where(CONF > 0.85, np.nan, CONF), [0.25, 0.5, 0.25])
    with pytest.raises(ValueError, match="one value per exit \\(3\\)"):
        fit_budget_thresholds(CONF, [0.5, 0.5])
    with pytest.raises(ValueError, match="sum to 1"):
        fit_budget_thresholds(CONF, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="shape"):
        fit_budget_thresholds(CONF[:, 0], [1.0])


def reference_msdnet(val_probs, test_probs, test_labels, flops, budget_level):
    """A loop-by-loop port of dynamic_find_threshold / dynamic_eval_threshold (AaltoML/calibrated-dnn), float64."""
    n_exit, n_sample, _ = val_probs.shape
    p = torch.exp(torch.log(torch.tensor(budget_level / 20.0, dtype=torch.float64)) * torch.arange(1, n_exit + 1))
    p /= p.sum()
    max_preds = val_probs.max(dim=2).values
    sorted_idx = max_preds.sort(dim=1, descending=True).indices
    filtered = torch.zeros(n_sample)
    T = torch.full((n_exit,), 1e8, dtype=torch.float64)
    for k in range(n_exit - 1):
        count, out_n = 0, math.floor(n_sample * p[k].item() + 1e-9)
        for i in range(n_sample):
            ori_idx = sorted_idx[k][i]
            if filtered[ori_idx] == 0:
                count += 1
                if count == out_n:
                    T[k] = max_preds[k][ori_idx]
                    break
        filtered.add_(max_preds[k].ge(T[k]).type_as(filtered))
    T[n_exit - 1] = -1e8
    test_max = test_probs.max(dim=2).values
    exits, correct, nlpd = [], 0, 0.0
    for i in range(test_probs.shape[1]):
        for k in range(n_exit):
            if test_max[k][i] >= T[k]:
                exits.append(k)
                correct += int(test_probs[k, i].argmax() == test_labels[i])
                nlpd += -math.log(test_probs[k, i, test_labels[i]].item())
                break
    n_test = test_probs.shape[1]
    expected_flops = sum(flops[k] for k in exits) / n_test
    return T[:-1].clamp(max=NO_EXIT_THRESHOLD).tolist(), exits, correct / n_test, nlpd / n_test, expected_flops


@pytest.mark.parametrize("mie", [False, True])
def test_budgeted_evaluation_matches_reference_loops(mie):
    val, test = random_exit_probs(4, 60, 5, seed=2), random_exit_probs(4, 40, 5, seed=3)
    labels = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(4))
    flops = [1.0, 2.5, 3.0, 6.0]
    levels = [1, 5, 13, 20, 27, 39]
    results = budgeted_evaluation(val, test, labels, flops, budget_levels=levels, mie=mie)
    if mie:
        val, test = model_internal_ensemble(val, flops), model_internal_ensemble(test, flops)
    for level, result in zip(levels, results):
        thresholds, exits, accuracy, nlpd, expected_flops = reference_msdnet(val, test, labels, flops, level)
        assert result["budget_level"] == level
        assert result["thresholds"] == pytest.approx(thresholds)
        assert result["exit_fractions"] == pytest.approx((np.bincount(exits, minlength=4) / 40).tolist())
        assert result["accuracy"] == pytest.approx(accuracy)
        assert result["nlpd"] == pytest.approx(nlpd)
        assert result["expected_flops"] == pytest.approx(expected_flops)
        chosen = test[torch.tensor(exits), torch.arange(40)]
        assert result["ece"] == pytest.approx(expected_calibration_error(chosen, labels, n_bins=10))
        assert result["ece_bins"] == BUDGET_ECE_BINS == 10
    # More budget, more computation (on average) in this sweep.
    assert results[0]["expected_flops"] < results[-1]["expected_flops"]


def test_budgeted_evaluation_hand_example():
    # 2 exits, 4 examples, val = test; b = 20 gives pi = [1/2, 1/2]: the 2 most confident exit first.
    exit0 = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.55, 0.45]]
    exit1 = [[0.7, 0.3], [0.4, 0.6], [0.1, 0.9], [0.3, 0.7]]
    probs = np.array([exit0, exit1])
    labels = np.array([0, 1, 1, 0])
    (result,) = budgeted_evaluation(probs, probs, labels, [10.0, 30.0], budget_levels=[20])
    assert result["thresholds"] == [0.8]
    assert result["exit_fractions"] == [0.5, 0.5]  # examples 0, 1 at exit 0; 2, 3 at exit 1
    assert result["accuracy"] == 0.75  # 0.9 right, 0.8 right, 0.9 right, 0.7 wrong
    assert result["nlpd"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.9) + math.log(0.3)) / 4)
    assert result["expected_flops"] == 20.0
    # ECE, 10 bins (b/10, (b+1)/10]: {0.7} in (0.6, 0.7] wrong; {0.8} right; {0.9, 0.9} right.
    assert result["ece"] == pytest.approx((0.7 + 0.2 + 2 * 0.1) / 4)


def test_budgeted_evaluation_errors():
    probs = random_exit_probs(3, 5, 4, seed=0)
    labels = torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="same number of exits"):
        budgeted_evaluation(probs, probs[:2], labels, [1, 2, 3])
    with pytest.raises(ValueError, match="one value per exit"):
        budgeted_evaluation(probs, probs, labels, [1, 2])
    with pytest.raises(ValueError, match="> 0"):
        budgeted_evaluation(probs, probs, labels, [0, 2, 3])
    with pytest.raises(ValueError, match="labels"):
        budgeted_evaluation(probs, probs, labels[:3], [1, 2, 3])
    with pytest.raises(ValueError, match="budget_level"):
        budgeted_evaluation(probs, probs, labels, [1, 2, 3], budget_levels=[0])
    with pytest.raises(ValueError, match="mie"):
        budgeted_evaluation(probs, probs, labels, [1, 2, 3], mie="yes")


# --------------------------------------------------------------------------------------------------- MIE


def test_mie_hand_weights():
    p1 = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    p2 = torch.tensor([[0.3, 0.7], [0.2, 0.8]])
    p3 = torch.tensor([[0.6, 0.4], [0.0, 1.0]])
    flops = [1.0, 2.0, 4.0]  # w = [1/4, 1/2, 1]
    ensembled = model_internal_ensemble([p1, p2, p3], flops)
    assert isinstance(ensembled, torch.Tensor) and ensembled.shape == (3, 2, 2)
    torch.testing.assert_close(ensembled[0], p1)  # p̄_1 = p_1
    torch.testing.assert_close(ensembled[1], (0.25 * p1 + 0.5 * p2) / 0.75)
    torch.testing.assert_close(ensembled[2], (0.25 * p1 + 0.5 * p2 + 1.0 * p3) / 1.75)
    torch.testing.assert_close(ensembled.sum(-1), torch.ones(3, 2))
    # Only the FLOPs ratios matter; numpy in, float64 numpy out.
    scaled = model_internal_ensemble(torch.stack([p1, p2, p3]).numpy(), [10.0, 20.0, 40.0])
    assert isinstance(scaled, np.ndarray) and scaled.dtype == np.float64
    np.testing.assert_allclose(scaled, ensembled.numpy(), atol=1e-6)
    # Equal FLOPs: the running mean of the exits.
    torch.testing.assert_close(model_internal_ensemble([p1, p2], [3, 3])[1], (p1 + p2) / 2)


def test_mie_errors():
    probs = random_exit_probs(3, 4, 2, seed=0)
    with pytest.raises(ValueError, match="one value per exit \\(3\\)"):
        model_internal_ensemble(probs, [1.0, 2.0])
    with pytest.raises(ValueError, match="> 0"):
        model_internal_ensemble(probs, [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="not logits"):
        model_internal_ensemble(torch.rand(3, 4, 2) * 3, [1, 2, 3])
    with pytest.raises(ValueError, match="same \\(N, C\\) shape"):
        model_internal_ensemble([probs[0], probs[1, :2]], [1, 2])
    with pytest.raises(ValueError, match="num_exits, N, num_classes"):
        model_internal_ensemble(probs[0], [1, 2, 3, 4])


# --------------------------------------------------------------------------------------------------- simulate_exits


def test_simulate_policies_hand_example():
    # 3 exits, 3 examples, 2 classes; the max is on class 0 except where noted.
    probs = torch.tensor(
        [
            [[0.95, 0.05], [0.6, 0.4], [0.3, 0.7]],
            [[0.9, 0.1], [0.8, 0.2], [0.45, 0.55]],
            [[0.5, 0.5], [0.7, 0.3], [0.2, 0.8]],
        ]
    )
    result = simulate_exits(probs, policy="max_prob", threshold=0.75)
    assert result.exit_index.tolist() == [0, 1, 2]
    torch.testing.assert_close(result.probs, probs[[0, 1, 2], [0, 1, 2]])
    # Entropy of (0.95, 0.05) = 0.199, of (0.8, 0.2) = 0.500 nats.
    assert simulate_exits(probs, policy="entropy", threshold=0.3).exit_index.tolist() == [0, 2, 2]
    assert simulate_exits(probs, policy="entropy", threshold=0.51).exit_index.tolist() == [0, 1, 2]
    # PABEE, patience 1: argmax unchanged between exits 1 and 2 for examples 0 and 1 (0, 0), and 2 (1, 1).
    assert simulate_exits(probs, policy="patience", patience=1).exit_index.tolist() == [1, 1, 1]
    assert simulate_exits(probs, policy=ExitPolicy.PATIENCE, patience=2).exit_index.tolist() == [2, 2, 2]
    # Budget: per-exit thresholds; above 1 nobody exits.
    assert simulate_exits(probs, [0.9, 0.5]).exit_index.tolist() == [0, 1, 1]
    assert simulate_exits(probs, [NO_EXIT_THRESHOLD, 0.85]).exit_index.tolist() == [1, 2, 2]
    numpy_result = simulate_exits(probs.numpy(), [0.0, 0.0])
    assert isinstance(numpy_result.exit_index, np.ndarray) and numpy_result.exit_index.tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"thresholds": [0.5]}, r"needs 2 thresholds.*got 1 values"),
        ({"thresholds": [0.5, 0.5, 0.5]}, r"needs 2 thresholds.*got 3 values"),
        ({"thresholds": [0.5, float("nan")]}, "finite, got nan at index 1"),
        ({"thresholds": [float("inf"), 0.5]}, "finite, got inf at index 0"),
        ({"thresholds": [-0.1, 0.5]}, ">= 0.*got -0.1 at index 0"),
        ({"thresholds": "high"}, "list of numbers"),
        ({}, r"needs thresholds=\[T_1, ..., T_2\]"),
        ({"thresholds": [0.5, 0.5], "threshold": 0.5}, "threshold=0.5"),
        ({"thresholds": [0.5, 0.5], "policy": "max_prob", "threshold": 0.5}, "only used by policy='budget'"),
        ({"policy": "confidence", "threshold": 0.5}, "policy must be one of"),
        ({"policy": "max_prob", "threshold": 1.5}, r"\[0, 1\]"),
    ],
)
def test_simulate_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_exits(random_exit_probs(3, 4, 2, seed=0), **kwargs)
