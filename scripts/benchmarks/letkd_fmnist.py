"""letKD on Fashion-MNIST: CE student, KD student, letKD-1 and letKD-2 over several seeds (PAPERS.md section 5).

One teacher CNN (trained once with cross-entropy, reused), then for every seed four students of the same smaller CNN
(scripts/benchmarks/_common.py), same optimiser, epochs and batches:

  ce       cross-entropy only (transformers.Trainer)
  kd       DistillTrainer, Hinton KD with the CRD setting T=4, alpha=0.9 (cached teacher logits)
  letkd1   LetKDTrainer(letkd=1, alpha=0): CE + penultimate KD layer (K templates)
  letkd2   LetKDTrainer(letkd=2, alpha=0): CE + penultimate + intermediate KD layer (8 sub-classes per class)

The letKD targets are fitted once (they depend on teacher and data only) and cached. Each run's result is written to
`<output_dir>/runs/<method>_<seed>.json` as soon as it ends, so an interrupted benchmark resumes where it stopped.
Writes docs/benchmarks/letkd_fmnist.{json,md}.

    HF_HUB_OFFLINE=1 python scripts/benchmarks/letkd_fmnist.py --seeds 0 1 2 --student_epochs 2
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from _common import (
    NUM_LABELS,
    distill_config,
    distill_trainer,
    fashion_mnist,
    sgd_args,
    student_for,
    test_accuracy,
    train_teacher,
)

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("ce", "kd", "letkd1", "letkd2")
LABELS = {"ce": "CE student", "kd": "KD (T=4, alpha=0.9)", "letkd1": "letKD-1", "letkd2": "letKD-2"}


def run_student(method: str, seed: int, teacher, train, test, opts) -> dict:
    from transformers import Trainer, TrainingArguments

    student = student_for(method, seed, opts.templates)
    common = sgd_args(Path(opts.output_dir) / "runs" / f"{method}_{seed}", seed, opts.student_epochs)
    if method == "ce":
        trainer = Trainer(model=student, args=TrainingArguments(**common), train_dataset=train)
    else:
        start = time.perf_counter()
        args = distill_config(method, common, Path(opts.output_dir) / "cache")
        trainer = distill_trainer(args, model=student, teacher_model=teacher, train_dataset=train)
        print(f"{method} seed {seed}: trainer ready in {time.perf_counter() - start:.0f} s", flush=True)
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    return {"method": method, "seed": seed, "test_accuracy": test_accuracy(student, test), "steps": output.global_step,
            "train_seconds": seconds, "seconds_per_step": seconds / output.global_step}


def summarize(results: list[dict], teacher_accuracy: float, opts) -> tuple[dict, list[str]]:
    by_method = {m: [r for r in results if r["method"] == m] for m in METHODS}
    stats = {}
    for method, runs in by_method.items():
        if not runs:
            continue
        accs = [r["test_accuracy"] for r in runs]
        stats[method] = {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs), "seeds": len(accs),
                         "seconds_per_step": statistics.median(r["seconds_per_step"] for r in runs)}
    lines = [
        f"Teacher (CNN 16/32/64/128, 18 MFLOPs): test accuracy {teacher_accuracy:.4f}. Student: CNN 8/16/32/64 "
        f"(4.6 MFLOPs). Training: {opts.train_samples or 60000} Fashion-MNIST images, {opts.student_epochs} epochs, "
        f"batch 64, SGD Nesterov 0.9, lr 0.05 cosine, wd 5e-4; letKD K={opts.templates} penultimate templates, "
        f"8 x {NUM_LABELS} intermediate sub-classes; test on the 10,000 test images; mean ± population std over "
        f"seeds {sorted({r['seed'] for r in results})}.",
        "",
        "| method | test accuracy | seeds | median s/step (incl. data) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {LABELS[m]} | {s['mean']:.4f} ± {s['std']:.4f} | {s['seeds']} | {s['seconds_per_step']:.3f} |"
              for m, s in stats.items()]
    lines += ["", "Per seed (test accuracy):", "", "| seed | " + " | ".join(LABELS[m] for m in stats) + " |",
              "|---|" + "---|" * len(stats)]
    for seed in sorted({r["seed"] for r in results}):
        row = {r["method"]: r["test_accuracy"] for r in results if r["seed"] == seed}
        lines.append(f"| {seed} | " + " | ".join(f"{row[m]:.4f}" if m in row else "-" for m in stats) + " |")
    if len(stats) == len(METHODS):
        mean = {m: stats[m]["mean"] for m in METHODS}
        checks = {"letKD-2 >= letKD-1": mean["letkd2"] >= mean["letkd1"], "letKD-1 > KD": mean["letkd1"] > mean["kd"],
                  "KD > CE": mean["kd"] > mean["ce"]}
        lines += ["", "Paper's ordering (means): " + ", ".join(f"{k}: {'holds' if v else 'does NOT hold'}"
                                                                for k, v in checks.items()) + "."]
        stats["ordering"] = checks
    return stats, lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "letkd_fmnist"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--train_samples", type=int, default=None, help="First N training images (default: all).")
    parser.add_argument("--teacher_epochs", type=float, default=3.0)
    parser.add_argument("--student_epochs", type=float, default=2.0)
    parser.add_argument("--templates", type=int, default=4096, help="K, penultimate templates (paper: 4096).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    out_dir = Path(opts.output_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)

    train, test = fashion_mnist("train", opts.train_samples), fashion_mnist("test")
    teacher = train_teacher(out_dir / "teacher", train, opts.teacher_epochs)
    teacher_accuracy = test_accuracy(teacher, test)
    print(f"teacher test accuracy {teacher_accuracy:.4f}", flush=True)

    results = []
    for seed in opts.seeds:
        for method in opts.methods:
            path = out_dir / "runs" / f"{method}_{seed}.json"
            if path.exists():
                results.append(json.loads(path.read_text()))
                continue
            result = run_student(method, seed, teacher, train, test, opts)
            results.append(result)
            path.write_text(json.dumps(result, indent=2))
            print(json.dumps(result), flush=True)
    stats, lines = summarize(results, teacher_accuracy, opts)
    import faiss

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"settings": vars(opts) | {"torch": torch.__version__, "faiss": faiss.__version__,
                                         "cpu_count": os.cpu_count()},
               "teacher_test_accuracy": teacher_accuracy, "summary": stats, "runs": results}
    (out / "letkd_fmnist.json").write_text(json.dumps(payload, indent=2))
    (out / "letkd_fmnist.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
