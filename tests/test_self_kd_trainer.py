"""SelfKDTrainer and SelfKDConfig (Park et al., 2024, self-KD from lower layers for learning ambiguity): config,
phases, trainer state across checkpoints, metrics, card, bad input. The pure selection rules and losses are tested in
tests/test_self_kd.py."""

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from transformers import DataCollatorWithPadding, EvalPrediction, HfArgumentParser

import hf_kd.trainer.self_kd_callback
from hf_kd import (
    MultiExitForSequenceClassification,
    SelfKDConfig,
    SelfKDTrainer,
    make_exit_compute_metrics,
)
from hf_kd.losses import self_kd_loss
from hf_kd.metrics import human_distribution_divergence, softmax
from hf_kd.self_kd import select_source_exit
from hf_kd.trainer.dedier import SAMPLE_INDEX_COLUMN

from .testing_utils import (
    SELF_KD_LAYERS,
    SHARED_DATA,
    eval_with_human,
    exit_logits_of,
    make_self_kd_args,
    make_self_kd_trainer,
    require_shared_data,
    snapshot,
    tiny_dataset,
    tiny_self_kd_model,
    tiny_tokenizer,
)

# ---- config ----------------------------------------------------------------------------------------------------------


class TestSelfKDConfig:
    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"recalibration_percent": 100.0}, "recalibration_percent (m) must be in [0, 100), got 100.0"),
            ({"recalibration_percent": -5}, "must be in [0, 100), got -5"),
            ({"kd_lambda": 1.2}, "kd_lambda must be in [0, 1], got 1.2"),
            ({"kd_lambda": -0.1}, "kd_lambda must be in [0, 1], got -0.1"),
            ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
            ({"warmup_max_epochs": 0}, "warmup_max_epochs must be an int >= 1, got 0"),
            ({"selection_stable_epochs": 3, "warmup_max_epochs": 2}, "can never be reached"),
            ({"recalibration_epochs": 1.5}, "recalibration_epochs must be an int >= 1, got 1.5"),
            ({"entropy_drop_rule": "steepest"}, "entropy_drop_rule must be one of ('largest', 'first_significant')"),
            ({"entropy_drop_threshold": 1.5}, "entropy_drop_threshold must be in (0, 1], got 1.5"),
            ({"distill_divergence": "tv"}, "distill_divergence must be one of ('kl', 'js')"),
            ({"ambiguity_score": "entropy"}, "ambiguity_score must be one of"),
            ({"recalibration_timing": "start"}, "recalibration_timing must be one of ('end', 'every_epoch')"),
            ({"label_smoothing_factor": 0.1}, "label_smoothing_factor=0.1 is not used by SelfKDTrainer"),
            ({"warmup_exit_loss_weights": "1,x"}, "warmup_exit_loss_weights must be one of ('uniform', 'linear')"),
            ({"warmup_exit_loss_weights": [1.0, -1.0]}, "warmup_exit_loss_weights must be >= 0 with a positive sum"),
        ],
    )
    def test_bad_values_are_named(self, tmp_path, kwargs, message):
        with pytest.raises(ValueError) as err:
            make_self_kd_args(tmp_path, **kwargs)
        assert message in str(err.value)

    def test_command_line(self, tmp_path):
        (args,) = HfArgumentParser(SelfKDConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--kd_lambda", "0.4", "--recalibration_percent", "5",
             "--distill_divergence", "js", "--source_layer_side", "before_drop", "--warmup_max_epochs", "2",
             "--warmup_exit_loss_weights", "1,1,2,4"]
        )
        assert args.warmup_exit_loss_weights == [1.0, 1.0, 2.0, 4.0]
        assert (args.kd_lambda, args.recalibration_percent, args.distill_divergence) == (0.4, 5.0, "js")
        assert args.source_layer_side == "before_drop" and args.min_train_epochs == 4

    def test_choice_options_are_enums_given_as_strings_or_members(self, tmp_path):
        from hf_kd.trainer.self_kd_config import AmbiguityScore, DistillDivergence, RecalibrationTiming

        args = make_self_kd_args(tmp_path, distill_divergence="js", ambiguity_score=AmbiguityScore.LOWER_MEAN)
        assert args.distill_divergence is DistillDivergence.JS and args.ambiguity_score is AmbiguityScore.LOWER_MEAN
        assert args.recalibration_timing is RecalibrationTiming.END and args.to_dict()["ambiguity_score"] == "lower_mean"
        with pytest.raises(ValueError, match=r"other_exits must be one of \('ce', 'none'\), got 'mse'"):
            make_self_kd_args(tmp_path, other_exits="mse")

    def test_min_train_epochs(self, tmp_path):
        assert make_self_kd_args(tmp_path, warmup_max_epochs=3).min_train_epochs == 5
        assert make_self_kd_args(tmp_path, warmup_max_epochs=3, recalibration_percent=0).min_train_epochs == 4
        assert make_self_kd_args(tmp_path, warmup_max_epochs=3, recalibration_timing="every_epoch").min_train_epochs == 4


# ---- trainer ---------------------------------------------------------------------------------------------------------


class TestBadInput:
    def test_no_validation_set(self, tmp_path):
        with pytest.raises(ValueError, match="pass an eval_dataset"):
            make_self_kd_trainer(tmp_path, eval_=None)

    def test_dict_of_eval_sets_needs_a_name(self, tmp_path):
        eval_sets = {"dev": eval_with_human(), "test": eval_with_human(seed=2)}
        with pytest.raises(ValueError, match=r"one of \['dev', 'test'\]; got None"):
            make_self_kd_trainer(tmp_path, eval_=eval_sets)
        trainer = make_self_kd_trainer(tmp_path, eval_=eval_sets, args=make_self_kd_args(tmp_path, selection_dataset_name="dev"))
        assert trainer.selection_dataset is eval_sets["dev"]
        with pytest.raises(ValueError, match="only applies to a dict"):
            make_self_kd_trainer(tmp_path, args=make_self_kd_args(tmp_path, selection_dataset_name="dev"))

    def test_one_layer_backbone(self, tmp_path):
        with pytest.raises(ValueError, match="a backbone with one layer has nothing below its classifier"):
            make_self_kd_trainer(tmp_path, model=tiny_self_kd_model(layers=1))

    def test_two_exits_need_before_drop(self, tmp_path):
        with pytest.raises(ValueError, match="source_layer_side='after_drop' needs at least 3 exits"):
            make_self_kd_trainer(tmp_path, model=tiny_self_kd_model(layers=2))
        args = make_self_kd_args(tmp_path, source_layer_side="before_drop", num_train_epochs=4)
        trainer = make_self_kd_trainer(tmp_path, model=tiny_self_kd_model(layers=2), args=args)
        trainer.train()
        assert trainer.source_layer == 1

    def test_too_few_epochs(self, tmp_path):
        trainer = make_self_kd_trainer(tmp_path, args=make_self_kd_args(tmp_path, num_train_epochs=3))
        with pytest.raises(ValueError, match=r"trains for 3 epochs, fewer than the 4 its phases need"):
            trainer.train()

    def test_not_a_multi_exit_model_or_config(self, tmp_path):
        from .testing_utils import tiny_bert

        with pytest.raises(TypeError, match="trains a multi-exit model"):
            make_self_kd_trainer(tmp_path, model=tiny_bert())
        with pytest.raises(TypeError, match="args must be a SelfKDConfig"):
            SelfKDTrainer(model=tiny_self_kd_model(), args=None, eval_dataset=eval_with_human())


class TestPhases:
    def test_losses_of_each_phase(self, tmp_path):
        model = tiny_self_kd_model()
        args = make_self_kd_args(tmp_path, kd_lambda=0.3, temperature=2.0)
        trainer = make_self_kd_trainer(tmp_path, model=model, args=args)
        batch = next(iter(trainer.get_train_dataloader()))
        z, labels = exit_logits_of(model, batch), batch["labels"]
        model.eval()  # no dropout either way; compute_loss reads model.training only for re-calibration
        assert trainer.phase == "warmup"
        torch.testing.assert_close(
            trainer.compute_loss(model, dict(batch)), sum(F.cross_entropy(zi, labels) for zi in z)
        )
        state = trainer._self_kd
        state.phase, state.source_exit = "distill", 1
        expected, _ = self_kd_loss(z, labels, 1, 0.3, 2.0)
        torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), expected)
        state.phase, state.recalibration_set = "recalibrate", np.array([0, 5, 9], dtype=np.int64)
        state._set_mask()
        mask = torch.isin(batch[SAMPLE_INDEX_COLUMN], torch.tensor([0, 5, 9]))
        model.train()
        recalibrated, _ = self_kd_loss(z, labels, 1, 0.3, 2.0, recalibrate=mask)
        torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), recalibrated)
        model.eval()  # evaluation losses are not re-calibrated
        torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), expected)

    def test_warmup_exit_weights(self, tmp_path):
        model = tiny_self_kd_model()
        trainer = make_self_kd_trainer(tmp_path, model=model, args=make_self_kd_args(tmp_path, warmup_exit_loss_weights="linear"))
        assert trainer.warmup_exit_loss_weights == pytest.approx([0.4, 0.8, 1.2, 1.6])  # sum = 4 exits
        batch = next(iter(trainer.get_train_dataloader()))
        z, labels = exit_logits_of(model, batch), batch["labels"]
        model.eval()
        expected = sum(w * F.cross_entropy(zi, labels) for w, zi in zip([0.4, 0.8, 1.2, 1.6], z))
        torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), expected)
        with pytest.raises(ValueError, match="has 2 weights but the model has 4 exits"):
            make_self_kd_trainer(tmp_path, args=make_self_kd_args(tmp_path, warmup_exit_loss_weights=[1.0, 2.0]))

    def test_selection_follows_the_logged_curves(self, tmp_path):
        args = make_self_kd_args(tmp_path, num_train_epochs=5, warmup_max_epochs=3, recalibration_percent=25)
        trainer = make_self_kd_trainer(tmp_path, args=args)
        trainer.train()
        record = trainer.layer_entropy
        assert [e["phase"] for e in record["epochs"]][-1] == "recalibrate"
        warmup = [e for e in record["epochs"] if e["phase"] == "warmup"]
        assert len(warmup) == record["warmup_epochs"] == trainer._self_kd.warmup_epochs
        for epoch in warmup:
            assert epoch["selected_layer"] == 1 + select_source_exit(epoch["entropy"])
        assert trainer.source_layer == warmup[-1]["selected_layer"] == record["source_layer"]
        # The warm-up stopped either when stable (the last 2 selections agree) or at the cap of 3 epochs.
        stable = len(warmup) >= 2 and warmup[-1]["selected_layer"] == warmup[-2]["selected_layer"]
        assert stable or len(warmup) == 3
        logged = [h for h in trainer.state.log_history if "val_entropy_layer_1" in h]
        assert len(logged) == 5
        for entry, epoch in zip(logged, record["epochs"]):
            assert [entry[f"val_entropy_layer_{layer}"] for layer in range(1, SELF_KD_LAYERS + 1)] == epoch["entropy"]
        saved = json.loads((tmp_path / "out" / "self_kd" / "layer_entropy.json").read_text())
        assert saved == json.loads(json.dumps(record))
        assert (tmp_path / "out" / "self_kd" / "layer_entropy.png").stat().st_size > 1000

    @pytest.mark.parametrize(
        "selections, warmup_epochs", [([2, 2, 2], 2), ([1, 2, 2], 3), ([1, 2, 1], 3), ([3, 1, 1], 3)]
    )
    def test_warmup_stops_when_stable_or_capped(self, tmp_path, monkeypatch, selections, warmup_epochs):
        picks = iter(selections)
        monkeypatch.setattr(hf_kd.trainer.self_kd_callback, "select_source_exit", lambda *a, **k: next(picks))
        args = make_self_kd_args(tmp_path, num_train_epochs=5, warmup_max_epochs=3, recalibration_percent=0)
        trainer = make_self_kd_trainer(tmp_path, args=args)
        trainer.train()
        assert trainer._self_kd.warmup_epochs == warmup_epochs
        assert trainer.source_exit == selections[warmup_epochs - 1]
        assert trainer._self_kd.epoch_phases == ["warmup"] * warmup_epochs + ["distill"] * (5 - warmup_epochs)

    def test_recalibration_set_is_the_lowest_ambiguity_of_the_model_at_selection(self, tmp_path):
        # 5 epochs, warm-up 2 (E = 2 of cap 2), self-distillation epochs 3-4, the set selected after epoch 4.
        args = make_self_kd_args(tmp_path, num_train_epochs=5, recalibration_percent=25, save_strategy="epoch")
        trainer = make_self_kd_trainer(tmp_path, args=args)
        trainer.train()
        assert trainer._self_kd.epoch_phases == ["warmup", "warmup", "distill", "distill", "recalibrate"]
        model = MultiExitForSequenceClassification.from_pretrained(tmp_path / "out" / "checkpoint-16").eval()
        rows = trainer.train_dataset
        batch = trainer.data_collator([{k: rows[i][k] for k in ("input_ids", "attention_mask")} for i in range(32)])
        probs = torch.stack([F.softmax(z.double(), -1) for z in exit_logits_of(model, batch)])
        order = torch.tensor(rows[SAMPLE_INDEX_COLUMN]).argsort()
        gold = probs[trainer.source_exit, order, torch.tensor(rows["label"])[order]]
        np.testing.assert_allclose(trainer.ambiguity_scores, gold.numpy(), rtol=1e-6)
        assert trainer.recalibration_set.tolist() == sorted(gold.argsort()[:8].tolist())
        recalibrated = [h["recalibrated_fraction"] for h in trainer.state.log_history if "recalibrated_fraction" in h]
        assert sum(recalibrated[-4:]) == pytest.approx(8 / 8)  # 8 of 32 rows, 4 batches of 8: mean 1/4 x 4

    def test_every_epoch_reselects_after_the_warmup(self, tmp_path):
        args = make_self_kd_args(tmp_path, num_train_epochs=4, recalibration_percent=50, recalibration_timing="every_epoch")
        trainer = make_self_kd_trainer(tmp_path, args=args)
        trainer.train()
        assert trainer._self_kd.epoch_phases == ["warmup", "warmup", "recalibrate", "recalibrate"]
        sizes = [h["recalibration_set_size"] for h in trainer.state.log_history if "recalibration_set_size" in h]
        assert sizes == [16.0, 16.0]  # after epochs 2 and 3; none after the last

    def test_without_recalibration_there_is_no_sample_index(self, tmp_path):
        trainer = make_self_kd_trainer(tmp_path, args=make_self_kd_args(tmp_path, recalibration_percent=0))
        assert SAMPLE_INDEX_COLUMN not in trainer.train_dataset.column_names
        trainer.train()
        assert trainer._self_kd.epoch_phases == ["warmup", "warmup", "distill", "distill"]
        assert trainer.ambiguity_scores is None and trainer.recalibration_set.size == 0

    def test_other_exits_none_freezes_their_heads(self, tmp_path, monkeypatch):
        monkeypatch.setattr(hf_kd.trainer.self_kd_callback, "select_source_exit", lambda *a, **k: 1)
        model = tiny_self_kd_model()
        args = make_self_kd_args(tmp_path, other_exits="none", recalibration_percent=0, weight_decay=0.0,
                         save_strategy="epoch")
        trainer = make_self_kd_trainer(tmp_path, model=model, args=args)
        trainer.train()
        after_warmup = MultiExitForSequenceClassification.from_pretrained(tmp_path / "out" / "checkpoint-8")
        for j in (0, 2):  # neither the source (exit 1) nor the main classifier (exit 3)
            for name, param in model.exits[j].named_parameters():
                torch.testing.assert_close(param, after_warmup.exits[j].state_dict()[name], atol=0, rtol=0)
        assert not torch.equal(model.exits[1].classifier.weight, after_warmup.exits[1].classifier.weight)


class TestResume:
    @pytest.mark.parametrize(
        "save_strategy, restore_callbacks, checkpoints",
        [("epoch", False, [8, 16]), ("steps", False, [8, 16]), ("epoch", True, [12])],
    )
    def test_interrupted_run_resumes_to_the_same_result(self, tmp_path, save_strategy, restore_callbacks, checkpoints):
        # 32 rows / 8 = 4 steps per epoch, 5 epochs: warm-up 1-2, self-distillation 3-4, re-calibration 5. Step 8 is
        # the end of the warm-up (the source layer is selected there), step 16 the selection of the re-calibration
        # set. save_strategy="steps" saves those steps *before* the epoch's end, which the resumed run catches up.
        # Dropout is on: the passes must not shift the random stream.
        args = make_self_kd_args(
            tmp_path, num_train_epochs=5, recalibration_percent=25, save_strategy=save_strategy, save_steps=4,
            restore_callback_states_from_checkpoint=restore_callbacks,
        )
        model = tiny_self_kd_model(dropout=0.1)
        uninterrupted = make_self_kd_trainer(tmp_path, model=model, args=args)
        uninterrupted.train()
        final, state = snapshot(model), uninterrupted._self_kd.state()
        assert state["attributes"]["epoch_phases"][-1] == "recalibrate"

        for checkpoint in checkpoints:
            folder = tmp_path / "out" / f"checkpoint-{checkpoint}"
            stored = json.loads((folder / "trainer_state.json").read_text())
            stored = stored["stateful_callbacks"]["SelfKDCallback"]["attributes"]
            assert stored["epochs_done"] == checkpoint // 4 - (save_strategy == "steps")

            resumed_model = tiny_self_kd_model(seed=5, dropout=0.1)  # other weights: all must come from the checkpoint
            resumed = make_self_kd_trainer(tmp_path, model=resumed_model, args=args)
            resumed.train(resume_from_checkpoint=str(folder))
            assert resumed._self_kd.state() == state
            assert [cb for cb in resumed.callback_handler.callbacks if type(cb).__name__ == "SelfKDCallback"] == [
                resumed._self_kd
            ]
            for name, param in resumed_model.named_parameters():
                torch.testing.assert_close(param, final[name], atol=0, rtol=0, msg=f"{name} from {checkpoint}")

    def test_checkpoint_without_self_kd_state_is_an_error(self, tmp_path):
        from hf_kd import EarlyExitConfig, EarlyExitTrainer

        tokenizer = tiny_tokenizer(tmp_path)
        args = EarlyExitConfig(output_dir=str(tmp_path / "out"), max_steps=1, save_strategy="steps", save_steps=1,
                               report_to="none", use_cpu=True, per_device_train_batch_size=8)
        EarlyExitTrainer(model=tiny_self_kd_model(), args=args, train_dataset=tiny_dataset(32),
                         processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer)).train()
        trainer = make_self_kd_trainer(tmp_path)
        with pytest.raises(ValueError, match="not saved by a SelfKDTrainer"):
            trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))

    def test_other_training_data_is_an_error(self, tmp_path):
        args = make_self_kd_args(tmp_path, num_train_epochs=4, save_strategy="epoch")
        make_self_kd_trainer(tmp_path, args=args).train()
        trainer = make_self_kd_trainer(tmp_path, args=args, train=tiny_dataset(24))
        with pytest.raises(ValueError, match="for 32 training samples, but this run has 24"):
            trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-8"))


class TestMetricsAndCard:
    def test_exit_metrics_with_human_distributions(self):
        rng = np.random.default_rng(0)
        logits = [rng.normal(size=(6, 3)) for _ in range(3)]
        human = rng.dirichlet(np.ones(3), size=6)
        human[1] = np.nan  # no human distribution for this row
        labels = np.array([0, 1, 2, -100, 1, 0])
        compute = make_exit_compute_metrics(with_human=True)
        results = compute(EvalPrediction(predictions=(logits[-1], *logits, human), label_ids=labels))
        keep = np.array([0, 2, 4, 5])
        expected = human_distribution_divergence(human[keep], softmax(logits[-1][keep]))
        assert results["kl"] == pytest.approx(expected["kl"]) and results["js_distance"] == expected["js_distance"]
        first = human_distribution_divergence(human[keep], softmax(logits[0][keep]))
        assert results["exit_0_kl"] == pytest.approx(first["kl"])
        assert results["exit_2_js_distance"] == pytest.approx(expected["js_distance"])
        assert results["accuracy"] == pytest.approx(np.mean(logits[-1][[0, 1, 2, 4, 5]].argmax(1) == labels[labels >= 0]))
        nothing = compute(EvalPrediction(predictions=(logits[-1], *logits, np.full((6, 3), np.nan)), label_ids=labels))
        assert "kl" not in nothing and "exit_0_kl" not in nothing and "accuracy" in nothing

    def test_table_and_plot_reject_inconsistent_curves(self, tmp_path):
        from hf_kd.hub import layer_selection_table
        from hf_kd.plots import plot_layer_entropy

        bad = {"exit_layers": [1, 2, 3], "epochs": [{"epoch": 1, "phase": "warmup", "entropy": [0.5, 0.4]}]}
        with pytest.raises(ValueError, match="one `entropy` per exit, got 3 layers and entropies of lengths \\[2\\]"):
            layer_selection_table(bad)
        with pytest.raises(ValueError, match=r"one entropy per exit \(3\)"):
            plot_layer_entropy([1, 2, 3], [[0.5, 0.4]], tmp_path / "p.png")
        with pytest.raises(ValueError, match=r"one phase per epoch \(1\), got 2"):
            plot_layer_entropy([1, 2], [[0.5, 0.4]], tmp_path / "p.png", phases=["warmup", "distill"])
        good = {"exit_layers": [1, 2], "epochs": [{"epoch": 1, "phase": "warmup", "entropy": [0.5, 0.25],
                                                  "selected_layer": 1}]}
        assert "| 1 | warmup | **0.5000** | 0.2500 |" in layer_selection_table(good)

    def test_evaluation_and_card_report_the_method(self, tmp_path):
        args = make_self_kd_args(tmp_path, eval_strategy="epoch")
        trainer = make_self_kd_trainer(tmp_path, args=args)
        trainer.train()
        assert list(trainer.latest_eval_metrics()) == ["eval"]
        metrics = trainer.latest_eval_metrics()["eval"]
        assert {"kl", "js_distance", "accuracy"} <= set(metrics)
        assert any("eval_exit_0_kl" in h for h in trainer.state.log_history)
        trainer.save_model()
        card = (tmp_path / "out" / "README.md").read_text()
        assert "## Source-layer selection" in card and f"The source layer is **layer {trainer.source_layer}**" in card
        assert "| kd_lambda | 0.6 |" in card and "| recalibration_percent | 10.0 |" in card
        assert "KL(human || model)" in card and "JS distance to human labels" in card
        assert "2406.09719" in card and "self-distillation" in card
        # Re-rendered from the folder alone (as `hf-kd` does after calibration): the selection table survives.
        from hf_kd import update_model_card

        (tmp_path / "out" / "README.md").write_text(card)
        update_model_card(tmp_path / "out")
        assert "## Source-layer selection" in (tmp_path / "out" / "README.md").read_text()
        reloaded = MultiExitForSequenceClassification.from_pretrained(tmp_path / "out")
        assert reloaded.config.exit_layers == [1, 2, 3, 4]


@pytest.mark.slow
@require_shared_data
def test_real_minilm_on_lewidi_rows(tmp_path):
    """all-MiniLM-L6-v2 (6 layers) on a slice of MD-Agreement: every phase runs and the card carries KL/JS."""
    from transformers import AutoTokenizer

    from hf_kd.data import load_lewidi, tokenize_dataset

    name = "sentence-transformers/all-MiniLM-L6-v2"
    tokenizer = AutoTokenizer.from_pretrained(name)
    train = tokenize_dataset(load_lewidi(SHARED_DATA, split="train").select(range(40)), tokenizer, max_length=24)
    dev = tokenize_dataset(load_lewidi(SHARED_DATA, split="dev").select(range(16)), tokenizer, max_length=24)
    model = MultiExitForSequenceClassification.from_backbone(name, num_labels=2)
    args = make_self_kd_args(tmp_path, num_train_epochs=4, learning_rate=5e-5, per_device_train_batch_size=20,
                     per_device_eval_batch_size=40, eval_strategy="epoch")
    trainer = SelfKDTrainer(model=model, args=args, train_dataset=train.remove_columns("human_label_dist"),
                            eval_dataset=dev, processing_class=tokenizer)
    trainer.train()
    assert 1 <= trainer.source_layer <= 5
    assert trainer._self_kd.epoch_phases == ["warmup", "warmup", "distill", "recalibrate"]
    assert trainer.recalibration_set.size == 4  # 10 % of 40
    metrics = trainer.latest_eval_metrics()["eval"]
    assert 0 < metrics["kl"] < 2 and 0 < metrics["js_distance"] < 1
