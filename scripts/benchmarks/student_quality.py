"""Accuracy retention of the 3-layer student on Rotten Tomatoes: the main job over several seeds and students.

For each seed: fine-tune the MiniLM-L6 teacher, distil it into each requested 3-layer student, and record test
accuracy, ECE, entropy and sigma. Target: student accuracy >= 97% of the teacher's. Results are appended to
`<work_dir>/results.jsonl` (an interrupted run resumes) and summarised in docs/benchmarks/student_quality.md.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python scripts/benchmarks/student_quality.py --seeds 42 43 44
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAIN_JOB = ROOT / "trainers" / "main_job.py"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--students", nargs="+", default=["teacher_layers"],
                        help="Values of trainers/main_job.py's --student (see its --help).")
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "student_quality"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("main_job_args", nargs=argparse.REMAINDER, help="Extra flags for trainers/main_job.py.")
    opts = parser.parse_args()

    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.jsonl"
    rows = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    done = {(r["seed"], r["student"]) for r in rows}
    for seed in opts.seeds:
        for student in opts.students:
            if (seed, student) in done:
                continue
            # The main job as its own program (trainers/ is a folder of scripts); it writes what it returns.
            folder = work / f"seed{seed}_{student}"
            subprocess.run([sys.executable, str(MAIN_JOB), "--output_dir", str(folder), "--seed", str(seed),
                            "--student", student, *opts.main_job_args], check=True)
            result = json.loads((folder / "results.json").read_text())
            row = {"seed": seed, "student": student, "teacher_accuracy": result["teacher"]["test_accuracy"],
                   "student_accuracy": result["student"]["test_accuracy"],
                   "retention": result["accuracy_retention"], "student_ece": result["student"]["test_ece"],
                   "student_sigma": result["student"]["test_sigma"],
                   "seconds": result["teacher_seconds"] + result["student_seconds"]}
            rows.append(row)
            with open(results_file, "a") as f:
                f.write(json.dumps(row) + "\n")

    lines = ["| student | seed | teacher acc | student acc | retention | student ECE (15 bins) | sigma | job s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["student"], r["seed"])):
        lines.append(f"| {r['student']} | {r['seed']} | {r['teacher_accuracy']:.4f} | {r['student_accuracy']:.4f} | "
                     f"{100 * r['retention']:.1f}% | {r['student_ece']:.4f} | {r['student_sigma']:.4f} | "
                     f"{r['seconds']:.0f} |")
    for student in sorted({r["student"] for r in rows}):
        kept = [r["retention"] for r in rows if r["student"] == student]
        lines.append(f"| **{student} mean** | {len(kept)} seeds | | | **{100 * statistics.fmean(kept):.1f}%** | | | |")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "student_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
