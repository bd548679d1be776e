"""What letKD costs on Fashion-MNIST: the teacher targets for the 60,000 training images, faiss against scikit-learn,
and the training time per step (PAPERS.md section 5).

1. Targets (`targets`): a letKD-2 LetKDTrainer on all 60,000 images (teacher and student of
   scripts/benchmarks/_common.py), timed phase by phase: data fingerprints, the teacher pass that collects its features at
   both locations (60,000 x 4 x 4 = 960,000 positions each, 128 channels), the K-means of the penultimate codebook
   (K templates, 20 iterations, faiss) and the intermediate LDA + per-class K-means + score matrix, into a cache of
   its own (`--targets_cache_dir`), so the fit is timed even after scripts/benchmarks/letkd_fmnist.py has cached its own.
2. Backends (`backends`): faiss and scikit-learn K-means (20 Lloyd iterations, same random-point initialisation) on
   the first `--backend_points` of those real penultimate features, K templates, interleaved and repeated; and both on
   the intermediate per-class K-means (8 centres per class on the LDA features of all 960,000 positions).
3. Steps (`steps`): seconds per training step, each configuration in its own process, interleaved, repeated, medians
   after warm-up, on the first `--step_samples` training images (their own cached targets):
   ce (cross-entropy), kd (cached teacher logits), kd_online (the teacher run at every step, as letKD must),
   letkd1, letkd2.

Writes docs/benchmarks/letkd_cost.{json,md}.

    HF_HUB_OFFLINE=1 python scripts/benchmarks/letkd_cost.py    # after letkd_fmnist.py has trained the teacher
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from _common import (
    PeakRSS,
    StepTimer,
    cnn,
    distill_config,
    distill_trainer,
    fashion_mnist,
    interleaved,
    launch_worker,
    median_summary,
    sgd_args,
    step_summary,
    student_for,
)

ROOT = Path(__file__).resolve().parents[2]
STEP_CONFIGS = ("ce", "kd", "kd_online", "letkd1", "letkd2")


def load_teacher(path: str | None):
    from hf_kd import KDLayerForImageClassification

    if path and (Path(path) / "config.json").exists():
        return KDLayerForImageClassification.from_pretrained(path).eval()
    print("no trained teacher given: an untrained one (the cost does not depend on the weights)", flush=True)
    return cnn("teacher", seed=0).eval()


class PhaseTimer:
    """Wall and CPU seconds (`time.process_time`: one thread's work, unlike wall time hardly touched by other
    processes on a shared machine) of wrapped functions, summed per phase name."""

    def __init__(self):
        self.wall, self.cpu, self.results = {}, {}, {}

    def wrap(self, name: str, function, keep: bool = False):
        def wrapper(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            result = function(*args, **kwargs)
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu
            if keep:
                self.results[name] = result
            return result
        return wrapper


def time_targets(opts, teacher) -> tuple[dict, dict]:
    """Phase timings of a letKD-2 trainer's target fit on the training set, and the features it collected."""
    import hf_kd.kd_layer_targets as targets_module
    import hf_kd.trainer.letkd_trainer as letkd_trainer
    from hf_kd import LetKDTrainer

    timer = PhaseTimer()
    patches = {(letkd_trainer, "collect_teacher_features"): "teacher pass", (letkd_trainer, "dataset_fingerprint"): "fingerprints",
               (targets_module, "fit_template_targets"): "penultimate fit",
               (targets_module, "fit_subclass_targets"): "intermediate fit"}
    originals = {key: getattr(*key) for key in patches}
    for (module, name), phase in patches.items():
        setattr(module, name, timer.wrap(phase, originals[module, name], keep=phase == "teacher pass"))
    try:
        train = timer.wrap("load data", fashion_mnist)("train", opts.target_samples)
        common = sgd_args(Path(opts.output_dir) / "cost_run", 0, 1.0)
        args = distill_config("letkd2", common, Path(opts.output_dir) / "cache")
        args.letkd_cache_dir = opts.targets_cache_dir or str(Path(opts.output_dir) / "cache" / "targets_timing")
        with PeakRSS() as memory:
            timer.wrap("LetKDTrainer init, total", LetKDTrainer)(
                model=student_for("letkd2", 0, opts.templates), args=args, teacher_model=teacher, train_dataset=train
            )
    finally:
        for (module, name), original in originals.items():
            setattr(module, name, original)
    if "teacher pass" not in timer.results:
        raise RuntimeError(
            f"The targets were already cached in {args.letkd_cache_dir}: delete them or pass another "
            "--targets_cache_dir to time a fit."
        )
    features, labels = timer.results["teacher pass"]
    info = {location: list(f.shape) for location, f in features.items()}
    return {"wall_seconds": timer.wall, "cpu_seconds": timer.cpu, "feature_shapes": info,
            "peak_rss_mb": memory.peak_mb, "images": len(train), "templates": opts.templates}, (features, labels)


def time_backends(opts, features, labels) -> dict:
    """faiss vs scikit-learn K-means on real teacher features, interleaved and repeated (wall and CPU seconds)."""
    from threadpoolctl import threadpool_limits

    from hf_kd.kd_layer_targets import fit_subclass_targets, kmeans

    points = features["penultimate"][: opts.backend_points]
    runs = {"faiss": [], "sklearn": []}
    intermediate = {}
    with threadpool_limits(opts.threads):
        for repeat in range(opts.backend_repeats):
            for backend in runs:
                timer = PhaseTimer()
                timer.wrap("kmeans", kmeans)(points, opts.templates, num_iterations=20, seed=0, backend=backend)
                runs[backend].append({"wall": timer.wall["kmeans"], "cpu": timer.cpu["kmeans"]})
                print(f"repeat {repeat} penultimate K-means {backend}: {runs[backend][-1]}", flush=True)
        for backend in runs:
            timer = PhaseTimer()
            timer.wrap("fit", fit_subclass_targets)(
                features["intermediate"], labels["intermediate"], 10, 8, backend=backend
            )
            intermediate[backend] = {"wall": timer.wall["fit"], "cpu": timer.cpu["fit"]}
            print(f"intermediate targets {backend}: {intermediate[backend]}", flush=True)
    medians = {backend: {kind: statistics.median(r[kind] for r in times) for kind in ("wall", "cpu")}
               for backend, times in runs.items()}
    return {"points": list(points.shape), "templates": opts.templates, "penultimate_kmeans_seconds": medians,
            "penultimate_runs": runs, "intermediate_fit_seconds": intermediate,
            "sklearn_over_faiss_cpu": medians["sklearn"]["cpu"] / medians["faiss"]["cpu"]}


def collect_features(opts, teacher) -> tuple[dict, dict]:
    """The teacher's features at both letKD locations for the training set, without fitting (for `backends`)."""
    import torch
    from transformers import default_data_collator

    from hf_kd.kd_layer_targets import collect_teacher_features

    train = fashion_mnist("train", opts.target_samples)
    student = student_for("letkd2", 0, opts.templates).eval()
    with torch.no_grad():
        out = student(pixel_values=train[:2]["pixel_values"], output_kd_features=True)
    shapes = {location: tuple(f.shape[1:]) for location, f in out.kd_features.items()}
    return collect_teacher_features(teacher, train, default_data_collator, ("intermediate", "penultimate"), shapes,
                                    batch_size=512)


class CPUStepTimer(StepTimer):
    """[`StepTimer`] that also records each step's CPU seconds (`time.process_time`, robust to the other processes of
    a shared machine)."""

    def __init__(self):
        super().__init__()
        self.cpu_times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._cpu_start = time.process_time()
        super().on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self.cpu_times.append(time.process_time() - self._cpu_start)


def step_worker(config: str, opts) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    torch.set_num_threads(opts.threads)
    train = fashion_mnist("train", opts.step_samples)
    teacher = load_teacher(opts.teacher)
    common = sgd_args(Path(opts.output_dir) / f"steps_{config}", 0, 1.0, max_steps=opts.steps,
                      logging_steps=opts.steps)
    method = config if config != "kd_online" else "kd"
    student = student_for(method, 0, opts.templates)
    timer = CPUStepTimer()
    if config == "ce":
        trainer = Trainer(model=student, args=TrainingArguments(**common), train_dataset=train, callbacks=[timer])
    else:
        args = distill_config(config, common, Path(opts.output_dir) / "cache")
        trainer = distill_trainer(args, model=student, teacher_model=teacher, train_dataset=train, callbacks=[timer])
    with PeakRSS() as memory:
        trainer.train()
    cpu = statistics.median(timer.cpu_times[opts.warmup:])
    return {"config": config, **step_summary(timer.times, opts.warmup), "cpu_seconds_per_step": cpu,
            "peak_rss_mb": memory.peak_mb}


def markdown(result: dict) -> list[str]:
    lines = []
    if "targets" in result:
        t = result["targets"]
        wall, cpu = t["wall_seconds"], t["cpu_seconds"]
        rows = [("data fingerprints (teacher inputs, + labels)", "fingerprints"),
                ("teacher pass, features at both locations", "teacher pass"),
                (f"penultimate: K-means, K={t['templates']}", "penultimate fit"),
                ("intermediate: LDA + per-class K-means (8 x 10) + score matrix", "intermediate fit"),
                ("**LetKDTrainer init, total**", "LetKDTrainer init, total"),
                ("(loading the dataset, before)", "load data")]
        lines += [
            f"### Teacher targets for {t['images']:,} training images (letKD-2, K={t['templates']})", "",
            f"Teacher features: {t['feature_shapes']['penultimate'][0]:,} positions x "
            f"{t['feature_shapes']['penultimate'][1]} channels at each location. One thread, faiss K-means (20 "
            f"iterations, every point, no subsampling). Peak RSS {t['peak_rss_mb']:.0f} MB. CPU seconds are this "
            "process's work; wall seconds include waiting for the other processes of the shared machine.", "",
            "| phase | CPU s | wall s |", "|---|---|---|",
        ]
        lines += [f"| {label} | {cpu[key]:.1f} | {wall[key]:.1f} |" for label, key in rows if key in cpu]
        lines.append("")
    if "backends" in result:
        b = result["backends"]
        m, inter = b["penultimate_kmeans_seconds"], b["intermediate_fit_seconds"]
        lines += [
            "### K-means backend: faiss vs scikit-learn (same real features, one thread)", "",
            f"Penultimate codebook: K={b['templates']}, 20 iterations, on the first {b['points'][0]:,} teacher "
            f"features ({b['points'][1]} dims), median of {len(b['penultimate_runs']['faiss'])} interleaved repeats. "
            "Intermediate: the whole fit (LDA, 8 centres per class, score matrix) on all positions.", "",
            "| backend | penultimate K-means CPU s (wall s) | intermediate fit CPU s (wall s) |", "|---|---|---|",
        ]
        lines += [f"| {name} | {m[key]['cpu']:.1f} ({m[key]['wall']:.1f}) | {inter[key]['cpu']:.1f} "
                  f"({inter[key]['wall']:.1f}) |" for key, name in (("faiss", "faiss"), ("sklearn", "scikit-learn"))]
        lines += ["", f"scikit-learn / faiss, penultimate K-means CPU time: {b['sklearn_over_faiss_cpu']:.2f}x.", ""]
    if "steps" in result:
        st = result["steps"]
        summary = st["summary"]
        lines += [
            "### Training time per step", "",
            f"Batch 64, {st['steps']} steps ({st['warmup']} warm-up), each configuration in its own process, "
            f"{st['repeats']} interleaved repeats, medians, one thread. Ratios of CPU seconds per step.", "",
            "| configuration | CPU s/step | wall s/step | peak RSS (MB) |", "|---|---|---|---|",
        ]
        lines += [f"| {c} | {summary[c]['cpu_seconds_per_step']:.4f} | {summary[c]['seconds_per_step']:.4f} | "
                  f"{summary[c]['peak_rss_mb']:.0f} |" for c in STEP_CONFIGS if c in summary]
        lines += ["", "| ratio (CPU s/step) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in st["ratios"].items()]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(ROOT / "outputs" / "letkd_fmnist" / "teacher"))
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "letkd_fmnist"))
    parser.add_argument("--parts", nargs="+", choices=("targets", "backends", "steps"),
                        default=["targets", "backends", "steps"])
    parser.add_argument("--templates", type=int, default=4096)
    parser.add_argument("--target_samples", type=int, default=None, help="Training images for the targets (all).")
    parser.add_argument("--targets_cache_dir", default=None,
                        help="Where `targets` caches its fit (default <output_dir>/cache/targets_timing; it must not "
                        "hold this fit yet, or nothing is timed).")
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
        if "targets" in opts.parts:
            result["targets"], (features, labels) = time_targets(opts, teacher)
            print(json.dumps(result["targets"]), flush=True)
            json_path.write_text(json.dumps(result, indent=2))
        else:
            features, labels = collect_features(opts, teacher)
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
        for config in STEP_CONFIGS:
            summary[config]["cpu_seconds_per_step"] = statistics.median(r["cpu_seconds_per_step"] for r in runs[config])
        cpu = {c: summary[c]["cpu_seconds_per_step"] for c in STEP_CONFIGS}
        pairs = [("letkd1", "kd_online"), ("letkd2", "kd_online"), ("letkd1", "kd"), ("letkd2", "kd"),
                 ("kd_online", "ce"), ("kd", "ce")]
        ratios = {f"{a} / {b}": cpu[a] / cpu[b] for a, b in pairs}
        result["steps"] = {"steps": opts.steps, "warmup": opts.warmup, "repeats": opts.repeats,
                           "summary": summary, "ratios": ratios, "runs": runs}
        json_path.write_text(json.dumps(result, indent=2))
    lines = markdown(result)
    (out / "letkd_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
