"""Temperature-calibrate a trained Rotten Tomatoes student and write before/after numbers and diagrams.

    python scripts/studies/calibration_rt.py --student outputs/main_job/student --teacher outputs/main_job/teacher

Reads the student folder without modifying it: fits one temperature on the validation split (NLL, L-BFGS on cached
logits, hf_kd.calibrate_temperature), folds it into a copy of the student (hf_kd.fold_temperature), and evaluates the
test split before and after (accuracy, ECE and MCE with 15 equal-width bins, NLL, Brier, entropy, and sigma plus the
teacher's numbers when --teacher is given). The splits and tokenization are the main job's (trainers/main_job.py:
hf_kd.data.load_rotten_tomatoes(seed=42), max_length 64). Writes into --output_dir (default docs/calibration/):

    results.md                          markdown tables, ready for the README
    results.json                        every number, the temperature and the settings
    reliability_before_after.png        reliability diagrams: uncalibrated, calibrated (and teacher)
    confidence_histogram_before_after.png
"""

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_kd import UncertaintyReport, calibrate_temperature, evaluate_uncertainty, fold_temperature
from hf_kd.data import load_rotten_tomatoes, tokenize_dataset
from hf_kd.evaluation import compute_logits, read_labels
from hf_kd.hub import before_after_table
from hf_kd.metrics import expected_calibration_error, softmax
from hf_kd.plots import plot_confidence_histogram, plot_reliability_diagram


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="Trained student folder (e.g. <main job>/student).")
    parser.add_argument("--teacher", default=None, help="Teacher folder, for sigma and the teacher's numbers.")
    parser.add_argument("--output_dir", default="docs/calibration")
    parser.add_argument("--n_bins", type=int, default=15)
    parser.add_argument("--max_length", type=int, default=64, help="Tokenization length of the main job.")
    parser.add_argument("--split_seed", type=int, default=42, help="Seed of the movie split of the main job.")
    parser.add_argument("--batch_size", type=int, default=128)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    opts = parse_args(argv)
    start = time.perf_counter()
    out = Path(opts.output_dir)
    student = AutoModelForSequenceClassification.from_pretrained(opts.student)
    tokenizer = AutoTokenizer.from_pretrained(opts.student)
    if (getattr(student.config, "hf_kd", None) or {}).get("temperature") is not None:
        sys.exit(f"{opts.student} is already calibrated (config.hf_kd = {student.config.hf_kd}): pass the raw student")
    splits = tokenize_dataset(load_rotten_tomatoes(seed=opts.split_seed), tokenizer, max_length=opts.max_length)
    validation, test = splits["validation"], splits["test"]
    calibrated_on = (
        f"rotten_tomatoes validation split ({len(validation)} snippets, movie split seed {opts.split_seed})"
    )

    result = calibrate_temperature(student, validation, n_bins=opts.n_bins, batch_size=opts.batch_size,
                                   calibrated_on=calibrated_on)
    print(f"T = {result.temperature:.4f} (fitted on {len(validation)} validation rows)")

    teacher_logits = None
    if opts.teacher is not None:
        teacher = AutoModelForSequenceClassification.from_pretrained(opts.teacher)
        teacher_logits = compute_logits(teacher, test, opts.batch_size, desc="Teacher logits")
    test_logits = compute_logits(student, test, opts.batch_size)
    labels = read_labels(test)
    before = UncertaintyReport.from_logits(test_logits, labels, teacher_logits=teacher_logits, n_bins=opts.n_bins,
                                           split="test", model_name="student")

    calibrated = fold_temperature(copy.deepcopy(student), result.temperature, calibrated_on=calibrated_on)
    # A second forward pass through the folded weights (not logits / T): this is what users of the Hub model get.
    after = evaluate_uncertainty(calibrated, test.add_column("teacher_logits", teacher_logits.tolist())
                                 if teacher_logits is not None else test,
                                 n_bins=opts.n_bins, batch_size=opts.batch_size, split="test", model_name="student")
    expected = UncertaintyReport.from_logits(test_logits / result.temperature, labels, n_bins=opts.n_bins)
    # For reference only (it peeks at the test labels): the lowest test ECE any single temperature reaches. When it is
    # close to the fitted T's, what is left is miscalibration that one temperature cannot remove, plus binning noise.
    grid = [round(0.5 + 0.01 * i, 2) for i in range(251)]
    ece_by_t = {t: expected_calibration_error(softmax(test_logits, t), labels, opts.n_bins) for t in grid}
    oracle_t = min(ece_by_t, key=ece_by_t.get)
    drift = max(abs(after.metrics[k] - expected.metrics[k]) for k in expected.metrics)
    if drift > 1e-4:
        raise RuntimeError(f"folded model disagrees with softmax(logits / T) by {drift:.2e}")

    out.mkdir(parents=True, exist_ok=True)
    panels = {"uncalibrated student": before.reliability["model"],
              f"calibrated student (T = {result.temperature:.3f})": after.reliability["model"]}
    if teacher_logits is not None:
        panels["teacher (uncalibrated)"] = before.reliability["teacher"]
    title = f" on the Rotten Tomatoes test split ({len(test)} snippets, {opts.n_bins} bins)"
    plot_reliability_diagram(panels, out / "reliability_before_after.png", title="Reliability" + title)
    plot_confidence_histogram(panels, out / "confidence_histogram_before_after.png", title="Confidence" + title)

    test_columns = {"student, uncalibrated": before.metrics, "student, calibrated": after.metrics}
    if before.teacher_metrics:
        test_columns["teacher"] = before.teacher_metrics
    markdown = "\n".join([
        f"Temperature scaling of `{Path(opts.student).name}` on Rotten Tomatoes: T = **{result.temperature:.4f}**, "
        f"fitted by minimising the NLL on the validation split ({len(validation)} snippets), evaluated on the test "
        f"split ({len(test)} snippets). ECE/MCE: {opts.n_bins} equal-width bins.",
        "",
        "Test split:",
        "",
        before_after_table(test_columns, opts.n_bins),
        "",
        "For reference, the lowest test ECE that any single temperature in [0.5, 3] reaches (chosen on the test "
        f"labels, so not a valid calibration) is {ece_by_t[oracle_t]:.4f}, at T = {oracle_t:.2f}.",
        "",
        "Validation split (where T was fitted):",
        "",
        before_after_table({"uncalibrated": result.before, "calibrated": result.after}, opts.n_bins),
        "",
        "![Reliability diagrams](reliability_before_after.png)",
        "",
        "![Confidence histograms](confidence_histogram_before_after.png)",
        "",
        f"Command: `python scripts/studies/calibration_rt.py --student {opts.student}"
        + (f" --teacher {opts.teacher}" if opts.teacher else "") + f" --output_dir {opts.output_dir}`",
        "",
    ])
    (out / "results.md").write_text(markdown, encoding="utf-8")
    results = {
        "temperature": result.temperature,
        "calibration": result.to_dict(),
        "test_before": before.to_dict(),
        "test_after": after.to_dict(),
        "test_ece_by_temperature": ece_by_t,
        "settings": vars(opts),
        "seconds": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(markdown)
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
