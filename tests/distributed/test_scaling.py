"""Scaling out (README section "Scaling out"): the recipes of trainers/ launched exactly as the README says, on 2 CPU
processes, against the same run on 1 process.

Tiny BERTs (hidden 32, a WordPiece vocabulary of the 400 most frequent Rotten Tomatoes words) on 64 real Rotten
Tomatoes rows, 8 optimiser steps of global batch 8 (1 process x 8 rows, or 2 processes x 4). Every launch costs ~7 s
of start-up, and the first DeepSpeed one builds a communication op (~35 s, cached in ~/.cache/torch_extensions), so
there are four, each checking several things:

- DDP (`accelerate launch --config_file trainers/accelerate/multi_process.yaml`): LoRA student, teacher = its own
  base model (adapters disabled);
- ZeRO-3 (`trainers/accelerate/deepspeed_zero3.yaml`): a multi-exit student distilled from a teacher **sharded**
  over the processes (each holds about half its parameters), checkpoints that reload with `from_pretrained`;
- ZeRO-3 with a LoRA student, cached base-model logits computed by both processes, the adapter reloaded;
- ZeRO-2 through the `deepspeed` launcher (`--deepspeed trainers/deepspeed/zero2.json`), with the teacher still
  sharded by ZeRO-3 and its logits cache computed by both processes together.

Tolerance: per-step training losses, gradient norms and test metrics within 1e-5 (absolute) of the 1-process run;
final weights within 1e-3. Measured here (scripts/tools/scaling_diffs.py): at most 6e-8 for losses and gradient norms, 5e-9
for metrics, 2e-6 for weights.
"""

import collections
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..testing_utils import require_peft, tiny_bert

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5  # losses, gradient norms, metrics
WEIGHT_TOLERANCE = 1e-3
# What DeepSpeed needs on a CPU-only machine, set for the launched processes only (never in the user's environment):
# its CPU accelerator (it then talks over gloo) and no GPU.
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "CUDA_VISIBLE_DEVICES": "",
    "DS_ACCELERATOR": "cpu",
    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
}
RECIPE = """\
dataset_name: rotten_tomatoes
model_name_or_path: {student}
max_train_samples: 64
max_eval_samples: 32
max_length: 32
num_train_epochs: 1
learning_rate: 1.0e-2
logging_steps: 1
per_device_eval_batch_size: 8
save_strategy: epoch
use_cpu: true
report_to: none
seed: 0
"""
LAUNCHERS = {
    "ddp": ["-m", "accelerate.commands.launch", "--config_file", "trainers/accelerate/multi_process.yaml"],
    "zero3": ["-m", "accelerate.commands.launch", "--config_file", "trainers/accelerate/deepspeed_zero3.yaml"],
    "deepspeed": ["-m", "deepspeed.launcher.runner", "--num_gpus", "2"],
}

pytestmark = [pytest.mark.multiprocess, pytest.mark.skipif(sys.platform != "linux", reason="gloo launches")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny teacher and student (different seeds) with a 400-word vocabulary of the training data."""
    from transformers import BertTokenizer

    from hf_kd import data

    root = tmp_path_factory.mktemp("models")
    counts = collections.Counter(
        word for text in data.load_rotten_tomatoes(seed=42)["train"]["text"] for word in re.findall(r"\w+", text.lower())
    )
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                              + [w for w, _ in counts.most_common(400)]) + "\n")
    tokenizer = BertTokenizer(str(root / "vocab.txt"))
    labels = {"id2label": {0: "rotten", 1: "fresh"}, "label2id": {"rotten": 0, "fresh": 1}}
    for name, seed in (("teacher", 7), ("student", 1)):
        model = tiny_bert(seed=seed, vocab_size=len(tokenizer), **labels)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def run(models, tmp_path, name, script, launcher, *flags):
    """Run `script` with the recipe and `flags`: in this process (`launcher=None`, per-device batch 8) or launched on
    2 processes (batch 4 each). Returns the output folder."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(student=models / "student"))
    out = tmp_path / name
    argv = [str(recipe), "--output_dir", str(out), *flags]
    if launcher is None:
        sys.path.insert(0, str(ROOT / "trainers"))
        import importlib

        module = importlib.import_module(Path(script).stem)
        parsed = module.parse(argv + ["--per_device_train_batch_size", "8"], **(
            {"dataclass_types": (module.EarlyExitScriptArguments, module.EarlyExitConfig, module.LoraArguments)}
            if Path(script).stem == "early_exit" else {}))
        module.run(*parsed)
        return out
    port = ["--master_port" if launcher == "deepspeed" else "--main_process_port", str(free_port())]
    cmd = [sys.executable, *LAUNCHERS[launcher], *port, script, *argv, "--per_device_train_batch_size", "4"]
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return out


def history(out):
    """Per-step (loss, grad_norm) of the run's last checkpoint."""
    checkpoint = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    log = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [(h["loss"], h["grad_norm"]) for h in log if "loss" in h]


def results(out):
    return json.loads((out / "test_results.json").read_text())


def assert_same_run(one, two, metrics=("test_loss", "test_accuracy", "test_ece", "test_nll", "test_brier")):
    """The 2-process run `two` reproduces the 1-process run `one`: every step's loss and gradient norm, and the test
    metrics."""
    h1, h2 = history(one), history(two)
    assert len(h1) == len(h2) == 8
    torch.testing.assert_close(torch.tensor(h2), torch.tensor(h1), rtol=0, atol=TOLERANCE)
    r1, r2 = results(one), results(two)
    assert (r1["num_processes"], r2["num_processes"]) == (1, 2)
    for metric in metrics:
        assert abs(r1[metric] - r2[metric]) <= TOLERANCE, (metric, r1[metric], r2[metric])
    assert h1[-1][0] != h1[0][0], "the loss did not move: the comparison would be vacuous"


def assert_sharded(placement, parameters):
    """The teacher's weights are split over the 2 processes: each holds about half, none the whole."""
    assert placement["kind"] == "zero3_sharded" and placement["num_processes"] == 2
    assert placement["parameters"] == parameters
    for held in placement["parameters_per_process"]:
        assert held < 0.55 * parameters, placement


def max_weight_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@require_peft
def test_ddp_lora_student_base_model_teacher(models, tmp_path):
    """DDP: LoRA student distilled from its own base model (adapters disabled); the run matches 1 process and the
    adapters (with the trained classifier) match."""
    from transformers import AutoModelForSequenceClassification

    flags = ("--use_peft", "--teacher_from_base_model")
    one = run(models, tmp_path, "one", "trainers/distill.py", None, *flags)
    two = run(models, tmp_path, "two", "trainers/distill.py", "ddp", *flags)
    assert_same_run(one, two)
    assert results(two)["teacher_placement"] == {"kind": "student_base_model", "num_processes": 2}
    assert (two / "adapter_config.json").is_file() and not (two / "model.safetensors").exists()
    a, b = (AutoModelForSequenceClassification.from_pretrained(d).state_dict() for d in (one, two))
    assert set(a) == set(b) and max_weight_diff(a, b) < WEIGHT_TOLERANCE


def test_zero3_sharded_teacher_early_exit(models, tmp_path):
    """ZeRO-3: the teacher is sharded (each process holds about half of it), every exit is distilled from it, the run
    matches 1 process, and the saved model and checkpoint reload with from_pretrained without missing keys."""
    from transformers import AutoModelForSequenceClassification

    import hf_kd  # noqa: F401  (registers the multi-exit model with the Auto classes)

    flags = ("--exit_layers", "1", "--distill_from", "teacher", "--teacher_model_name_or_path", str(models / "teacher"))
    one = run(models, tmp_path, "one", "trainers/early_exit.py", None, *flags)
    two = run(models, tmp_path, "two", "trainers/early_exit.py", "zero3", *flags)
    exit_metrics = ("test_exit_0_accuracy", "test_exit_0_ece", "test_exit_1_entropy")
    assert_same_run(one, two, ("test_loss", "test_accuracy", "test_ece", "test_nll") + exit_metrics)
    parameters = sum(p.numel() for p in tiny_bert(vocab_size=405).parameters())
    assert_sharded(results(two)["teacher_placement"], parameters)
    reference = AutoModelForSequenceClassification.from_pretrained(one).state_dict()
    for folder in (two, two / "checkpoint-8"):
        model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
        assert type(model).__name__ == "MultiExitForSequenceClassification"
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        assert max_weight_diff(reference, model.state_dict()) < WEIGHT_TOLERANCE


@require_peft
def test_zero3_lora_student_cached_base_model_logits(models, tmp_path):
    """ZeRO-3 with a LoRA student: the base model's logits are cached by both processes together (test split: after
    DeepSpeed has wrapped the student), under the same keys as on 1 process; the run matches; the adapter reloads."""
    from peft import AutoPeftModelForSequenceClassification

    flags = ("--use_peft", "--teacher_from_base_model", "--cache_teacher_logits")
    one = run(models, tmp_path, "one", "trainers/distill.py", None, *flags,
              "--teacher_logits_cache_dir", str(tmp_path / "cache_one"))
    two = run(models, tmp_path, "two", "trainers/distill.py", "zero3", *flags,
              "--teacher_logits_cache_dir", str(tmp_path / "cache_two"))
    assert_same_run(one, two)
    assert_same_cache(tmp_path / "cache_one", tmp_path / "cache_two")
    a, b = (AutoPeftModelForSequenceClassification.from_pretrained(d).merge_and_unload().state_dict() for d in (one, two))
    assert set(a) == set(b) and max_weight_diff(a, b) < WEIGHT_TOLERANCE


def assert_same_cache(cache_one, cache_two):
    """Both runs cached the same splits under the same keys (teacher and data fingerprints), with the same logits."""
    from safetensors.torch import load_file

    files = sorted(p.name for p in cache_one.glob("*.safetensors"))
    assert len(files) == 3 and files == sorted(p.name for p in cache_two.glob("*.safetensors"))  # train, eval, test
    for name in files:
        torch.testing.assert_close(load_file(cache_two / name)["logits"], load_file(cache_one / name)["logits"],
                                   rtol=0, atol=1e-6)


def test_zero2_deepspeed_launcher_sharded_teacher(models, tmp_path):
    """The `deepspeed` launcher with ZeRO-2 for the student: the teacher is still sharded (ZeRO-3), its logits cache is
    computed by both processes, and the run matches 1 process."""
    flags = ("--method", "kd", "--teacher_model_name_or_path", str(models / "teacher"), "--cache_teacher_logits")
    one = run(models, tmp_path, "one", "trainers/distill.py", None, *flags,
              "--teacher_logits_cache_dir", str(tmp_path / "cache_one"))
    two = run(models, tmp_path, "two", "trainers/distill.py", "deepspeed", *flags,
              "--deepspeed", "trainers/deepspeed/zero2.json", "--teacher_logits_cache_dir", str(tmp_path / "cache_two"))
    assert_same_run(one, two)
    assert_same_cache(tmp_path / "cache_one", tmp_path / "cache_two")
    assert_sharded(results(two)["teacher_placement"], sum(p.numel() for p in tiny_bert(vocab_size=405).parameters()))
