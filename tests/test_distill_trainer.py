import math

import datasets
import pytest
import torch
from transformers import DataCollatorWithPadding

import hf_kd.data
import hf_kd.teacher
from hf_kd import DistillConfig, kd_loss
from hf_kd.teacher import TEACHER_LOGITS_COLUMN, build_token_id_map

from .testing_utils import (
    WORDS,
    make_distill_args,
    make_distill_trainer,
    snapshot,
    tiny_bert,
    tiny_dataset,
    tiny_tokenizer,
)


class TestDistillConfig:
    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
            ({"temperature": -1}, "got -1"),
            ({"alpha": 1.5}, "alpha must be in [0.0, 1.0], got 1.5"),
            ({"label_smoothing_factor": 0.1}, "label_smoothing_factor=0.1"),
        ],
    )
    def test_bad_values_are_named(self, tmp_path, kwargs, message):
        with pytest.raises(ValueError) as err:
            DistillConfig(output_dir=str(tmp_path), **kwargs)
        assert message in str(err.value)

    def test_every_field_has_help(self):
        from dataclasses import fields

        own = {f.name for f in fields(DistillConfig)} - {f.name for f in fields(DistillConfig.__mro__[1])}
        assert own >= {"teacher_model_name_or_path", "temperature", "alpha", "cache_teacher_logits"}
        for f in fields(DistillConfig):
            if f.name in own:
                assert f.metadata.get("help"), f.name

    def test_init_kwargs_from_json_string(self, tmp_path):
        args = DistillConfig(output_dir=str(tmp_path), teacher_model_init_kwargs='{"revision": "main"}')
        assert args.teacher_model_init_kwargs == {"revision": "main"}


class TestDistillTrainer:
    def test_student_learns_teacher_frozen(self, tmp_path):
        teacher = tiny_bert(seed=7)
        teacher.train()  # the trainer must put it in eval mode
        teacher_before, student = snapshot(teacher), tiny_bert(seed=1)
        student_before = snapshot(student)
        trainer = make_distill_trainer(tmp_path, teacher, student=student)
        trainer.train()

        assert not trainer.teacher_model.training
        assert all(not p.requires_grad for p in trainer.teacher_model.parameters())
        for name, param in teacher.named_parameters():
            assert torch.equal(param, teacher_before[name]), f"teacher parameter {name} changed"
        for name, param in student.named_parameters():
            assert not torch.equal(param, student_before[name]), f"student parameter {name} did not change"

        history = trainer.state.log_history
        assert history[-1]["train_loss"] is not None and math.isfinite(history[-1]["train_loss"])
        assert any("kd_loss" in h and "ce_loss" in h for h in history)
        evaluation = next(h for h in history if "eval_loss" in h)
        for key in ("eval_accuracy", "eval_ece", "eval_nll", "eval_brier", "eval_entropy", "eval_sigma",
                    "eval_teacher_accuracy", "eval_kd_loss"):
            assert key in evaluation, key

    def test_loss_is_kd_loss(self, tmp_path):
        teacher, student = tiny_bert(seed=7), tiny_bert(seed=1)
        args = make_distill_args(tmp_path, temperature=3.0, alpha=0.3)
        trainer = make_distill_trainer(tmp_path, teacher, args=args, student=student)
        batch = next(iter(trainer.get_train_dataloader()))
        labels = batch["labels"]
        loss = trainer.compute_loss(student, dict(batch))
        with torch.no_grad():
            s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(loss, kd_loss(s, t, labels, temperature=3.0, alpha=0.3))

    def test_gradient_accumulation_matches_large_batch(self, tmp_path):
        """One SGD step on 8 examples equals two accumulated micro-batches of 4 (loss normalised by item count)."""
        data = tiny_dataset(8, equal_lengths=True)
        results = []
        for batch_size, accumulation in [(8, 1), (4, 2)]:
            student = tiny_bert(seed=1)
            args = make_distill_args(
                tmp_path / f"bs{batch_size}", per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.5, max_steps=1,
                eval_strategy="no", lr_scheduler_type="constant",
            )
            make_distill_trainer(tmp_path, tiny_bert(seed=7), args=args, student=student, train=data).train()
            results.append(snapshot(student))
        for name in results[0]:
            torch.testing.assert_close(results[0][name], results[1][name], atol=1e-5, rtol=1e-4)

    def test_user_supplied_teacher_logits_need_no_teacher(self, tmp_path):
        train = tiny_dataset(16)
        train = train.add_column(TEACHER_LOGITS_COLUMN, [[2.0, -2.0]] * len(train))
        eval_ = tiny_dataset(8, seed=1)
        eval_ = eval_.add_column(TEACHER_LOGITS_COLUMN, [[2.0, -2.0]] * len(eval_))
        trainer = make_distill_trainer(tmp_path, None, train=train, eval_=eval_)
        trainer.train()
        assert trainer.teacher_model is None
        assert trainer.state.log_history[-1]["train_loss"] > 0

    def test_no_teacher_at_all_is_an_error(self, tmp_path):
        with pytest.raises(ValueError, match="needs a teacher"):
            make_distill_trainer(tmp_path, None)

    def test_cached_run_never_loads_teacher(self, tmp_path, monkeypatch):
        teacher = tiny_bert(seed=7)
        first = make_distill_trainer(tmp_path, teacher, args=make_distill_args(tmp_path, cache_teacher_logits=True))
        files = list((tmp_path / "cache").glob("*.safetensors"))
        assert len(files) == 2  # train and eval splits
        cached = torch.tensor(first.train_dataset[TEACHER_LOGITS_COLUMN])
        with torch.no_grad():
            batch = DataCollatorWithPadding(tiny_tokenizer(tmp_path))(
                [{k: r[k] for k in ("input_ids", "attention_mask")} for r in first.train_dataset]
            )
            expected = teacher(**batch).logits
        torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)

        def fail(*args, **kwargs):
            raise AssertionError("the teacher was loaded although its logits were cached")

        monkeypatch.setattr(hf_kd.trainer.teacher_mixin, "load_teacher", fail)
        second = make_distill_trainer(tmp_path, teacher, args=make_distill_args(tmp_path, cache_teacher_logits=True))
        second.train()
        assert second.teacher_model is None
        assert "eval_sigma" in next(h for h in second.state.log_history if "eval_loss" in h)

    def test_cache_key_changes_with_teacher_weights(self, tmp_path):
        make_distill_trainer(tmp_path, tiny_bert(seed=7), args=make_distill_args(tmp_path, cache_teacher_logits=True))
        make_distill_trainer(tmp_path, tiny_bert(seed=8), args=make_distill_args(tmp_path, cache_teacher_logits=True))
        assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4

    def test_corrupt_cache_file_is_an_error(self, tmp_path):
        teacher = tiny_bert(seed=7)
        make_distill_trainer(tmp_path, teacher, args=make_distill_args(tmp_path, cache_teacher_logits=True))
        for path in (tmp_path / "cache").glob("*.safetensors"):
            path.write_bytes(path.read_bytes()[:40])
        with pytest.raises(ValueError, match="unreadable"):
            make_distill_trainer(tmp_path, teacher, args=make_distill_args(tmp_path, cache_teacher_logits=True))

    def test_teacher_from_path(self, tmp_path):
        teacher = tiny_bert(seed=7)
        teacher.save_pretrained(tmp_path / "teacher")
        tiny_tokenizer(tmp_path).save_pretrained(tmp_path / "teacher")
        args = make_distill_args(tmp_path, teacher_model_name_or_path=str(tmp_path / "teacher"), cache_teacher_logits=True)
        trainer = make_distill_trainer(tmp_path, None, args=args)
        trainer.train()
        assert trainer.teacher_model is not None and not trainer.teacher_model.training

    def test_teacher_folder_without_tokenizer(self, tmp_path):
        tiny_bert(seed=7).save_pretrained(tmp_path / "teacher")
        trainer = make_distill_trainer(tmp_path, str(tmp_path / "teacher"))
        assert trainer.teacher_model is not None  # online teacher, loaded at init

    @pytest.mark.parametrize("teacher", ["outputs/teacher-l6-rotten_tomatoes", "outputs/no/such/teacher"])
    def test_missing_teacher_path_is_named(self, tmp_path, monkeypatch, teacher):
        # A path `make demo` does not create (it writes outputs/main_job/teacher) used to fail with transformers'
        # "couldn't connect to huggingface.co" (or "Repo id must be in the form ...") without naming it.
        monkeypatch.chdir(tmp_path)
        args = make_distill_args(tmp_path, teacher_model_name_or_path=teacher,
                         teacher_model_init_kwargs={"local_files_only": True})
        with pytest.raises(FileNotFoundError) as error:
            make_distill_trainer(tmp_path, None, args=args)
        message = str(error.value)
        assert f"Teacher '{teacher}' is neither a local folder nor a Hub id reachable now" in message
        assert "`make demo`, which writes outputs/main_job/teacher" in message
        assert "trainers/distill.py --method erm" in message

    def test_init_kwargs_with_built_teacher_is_an_error(self, tmp_path):
        args = make_distill_args(tmp_path, teacher_model_init_kwargs={"revision": "main"})
        with pytest.raises(ValueError, match="already built teacher"):
            make_distill_trainer(tmp_path, tiny_bert(seed=7), args=args)


class TestTeacherCompatibility:
    def test_label_space_mismatch(self, tmp_path):
        with pytest.raises(ValueError, match="student predicts 2 labels but the teacher predicts 3"):
            make_distill_trainer(tmp_path, tiny_bert(num_labels=3, seed=7))

    def test_label_names_mismatch(self, tmp_path):
        teacher = tiny_bert(seed=7, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
        student = tiny_bert(seed=1, id2label={0: "pos", 1: "neg"}, label2id={"pos": 0, "neg": 1})
        with pytest.raises(ValueError, match="order their labels differently"):
            make_distill_trainer(tmp_path, teacher, student=student)

    def test_label_names_differ_says_names_not_order(self, tmp_path):
        # Same order (0 first), other names: the message says which names differ, not that the order does.
        teacher = tiny_bert(seed=7, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
        student = tiny_bert(seed=1, id2label={0: "rotten", 1: "fresh"}, label2id={"rotten": 0, "fresh": 1})
        with pytest.raises(ValueError, match=r"name their labels differently \(student only: \['fresh', 'rotten'\], "
                           r"teacher only: \['neg', 'pos'\]\)") as error:
            make_distill_trainer(tmp_path, teacher, student=student)
        assert "order" not in str(error.value)

    @staticmethod
    def class_encoded(dataset, names):
        """`dataset` with its labels as a ClassLabel of `names` (what `class_encode_column` makes of string labels:
        the names sorted, so "fresh" = 0)."""
        return dataset.cast_column("label", datasets.ClassLabel(names=names))

    def test_dataset_labels_in_another_order_than_the_teachers_are_refused(self, tmp_path):
        # The README's student (num_labels=2, default LABEL_i names) passes check_label_spaces; the dataset's
        # ClassLabel (fresh=0) against the teacher's label2id (fresh=1) trained silently before, with
        # eval_teacher_accuracy 0 and sigma NaN.
        teacher = tiny_bert(seed=7, id2label={0: "rotten", 1: "fresh"}, label2id={"rotten": 0, "fresh": 1})
        train = self.class_encoded(tiny_dataset(32), ["fresh", "rotten"])
        with pytest.raises(ValueError) as error:
            make_distill_trainer(tmp_path, teacher, train=train)
        message = str(error.value)
        assert "The train_dataset and the teacher order their labels differently" in message
        assert "train_dataset label2id={'fresh': 0, 'rotten': 1}" in message
        assert "teacher label2id={'rotten': 0, 'fresh': 1}" in message
        assert "train_dataset = hf_kd.data.align_labels(train_dataset, teacher.config.label2id)" in message
        # The one-line fix works: the labels are renumbered by name and the trainer builds.
        fixed = hf_kd.data.align_labels(train, teacher.config.label2id)
        assert fixed.features["label"].names == ["rotten", "fresh"]
        assert fixed["label"] == [1 - label for label in train["label"]]
        make_distill_trainer(tmp_path, teacher, train=fixed)

    def test_eval_dataset_labels_are_checked_against_student_and_teacher(self, tmp_path):
        names = {"id2label": {0: "rotten", 1: "fresh"}, "label2id": {"rotten": 0, "fresh": 1}}
        teacher, student = tiny_bert(seed=7, **names), tiny_bert(seed=1, **names)
        swapped = self.class_encoded(tiny_dataset(16, seed=1), ["fresh", "rotten"])
        with pytest.raises(ValueError, match=r"The eval_dataset\['b'\] and the student order their labels differently.*"
                           r"`eval_dataset\['b'\] = hf_kd.data.align_labels\(eval_dataset\['b'\], student"):
            make_distill_trainer(tmp_path, teacher, student=student, eval_={"a": tiny_dataset(8), "b": swapped})
        trainer = make_distill_trainer(tmp_path, teacher, student=student)
        with pytest.raises(ValueError, match="The eval_dataset and the student order their labels differently"):
            trainer.evaluate(swapped)
        # Same names in the same order (case aside), default LABEL_i models, nameless labels: accepted.
        make_distill_trainer(tmp_path, teacher, student=student, train=self.class_encoded(tiny_dataset(32), ["ROTTEN", "Fresh"]))
        make_distill_trainer(tmp_path, tiny_bert(seed=7), train=self.class_encoded(tiny_dataset(32), ["fresh", "rotten"]))
        make_distill_trainer(tmp_path, teacher, student=student, train=self.class_encoded(tiny_dataset(32), ["0", "1"]))

    def test_other_label_names_are_refused_with_the_rename_fix(self, tmp_path):
        teacher = tiny_bert(seed=7, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
        train = self.class_encoded(tiny_dataset(32), ["negative", "positive"])
        with pytest.raises(ValueError, match=r"name their labels differently \(the train_dataset only: \['negative', "
                           r"'positive'\], the teacher only: \['neg', 'pos'\]\).*cast_column"):
            make_distill_trainer(tmp_path, teacher, train=train)

    def test_vocabulary_mismatch_is_an_error(self, tmp_path):
        teacher = tiny_bert(seed=7, vocab_size=103)
        with pytest.raises(ValueError, match="vocabularies differ.*map_teacher_token_ids"):
            make_distill_trainer(tmp_path, teacher)

    def test_token_id_map_feeds_teacher_its_own_ids(self, tmp_path):
        """An MPNet-like teacher vocabulary: 4 specials first, the student's words shifted, mask last."""
        student_tok = tiny_tokenizer(tmp_path)
        teacher_words = ["<s>", "<pad>", "</s>", "<unk>"] + WORDS + ["<mask>"]
        teacher_tok = tiny_tokenizer(tmp_path, words=teacher_words, specials=[])
        teacher_tok.cls_token, teacher_tok.sep_token, teacher_tok.pad_token = "<s>", "</s>", "<pad>"
        teacher_tok.unk_token, teacher_tok.mask_token = "<unk>", "<mask>"
        id_map = build_token_id_map(student_tok, teacher_tok)
        text = "w3 w17 w93"
        student_ids = torch.tensor(student_tok(text)["input_ids"])
        teacher_ids = torch.tensor(teacher_tok(text, add_special_tokens=False)["input_ids"])
        assert id_map[student_ids][1:-1].tolist() == teacher_ids.tolist()
        assert id_map[student_tok.cls_token_id] == teacher_tok.cls_token_id
        assert id_map[student_tok.pad_token_id] == teacher_tok.pad_token_id

        teacher = tiny_bert(seed=7, vocab_size=len(teacher_tok))
        args = make_distill_args(tmp_path, map_teacher_token_ids=True)
        trainer = make_distill_trainer(tmp_path, teacher, args=args, teacher_processing_class=teacher_tok)
        trainer.train()
        assert trainer.state.log_history[-1]["train_loss"] > 0

    def test_unmappable_vocabulary_is_an_error(self, tmp_path):
        teacher_tok = tiny_tokenizer(tmp_path, words=[f"x{i}" for i in range(94)])
        with pytest.raises(ValueError, match="not in the teacher vocabulary"):
            build_token_id_map(tiny_tokenizer(tmp_path), teacher_tok)


@pytest.mark.slow
def test_real_mpnet_teacher_reads_minilm_ids():
    """The real pair of ENVIRONMENT.md: MiniLM (BERT WordPiece) student ids mapped to MPNet teacher ids give exactly
    MPNet's own tokenization and therefore the same teacher logits."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_kd import data
    from hf_kd.teacher import teacher_logits_for_batch

    student_tok = AutoTokenizer.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    teacher_tok = AutoTokenizer.from_pretrained("sentence-transformers/all-mpnet-base-v2")
    id_map = build_token_id_map(student_tok, teacher_tok)
    texts = data.load_rotten_tomatoes()["test"]["text"][:200]
    for text in texts:
        mapped = id_map[torch.tensor(student_tok(text)["input_ids"])].tolist()
        assert mapped == teacher_tok(text)["input_ids"], text

    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained("sentence-transformers/all-mpnet-base-v2", num_labels=2)
    teacher.eval()
    batch = student_tok(texts[:4], padding=True, return_tensors="pt")
    own = teacher_tok(texts[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = teacher(**own).logits
    torch.testing.assert_close(teacher_logits_for_batch(teacher, dict(batch), id_map), expected, atol=1e-5, rtol=1e-5)
