import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from transformers import AutoModelForSequenceClassification

from hf_kd import calibrate_temperature, fit_temperature, fold_temperature
from hf_kd.calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    find_classification_head,
    fit_temperature_to_distributions,
)
from hf_kd.evaluation import compute_logits

from .testing_utils import expressive_bert, labelled_by_model, tiny_bert, tiny_dataset, tiny_gpt2


def synthetic(n=20000, k=3, true_temperature=2.5, scale=3.0, seed=0):
    """Logits and labels drawn from softmax(z / T_true): the NLL-optimal temperature is T_true (up to noise)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    labels = torch.multinomial(torch.softmax(logits / true_temperature, dim=1), 1, generator=g).squeeze(1)
    return logits, labels


class TestFitTemperature:
    def test_recovers_the_generating_temperature(self):
        logits, labels = synthetic()
        assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)

    def test_matches_a_bounded_scalar_search(self):
        logits, labels = synthetic(n=3000, true_temperature=0.6, seed=1)
        fitted = fit_temperature(logits, labels)
        reference = minimize_scalar(
            lambda log_t: F.cross_entropy(logits / math.exp(log_t), labels).item(),
            bounds=(-4, 4), method="bounded", options={"xatol": 1e-10},
        )
        assert fitted == pytest.approx(math.exp(reference.x), rel=1e-4)

    def test_accepts_numpy_and_float32(self):
        logits, labels = synthetic(n=2000)
        from_numpy = fit_temperature(logits.float().numpy(), labels.numpy())
        assert from_numpy == pytest.approx(fit_temperature(logits, labels), rel=1e-4)

    def test_uninformative_logits_hit_the_bound_with_a_warning(self):
        # Labels independent of confident logits: the NLL keeps falling as T grows, towards uniform predictions.
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(500, 3, generator=g) * 4
        labels = torch.randint(0, 3, (500,), generator=g)
        with pytest.warns(UserWarning, match="hit the bound"):
            temperature = fit_temperature(logits, labels)
        assert temperature == pytest.approx(MAX_TEMPERATURE)

    def test_separable_data_stays_finite(self):
        logits = torch.tensor([[1.0, -1.0], [-1.0, 1.0]] * 8)
        temperature = fit_temperature(logits, torch.tensor([0, 1] * 8))
        assert MIN_TEMPERATURE <= temperature < 1.0

    @pytest.mark.parametrize(
        "logits, labels, message",
        [
            (torch.zeros(4), torch.zeros(4, dtype=torch.long), "shape (N, K)"),
            (torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), "K >= 2"),
            (torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), "finite"),
            (torch.zeros(3, 2), torch.tensor([0, 1]), "labels must have shape (3,)"),
            (torch.zeros(2, 2), torch.tensor([0, 2]), "labels must be in [0, 2), got 2 at index 1"),
            (torch.zeros(2, 2), torch.tensor([0.0, 1.0]), "integer class indices"),
            (torch.zeros(2, 2, dtype=torch.long), torch.tensor([0, 1]), "floating point"),
        ],
    )
    def test_bad_inputs_are_named(self, logits, labels, message):
        with pytest.raises(ValueError) as error:
            fit_temperature(logits, labels)
        assert message in str(error.value)

    @pytest.mark.parametrize("kwargs, message", [({"max_iter": 0}, "max_iter"), ({"init_temperature": -1.0}, "-1.0")])
    def test_bad_options_are_named(self, kwargs, message):
        logits, labels = synthetic(n=10)
        with pytest.raises(ValueError, match="must be") as error:
            fit_temperature(logits, labels, **kwargs)
        assert message in str(error.value)


class TestFitToDistributions:
    def test_recovers_the_temperature_of_soft_targets(self):
        logits, _ = synthetic(n=2000, k=3)
        targets = torch.softmax(logits / 1.7, dim=1)
        assert fit_temperature_to_distributions(logits, targets) == pytest.approx(1.7, rel=1e-4)

    def test_zero_shares_are_allowed(self):
        logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
        targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.4]])
        temperature = fit_temperature_to_distributions(logits, targets)
        assert 0 < temperature < 100 and math.isfinite(temperature)

    @pytest.mark.parametrize(
        "targets, message",
        [
            (torch.tensor([[0.5, 0.4]]), "row 0 sums to 0.9"),
            (torch.tensor([[1.2, -0.2]]), "non-negative"),
            (torch.tensor([[0.5, 0.5, 0.0]]), "shape (1, 2)"),
        ],
    )
    def test_bad_targets_are_named(self, targets, message):
        with pytest.raises(ValueError) as error:
            fit_temperature_to_distributions(torch.zeros(1, 2), targets)
        assert message in str(error.value)


class CountForwards:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls += 1


class TestCalibrateTemperature:
    def test_one_batched_pass_and_metrics_before_after(self):
        model = expressive_bert()
        dataset = labelled_by_model(model, 40, 2.0, seed=0)
        counter = CountForwards(model)
        result = calibrate_temperature(model, dataset, batch_size=16, calibrated_on="tiny/validation")
        assert counter.calls == 3  # ceil(40 / 16): one pass, however many L-BFGS iterations ran
        logits = compute_logits(model, dataset).double()
        labels = torch.tensor(dataset["label"])
        assert result.temperature == pytest.approx(fit_temperature(logits, labels), rel=1e-6)
        assert result.temperature > 1  # labels drawn at T = 2: the model is over-confident
        assert result.after["nll"] < result.before["nll"]
        assert result.after["accuracy"] == result.before["accuracy"]
        assert result.before["nll"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-7)
        assert (result.num_examples, result.n_bins, result.calibrated_on) == (40, 15, "tiny/validation")
        assert result.to_dict()["temperature"] == result.temperature

    def test_model_is_not_modified(self):
        model = expressive_bert()
        dataset = labelled_by_model(model, 16, 2.0, seed=0)
        state = copy.deepcopy(model.state_dict())
        model.train()
        calibrate_temperature(model, dataset)
        assert model.training  # training mode restored
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert getattr(model.config, "hf_kd", None) is None

    def test_no_labels_is_a_clear_error_before_any_forward(self):
        model = tiny_bert()
        counter = CountForwards(model)
        dataset = tiny_dataset(8).remove_columns("label")
        with pytest.raises(ValueError, match="needs gold labels, but the dataset has no 'label' column"):
            calibrate_temperature(model, dataset)
        assert counter.calls == 0

    def test_missing_label_values_are_named(self):
        dataset = tiny_dataset(4).cast_column("label", tiny_dataset(4).features["label"])
        rows = dataset.to_dict()
        rows["label"][2] = None
        with pytest.raises(ValueError, match=r"None\) in 1 row\(s\), e.g. row 2"):
            calibrate_temperature(tiny_bert(), type(dataset).from_dict(rows))

    def test_kl_objective_fits_human_distributions(self):
        model, dataset = expressive_bert(), tiny_dataset(48)
        logits = compute_logits(model, dataset)
        dataset = dataset.add_column("human_label_dist", torch.softmax(logits.double() / 3.0, dim=1).tolist())
        result = calibrate_temperature(model, dataset, objective="kl")
        assert result.objective == "kl"
        assert result.temperature == pytest.approx(3.0, rel=1e-4)
        assert result.after["kl"] < 1e-8 < result.before["kl"]
        assert result.after["accuracy"] == result.before["accuracy"]

    def test_kl_objective_needs_distributions(self):
        with pytest.raises(ValueError, match="no 'human_label_dist' column"):
            calibrate_temperature(tiny_bert(), tiny_dataset(8), objective="kl")

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"objective": "ece"}, "objective must be one of ('nll', 'kl'), got 'ece'"),
            ({"n_bins": 0}, "n_bins must be an int >= 1, got 0"),
            ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ],
    )
    def test_bad_options_are_named(self, kwargs, message):
        with pytest.raises(ValueError) as error:
            calibrate_temperature(tiny_bert(), tiny_dataset(8), **kwargs)
        assert message in str(error.value)

    def test_untokenized_or_wrong_type_data(self):
        import datasets

        with pytest.raises(ValueError, match="no 'input_ids' column"):
            calibrate_temperature(tiny_bert(), datasets.Dataset.from_dict({"text": ["a"], "label": [0]}))
        with pytest.raises(TypeError, match="pass one split"):
            calibrate_temperature(tiny_bert(), datasets.DatasetDict({"validation": tiny_dataset(4)}))


def make_inputs(n=6, seed=3):
    batch = tiny_dataset(n, seed=seed, equal_lengths=True)
    return {"input_ids": torch.tensor(batch["input_ids"]), "attention_mask": torch.tensor(batch["attention_mask"])}


def tiny_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=37, max_position_embeddings=80, pad_token_id=1, num_labels=3)
    return RobertaForSequenceClassification(config).eval()


class TestFoldTemperature:
    @pytest.mark.parametrize(
        "build, head",
        [(lambda: tiny_bert().eval(), "classifier"), (tiny_roberta, "classifier.out_proj"), (tiny_gpt2, "score")],
    )
    def test_folded_probabilities_equal_softmax_of_scaled_logits(self, build, head):
        model, inputs = build(), make_inputs()
        original = copy.deepcopy(model)
        fold_temperature(model, 2.7, calibrated_on="tiny/validation")
        with torch.no_grad():
            expected = torch.softmax(original(**inputs).logits / 2.7, dim=-1)
            folded = torch.softmax(model(**inputs).logits, dim=-1)
        torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-6)
        assert model.config.hf_kd == {"temperature": 2.7, "calibrated_on": "tiny/validation",
                                      "method": "temperature_scaling", "folded_into": head}
        assert find_classification_head(model)[0] == head

    def test_round_trip_through_plain_transformers(self, tmp_path):
        model, inputs = expressive_bert().eval(), make_inputs()
        with torch.no_grad():
            expected = torch.softmax(model(**inputs).logits / 1.9, dim=-1)
        fold_temperature(model, 1.9, calibrated_on="x")
        model.save_pretrained(tmp_path)
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            probs = torch.softmax(loaded(**inputs).logits, dim=-1)
        torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
        assert loaded.config.hf_kd["temperature"] == 1.9

    def test_refuses_to_fold_twice_unless_asked(self):
        model, inputs = tiny_bert().eval(), make_inputs()
        with torch.no_grad():
            original = model(**inputs).logits
        fold_temperature(model, 2.0)
        weights = model.classifier.weight.clone()
        with pytest.raises(ValueError, match="already calibrated: config.hf_kd records temperature 2.0"):
            fold_temperature(model, 3.0)
        assert torch.equal(model.classifier.weight, weights)  # nothing changed
        fold_temperature(model, 3.0, allow_refold=True)
        assert model.config.hf_kd["temperature"] == pytest.approx(6.0)
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, original / 6.0, rtol=1e-5, atol=1e-6)

    def test_other_hf_kd_config_keys_are_kept(self):
        model = tiny_bert()
        model.config.hf_kd = {"distilled_from": "teacher"}
        fold_temperature(model, 1.5)
        assert model.config.hf_kd["distilled_from"] == "teacher"

    @pytest.mark.parametrize("temperature", [0, -1.5, float("nan"), float("inf"), "2", True, None])
    def test_bad_temperatures_are_named(self, temperature):
        model = tiny_bert()
        weights = model.classifier.weight.clone()
        with pytest.raises(ValueError, match="temperature must be a finite number > 0, got") as error:
            fold_temperature(model, temperature)
        assert repr(temperature) in str(error.value)
        assert torch.equal(model.classifier.weight, weights)

    def test_calibration_result_is_accepted_as_the_readme_chains_them(self):
        # fold_temperature(model, calibrate_temperature(model, validation)) used to fail: "temperature must be a
        # finite number > 0, got CalibrationResult(...)".
        model, inputs = expressive_bert().eval(), make_inputs()
        result = calibrate_temperature(model, labelled_by_model(model, 24, 2.0, seed=1), calibrated_on="tiny/val")
        with torch.no_grad():
            expected = model(**inputs).logits / result.temperature
        fold_temperature(model, result)
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-6)
        assert model.config.hf_kd["temperature"] == result.temperature
        assert model.config.hf_kd["calibrated_on"] == "tiny/val"  # taken from the result unless given

    def test_tensor_temperature_is_accepted(self):
        model = tiny_bert()
        fold_temperature(model, torch.tensor(2.0))
        assert model.config.hf_kd["temperature"] == 2.0

    def test_no_classification_layer(self):
        from transformers import BertModel

        with pytest.raises(ValueError, match="has no config.num_labels"):
            fold_temperature(torch.nn.Linear(3, 2), 2.0)
        encoder = BertModel(tiny_bert().config)
        with pytest.raises(ValueError, match="Could not find the final classification layer of BertModel"):
            fold_temperature(encoder, 2.0)

    def test_head_with_the_wrong_width_is_rejected(self):
        model = tiny_bert(num_labels=2)
        model.classifier = torch.nn.Linear(32, 5)
        with pytest.raises(ValueError, match=r"classifier: Linear\(out_features=5\)"):
            fold_temperature(model, 2.0)


def test_calibration_fitted_on_one_split_improves_another():
    """The whole path: fit on validation, fold, and the test split's NLL goes down, with T near the truth."""
    model = expressive_bert()
    validation = labelled_by_model(model, 300, 2.0, seed=1)
    test = labelled_by_model(model, 300, 2.0, seed=2)
    labels = torch.tensor(test["label"])
    before = F.cross_entropy(compute_logits(model, test).double(), labels).item()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a sane fit raises no bound warning
        result = calibrate_temperature(model, validation)
    assert 1.4 < result.temperature < 2.8
    fold_temperature(model, result.temperature)
    after = F.cross_entropy(compute_logits(model, test).double(), labels).item()
    assert after < before
