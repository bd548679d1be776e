"""What letKD costs on Fashion-MNIST: the teacher targets for the 60,000 training images, faiss against scikit-learn,
and the training time per step (PAPERS.md section 5).

1. Targets (`targets`): a letKD-2 DistillTrainer on all 60,000 images (teacher and student of
   scripts/letkd_bench.py), timed phase by phase: data fingerprints, the teacher pass that collects its features at
   both locations (60,000 x 4 x 4 = 960,000 positions each, 128 channels), the K-means of the penultimate codebook
   (K templates, 20 iterations, faiss) and the intermediate LDA + per-class K-means + score matrix. The targets land
   in the cache that scripts/bench_letkd_fmnist.py reads (same teacher, data and settings).
2. Backends (`backends`): faiss and scikit-learn K-means (20 Lloyd iterations, same random-point initialisation) on
   the first `--backend_points` of those real penultimate features, K templates, interleaved and repeated; and both on
   the intermediate per-class K-means (8 centres per class on the LDA features of all 960,000 positions).
3. Steps (`steps`): seconds per training step, each configuration in its own process, interleaved, repeated, medians
   after warm-up, on the first `--step_samples` training images (their own cached targets):
   ce (cross-entropy), kd (cached teacher logits), kd_online (the teacher run at every step, as letKD must),
   letkd1, letkd2.

Writes docs/benchmarks/letkd_cost.{json,md}.

    HF_HUB_OFFLINE=1 python scripts/bench_letkd_cost.py --teacher outputs/letkd_fmnist/teacher
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import PeakRSS, StepTimer, interleaved, launch_worker, median_summary, step_summary  # noqa: E402
from letkd_bench import cnn, distill_config, fashion_mnist, sgd_args, student_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEP_CONFIGS = ("ce", "kd", "kd_online", "letkd1", "letkd2")


def load_teacher(path: str | None):
    from hf_kd import KDLayerForImageClassification

    if path and (Path(path) / "config.json").exists():
        return KDLayerForImageClassification.from_pretrained(path).eval()
    print("no trained teacher given: an untrained one (the cost does not depend on the weights)", flush=True)
    return cnn("teacher", seed=0).eval()


def time_targets(opts, teacher) -> tuple[dict, dict]:
    """Phase timings of a letKD-2 trainer's target fit on the full training set, and the collected features."""
    import hf_kd.trainer.letkd_mixin as mixin
    from hf_kd import DistillTrainer

    seconds, kept = {"fingerprints": 0.0}, {}
    originals = {name: getattr(mixin, name) for name in ("collect_teacher_features", "fit_targets",
                                                           "dataset_fingerprint")}

    def timed(name, keep=False):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = originals[name](*args, **kwargs)
            elapsed = time.perf_counter() - start
            if name == "dataset_fingerprint":
                seconds["fingerprints"] += elapsed
            else:
                seconds[name] = elapsed
            if keep:
                kept[name] = result
            return result
        return wrapper

    mixin.collect_teacher_features = timed("collect_teacher_features", keep=True)
    mixin.fit_targets = timed("fit_targets", keep=True)
    mixin.dataset_fingerprint = timed("dataset_fingerprint")
    try:
        start = time.perf_counter()
        train = fashion_mnist("train", opts.target_samples)
        seconds["load_data"] = time.perf_counter() - start
        common = sgd_args(Path(opts.output_dir) / "cost_run", 0, 1.0)
        args = distill_config("letkd2", common, Path(opts.output_dir) / "cache")
        start = time.perf_counter()
        with PeakRSS() as memory:
            DistillTrainer(model=student_for("letkd2", 0, opts.templates), args=args, teacher_model=teacher,
                           train_dataset=train)
        seconds["trainer_init_total"] = time.perf_counter() - start
    finally:
        for name, original in originals.items():
            setattr(mixin, name, original)
    if "fit_targets" not in kept:
        raise RuntimeError(f"The targets were already cached in {args.letkd_cache_dir}: delete them to time the fit.")
    _, per_location = kept["fit_targets"]
    seconds.update({f"fit_{location}": value for location, value in per_location.items()})
    features, labels = kept["collect_teacher_features"]
    info = {location: list(f.shape) for location, f in features.items()}
    return {"seconds": seconds, "feature_shapes": info, "peak_rss_mb": memory.peak_mb, "images": len(train),
            "templates": opts.templates}, (features, labels)


def time_backends(opts, features, labels) -> dict:
    """faiss vs scikit-learn K-means on real teacher features, interleaved and repeated."""
    from threadpoolctl import threadpool_limits

    from hf_kd.kd_layer_targets import fit_subclass_targets, kmeans

    points = features["penultimate"][: opts.backend_points]
    runs = {"faiss": [], "sklearn": []}
    with threadpool_limits(opts.threads):
        for repeat in range(opts.backend_repeats):
            for backend in runs:
                start = time.perf_counter()
                kmeans(points, opts.templates, num_iterations=20, seed=0, backend=backend)
                runs[backend].append(time.perf_counter() - start)
                print(f"repeat {repeat} penultimate K-means {backend}: {runs[backend][-1]:.1f} s", flush=True)
        intermediate = {}
        for backend in ("faiss", "sklearn"):
            start = time.perf_counter()
            fit_subclass_targets(features["intermediate"], labels["intermediate"], 10, 8, backend=backend)
            intermediate[backend] = time.perf_counter() - start
            print(f"intermediate targets {backend}: {intermediate[backend]:.1f} s", flush=True)
    medians = {backend: statistics.median(times) for backend, times in runs.items()}
    return {"points": list(points.shape), "templates": opts.templates, "penultimate_kmeans_seconds": medians,
            "penultimate_runs": runs, "sklearn_over_faiss": medians["sklearn"] / medians["faiss"],
            "intermediate_fit_seconds": intermediate}


def step_worker(config: str, opts) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    from hf_kd import DistillTrainer

    torch.set_num_threads(opts.threads)
    train = fashion_mnist("train", opts.step_samples)
    teacher = load_teacher(opts.teacher)
    common = sgd_args(Path(opts.output_dir) / f"steps_{config}", 0, 1.0, max_steps=opts.steps,
                      logging_steps=opts.steps)
    method = config if config != "kd_online" else "kd"
    student = student_for(method, 0, opts.templates)
    timer = StepTimer()
    if config == "ce":
        trainer = Trainer(model=student, args=TrainingArguments(**common), train_dataset=train, callbacks=[timer])
    else:
        args = distill_config(config, common, Path(opts.output_dir) / "cache")
        trainer = DistillTrainer(model=student, args=args, teacher_model=teacher, train_dataset=train,
                                 callbacks=[timer])
    with PeakRSS() as memory:
        trainer.train()
    return {"config": config, **step_summary(timer.times, opts.warmup), "peak_rss_mb": memory.peak_mb}


def markdown(result: dict) -> list[str]:
    lines = []
    if "targets" in result:
        t = result["targets"]
        s = t["seconds"]
        lines += [
            f"### Teacher targets for {t['images']:,} training images (letKD-2, K={t['templates']})", "",
            f"Teacher features: {t['feature_shapes']['penultimate'][0]:,} positions x "
            f"{t['feature_shapes']['penultimate'][1]} channels at each location. One core, faiss "
            f"K-means (20 iterations, every point, no subsampling). Peak RSS {t['peak_rss_mb']:.0f} MB.", "",
            "| phase | seconds |", "|---|---|",
            f"| data fingerprints (teacher inputs, + labels) | {s['fingerprints']:.1f} |",
            f"| teacher pass, features at both locations | {s['collect_teacher_features']:.1f} |",
            f"| penultimate: K-means, K={t['templates']} | {s['fit_penultimate']:.1f} |",
            f"| intermediate: LDA + per-class K-means (8 x 10) + score matrix | {s['fit_intermediate']:.1f} |",
            f"| **DistillTrainer init, total** | **{s['trainer_init_total']:.1f}** |",
            f"| (loading the dataset, before) | {s['load_data']:.1f} |", "",
        ]
    if "backends" in result:
        b = result["backends"]
        m = b["penultimate_kmeans_seconds"]
        lines += [
            "### K-means backend: faiss vs scikit-learn (same real features, one core)", "",
            f"Penultimate codebook: K={b['templates']}, 20 iterations, on the first {b['points'][0]:,} teacher "
            f"features ({b['points'][1]} dims), median of {len(b['penultimate_runs']['faiss'])} interleaved repeats. "
            "Intermediate: the whole fit (LDA, 8 centres per class, score matrix) on all positions.", "",
            "| backend | penultimate K-means (s) | intermediate fit (s) |", "|---|---|---|",
            f"| faiss | {m['faiss']:.1f} | {b['intermediate_fit_seconds']['faiss']:.1f} |",
            f"| scikit-learn | {m['sklearn']:.1f} | {b['intermediate_fit_seconds']['sklearn']:.1f} |", "",
            f"scikit-learn / faiss (penultimate): {b['sklearn_over_faiss']:.2f}x.", "",
        ]
    if "steps" in result:
        st = result["steps"]
        summary = st["summary"]
        lines += [
            "### Training time per step", "",
            f"Batch 64, {st['steps']} steps ({st['warmup']} warm-up), each configuration in its own process, "
            f"{st['repeats']} interleaved repeats, median seconds per step, one thread.", "",
            "| configuration | median s/step | peak RSS (MB) |", "|---|---|---|",
        ]
        lines += [f"| {c} | {summary[c]['seconds_per_step']:.4f} | {summary[c]['peak_rss_mb']:.0f} |"
                  for c in STEP_CONFIGS if c in summary]
        lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in st["ratios"].items()]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(ROOT / "outputs" / "letkd_fmnist" / "teacher"))
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "letkd_fmnist"))
    parser.add_argument("--parts", nargs="+", choices=("targets", "backends", "steps"),
                        default=["targets", "backends", "steps"])
    parser.add_argument("--templates", type=int, default=4096)
    parser.add_argument("--target_samples", type=int, default=None, help="Training images for the targets (all).")
    parser.add_argument("--backend_points", type=int, default=61440, help="Teacher features for the backend race.")
    parser.add_argument("--step_samples", type=int, default=3200)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved repeats of the step timings.")
    parser.add_argument("--backend_repeats", type=int, default=2, help="Interleaved repeats of the K-means race.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--worker", choices=STEP_CONFIGS, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    import torch

    torch.set_num_threads(opts.threads)
    if opts.worker:
        print(json.dumps(step_worker(opts.worker, opts)))
        return

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "letkd_cost.json"
    result = json.loads(json_path.read_text()) if json_path.exists() else {}
    result["settings"] = {k: v for k, v in vars(opts).items() if k != "worker"} | {
        "torch": torch.__version__, "cpu_count": os.cpu_count()}
    if "targets" in opts.parts or "backends" in opts.parts:
        teacher = load_teacher(opts.teacher)
        result["targets"], (features, labels) = time_targets(opts, teacher)
        print(json.dumps(result["targets"]), flush=True)
        json_path.write_text(json.dumps(result, indent=2))
        if "backends" in opts.parts:
            result["backends"] = time_backends(opts, features, labels)
            json_path.write_text(json.dumps(result, indent=2))
        del features, labels
    if "steps" in opts.parts:
        worker_args = [f"--{k}={v}" for k, v in vars(opts).items() if k in (
            "teacher", "output_dir", "templates", "step_samples", "steps", "warmup", "threads")]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(opts.threads)}

        def launch(config):
            return launch_worker(__file__, config, worker_args, env)

        for config in ("kd", "letkd2", "letkd1"):
            launch(config)  # fill the logits and targets caches of the step subset; not timed
        runs = interleaved(STEP_CONFIGS, opts.repeats, launch)
        summary = median_summary(runs)
        per_step = {c: summary[c]["seconds_per_step"] for c in STEP_CONFIGS}
        ratios = {"letkd1 / kd_online": per_step["letkd1"] / per_step["kd_online"],
                  "letkd2 / kd_online": per_step["letkd2"] / per_step["kd_online"],
                  "letkd1 / kd": per_step["letkd1"] / per_step["kd"],
                  "letkd2 / kd": per_step["letkd2"] / per_step["kd"],
                  "kd_online / ce": per_step["kd_online"] / per_step["ce"],
                  "kd / ce": per_step["kd"] / per_step["ce"]}
        result["steps"] = {"steps": opts.steps, "warmup": opts.warmup, "repeats": opts.repeats,
                           "summary": summary, "ratios": ratios, "runs": runs}
        json_path.write_text(json.dumps(result, indent=2))
    lines = markdown(result)
    (out / "letkd_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
