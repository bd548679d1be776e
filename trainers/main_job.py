"""The main job: fine-tune a MiniLM-L6 teacher on Rotten Tomatoes, distil it into a 3-layer student, compare them.

    python trainers/main_job.py                      # embedded default, offline, ~8 minutes on 2 CPU cores
    python trainers/main_job.py --output_dir runs/x --train_samples 8000 --epochs 3

Steps: (1) ERM fine-tuning of sentence-transformers/all-MiniLM-L6-v2 (the teacher); (2) DistillTrainer from the
teacher into sentence-transformers/paraphrase-MiniLM-L3-v2 with cached teacher logits; (3) test-split accuracy,
ECE (15 bins), NLL, Brier, mean entropy and the confidence-preservation sigma. Writes `<output_dir>/teacher/`,
`<output_dir>/student/` (model, tokenizer, test_results.json) and `<output_dir>/results.json`, and prints a table.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # trainers/ is a folder of scripts, not a package
from distill import ScriptArguments, run  # noqa: E402

from hf_kd import DistillConfig  # noqa: E402

TEACHER = "sentence-transformers/all-MiniLM-L6-v2"
STUDENT = "sentence-transformers/paraphrase-MiniLM-L3-v2"
COLUMNS = ("accuracy", "ece", "nll", "brier", "entropy", "sigma")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/main_job")
    parser.add_argument("--train_samples", type=int, default=3000, help="Training rows used (of ~7,500).")
    parser.add_argument("--eval_samples", type=int, default=None, help="Validation/test rows used (default: all).")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def training_args(output_dir: str, opts, **kwargs) -> DistillConfig:
    return DistillConfig(
        output_dir=output_dir,
        num_train_epochs=opts.epochs,
        learning_rate=1e-4,
        warmup_steps=0.1,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=25,
        seed=opts.seed,
        report_to="none",
        **kwargs,
    )


def print_table(rows: dict[str, dict]) -> None:
    header = f"{'model':<34}" + "".join(f"{c:>10}" for c in COLUMNS)
    print("\n" + header + "\n" + "-" * len(header))
    for name, metrics in rows.items():
        cells = "".join(
            f"{metrics[f'test_{c}']:>10.4f}" if f"test_{c}" in metrics else f"{'-':>10}" for c in COLUMNS
        )
        print(f"{name:<34}{cells}")


def main(argv=None) -> dict:
    opts = parse_args(argv)
    out = Path(opts.output_dir)
    common = dict(dataset_name="rotten_tomatoes", max_train_samples=opts.train_samples,
                  max_eval_samples=opts.eval_samples, split_seed=opts.seed)
    timings = {}

    start = time.perf_counter()
    print(f"[1/2] Fine-tuning the teacher {TEACHER} on Rotten Tomatoes ({opts.train_samples} rows)")
    teacher_metrics = run(
        ScriptArguments(model_name_or_path=TEACHER, method="erm", **common), training_args(str(out / "teacher"), opts)
    )
    timings["teacher_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    print(f"[2/2] Distilling it into {STUDENT} (T={opts.temperature}, alpha={opts.alpha}, cached teacher logits)")
    student_metrics = run(
        ScriptArguments(model_name_or_path=STUDENT, method="kd", **common),
        training_args(
            str(out / "student"), opts, teacher_model_name_or_path=str(out / "teacher"), temperature=opts.temperature,
            alpha=opts.alpha, cache_teacher_logits=True, teacher_logits_cache_dir=str(out / "teacher_logits_cache"),
        ),
    )
    timings["student_seconds"] = time.perf_counter() - start

    results = {
        "teacher": {"model": TEACHER, **teacher_metrics},
        "student": {"model": STUDENT, **student_metrics},
        "accuracy_retention": student_metrics["test_accuracy"] / teacher_metrics["test_accuracy"],
        **timings,
        "settings": vars(opts),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table({f"teacher  {TEACHER.split('/')[1]}": teacher_metrics, f"student  {STUDENT.split('/')[1]}": student_metrics})
    print(
        f"\nThe student keeps {100 * results['accuracy_retention']:.1f}% of the teacher's test accuracy "
        f"(ECE with 15 equal-width bins; sigma = std of teacher-student confidence gaps on examples both get right)."
        f"\nTeacher {timings['teacher_seconds']:.0f} s, student {timings['student_seconds']:.0f} s. "
        f"Saved: {out / 'student'} and {out / 'results.json'}"
    )
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
