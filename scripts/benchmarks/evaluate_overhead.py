"""Should `make_compute_metrics` go through hf_kd's `evaluate` modules? The cost of one evaluation both ways.

The same student metrics (ECE and MCE with 15 bins, NLL, Brier, mean entropy) of the same logits, per evaluation:

  direct     hf_kd.metrics.make_compute_metrics(n_bins=15)(EvalPrediction)   what the trainers call today
  evaluate   softmax, then evaluate.combine of the five hf_kd modules (loaded once, outside the timing):
             .compute(predictions=probs, references=labels)

Both run interleaved in one process (`--repeats` rounds, medians), for evaluation sets of several sizes (1,200 rows is
Rotten Tomatoes' validation split) and `--classes` classes; the module loading time (once per process) is reported
apart. Writes docs/benchmarks/evaluate_overhead.{md,json}.

    HF_HUB_OFFLINE=1 python scripts/benchmarks/evaluate_overhead.py --sizes 1200 10000 100000 --repeats 7
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import evaluate
import numpy as np
from transformers import EvalPrediction

from hf_kd.metrics import make_compute_metrics, module_path, softmax

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("expected_calibration_error", "maximum_calibration_error", "negative_log_likelihood", "brier_score",
           "predictive_entropy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1200, 10000, 100000])
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    opts = parser.parse_args()

    start = time.perf_counter()
    combined = evaluate.combine([evaluate.load(module_path(name), n_bins=15) if "calibration" in name
                                 else evaluate.load(module_path(name)) for name in MODULES])
    load_seconds = time.perf_counter() - start
    direct = make_compute_metrics(n_bins=15)

    rows = []
    for size in opts.sizes:
        rng = np.random.default_rng(size)
        logits = rng.normal(size=(size, opts.classes)).astype(np.float32) * 2
        labels = rng.integers(0, opts.classes, size=size)
        variants = {
            "direct": lambda x=logits, y=labels: direct(EvalPrediction(predictions=x, label_ids=y)),
            "evaluate": lambda x=logits, y=labels: combined.compute(predictions=softmax(x), references=y),
        }
        first = {name: run() for name, run in variants.items()}
        assert abs(first["direct"]["ece"] - first["evaluate"]["expected_calibration_error"]) < 1e-12
        times = {name: [] for name in variants}
        for _ in range(opts.repeats):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(values) for name, values in times.items()}
        rows.append({"rows": size, "classes": opts.classes, **{f"{k}_ms": v * 1e3 for k, v in medians.items()},
                     "ratio": medians["evaluate"] / medians["direct"],
                     "overhead_ms": (medians["evaluate"] - medians["direct"]) * 1e3})
        print(rows[-1], flush=True)

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"repeats": opts.repeats, "module_load_seconds": load_seconds, "evaluate": evaluate.__version__,
              "rows": rows}
    (out / "evaluate_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# make_compute_metrics directly vs through hf_kd's evaluate modules",
        "",
        f"ECE and MCE (15 bins), NLL, Brier and entropy of the same logits, median of {opts.repeats} interleaved "
        f"evaluations (`scripts/benchmarks/evaluate_overhead.py`, evaluate {evaluate.__version__}). Loading the five "
        f"modules once: {load_seconds:.2f} s.",
        "",
        "| rows | classes | direct (ms) | evaluate modules (ms) | ratio | overhead per evaluation (ms) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['rows']} | {r['classes']} | {r['direct_ms']:.1f} | {r['evaluate_ms']:.1f} | {r['ratio']:.1f}x | "
              f"{r['overhead_ms']:.1f} |" for r in rows]
    (out / "evaluate_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
