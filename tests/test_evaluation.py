import json

import datasets
import numpy as np
import pytest
import torch

from hf_kd import UncertaintyReport, evaluate_uncertainty, fold_temperature
from hf_kd.evaluation import compute_logits
from hf_kd.metrics import (
    brier_score,
    confidence_preservation,
    expected_calibration_error,
    human_distribution_divergence,
    maximum_calibration_error,
    negative_log_likelihood,
    predictive_entropy,
    reliability_bins,
    softmax,
)
from hf_kd.plots import plot_confidence_histogram, plot_reliability_diagram

from .testing_utils import tiny_bert, tiny_dataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def row_by_row_logits(model, dataset):
    """Reference: one unpadded forward per row, in dataset order."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([ids])).logits for ids in dataset["input_ids"]])


def reference_metrics(probs, labels, n_bins=15):
    return {
        "accuracy": float(np.mean(probs.argmax(1) == labels)),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "mce": maximum_calibration_error(probs, labels, n_bins),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        "entropy": predictive_entropy(probs),
    }


class TestComputeLogits:
    def test_padding_and_order_match_row_by_row(self):
        model, dataset = tiny_bert(num_labels=3), tiny_dataset(23, num_labels=3, seq_len=12)
        torch.testing.assert_close(compute_logits(model, dataset, batch_size=5), row_by_row_logits(model, dataset),
                                   rtol=1e-4, atol=1e-5)

    def test_without_attention_mask_column(self):
        model, dataset = tiny_bert(), tiny_dataset(9, seq_len=10)
        reference = row_by_row_logits(model, dataset)
        logits = compute_logits(model, dataset.remove_columns("attention_mask"), batch_size=4)
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)

    def test_restores_training_mode(self):
        model = tiny_bert(dropout=0.5)
        model.train()
        first = compute_logits(model, tiny_dataset(8))
        assert model.training
        torch.testing.assert_close(first, compute_logits(model, tiny_dataset(8)))  # dropout was off


class TestEvaluateUncertainty:
    def test_metrics_match_hf_kd_metrics(self):
        model, dataset = tiny_bert(num_labels=3), tiny_dataset(30, num_labels=3)
        report = evaluate_uncertainty(model, dataset, n_bins=10, batch_size=7, split="test")
        probs = softmax(row_by_row_logits(model, dataset))
        labels = np.array(dataset["label"])
        expected = reference_metrics(probs, labels, n_bins=10)
        assert set(report.metrics) == set(expected)
        for key, value in expected.items():
            assert report.metrics[key] == pytest.approx(value, abs=1e-6), key
        assert (report.n_bins, report.num_examples, report.split, report.teacher_metrics) == (10, 30, "test", None)
        assert report.reliability["model"]["count"] == reliability_bins(probs, labels, 10)["count"].tolist()
        assert report.calibration_temperature is None

    def test_teacher_gives_sigma_and_side_by_side_metrics(self):
        model, teacher, dataset = tiny_bert(seed=0), tiny_bert(seed=5), tiny_dataset(40)
        report = evaluate_uncertainty(model, dataset, teacher=teacher)
        labels = np.array(dataset["label"])
        student_probs = softmax(row_by_row_logits(model, dataset))
        teacher_probs = softmax(row_by_row_logits(teacher, dataset))
        assert report.metrics["sigma"] == pytest.approx(
            confidence_preservation(teacher_probs, student_probs, labels), abs=1e-6
        )
        for key, value in reference_metrics(teacher_probs, labels).items():
            assert report.teacher_metrics[key] == pytest.approx(value, abs=1e-6), key
        assert set(report.reliability) == {"model", "teacher"}
        # A precomputed teacher_logits column gives the same report without a teacher model.
        column = dataset.add_column("teacher_logits", row_by_row_logits(teacher, dataset).tolist())
        cached = evaluate_uncertainty(model, column)
        assert cached.metrics["sigma"] == pytest.approx(report.metrics["sigma"], abs=1e-6)
        assert cached.teacher_metrics["ece"] == pytest.approx(report.teacher_metrics["ece"], abs=1e-6)

    def test_human_label_distributions_give_kl_and_js(self):
        model, dataset = tiny_bert(), tiny_dataset(20)
        human = torch.softmax(torch.randn(20, 2, generator=torch.Generator().manual_seed(0)), dim=1)
        report = evaluate_uncertainty(model, dataset.add_column("human_label_dist", human.tolist()))
        expected = human_distribution_divergence(human, softmax(row_by_row_logits(model, dataset)))
        assert report.metrics["kl"] == pytest.approx(expected["kl"], abs=1e-6)
        assert report.metrics["js_distance"] == pytest.approx(expected["js_distance"], abs=1e-6)

    def test_calibrated_model_reports_its_temperature(self):
        model, dataset = tiny_bert(), tiny_dataset(16)
        logits = compute_logits(model, dataset)
        fold_temperature(model, 0.5, calibrated_on="x")
        report = evaluate_uncertainty(model, dataset)
        expected = UncertaintyReport.from_logits(logits / 0.5, dataset["label"])
        assert report.calibration_temperature == 0.5
        for key, value in expected.metrics.items():
            assert report.metrics[key] == pytest.approx(value, abs=1e-5), key

    def test_bad_inputs_are_clear_errors(self):
        model, dataset = tiny_bert(), tiny_dataset(8)
        with pytest.raises(ValueError, match="evaluate_uncertainty needs gold labels.*'label'"):
            evaluate_uncertainty(model, dataset.remove_columns("label"))
        with pytest.raises(ValueError, match="no 'target' column"):
            evaluate_uncertainty(model, dataset, label_column="target")
        with pytest.raises(TypeError, match="pass one split"):
            evaluate_uncertainty(model, datasets.DatasetDict({"test": dataset}))
        with pytest.raises(TypeError, match="must be a datasets.Dataset, got list"):
            evaluate_uncertainty(model, [{"input_ids": [2, 3]}])
        with pytest.raises(ValueError, match="is empty"):
            evaluate_uncertainty(model, dataset.select([]))
        with pytest.raises(ValueError, match="n_bins must be an int >= 1, got 0"):
            evaluate_uncertainty(model, dataset, n_bins=0)
        with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
            evaluate_uncertainty(model, dataset.map(lambda row: {"label": 5}))
        with pytest.raises(ValueError, match=r"shape \(8, 2\), got \(8, 3\)"):
            evaluate_uncertainty(model, dataset.add_column("human_label_dist", [[0.2, 0.3, 0.5]] * 8))

    def test_teacher_with_another_label_space_or_vocabulary(self):
        model, dataset = tiny_bert(), tiny_dataset(8)
        with pytest.raises(ValueError, match="label"):
            evaluate_uncertainty(model, dataset, teacher=tiny_bert(num_labels=3))
        with pytest.raises(ValueError, match="vocabulary"):
            evaluate_uncertainty(model, dataset, teacher=tiny_bert(vocab_size=120))


class TestLabelNames:
    def test_dataset_labels_in_another_order_than_the_teachers_are_refused(self):
        names = {"id2label": {0: "rotten", 1: "fresh"}, "label2id": {"rotten": 0, "fresh": 1}}
        dataset = tiny_dataset(12).cast_column("label", datasets.ClassLabel(names=["fresh", "rotten"]))
        with pytest.raises(ValueError, match=r"The dataset and the teacher order their labels differently.*"
                           r"`dataset = hf_kd.data.align_labels\(dataset, teacher.config.label2id\)`"):
            evaluate_uncertainty(tiny_bert(), dataset, teacher=tiny_bert(seed=4, **names))
        with pytest.raises(ValueError, match="The dataset and the model order their labels differently"):
            evaluate_uncertainty(tiny_bert(**names), dataset)

    def test_teacher_accuracy_zero_warns(self):
        logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
        with pytest.warns(UserWarning, match="teacher classifies none of the 3 examples right"):
            UncertaintyReport.from_logits(logits, [1, 0, 1], teacher_logits=logits)


class TestReport:
    def make_report(self):
        model, teacher, dataset = tiny_bert(), tiny_bert(seed=4), tiny_dataset(24)
        return evaluate_uncertainty(model, dataset, teacher=teacher, split="test", n_bins=15)

    def test_to_dict_is_strict_json_and_round_trips(self):
        report = self.make_report()
        text = json.dumps(report.to_dict(), allow_nan=False)  # empty bins and an undefined sigma become null
        again = UncertaintyReport.from_dict(json.loads(text))
        assert again.metrics.keys() == report.metrics.keys()
        for key, value in report.metrics.items():
            assert again.metrics[key] == pytest.approx(value, nan_ok=True)
        assert again.reliability["model"]["count"] == report.reliability["model"]["count"]
        assert again.flat_metrics()["ece_bins"] == 15.0
        assert again.flat_metrics()["teacher_ece"] == report.teacher_metrics["ece"]

    def test_save_writes_json_and_two_pngs(self, tmp_path):
        report = self.make_report()
        paths = report.save(tmp_path / "uncertainty" / "test")
        assert sorted(p.name for p in (tmp_path / "uncertainty" / "test").iterdir()) == [
            "confidence_histogram.png", "reliability_diagram.png", "report.json"]
        for key in ("reliability_diagram", "confidence_histogram"):
            data = paths[key].read_bytes()
            assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
        loaded = UncertaintyReport.load(tmp_path / "uncertainty" / "test")
        assert loaded.metrics["ece"] == report.metrics["ece"]
        assert loaded.split == "test"

    def test_repr_is_the_metrics_table_not_the_bins(self):
        # print(report) used to dump every reliability bin (counts, confidences, accuracies, n_bins of each).
        report = self.make_report()
        text = repr(report)
        lines = text.splitlines()
        assert lines[0].startswith("UncertaintyReport(") and "split='test', 24 examples, n_bins=15" in lines[0]
        assert len(lines) == 1 + 1 + len(report.metrics) + 1  # header, column names, one row a metric, pointer
        assert f"{report.metrics['ece']:.4f}" in text and f"{report.teacher_metrics['ece']:.4f}" in text
        assert "count" not in text and "report.reliability" in text
        assert str(report) == text

    def test_from_dict_rejects_other_json(self):
        with pytest.raises(ValueError, match=r"missing key\(s\) \['metrics', 'n_bins'"):
            UncertaintyReport.from_dict({"num_examples": 3, "reliability": {}})

    def test_from_logits_checks_teacher_shape(self):
        with pytest.raises(ValueError, match="teacher_logits must have the shape of logits"):
            UncertaintyReport.from_logits(torch.zeros(4, 2), [0, 1, 0, 1], teacher_logits=torch.zeros(4, 3))


class TestPlots:
    def test_plots_from_json_bins_with_empty_bins(self, tmp_path):
        probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
        bins = {k: [None if isinstance(v, float) and np.isnan(v) else v for v in np.asarray(values).tolist()]
                for k, values in reliability_bins(probs, np.array([0, 1, 1]), 10).items()}
        assert bins["accuracy"].count(None) == 7  # 3 examples in 10 bins
        for plot in (plot_reliability_diagram, plot_confidence_histogram):
            path = plot({"a": bins, "b": bins}, tmp_path / f"{plot.__name__}.png")
            assert path.read_bytes().startswith(PNG_SIGNATURE)

    @pytest.mark.parametrize(
        "panels, message",
        [({}, "non-empty mapping"), ({"a": {"count": [1]}}, "lacks bin statistics"),
         ({"a": {"bin_lower": [0], "bin_upper": [1], "count": [0], "accuracy": [0], "confidence": [0]}},
          "at least one example")],
    )
    def test_bad_panels(self, tmp_path, panels, message):
        with pytest.raises(ValueError, match=message):
            plot_reliability_diagram(panels, tmp_path / "x.png")
