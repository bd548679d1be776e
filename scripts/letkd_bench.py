"""Shared pieces of the letKD benchmarks on Fashion-MNIST: the teacher and student CNNs, the data, the training
arguments, the teacher, and the test accuracy.

Teacher: stem 16, stages 32/64/128 (two 3x3 convolutions each), about 18 MFLOPs per image. Student: stem 8, stages
16/32/64, about 4.6 MFLOPs (a quarter). Both end at 4x4 after three stride-2 stages (28 -> 14 -> 7 -> 4), so teacher
and student positions match one to one at both letKD locations (after the first block of the last stage, and after
the last stage).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from hf_kd import KDLayerForImageClassification, KDLayerImageConfig
from hf_kd.data import load_fashion_mnist

TEACHER_CNN = {"stem_channels": 16, "stage_channels": [32, 64, 128], "convs_per_stage": 2}
STUDENT_CNN = {"stem_channels": 8, "stage_channels": [16, 32, 64], "convs_per_stage": 2}
NUM_LABELS = 10


def fashion_mnist(split: str, max_samples: int | None = None):
    """Standardised Fashion-MNIST as torch tensors (`pixel_values`, `labels`)."""
    return load_fashion_mnist(split, max_samples=max_samples, normalize=True).with_format("torch")


def cnn(kind: str, seed: int, kd_layer_templates: dict | None = None) -> KDLayerForImageClassification:
    torch.manual_seed(seed)
    layout = TEACHER_CNN if kind == "teacher" else STUDENT_CNN
    config = KDLayerImageConfig(num_labels=NUM_LABELS, kd_layer_templates=kd_layer_templates, **layout)
    return KDLayerForImageClassification(config)


def sgd_args(output_dir, seed: int, epochs: float, lr: float = 0.05, batch_size: int = 64, **kwargs) -> dict:
    """The paper's optimiser (SGD, Nesterov momentum 0.9, weight decay 5e-4, batch 64) with a cosine schedule (a few
    epochs here, not 240 with steps)."""
    return dict(
        output_dir=str(output_dir), seed=seed, num_train_epochs=epochs, learning_rate=lr,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=512, optim="sgd",
        optim_args="momentum=0.9,nesterov=True", weight_decay=5e-4, lr_scheduler_type="cosine",
        save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, logging_steps=200,
        dataloader_num_workers=0, disable_tqdm=True,
    ) | kwargs


def student_for(method: str, seed: int, templates: int) -> KDLayerForImageClassification:
    """The student of a benchmark method: plain for `ce`/`kd`, KD layers for `letkd1`/`letkd2`."""
    kd_layers = {"ce": None, "kd": None, "letkd1": {"penultimate": templates},
                 "letkd2": {"penultimate": templates, "intermediate": 8 * NUM_LABELS}}[method]
    return cnn("student", seed=1000 + seed, kd_layer_templates=kd_layers)


def distill_config(method: str, common: dict, cache_dir: Path):
    """Config of a benchmark method: `kd` is Hinton KD (DistillConfig) with CRD's T=4, alpha=0.9 from cached logits;
    `kd_online` the same with the teacher run at every step; `letkd1`/`letkd2` are CE + KD layers (LetKDConfig,
    alpha=0)."""
    from hf_kd import DistillConfig, LetKDConfig

    logits_cache = {"teacher_logits_cache_dir": str(cache_dir / "logits")}
    if method in ("kd", "kd_online"):
        return DistillConfig(**common, **logits_cache, temperature=4.0, alpha=0.9, cache_teacher_logits=method == "kd")
    return LetKDConfig(
        **common, **logits_cache, letkd_cache_dir=str(cache_dir / "targets"), alpha=0.0, letkd=int(method[-1])
    )


def distill_trainer(args, **kwargs):
    """The trainer of a [`distill_config`]: LetKDTrainer for a LetKDConfig, else DistillTrainer."""
    from hf_kd import DistillTrainer, LetKDConfig, LetKDTrainer

    return (LetKDTrainer if isinstance(args, LetKDConfig) else DistillTrainer)(args=args, **kwargs)


def train_teacher(output_dir: Path, train, epochs: float) -> KDLayerForImageClassification:
    """Train (once) the plain teacher CNN with cross-entropy; later calls load it from `output_dir`."""
    from transformers import Trainer, TrainingArguments

    if (output_dir / "config.json").exists():
        return KDLayerForImageClassification.from_pretrained(output_dir).eval()
    teacher = cnn("teacher", seed=0)
    start = time.perf_counter()
    Trainer(model=teacher, args=TrainingArguments(**sgd_args(output_dir / "run", 0, epochs)), train_dataset=train).train()
    teacher.save_pretrained(output_dir)
    (output_dir / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return teacher.eval()


@torch.no_grad()
def test_accuracy(model, test, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(test), batch_size):
        rows = test[start : start + batch_size]
        correct += (model(pixel_values=rows["pixel_values"]).logits.argmax(-1) == rows["labels"]).sum().item()
    return correct / len(test)
