"""Early exits on Fashion-MNIST with the multi-exit CNN: policy curves, wall-clock, and the budgeted protocol.

Step `train` trains `MultiExitForImageClassification` (3 stages, an exit after each) with `EarlyExitTrainer` on
55,000 training images (5,000 held out for validation, seeded). Step `curve` runs every exit once over validation and
test, sweeps each exit policy offline and picks each policy's operating point on validation (fewest mean stages
within 1 point of the final exit's accuracy). Step `speed` times `predict_with_exits` against the full network at
batch size 1 and 32. Step `budget` is the budgeted ("dynamic") evaluation of Meronen et al. (2024, PAPERS.md 6c):
for each budget level the thresholds are fitted on validation so that a target fraction leaves at each exit, then
top-1, NLPD, ECE (10 bins) and expected FLOPs are measured on test, without and with model-internal ensembling.

    python scripts/benchmarks/early_exit_fmnist.py --output_dir outputs/bench_early_exit_fmnist

Writes `results.json` in the output folder and `docs/benchmarks/early_exit_fmnist.md`.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from _common import curve_markdown, early_exit_fmnist_splits, measure_speed, policy_curves, policy_kwargs

from hf_kd import EarlyExitConfig, EarlyExitTrainer, MultiExitForImageClassification, MultiExitImageConfig
from hf_kd.data import FASHION_MNIST_LABELS
from hf_kd.early_exit import budgeted_evaluation

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/bench_early_exit_fmnist")
    steps = ["train", "curve", "speed", "budget"]
    parser.add_argument("--steps", nargs="+", default=steps, choices=steps)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--validation_size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bs1_samples", type=int, default=1000, help="Test images timed one at a time.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.01, help="Accuracy loss allowed vs the final exit.")
    return parser.parse_args(argv)


def train(out: Path, opts) -> dict:
    splits = early_exit_fmnist_splits(opts)
    torch.manual_seed(opts.seed)
    config = MultiExitImageConfig(
        num_labels=10, id2label=dict(enumerate(FASHION_MNIST_LABELS)),
        label2id={name: i for i, name in enumerate(FASHION_MNIST_LABELS)},
    )
    model = MultiExitForImageClassification(config)
    args = EarlyExitConfig(
        output_dir=str(out / "model"), num_train_epochs=opts.epochs, learning_rate=2e-3, weight_decay=1e-4,
        warmup_steps=0.05, per_device_train_batch_size=128, per_device_eval_batch_size=512, eval_strategy="no",
        save_strategy="no", logging_steps=100, seed=opts.seed, report_to="none", dataloader_num_workers=0,
    )
    trainer = EarlyExitTrainer(model=model, args=args, train_dataset=splits["train"], eval_dataset=splits["validation"])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model()
    return {"train_seconds": seconds, **trainer.evaluate(splits["test"], metric_key_prefix="test")}


def image_batches(dataset, batch_size: int) -> list[dict]:
    pixels = dataset[:]["pixel_values"]  # (N, 1, 28, 28) tensor
    return [{"pixel_values": pixels[i : i + batch_size]} for i in range(0, len(pixels), batch_size)]


@torch.no_grad()
def all_exit_probs(model, dataset) -> np.ndarray:
    """Softmax of every exit, `(num_exits, N, 10)`."""
    chunks = [torch.stack(model(**batch).exit_logits).softmax(-1) for batch in image_batches(dataset, 1000)]
    return torch.cat(chunks, dim=1).numpy()


def exit_probabilities(out: Path, opts):
    model = MultiExitForImageClassification.from_pretrained(out / "model").eval()
    splits = early_exit_fmnist_splits(opts)
    probs = {split: all_exit_probs(model, splits[split]) for split in ("validation", "test")}
    labels = {split: splits[split][:]["labels"].numpy() for split in ("validation", "test")}
    return model, probs, labels


def curve(out: Path, opts) -> dict:
    model, probs, labels = exit_probabilities(out, opts)
    per_exit = {split: [float((p.argmax(-1) == labels[split]).mean()) for p in probs[split]] for split in probs}
    exit_flops = model.exit_flops()
    policies = policy_curves(
        probs["validation"], labels["validation"], probs["test"], labels["test"], model.config.exit_layers,
        opts.tolerance, exit_flops,
    )
    return {"exit_layers": model.config.exit_layers, "exit_flops": exit_flops, "per_exit_accuracy": per_exit,
            "policies": policies}


@torch.inference_mode()
def run_full(model, prepared):
    """The static network: every stage on every image, then the final exit."""
    for batch in prepared:
        model(**batch)  # the extra exit heads cost 2*C*K FLOPs each: negligible next to the stages


@torch.inference_mode()
def run_exits(model, prepared, policy, value):
    for batch in prepared:
        model.predict_with_exits(**batch, policy=policy, **policy_kwargs(policy, value))


def speed(out: Path, opts, curve_result: dict) -> dict:
    model = MultiExitForImageClassification.from_pretrained(out / "model").eval()
    test = early_exit_fmnist_splits(opts)["test"]
    workloads = {
        "bs1": image_batches(test.select(range(opts.bs1_samples)), 1),
        "bs32": image_batches(test, 32),
    }
    return measure_speed(
        workloads, partial(run_full, model), partial(run_exits, model), curve_result["policies"], opts.repeats
    )


def budget(out: Path, opts) -> dict:
    model, probs, labels = exit_probabilities(out, opts)
    levels = list(range(1, 40))
    return {
        name: budgeted_evaluation(
            probs["validation"], probs["test"], labels["test"], model.exit_flops(), budget_levels=levels, mie=mie
        )
        for name, mie in (("vanilla", False), ("mie", True))
    }


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        "# Early exits on Fashion-MNIST (multi-exit CNN, CPU)",
        "",
        "Produced by `python scripts/benchmarks/early_exit_fmnist.py`: `MultiExitForImageClassification` (stem + 3 stages "
        "of 32/64/128 channels, an exit after each stage), trained with `EarlyExitTrainer` "
        f"({results['settings']['epochs']:g} epochs, 55,000 images), evaluated on the 10,000 test images.",
        "",
    ]
    if "curve" in results:
        c = results["curve"]
        flops = c["exit_flops"]
        lines += [
            "Per-exit test accuracy (stages " + ", ".join(map(str, c["exit_layers"])) + "): "
            + ", ".join(f"{a:.4f}" for a in c["per_exit_accuracy"]["test"])
            + "; cumulative MFLOPs per image: " + ", ".join(f"{f / 1e6:.2f}" for f in flops),
            "",
            *curve_markdown(results, unit="stages"),
            "",
        ]
    if "budget" in results:
        lines += [
            "## Budgeted evaluation (Meronen et al., 2024; PAPERS.md 6c)",
            "",
            "Budget level b: q = b/20, target exit fractions pi_k proportional to q^k; thresholds fitted on the "
            "validation confidences (max probability), applied on test. ECE with 10 bins. MIE = model-internal "
            "ensemble of the exits so far, FLOPs-weighted.",
            "",
            "| b | top-1 | NLPD | ECE | MFLOPs | top-1 MIE | NLPD MIE | ECE MIE | MFLOPs MIE |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for plain, mie in zip(results["budget"]["vanilla"], results["budget"]["mie"]):
            lines.append(
                f"| {plain['budget_level']} | {plain['accuracy']:.4f} | {plain['nlpd']:.4f} | {plain['ece']:.4f} | "
                f"{plain['expected_flops'] / 1e6:.2f} | {mie['accuracy']:.4f} | {mie['nlpd']:.4f} | "
                f"{mie['ece']:.4f} | {mie['expected_flops'] / 1e6:.2f} |"
            )
        mean = {name: {k: float(np.mean([r[k] for r in rows])) for k in ("accuracy", "nlpd", "ece")}
                for name, rows in results["budget"].items()}
        lines += ["", "Mean over the 39 budgets: " + "; ".join(
            f"{name}: top-1 {m['accuracy']:.4f}, NLPD {m['nlpd']:.4f}, ECE {m['ece']:.4f}" for name, m in mean.items()
        )]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    opts = parse_args(argv)
    out = Path(opts.output_dir)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["settings"] = vars(opts)
    if "train" in opts.steps:
        results["train"] = train(out, opts)
    if "curve" in opts.steps:
        results["curve"] = curve(out, opts)
    if "speed" in opts.steps:
        results["speed"] = speed(out, opts, results["curve"])
    if "budget" in opts.steps:
        results["budget"] = budget(out, opts)
    out.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2))
    write_markdown(results, ROOT / "docs" / "benchmarks" / "early_exit_fmnist.md")
    print(json.dumps(results.get("train", {}), indent=2))
    return results


if __name__ == "__main__":
    main()
