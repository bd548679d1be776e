"""Confidence scoring of the exits of an early-exit causal LM (issue 18): the per-exit calibration report before and
after temperature scaling, and distilling the exits from a temperature-calibrated final exit
(`EarlyExitConfig.final_exit_temperature`)."""

import json

import datasets
import numpy as np
import pytest
import torch
from transformers import HfArgumentParser

from hf_kd import EarlyExitConfig, EarlyExitTrainer, MultiExitForCausalLM, calibrate_exit_temperatures
from hf_kd.calibration import fit_exit_temperature
from hf_kd.metrics import (
    brier_score,
    exit_calibration_report,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
    token_calibration_metrics,
    token_calibration_statistics,
)

from .testing_utils import lm_dataset, pad_collator, tiny_llama, tiny_multi_exit, tiny_run_args


def lm_args(tmp_path, **kwargs):
    defaults = dict(per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-2,
                    distill_from="final_exit")
    defaults.update(kwargs)
    return tiny_run_args(EarlyExitConfig, tmp_path, **defaults)


def lm_trainer(tmp_path, model, args, eval_dataset="default", **kwargs):
    return EarlyExitTrainer(
        model=model, args=args, train_dataset=lm_dataset(8),
        eval_dataset=lm_dataset(6, seed=1) if eval_dataset == "default" else eval_dataset,
        data_collator=pad_collator, **kwargs,
    )


def sharp_llama(seed=0):
    backbone = tiny_llama(layers=4, seed=seed)
    with torch.no_grad():
        backbone.lm_head.weight.mul_(4.0)  # sharper (tied) head: confident exits
    return backbone


def multi_exit_llama(seed=0):
    return MultiExitForCausalLM.from_backbone(sharp_llama(seed), exit_layers=[1, 2], exit_adapter="low_rank",
                                              exit_adapter_rank=4)


def sampled_text(seed, n=8):
    """Text sampled at temperature 2 from the (seed 0) backbone: its final exit is overconfident on it, yet it is
    predictable, so the fitted temperature is an interior optimum (on random tokens it runs to the bound 100)."""
    torch.manual_seed(seed)
    prompts = torch.randint(3, 64, (n, 2))
    ids = sharp_llama().eval().generate(prompts, do_sample=True, temperature=2.0, top_k=0, max_new_tokens=8,
                                        min_new_tokens=8, pad_token_id=0)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": [[-100] * 2 + row[2:] for row in ids.tolist()]})


# ------------------------------------------------------------------------------------- the pure calibration report


def test_token_calibration_metrics_are_the_classifier_metrics_of_the_tokens():
    torch.manual_seed(0)
    logits, targets = 3 * torch.randn(40, 11), torch.randint(0, 11, (40,))
    for temperature in (1.0, 2.5):
        metrics, bins = token_calibration_metrics(token_calibration_statistics(logits, targets, temperature), 15)
        probs = torch.softmax(logits.double() / temperature, -1).numpy()
        assert metrics["token_ece"] == pytest.approx(expected_calibration_error(probs, targets.numpy(), 15))
        assert metrics["nll"] == pytest.approx(negative_log_likelihood(probs, targets.numpy()), rel=1e-12)
        assert metrics["brier"] == pytest.approx(brier_score(probs, targets.numpy()), rel=1e-12)  # full vocabulary
        assert metrics["token_accuracy"] == float((probs.argmax(-1) == targets.numpy()).mean())
        assert metrics["mean_confidence"] == pytest.approx(probs.max(-1).mean(), rel=1e-12)
        expected = reliability_bins(probs, targets.numpy(), 15)
        for key in expected:
            np.testing.assert_allclose(bins[key], expected[key], rtol=1e-12)
    # Chunks concatenated give the metrics of the whole.
    chunks = [token_calibration_statistics(logits[s : s + 7], targets[s : s + 7]) for s in range(0, 40, 7)]
    merged = {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}
    assert token_calibration_metrics(merged)[0] == token_calibration_metrics(
        token_calibration_statistics(logits, targets))[0]
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_calibration_statistics(logits, targets, 0.0)
    with pytest.raises(ValueError, match=r"logits must be \(num_tokens, vocab\)"):
        token_calibration_statistics(logits[None], targets)


def test_exit_calibration_report_hand_computed():
    # Two tokens, vocabulary 2, one exit: logits [0, log 3] -> p = (1/4, 3/4); token 0 right (target 1), token 1
    # wrong (target 0).
    logits = torch.tensor([[0.0, np.log(3.0)], [0.0, np.log(3.0)]])
    targets = torch.tensor([1, 0])
    (entry,) = exit_calibration_report([logits], targets, [1.0], n_bins=5)
    before = entry["before"]
    assert before["token_accuracy"] == 0.5 and before["mean_confidence"] == pytest.approx(0.75)
    assert before["token_ece"] == pytest.approx(0.25)  # one bin (0.6, 0.8]: |0.5 - 0.75|
    assert before["nll"] == pytest.approx((-np.log(0.75) - np.log(0.25)) / 2)
    # Brier: right token (1/4)^2 + (1/4)^2 = 1/8, wrong token (3/4)^2 + (3/4)^2 = 9/8.
    assert before["brier"] == pytest.approx((1 / 8 + 9 / 8) / 2)
    assert entry["after"] == before and list(entry["reliability_before"]["count"]) == [0, 0, 0, 2, 0]
    with pytest.raises(ValueError, match="got 1 exits but 2 temperatures"):
        exit_calibration_report([logits], targets, [1.0, 2.0])


def test_calibrate_exit_temperatures_equals_the_report_on_the_full_logits():
    model = multi_exit_llama().eval()
    data = sampled_text(seed=1)
    result = calibrate_exit_temperatures(model, data, chunk_size=5)
    batch = pad_collator([data[i] for i in range(len(data))])
    labels = batch.pop("labels")
    with torch.no_grad():
        exit_logits = model(**batch).exit_logits
    counted = labels[:, 1:] != -100
    report = exit_calibration_report([z[:, :-1][counted] for z in exit_logits], labels[:, 1:][counted],
                                     result.temperatures)
    for j, entry in enumerate(report):
        assert result.before[j] == pytest.approx(entry["before"], rel=1e-6)
        assert result.after[j] == pytest.approx(entry["after"], rel=1e-6)
        for when in ("before", "after"):
            assert result.reliability[j][when]["count"] == entry[f"reliability_{when}"]["count"].tolist()
    json.dumps(result.to_dict())  # JSON-ready: empty bins are None, not NaN
    assert fit_exit_temperature(model, data) == pytest.approx(result.temperatures[-1], rel=1e-9)
    assert fit_exit_temperature(model, data, exit_index=0) == pytest.approx(result.temperatures[0], rel=1e-9)
    with pytest.raises(ValueError, match=r"exit_index must index exit_layers=\[1, 2, 4\], got 3"):
        fit_exit_temperature(model, data, exit_index=3)


# ------------------------------------------------------------------------------------ final_exit_temperature


class TestFinalExitTemperatureConfig:
    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"final_exit_temperature": 0.0}, "final_exit_temperature must be a finite number > 0"),
            ({"final_exit_temperature": -2}, "final_exit_temperature must be a finite number > 0"),
            ({"final_exit_temperature": float("inf")}, "final_exit_temperature must be a finite number > 0"),
            ({"final_exit_temperature": "fit"}, "final_exit_temperature must be None, 'fitted' or a number > 0"),
            ({"final_exit_temperature": 2.0, "distill_from": "none"}, "needs distill_from='final_exit'"),
            ({"final_exit_temperature": "fitted", "distill_from": "teacher", "teacher_model_name_or_path": "t"},
             "needs distill_from='final_exit', got distill_from='teacher'"),
        ],
    )
    def test_bad_values_are_named(self, tmp_path, kwargs, message):
        kwargs = {"distill_from": "final_exit", **kwargs}
        with pytest.raises(ValueError) as err:
            EarlyExitConfig(output_dir=str(tmp_path), **kwargs)
        assert message in str(err.value)

    def test_values_and_command_line(self, tmp_path):
        assert EarlyExitConfig(output_dir=str(tmp_path)).final_exit_temperature is None
        args = EarlyExitConfig(output_dir=str(tmp_path), distill_from="final_exit", final_exit_temperature=2)
        assert args.final_exit_temperature == 2.0 and isinstance(args.final_exit_temperature, float)
        parser = HfArgumentParser(EarlyExitConfig)
        for flag, expected in (("1.5", 1.5), ("fitted", "fitted")):
            (args,) = parser.parse_args_into_dataclasses(
                ["--output_dir", str(tmp_path), "--distill_from", "final_exit", "--final_exit_temperature", flag]
            )
            assert args.final_exit_temperature == expected

    def test_fitted_needs_one_eval_set_and_a_causal_lm(self, tmp_path):
        args = lm_args(tmp_path, final_exit_temperature="fitted", eval_strategy="no")
        with pytest.raises(ValueError, match="needs distill_from|pass one eval_dataset"):
            lm_trainer(tmp_path, multi_exit_llama(), args, eval_dataset=None)
        with pytest.raises(ValueError, match="pass one eval_dataset"):
            lm_trainer(tmp_path, multi_exit_llama(), args, eval_dataset={"a": lm_dataset(4), "b": lm_dataset(4)})
        with pytest.raises(ValueError, match="for a classifier, fit it with hf_kd.calibrate_temperature"):
            EarlyExitTrainer(model=tiny_multi_exit(), args=args)


def lm_loss(tmp_path, final_exit_temperature, alpha=0.7):
    """The training loss of one fixed batch for a given final_exit_temperature (same model, same batch)."""
    model = multi_exit_llama()
    trainer = lm_trainer(tmp_path, model, lm_args(tmp_path, final_exit_temperature=final_exit_temperature,
                                                  alpha=alpha))
    batch = pad_collator([lm_dataset(8)[i] for i in range(4)])
    return trainer.compute_loss(model.train(), dict(batch)), model, batch


def test_final_exit_temperature_changes_the_exits_targets(tmp_path):
    raw, _, _ = lm_loss(tmp_path, None)
    one, _, _ = lm_loss(tmp_path, 1.0)
    two, model, batch = lm_loss(tmp_path, 2.0)
    assert torch.equal(raw, one)  # T = 1 is the raw final exit, bit for bit
    assert not torch.allclose(raw, two)
    # T = 2 is the raw loss with the final exit's logits halved in the targets of the earlier exits.
    labels = batch.pop("labels")
    exit_logits = model(**batch).exit_logits
    targets = exit_logits[-1].detach() / 2.0
    expected, _, _ = EarlyExitTrainer.early_exit_lm_loss(
        exit_logits, labels, [1 / 3] * 3, [targets, targets, None], temperature=2.0, alpha=0.7
    )
    torch.testing.assert_close(two, expected)


def test_fitted_final_exit_temperature_is_fitted_once_and_kept_on_resume(tmp_path):
    eval_data = sampled_text(seed=1)
    args = lm_args(tmp_path, final_exit_temperature="fitted", freeze_backbone=True, max_steps=2,
                   save_strategy="steps", save_steps=1, eval_strategy="no")
    model = multi_exit_llama()
    expected = fit_exit_temperature(model, eval_data, batch_size=4)
    trainer = lm_trainer(tmp_path, model, args, eval_dataset=eval_data)
    assert trainer.final_exit_temperature is None
    trainer.evaluate()  # an evaluation before training needs the targets: it fits the temperature
    assert trainer.final_exit_temperature == pytest.approx(expected, rel=1e-12)
    trainer.train()
    assert trainer.final_exit_temperature == pytest.approx(expected, rel=1e-12) and 1.2 < expected < 10
    assert any(h.get("final_exit_temperature") == trainer.final_exit_temperature for h in trainer.state.log_history)
    checkpoint = tmp_path / "out" / "checkpoint-1"
    stored = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    assert stored["FinalExitTemperatureCallback"]["attributes"]["temperature"] == trainer.final_exit_temperature
    assert "final_exit_temperature" in (checkpoint / "README.md").read_text()

    # Resumed with other eval text, on which a refit would give another temperature: the stored value is kept.
    other = sampled_text(seed=7, n=4)
    assert fit_exit_temperature(multi_exit_llama(), other, batch_size=4) != pytest.approx(expected, rel=1e-3)
    resumed = lm_trainer(tmp_path, multi_exit_llama(seed=3), args, eval_dataset=other)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2 and resumed.final_exit_temperature == trainer.final_exit_temperature

    # A checkpoint of a run without a fitted temperature cannot be resumed as a "fitted" run.
    plain = lm_args(tmp_path / "plain", freeze_backbone=True, max_steps=1, save_strategy="steps", save_steps=1,
                    eval_strategy="no")
    lm_trainer(tmp_path / "plain", multi_exit_llama(), plain).train()
    fitted = lm_args(tmp_path / "plain", final_exit_temperature="fitted", freeze_backbone=True, max_steps=2,
                     eval_strategy="no")
    with pytest.raises(ValueError, match="has no FinalExitTemperatureCallback state"):
        lm_trainer(tmp_path / "plain", multi_exit_llama(), fitted).train(
            resume_from_checkpoint=str(tmp_path / "plain" / "out" / "checkpoint-1"))


# ------------------------------------------------------------------------------------------------- the model card


def test_calibrated_exits_go_to_the_card_with_their_reliability_diagrams(tmp_path):
    pytest.importorskip("matplotlib")
    from huggingface_hub import ModelCard

    from hf_kd import update_model_card

    args = lm_args(tmp_path, freeze_backbone=True, final_exit_temperature=2.0, max_steps=1, eval_strategy="no")
    trainer = lm_trainer(tmp_path, multi_exit_llama(), args, eval_dataset=sampled_text(seed=1))
    trainer.train()
    result = trainer.calibrate_exits(calibrated_on="sampled text")
    assert trainer.exit_calibration is result and len(result.temperatures) == 3
    trainer.save_model()
    out = tmp_path / "out"
    assert json.loads((out / "exit_calibration.json").read_text())["temperatures"] == result.temperatures
    for i in range(3):
        assert (out / "exit_calibration" / f"exit_{i}_reliability.png").stat().st_size > 0

    def check(card):
        results = {r.metric_type: r for r in card.data.eval_results if r.metric_type.startswith("exit_")}
        assert len(results) == 3 * 3 * 2  # exits x (ECE, NLL, Brier) x (before, after)
        for i in range(3):
            for metric in ("token_ece", "nll", "brier"):
                before, after = results[f"exit_{i}_uncalibrated_{metric}"], results[f"exit_{i}_calibrated_{metric}"]
                assert before.metric_value == round(result.before[i][metric], 4) and before.dataset_split == "eval"
                assert after.metric_value == round(result.after[i][metric], 4)
            assert results[f"exit_{i}_calibrated_token_ece"].metric_args == {"n_bins": 15}
        assert card.data.hf_kd["exit_calibration"]["temperatures"] == [round(t, 4) for t in result.temperatures]
        assert card.data.hf_kd["hyperparameters"]["final_exit_temperature"] == 2.0
        assert "### Confidence of the exits" in card.text and "of sampled text" in card.text
        for i in range(3):
            assert f"](exit_calibration/exit_{i}_reliability.png)" in card.text

    check(ModelCard.load(out / "README.md"))
    update_model_card(out)  # re-rendered from the folder: exit_calibration.json is read back
    check(ModelCard.load(out / "README.md"))
    with pytest.raises(TypeError, match="for a classifier use"):
        EarlyExitTrainer(model=tiny_multi_exit(), args=lm_args(tmp_path / "c", eval_strategy="no")).calibrate_exits()
