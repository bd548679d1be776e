"""PEFT students: heads derived leaf by leaf into modules_to_save, save / reload / merge, the base model as teacher,
and the errors for bad input (hf_kd/peft_utils.py, `peft_config=` of every trainer)."""

import json
import warnings

import pytest
import torch
from torch import nn

import hf_kd.peft_utils
from hf_kd import DistillConfig, EarlyExitConfig
from hf_kd.peft_utils import (
    BaseModelTeacher,
    LoraArguments,
    frozen_head_names,
    get_peft_config,
    head_module_names,
    point_adapter_at_hub_base,
    prepare_peft_model,
    untrained_head_reason,
)

from .testing_utils import (
    make_distill_args,
    make_distill_trainer,
    make_early_exit_args,
    make_early_exit_trainer,
    require_peft,
    tiny_bert,
    tiny_dataset,
    tiny_multi_exit,
)

pytestmark = require_peft


def lora(**kwargs):
    from peft import LoraConfig

    return LoraConfig(**{"r": 4, "lora_alpha": 8, "task_type": "SEQ_CLS", **kwargs})


def batch(n=6, seed=3):
    data = tiny_dataset(n, seed=seed, equal_lengths=True)
    return {"input_ids": torch.tensor(data["input_ids"]), "attention_mask": torch.tensor(data["attention_mask"])}


def trainable_modules(peft_model):
    """Names of the base-model modules with trainable weights, adapters excluded."""
    names = set()
    for name, param in peft_model.get_base_model().named_parameters():
        if param.requires_grad and "lora_" not in name:
            names.add(name.split(".modules_to_save.")[0])
    return names


class TestHeadModuleNames:
    def test_sequence_classifier_head(self):
        assert head_module_names(tiny_bert()) == ["classifier"]

    def test_exit_heads_leaf_by_leaf(self):
        """A ModuleList is expanded into the parameter-owning leaves of every exit (PEFT rejects a ModuleList)."""
        model = tiny_multi_exit(exit_head_type="pooler")
        expected = [f"exits.{i}.{leaf}" for i in range(3) for leaf in ("dense", "classifier")]
        assert head_module_names(model) == expected

    def test_declared_module_dict_heads(self):
        class WithKDLayers(nn.Module):
            _hf_kd_heads = ("kd_layers",)

            def __init__(self):
                super().__init__()
                self.body = nn.Linear(4, 4)
                self.kd_layers = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Sequential(nn.ReLU(), nn.Linear(4, 2))})

        assert head_module_names(WithKDLayers()) == ["kd_layers.a", "kd_layers.b.1"]

    def test_composite_classifier_kept_whole(self):
        """RoBERTa-style `classifier` (dense + out_proj) and a declared head holding one: PEFT's SEQ_CLS entry wraps a
        `classifier` whole, so listing its parts too would wrap them twice."""

        class Head(nn.Module):
            def __init__(self):
                super().__init__()
                self.dense, self.out_proj = nn.Linear(4, 4), nn.Linear(4, 2)

        class Model(nn.Module):
            _hf_kd_heads = ("exits",)

            def __init__(self):
                super().__init__()
                self.classifier = Head()
                self.exits = nn.ModuleList([nn.ModuleDict({"classifier": Head(), "norm": nn.LayerNorm(4)})])

        assert head_module_names(Model()) == ["exits.0.classifier", "exits.0.norm", "classifier"]


class TestPreparePeftModel:
    def test_every_exit_head_trains_and_lora_goes_on_the_backbone(self):
        config = lora()
        model = prepare_peft_model(tiny_multi_exit(exit_head_type="pooler"), config, seed=0)
        assert trainable_modules(model) == set(head_module_names(tiny_multi_exit(exit_head_type="pooler")))
        # The backbone's own defaults (BERT: query, value): PEFT cannot infer them for a multi-exit model type.
        assert set(model.peft_config["default"].target_modules) == {"query", "value"}
        assert any("backbone.encoder.layer.0.attention.self.query.lora_A" in n for n, _ in model.named_parameters())
        # No head is wrapped twice (PEFT's own SEQ_CLS 'classifier' entry matches the same leaves).
        assert not any(n.count("modules_to_save") > 1 for n, _ in model.named_parameters())
        assert config.modules_to_save is None and config.target_modules is None  # the caller's config is untouched
        assert frozen_head_names(model) == []

    def test_user_modules_to_save_kept(self):
        model = prepare_peft_model(tiny_bert(), lora(modules_to_save=["bert.pooler.dense"]), seed=0)
        assert trainable_modules(model) == {"classifier", "bert.pooler.dense"}

    def test_adapter_init_is_seeded(self):
        a = prepare_peft_model(tiny_bert(), lora(), seed=5)
        torch.manual_seed(123)  # whatever the global RNG state
        b = prepare_peft_model(tiny_bert(), lora(), seed=5)
        for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(pa, pb), name

    def test_frozen_heads_of_a_peft_model_are_warned_about(self):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(tiny_multi_exit(), LoraConfig(r=4, target_modules=["query"]))
        with pytest.warns(UserWarning, match=r"heads \['exits.0.classifier', 'exits.1.classifier', 'exits.2.classifier'\] frozen"):
            assert prepare_peft_model(model, None) is model

    def test_peft_model_together_with_a_peft_config_is_an_error(self):
        model = prepare_peft_model(tiny_bert(), lora(), seed=0)
        with pytest.raises(ValueError, match="already a PeftModelForSequenceClassification and a peft_config"):
            prepare_peft_model(model, lora())

    def test_peft_config_of_the_wrong_type(self):
        with pytest.raises(TypeError, match="peft_config must be a peft.PeftConfig .* got dict"):
            prepare_peft_model(tiny_bert(), {"r": 8})

    def test_peft_missing_names_the_extra(self, monkeypatch, tmp_path):
        monkeypatch.setattr(hf_kd.peft_utils, "is_peft_available", lambda: False)
        with pytest.raises(ImportError, match=r"pip install hf_kd\[peft\]"):
            prepare_peft_model(tiny_bert(), lora())
        with pytest.raises(ImportError, match=r"pip install hf_kd\[peft\]"):
            make_distill_trainer(tmp_path, teacher=tiny_bert(seed=7), peft_config=lora())
        with pytest.raises(ImportError, match=r"--use_peft need the `peft` package: `pip install hf_kd\[peft\]`"):
            get_peft_config(LoraArguments(use_peft=True))

    def test_lora_arguments(self):
        assert get_peft_config(LoraArguments()) is None
        config = get_peft_config(LoraArguments(use_peft=True, lora_r=2, lora_target_modules=["key"]))
        assert (config.r, config.task_type, set(config.target_modules)) == (2, "SEQ_CLS", {"key"})


def save_as_hub_cache_snapshot(model, root, repo_id="hf-kd-test/tiny-bert"):
    """Save `model` where the Hugging Face cache would keep `repo_id`; return the snapshot folder."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0"
    model.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0")
    return snapshot


class TestPeftDistillTrainer:
    def test_train_save_reload_merge(self, tmp_path):
        """LoRA + the classifier train; the base does not; the saved adapter reloads (AutoPeftModel) and merges to the
        same outputs; adapter and card name the base by its Hub id (PEFT wrote the local snapshot path)."""
        from huggingface_hub import ModelCard
        from peft import AutoPeftModelForSequenceClassification
        from transformers import AutoModelForSequenceClassification

        cache = tmp_path / "hub"
        snapshot = save_as_hub_cache_snapshot(tiny_bert(seed=1), cache)
        student = AutoModelForSequenceClassification.from_pretrained(snapshot)
        base_before = {n: p.clone() for n, p in student.named_parameters()}
        args = make_distill_args(tmp_path, learning_rate=1e-2, num_train_epochs=2)
        trainer = make_distill_trainer(tmp_path, teacher=tiny_bert(seed=7), args=args, student=student, peft_config=lora())
        trainer.train()
        model = trainer.model
        for name, param in model.get_base_model().named_parameters():
            original = name.replace(".original_module", "").replace(".base_layer", "")
            if not param.requires_grad and original in base_before:
                assert torch.equal(param, base_before[original]), f"frozen {name} changed"
        assert not torch.equal(model.get_base_model().classifier.modules_to_save["default"].weight,
                               base_before["classifier.weight"])

        out = tmp_path / "saved"
        trainer.save_model(out)
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "hf-kd-test/tiny-bert"
        card = ModelCard.load(out / "README.md")
        assert card.data.base_model == "hf-kd-test/tiny-bert" and card.data.library_name == "peft"

        inputs = batch()
        model.eval()
        with torch.no_grad():
            expected = model(**inputs).logits
            reloaded = AutoPeftModelForSequenceClassification.from_pretrained(out, cache_dir=cache)
            reloaded.eval()
            torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=1e-6)
            merged = reloaded.merge_and_unload()
            assert type(merged).__name__ == "BertForSequenceClassification"
            torch.testing.assert_close(merged(**inputs).logits, expected, rtol=0, atol=1e-5)
            # The card's quick start (pipeline / from_pretrained of the adapter folder) loads base + adapter + heads.
            plain = AutoModelForSequenceClassification.from_pretrained(out, cache_dir=cache).eval()
            torch.testing.assert_close(plain(**inputs).logits, expected, rtol=0, atol=1e-6)

    def test_point_adapter_keeps_other_local_paths(self, tmp_path):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "base")}))
        point_adapter_at_hub_base(tmp_path)
        assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
            tmp_path / "base"
        )


class TestBaseModelTeacher:
    def test_teacher_is_the_base_model_before_and_after_training(self, tmp_path):
        original = tiny_bert(seed=1)
        reference = tiny_bert(seed=1).eval()
        args = make_distill_args(tmp_path, teacher_from_base_model=True, learning_rate=1e-2, num_train_epochs=2)
        trainer = make_distill_trainer(tmp_path, teacher=None, args=args, student=original, peft_config=lora())
        assert isinstance(trainer.teacher_model, BaseModelTeacher)
        assert trainer.teacher_placement == {"kind": "student_base_model", "num_processes": 1}
        inputs = batch()
        with torch.no_grad():
            expected = reference(**inputs).logits
        trainer.train()
        student_logits = trainer.model(**inputs).logits
        assert not torch.allclose(student_logits, expected, atol=1e-4), "the student did not train"
        trainer.model.train()
        torch.testing.assert_close(trainer.teacher_model(**inputs).logits, expected, rtol=0, atol=1e-6)
        assert trainer.model.training, "the teacher forward left the student in eval mode"

    def test_untrained_base_head_warns(self, tmp_path):
        # A student loaded from a base encoder (num_labels=2: a fresh head) made a random teacher without a word
        # (kd_loss 0.0003 from the first step).
        from transformers import AutoModelForSequenceClassification, BertModel

        BertModel(tiny_bert().config).save_pretrained(tmp_path / "encoder")
        fresh = AutoModelForSequenceClassification.from_pretrained(tmp_path / "encoder", num_labels=2)
        args = make_distill_args(tmp_path, teacher_from_base_model=True)
        with pytest.warns(UserWarning, match=r"its head `classifier` has an all-zero bias.*the teacher is random"):
            make_distill_trainer(tmp_path, teacher=None, args=args, student=fresh, peft_config=lora())
        # A trained head (saved after training, reloaded): no warning.
        trained = tiny_bert(seed=1)
        with torch.no_grad():
            trained.classifier.bias.copy_(torch.tensor([0.3, -0.2]))
        trained.save_pretrained(tmp_path / "fine_tuned")
        student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "fine_tuned")
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            make_distill_trainer(tmp_path, teacher=None, args=args, student=student, peft_config=lora())

    def test_untrained_head_without_bias_is_found_from_the_loading_marks(self, tmp_path):
        from transformers import GPT2ForSequenceClassification, GPT2Model

        from .testing_utils import tiny_gpt2

        GPT2Model(tiny_gpt2().config).save_pretrained(tmp_path / "gpt2")
        model = GPT2ForSequenceClassification.from_pretrained(tmp_path / "gpt2", num_labels=2)
        assert "`score` was not in the checkpoint" in untrained_head_reason(model)
        model.save_pretrained(tmp_path / "classifier")
        assert untrained_head_reason(GPT2ForSequenceClassification.from_pretrained(tmp_path / "classifier")) is None
        # Through a PEFT wrapper, the base model's own head is read (not the trainable copy).
        assert "all-zero bias" in untrained_head_reason(prepare_peft_model(tiny_bert(), lora()))

    def test_cached_logits_do_not_depend_on_the_adapter_init(self, tmp_path):
        """The cache key is the frozen base weights: two LoRA inits, one cache file, equal to the base's logits."""
        data = tiny_dataset(16, seed=4)
        for seed in (0, 1):
            args = make_distill_args(tmp_path, teacher_from_base_model=True, cache_teacher_logits=True, seed=seed)
            trainer = make_distill_trainer(tmp_path, teacher=None, args=args, student=tiny_bert(seed=1), train=data,
                                   peft_config=lora())
        assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # train and eval splits, once each
        rows = tiny_dataset(16, seed=4, equal_lengths=False)
        with torch.no_grad():
            first = tiny_bert(seed=1).eval()(input_ids=torch.tensor([rows["input_ids"][0]])).logits[0]
        torch.testing.assert_close(torch.tensor(trainer.train_dataset["teacher_logits"][0]), first, rtol=0, atol=1e-5)

    def test_early_exit_trainer_base_teacher_and_exit_heads(self, tmp_path):
        from peft import AutoPeftModelForSequenceClassification

        base_dir = tmp_path / "base"
        tiny_multi_exit().save_pretrained(base_dir)
        from hf_kd import MultiExitForSequenceClassification

        model = MultiExitForSequenceClassification.from_pretrained(base_dir)
        args = make_early_exit_args(tmp_path, distill_from="teacher", teacher_from_base_model=True, learning_rate=1e-2)
        trainer = make_early_exit_trainer(tmp_path, model=model, args=args, peft_config=lora())
        before = {n: p.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        for i in range(3):
            name = f"base_model.model.exits.{i}.classifier.modules_to_save.default.weight"
            assert not torch.equal(dict(trainer.model.named_parameters())[name], before[name]), f"exit {i} frozen"
        out = tmp_path / "saved"
        trainer.save_model(out)
        reloaded = AutoPeftModelForSequenceClassification.from_pretrained(out).eval()
        trainer.model.eval()
        inputs = batch()
        with torch.no_grad():
            expected = trainer.model(**inputs).exit_logits
            for a, b in zip(reloaded(**inputs).exit_logits, expected):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
            for a, b in zip(reloaded.merge_and_unload()(**inputs).exit_logits, expected):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    def test_errors(self, tmp_path):
        with pytest.raises(ValueError, match="needs a PEFT student .* got a BertForSequenceClassification"):
            make_distill_trainer(tmp_path, teacher=None, args=make_distill_args(tmp_path, teacher_from_base_model=True))
        with pytest.raises(ValueError, match="a teacher was given too"):
            make_distill_trainer(tmp_path, teacher=tiny_bert(seed=7), args=make_distill_args(tmp_path, teacher_from_base_model=True),
                         peft_config=lora())
        with pytest.raises(ValueError, match="teacher_model_name_or_path='t' was set too"):
            DistillConfig(output_dir=str(tmp_path), teacher_from_base_model=True, teacher_model_name_or_path="t")
        with pytest.raises(ValueError, match="teacher_from_base_model=True are only used with distill_from='teacher'"):
            EarlyExitConfig(output_dir=str(tmp_path), teacher_from_base_model=True)


def test_warnings_for_a_student_built_in_memory_only(tmp_path):
    """A student loaded from a folder wraps silently; one built from a config is warned about: its adapter could not
    name (so AutoPeftModel could not reload) its base model."""
    from hf_kd import MultiExitForSequenceClassification

    tiny_multi_exit().save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        prepare_peft_model(MultiExitForSequenceClassification.from_pretrained(tmp_path / "base"), lora(), seed=0)
    with pytest.warns(UserWarning, match="has no name_or_path .* save the model"):
        prepare_peft_model(tiny_multi_exit(), lora(), seed=0)
