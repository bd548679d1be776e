"""Which Rotten Tomatoes students can temperature scaling calibrate to a test ECE <= 0.03? A sweep over KD settings.

For each named configuration: distil the main job's teacher into a 3-layer student (the teacher's layers 1, 3, 5, as
the main job) with `DistillTrainer`, fit one temperature on the validation split (NLL, `hf_kd.calibrate_temperature`),
and record the test ECE (15 equal-width bins) before and after, accuracy, and, for reference only, the lowest test ECE
that any temperature in [0.5, 3] reaches (chosen on the test labels: the floor one temperature cannot go below).

    HF_HUB_OFFLINE=1 python scripts/studies/calibration_sweep_rt.py --teacher outputs/main_job/teacher \
        --configs main_job pure_kd_t1 pure_kd_t2 all_rows

Results are appended to `<work_dir>/results.jsonl` (an interrupted sweep resumes) and summarised in
`docs/calibration/sweep.md`.
"""

import argparse
import json
import os
from pathlib import Path

from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_kd import calibrate_temperature
from hf_kd.evaluation import compute_logits, read_labels
from hf_kd.metrics import expected_calibration_error, softmax
from hf_kd.recipes import ScriptArguments, load_splits, main_job_training_args, run
from hf_kd.student import student_from_teacher_layers

ROOT = Path(__file__).resolve().parents[2]

# name -> (training rows, student epochs, KD temperature, alpha, student). `main_job` is trainers/main_job.py's
# default. Student "teacher_layers": the teacher's layers 1, 3, 5 (the main job's); a Hub id: that pre-trained model
# with a fresh head (L6: a born-again student of the teacher's own architecture, Furlanello et al. 2018).
L6 = "sentence-transformers/all-MiniLM-L6-v2"
CONFIGS = {
    "main_job": (6000, 3.0, 2.0, 0.8, "teacher_layers"),
    "pure_kd_t1": (6000, 3.0, 1.0, 1.0, "teacher_layers"),
    "pure_kd_t2": (6000, 3.0, 2.0, 1.0, "teacher_layers"),
    "pure_kd_t4": (6000, 3.0, 4.0, 1.0, "teacher_layers"),
    "all_rows": (None, 3.0, 2.0, 0.8, "teacher_layers"),
    "all_rows_pure_kd_t2": (None, 3.0, 2.0, 1.0, "teacher_layers"),
    "l6_pure_kd_t1": (6000, 3.0, 1.0, 1.0, L6),
    "l6_all_rows_pure_kd_t1": (None, 3.0, 1.0, 1.0, L6),
}
N_BINS = 15


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="Fine-tuned teacher folder (the main job's teacher/).")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seed", type=int, default=42, help="Training seed (main job: 42).")
    parser.add_argument("--split_seed", type=int, default=42,
                        help="Movie-split seed (main job: 42). Keep the teacher's: another split can put the teacher's "
                        "training snippets into the student's test split.")
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "calibration_sweep"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "calibration" / "sweep.md"))
    return parser.parse_args(argv)


def run_config(name: str, opts, work: Path) -> dict:
    rows, epochs, temperature, alpha, student_init = CONFIGS[name]
    folder = work / (name if opts.seed == 42 else f"{name}_seed{opts.seed}")
    init = work / "student_init"
    if student_init != "teacher_layers":
        init = student_init
    elif not init.exists():
        student_from_teacher_layers(AutoModelForSequenceClassification.from_pretrained(opts.teacher)).save_pretrained(init)
        AutoTokenizer.from_pretrained(opts.teacher).save_pretrained(init)
    common = dict(dataset_name="rotten_tomatoes", max_train_samples=rows, split_seed=opts.split_seed)
    run(
        ScriptArguments(model_name_or_path=str(init), method="kd", **common),
        main_job_training_args(str(folder), opts.seed, epochs, teacher_model_name_or_path=opts.teacher, temperature=temperature,
                      alpha=alpha, cache_teacher_logits=True, teacher_logits_cache_dir=str(work / "teacher_logits")),
    )
    student = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    splits = load_splits(ScriptArguments(model_name_or_path=str(folder), method="kd", **common), tokenizer)
    result = calibrate_temperature(student, splits["validation"], n_bins=N_BINS)
    test_logits = compute_logits(student, splits["test"], 128)
    labels = read_labels(splits["test"])
    grid = [round(0.5 + 0.01 * i, 2) for i in range(251)]
    ece_by_t = {t: expected_calibration_error(softmax(test_logits, t), labels, N_BINS) for t in grid}
    oracle_t = min(ece_by_t, key=ece_by_t.get)
    return {
        "config": name, "train_rows": rows or len(splits["train"]), "epochs": epochs, "kd_temperature": temperature,
        "alpha": alpha, "seed": opts.seed, "split_seed": opts.split_seed, "calibration_temperature": result.temperature,
        "test_accuracy": float((test_logits.argmax(-1).numpy() == labels).mean()),
        "test_ece_before": expected_calibration_error(softmax(test_logits), labels, N_BINS),
        "test_ece_after": expected_calibration_error(softmax(test_logits, result.temperature), labels, N_BINS),
        "validation_ece_after": result.after["ece"],
        "test_ece_floor": ece_by_t[oracle_t], "test_ece_floor_temperature": oracle_t,
    }


def write_markdown(results: list[dict], path: Path) -> None:
    lines = [
        "Temperature scaling of Rotten Tomatoes students (3 layers: teacher layers 1, 3, 5 of the main job's teacher; "
        f"`l6_*`: {L6} as pre-trained, a fresh head), "
        f"T fitted on the validation split by NLL; ECE with {N_BINS} equal-width bins on the test split (2,581 "
        "snippets). The floor is the lowest test ECE any temperature in [0.5, 3] reaches, chosen on the test labels "
        "(reference only, not a valid calibration).",
        "",
        "| config | rows | epochs | KD T | alpha | seed | accuracy | ECE before | calibration T | ECE after | floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['train_rows']} | {r['epochs']:g} | {r['kd_temperature']:g} | {r['alpha']:g} | "
            f"{r['seed']} | {r['test_accuracy']:.4f} | {r['test_ece_before']:.4f} | "
            f"{r['calibration_temperature']:.3f} | **{r['test_ece_after']:.4f}** | {r['test_ece_floor']:.4f} |"
        )
    lines += ["", "Re-run: `HF_HUB_OFFLINE=1 python scripts/studies/calibration_sweep_rt.py --teacher <main job>/teacher`", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv=None):
    opts = parse_args(argv)
    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "results.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for name in opts.configs:
        if any(r["config"] == name and r["seed"] == opts.seed for r in done):
            continue
        result = run_config(name, opts, work)
        done.append(result)
        with log.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result, indent=2), flush=True)
    write_markdown(done, Path(opts.out))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
