"""The one shared module of the benchmarks in scripts/benchmarks/ (a sibling of the scripts: `python
scripts/benchmarks/<name>.py` puts this folder first on `sys.path`).

Training overhead (distill_overhead.py, early_exit_overhead.py, self_kd_overhead.py, letkd_cost.py): per-step timing,
peak memory, interleaved subprocess runs. Each configuration runs in its own subprocess (a clean peak-RSS reading, no
state shared between configurations), the configurations are interleaved and repeated so that drifts in machine load
hit all of them alike, and the figures are medians over repeats.

Early exits (early_exit_rt.py, early_exit_fmnist.py, exit_uncertainty.py):

- `sweep`: accuracy and mean layers for every threshold of a policy, computed offline from every exit's probabilities
  (one forward pass; `hf_kd.early_exit.simulate_exits` makes the same decisions as `predict_with_exits`).
- `operating_point`: the threshold with the fewest mean layers whose *validation* accuracy is within a tolerance of
  the final exit's.
- `time_variants`: wall-clock of callables over prepared batches, interleaved repeats, medians.

letKD on Fashion-MNIST (letkd_fmnist.py, letkd_cost.py): the teacher and student CNNs, the data, the training
arguments, the teacher, and the test accuracy. Teacher: stem 16, stages 32/64/128 (two 3x3 convolutions each), about
18 MFLOPs per image. Student: stem 8, stages 16/32/64, about 4.6 MFLOPs (a quarter). Both end at 4x4 after three
stride-2 stages (28 -> 14 -> 7 -> 4), so teacher and student positions match one to one at both letKD locations (after
the first block of the last stage, and after the last stage).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import TrainerCallback

from hf_kd import KDLayerForImageClassification, KDLayerImageConfig
from hf_kd.data import load_fashion_mnist, load_rotten_tomatoes, tokenize_dataset
from hf_kd.early_exit import simulate_exits

# --- Training overhead ------------------------------------------------------------------------------------


class StepTimer(TrainerCallback):
    """Records the wall-clock seconds of every optimiser step (`on_step_begin` to `on_step_end`)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


class PeakRSS:
    """Context manager sampling this process's resident memory every 10 ms; `peak_mb` is the maximum seen."""

    def __enter__(self):
        import psutil

        self._process = psutil.Process()
        self._peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self._peak / 2**20


def step_summary(times: list[float], warmup: int) -> dict:
    """Median and mean seconds per step after the first `warmup` steps."""
    timed = times[warmup:]
    return {"seconds_per_step": statistics.median(timed), "mean_seconds_per_step": statistics.fmean(timed),
            "steps_timed": len(timed)}


def overhead_parser(
    description: str, configs, out: str, steps: tuple[str, int], warmup: int, scratch: tuple[str, str]
) -> argparse.ArgumentParser:
    """The flags every overhead benchmark takes: `steps` (flag, default; e.g. `("--steps", 40)`), `--warmup`,
    `--batch_size`, `--repeats`, `--threads`, `--out` (report folder), and the hidden `--worker` (one of `configs`)
    and `scratch` (flag, default folder) that the interleaved subprocesses get."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(steps[0], type=int, default=steps[1])
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=out)
    parser.add_argument("--worker", choices=configs, help=argparse.SUPPRESS)
    parser.add_argument(scratch[0], default=scratch[1], help=argparse.SUPPRESS)
    return parser


def forwarded_args(opts: argparse.Namespace, names: list[str]) -> list[str]:
    """`["--name", "value", ...]` of the parsed options `names`, to hand the same settings to a worker."""
    return [item for name in names for item in (f"--{name}", str(getattr(opts, name)))]


def launch_worker(script: str, config: str, args: list[str], env: dict) -> dict:
    """Run `script --worker config *args` in a fresh interpreter; its last stdout line is a JSON result."""
    cmd = [sys.executable, script, "--worker", config, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {config} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved(configs, repeats: int, run) -> dict[str, list[dict]]:
    """`run(config)` for every config, `repeats` rounds, configs interleaved within each round."""
    runs = {config: [] for config in configs}
    for repeat in range(repeats):
        for config in configs:
            result = run(config)
            runs[config].append(result)
            print(f"repeat {repeat} {config:<16} {result['seconds_per_step']:.4f} s/step  "
                  f"peak {result['peak_rss_mb']:.0f} MB", flush=True)
    return runs


def alternating(configs, repeats: int, run, describe) -> dict[str, list[dict]]:
    """`run(config)` for every config, `repeats` rounds, the order reversed every other round (ABC, CBA, ...) so that
    no config always runs first or last; prints `describe(result)` after each run. A `run` that returns `None` (a
    failed run, recorded by the caller) adds nothing to that config's list."""
    runs = {config: [] for config in configs}
    for repeat in range(repeats):
        for config in configs if repeat % 2 == 0 else configs[::-1]:
            result = run(config)
            if result is None:
                continue
            runs[config].append(result)
            print(f"round {repeat} {config:<24} {describe(result)}", flush=True)
    return runs


def median_summary(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per config: the median over repeats of seconds per step and the largest peak RSS."""
    return {config: {"seconds_per_step": statistics.median(r["seconds_per_step"] for r in results),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in results)} for config, results in runs.items()}



def step_table(summary: dict[str, dict]) -> list[str]:
    """Markdown lines: median seconds per step and peak RSS of every configuration of `median_summary`."""
    lines = ["| configuration | median s/step | peak RSS (MB) |", "|---|---|---|"]
    return lines + [f"| {c} | {s['seconds_per_step']:.4f} | {s['peak_rss_mb']:.0f} |" for c, s in summary.items()]


def write_overhead_report(out: str, name: str, opts, runs, summary, ratios: dict[str, float], table: list[str],
                          targets: dict[str, str]) -> None:
    """Write `<out>/<name>.json` (`settings`: the options with the torch version and CPU count; `summary`, `ratios`,
    `runs`) and `<out>/<name>.md` (the markdown lines `table`, then each ratio with its target from `targets`, `-`
    where it has none), and print the markdown."""
    import os

    import torch

    result = {"settings": vars(opts) | {"torch": torch.__version__, "cpu_count": os.cpu_count()},
              "summary": summary, "ratios": ratios, "runs": runs}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2))
    lines = table + ["", "| ratio | value | target |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {targets.get(k, '-')} |" for k, v in ratios.items()]
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

# --- Early exits ------------------------------------------------------------------------------------------

# Threshold grids swept offline. Entropy thresholds are fractions of the largest entropy, log(num_classes).
GRIDS = {
    "max_prob": [0.1 + 0.01 * i for i in range(90)] + [0.995, 0.999, 1.0],
    "entropy": [0.0, 0.001, 0.005] + [0.01 * i for i in range(1, 100)],
    "patience": [1, 2, 3, 4, 5],
}


def grid(policy: str, num_classes: int) -> list[float]:
    """The threshold values swept for `policy` (max_prob values below 1/num_classes are dropped: all would exit)."""
    if policy == "entropy":
        return [round(f * math.log(num_classes), 6) for f in GRIDS["entropy"]]
    if policy == "max_prob":
        return [v for v in GRIDS["max_prob"] if v >= 1 / num_classes]
    return GRIDS[policy]


def policy_kwargs(policy: str, value) -> dict:
    return {"patience": int(value)} if policy == "patience" else {"threshold": value}


def sweep(policy: str, probs: np.ndarray, labels: np.ndarray, exit_layers: list[int], exit_flops=None) -> list[dict]:
    """Accuracy and mean layers run (and the FLOPs fraction of the full model, given each exit's cumulative FLOPs)
    for every value of the policy's grid; `probs` `(K, N, C)`, `labels` `(N,)`."""
    rows = []
    for value in grid(policy, probs.shape[-1]):
        chosen, chosen_probs = simulate_exits(probs, policy=policy, **policy_kwargs(policy, value))
        row = {
            "value": value,
            "accuracy": float((chosen_probs.argmax(-1) == labels).mean()),
            "mean_layers": float(np.asarray(exit_layers)[chosen].mean()),
        }
        if exit_flops is not None:
            row["flops_fraction"] = float(np.asarray(exit_flops)[chosen].mean() / exit_flops[-1])
        rows.append(row)
    return rows


def operating_point(val_rows: list[dict], final_accuracy: float, tolerance: float) -> dict:
    """The validation row with the fewest mean layers whose accuracy is >= `final_accuracy - tolerance`."""
    admissible = [r for r in val_rows if r["accuracy"] >= final_accuracy - tolerance]
    return min(admissible, key=lambda r: (r["mean_layers"], -r["accuracy"]))


def policy_curves(
    val_probs, val_labels, test_probs, test_labels, exit_layers, tolerance: float, exit_flops=None
) -> dict:
    """Per policy: the test curve, and the operating point chosen on validation with its test figures."""
    final_val = float((val_probs[-1].argmax(-1) == val_labels).mean())
    policies = {}
    for policy in GRIDS:
        val_rows = sweep(policy, val_probs, val_labels, exit_layers, exit_flops)
        test_rows = sweep(policy, test_probs, test_labels, exit_layers, exit_flops)
        chosen = operating_point(val_rows, final_val, tolerance)
        test_at = next(r for r in test_rows if r["value"] == chosen["value"])
        policies[policy] = {
            "value": chosen["value"],
            "validation": chosen,
            "test": test_at,
            "layer_reduction": exit_layers[-1] / test_at["mean_layers"],
            "test_curve": test_rows,
        }
    return policies


def timed_points(curve: list[dict], count: int) -> list:
    """About `count` grid values spread evenly along a policy's curve (by mean layers), for wall-clock timing."""
    by_layers = sorted(curve, key=lambda r: r["mean_layers"])
    picks = np.linspace(0, len(by_layers) - 1, count).round().astype(int)
    return sorted({by_layers[i]["value"] for i in picks})


def early_exit_fmnist_splits(opts) -> dict:
    """The Fashion-MNIST splits of early_exit_fmnist.py (standardised, torch format): the training images shuffled
    with `opts.seed`, the first `opts.validation_size` of them as validation and the rest as train; the test images."""
    train = load_fashion_mnist("train", normalize=True).shuffle(seed=opts.seed)
    return {
        "train": train.select(range(opts.validation_size, len(train))).with_format("torch"),
        "validation": train.select(range(opts.validation_size)).with_format("torch"),
        "test": load_fashion_mnist("test", normalize=True).with_format("torch"),
    }


def early_exit_rt_splits(tokenizer, opts):
    """The tokenized Rotten Tomatoes splits of early_exit_rt.py: split by movie with `opts.seed`, the first
    `opts.train_samples` training rows (all when falsy), truncated to `opts.max_length` tokens."""
    splits = load_rotten_tomatoes(seed=opts.seed)
    if opts.train_samples:
        splits["train"] = splits["train"].select(range(opts.train_samples))
    return tokenize_dataset(splits, tokenizer, max_length=opts.max_length)


def time_variants(variants: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable; the variants are interleaved within each repeat so load drift hits all."""
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure_speed(workloads: dict[str, list], run_full: Callable, run_exits: Callable, policies: dict, repeats: int):
    """Wall-clock of the full model vs early exits over prepared batches.

    Args:
        workloads: name -> list of batches (e.g. `{"bs1": ..., "bs32": ...}`); the last one also gets a curve.
        run_full: `run_full(batches)` runs the static model (every layer, final exit).
        run_exits: `run_exits(batches, policy, value)` runs `predict_with_exits`.
        policies: the output of `policy_curves` (operating points and test curves).
        repeats: interleaved repeats; medians are reported.

    Returns:
        Per workload the median seconds, speed-ups at each policy's operating point and the number of rows, and
        `curve`: accuracy vs measured speed-up for about 5 points along each policy's curve on the last workload.
    """
    result = {}
    for name, prepared in workloads.items():
        run_full(prepared[:5])  # warm-up
        variants = {"full": partial(run_full, prepared)}
        for policy, p in policies.items():
            variants[policy] = partial(run_exits, prepared, policy, p["value"])
        medians = time_variants(variants, repeats)
        result[name] = {
            "seconds": medians,
            "speedup": {v: medians["full"] / s for v, s in medians.items() if v != "full"},
            "batches": len(prepared),
        }
    name, prepared = list(workloads.items())[-1]
    points = sorted({(policy, value) for policy, p in policies.items() for value in timed_points(p["test_curve"], 5)})
    variants = {"full": partial(run_full, prepared)}
    for policy, value in points:
        variants[f"{policy}={value:g}"] = partial(run_exits, prepared, policy, value)
    medians = time_variants(variants, max(1, repeats // 2))
    curve = []
    for policy, value in points:
        row = next(r for r in policies[policy]["test_curve"] if r["value"] == value)
        curve.append({"policy": policy, "value": value, "workload": name, **row,
                      "speedup": medians["full"] / medians[f"{policy}={value:g}"]})
    result["curve"] = curve
    return result


def curve_markdown(result: dict, unit: str = "layers") -> list[str]:
    """Markdown lines: the operating-point table and the accuracy vs layers / wall-clock curves."""
    lines = [
        f"| policy | threshold | test accuracy | final-exit accuracy | mean {unit} | fewer {unit} | speed-up bs1 "
        "| speed-up bs32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    final = result["curve"]["per_exit_accuracy"]["test"][-1]
    speed = result.get("speed", {})
    for policy, p in result["curve"]["policies"].items():
        speedups = [speed.get(w, {}).get("speedup", {}).get(policy) for w in ("bs1", "bs32")]
        cells = " | ".join(f"{s:.2f}x" if s is not None else "-" for s in speedups)
        lines.append(
            f"| {policy} | {p['value']:g} | {p['test']['accuracy']:.4f} | {final:.4f} | "
            f"{p['test']['mean_layers']:.2f} | {p['layer_reduction']:.2f}x | {cells} |"
        )
    if speed:
        lines += ["", f"Accuracy vs measured speed-up over the full model ({speed['curve'][0]['workload']}):", "",
                  f"| policy | threshold | test accuracy | mean {unit} | speed-up |", "|---|---|---|---|---|"]
        lines += [f"| {r['policy']} | {r['value']:g} | {r['accuracy']:.4f} | {r['mean_layers']:.2f} | "
                  f"{r['speedup']:.2f}x |" for r in speed["curve"]]
    lines += ["", f"Accuracy vs mean {unit} (test, every threshold of the grid):", ""]
    for policy, p in result["curve"]["policies"].items():
        points = ", ".join(f"{r['mean_layers']:.2f}:{r['accuracy']:.4f}" for r in p["test_curve"])
        lines.append(f"- {policy} ({unit}:accuracy): {points}")
    return lines


# --- letKD on Fashion-MNIST ------------------------------------------------------------------------------

TEACHER_CNN = {"stem_channels": 16, "stage_channels": [32, 64, 128], "convs_per_stage": 2}
STUDENT_CNN = {"stem_channels": 8, "stage_channels": [16, 32, 64], "convs_per_stage": 2}
NUM_LABELS = 10


def fashion_mnist(split: str, max_samples: int | None = None):
    """Standardised Fashion-MNIST as torch tensors (`pixel_values`, `labels`)."""
    return load_fashion_mnist(split, max_samples=max_samples, normalize=True).with_format("torch")


def cnn(kind: str, seed: int, kd_layer_templates: dict | None = None) -> KDLayerForImageClassification:
    torch.manual_seed(seed)
    layout = TEACHER_CNN if kind == "teacher" else STUDENT_CNN
    config = KDLayerImageConfig(num_labels=NUM_LABELS, kd_layer_templates=kd_layer_templates, **layout)
    return KDLayerForImageClassification(config)


def sgd_args(output_dir, seed: int, epochs: float, lr: float = 0.05, batch_size: int = 64, **kwargs) -> dict:
    """The paper's optimiser (SGD, Nesterov momentum 0.9, weight decay 5e-4, batch 64) with a cosine schedule (a few
    epochs here, not 240 with steps)."""
    return dict(
        output_dir=str(output_dir), seed=seed, num_train_epochs=epochs, learning_rate=lr,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=512, optim="sgd",
        optim_args="momentum=0.9,nesterov=True", weight_decay=5e-4, lr_scheduler_type="cosine",
        save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, logging_steps=200,
        dataloader_num_workers=0, disable_tqdm=True,
    ) | kwargs


def student_for(method: str, seed: int, templates: int) -> KDLayerForImageClassification:
    """The student of a benchmark method: plain for `ce`/`kd`, KD layers for `letkd1`/`letkd2`."""
    kd_layers = {"ce": None, "kd": None, "letkd1": {"penultimate": templates},
                 "letkd2": {"penultimate": templates, "intermediate": 8 * NUM_LABELS}}[method]
    return cnn("student", seed=1000 + seed, kd_layer_templates=kd_layers)


def distill_config(method: str, common: dict, cache_dir: Path):
    """Config of a benchmark method: `kd` is Hinton KD (DistillConfig) with CRD's T=4, alpha=0.9 from cached logits;
    `kd_online` the same with the teacher run at every step; `letkd1`/`letkd2` are CE + KD layers (LetKDConfig,
    alpha=0)."""
    from hf_kd import DistillConfig, LetKDConfig

    logits_cache = {"teacher_logits_cache_dir": str(cache_dir / "logits")}
    if method in ("kd", "kd_online"):
        return DistillConfig(**common, **logits_cache, temperature=4.0, alpha=0.9, cache_teacher_logits=method == "kd")
    return LetKDConfig(
        **common, **logits_cache, letkd_cache_dir=str(cache_dir / "targets"), alpha=0.0, letkd=int(method[-1])
    )


def distill_trainer(args, **kwargs):
    """The trainer of a [`distill_config`]: LetKDTrainer for a LetKDConfig, else DistillTrainer."""
    from hf_kd import DistillTrainer, LetKDConfig, LetKDTrainer

    return (LetKDTrainer if isinstance(args, LetKDConfig) else DistillTrainer)(args=args, **kwargs)


def train_teacher(output_dir: Path, train, epochs: float) -> KDLayerForImageClassification:
    """Train (once) the plain teacher CNN with cross-entropy; later calls load it from `output_dir`."""
    from transformers import Trainer, TrainingArguments

    if (output_dir / "config.json").exists():
        return KDLayerForImageClassification.from_pretrained(output_dir).eval()
    teacher = cnn("teacher", seed=0)
    start = time.perf_counter()
    Trainer(model=teacher, args=TrainingArguments(**sgd_args(output_dir / "run", 0, epochs)), train_dataset=train).train()
    teacher.save_pretrained(output_dir)
    (output_dir / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return teacher.eval()


@torch.no_grad()
def test_accuracy(model, test, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(test), batch_size):
        rows = test[start : start + batch_size]
        correct += (model(pixel_values=rows["pixel_values"]).logits.argmax(-1) == rows["labels"]).sum().item()
    return correct / len(test)

# --- Causal LMs (lm_vs_trl.py, lm_topk_cache.py) ------------------------------------------------------------

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def article_messages(tokenizer, split: str, rows: int, length: int):
    """`rows` BBC News articles of `split` ([`hf_kd.lm_data.lm_text_dataset`]) as chat `messages` (TRL's format) of
    exactly `length` tokens each under `tokenizer`'s chat template, so that no batch is padded or truncated (TRL pads
    and truncates on the left, hf_kd on the right: with equal lengths both see the same tokens at the same positions).

    The user turn asks for an article with the article's headline (its first line); the assistant turn is the start of
    the article's body, cut to the token budget. Nearly every token is a completion token: the logits dominate.
    """
    from datasets import Dataset

    from hf_kd.lm_data import lm_text_dataset, tokenize_lm_example

    kept = []
    for text in lm_text_dataset()[split]["text"]:
        headline, _, body = text.strip().partition("\n")
        user = {"role": "user", "content": f"Write a BBC news article with the headline: {headline.strip()}"}
        prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        budget = length - len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) - 2  # "<|im_end|>", "\n"
        body_ids = tokenizer(body.strip(), add_special_tokens=False)["input_ids"]
        if budget < 16 or len(body_ids) < budget:
            continue
        messages = [user, {"role": "assistant", "content": tokenizer.decode(body_ids[:budget])}]
        if len(tokenize_lm_example({"messages": messages}, tokenizer, max_length=10 * length)["input_ids"]) == length:
            kept.append({"messages": messages})
        if len(kept) == rows:
            return Dataset.from_list(kept)
    raise ValueError(f"only {len(kept)} articles of {split!r} give {length}-token conversations, {rows} asked")


def lm_held_out(students: dict, teacher, dataset, batch_size: int = 4) -> dict[str, dict]:
    """Held-out next-token metrics of each model of `students` on `dataset` (tokenized: `input_ids`, `labels`; all
    rows the same length), one function for every trainer compared: `perplexity` (exp of the mean gold-token NLL over
    the completion tokens) and `top1_agreement` with `teacher` ([`hf_kd.metrics.lm_token_statistics`])."""
    import torch

    from hf_kd.metrics import lm_token_statistics

    sums = {name: torch.zeros(2, dtype=torch.float64) for name in students}
    count = 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            input_ids, labels = torch.tensor(rows["input_ids"]), torch.tensor(rows["labels"])[:, 1:]
            counted = labels != -100
            count += int(counted.sum())
            teacher_logits = teacher(input_ids=input_ids).logits[:, :-1]
            for name, model in students.items():
                logits = teacher_logits if model is teacher else model(input_ids=input_ids).logits[:, :-1]
                stats = lm_token_statistics(logits, labels, teacher_logits)
                sums[name] += stats[counted][:, [2, 4]].double().sum(0)
    return {name: {"perplexity": math.exp(s[0].item() / count), "top1_agreement": s[1].item() / count,
                   "tokens": count} for name, s in sums.items()}
