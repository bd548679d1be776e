"""DEDIER on Fashion-MNIST with a real spurious feature: worst-group accuracy of ERM, KD and DEDIER students.

The data (built here from the real Fashion-MNIST images, nothing synthetic but the patch):

- task: T-shirt/top (y = 0) vs Shirt (y = 1), the two classes a small CNN confuses most;
- spurious attribute a: a 5x5 white square in the top-left (a = 0) or the top-right (a = 1) corner of the image;
- training images (10,000 of the 12,000 training images of the two classes): a = y for 95% of them (the Waterbirds
  proportion), so the patch predicts the label almost perfectly and is far easier to read than the garment;
- validation (the other 2,000 training images) and test (the 2,000 test images of the two classes): a drawn
  independently of y, so the four groups g = 2 y + a are balanced. The worst group is a shirt with the T-shirt patch
  or the reverse.

The methods (Tiwari et al., WACV 2024, https://huggingface.co/papers/2310.18590, PAPERS.md 6a):

- teacher: a CNN (stages of 32/64/128 channels) trained with cross-entropy on the training images with the minority
  groups up-sampled to the majority groups' size (group-balanced, which needs the group labels: the paper's teacher is
  likewise group-robust, trained with group DRO);
- ERM student: a smaller CNN (16/32/64 channels) trained with cross-entropy, no teacher;
- KD student: the same CNN distilled from the teacher, pure soft loss (alpha = 1, T = 3, the paper's setting);
- DEDIER student: KD plus DEDIER's re-weighting (readout after stage 1, alpha = 0.05, beta = 4, the paper's
  Waterbirds setting), re-weighted after every epoch but the last.

Every student trains the same number of epochs with the same optimiser, evaluates on validation after each epoch and
keeps the epoch with the best validation mean-group accuracy (the paper's model selection). Test worst-group, mean-group
and average accuracy are reported as mean and population std over the seeds.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python scripts/benchmarks/dedier_fmnist.py --seeds 0 1 2

Results are appended to `<work_dir>/results.jsonl` (an interrupted run resumes) and summarised in
docs/benchmarks/dedier_fmnist.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import datasets
import numpy as np
import torch

from hf_kd import EarlyExitConfig, EarlyExitTrainer, MultiExitForImageClassification, MultiExitImageConfig
from hf_kd.data import FASHION_MNIST_LABELS, FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from hf_kd.metrics import group_accuracies

ROOT = Path(__file__).resolve().parents[2]
CLASSES = (0, 6)  # T-shirt/top, Shirt
PATCH = 5
MAJORITY = 0.95
METHODS = ("erm", "kd", "dedier")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--teacher_epochs", type=int, default=6)
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "bench_dedier_fmnist"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "dedier_fmnist.md"))
    return parser.parse_args(argv)


def with_patches(images: np.ndarray, attributes: np.ndarray) -> np.ndarray:
    """White `PATCH x PATCH` squares in the top-left (attribute 0) or top-right (1) corner; `images` `(N, 1, 28, 28)`
    in [0, 1]."""
    images = images.copy()
    left, right = attributes == 0, attributes == 1
    images[left, :, :PATCH, :PATCH] = 1.0
    images[right, :, :PATCH, -PATCH:] = 1.0
    return images


def build_splits(seed: int) -> dict[str, datasets.Dataset]:
    """The biased training set and the group-balanced validation and test sets (see the module docstring)."""
    rng = np.random.default_rng(seed)

    def two_classes(split):
        data = load_fashion_mnist(split).with_format("numpy")[:]
        keep = np.isin(data["labels"], CLASSES)
        return data["pixel_values"][keep], (data["labels"][keep] == CLASSES[1]).astype(np.int64)

    train_images, train_labels = two_classes("train")
    order = rng.permutation(len(train_labels))
    parts = {"train": order[2000:], "validation": order[:2000]}
    test_images, test_labels = two_classes("test")
    splits = {}
    for name, (images, labels) in {
        "train": (train_images[parts["train"]], train_labels[parts["train"]]),
        "validation": (train_images[parts["validation"]], train_labels[parts["validation"]]),
        "test": (test_images, test_labels),
    }.items():
        if name == "train":
            attributes = np.where(rng.random(len(labels)) < MAJORITY, labels, 1 - labels)
        else:
            attributes = rng.integers(0, 2, len(labels))
        pixels = (with_patches(images, attributes) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        features = datasets.Features({
            "pixel_values": datasets.Array3D(shape=(1, 28, 28), dtype="float32"),
            "labels": datasets.ClassLabel(names=[FASHION_MNIST_LABELS[c] for c in CLASSES]),
            "group": datasets.Value("int64"),
        })
        splits[name] = datasets.Dataset.from_dict(
            {"pixel_values": pixels.astype(np.float32), "labels": labels, "group": 2 * labels + attributes},
            features=features,
        ).with_format("torch")
    return splits


def group_balanced(train: datasets.Dataset, seed: int) -> datasets.Dataset:
    """Up-sample every group to the largest group's size (rows repeated, then shuffled)."""
    groups = train.with_format("numpy")[:]["group"]
    largest = max(np.bincount(groups))
    rng = np.random.default_rng(seed)
    index = np.concatenate([rng.choice(np.flatnonzero(groups == g), largest, replace=True) for g in np.unique(groups)])
    return train.select(rng.permutation(index))


def cnn(channels: tuple[int, ...], seed: int) -> MultiExitForImageClassification:
    torch.manual_seed(seed)
    names = [FASHION_MNIST_LABELS[c] for c in CLASSES]
    config = MultiExitImageConfig(
        num_labels=2, stage_channels=list(channels), stem_channels=channels[0] // 2, exit_layers=[len(channels)],
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
    )
    return MultiExitForImageClassification(config)


def config(output_dir: Path, epochs: int, seed: int, **kwargs) -> EarlyExitConfig:
    return EarlyExitConfig(
        output_dir=str(output_dir), num_train_epochs=epochs, learning_rate=2e-3, weight_decay=1e-4,
        per_device_train_batch_size=64, per_device_eval_batch_size=500, eval_strategy="epoch", save_strategy="epoch",
        save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="mean_group_accuracy",
        greater_is_better=True, logging_steps=50, seed=seed, report_to="none", dataloader_num_workers=0, **kwargs,
    )


def train_teacher(splits, seed: int, work: Path, epochs: int) -> Path:
    folder = work / f"teacher_seed{seed}"
    if (folder / "model.safetensors").exists():
        return folder
    trainer = EarlyExitTrainer(
        model=cnn((32, 64, 128), seed), args=config(folder / "run", epochs, seed),
        train_dataset=group_balanced(splits["train"], seed), eval_dataset=splits["validation"],
    )
    trainer.train()
    trainer.save_model(str(folder))
    return folder


def train_student(method: str, splits, seed: int, work: Path, epochs: int, teacher: Path) -> dict:
    kwargs = {}
    if method in ("kd", "dedier"):
        kwargs = dict(distill_from="teacher", temperature=3.0, alpha=1.0, cache_teacher_logits=True,
                      teacher_logits_cache_dir=str(work / "teacher_logits"))
    if method == "dedier":
        kwargs.update(dedier=True, dedier_layer=1, dedier_alpha=0.05, dedier_beta=4.0)
    trainer = EarlyExitTrainer(
        model=cnn((16, 32, 64), seed), args=config(work / f"{method}_seed{seed}", epochs, seed, **kwargs),
        teacher_model=MultiExitForImageClassification.from_pretrained(teacher) if kwargs else None,
        train_dataset=splits["train"], eval_dataset=splits["validation"],
    )
    trainer.train()
    test = trainer.evaluate(splits["test"], metric_key_prefix="test")
    result = {"method": method, "seed": seed, **{k[5:]: v for k, v in test.items() if k.endswith("accuracy")}}
    if method == "dedier":
        weights = trainer.dedier_weights
        train_groups = splits["train"][:]["group"]
        result["mean_weight_by_group"] = [float(weights[train_groups == g].mean()) for g in range(4)]
    return result


def evaluate_teacher(teacher: Path, splits, seed: int) -> dict:
    model = MultiExitForImageClassification.from_pretrained(teacher).eval()
    test = splits["test"][:]  # a dict of tensors
    with torch.no_grad():
        predictions = torch.cat([model(pixel_values=test["pixel_values"][i : i + 500]).logits.argmax(-1)
                                 for i in range(0, len(test["labels"]), 500)])
    labels = test["labels"]
    return {"method": "teacher", "seed": seed, "accuracy": float((predictions == labels).float().mean()),
            **group_accuracies(predictions, labels, test["group"])}


def summarise(results: list[dict]) -> dict:
    summary = {}
    for method in ("teacher",) + METHODS:
        rows = [r for r in results if r["method"] == method]
        if rows:
            summary[method] = {
                key: (statistics.fmean(r[key] for r in rows), statistics.pstdev(r[key] for r in rows), len(rows))
                for key in ("worst_group_accuracy", "mean_group_accuracy", "accuracy")
            }
    return summary


def write_markdown(results: list[dict], opts, path: Path) -> None:
    names = {"teacher": "teacher (group-balanced CE, 32/64/128)", "erm": "ERM student (16/32/64)",
             "kd": "KD student", "dedier": "DEDIER student"}
    lines = [
        "# DEDIER on Fashion-MNIST with a spurious corner patch",
        "",
        "Produced by `python scripts/benchmarks/dedier_fmnist.py` (its docstring gives the construction): T-shirt/top vs "
        "Shirt, a corner patch that matches the label on 95% of the 10,000 training images and is independent of "
        "it on validation and test (2,000 each, groups balanced). Students train "
        f"{opts.epochs} epochs and keep the epoch with the best validation mean-group accuracy. Test accuracies, mean "
        "± population std over seeds.",
        "",
        "| model | seeds | worst-group accuracy | mean-group accuracy | average accuracy |",
        "|---|---|---|---|---|",
    ]
    for method, metrics in summarise(results).items():
        cells = " | ".join(f"{m:.4f} ± {s:.4f}" for m, s, _ in
                           (metrics[k] for k in ("worst_group_accuracy", "mean_group_accuracy", "accuracy")))
        lines.append(f"| {names[method]} | {metrics['accuracy'][2]} | {cells} |")
    dedier = [r for r in results if r["method"] == "dedier"]
    if dedier:
        weights = np.mean([r["mean_weight_by_group"] for r in dedier], axis=0)
        lines += ["", "Mean DEDIER weight of the training images per group (g = 2 y + a; groups 0 and 3 are the "
                  "patch-aligned majority) at the end of training: "
                  + ", ".join(f"g{g} {w:.2f}" for g, w in enumerate(weights))]
    lines += ["", "Per run:", "", "| model | seed | worst-group | mean-group | average |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['seed']} | {r['worst_group_accuracy']:.4f} | {r['mean_group_accuracy']:.4f} | "
              f"{r['accuracy']:.4f} |" for r in results]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    opts = parse_args(argv)
    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "results.jsonl"
    results = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["method"], r["seed"]) for r in results}
    for seed in opts.seeds:
        splits = build_splits(seed)
        teacher = train_teacher(splits, seed, work, opts.teacher_epochs)
        todo = [m for m in ("teacher", *opts.methods) if (m, seed) not in done]
        for method in todo:
            if method == "teacher":
                result = evaluate_teacher(teacher, splits, seed)
            else:
                result = train_student(method, splits, seed, work, opts.epochs, teacher)
            results.append(result)
            with log.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
    write_markdown(results, opts, Path(opts.out))
    print(json.dumps(summarise(results), indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
