"""Single-process unit tests of hf_kd/distributed.py and of the sharded teacher-logits pass; the real multi-process runs
are in tests/distributed/test_scaling.py."""

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import DataCollatorWithPadding, TrainingArguments

from hf_kd import DistillConfig
from hf_kd.distributed import (
    deepspeed_teacher_config,
    fill_auto_bucket_sizes,
    parameter_counts,
    prepare_deepspeed_teacher,
)
from hf_kd.import_utils import is_deepspeed_available
from hf_kd.teacher import compute_teacher_logits

from .testing_utils import tiny_bert, tiny_dataset, tiny_multi_exit, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
require_deepspeed = pytest.mark.skipif(not is_deepspeed_available(), reason="needs deepspeed: pip install hf_kd[deepspeed]")


def args(tmp_path, **kwargs):
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to="none",
                             **kwargs)


class TestTeacherConfig:
    STUDENT = {
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": False},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
        "scheduler": {"type": "WarmupLR"},
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 2,
        "zero_optimization": {
            "stage": 2,
            "offload_optimizer": {"device": "cpu"},
            "offload_param": {"device": "cpu"},
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": 1000,
            "contiguous_gradients": True,
        },
    }

    def test_zero3_teacher_from_a_zero2_student(self, tmp_path):
        config = deepspeed_teacher_config(self.STUDENT, args(tmp_path, bf16=True), stage=3, hidden_size=32)
        assert "optimizer" not in config and "scheduler" not in config and "gradient_clipping" not in config
        assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
        assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (4, 2)
        assert config["train_batch_size"] == 8  # 4 x 2 x 1 process
        assert config["zero_optimization"] == {
            "stage": 3,
            "offload_param": {"device": "cpu"},  # the teacher's weights may live on the CPU; no optimizer to offload
            "reduce_bucket_size": 32 * 32,
            "stage3_prefetch_bucket_size": 1000,  # the student's explicit value wins over the default 0.9 h^2
            "stage3_param_persistence_threshold": 320,
        }
        assert self.STUDENT["zero_optimization"]["stage"] == 2, "the student's config was modified"
        assert "auto" not in json.dumps(config)

    def test_replicated_teacher(self, tmp_path):
        config = deepspeed_teacher_config(self.STUDENT, args(tmp_path), stage=0)
        assert config["zero_optimization"] == {"stage": 0} and config["bf16"] == {"enabled": False}

    @pytest.mark.parametrize("stage", [1, 2])
    def test_stages_without_effect_on_a_teacher_are_rejected(self, tmp_path, stage):
        with pytest.raises(ValueError, match=rf"teacher_zero_stage must be one of \(0, 3\), got {stage}"):
            deepspeed_teacher_config(self.STUDENT, args(tmp_path), stage=stage)
        with pytest.raises(ValueError, match=rf"teacher_zero_stage must be one of \(0, 3\) .*got {stage}"):
            DistillConfig(output_dir=str(tmp_path), teacher_zero_stage=stage)

    @pytest.mark.parametrize("name", ["zero2", "zero3"])
    def test_shipped_configs(self, tmp_path, name):
        """The recipes' DeepSpeed files give a valid teacher config (no optimizer block: the Trainer's AdamW)."""
        student = json.loads((ROOT / "trainers" / "deepspeed" / f"{name}.json").read_text())
        assert "optimizer" not in student and student["zero_allow_untested_optimizer"] is True
        config = deepspeed_teacher_config(student, args(tmp_path), stage=3, hidden_size=384)
        assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 3840
        assert "auto" not in json.dumps(config)


@pytest.fixture
def zero3_hf_config():
    """transformers' global DeepSpeed config of trainers/deepspeed/zero3.json, unset after the test (while it is set,
    transformers builds every model into ZeRO-3 shards)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    config = HfTrainerDeepSpeedConfig(json.loads((ROOT / "trainers" / "deepspeed" / "zero3.json").read_text()))
    unset_hf_deepspeed_config()
    yield config
    unset_hf_deepspeed_config()


class TestBucketSizes:
    def test_filled_from_the_backbone_of_a_multi_exit_model(self, zero3_hf_config):
        fill_auto_bucket_sizes(zero3_hf_config, tiny_multi_exit().config)  # hidden 32, in backbone_config only
        zero = zero3_hf_config.config["zero_optimization"]
        assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (1024, 921)
        assert zero["stage3_param_persistence_threshold"] == 320

    def test_left_to_transformers_for_a_flat_config(self, zero3_hf_config):
        fill_auto_bucket_sizes(zero3_hf_config, tiny_bert().config)
        assert zero3_hf_config.config["zero_optimization"]["reduce_bucket_size"] == "auto"


@require_deepspeed
def test_teacher_whose_deepspeed_init_fails(tmp_path, monkeypatch):
    """A teacher DeepSpeed cannot initialise: the error names the teacher, the stage and the ways out."""
    import deepspeed

    def fail(**kwargs):
        raise AssertionError("Check batch related parameters")

    monkeypatch.setattr(deepspeed, "initialize", fail)
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config={})))
    with pytest.raises(RuntimeError, match=r"could not initialise the teacher 'BertForSequenceClassification' for "
                       r"ZeRO-3 inference \(AssertionError: Check batch.*teacher_zero_stage=0.*cache_teacher_logits"):
        prepare_deepspeed_teacher(tiny_bert(), accelerator, args(tmp_path), stage=3)


def test_parameter_counts_of_an_unsharded_model():
    model = tiny_bert()
    total = sum(p.numel() for p in model.parameters())
    assert parameter_counts(model) == (total, total)


@pytest.mark.parametrize("num_rows, batch_size", [(13, 4), (8, 4), (3, 4)])
def test_sharded_logits_pass_sums_to_the_single_process_pass(tmp_path, num_rows, batch_size):
    """Each process computes its round-robin share of the batches, with the same number of forwards (a ZeRO-3 teacher's
    forward is a collective), and the sum of the shares is the single-process result."""
    tokenizer = tiny_tokenizer(tmp_path)
    data = tiny_dataset(num_rows, seed=2)
    collator = DataCollatorWithPadding(tokenizer)
    teacher = tiny_bert(seed=7).eval()
    calls = []
    original_forward = teacher.forward

    @functools.wraps(original_forward)  # keeps the signature the teacher's inputs are selected by
    def counting_forward(*a, **k):
        calls[-1] += 1
        return original_forward(*a, **k)

    teacher.forward = counting_forward
    calls.append(0)
    full = compute_teacher_logits(teacher, data, collator, batch_size, torch.device("cpu"))
    shares = []
    for rank in range(2):
        calls.append(0)
        shares.append(compute_teacher_logits(teacher, data, collator, batch_size, torch.device("cpu"),
                                             process_index=rank, num_processes=2))
    num_batches = -(-num_rows // batch_size)
    assert calls == [num_batches, -(-num_batches // 2), -(-num_batches // 2)]
    torch.testing.assert_close(shares[0] + shares[1], full, rtol=0, atol=1e-6)
    assert all(((s != 0).any(-1)).sum() > 0 for s in shares) or num_batches == 1
    assert (((shares[0] != 0).any(-1) & (shares[1] != 0).any(-1))).sum() == 0, "a row was computed twice"
