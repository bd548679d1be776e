"""Early exits distilled from a raw vs a temperature-calibrated final exit (the seed's closing claim, "Knowledge
Distillation Using Early Exit LLMs: experiments on confidence scoring"; issue 18).

SmolLM2-135M-Instruct as a [`hf_kd.MultiExitForCausalLM`] with exits after `--exit-layers` (low-rank adapters, the
backbone frozen, so the final exit is the untouched model), trained on BBC News text (`hf_kd.lm_data.lm_text_dataset`,
every token counted, `--max-length` tokens) by [`hf_kd.EarlyExitTrainer`] with `distill_from="final_exit"`,
`alpha=1` (soft targets only) and distillation temperature 1, from the same initial adapters and the same batches in
both variants:

  raw          the exits' targets are softmax(z_final)                     (final_exit_temperature=None)
  calibrated   the exits' targets are softmax(z_final / T_final), T_final fitted on the validation rows before
               training (final_exit_temperature="fitted", hf_kd.calibration.fit_exit_temperature)
  <number>     the same with a fixed T_final (e.g. `--variants 2.0`: what a strongly over-confident final exit's
               correction would do to the exits)

Measured on the test rows for every exit: top-1 agreement with the final exit, next-token accuracy, perplexity, and
the token ECE (15 bins), NLL and full-vocabulary Brier score before and after the exit's own temperature fitted on the
validation rows ([`hf_kd.calibrate_exit_temperatures`]). One token reliability diagram per variant (every exit,
before its own temperature) goes next to the JSON.

Run (prints markdown tables, writes --json and the diagrams; docs/benchmarks/exit_calibrated_teacher.md records one
run):

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. python scripts/studies/exit_calibrated_teacher.py
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hf_kd import EarlyExitConfig, EarlyExitTrainer, MultiExitForCausalLM, calibrate_exit_temperatures
from hf_kd.lm_data import LMDataCollator
from hf_kd.lm_recipes import LMScriptArguments, load_lm_splits
from hf_kd.offline_models import install_offline_models
from hf_kd.plots import plot_reliability_diagram

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
EVAL_METRICS = ("top1_agreement", "token_accuracy", "perplexity")
# The summary table's columns (perplexities of 1e6-1e9 say little once averaged: they stay in the JSON).
COLUMNS = ("top1_agreement", "token_accuracy", "temperature", "token_ece_before", "token_ece_after", "nll_before",
           "nll_after", "brier_before", "brier_after")
VARIANTS = {"raw": None, "calibrated": "fitted"}


def final_exit_temperature_of(variant: str):
    """`raw` / `calibrated`, or a number: the final exit's logits divided by that fixed temperature."""
    return VARIANTS[variant] if variant in VARIANTS else float(variant)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-rows", type=int, default=40)
    parser.add_argument("--eval-rows", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--exit-layers", type=int, nargs="+", default=[8, 15])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="raw, calibrated, or numbers")
    parser.add_argument("--json", default="docs/benchmarks/exit_calibrated_teacher.json")
    opts = parser.parse_args()

    install_offline_models([SMOLLM2])
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    data = LMScriptArguments(model_name_or_path=SMOLLM2, dataset="text", max_train_samples=opts.train_rows,
                             max_eval_samples=opts.eval_rows)
    splits = load_lm_splits(data, tokenizer, opts.max_length)
    collator = LMDataCollator.for_tokenizer(tokenizer)

    work = Path(tempfile.mkdtemp(prefix="exit_calibrated_teacher_"))
    figures = Path(opts.json).with_suffix("")
    results = {"setup": vars(opts), "runs": []}
    for seed in opts.seeds:
        for name in opts.variants:
            # Per seed, every variant starts from the same adapters and sees the same batches.
            torch.manual_seed(seed)
            model = MultiExitForCausalLM.from_backbone(SMOLLM2, exit_layers=opts.exit_layers, exit_adapter="low_rank",
                                                       exit_adapter_rank=opts.rank)
            results["runs"].append(run_variant(model, name, seed, splits, collator, opts, work, figures))
            del model
            # Written after every run: an interrupted study keeps what it measured.
            Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
            Path(opts.json).write_text(json.dumps(results, indent=1, default=float))

    # Mean and standard deviation over the seeds, per variant and exit.
    print("\n| variant | T_final | exit layer | top-1 agreement | token accuracy | exit's own T | token ECE before | "
          "token ECE after | NLL before | NLL after | Brier before | Brier after |")
    print("|---" * 12 + "|")
    summary = {}
    for name in opts.variants:
        runs = [r for r in results["runs"] if r["variant"] == name]
        final_t = statistics.mean(r["final_exit_temperature"] or 1.0 for r in runs)
        for layer in runs[0]["test"]:
            cells = {key: [r["test"][layer][key] for r in runs] for key in runs[0]["test"][layer]}
            summary.setdefault(name, {})[layer] = {key: mean_sd(values) for key, values in cells.items()}
            row = " | ".join(format_mean_sd(cells[key]) for key in COLUMNS)
            print(f"| {name} | {final_t:.4f} | {layer} | {row} |")
    results["summary"] = summary
    Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.json).write_text(json.dumps(results, indent=1, default=float))


def run_variant(model, name, seed, splits, collator, opts, work, figures) -> dict:
    """Train the exits of `model` for one variant and seed; its test metrics per exit layer."""
    layers = model.config.exit_layers
    args = EarlyExitConfig(
        output_dir=str(work / f"{name}-{seed}"), per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.batch_size, max_steps=opts.steps, learning_rate=opts.learning_rate,
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=5, seed=seed,
        distill_from="final_exit", alpha=1.0, temperature=1.0, freeze_backbone=True,
        final_exit_temperature=final_exit_temperature_of(name),
        # The frozen final exit gets weight 0: its loss has no gradient, and the logged loss is the exits' own.
        exit_loss_weights=[1.0] * (len(layers) - 1) + [0.0],
    )
    trainer = EarlyExitTrainer(model=model, args=args, train_dataset=splits["train"],
                               eval_dataset=splits["validation"], data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    evaluation = trainer.evaluate(splits["test"], metric_key_prefix="test")
    fit = calibrate_exit_temperatures(model, splits["validation"], calibrated_on="BBC News validation rows")
    test = calibrate_exit_temperatures(model, splits["test"], temperatures=fit.temperatures)
    if seed == opts.seeds[0]:
        plot_reliability_diagram(
            {f"exit {i} (layer {layer})": test.reliability[i]["before"] for i, layer in enumerate(layers)},
            figures / f"{name}_test_reliability.png",
            title=f"Exits distilled from the {name} final exit: test tokens, before the exits' own temperatures",
        )
    metrics = {}
    for i, layer in enumerate(layers):
        metrics[layer] = {m: evaluation[f"test_exit_{i}_{m}"] for m in EVAL_METRICS}
        metrics[layer]["temperature"] = test.temperatures[i]
        for when, values in (("before", test.before[i]), ("after", test.after[i])):
            metrics[layer].update({f"{m}_{when}": values[m] for m in ("token_ece", "nll", "brier")})
    return {"variant": name, "seed": seed, "final_exit_temperature": trainer.final_exit_temperature,
            "train_seconds": seconds, "test": metrics, "calibration_test": test.to_dict()}


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def format_mean_sd(values: list[float]) -> str:
    summary = mean_sd(values)
    return f"{summary['mean']:.4f}" + (f" ± {summary['sd']:.4f}" if len(values) > 1 else "")

if __name__ == "__main__":
    main()
