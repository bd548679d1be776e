"""DEDIER in EarlyExitTrainer (Tiwari et al., WACV 2024): weight rule, weighted loss, readout, resume, group metrics."""

import json
import math
from dataclasses import dataclass

import datasets
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import DefaultDataCollator, EvalPrediction, HfArgumentParser, PreTrainedConfig
from transformers.utils import ModelOutput

import hf_kd.trainer.dedier
from hf_kd import EarlyExitConfig, EarlyExitTrainer, kd_loss, make_exit_compute_metrics
from hf_kd.losses import dedier_weights
from hf_kd.metrics import group_accuracies
from hf_kd.teacher import TEACHER_LOGITS_COLUMN
from hf_kd.trainer.dedier import SAMPLE_INDEX_COLUMN, DedierReadout, with_sample_index

from .testing_utils import (
    NUM_EXITS,
    exit_logits_of,
    make_dedier_args,
    make_dedier_trainer,
    make_early_exit_args,
    make_early_exit_trainer,
    snapshot,
    tiny_bert,
    tiny_dataset,
    tiny_multi_exit,
)


def train_features(trainer, model, layer=1):
    """Hidden states at `layer` of every train row, pooled as the model's exits pool them (masked mean or first
    token), in sample-index order, computed independently."""
    rows = trainer.train_dataset
    batch = trainer.data_collator([{k: rows[i][k] for k in ("input_ids", "attention_mask")} for i in range(len(rows))])
    with torch.no_grad():
        hidden = model.eval()(**batch, output_hidden_states=True).hidden_states[layer]
    if model.config.exit_pooling == "mean":
        mask = batch["attention_mask"].unsqueeze(-1).float()
        hidden = (hidden * mask).sum(1) / mask.sum(1)
    else:
        hidden = hidden[:, 0]
    order = torch.tensor(rows[SAMPLE_INDEX_COLUMN]).argsort()
    return hidden[order], torch.tensor(rows["label"])[order]


class TestDedierWeights:
    def test_hand_computed_binary(self):
        logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 5.0]])
        labels = torch.tensor([0, 1, 0, -100])
        weights = torch.tensor([1.0, 1.0, 5.0, 2.0])
        new = dedier_weights(logits, labels, weights, alpha=0.5, beta=2.0)
        # Row 0 is read correctly and row 3 is unlabelled: both keep their weight. Rows 1 and 2 are misread, with
        # margins |q0 - q1| = tanh(1) and tanh(1/2) (the difference of a 2-class softmax is tanh(dz / 2)); row 2's
        # earlier weight 5 is replaced, not multiplied.
        expected = torch.tensor([1.0, math.exp(2 * math.tanh(1.0) ** 0.5), math.exp(2 * math.tanh(0.5) ** 0.5), 2.0])
        torch.testing.assert_close(new, expected)
        assert torch.equal(weights, torch.tensor([1.0, 1.0, 5.0, 2.0]))  # the input is not modified

    def test_multiclass_margin_is_top1_minus_top2(self):
        logits = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]).log()
        new = dedier_weights(logits, torch.tensor([2, 1]), torch.ones(2), alpha=1.0, beta=1.5)
        torch.testing.assert_close(new, torch.tensor([math.exp(1.5 * (0.5 - 0.3)), 1.0]))

    def test_alpha_zero_is_a_constant_upweight_and_beta_zero_keeps_weights(self):
        logits, labels = torch.tensor([[3.0, 0.0], [0.1, 0.0]]), torch.tensor([1, 1])
        torch.testing.assert_close(
            dedier_weights(logits, labels, torch.ones(2), 0.0, 4.0), torch.full((2,), math.e**4)
        )
        assert torch.equal(dedier_weights(logits, labels, torch.ones(2), 0.2, 0.0), torch.ones(2))

    @pytest.mark.parametrize(
        "logits, labels, weights, kwargs, message",
        [
            (torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), torch.ones(2), {"alpha": -0.1}, "alpha must be"),
            (torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), torch.ones(2), {"beta": math.nan}, "got nan"),
            (torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), torch.ones(2), {}, "K >= 2, got (2, 1)"),
            (torch.zeros(2, 2), torch.zeros(3, dtype=torch.long), torch.ones(2), {}, "must have shape (2,)"),
        ],
    )
    def test_bad_inputs(self, logits, labels, weights, kwargs, message):
        with pytest.raises(ValueError) as err:
            dedier_weights(logits, labels, weights, **kwargs)
        assert message in str(err.value)


class TestSampleWeightedLoss:
    def test_kd_loss_is_plain_mean_of_weighted_losses(self):
        torch.manual_seed(0)
        student, teacher = torch.randn(4, 3), torch.randn(4, 3)
        labels = torch.tensor([0, 2, -100, 1])
        w = torch.tensor([1.0, 3.0, 7.0, 0.5])
        per_item = kd_loss(student, teacher, labels, 3.0, 0.7, reduction="none")
        expected = (w * per_item)[[0, 1, 3]].sum() / 3  # the ignored row counts for nothing, and no division by sum(w)
        torch.testing.assert_close(kd_loss(student, teacher, labels, 3.0, 0.7, sample_weights=w), expected)
        torch.testing.assert_close(
            kd_loss(student, teacher, labels, 3.0, 0.7, num_items_in_batch=6, sample_weights=w), expected * 3 / 6
        )
        torch.testing.assert_close(
            kd_loss(student, teacher, labels, 3.0, 0.7, reduction="none", sample_weights=w), w * per_item
        )
        with pytest.raises(ValueError, match=r"sample_weights must have shape \(4,\)"):
            kd_loss(student, teacher, labels, sample_weights=torch.ones(3))

    def test_training_loss_weights_every_exit_and_evaluation_does_not(self, tmp_path):
        model, teacher = tiny_multi_exit(), tiny_bert(seed=7)
        args = make_dedier_args(tmp_path, exit_loss_weights=[1.0, 2.0, 5.0], temperature=3.0, alpha=0.3)
        trainer = make_early_exit_trainer(tmp_path, model=model, args=args, teacher=teacher)
        trainer._dedier.weights = 1.0 + torch.arange(32, dtype=torch.float32) / 4
        batch = next(iter(trainer.get_train_dataloader()))
        w = trainer._dedier.weights[batch[SAMPLE_INDEX_COLUMN]]

        z = exit_logits_of(model, batch)
        with torch.no_grad():
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_exit = [kd_loss(zi, t, batch["labels"], 3.0, 0.3, reduction="none") for zi in z]
        expected = sum(lam * (w * loss).mean() for lam, loss in zip([1 / 8, 2 / 8, 5 / 8], per_exit))
        unweighted = sum(lam * loss.mean() for lam, loss in zip([1 / 8, 2 / 8, 5 / 8], per_exit))

        model.train()
        torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), expected)
        model.eval()
        torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), unweighted)


class TestDedierConfig:
    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"dedier_layer": 0}, "dedier_layer must be a 1-based layer index (an int >= 1), got 0"),
            ({"dedier_layer": 1.5}, "got 1.5"),
            ({"dedier_alpha": -0.2}, "dedier_alpha must be a finite number >= 0, got -0.2"),
            ({"dedier_beta": math.inf}, "dedier_beta must be a finite number >= 0, got inf"),
            ({"dedier_readout_epochs": 0}, "dedier_readout_epochs must be an int >= 1, got 0"),
            ({"dedier_readout_lr": 0.0}, "dedier_readout_lr must be > 0 or None (learning_rate), got 0.0"),
            (
                {"dedier_readout_optimizer": "adam"},
                "dedier_readout_optimizer must be one of ('adamw', 'sgd'), got 'adam'",
            ),
            ({"distill_from": "final_exit"}, "needs distill_from='teacher', got distill_from='final_exit'"),
            ({"distill_from": "none"}, "got distill_from='none'"),
            ({"dedier": False, "dedier_beta": 4.0}, "dedier_beta=4.0 only apply with dedier=True"),
        ],
    )
    def test_bad_values_are_named(self, tmp_path, kwargs, message):
        options = {"output_dir": str(tmp_path), "dedier": True, "distill_from": "teacher", **kwargs}
        with pytest.raises(ValueError) as err:
            EarlyExitConfig(**options)
        assert message in str(err.value)

    def test_command_line(self, tmp_path):
        (args,) = HfArgumentParser(EarlyExitConfig).parse_args_into_dataclasses(
            [
                "--output_dir",
                str(tmp_path),
                "--distill_from",
                "teacher",
                "--dedier",
                "--dedier_layer",
                "2",
                "--dedier_alpha",
                "0.05",
                "--dedier_beta",
                "4",
                "--dedier_readout_optimizer",
                "sgd",
            ]
        )
        assert args.dedier and args.dedier_layer == 2 and args.dedier_alpha == 0.05 and args.dedier_beta == 4.0
        assert args.dedier_readout_optimizer == "sgd" and args.dedier_readout_lr is None

    def test_layer_beyond_the_model_is_an_error(self, tmp_path):
        with pytest.raises(ValueError, match=r"dedier_layer=4 is beyond the model's last layer 3 .* valid: 1\.\.3"):
            make_dedier_trainer(tmp_path, dedier_layer=4)

    def test_sample_index(self, tmp_path):
        trainer = make_dedier_trainer(tmp_path)
        assert trainer.train_dataset[SAMPLE_INDEX_COLUMN] == list(range(32))
        shuffled = tiny_dataset(4).add_column(SAMPLE_INDEX_COLUMN, [2, 0, 3, 1])
        assert with_sample_index(shuffled) is shuffled
        with pytest.raises(ValueError, match="must be a permutation of 0..3"):
            with_sample_index(tiny_dataset(4).add_column(SAMPLE_INDEX_COLUMN, [0, 1, 1, 3]))
        with pytest.raises(TypeError, match="map-style"):
            with_sample_index(tiny_dataset(4).to_iterable_dataset())


class TestReadout:
    def test_shapes(self):
        assert DedierReadout((32,), 3)(torch.randn(5, 32)).shape == (5, 3)
        image = DedierReadout((4, 6, 6), 3)
        assert image(torch.randn(5, 4, 6, 6)).shape == (5, 3)
        assert image.block.conv1.out_channels == 8 and image.classifier.in_features == 8  # BasicBlock C -> 2C
        with pytest.raises(ValueError, match=r"got shape \(4, 6\)"):
            DedierReadout((4, 6), 3)

    def test_reinitialised_and_seeded_at_every_reweigh(self, tmp_path, monkeypatch):
        inits, trained = [], []

        class Spy(DedierReadout):
            def __init__(self, *args):
                super().__init__(*args)
                inits.append({k: v.clone() for k, v in self.state_dict().items()})
                trained.append(self)

        monkeypatch.setattr(hf_kd.trainer.dedier, "DedierReadout", Spy)
        trainer = make_dedier_trainer(tmp_path, seed=11)
        rng = torch.get_rng_state()
        trainer._dedier.reweigh()
        trainer._dedier.reweigh()
        assert torch.equal(torch.get_rng_state(), rng), "the re-weighting drew from the student's random stream"
        assert trainer._dedier.num_reweighs == 2 and trainer._dedier.readout is trained[1]
        for i, init in enumerate(inits):
            torch.manual_seed(11 + i)  # args.seed + number of earlier re-weightings
            fresh = DedierReadout((32,), 2).state_dict()
            for name, value in fresh.items():
                torch.testing.assert_close(init[name], value, atol=0, rtol=0, msg=name)
        assert not torch.equal(inits[0]["classifier.weight"], inits[1]["classifier.weight"])
        assert not torch.equal(trained[1].classifier.weight, inits[1]["classifier.weight"].to(torch.float32))

    def test_misread_samples_upweighted_others_untouched(self, tmp_path):
        trainer = make_dedier_trainer(tmp_path, dedier_alpha=0.5, dedier_beta=2.0)
        callback = trainer._dedier
        before = 1.0 + torch.arange(32, dtype=torch.float32) / 10  # as if earlier epochs had set them
        callback.weights = before.clone()
        stats = callback.reweigh()

        features, labels = train_features(trainer, trainer.model)
        with torch.no_grad():
            probs = callback.readout(features).softmax(-1)
        misread = probs.argmax(-1) != labels
        assert 0 < misread.sum() < 32, "the test needs both misread and correctly read samples"
        top2 = probs.topk(2, -1).values
        margin = top2[:, 0] - top2[:, 1]
        torch.testing.assert_close(callback.weights[misread], torch.exp(2.0 * margin[misread].sqrt()))
        assert torch.equal(callback.weights[~misread], before[~misread])
        assert stats["dedier_readout_accuracy"] == pytest.approx(1 - misread.float().mean().item())
        assert stats["dedier_mean_weight"] == pytest.approx(callback.weights.mean().item())
        assert trainer.state.log_history[-1]["dedier_upweighted_fraction"] == stats["dedier_upweighted_fraction"]


class TestDedierTraining:
    def test_training_reweighs_after_every_epoch_but_the_last(self, tmp_path):
        model = tiny_multi_exit()
        before = snapshot(model)
        trainer = make_dedier_trainer(tmp_path, model=model, num_train_epochs=3)
        trainer.train()
        reweighs = [h for h in trainer.state.log_history if "dedier_mean_weight" in h]
        assert [h["epoch"] for h in reweighs] == [1.0, 2.0]
        assert all(0 <= h["dedier_upweighted_fraction"] <= 1 and h["dedier_mean_weight"] >= 1 for h in reweighs)
        assert trainer._dedier.num_reweighs == 2 and (trainer.dedier_weights > 1).any()
        assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "exits" in n)
        assert list(trainer.latest_eval_metrics()) == []  # DEDIER's statistics are not evaluation splits

    def test_beta_zero_trains_exactly_like_plain_distillation(self, tmp_path):
        """With beta=0 every weight stays 1: same model as without DEDIER, so the readouts touch no random state."""
        models = {}
        for dedier in (False, True):
            models[dedier] = tiny_multi_exit()
            extra = {"dedier_beta": 0.0, "dedier_readout_lr": 1e-2} if dedier else {"dedier_readout_lr": None}
            args = make_dedier_args(tmp_path / str(dedier), num_train_epochs=2, dedier=dedier, **extra)
            make_early_exit_trainer(tmp_path, model=models[dedier], args=args, teacher=tiny_bert(seed=7)).train()
        for name, param in models[True].named_parameters():
            torch.testing.assert_close(param, models[False].state_dict()[name], atol=0, rtol=0, msg=name)

    @pytest.mark.parametrize("save_strategy, restore_callbacks", [("epoch", False), ("steps", False), ("epoch", True)])
    def test_resume_restores_weights_and_model_exactly(self, tmp_path, save_strategy, restore_callbacks):
        # 32 rows / 8 per batch = 4 steps per epoch; re-weightings after epochs 1, 2 and 3 of 4. The run resumes from
        # step 8 (end of epoch 2), where the weights carry two re-weightings' history that a fresh readout cannot
        # rebuild. "steps" saves at step 8 *before* the epoch-2 re-weighting, which the resumed run must catch up;
        # "epoch" saves after it. Trainer's own callback restoration (restore_callback_states_from_checkpoint) must
        # neither be needed nor get in the way.
        args = make_dedier_args(
            tmp_path,
            num_train_epochs=4,
            save_strategy=save_strategy,
            save_steps=4,
            restore_callback_states_from_checkpoint=restore_callbacks,
        )
        model = tiny_multi_exit()
        uninterrupted = make_early_exit_trainer(tmp_path, model=model, args=args, teacher=tiny_bert(seed=7))
        uninterrupted.train()
        final, final_weights = snapshot(model), uninterrupted.dedier_weights.clone()
        assert uninterrupted._dedier.num_reweighs == 3

        checkpoint = tmp_path / "out" / "checkpoint-8"
        stored = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["DedierCallback"]
        assert len(stored["attributes"]["weights"]) == 32 and stored["args"] == {"num_samples": 32, "seed": 0}
        assert stored["attributes"]["num_reweighs"] == (2 if save_strategy == "epoch" else 1)

        resumed_model = tiny_multi_exit(seed=5)  # other weights: everything must come from the checkpoint
        resumed = make_early_exit_trainer(tmp_path, model=resumed_model, args=args, teacher=tiny_bert(seed=7))
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert resumed.state.global_step == 16 and resumed._dedier.num_reweighs == 3
        assert [cb for cb in resumed.callback_handler.callbacks if type(cb).__name__ == "DedierCallback"] == [
            resumed._dedier
        ]
        torch.testing.assert_close(resumed.dedier_weights, final_weights, atol=0, rtol=0)
        for name, param in resumed_model.named_parameters():
            torch.testing.assert_close(param, final[name], atol=0, rtol=0, msg=name)

    def test_resuming_a_checkpoint_without_dedier_state_is_an_error(self, tmp_path):
        args = make_early_exit_args(
            tmp_path, distill_from="teacher", max_steps=1, save_strategy="steps", save_steps=1, eval_strategy="no"
        )
        make_early_exit_trainer(tmp_path, args=args, teacher=tiny_bert(seed=7)).train()
        trainer = make_dedier_trainer(tmp_path, max_steps=2)
        with pytest.raises(ValueError, match="not saved by a dedier=True run"):
            trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))


# ---- image models: (batch, C, H, W) hidden states --------------------------------------------------------------


@dataclass
class TinyImageOutput(ModelOutput):
    logits: torch.Tensor | None = None
    exit_logits: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class TinyImageMultiExit(nn.Module):
    """Plain-torch stand-in for a multi-exit image classifier: a stem, two conv stages, an exit after each stage;
    `hidden_states` = (stem, stage 1, stage 2), as MultiExitForImageClassification returns them."""

    def __init__(self, num_labels=2):
        super().__init__()
        self.config = PreTrainedConfig(num_labels=num_labels)
        self.config.exit_layers = [1, 2]
        self.config.normalized_exit_loss_weights = [0.5, 0.5]
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.stages = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 8, 3, stride=2, padding=1)])
        self.exits = nn.ModuleList([nn.Linear(4, num_labels), nn.Linear(8, num_labels)])

    def forward(self, pixel_values, labels=None, output_hidden_states=None):
        hidden = F.relu(self.stem(pixel_values))  # (bs, 4, 8, 8)
        hidden_states, exit_logits = [hidden], []
        for stage, head in zip(self.stages, self.exits):
            hidden = F.relu(stage(hidden))  # (bs, 4, 8, 8), then (bs, 8, 4, 4)
            hidden_states.append(hidden)
            exit_logits.append(head(hidden.mean(dim=(2, 3))))
        return TinyImageOutput(
            logits=exit_logits[-1],
            exit_logits=tuple(exit_logits),
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )


def tiny_images(n, seed=0):
    """8x8 one-channel images whose label is whether the top half is brighter, with random teacher logits."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 8, 8, generator=g)
    labels = (images[:, :, :4].mean((1, 2, 3)) > images[:, :, 4:].mean((1, 2, 3))).long()
    return datasets.Dataset.from_dict(
        {"pixel_values": images.tolist(), "label": labels.tolist(), TEACHER_LOGITS_COLUMN: torch.randn(n, 2).tolist()}
    )


class TestImageFeatures:
    @pytest.mark.parametrize("layer, channels", [(1, 4), (2, 8)])
    def test_feature_maps_feed_a_conv_readout(self, tmp_path, layer, channels):
        model = TinyImageMultiExit()
        args = make_dedier_args(
            tmp_path, num_train_epochs=2, dedier_layer=layer, dedier_readout_optimizer="sgd", eval_strategy="epoch"
        )
        trainer = EarlyExitTrainer(
            model=model,
            args=args,
            train_dataset=tiny_images(24),
            eval_dataset=tiny_images(8, seed=1).add_column("group", [0, 1] * 4),
            data_collator=DefaultDataCollator(),
        )
        trainer.train()
        callback = trainer._dedier
        assert callback.num_reweighs == 1
        assert callback.readout.block.conv1.in_channels == channels  # BasicBlock C -> 2C on the stage's maps
        assert callback.readout.classifier.in_features == 2 * channels

        # Re-weigh the trained model from weights 1 and check against the readout on independently computed maps.
        callback.weights = torch.ones(24)
        callback.reweigh()
        images = torch.tensor(trainer.train_dataset["pixel_values"])
        labels = torch.tensor(trainer.train_dataset["label"])
        with torch.no_grad():
            maps = model.eval()(images, output_hidden_states=True).hidden_states[layer]
            logits = callback.readout(maps)
        expected = dedier_weights(logits, labels, torch.ones(24), 0.2, 3.0)
        torch.testing.assert_close(callback.weights, expected)
        evaluation = next(h for h in trainer.state.log_history if "eval_loss" in h)
        assert {"eval_worst_group_accuracy", "eval_group_0_accuracy", "eval_exit_0_accuracy"} <= set(evaluation)

    def test_output_without_exit_logits_is_an_error(self, tmp_path):
        class NoExits(TinyImageMultiExit):
            def forward(self, pixel_values, labels=None, output_hidden_states=None):
                return TinyImageOutput(logits=super().forward(pixel_values).logits)

        trainer = EarlyExitTrainer(
            model=NoExits(),
            args=make_dedier_args(tmp_path),
            train_dataset=tiny_images(8),
            data_collator=DefaultDataCollator(),
        )
        with pytest.raises(TypeError, match="output to have `exit_logits`, got a TinyImageOutput"):
            trainer.train()


# ---- group metrics ------------------------------------------------------------------------------------------------


class TestGroupMetrics:
    def test_group_accuracies(self):
        metrics = group_accuracies(
            np.array([0, 1, 1, 0, 1, 1]), np.array([0, 1, 0, 0, 1, 0]), np.array([5, 5, 2, 2, 2, 9])
        )
        assert metrics == {
            "worst_group_accuracy": 0.0,
            "mean_group_accuracy": pytest.approx((2 / 3 + 1 + 0) / 3),
            "group_2_accuracy": pytest.approx(2 / 3),
            "group_5_accuracy": 1.0,
            "group_9_accuracy": 0.0,
        }
        assert list(metrics)[2:] == ["group_2_accuracy", "group_5_accuracy", "group_9_accuracy"]
        with pytest.raises(ValueError, match="same shape"):
            group_accuracies([0, 1], [0, 1], [0])
        with pytest.raises(ValueError, match="groups must hold integers"):
            group_accuracies([0, 1], [0, 1], [0.5, 1.0])

    @pytest.mark.parametrize("with_teacher", [False, True])
    def test_exit_compute_metrics_reads_trailing_groups(self, with_teacher):
        labels = np.array([0, 1, 1, -100, 0])
        final = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
        groups = np.array([0, 0, 1, 1, 1])
        predictions = (final, final, final) + ((final,) if with_teacher else ()) + (groups,)
        metrics = make_exit_compute_metrics(with_teacher=with_teacher)(
            EvalPrediction(predictions=predictions, label_ids=labels)
        )
        # Group 0: rows 0, 1 right; group 1: rows 2 and 4 wrong (row 3 is ignored).
        assert metrics["group_0_accuracy"] == 1.0 and metrics["group_1_accuracy"] == 0.0
        assert metrics["worst_group_accuracy"] == 0.0 and metrics["mean_group_accuracy"] == 0.5
        assert metrics["accuracy"] == 0.5 and ("teacher_accuracy" in metrics) == with_teacher

    def test_trainer_reports_group_metrics_without_dedier(self, tmp_path):
        evaluation_set = tiny_dataset(16, seed=1).add_column("group", [i % 3 for i in range(16)])
        trainer = make_early_exit_trainer(tmp_path, eval_=evaluation_set)
        metrics = trainer.evaluate()
        predictions = trainer.predict(evaluation_set)
        labels = np.array(evaluation_set["label"])
        expected = group_accuracies(predictions.predictions[0].argmax(-1), labels, np.arange(16) % 3)
        for key, value in expected.items():
            assert metrics[f"eval_{key}"] == pytest.approx(value)
        assert f"eval_exit_{NUM_EXITS - 1}_accuracy" in metrics
        trainer.log(metrics)
        assert list(trainer.latest_eval_metrics()) == ["eval"]
