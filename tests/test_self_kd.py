"""Self-KD from lower layers for learning ambiguity (Park et al., 2024), its pure functions: the source-exit
selection and re-calibration rules of hf_kd/self_kd.py and the self-KD losses of hf_kd/losses.py (Jensen-Shannon
KD, `self_kd_loss`) against per-sample references. SelfKDTrainer is tested in tests/test_self_kd_trainer.py."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from torch.nn import functional as F

from hf_kd import kd_loss
from hf_kd.losses import self_kd_loss
from hf_kd.self_kd import (
    entropy_drops,
    level_of_ambiguity,
    recalibration_indices,
    select_source_exit,
    selection_is_stable,
)

# ---- the selection rules (hf_kd.self_kd) ---------------------------------------------------------------------------


class TestSourceLayerSelection:
    ENTROPIES = [1.05, 1.02, 0.60, 0.55, 0.20]  # drops 0.03, 0.42, 0.05, 0.35

    def test_drops(self):
        np.testing.assert_allclose(entropy_drops(self.ENTROPIES), [0.03, 0.42, 0.05, 0.35], atol=1e-12)

    def test_largest_drop_after_and_before(self):
        # after_drop: the drop into the final exit (0.35) is no candidate; the largest candidate enters exit 2.
        assert select_source_exit(self.ENTROPIES) == 2
        # before_drop: every drop is a candidate; the largest (0.42) leaves exit 1.
        assert select_source_exit(self.ENTROPIES, side="before_drop") == 1
        assert select_source_exit([1.0, 0.9, 0.9, 0.2], side="before_drop") == 2  # the drop into the final exit

    def test_first_significant_is_the_earliest_large_drop(self):
        entropies = [1.0, 0.7, 0.6, 0.2, 0.15]  # drops 0.3, 0.1, 0.4, 0.05
        assert select_source_exit(entropies, "largest", side="before_drop") == 2
        assert select_source_exit(entropies, "first_significant", 0.5, side="before_drop") == 0  # 0.3 >= 0.2
        assert select_source_exit(entropies, "first_significant", 0.9, side="before_drop") == 2
        assert select_source_exit(entropies, "first_significant", 0.5) == 1  # after_drop: drop 0 enters exit 1

    def test_ties_and_rising_entropy(self):
        assert select_source_exit([1.0, 0.5, 0.0, -0.5 + 0.5]) == 1  # equal drops 0.5, 0.5: the first
        # Entropy that never falls: no drop is positive, "first_significant" falls back to the largest (least rise).
        rising = [0.1, 0.5, 0.6, 0.9]
        assert select_source_exit(rising, "first_significant") == select_source_exit(rising) == 2

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"exit_entropies": [0.5, 0.4]}, "side='after_drop' needs at least 3 exits"),
            ({"exit_entropies": [0.5]}, "must be >= 2 finite values"),
            ({"exit_entropies": [0.5, math.nan, 0.1]}, "must be >= 2 finite values"),
            ({"exit_entropies": [0.5, 0.4, 0.1], "rule": "steepest"}, "rule must be one of"),
            ({"exit_entropies": [0.5, 0.4, 0.1], "side": "at_drop"}, "side must be one of"),
            ({"exit_entropies": [0.5, 0.4, 0.1], "threshold": 0.0}, "threshold must be in (0, 1], got 0.0"),
        ],
    )
    def test_bad_input(self, kwargs, message):
        with pytest.raises(ValueError) as err:
            select_source_exit(**kwargs)
        assert message in str(err.value)

    def test_two_exits_before_drop(self):
        assert select_source_exit([0.6, 0.2], side="before_drop") == 0

    def test_stability(self):
        assert not selection_is_stable([2], 2)
        assert selection_is_stable([3, 2, 2], 2)
        assert not selection_is_stable([2, 2, 3], 2)
        assert selection_is_stable([4], 1)
        with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
            selection_is_stable([1], 0)


class TestRecalibrationSet:
    def test_level_of_ambiguity(self):
        probs = np.array(
            [
                [[0.6, 0.4], [0.2, 0.8], [0.5, 0.5]],  # exit 0
                [[0.9, 0.1], [0.3, 0.7], [0.1, 0.9]],  # exit 1 (the source)
                [[0.99, 0.01], [0.01, 0.99], [0.2, 0.8]],  # exit 2
            ]
        )
        labels = np.array([0, 0, -100])
        np.testing.assert_allclose(level_of_ambiguity(probs, labels, 1), [0.9, 0.3, np.inf])
        np.testing.assert_allclose(level_of_ambiguity(probs, labels, 1, "lower_mean"), [0.75, 0.25, np.inf])
        with pytest.raises(ValueError, match="score must be one of"):
            level_of_ambiguity(probs, labels, 1, "entropy")

    def test_lowest_percent_ties_by_index_and_unlabelled_never(self):
        scores = np.array([0.5, 0.1, np.inf, 0.1, 0.9, 0.3, 0.2, 0.8, 0.7, 0.6, 0.4])  # 10 labelled
        assert recalibration_indices(scores, 10).tolist() == [1]  # a tie: the lower index
        assert recalibration_indices(scores, 20).tolist() == [1, 3]
        assert recalibration_indices(scores, 29).tolist() == [1, 3]  # floor(2.9)
        assert recalibration_indices(scores, 30).tolist() == [1, 3, 6]  # exactly 3, despite 30 / 100 * 10 < 3
        assert recalibration_indices(scores, 0).tolist() == []
        # floor(9.99) = 9 of the 10 labelled rows: all but the highest score (row 4); the unlabelled row 2 never.
        assert recalibration_indices(scores, 99.9).tolist() == [0, 1, 3, 5, 6, 7, 8, 9, 10]

    @pytest.mark.parametrize("percent", [100, -1, 150.0])
    def test_percent_out_of_range(self, percent):
        with pytest.raises(ValueError, match=r"percent must be in \[0, 100\)"):
            recalibration_indices(np.zeros(4), percent)


# ---- losses --------------------------------------------------------------------------------------------------------


def _js_reference(p, q):
    """Jensen-Shannon divergence from scipy's distance (natural log): distance squared."""
    return np.array([jensenshannon(a, b) ** 2 for a, b in zip(p, q)])


class TestJensenShannonKD:
    def test_matches_scipy_and_is_symmetric(self):
        torch.manual_seed(0)
        student, teacher = torch.randn(5, 4, dtype=torch.float64) * 2, torch.randn(5, 4, dtype=torch.float64) * 2
        for temperature in (1.0, 3.0):
            per_item = kd_loss(student, teacher, None, temperature, reduction="none", divergence="js")
            expected = _js_reference(F.softmax(teacher / temperature, -1), F.softmax(student / temperature, -1))
            np.testing.assert_allclose(per_item.numpy(), temperature**2 * expected, rtol=1e-10)
            swapped = kd_loss(teacher, student, None, temperature, reduction="none", divergence="js")
            torch.testing.assert_close(per_item, swapped)
        assert (per_item <= 9 * math.log(2) + 1e-12).all()

    def test_finite_on_one_hot_and_zero_on_equal(self):
        student = torch.tensor([[1e4, -1e4], [0.3, 0.1]])
        teacher = torch.tensor([[-1e4, 1e4], [0.3, 0.1]])
        per_item = kd_loss(student, teacher, None, 1.0, reduction="none", divergence="js")
        torch.testing.assert_close(per_item, torch.tensor([math.log(2), 0.0]))

    def test_bad_divergence(self):
        with pytest.raises(ValueError, match=r"divergence must be one of \('kl', 'js'\), got 'tv'"):
            kd_loss(torch.zeros(2, 2), torch.zeros(2, 2), divergence="tv")


def self_kd_reference(exit_logits, labels, source, lmbda, temperature, divergence, correction, other_exits,
                      recalibrate, recalibration_loss):
    """Per-sample loop over the formulas of PAPERS.md sections 2.3-2.4, in float64 with softmax/log."""
    z = [e.double() for e in exit_logits]
    total, count = 0.0, 0

    def div(t_logits, s_logits):
        p, q = F.softmax(t_logits / temperature, -1), F.softmax(s_logits / temperature, -1)
        if divergence == "kl":
            d = (p * (p.log() - q.log())).sum()
        else:
            m = (p + q) / 2
            d = ((p * (p.log() - m.log())).sum() + (q * (q.log() - m.log())).sum()) / 2
        return temperature**2 * d

    for i, y in enumerate(labels.tolist()):
        if y == -100:
            continue
        count += 1
        main, src = z[-1][i], z[source][i]

        def ce(logits, y=y):
            return -F.log_softmax(logits, -1)[y]

        main_loss = (1 - lmbda) * ce(main) + lmbda * div(src.detach(), main)
        if recalibrate is not None and bool(recalibrate[i]):
            u = torch.full_like(main, 1 / main.numel())
            to_uniform = (u * (u.log() - F.log_softmax(main, -1))).sum()
            main_loss = to_uniform if recalibration_loss == "replace" else main_loss + to_uniform
        wrong = int(src.argmax()) != y
        corrects = wrong and (correction == "source_wrong" or int(main.argmax()) == y)
        src_loss = ce(src) + (div(main.detach(), src) if corrects else 0.0)
        others = sum(ce(z[j][i]) for j in range(len(z) - 1) if j != source) if other_exits == "ce" else 0.0
        total = total + main_loss + src_loss + others
    return total / count


class TestSelfKDLoss:
    @pytest.mark.parametrize(
        "options",
        [
            {},
            {"divergence": "js", "temperature": 2.0},
            {"correction": "source_wrong", "other_exits": "none", "lmbda": 1.0},
            {"recalibrate": True},
            {"recalibrate": True, "recalibration_loss": "add", "lmbda": 0.0},
        ],
    )
    def test_matches_per_sample_reference_and_its_gradients(self, options):
        torch.manual_seed(3)
        exit_logits = [torch.randn(6, 3, requires_grad=True) for _ in range(4)]
        labels = torch.tensor([0, 2, 1, -100, 1, 0])
        settings = dict(lmbda=0.6, temperature=1.0, divergence="kl", correction="source_wrong_main_right",
                        other_exits="ce", recalibration_loss="replace")
        settings.update({k: v for k, v in options.items() if k != "recalibrate"})
        recalibrate = torch.tensor([True, False, True, True, False, False]) if options.get("recalibrate") else None
        loss, parts = self_kd_loss(
            exit_logits, labels, 1, settings["lmbda"], settings["temperature"], settings["divergence"],
            settings["correction"], settings["other_exits"], recalibrate, settings["recalibration_loss"],
        )
        expected = self_kd_reference(exit_logits, labels, 1, recalibrate=recalibrate, **{
            "lmbda": settings["lmbda"], "temperature": settings["temperature"], "divergence": settings["divergence"],
            "correction": settings["correction"], "other_exits": settings["other_exits"],
            "recalibration_loss": settings["recalibration_loss"],
        })
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        # allow_unused: with other_exits="none" exit 0 is in neither graph.
        grads = torch.autograd.grad(loss, exit_logits, allow_unused=True, materialize_grads=True)
        expected_grads = torch.autograd.grad(expected, exit_logits, allow_unused=True, materialize_grads=True)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-6)
        assert parts["recalibrated_fraction"].item() == pytest.approx(0.4 if recalibrate is not None else 0.0)

    def test_source_gets_no_gradient_from_the_main_term(self):
        torch.manual_seed(0)
        source = torch.randn(4, 3, requires_grad=True)
        main = torch.randn(4, 3, requires_grad=True)
        labels = source.detach().argmax(-1)  # the source is right everywhere: no correction term
        loss, _ = self_kd_loss([source, main], labels, 0, lmbda=1.0)
        (grad,) = torch.autograd.grad(loss, [source])
        (ce_grad,) = torch.autograd.grad(F.cross_entropy(source, labels), [source])
        torch.testing.assert_close(grad, ce_grad)

    def test_num_items_in_batch(self):
        torch.manual_seed(0)
        logits = [torch.randn(4, 2) for _ in range(3)]
        labels = torch.tensor([0, 1, 1, -100])
        mean, _ = self_kd_loss(logits, labels, 1)
        summed, _ = self_kd_loss(logits, labels, 1, num_items_in_batch=6)
        torch.testing.assert_close(summed, mean * 3 / 6)

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"source_exit": 2}, "source_exit must be a non-final exit index in [0, 2), got 2"),
            ({"source_exit": -1}, "got -1"),
            ({"lmbda": 1.5}, "lmbda must be in [0.0, 1.0], got 1.5"),
            ({"source_correction": "all"}, "source_correction must be one of"),
            ({"recalibrate": torch.ones(3, dtype=torch.bool)}, "recalibrate must have shape (2,)"),
        ],
    )
    def test_bad_input(self, kwargs, message):
        arguments = {"exit_logits": [torch.zeros(2, 2)] * 3, "labels": torch.tensor([0, 1]), "source_exit": 0}
        arguments.update(kwargs)
        with pytest.raises(ValueError) as err:
            self_kd_loss(**arguments)
        assert message in str(err.value)

    def test_one_exit_is_an_error(self):
        with pytest.raises(ValueError, match="needs at least 2 exits"):
            self_kd_loss([torch.zeros(2, 2)], torch.tensor([0, 1]), 0)
