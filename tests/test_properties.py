"""Property tests (hypothesis) of the losses and metrics: bounds, finiteness at extreme logits in every float dtype,
closed-form gradients, and invariance to how the evaluation set is split into batches, shards or processes.

One file for hf_kd/losses.py and hf_kd/metrics.py on purpose: the hypothesis strategies and settings are shared, and
these tests check properties (not examples), which the example tests of tests/test_losses.py and tests/test_metrics.py
do not."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hf_kd.losses import dedier_weights, kd_loss, label_smoothing_targets, soft_cross_entropy
from hf_kd.metrics import (
    brier_score,
    classification_metrics,
    confidence_preservation,
    expected_calibration_error,
    human_distribution_divergence,
    maximum_calibration_error,
    negative_log_likelihood,
    predictive_entropy,
    reliability_bins,
    softmax,
)

# Small and deadline-free: the suite runs on 2 shared cores.
PROPERTY = settings(max_examples=40, deadline=None)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def logits_batch(draw, max_rows=12, max_classes=6, scale=1e4):
    """`(N, K)` float64 logits anywhere in [-scale, scale] (extremes included), with labels in [0, K)."""
    rows = draw(st.integers(1, max_rows))
    classes = draw(st.integers(2, max_classes))
    values = st.one_of(st.floats(-scale, scale, allow_nan=False), st.sampled_from([-scale, 0.0, scale]))
    logits = draw(hnp.arrays(np.float64, (rows, classes), elements=values))
    labels = draw(hnp.arrays(np.int64, (rows,), elements=st.integers(0, classes - 1)))
    return logits, labels


@st.composite
def probs_batch(draw, max_rows=40, max_classes=5):
    """Probabilities `(N, K)` (softmax of moderate logits, some near one-hot) with labels."""
    logits, labels = draw(logits_batch(max_rows=max_rows, max_classes=max_classes, scale=30.0))
    return softmax(logits), labels


# ---- losses ----------------------------------------------------------------------------------------------------------


class TestLossProperties:
    @PROPERTY
    @given(
        batch=logits_batch(),
        teacher_seed=st.integers(0, 2**16),
        temperature=st.floats(0.5, 10.0),
        alpha=st.floats(0.0, 1.0),
        dtype=st.sampled_from(DTYPES),
    )
    def test_kd_loss_is_finite_and_non_negative_at_extreme_logits(self, batch, teacher_seed, temperature, alpha, dtype):
        logits, labels = batch
        student = torch.tensor(logits, dtype=dtype, requires_grad=True)
        teacher = torch.tensor(np.random.default_rng(teacher_seed).permutation(logits.ravel()).reshape(logits.shape),
                               dtype=dtype)
        loss = kd_loss(student, teacher, torch.tensor(labels), temperature, alpha)
        assert torch.isfinite(loss) and loss >= -1e-4  # KL >= 0 and CE >= 0 (rounding aside)
        loss.backward()
        assert torch.isfinite(student.grad.float()).all()

    @PROPERTY
    @given(batch=logits_batch(scale=20.0), temperature=st.floats(0.5, 8.0), alpha=st.floats(0.0, 1.0))
    def test_kd_loss_gradient_is_the_closed_form(self, batch, temperature, alpha):
        # d/dz_s [alpha T^2 KL(p_t^T || p_s^T) + (1 - alpha) CE(y, z_s)] / N
        #   = [alpha T (p_s^T - p_t^T) + (1 - alpha) (softmax(z_s) - onehot(y))] / N
        logits, labels = batch
        student = torch.tensor(logits, requires_grad=True)
        teacher = torch.tensor(logits[::-1].copy())
        labels = torch.tensor(labels)
        kd_loss(student, teacher, labels, temperature, alpha).backward()
        p_s, p_t = (torch.softmax(z / temperature, -1) for z in (student.detach(), teacher))
        one_hot = torch.nn.functional.one_hot(labels, logits.shape[1]).double()
        expected = (alpha * temperature * (p_s - p_t) + (1 - alpha) * (torch.softmax(student.detach(), -1) - one_hot))
        torch.testing.assert_close(student.grad, expected / len(labels), rtol=1e-8, atol=1e-10)

    @PROPERTY
    @given(batch=logits_batch(), epsilon=st.floats(0.0, 1.0), dtype=st.sampled_from(DTYPES))
    def test_soft_cross_entropy_is_at_least_the_target_entropy(self, batch, epsilon, dtype):
        logits, labels = batch
        targets = label_smoothing_targets(torch.tensor(labels), logits.shape[1], epsilon)
        assert torch.allclose(targets.sum(-1), torch.ones(len(labels))) and (targets >= 0).all()
        loss = soft_cross_entropy(torch.tensor(logits, dtype=dtype), targets.to(dtype))
        target_entropy = predictive_entropy(targets.double().numpy())
        assert torch.isfinite(loss) and float(loss) >= target_entropy - 1e-2  # Gibbs: H(q, p) >= H(q)

    @PROPERTY
    @given(batch=logits_batch(), alpha=st.floats(0.0, 1.0), beta=st.floats(0.0, 6.0))
    def test_dedier_weights_stay_in_one_to_e_beta(self, batch, alpha, beta):
        logits, labels = batch
        readout, labels = torch.tensor(logits, dtype=torch.float32), torch.tensor(labels)
        weights = dedier_weights(readout, labels, torch.ones(len(labels)), alpha, beta)
        assert ((weights >= 1) & (weights <= math.exp(beta) * (1 + 1e-6))).all()
        right = readout.argmax(-1) == labels
        assert (weights[right] == 1).all()  # correctly read samples keep their weight


# ---- metrics ---------------------------------------------------------------------------------------------------------


class TestMetricBounds:
    @PROPERTY
    @given(batch=probs_batch(), n_bins=st.integers(1, 20))
    def test_bounds(self, batch, n_bins):
        probs, labels = batch
        num_classes = probs.shape[1]
        assert 0 <= expected_calibration_error(probs, labels, n_bins) <= maximum_calibration_error(probs, labels,
                                                                                                   n_bins) <= 1
        assert 0 <= brier_score(probs, labels) <= 2
        assert 0 <= negative_log_likelihood(probs, labels) <= -math.log(1e-12) + 1e-9
        assert -1e-12 <= predictive_entropy(probs) <= math.log(num_classes) + 1e-9

    @PROPERTY
    @given(human=probs_batch(), model_seed=st.integers(0, 2**16))
    def test_chaosnli_divergences_are_bounded(self, human, model_seed):
        human_probs, _ = human
        model_probs = np.random.default_rng(model_seed).permutation(human_probs)
        model_probs[0] = np.eye(human_probs.shape[1])[0]  # a one-hot model row: log(0) must be floored, not -inf
        divergence = human_distribution_divergence(human_probs, model_probs)
        assert divergence["kl"] >= -1e-12 and math.isfinite(divergence["kl"])
        assert -1e-12 <= divergence["js_distance"] <= math.sqrt(math.log(2)) + 1e-12

    @PROPERTY
    @given(batch=logits_batch(scale=1e4), dtype=st.sampled_from(DTYPES))
    def test_metrics_are_finite_for_extreme_logits_in_every_dtype(self, batch, dtype):
        logits, labels = batch
        probs = torch.tensor(logits, dtype=dtype).float().softmax(-1)
        metrics = classification_metrics(probs, labels)
        assert all(math.isfinite(v) for v in metrics.values())

    @PROPERTY
    @given(batch=probs_batch(), student_seed=st.integers(0, 2**16))
    def test_sigma_is_non_negative_and_zero_for_identical_models(self, batch, student_seed):
        probs, labels = batch
        labels = probs.argmax(1)  # every example correct for both, so sigma is defined
        assert confidence_preservation(probs, probs, labels) == pytest.approx(0.0, abs=1e-12)
        noisy = softmax(np.log(probs + 1e-9) + np.random.default_rng(student_seed).normal(0, 0.1, probs.shape))
        both = noisy.argmax(1) == labels
        if both.any():
            assert confidence_preservation(probs, noisy, labels) >= 0


class TestSplitInvariance:
    """The Trainer gathers every process's predictions before `compute_metrics`; evaluation loops may also merge
    per-batch statistics. Either way the result must not depend on how the data was cut."""

    @PROPERTY
    @given(batch=probs_batch(), n_bins=st.integers(1, 20), cuts=st.lists(st.integers(0, 40), max_size=4))
    def test_reliability_bins_merge_exactly_across_batches(self, batch, n_bins, cuts):
        probs, labels = batch
        edges = sorted({0, len(labels), *[c for c in cuts if c < len(labels)]})
        parts = [(probs[a:b], labels[a:b]) for a, b in zip(edges, edges[1:]) if b > a]
        full = reliability_bins(probs, labels, n_bins)
        count = sum(reliability_bins(p, y, n_bins)["count"] for p, y in parts)
        sums = {key: sum(np.nan_to_num(reliability_bins(p, y, n_bins)[key]) * reliability_bins(p, y, n_bins)["count"]
                         for p, y in parts) for key in ("accuracy", "confidence")}
        np.testing.assert_array_equal(count, full["count"])
        nonempty = count > 0
        for key, total in sums.items():
            np.testing.assert_allclose(total[nonempty] / count[nonempty], full[key][nonempty], rtol=1e-12)

    @PROPERTY
    @given(batch=probs_batch(), processes=st.integers(1, 4), seed=st.integers(0, 2**16))
    def test_metrics_do_not_depend_on_the_process_count_or_order(self, batch, processes, seed):
        probs, labels = batch
        # DistributedSampler hands rank r the rows r, r + P, r + 2P, ...; the gather concatenates the ranks' rows.
        order = np.concatenate([np.arange(len(labels))[rank::processes] for rank in range(processes)])
        order = np.random.default_rng(seed).permutation(order)
        expected = classification_metrics(probs, labels)
        assert classification_metrics(probs[order], labels[order]) == pytest.approx(expected, rel=1e-12, abs=1e-12)
