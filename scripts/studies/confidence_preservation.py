"""Confidence preservation of 6- and 3-layer students before and after tuning (Vengertsev & Sherman 2024,
https://huggingface.co/papers/2401.11365, PAPERS.md section 3), on real data.

For each dataset (Rotten Tomatoes, CrowdFlower tweets, SNLI):
  1. the teacher: sentence-transformers/all-MiniLM-L6-v2 fine-tuned with cross-entropy (ERM) on `--teacher_samples`
     training rows;
  2. three students, each a general pre-trained model with a fresh classification head (as TinyBERT's General
     TinyBERT students are): `6-layer` = all-MiniLM-L6-v2 as pre-trained (not the fine-tuned teacher), `3-layer` =
     paraphrase-MiniLM-L3-v2, `3-layer-L6` = layers 1, 3, 5 (0-based) of the pre-trained all-MiniLM-L6-v2, which
     shares the teacher's and the 6-layer student's origin so that only depth differs. Each is distilled at the prediction layer (soft cross-entropy, T = 1, no hard labels:
     TinyBERT's prediction stage) on the first `--train_samples` of the teacher's training rows, from cached teacher
     logits;
  3. hf_kd.confidence_search: the baseline configuration, then `--n_trials` optuna trials over learning rate, epochs,
     batch size and weight decay; sigma on the student's training rows and on `--dev_samples` validation rows.
A configuration preserves confidence when sigma(train) <= kappa (0.05); it is accepted when its dev accuracy is also
within 1 point of the baseline's. sigma compares class-0 probabilities on the binary task (the reference code) and
gold-class probabilities on the 3-class tasks (class 0 alone would ignore two classes).

SNLI: the only NLI rows here are the 2,527 labelled rows of the two SNLI dev subsets in ../shared/data (see its
README); they are shuffled and split into training rows and dev rows, disjoint. NLI gets more rows (`--snli_*`): on
500 rows the MiniLM-L6 teacher stayed at 41% dev accuracy with near-uniform outputs (mean entropy 1.09 of ln 3 =
1.10 nats), and two near-uniform models have a trivially small sigma.

Each (seed, dataset, student) result is written as soon as it is done (`<work_dir>/seed<seed>/<dataset>/<student>/`); a
re-run skips what exists. The summary goes to docs/benchmarks/confidence_preservation.{md,json}.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/studies/confidence_preservation.py
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_kd import DistillConfig, DistillTrainer, data, make_compute_metrics
from hf_kd.confidence_search import SearchSpace, search_confidence_preservation
from hf_kd.student import student_from_teacher_layers

ROOT = Path(__file__).resolve().parents[2]
TEACHER = "sentence-transformers/all-MiniLM-L6-v2"
L6, L3 = "sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/paraphrase-MiniLM-L3-v2"
# name: (checkpoint, layers kept or None). "3-layer-L6" keeps layers 1, 3, 5 (0-based; hf_kd.student) of the
# *pre-trained* L6: same origin as the teacher and the 6-layer student, so depth is the only difference.
STUDENTS = {"6-layer": (L6, None), "3-layer": (L3, None), "3-layer-L6": (L6, [1, 3, 5])}
DATASETS = ("rotten_tomatoes", "crowdflower_tweets", "snli")
SHARED_DATA = ROOT.parent / "shared" / "data"


def shown(path) -> str:
    """`path` relative to the repository when inside it (the docs must not name one machine's folders)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def sizes(name: str, opts) -> dict:
    """Rows and epochs of one dataset: SNLI gets its own (see the module docstring)."""
    if name == "snli":
        return {"teacher_samples": opts.snli_teacher_samples, "train_samples": opts.snli_train_samples,
                "teacher_epochs": opts.snli_teacher_epochs}
    return {"teacher_samples": opts.teacher_samples, "train_samples": opts.train_samples,
            "teacher_epochs": opts.teacher_epochs}


def load_rows(name: str, opts, seed: int):
    """(teacher training rows, dev rows, text columns, label names); the student trains on the first rows."""
    teacher_samples = sizes(name, opts)["teacher_samples"]
    if name == "snli":
        rows = data.load_snli_dev_subsets(SHARED_DATA).shuffle(seed=seed)
        if opts.dev_samples + teacher_samples > len(rows):
            raise ValueError(f"SNLI has {len(rows)} labelled rows: --dev_samples + --snli_teacher_samples is too many")
        dev = rows.select(range(opts.dev_samples))
        train = rows.select(range(opts.dev_samples, opts.dev_samples + teacher_samples))
        return train, dev, ("premise", "hypothesis"), rows.features["label"].names
    loader = {"rotten_tomatoes": data.load_rotten_tomatoes, "crowdflower_tweets": data.load_crowdflower_tweets}[name]
    splits = loader(seed=seed)
    # Rows are grouped by source (movie, topic): shuffle before cutting.
    train = splits["train"].shuffle(seed=seed).select(range(teacher_samples))
    dev = splits["validation"].shuffle(seed=seed).select(range(opts.dev_samples))
    return train, dev, ("text", None), splits["train"].features["label"].names


def tokenize(dataset, tokenizer, columns, max_length):
    text, pair = columns
    keep = ["label"]
    return dataset.map(
        lambda b: tokenizer(b[text], b[pair] if pair else None, truncation=True, max_length=max_length),
        batched=True,
        remove_columns=[c for c in dataset.column_names if c not in keep],
    ).flatten_indices()


def train_teacher(folder: Path, train, dev, labels, tokenizer, epochs: float, seed: int) -> dict:
    model = AutoModelForSequenceClassification.from_pretrained(
        TEACHER, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    )
    args = TrainingArguments(
        output_dir=str(folder / "run"), num_train_epochs=epochs, learning_rate=1e-4, warmup_steps=0.1,
        per_device_train_batch_size=16, per_device_eval_batch_size=64, eval_strategy="no", save_strategy="no",
        report_to="none", seed=seed, disable_tqdm=True, logging_steps=50,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=make_compute_metrics())
    trainer.train()
    metrics = {**trainer.evaluate(train, metric_key_prefix="train"), **trainer.evaluate(dev, metric_key_prefix="dev")}
    trainer.save_model(str(folder))
    tokenizer.save_pretrained(folder)
    return metrics


def run_search(folder: Path, teacher_dir: Path, student, train, dev, labels, tokenizer, opts, class_index, seed):
    checkpoint, layers = student

    def model_init():
        model = AutoModelForSequenceClassification.from_pretrained(
            checkpoint, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
        )
        return model if layers is None else student_from_teacher_layers(model, layers)

    args = DistillConfig(
        output_dir=str(folder / "runs"), teacher_model_name_or_path=str(teacher_dir), temperature=1.0, alpha=1.0,
        cache_teacher_logits=True, teacher_logits_cache_dir=str(folder.parent / "teacher_logits"),
        learning_rate=opts.baseline_lr, num_train_epochs=opts.baseline_epochs,
        per_device_train_batch_size=opts.baseline_batch_size, weight_decay=opts.baseline_weight_decay,
        warmup_steps=0.1, per_device_eval_batch_size=64, eval_strategy="no", save_strategy="no", report_to="none",
        seed=seed, disable_tqdm=True, logging_steps=50,
    )
    trainer = DistillTrainer(
        model=None, model_init=model_init, args=args, train_dataset=train, processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=make_compute_metrics(class_index=class_index),
    )
    space = SearchSpace(tuple(opts.lr_range), tuple(opts.epochs_range), tuple(opts.batch_sizes), tuple(opts.wd_range))
    return search_confidence_preservation(
        trainer, train, dev, n_trials=opts.n_trials, kappa=opts.kappa, search_space=space, seed=seed
    )


def summarise(result_json: dict, kappa: float, tolerance: float) -> dict:
    trials = result_json["trials"]
    baseline = next(t for t in trials if t["baseline"])
    floor = baseline["accuracy_dev"] - tolerance
    within = [t for t in trials if t["accuracy_dev"] >= floor - 1e-12 and t["sigma_train"] == t["sigma_train"]]
    best = min(within, key=lambda t: t["sigma_train"]) if within else baseline  # NaN sigma everywhere: no tuning
    return {
        "baseline": {k: baseline[k] for k in ("params", "sigma_train", "sigma_dev", "accuracy_dev", "accuracy_train")},
        "tuned": {k: best[k] for k in ("number", "params", "sigma_train", "sigma_dev", "accuracy_dev", "accuracy_train")},
        "preserved_before": baseline["sigma_train"] <= kappa,
        "preserved_after": best["sigma_train"] <= kappa,
        "num_trials": len(trials),
        "num_accepted": sum(t["accepted"] for t in trials),
    }


def write_report(work: Path, out: Path, opts) -> None:
    rows, summary = [], {}
    for seed in opts.seeds:
        for name in opts.datasets:
            teacher_file = work / f"seed{seed}" / name / "teacher_metrics.json"
            if not teacher_file.exists():
                continue
            teacher = json.loads(teacher_file.read_text())
            for student in STUDENTS:
                folder = work / f"seed{seed}" / name / student
                if not (folder / "confidence_search.json").exists():
                    continue
                s = summarise(json.loads((folder / "confidence_search.json").read_text()), opts.kappa,
                              opts.accuracy_tolerance)
                s["teacher_accuracy_dev"] = teacher["dev_accuracy"]
                s["teacher_accuracy_train"] = teacher["train_accuracy"]
                s["teacher_seconds"] = teacher["seconds"]
                s["seconds"] = json.loads((folder / "timing.json").read_text())
                summary.setdefault(f"{name}/seed{seed}", {})[student] = s
                b, t = s["baseline"], s["tuned"]
                p = t["params"]
                rows.append(
                    f"| {name} | {seed} | {student} | {s['teacher_accuracy_dev']:.4f} | {b['accuracy_dev']:.4f} | "
                    f"{b['sigma_train']:.4f} | {b['sigma_dev']:.4f} | {'yes' if s['preserved_before'] else 'no'} | "
                    f"{t['number']}: lr {p['learning_rate']:.1e}, {p['num_train_epochs']} ep, bs "
                    f"{p['per_device_train_batch_size']}, wd {p['weight_decay']:.0e} | {t['accuracy_dev']:.4f} | "
                    f"{t['sigma_train']:.4f} | {t['sigma_dev']:.4f} | {'yes' if s['preserved_after'] else 'no'} | "
                    f"{s['num_accepted']}/{s['num_trials']} |"
                )
    counts = {
        student: {
            "runs": sum(student in summary[d] for d in summary),
            **{
                when: sum(summary[d][student][f"preserved_{when}"] for d in summary if student in summary[d])
                for when in ("before", "after")
            },
        }
        for student in STUDENTS
    }
    cpu = sum(s["seconds"]["cpu"] for d in summary.values() for s in d.values())
    wall = sum(s["seconds"]["wall"] for d in summary.values() for s in d.values())
    teacher_cpu = sum(next(iter(d.values()))["teacher_seconds"]["cpu"] for d in summary.values())
    teacher_wall = sum(next(iter(d.values()))["teacher_seconds"]["wall"] for d in summary.values())
    settings = (
        f"Teacher: {TEACHER} fine-tuned (ERM, lr 1e-4, batch 16) on {opts.teacher_samples} training rows for "
        f"{opts.teacher_epochs:g} epochs (SNLI: {opts.snli_teacher_samples} rows, {opts.snli_teacher_epochs:g} epochs). "
        f"Students distilled at the prediction layer (T = 1, alpha = 1, cached teacher logits) on the first "
        f"{opts.train_samples} of those rows (SNLI: {opts.snli_train_samples}); sigma on those rows (train) and on "
        f"{opts.dev_samples} held-out rows (dev). Baseline: lr {opts.baseline_lr:g}, {opts.baseline_epochs} epochs, "
        f"batch {opts.baseline_batch_size}, weight decay {opts.baseline_weight_decay:g}. Search: {opts.n_trials} "
        f"optuna trials (TPE seeded like the run; at this number of trials, random sampling, so every pair of one seed "
        "gets the same configurations) over lr "
        f"{opts.lr_range[0]:g}-{opts.lr_range[1]:g} (log), epochs {opts.epochs_range[0]}-{opts.epochs_range[1]}, "
        f"batch {'/'.join(map(str, opts.batch_sizes))}, weight decay {opts.wd_range[0]:g}-{opts.wd_range[1]:g} (log). "
        f"kappa = {opts.kappa}, accuracy tolerance {100 * opts.accuracy_tolerance:g} point. sigma compares class-0 "
        "probabilities on Rotten Tomatoes (binary, the reference code) and gold-class probabilities on the 3-class "
        "sets. "
        f"Seeds {', '.join(map(str, opts.seeds))} (each: its own data split, teacher, student head and sampler). "
        f"Compute: {cpu / 60:.0f} min CPU ({wall / 60:.0f} min wall) for the searches, {teacher_cpu / 60:.0f} min "
        f"CPU ({teacher_wall / 60:.0f} min wall) for the teachers, one thread, on the shared 2-core machine."
    )
    table = (
        "| dataset | seed | student | teacher acc (dev) | baseline acc (dev) | baseline sigma train | baseline sigma dev "
        "| preserved before | tuned: trial, config (lowest sigma train within 1 pt) | tuned acc (dev) "
        "| tuned sigma train | tuned sigma dev | preserved after | accepted / trials |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    finding = f"Runs with sigma(train) <= {opts.kappa}, before -> after tuning: " + "; ".join(
        f"{student} {c['before']}/{c['runs']} -> {c['after']}/{c['runs']}" for student, c in counts.items()
    ) + "."
    out.mkdir(parents=True, exist_ok=True)
    (out / "confidence_preservation.json").write_text(
        json.dumps({"settings": vars(opts), "summary": summary, "counts": counts}, indent=2)
    )
    (out / "confidence_preservation.md").write_text(
        "# Confidence preservation before and after prediction-layer tuning\n\n"
        f"{settings}\n\n{table}\n\n{finding}\n\nPer-trial Pareto tables: `{shown(work)}/seed<seed>/<dataset>/<student>/"
        "confidence_search.md`.\n\nRe-run: `HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONPATH=. "
        f"python scripts/studies/confidence_preservation.py --seeds {' '.join(map(str, opts.seeds))}`\n"
    )
    print(table + "\n\n" + finding)


def run_dataset(work: Path, name: str, opts, seed: int) -> None:
    """Teacher (unless done), then the search of each student (unless done), for one dataset and seed."""
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)  # the three MiniLMs share bert-base-uncased's WordPiece
    teacher_rows, dev_rows, columns, labels = load_rows(name, opts, seed)
    max_length = opts.max_length * (2 if columns[1] else 1)
    teacher_train = tokenize(teacher_rows, tokenizer, columns, max_length)
    size = sizes(name, opts)
    train = teacher_train.select(range(size["train_samples"])).flatten_indices()
    dev = tokenize(dev_rows, tokenizer, columns, max_length)
    if not (work / "teacher_metrics.json").exists():
        start, cpu = time.perf_counter(), time.process_time()
        print(f"[{name}, seed {seed}] teacher on {len(teacher_train)} rows", flush=True)
        metrics = train_teacher(work / "teacher", teacher_train, dev, labels, tokenizer, size["teacher_epochs"], seed)
        metrics["seconds"] = {"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu}
        metrics["sizes"] = {**size, "dev_samples": opts.dev_samples}
        (work / "teacher_metrics.json").write_text(json.dumps(metrics, indent=2))
    class_index = 0 if len(labels) == 2 else None
    for student, spec in STUDENTS.items():
        folder = work / student
        if (folder / "confidence_search.json").exists():
            continue
        print(f"[{name}, seed {seed}] {student} student {spec}: baseline + {opts.n_trials} trials", flush=True)
        start, cpu = time.perf_counter(), time.process_time()
        result = run_search(folder, work / "teacher", spec, train, dev, labels, tokenizer, opts, class_index, seed)
        result.save(folder)
        (folder / "timing.json").write_text(
            json.dumps({"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu})
        )
        print(result.summary(), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--teacher_samples", type=int, default=500)
    parser.add_argument("--teacher_epochs", type=float, default=2.0)
    parser.add_argument("--train_samples", type=int, default=250)
    parser.add_argument("--dev_samples", type=int, default=250)
    # A MiniLM-L6 teacher trained on 500 SNLI rows stays near chance with near-uniform outputs, where sigma is
    # trivially small: NLI gets more rows.
    parser.add_argument("--snli_teacher_samples", type=int, default=2000)
    parser.add_argument("--snli_teacher_epochs", type=float, default=3.0)
    parser.add_argument("--snli_train_samples", type=int, default=600)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--n_trials", type=int, default=5)
    parser.add_argument("--kappa", type=float, default=0.05)
    parser.add_argument("--accuracy_tolerance", type=float, default=0.01)
    parser.add_argument("--baseline_lr", type=float, default=1e-4)
    parser.add_argument("--baseline_epochs", type=int, default=3)
    parser.add_argument("--baseline_batch_size", type=int, default=16)
    parser.add_argument("--baseline_weight_decay", type=float, default=0.01)
    parser.add_argument("--lr_range", type=float, nargs=2, default=(1e-5, 5e-4))
    parser.add_argument("--epochs_range", type=int, nargs=2, default=(1, 4))
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=(8, 16, 32))
    parser.add_argument("--wd_range", type=float, nargs=2, default=(1e-6, 0.1))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "confidence_preservation"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--report_only", action="store_true", help="Rewrite the summary from finished results.")
    opts = parser.parse_args()
    if opts.train_samples > opts.teacher_samples or opts.snli_train_samples > opts.snli_teacher_samples:
        parser.error("--(snli_)train_samples must be <= --(snli_)teacher_samples (students train on teacher rows)")
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(opts.work_dir)

    for seed in [] if opts.report_only else opts.seeds:
        for name in opts.datasets:
            run_dataset(work / f"seed{seed}" / name, name, opts, seed)
    write_report(work, Path(opts.out), opts)


if __name__ == "__main__":
    main()
