"""letKD with per-token KD layers on Rotten Tomatoes: MiniLM-L6 teacher -> 3-layer student, next to plain KD.

1. Teacher: sentence-transformers/all-MiniLM-L6-v2 fine-tuned with cross-entropy on the first `--train_samples`
   training snippets (shuffled, split by movie); saved and reused.
2. Students: the teacher's layers 1, 3, 5 (hf_kd.student, DistilBERT-style init), distilled with DistillTrainer,
   T=2, alpha=0.5 (the same for both, so the KD layer is the only difference):
     kd       plain KD (cached teacher logits)
     letkd1   the same student wrapped in KDLayerForSequenceClassification with a per-token KD layer after its
              last layer (K templates), letkd=1: its loss adds KL(p_T || softmax(s)) over every real token, the
              targets being K-means over the teacher's last-layer token states.
3. Test-split accuracy, ECE (15 bins) and NLL of all three, and seconds per training step.

Writes docs/benchmarks/letkd_rt.{json,md}.

    HF_HUB_OFFLINE=1 python scripts/benchmarks/letkd_rt.py --train_samples 1500 --epochs 2
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TEACHER = "sentence-transformers/all-MiniLM-L6-v2"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "letkd_rt"))
    parser.add_argument("--train_samples", type=int, default=1500)
    parser.add_argument("--teacher_epochs", type=float, default=2.0)
    parser.add_argument("--epochs", type=float, default=2.0, help="Student epochs.")
    parser.add_argument("--templates", type=int, default=4096)
    parser.add_argument("--test_samples", type=int, default=None, help="First N test snippets (default: all).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)

    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from hf_kd import DistillConfig, DistillTrainer, KDLayerForSequenceClassification, LetKDConfig, LetKDTrainer, data
    from hf_kd.evaluation import compute_logits
    from hf_kd.metrics import classification_metrics, softmax
    from hf_kd.student import student_from_teacher_layers

    out = Path(opts.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    splits = data.load_rotten_tomatoes(seed=opts.seed)
    train = splits["train"].shuffle(seed=opts.seed).select(range(opts.train_samples)).flatten_indices()
    train = data.tokenize_dataset(train, tokenizer, max_length=64)
    test = splits["test"] if opts.test_samples is None else splits["test"].select(range(opts.test_samples))
    test = data.tokenize_dataset(test, tokenizer, max_length=64)
    collator = DataCollatorWithPadding(tokenizer)
    common = dict(learning_rate=1e-4, warmup_steps=0.1, per_device_train_batch_size=32, per_device_eval_batch_size=128,
                  eval_strategy="no", save_strategy="no", logging_steps=25, seed=opts.seed, report_to="none",
                  use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)

    teacher_dir = out / "teacher"
    if not (teacher_dir / "config.json").exists():
        teacher = AutoModelForSequenceClassification.from_pretrained(TEACHER, num_labels=2)
        args = TrainingArguments(output_dir=str(out / "teacher_run"), num_train_epochs=opts.teacher_epochs, **common)
        start = time.perf_counter()
        Trainer(model=teacher, args=args, train_dataset=train, processing_class=tokenizer,
                data_collator=collator).train()
        teacher.save_pretrained(teacher_dir)
        (teacher_dir / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()

    def test_metrics(model) -> dict:
        logits = compute_logits(model, test, 128, data_collator=collator, desc="test")
        metrics = classification_metrics(softmax(logits.numpy()), test["label"])
        return {k: metrics[k] for k in ("accuracy", "ece", "nll")}

    results = {"teacher": test_metrics(teacher)}
    print("teacher", results["teacher"], flush=True)
    for method in ("kd", "letkd1"):
        student = student_from_teacher_layers(teacher)  # layers 1, 3, 5
        if method == "letkd1":
            student = KDLayerForSequenceClassification.from_backbone(
                student, kd_layer_templates={"penultimate": opts.templates}
            )
        settings = dict(
            output_dir=str(out / method), num_train_epochs=opts.epochs, temperature=2.0, alpha=0.5,
            teacher_logits_cache_dir=str(out / "cache" / "logits"), **common,
        )
        if method == "letkd1":
            args = LetKDConfig(**settings, letkd=1, letkd_cache_dir=str(out / "cache" / "targets"))
            trainer_class = LetKDTrainer
        else:
            args = DistillConfig(**settings, cache_teacher_logits=True)
            trainer_class = DistillTrainer
        start = time.perf_counter()
        trainer = trainer_class(model=student, args=args, teacher_model=teacher, train_dataset=train,
                                processing_class=tokenizer, data_collator=collator)
        init_seconds = time.perf_counter() - start
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
        results[method] = {**test_metrics(student), "init_seconds": init_seconds, "train_seconds": seconds,
                           "seconds_per_step": seconds / output.global_step, "steps": output.global_step}
        print(method, results[method], flush=True)

    names = {"teacher": "teacher (MiniLM-L6, fine-tuned)", "kd": "student, KD",
             "letkd1": f"student, KD + per-token KD layer (letKD-1, K={opts.templates})"}
    lines = [
        f"Rotten Tomatoes (split by movie, seed {opts.seed}): {opts.train_samples} training snippets, test split "
        f"({len(test)} snippets); teacher {opts.teacher_epochs} epochs, students (teacher layers 1, 3, 5) "
        f"{opts.epochs} epochs, batch 32, lr 1e-4, T=2, alpha=0.5, one seed, one CPU thread.", "",
        "| model | test accuracy | ECE (15 bins) | NLL | s/step |", "|---|---|---|---|---|",
    ]
    for key, row in results.items():
        step = f"{row['seconds_per_step']:.2f}" if "seconds_per_step" in row else "-"
        lines.append(f"| {names[key]} | {row['accuracy']:.4f} | {row['ece']:.4f} | {row['nll']:.4f} | {step} |")
    dest = Path(opts.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "letkd_rt.json").write_text(json.dumps({"settings": vars(opts) | {"cpu_count": os.cpu_count()},
                                                    "results": results}, indent=2))
    (dest / "letkd_rt.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
