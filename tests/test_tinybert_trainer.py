"""TinyBERTTrainer and TinyBERTConfig: the TinyBERT integration (projection trained, saved beside the student, resumed
exactly; teachers of other widths, depths and architectures). The pure pieces are tested in tests/test_tinybert.py."""

import math

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F
from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding

from hf_kd import TinyBERTConfig, TinyBERTTrainer, kd_loss
from hf_kd.tinybert import attention_score_mse, hidden_state_mse
from hf_kd.trainer.tinybert_trainer import PROJECTION_FILENAME

from .testing_utils import (
    hooked_scores,
    make_tinybert_args,
    make_tinybert_trainer,
    snapshot,
    tiny_bert,
    tiny_dataset,
    tiny_mpnet,
    tiny_tokenizer,
    tinybert_masked,
)

STAGE1 = dict(hidden_loss_weight=1.0, attention_loss_weight=1.0, embedding_loss_weight=1.0, prediction_loss_weight=0.0)


# ---- TinyBERTConfig ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [({"hidden_loss_weight": 1.0, "cache_teacher_logits": True}, "cache_teacher_logits=True cannot serve"),
     ({"intermediate_layer_map": [2, 4]}, r"intermediate_layer_map=\[2, 4\] is set but every intermediate loss"),
     ({"attention_loss_weight": -1.0}, "attention_loss_weight must be >= 0, got -1.0"),
     ({"prediction_loss_weight": 0.0}, "every loss is switched off"),
     ({"hidden_loss_weight": 1.0, "intermediate_projection": "mlp"}, "intermediate_projection must be one of"),
     ({"hidden_loss_weight": 1.0, "intermediate_layer_map": [0, 2]}, r"ints >= 1\), got \[0\]")],
)
def test_config_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TinyBERTConfig(output_dir=str(tmp_path), **kwargs)


def test_projection_option_is_an_enum_given_as_string_or_member(tmp_path):
    from hf_kd.trainer.tinybert_config import TinyBERTProjection

    args = TinyBERTConfig(output_dir=str(tmp_path), hidden_loss_weight=1.0, intermediate_projection="identity")
    assert args.intermediate_projection is TinyBERTProjection.IDENTITY
    args = TinyBERTConfig(output_dir=str(tmp_path), intermediate_projection=TinyBERTProjection.LINEAR)
    assert args.intermediate_projection == "linear" and args.to_dict()["intermediate_projection"] == "linear"
    with pytest.raises(ValueError, match=r"intermediate_projection must be one of \('linear', 'identity'\), got 'mlp'"):
        TinyBERTConfig(output_dir=str(tmp_path), intermediate_projection="mlp")


def test_trainer_needs_its_own_config(tmp_path):
    from hf_kd import DistillConfig, LetKDConfig, LetKDTrainer

    with pytest.raises(TypeError, match="args must be a TinyBERTConfig, got DistillConfig"):
        TinyBERTTrainer(model=tiny_bert(seed=1), args=DistillConfig(output_dir=str(tmp_path)), teacher_model=tiny_bert())
    with pytest.raises(TypeError, match="args must be a LetKDConfig, got TinyBERTConfig"):
        LetKDTrainer(model=tiny_bert(seed=1), args=TinyBERTConfig(output_dir=str(tmp_path)), teacher_model=tiny_bert())
    assert not isinstance(LetKDConfig(output_dir=str(tmp_path)), TinyBERTConfig)


def test_plain_distill_config_has_no_tinybert_or_letkd_fields(tmp_path):
    from dataclasses import fields

    from hf_kd import DistillConfig

    names = {f.name for f in fields(DistillConfig)}
    assert not names & {"hidden_loss_weight", "prediction_loss_weight", "intermediate_projection", "letkd"}
    with pytest.raises(TypeError, match="hidden_loss_weight"):
        DistillConfig(output_dir=str(tmp_path), hidden_loss_weight=1.0)


# ---- TinyBERTTrainer --------------------------------------------------------------------------------------------


def eager_internals(model, batch):
    """Hidden states and eager softmax inputs of one forward, without hf_kd's hooks (a reference)."""
    inputs = []
    original = F.softmax

    def softmax(x, *args, **kwargs):
        inputs.append(x)
        return original(x, *args, **kwargs)

    model.set_attn_implementation("eager")
    torch.nn.functional.softmax = softmax
    try:
        out = model(**batch, output_hidden_states=True)
    finally:
        torch.nn.functional.softmax = original
        model.set_attn_implementation("sdpa")
    return out, inputs


class TestTinyBERTTrainer:
    def test_loss_is_the_weighted_sum_of_tinybert_losses(self, tmp_path):
        """Teacher 4 layers x 48, student 2 layers x 32: loss = w_pred * KD + w_e L_embd + w_h L_hidn + w_a L_attn,
        against a reference built from eager softmax inputs and output_hidden_states."""
        teacher, student = tiny_bert(layers=4, hidden=48, seed=7), tiny_bert(layers=2, hidden=32, seed=1)
        weights = dict(hidden_loss_weight=1.5, attention_loss_weight=0.5, embedding_loss_weight=2.0, prediction_loss_weight=0.3)
        trainer = make_tinybert_trainer(tmp_path, teacher, student=student, args=make_tinybert_args(tmp_path, **weights))
        assert trainer._intermediate.layer_map == [2, 4]
        projection = trainer.intermediate_projection
        assert projection.dense.weight.shape == (48, 32)
        batch = next(iter(trainer.get_train_dataloader()))
        assert (batch["attention_mask"] == 0).any()  # padding in the batch
        loss = trainer.compute_loss(student, dict(batch))

        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        mask = batch["attention_mask"]
        s_out, s_scores = eager_internals(student, inputs)
        with torch.no_grad():
            t_out, t_scores = eager_internals(teacher, inputs)
        embd = hidden_state_mse(projection(s_out.hidden_states[0]), t_out.hidden_states[0], mask)
        hidn = sum(hidden_state_mse(projection(s_out.hidden_states[m]), t_out.hidden_states[2 * m], mask) for m in (1, 2))
        attn = sum(attention_score_mse(s_scores[m - 1], t_scores[2 * m - 1], mask) for m in (1, 2))
        pred = kd_loss(s_out.logits, t_out.logits, batch["labels"], 2.0, 0.5)
        expected = 0.3 * pred + 2.0 * embd + 1.5 * hidn + 0.5 * attn
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
        assert attn > 0 and hidn > 0 and embd > 0

    def test_stage1_trains_projection_and_saves_a_plain_student(self, tmp_path):
        teacher, student = tiny_bert(layers=4, hidden=48, seed=7), tiny_bert(layers=2, hidden=32, seed=1)
        teacher_before, student_before = snapshot(teacher), snapshot(student)
        trainer = make_tinybert_trainer(tmp_path, teacher, student=student, args=make_tinybert_args(tmp_path, **STAGE1))
        projection_before = snapshot(trainer.intermediate_projection)
        trainer.train()
        for name, param in teacher.named_parameters():
            assert torch.equal(param, teacher_before[name]), name
        for name, param in trainer.intermediate_projection.named_parameters():
            assert not torch.equal(param, projection_before[name]), f"projection {name} was not trained"
        changed = [n for n, p in student.named_parameters() if not torch.equal(p, student_before[n])]
        assert any(".encoder.layer.1." in n for n in changed)
        # Stage 1 has no prediction loss: the classifier gets no gradient.
        assert torch.equal(student.classifier.weight, student_before["classifier.weight"])

        history = trainer.state.log_history
        assert any({"hidden_loss", "attention_loss", "embedding_loss"} <= set(h) for h in history)
        evaluation = next(h for h in history if "eval_loss" in h)
        assert {"eval_hidden_loss", "eval_attention_loss", "eval_embedding_loss", "eval_sigma"} <= set(evaluation)
        # Gradients outside the model are cleared after each step too (Trainer only clears the model's).
        assert all(p.grad is None for p in trainer.intermediate_projection.parameters())
        # Any split's evaluation gets its own losses under its own prefix.
        metrics = trainer.evaluate(tiny_dataset(8, seed=2), metric_key_prefix="test")
        assert {"test_hidden_loss", "test_attention_loss", "test_kd_loss", "test_sigma"} <= set(metrics)
        assert not any(k.startswith("eval_") for k in metrics)

        out = tmp_path / "saved"
        trainer.save_model(str(out))
        reloaded, info = BertForSequenceClassification.from_pretrained(out, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        assert set(reloaded.state_dict()) == set(student.state_dict())
        saved = load_file(out / PROJECTION_FILENAME)
        torch.testing.assert_close(saved["dense.weight"], trainer.intermediate_projection.dense.weight)
        card = (out / "README.md").read_text()
        assert "hidden_loss_weight" in card and "intermediate_layer_map" in card

    def test_mpnet_teacher_of_another_width(self, tmp_path):
        """MPNet teacher (relative position bias in its scores), 4 layers x 48 -> BERT student 2 x 32."""
        trainer = make_tinybert_trainer(tmp_path, tiny_mpnet(), student=tiny_bert(seed=1), args=make_tinybert_args(tmp_path, **STAGE1))
        trainer.train()
        losses = [h["attention_loss"] for h in trainer.state.log_history if "attention_loss" in h]
        assert losses and all(math.isfinite(x) and x > 0 for x in losses)

    def test_explicit_layer_map_and_identity_projection(self, tmp_path):
        teacher, student = tiny_bert(layers=4, seed=7), tiny_bert(layers=2, seed=1)
        args = make_tinybert_args(tmp_path, intermediate_layer_map=[1, 3], intermediate_projection="identity", **STAGE1)
        trainer = make_tinybert_trainer(tmp_path, teacher, student=student, args=args)
        assert trainer._intermediate.layer_map == [1, 3] and trainer._projection_parameters() == []
        trainer.train()
        trainer.save_model(str(tmp_path / "saved"))
        assert not (tmp_path / "saved" / PROJECTION_FILENAME).exists()

    @pytest.mark.parametrize(
        "kwargs, teacher_kwargs, message",
        [({"intermediate_layer_map": [1, 5]}, {}, r"in \[1, 4\] .*got \[5\]"),
         ({"intermediate_layer_map": [1, 2, 3]}, {}, "the student has 2 layers, the map 3 entries"),
         ({}, {"heads": 8}, "student has 4 heads and the teacher 8"),
         ({"intermediate_projection": "identity"}, {"hidden": 48}, "needs equal widths")],
    )
    def test_bad_pairs_are_errors_at_init(self, tmp_path, kwargs, teacher_kwargs, message):
        teacher = tiny_bert(layers=4, seed=7, hidden=teacher_kwargs.get("hidden", 32))
        if "heads" in teacher_kwargs:  # same widths, other head count
            teacher = BertForSequenceClassification(BertConfig(**{**teacher.config.to_dict(), "num_attention_heads": 8}))
        with pytest.raises(ValueError, match=message):
            make_tinybert_trainer(tmp_path, teacher, args=make_tinybert_args(tmp_path, **STAGE1, **kwargs))

    def test_logits_column_without_teacher_is_an_error(self, tmp_path):
        train = tiny_dataset(16).add_column("teacher_logits", [[1.0, -1.0]] * 16)
        with pytest.raises(ValueError, match="need the teacher's hidden states"):
            make_tinybert_trainer(tmp_path, None, train=train, args=make_tinybert_args(tmp_path, **STAGE1))

    def test_gradient_accumulation_matches_large_batch(self, tmp_path):
        """One SGD step on 8 examples equals 2 accumulated micro-batches of 4, student and projection alike."""
        data = tiny_dataset(8, seed=3)
        results = []
        for batch_size, accumulation in [(8, 1), (4, 2)]:
            student = tiny_bert(seed=1)
            args = make_tinybert_args(
                tmp_path / f"bs{batch_size}", per_device_train_batch_size=batch_size, optim="sgd", learning_rate=0.5,
                gradient_accumulation_steps=accumulation, max_steps=1, eval_strategy="no", lr_scheduler_type="constant",
                **{**STAGE1, "prediction_loss_weight": 1.0},
            )
            trainer = make_tinybert_trainer(tmp_path, tiny_bert(layers=4, hidden=48, seed=7), args=args, student=student, train=data)
            trainer.train()
            results.append({**snapshot(student), **snapshot(trainer.intermediate_projection)})
        for name in results[0]:
            torch.testing.assert_close(results[0][name], results[1][name], atol=1e-5, rtol=1e-4, msg=name)

    def test_interrupted_and_resumed_equals_uninterrupted(self, tmp_path):
        args = make_tinybert_args(tmp_path, num_train_epochs=2, save_strategy="steps", save_steps=3, eval_strategy="no", **STAGE1)
        student = tiny_bert(seed=1)
        uninterrupted = make_tinybert_trainer(tmp_path, tiny_bert(layers=4, hidden=48, seed=7), args=args, student=student)
        uninterrupted.train()
        final = {**snapshot(student), **snapshot(uninterrupted.intermediate_projection)}
        checkpoint = tmp_path / "out" / "checkpoint-3"
        assert (checkpoint / PROJECTION_FILENAME).exists()

        resumed_student = tiny_bert(seed=5)  # other weights: everything must come from the checkpoint
        resumed = make_tinybert_trainer(tmp_path, tiny_bert(layers=4, hidden=48, seed=7), args=args, student=resumed_student)
        with torch.no_grad():
            resumed.intermediate_projection.dense.weight.zero_()
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert resumed.state.global_step == uninterrupted.state.global_step == 8
        got = {**snapshot(resumed_student), **snapshot(resumed.intermediate_projection)}
        for name in final:
            torch.testing.assert_close(got[name], final[name], atol=0, rtol=0, msg=name)

    def test_resuming_without_projection_file_is_an_error(self, tmp_path):
        args = make_tinybert_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1, eval_strategy="no")
        make_tinybert_trainer(tmp_path, tiny_bert(layers=4, hidden=48, seed=7), args=args).train()
        args = make_tinybert_args(tmp_path, max_steps=2, save_strategy="no", eval_strategy="no", **STAGE1)
        trainer = make_tinybert_trainer(tmp_path, tiny_bert(layers=4, hidden=48, seed=7), args=args)
        with pytest.raises(ValueError, match=f"has no {PROJECTION_FILENAME}"):
            trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))

    def test_model_init_gets_a_fresh_projection(self, tmp_path):
        args = make_tinybert_args(tmp_path, max_steps=2, eval_strategy="no", **STAGE1)
        tokenizer = tiny_tokenizer(tmp_path)
        trainer = TinyBERTTrainer(
            model=None, model_init=lambda: tiny_bert(seed=1), args=args, teacher_model=tiny_bert(layers=4, hidden=48, seed=7),
            train_dataset=tiny_dataset(32), processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
        )
        initial = snapshot(trainer.intermediate_projection)
        trainer.train()
        first = snapshot(trainer.intermediate_projection)
        trainer.train()  # model_init again: student and projection start over, same seed -> same result
        for name, value in snapshot(trainer.intermediate_projection).items():
            assert not torch.equal(value, initial[name])
            torch.testing.assert_close(value, first[name], atol=0, rtol=0)


@pytest.mark.slow
def test_real_pairs_minilm_l6_to_l3_and_mpnet_to_minilm(tmp_path):
    """The real pairs of the issue, a few steps each on Rotten Tomatoes: MiniLM-L6 -> MiniLM-L3 (same width, 12
    heads) and MPNet (768, 12 layers) -> MiniLM-L6 (384) through the token id map; scores of the real SDPA models
    equal their eager softmax inputs."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_kd import data

    tokenizer = AutoTokenizer.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    rows = data.load_rotten_tomatoes()["train"].shuffle(seed=0).select(range(16))
    rows = rows.map(lambda b: tokenizer(b["text"], truncation=True, max_length=32), batched=True)
    pairs = [
        ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/paraphrase-MiniLM-L3-v2", {}, [2, 4, 6]),
        ("sentence-transformers/all-mpnet-base-v2", "sentence-transformers/all-MiniLM-L6-v2",
         {"map_teacher_token_ids": True}, [2, 4, 6, 8, 10, 12]),
    ]
    for teacher_id, student_id, extra, expected_map in pairs:
        torch.manual_seed(0)
        teacher = AutoModelForSequenceClassification.from_pretrained(teacher_id, num_labels=2)
        student = AutoModelForSequenceClassification.from_pretrained(student_id, num_labels=2)
        args = TinyBERTConfig(
            output_dir=str(tmp_path / student_id.split("/")[1]), max_steps=2, per_device_train_batch_size=8,
            learning_rate=1e-4, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, **STAGE1, **extra,
        )
        trainer = TinyBERTTrainer(model=student, args=args, teacher_model=teacher, train_dataset=rows,
                                  processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                                  teacher_processing_class=AutoTokenizer.from_pretrained(teacher_id))
        assert trainer._intermediate.layer_map == expected_map
        assert trainer.intermediate_projection.dense.weight.shape == (teacher.config.hidden_size, 384)
        trainer.train()
        logged = [h for h in trainer.state.log_history if "hidden_loss" in h]
        assert len(logged) == 2 and all(math.isfinite(h["loss"]) and h["attention_loss"] > 0 for h in logged)

    student = AutoModelForSequenceClassification.from_pretrained("sentence-transformers/all-MiniLM-L6-v2").eval()
    batch = tokenizer(rows["text"][:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = hooked_scores(student, dict(batch))
        _, eager = eager_internals(student, dict(batch))
    for a, b in zip(ours, eager, strict=True):
        torch.testing.assert_close(tinybert_masked(a), tinybert_masked(b), atol=1e-4, rtol=1e-4)


def test_card_metric_keys_of_the_train_split_are_skipped():
    from hf_kd.trainer.base_trainer import split_metric_key

    assert split_metric_key("eval_teacher_ece") == ("eval", "teacher_ece")
    assert split_metric_key("eval_train_sigma") == ("eval_train", "sigma")
    assert split_metric_key("train_teacher_ece") is None and split_metric_key("train_ece") is None
