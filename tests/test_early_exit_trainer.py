"""EarlyExitTrainer: joint multi-exit training, self-distillation and teacher distillation into the exits."""

import math

import pytest
import torch
from torch.nn import functional as F
from transformers import DataCollatorWithPadding, EvalPrediction, HfArgumentParser

import hf_kd.trainer.teacher_mixin
from hf_kd import (
    DistillConfig,
    DistillTrainer,
    EarlyExitConfig,
    MultiExitForSequenceClassification,
    kd_loss,
    make_exit_compute_metrics,
)
from hf_kd.teacher import TEACHER_LOGITS_COLUMN

from .testing_utils import (
    NUM_EXITS,
    exit_logits_of,
    make_early_exit_args,
    make_early_exit_trainer,
    snapshot,
    tiny_bert,
    tiny_dataset,
    tiny_multi_exit,
    tiny_tokenizer,
)


class TestEarlyExitConfig:
    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
            ({"alpha": -0.1}, "alpha must be in [0.0, 1.0], got -0.1"),
            ({"distill_from": "teachr"}, "distill_from must be one of ('none', 'final_exit', 'teacher'), got 'teachr'"),
            ({"exit_loss_weights": "quadratic"}, "got 'quadratic'"),
            ({"exit_loss_weights": [1.0, -1.0, 1.0]}, "exit_loss_weights must be >= 0 with a positive sum, got [1.0, -1"),
            ({"exit_loss_weights": [0.0, 0.0]}, "got [0.0, 0.0]"),
            ({"cache_teacher_logits": True}, "only used with distill_from='teacher'"),
            ({"label_smoothing_factor": 0.1}, "label_smoothing_factor=0.1"),
        ],
    )
    def test_bad_values_are_named(self, tmp_path, kwargs, message):
        with pytest.raises(ValueError) as err:
            EarlyExitConfig(output_dir=str(tmp_path), **kwargs)
        assert message in str(err.value)

    def test_command_line(self, tmp_path):
        parser = HfArgumentParser(EarlyExitConfig)
        (args,) = parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--exit_loss_weights", "1,2,3", "--distill_from", "teacher",
             "--teacher_model_name_or_path", "t", "--teacher_model_init_kwargs", '{"revision": "main"}']
        )
        assert args.exit_loss_weights == [1.0, 2.0, 3.0] and args.distill_from == "teacher"
        assert args.teacher_model_init_kwargs == {"revision": "main"}
        (args,) = HfArgumentParser(DistillConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--teacher_model_name_or_path", "t", "--cache_teacher_logits", "true"]
        )
        assert args.teacher_model_name_or_path == "t" and args.cache_teacher_logits

    def test_choice_options_are_enums_given_as_strings_or_members(self, tmp_path):
        from hf_kd.trainer.early_exit_config import DedierReadoutOptimizer, DistillFrom, ExitLossWeighting

        args = EarlyExitConfig(output_dir=str(tmp_path), distill_from="final_exit", exit_loss_weights="linear")
        assert args.distill_from is DistillFrom.FINAL_EXIT and args.exit_loss_weights is ExitLossWeighting.LINEAR
        args = EarlyExitConfig(output_dir=str(tmp_path), distill_from=DistillFrom.TEACHER, dedier=True,
                               dedier_readout_optimizer="sgd")
        assert args.distill_from == "teacher" and args.dedier_readout_optimizer is DedierReadoutOptimizer.SGD
        assert args.to_dict()["distill_from"] == "teacher" and f"{args.distill_from}" == "teacher"

    def test_wrong_number_of_weights_is_an_error(self, tmp_path):
        with pytest.raises(ValueError, match="exit_loss_weights has 2 weights but the model has 3 exits"):
            make_early_exit_trainer(tmp_path, args=make_early_exit_args(tmp_path, exit_loss_weights=[1.0, 2.0]))

    @pytest.mark.parametrize(
        "weights, expected",
        [(None, [1 / 3] * 3), ("uniform", [1 / 3] * 3), ("linear", [1 / 6, 2 / 6, 3 / 6]), ([1, 0, 3], [0.25, 0, 0.75])],
    )
    def test_weights(self, tmp_path, weights, expected):
        trainer = make_early_exit_trainer(tmp_path, args=make_early_exit_args(tmp_path, exit_loss_weights=weights))
        assert trainer.exit_loss_weights == pytest.approx(expected)

    def test_plain_classifier_is_an_error(self, tmp_path):
        with pytest.raises(TypeError, match="trains a multi-exit model .* got a model with a BertConfig"):
            make_early_exit_trainer(tmp_path, model=tiny_bert(seed=1))

    def test_teacher_without_distill_from_teacher_is_an_error(self, tmp_path):
        with pytest.raises(ValueError, match="set distill_from='teacher'"):
            make_early_exit_trainer(tmp_path, teacher=tiny_bert(seed=7))


class TestEarlyExitLoss:
    @pytest.mark.parametrize("distill_from", ["none", "final_exit", "teacher"])
    def test_loss_is_hand_computed_weighted_sum(self, tmp_path, distill_from):
        model, teacher = tiny_multi_exit(), tiny_bert(seed=7)
        args = make_early_exit_args(tmp_path, exit_loss_weights=[1.0, 2.0, 5.0], distill_from=distill_from, temperature=3.0,
                         alpha=0.3)
        trainer = make_early_exit_trainer(tmp_path, model=model, args=args, teacher=teacher if distill_from == "teacher" else None)
        batch = next(iter(trainer.get_train_dataloader()))
        labels = batch["labels"]
        loss = trainer.compute_loss(model, dict(batch))

        z = exit_logits_of(model, batch)
        w = [1 / 8, 2 / 8, 5 / 8]
        ce = [F.cross_entropy(zi, labels) for zi in z]
        if distill_from == "none":
            expected = sum(wi * c for wi, c in zip(w, ce))
        elif distill_from == "final_exit":
            expected = sum(wi * kd_loss(zi, z[-1], labels, 3.0, 0.3) for wi, zi in zip(w[:-1], z[:-1])) + w[-1] * ce[-1]
        else:
            with torch.no_grad():
                t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            kd = [kd_loss(zi, t, labels, 3.0, 0.3) for zi in z]
            manual = [0.3 * 9.0 * F.kl_div(F.log_softmax(zi / 3, -1), F.softmax(t / 3, -1), reduction="batchmean")
                      + 0.7 * c for zi, c in zip(z, ce)]
            torch.testing.assert_close(torch.stack(kd), torch.stack(manual))
            expected = sum(wi * k for wi, k in zip(w, kd))
        torch.testing.assert_close(loss, expected)
        assert set(trainer._metrics["train"]) == {f"exit_{i}_ce_loss" for i in range(NUM_EXITS)}

    def test_self_distillation_sends_no_soft_gradient_into_final_exit(self, tmp_path):
        """With alpha=1 the final exit's soft targets are detached: its head gets only its own CE gradient."""
        model = tiny_multi_exit()
        args = make_early_exit_args(tmp_path, distill_from="final_exit", alpha=1.0, exit_loss_weights=[1.0, 1.0, 0.0])
        trainer = make_early_exit_trainer(tmp_path, model=model, args=args)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.compute_loss(model, dict(batch)).backward()
        assert all(p.grad is None or not p.grad.any() for p in model.exits[-1].parameters())
        assert model.exits[0].classifier.weight.grad.abs().sum() > 0

    def test_num_items_in_batch_normalisation(self, tmp_path):
        model = tiny_multi_exit()
        trainer = make_early_exit_trainer(tmp_path, model=model)
        batch = next(iter(trainer.get_train_dataloader()))
        mean = trainer.compute_loss(model, dict(batch))
        summed = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(2 * len(batch["labels"])))
        torch.testing.assert_close(summed, mean / 2)


class TestEarlyExitTrainer:
    def test_training_changes_every_exit_and_the_backbone(self, tmp_path):
        model = tiny_multi_exit()
        before = snapshot(model)
        trainer = make_early_exit_trainer(tmp_path, model=model, args=make_early_exit_args(tmp_path, exit_loss_weights="linear"))
        trainer.train()
        for name, param in model.named_parameters():
            if name.startswith("backbone.pooler"):
                continue  # unused by "linear" exit heads, which read the [CLS] hidden state
            assert not torch.equal(param, before[name]), f"{name} did not change"
        for i in range(NUM_EXITS):
            assert f"exits.{i}.classifier.weight" in before
        history = trainer.state.log_history
        assert math.isfinite(history[-1]["train_loss"])
        assert any(all(f"exit_{i}_ce_loss" in h for i in range(NUM_EXITS)) for h in history)
        evaluation = next(h for h in history if "eval_loss" in h)
        for i in range(NUM_EXITS):
            for metric in ("accuracy", "ece", "entropy"):
                assert f"eval_exit_{i}_{metric}" in evaluation, (i, metric)
        for key in ("eval_accuracy", "eval_ece", "eval_nll", "eval_exit_0_ce_loss"):
            assert key in evaluation, key
        assert evaluation["eval_accuracy"] == evaluation[f"eval_exit_{NUM_EXITS - 1}_accuracy"]
        # The card reports the final exit only: per-exit metrics do not become splits.
        assert list(trainer.latest_eval_metrics()) == ["eval"]

    def test_teacher_unchanged_and_frozen(self, tmp_path):
        teacher = tiny_bert(seed=7)
        teacher.train()
        before = snapshot(teacher)
        trainer = make_early_exit_trainer(tmp_path, args=make_early_exit_args(tmp_path, distill_from="teacher"), teacher=teacher)
        trainer.train()
        assert not trainer.teacher_model.training
        assert all(not p.requires_grad for p in trainer.teacher_model.parameters())
        for name, param in teacher.named_parameters():
            assert torch.equal(param, before[name]), f"teacher parameter {name} changed"
        evaluation = next(h for h in trainer.state.log_history if "eval_loss" in h)
        assert "eval_teacher_accuracy" in evaluation and "eval_exit_0_accuracy" in evaluation

    @pytest.mark.parametrize("trainer_class", ["early_exit", "distill"])
    def test_cached_run_never_loads_teacher(self, tmp_path, monkeypatch, trainer_class):
        teacher = tiny_bert(seed=7)

        def build():
            if trainer_class == "distill":
                tokenizer = tiny_tokenizer(tmp_path)
                args = DistillConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                                     max_steps=2, per_device_train_batch_size=8, eval_strategy="epoch",
                                     cache_teacher_logits=True, teacher_logits_cache_dir=str(tmp_path / "cache"))
                return DistillTrainer(model=tiny_bert(seed=1), args=args, teacher_model=teacher,
                                      train_dataset=tiny_dataset(32), eval_dataset=tiny_dataset(16, seed=1),
                                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer))
            args = make_early_exit_args(tmp_path, distill_from="teacher", cache_teacher_logits=True,
                             teacher_logits_cache_dir=str(tmp_path / "cache"))
            return make_early_exit_trainer(tmp_path, args=args, teacher=teacher)

        first = build()
        assert TEACHER_LOGITS_COLUMN in first.train_dataset.column_names
        assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2

        def fail(*args, **kwargs):
            raise AssertionError("the teacher was loaded although its logits were cached")

        monkeypatch.setattr(hf_kd.trainer.teacher_mixin, "load_teacher", fail)
        second = build()
        second.train()
        assert second.teacher_model is None
        assert "eval_sigma" in next(h for h in second.state.log_history if "eval_loss" in h)

    def test_resume_restores_exit_heads_exactly(self, tmp_path):
        args = make_early_exit_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, eval_strategy="no",
                         distill_from="final_exit")
        model = tiny_multi_exit()
        make_early_exit_trainer(tmp_path, model=model, args=args).train()
        final = snapshot(model)
        checkpoint = tmp_path / "out" / "checkpoint-1"
        card = (checkpoint / "README.md").read_text()
        assert "EarlyExitTrainer" in card and "2004.12993" in card and "| distill_from | final_exit |" in card

        resumed_model = tiny_multi_exit(seed=5)  # other weights: everything must come from the checkpoint
        resumed = make_early_exit_trainer(tmp_path, model=resumed_model, args=args)
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert resumed.state.global_step == 2
        for name, param in resumed_model.named_parameters():
            torch.testing.assert_close(param, final[name], atol=0, rtol=0, msg=name)

        reloaded = MultiExitForSequenceClassification.from_pretrained(tmp_path / "out" / "checkpoint-2")
        for i in range(NUM_EXITS):
            torch.testing.assert_close(reloaded.exits[i].classifier.weight, final[f"exits.{i}.classifier.weight"],
                                       atol=0, rtol=0)


class TestExitComputeMetrics:
    def test_per_exit_metrics(self):
        labels = torch.tensor([0, 1, 1, -100])
        e0 = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
        e1 = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [5.0, 0.0]])
        metrics = make_exit_compute_metrics()(EvalPrediction(predictions=(e1, e0, e1), label_ids=labels.numpy()))
        assert metrics["exit_0_accuracy"] == pytest.approx(2 / 3)
        assert metrics["exit_1_accuracy"] == metrics["accuracy"] == 1.0
        assert metrics["exit_1_ece"] == pytest.approx(metrics["ece"])
        p = torch.softmax(torch.tensor([2.0, 0.0]), 0)
        assert metrics["exit_0_entropy"] == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)
        with_teacher = make_exit_compute_metrics(with_teacher=True)(
            EvalPrediction(predictions=(e1, e0, e1, e0), label_ids=labels.numpy())
        )
        assert with_teacher["teacher_accuracy"] == pytest.approx(2 / 3) and "exit_2_accuracy" not in with_teacher
        with pytest.raises(ValueError, match="at least 3 arrays"):
            make_exit_compute_metrics(with_teacher=True)(EvalPrediction(predictions=(e1, e1), label_ids=labels))
