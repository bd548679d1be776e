"""The per-exit Laplace inside both multi-exit models (`ExitLaplaceMixin` of hf_kd/modeling/exit_laplace.py): fit
from dataloaders, per-exit probabilities, `predict_with_exits(link_approx=...)` against the offline simulation,
save/load (Auto classes, trust_remote_code) and bad input. Apart from tests/test_exit_laplace.py, whose autouse
fixture runs every test in float64: these run the models in their default float32."""

import json
import re

import pytest
import torch
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from hf_kd.early_exit import budget_exit_fractions, fit_budget_thresholds, model_internal_ensemble, simulate_exits
from hf_kd.modeling.exit_laplace import EXIT_LAPLACE_FILENAME, MultiExitLaplace

from .testing_utils import images, text_inputs_for, tiny_cnn, tiny_eval_multi_exit

NUM_SAMPLES = 8  # MC samples: a few, to keep the tests fast


def make(kind):
    """(model, one batch of inputs, a dataloader of labelled batches) for a tiny model of each kind."""
    if kind == "cnn":
        model = tiny_cnn(sharpen=30.0)
        loader = [{"pixel_values": images(seed=s), "labels": torch.randint(0, 10, (12,))} for s in range(3)]
        return model, {"pixel_values": images(seed=9)}, loader
    model = tiny_eval_multi_exit(kind, sharpen=40.0)
    input_ids, attention_mask = text_inputs_for(kind)
    g = torch.Generator().manual_seed(0)
    loader = [
        {"input_ids": input_ids.roll(s, 0), "attention_mask": attention_mask.roll(s, 0),
         "labels": torch.randint(0, 3, (input_ids.shape[0],), generator=g)}
        for s in range(3)
    ]
    return model, {"input_ids": input_ids, "attention_mask": attention_mask}, loader


def fit(model, loader, **kwargs):
    return model.fit_exit_laplace(loader, loader, num_samples=NUM_SAMPLES, temperatures=(0.5, 1.0, 2.0),
                                  prior_variances=(0.5, 2.0), **kwargs)


@pytest.mark.parametrize("kind", ["bert", "cnn"])
def test_fit_and_per_exit_probabilities(kind):
    model, inputs, loader = make(kind)
    features, labels = model.collect_exit_features(loader)
    assert len(features) == len(model.config.exit_layers) and labels.shape == (features[0].shape[0],)
    reference = MultiExitLaplace.from_model(model, num_samples=NUM_SAMPLES).fit(features)

    laplace = fit(model, loader)
    assert model.exit_laplace is laplace and laplace.selection["num_examples"] == labels.shape[0]
    for ours, ref in zip(laplace.exits, reference.exits):  # the streamed fit equals the fit on cached features
        for a, b in zip(ours.kron_factors, ref.kron_factors):
            torch.testing.assert_close(a, b)

    # Per-exit probabilities: softmax of forward's exit logits, or the Laplace predictive of the exits' features.
    full = model(**inputs)
    plain = model.predict_exit_probs(**inputs)
    torch.testing.assert_close(plain, torch.stack(full.exit_logits).softmax(-1))
    features, _ = model.collect_exit_features([inputs])
    for link in ("mc", "probit"):
        probs = model.predict_exit_probs(**inputs, link_approx=link)
        torch.testing.assert_close(probs, laplace.predict(features, link))
        assert not torch.allclose(probs, plain)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))


@pytest.mark.parametrize("kind", ["bert", "cnn"])
@pytest.mark.parametrize("mie", [False, True])
@pytest.mark.parametrize("link", ["mc", "probit"])
def test_predict_with_exits_reads_the_laplace_predictive(kind, mie, link):
    model, inputs, loader = make(kind)
    fit(model, loader, mie=mie)
    probs = model.predict_exit_probs(**inputs, link_approx=link, mie=mie)  # (num_exits, B, K)
    thresholds = fit_budget_thresholds(probs.max(-1).values.T, budget_exit_fractions(12, len(probs)))
    thresholds = [t - 1e-6 for t in thresholds]  # off the batch's own confidences (float noise)
    expected = simulate_exits(probs, thresholds)
    pred = model.predict_with_exits(**inputs, policy="budget", thresholds=thresholds, mie=mie, link_approx=link)
    assert torch.equal(pred.exit_index, expected.exit_index)
    torch.testing.assert_close(pred.probs, expected.probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(pred.logits.softmax(-1), pred.probs, atol=1e-5, rtol=0)
    # Nobody exits early: every row runs every exit, and the Laplace predictive adds its FLOPs at each.
    never = [2.0] * (len(probs) - 1)
    plain = model.predict_with_exits(**inputs, policy="budget", thresholds=never, mie=mie)
    with_laplace = model.predict_with_exits(**inputs, policy="budget", thresholds=never, mie=mie, link_approx=link)
    batch = probs.shape[1]
    assert with_laplace.flops == pytest.approx(plain.flops + batch * sum(model.exit_laplace.predictive_flops(link)))


@pytest.mark.parametrize("kind", ["bert", "cnn"])
def test_save_load_auto_classes_and_remote_code(kind, tmp_path):
    model, inputs, loader = make(kind)
    fit(model, loader, mie=True)
    expected = model.predict_exit_probs(**inputs, link_approx="mc")
    model.save_pretrained(tmp_path)
    assert (tmp_path / EXIT_LAPLACE_FILENAME).is_file()

    auto = AutoModelForImageClassification if kind == "cnn" else AutoModelForSequenceClassification
    loaded = auto.from_pretrained(tmp_path).eval()
    assert loaded.exit_laplace is not None and loaded.exit_laplace.selection == model.exit_laplace.selection
    assert torch.equal(loaded.predict_exit_probs(**inputs, link_approx="mc"), expected)

    # The copied code (exit_laplace.py included) imports no hf_kd: the Laplace predictive works under
    # trust_remote_code where hf_kd is not installed.
    source = (tmp_path / "exit_laplace.py").read_text()
    assert not re.search(r"^\s*(from|import)\s+hf_kd", source, flags=re.MULTILINE)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    remote_class = get_class_from_dynamic_module(auto_map[auto.__name__], tmp_path)
    assert remote_class is not type(model)
    remote = remote_class.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(remote.predict_exit_probs(**inputs, link_approx="mc"), expected)
    pred = remote.predict_with_exits(**inputs, policy="max_prob", threshold=0.9, link_approx="probit")
    reference = model.predict_with_exits(**inputs, policy="max_prob", threshold=0.9, link_approx="probit")
    torch.testing.assert_close(pred.probs, reference.probs)

    # A fit that does not match the weights in the folder is left out with a warning; the model still loads.
    with torch.no_grad():
        weights = {k: v.clone() for k, v in loaded.state_dict().items()}
        first = next(k for k in weights if k.endswith("exits.0.classifier.weight"))
        weights[first] += 1.0
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="was not loaded: exit 0's classifier changed"):
        assert auto.from_pretrained(tmp_path).exit_laplace is None
    model.save_pretrained(tmp_path)

    # Saving a model without a fit into the folder removes the stale file of the earlier fit.
    loaded.exit_laplace = None
    loaded.save_pretrained(tmp_path)
    assert not (tmp_path / EXIT_LAPLACE_FILENAME).exists()
    assert auto.from_pretrained(tmp_path).exit_laplace is None


@pytest.mark.parametrize("kind", ["bert", "cnn"])
def test_laplace_prediction_without_or_with_stale_factors(kind, tmp_path):
    model, inputs, loader = make(kind)
    with pytest.raises(ValueError, match="has none: call model.fit_exit_laplace"):
        model.predict_exit_probs(**inputs, link_approx="mc")
    with pytest.raises(ValueError, match="has none: call model.fit_exit_laplace"):
        model.predict_with_exits(**inputs, policy="max_prob", threshold=0.5, link_approx="probit")
    model.predict_with_exits(**inputs, policy="max_prob", threshold=0.5)  # the softmax needs no fit
    fit(model, loader)
    with pytest.raises(ValueError, match="link_approx must be one of"):
        model.predict_exit_probs(**inputs, link_approx="laplace")
    with torch.no_grad():
        model.exits[0].classifier.weight.add_(0.5)  # training after the fit: the posterior is stale
    with pytest.raises(ValueError, match="exit 0's classifier changed.*refit"):
        model.predict_with_exits(**inputs, policy="max_prob", threshold=0.5, link_approx="mc")
    with pytest.warns(UserWarning, match="fit was not saved: exit 0's classifier changed"):
        model.save_pretrained(tmp_path)  # the model is saved, the stale fit is not
    assert not (tmp_path / EXIT_LAPLACE_FILENAME).exists() and (tmp_path / "config.json").is_file()
    with pytest.raises(ValueError, match="fitted MultiExitLaplace or None"):
        model.exit_laplace = MultiExitLaplace.from_model(model)  # not fitted
    with pytest.raises(ValueError, match="need `labels`"):
        model.fit_exit_laplace(loader, [{k: v for k, v in b.items() if k != "labels"} for b in loader])


def test_fit_without_validation_keeps_the_official_defaults():
    model, inputs, loader = make("cnn")
    laplace = model.fit_exit_laplace(loader, num_samples=NUM_SAMPLES)
    assert laplace.temperatures == [1.0] * 3 and laplace.prior_variances == [2.0] * 3 and laplace.selection is None
    # The MIE weights of the greedy search default to the model's FLOPs (here checked through the selection).
    laplace = fit(model, loader, mie=True)
    assert laplace.selection["mie"] is True
    assert model_internal_ensemble(model.predict_exit_probs(**inputs), model.exit_flops()).shape[0] == 3


# ------------------------------------------------------------------------------------------ trainer and model card


def test_trainer_fit_evaluate_save_and_card(tmp_path):
    from huggingface_hub import ModelCard
    from transformers import DataCollatorWithPadding

    from hf_kd import EarlyExitTrainer
    from hf_kd.metrics import expected_calibration_error, negative_log_likelihood
    from hf_kd.trainer.full_pass import plain_loader

    from .testing_utils import make_early_exit_args, tiny_dataset, tiny_multi_exit, tiny_tokenizer

    tokenizer = tiny_tokenizer(tmp_path)
    train, validation, test = tiny_dataset(32), tiny_dataset(16, seed=1), tiny_dataset(24, seed=2)
    trainer = EarlyExitTrainer(
        model=tiny_multi_exit(), args=make_early_exit_args(tmp_path, eval_strategy="no"), train_dataset=train,
        eval_dataset=validation, processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    laplace = trainer.fit_exit_laplace(mie=True, num_samples=NUM_SAMPLES, prior_variances=(0.5, 2.0))
    model = trainer.model
    assert model.exit_laplace is laplace and laplace.selection["num_examples"] == 16

    metrics = trainer.evaluate(test, metric_key_prefix="test")
    # The logged calibrated metrics are those of the model's own per-exit Laplace probabilities.
    loader = plain_loader(trainer, test, 8, "test")
    probs = [model.predict_exit_probs(b["input_ids"], b["attention_mask"], link_approx="mc") for b in loader]
    probs = torch.cat(probs, dim=1).numpy()
    labels = torch.tensor(test["label"]).numpy()
    for i, p in enumerate(probs):
        assert metrics[f"test_exit_{i}_laplace_accuracy"] == pytest.approx(float((p.argmax(1) == labels).mean()))
        assert metrics[f"test_exit_{i}_laplace_nll"] == pytest.approx(negative_log_likelihood(p, labels), rel=1e-5)
        assert metrics[f"test_exit_{i}_laplace_ece"] == pytest.approx(expected_calibration_error(p, labels, 15),
                                                                      abs=1e-6)
        assert f"test_exit_{i}_nll" in metrics

    latest = trainer.latest_eval_metrics()
    assert list(latest) == ["test"] and "exit_2_laplace_ece" in latest["test"] and "exit_0_nll" in latest["test"]
    trainer.save_model()
    out = tmp_path / "out"
    assert (out / EXIT_LAPLACE_FILENAME).is_file()
    card = ModelCard.load(out / "README.md")
    assert "### Per exit" in card.text and "ECE (15 bins), Laplace" in card.text and "2302.06359" in card.text
    assert "| exit_laplace |" not in card.text  # described in the per-exit section, not as a raw dict
    types = {r.metric_type for r in card.data.eval_results}
    assert {"accuracy", "ece", "exit_0_laplace_ece", "exit_2_laplace_nll"} <= types
    assert "exit_0_ece" not in types  # uncalibrated per-exit metrics stay in the table only
    assert card.data.hf_kd["hyperparameters"]["exit_laplace"]["selected_for_mie"] is True
