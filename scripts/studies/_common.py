"""The one shared module of scripts/studies/ (a sibling of the scripts, imported as `_common`): the machinery of the
SelfKDTrainer studies (Park et al. 2024) against human label distributions (scripts/studies/self_kd_*.py).

Every method trains the same backbone for the same number of epochs on the same single-label rows, and is
evaluated by its final classifier:

  erm            MultiExitForSequenceClassification with one exit (the last layer, mean-pooled, linear): the same
                 head as the main classifier of self-KD, trained with cross-entropy (transformers.Trainer)
  ls             the same with label smoothing (epsilon over all classes, Trainer's label_smoothing_factor)
  ts             erm's logits divided by one temperature fitted on the validation annotator distributions
                 (hf_kd.calibration.fit_temperature_to_distributions; no extra training)
  selfkd         SelfKDTrainer with the PAPERS.md section 2 defaults (lambda 0.6, m 10 %, ...)
  selfkd_no_rc   the ablation: SelfKDTrainer with recalibration_percent=0
  selfkd_<...>   variants of the [OPEN] choices (VARIANTS below)

Metrics (hf_kd.metrics.human_distribution_divergence, ChaosNLI's conventions): KL(human || model), JS distance, and
accuracy against the majority human label; also mean predictive entropy and ECE (15 bins) against it.
Results are appended to a JSONL file as runs finish, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"

BASE_METHODS = ("erm", "ls", "ts", "selfkd", "selfkd_no_rc")
# [OPEN] choices of PAPERS.md section 2, as SelfKDConfig overrides of the defaults.
VARIANTS = {
    "selfkd": {},
    "selfkd_no_rc": {"recalibration_percent": 0.0},
    "selfkd_before_drop": {"source_layer_side": "before_drop"},
    "selfkd_lower_mean": {"ambiguity_score": "lower_mean"},
    "selfkd_rc_add": {"recalibration_loss": "add"},
    "selfkd_js": {"distill_divergence": "js"},
    "selfkd_t2": {"temperature": 2.0},
    "selfkd_every_epoch": {"recalibration_timing": "every_epoch"},
    "selfkd_first_significant": {"entropy_drop_rule": "first_significant"},
    "selfkd_other_none": {"other_exits": "none"},
}


def study_parser(doc: str, name: str, max_length: int, train_rows: int) -> argparse.ArgumentParser:
    """The flags both studies share (budget, methods, seeds, folders); `name` names the work folder."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_rows", type=int, default=train_rows)
    parser.add_argument("--max_length", type=int, default=max_length)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--warmup_max_epochs", type=int, default=2)
    parser.add_argument("--stable_epochs", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--ls_epsilon", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(BASE_METHODS),
                        help=f"erm, ls, ts (needs erm) and the SelfKD variants {list(VARIANTS)}")
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data_dir", default=str(SHARED_DATA))
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / name))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--summary_only", action="store_true", help="only rebuild the tables from results.jsonl")
    return parser


def budget_of(opts) -> dict:
    torch.set_num_threads(opts.threads)
    return {k: getattr(opts, k) for k in ("epochs", "learning_rate", "batch_size", "ls_epsilon", "warmup_max_epochs",
                                          "stable_epochs")}


def run_method(method: str, seed: int, train, validation, predict_sets: dict, human: dict, majority: dict,
               budget: dict, work_dir: Path, with_ts: bool) -> list[dict]:
    """Train and evaluate `method` (and, for erm with `with_ts`, derive ts from its logits): one record per method
    with `method`, `seed`, `metrics` per split, `info`, `total_seconds`, `cpu_seconds` and `logits` per split."""
    run = train_and_predict(method, seed, train, validation, predict_sets, budget, work_dir)
    runs = [(method, run["logits"], run["info"], run["total_seconds"], run["cpu_seconds"])]
    if method == "erm" and with_ts:
        temperature = temperature_scaled(run["logits"]["validation"], human["validation"])
        scaled = {split: logits / temperature for split, logits in run["logits"].items()}
        runs.append(("ts", scaled, {"temperature": temperature}, 0.0, 0.0))
    records = []
    for name, logits, info, seconds, cpu in runs:
        metrics = {split: distribution_metrics(values, human[split], majority[split]) for split, values in logits.items()}
        records.append({"method": name, "seed": seed, "metrics": metrics, "info": info, "total_seconds": seconds,
                        "cpu_seconds": cpu, "logits": logits})
        print(json.dumps({"method": name, "seed": seed, "info": info, "total_seconds": seconds}),
              json.dumps({k: v for k, v in metrics.items() if k != "validation"}), flush=True)
    return records


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BACKBONE)


def _common_args(output_dir: str, seed: int, budget: dict) -> dict:
    return dict(
        output_dir=output_dir,
        num_train_epochs=budget["epochs"],
        learning_rate=budget["learning_rate"],
        per_device_train_batch_size=budget["batch_size"],
        per_device_eval_batch_size=64,
        weight_decay=0.01,
        # Batches of similar lengths: tweets average 36 tokens but a random batch of 32 pads to 64.
        train_sampling_strategy="group_by_length",
        warmup_steps=budget.get("warmup_steps", 0),
        logging_steps=50,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def train_and_predict(
    method: str, seed: int, train, validation, predict_sets: dict, budget: dict, work_dir: Path
) -> dict:
    """Train `method` (not "ts") and return the final classifier's logits on every dataset of `predict_sets` (and on
    `validation` for erm, whose logits fit ts), as numpy, with what SelfKDTrainer selected, the wall-clock and the CPU
    time."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_kd import MultiExitForSequenceClassification, SelfKDConfig, SelfKDTrainer
    from hf_kd.evaluation import compute_logits

    tok = tokenizer()
    collator = DataCollatorWithPadding(tok)
    num_labels = len(train.features["label"].names)
    output_dir = str(work_dir / f"{method}_seed{seed}")
    common = _common_args(output_dir, seed, budget)
    # The model's initialisation (its fresh heads) follows the seed, as Trainer's own seeding would.
    torch.manual_seed(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    info = {}
    if method in ("erm", "ls"):
        num_layers = 6
        model = MultiExitForSequenceClassification.from_backbone(BACKBONE, exit_layers=[num_layers], num_labels=num_labels)
        smoothing = budget["ls_epsilon"] if method == "ls" else 0.0
        args = TrainingArguments(**common, label_smoothing_factor=smoothing)
        trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tok, data_collator=collator)
    elif method in VARIANTS:
        model = MultiExitForSequenceClassification.from_backbone(BACKBONE, num_labels=num_labels)
        settings = dict(warmup_max_epochs=budget["warmup_max_epochs"], selection_stable_epochs=budget["stable_epochs"])
        settings.update(VARIANTS[method])
        args = SelfKDConfig(**common, **settings)
        trainer = SelfKDTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                                processing_class=tok, data_collator=collator)
    else:
        raise ValueError(f"unknown method {method!r}; accepted: erm, ls, {', '.join(VARIANTS)}")
    trainer.train()
    train_seconds = time.perf_counter() - start
    if isinstance(trainer, SelfKDTrainer):
        record = trainer.layer_entropy
        info = {
            "source_layer": trainer.source_layer,
            "warmup_epochs": record["warmup_epochs"],
            "selected_by_epoch": [e["selected_layer"] for e in record["epochs"] if e["phase"] == "warmup"],
            "validation_entropy_by_epoch": [[round(h, 4) for h in e["entropy"]] for e in record["epochs"]],
            "recalibration_set_size": int(trainer.recalibration_set.size),
        }
    model.eval()
    # The validation logits are only needed to fit ts's temperature (erm); skipping them saves a pass per run.
    logits = {"validation": compute_logits(model, validation, 64, collator).numpy()} if method == "erm" else {}
    for name, dataset in predict_sets.items():
        logits[name] = compute_logits(model, dataset, 64, collator).numpy()
    # process_time: CPU seconds of this process (one thread: the single-core budget), wall clock aside.
    return {"logits": logits, "info": info, "train_seconds": train_seconds,
            "total_seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start}


def distribution_metrics(logits: np.ndarray, human: np.ndarray, majority: np.ndarray) -> dict[str, float]:
    """KL(human || model), JS distance (ChaosNLI's conventions), accuracy against the majority human label, mean
    entropy and ECE (15 bins) against the majority label."""
    from hf_kd.metrics import (
        expected_calibration_error,
        human_distribution_divergence,
        predictive_entropy,
        softmax,
    )

    probs = softmax(logits)
    return {
        **human_distribution_divergence(human, probs),
        "accuracy": float(np.mean(probs.argmax(1) == majority)),
        "entropy": predictive_entropy(probs),
        "ece": expected_calibration_error(probs, majority, 15),
    }


def temperature_scaled(validation_logits: np.ndarray, validation_human: np.ndarray) -> float:
    from hf_kd.calibration import fit_temperature_to_distributions

    return fit_temperature_to_distributions(validation_logits, validation_human)


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_rows(records: list[dict], split: str, methods: list[str]) -> list[dict]:
    """Per method: mean and std over seeds of each metric on `split`; `records` hold one entry per (method, seed)
    with `metrics[split]`."""
    rows = []
    for method in methods:
        runs = [r for r in records if r["method"] == method and split in r["metrics"]]
        if not runs:
            continue
        row = {"method": method, "seeds": sorted(r["seed"] for r in runs)}
        for metric in ("kl", "js_distance", "accuracy", "entropy", "ece"):
            row[metric] = mean_std([r["metrics"][split][metric] for r in runs])
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], reference: dict | None = None) -> str:
    lines = ["| method | KL(human ‖ model) | JS distance | accuracy (majority) | entropy | ECE (15 bins) | seeds |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[m][0]:.4f} ± {row[m][1]:.4f}" for m in ("kl", "js_distance", "accuracy", "entropy", "ece")]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {len(row['seeds'])} |")
    if reference:
        lines.append(f"| {reference['name']} | {reference['kl']:.4f} | {reference['js_distance']:.4f} | "
                     f"{reference['accuracy']:.4f} | – | – | (quoted) |")
    return "\n".join(lines)


def acceptance(rows: list[dict]) -> list[str]:
    """The issue's acceptance test, per split: selfkd lowers KL and JS relative to erm and ls, accuracy within 1
    point of erm."""
    by = {row["method"]: row for row in rows}
    if not {"selfkd", "erm", "ls"} <= set(by):
        return ["acceptance: needs selfkd, erm and ls"]
    s, e, ls = by["selfkd"], by["erm"], by["ls"]
    lines = []
    for metric in ("kl", "js_distance"):
        for name, base in (("erm", e), ("ls", ls)):
            ok = s[metric][0] < base[metric][0]
            lines.append(f"selfkd {metric} {s[metric][0]:.4f} {'<' if ok else '>='} {name} {base[metric][0]:.4f}: "
                         f"{'met' if ok else 'NOT met'}")
    gap = (s["accuracy"][0] - e["accuracy"][0]) * 100
    lines.append(f"selfkd accuracy - erm accuracy = {gap:+.2f} points: {'met' if gap >= -1 else 'NOT met'} "
                 "(within 1 point)")
    return lines


def compute_line(records: list[dict]) -> str:
    cpu = sum(r.get("cpu_seconds", 0.0) for r in records) / 60
    wall = sum(r["total_seconds"] for r in records) / 60
    return (f"Compute: {cpu:.1f} min of CPU time on one thread ({wall:.1f} min wall clock on the shared 2-core "
            f"machine) for {len(records)} runs.")
