"""Early exits on Rotten Tomatoes: accuracy vs layers run and vs measured wall-clock, per exit policy.

Step 1 (`train`) fine-tunes a multi-exit all-MiniLM-L6-v2 (an exit after each of its 6 layers) with
`EarlyExitTrainer` on the Rotten Tomatoes training split (distillation from the final exit into the earlier ones,
`distill_from="final_exit"`, by default, or from a fine-tuned teacher with `--teacher`). Step 2 (`curve`) runs every exit once over the validation and test splits and
sweeps each policy's threshold offline; the operating point of each policy is the most aggressive threshold whose
*validation* accuracy is within 1 point of the final exit's. Step 3 (`speed`) times `predict_with_exits` at that
threshold against the full model (backbone + final exit) at batch size 1 and 32, interleaved repeats, median.

    python scripts/benchmarks/early_exit_rt.py --output_dir outputs/bench_early_exit_rt           # all three steps
    python scripts/benchmarks/early_exit_rt.py --steps curve speed --output_dir outputs/bench_early_exit_rt

Writes `results.json` in the output folder and `docs/benchmarks/early_exit_rt.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from _common import curve_markdown, early_exit_rt_splits, measure_speed, policy_curves, policy_kwargs
from transformers import AutoTokenizer, DataCollatorWithPadding

from hf_kd import EarlyExitConfig, EarlyExitTrainer, MultiExitForSequenceClassification

BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"
ROOT = Path(__file__).resolve().parents[2]
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/bench_early_exit_rt")
    parser.add_argument("--steps", nargs="+", default=["train", "curve", "speed"], choices=["train", "curve", "speed"])
    parser.add_argument("--teacher", default=None, help="Fine-tuned teacher folder: distil from it instead of from the final exit.")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--train_samples", type=int, default=None, help="Training rows used (default: all 9,027).")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bs1_samples", type=int, default=400, help="Test rows timed one at a time.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=0.01, help="Accuracy loss allowed vs the final exit.")
    return parser.parse_args(argv)


def train(out: Path, opts) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(BACKBONE)
    splits = early_exit_rt_splits(tokenizer, opts)
    model = MultiExitForSequenceClassification.from_backbone(BACKBONE, num_labels=2)
    distill = dict(distill_from="teacher", teacher_model_name_or_path=opts.teacher, cache_teacher_logits=True) \
        if opts.teacher else dict(distill_from="final_exit")
    args = EarlyExitConfig(
        output_dir=str(out / "model"), num_train_epochs=opts.epochs, learning_rate=1e-4, warmup_steps=0.1,
        per_device_train_batch_size=32, per_device_eval_batch_size=128, eval_strategy="no", save_strategy="no",
        logging_steps=50, seed=opts.seed, report_to="none", temperature=2.0, alpha=0.5, **distill,
    )
    trainer = EarlyExitTrainer(
        model=model, args=args, train_dataset=splits["train"], eval_dataset=splits["validation"],
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model()
    metrics = trainer.evaluate(splits["test"], metric_key_prefix="test")
    return {"train_seconds": seconds, **metrics}


@torch.no_grad()
def all_exit_probs(model, dataset, tokenizer, batch_size=128) -> np.ndarray:
    """Softmax of every exit, `(num_exits, N, num_labels)`, from one forward pass per batch."""
    collator = DataCollatorWithPadding(tokenizer)
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in dataset.column_names]
    chunks = []
    for start in range(0, len(dataset), batch_size):
        batch = collator(dataset.select_columns(columns)[start : start + batch_size])
        outputs = model(**batch)
        chunks.append(torch.stack(outputs.exit_logits).softmax(-1))
    return torch.cat(chunks, dim=1).numpy()


def curve(out: Path, opts) -> dict:
    model = MultiExitForSequenceClassification.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    splits = early_exit_rt_splits(tokenizer, opts)
    probs = {split: all_exit_probs(model, splits[split], tokenizer) for split in ("validation", "test")}
    labels = {split: np.asarray(splits[split]["label"]) for split in ("validation", "test")}
    per_exit = {split: [float((p.argmax(-1) == labels[split]).mean()) for p in probs[split]] for split in probs}
    exit_layers = model.config.exit_layers
    policies = policy_curves(
        probs["validation"], labels["validation"], probs["test"], labels["test"], exit_layers, opts.tolerance
    )
    return {"exit_layers": exit_layers, "per_exit_accuracy": per_exit, "policies": policies}


def batches(dataset, tokenizer, batch_size):
    collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in dataset.column_names]
    data = dataset.select_columns(columns)
    return [collator(data[i : i + batch_size]) for i in range(0, len(data), batch_size)]


@torch.inference_mode()
def run_full(model, prepared):
    """The static model: every layer on every row, then the final exit (what a plain classifier computes)."""
    for batch in prepared:
        hidden = model.backbone(**batch).last_hidden_state
        model.exits[-1](hidden, batch["attention_mask"])


@torch.inference_mode()
def run_exits(model, prepared, policy, value):
    for batch in prepared:
        model.predict_with_exits(**batch, policy=policy, **policy_kwargs(policy, value))


def speed(out: Path, opts, curve_result: dict) -> dict:
    torch.manual_seed(0)
    model = MultiExitForSequenceClassification.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    test = early_exit_rt_splits(tokenizer, opts)["test"]
    workloads = {
        "bs1": batches(test.select(range(min(opts.bs1_samples, len(test)))), tokenizer, 1),
        "bs32": batches(test, tokenizer, 32),
    }
    return measure_speed(
        workloads, partial(run_full, model), partial(run_exits, model), curve_result["policies"], opts.repeats
    )


def write_markdown(results: dict, path: Path) -> None:
    curve_result = results["curve"]
    lines = [
        "# Early exits on Rotten Tomatoes (multi-exit all-MiniLM-L6-v2, CPU)",
        "",
        "Produced by `python scripts/benchmarks/early_exit_rt.py`. Operating point of each policy: the threshold with the "
        f"fewest mean layers whose validation accuracy is within {100 * results['settings']['tolerance']:.0f} point "
        "of the final exit's; the figures are on the test split (2,581 snippets). Full model = backbone + final exit "
        "on every row.",
        "",
        "Per-exit test accuracy (layers " + ", ".join(map(str, curve_result["exit_layers"])) + "): "
        + ", ".join(f"{a:.4f}" for a in curve_result["per_exit_accuracy"]["test"]),
        "",
        *curve_markdown(results),
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    opts = parse_args(argv)
    out = Path(opts.output_dir)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["settings"] = vars(opts)
    if "train" in opts.steps:
        results["train"] = train(out, opts)
    if "curve" in opts.steps:
        results["curve"] = curve(out, opts)
    if "speed" in opts.steps:
        results["speed"] = speed(out, opts, results["curve"])
    out.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2))
    if "curve" in results:
        write_markdown(results, ROOT / "docs" / "benchmarks" / "early_exit_rt.md")
    print(json.dumps({k: v for k, v in results.items() if k not in ("curve", "speed")}, indent=2))
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
