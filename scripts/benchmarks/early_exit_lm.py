"""Early-exit LLM: exit quality per layer, training cost of the exits (frozen backbone), per-exit calibration (CPU).

SmolLM2-135M-Instruct ([`hf_kd.MultiExitForCausalLM`]) on BBC News articles (`hf_kd.lm_data.lm_text_dataset`, every
token counted), tokenized to `--max-length` tokens.

1. Untrained exits: the shared final norm + LM head after layers `--probe-layers` (no adapter), evaluated on the
   validation rows: next-token accuracy, top-1 agreement with the final exit, token ECE (15 bins), perplexity.
2. Training the exits: `--exit-layers` with a `--adapter` adapter per early exit, backbone frozen, distilled from the
   final exit (`distill_from="final_exit"`, `alpha=1`, T=1), `--steps` steps of `--batch-size` rows. The median step
   time gives the cost per 1M training tokens; the same evaluation before and after.
3. `calibrate_exit_temperatures` on the validation rows: one temperature per exit, token ECE / NLL / Brier before and
   after, the temperatures then applied to the test rows.

With `--output-dir` the trained model is saved there (`AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` loads it, also without hf_kd); its config records the fitted temperatures under
`hf_kd_exit_temperatures` (one per exit; the logits are not divided by them).

Run (prints markdown tables and writes --json; docs/benchmarks/early_exit_lm.md records one run):

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. python scripts/benchmarks/early_exit_lm.py \
        --output-dir outputs/smollm2-exits
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _common import StepTimer
from transformers import AutoTokenizer

from hf_kd import EarlyExitConfig, EarlyExitTrainer, MultiExitForCausalLM, calibrate_exit_temperatures
from hf_kd.lm_data import LMDataCollator
from hf_kd.lm_recipes import LMScriptArguments, load_lm_splits
from hf_kd.offline_models import install_offline_models

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
METRICS = ("token_accuracy", "top1_agreement", "token_ece", "perplexity")


def per_exit(metrics: dict, layers: list[int]) -> dict[int, dict[str, float]]:
    """`eval_exit_{i}_{metric}` keys of `trainer.evaluate()` as `{layer: {metric: value}}`."""
    return {
        layer: {m: metrics.get(f"eval_exit_{i}_{m}", float("nan")) for m in METRICS} for i, layer in enumerate(layers)
    }


def table(rows: dict[int, dict[str, float]], title: str) -> str:
    lines = [f"### {title}", "", "| exit layer | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for layer, values in rows.items():
        lines.append(f"| {layer} | " + " | ".join(f"{values[m]:.4f}" for m in METRICS) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-rows", type=int, default=64)
    parser.add_argument("--eval-rows", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--exit-layers", type=int, nargs="+", default=[8, 15])
    parser.add_argument("--probe-layers", type=int, nargs="+", default=[4, 8, 12, 15, 20, 25])
    parser.add_argument("--adapter", default="low_rank", choices=["linear", "low_rank"])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--json", default="docs/benchmarks/early_exit_lm.json")
    opts = parser.parse_args()

    install_offline_models([SMOLLM2])
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    data = LMScriptArguments(model_name_or_path=SMOLLM2, dataset="text", max_train_samples=opts.train_rows,
                             max_eval_samples=opts.eval_rows)
    splits = load_lm_splits(data, tokenizer, opts.max_length)
    collator = LMDataCollator.for_tokenizer(tokenizer)

    work = Path(tempfile.mkdtemp(prefix="early_exit_lm_"))

    def trainer_for(model, **kwargs):
        args = EarlyExitConfig(
            output_dir=str(work / "out"), per_device_train_batch_size=opts.batch_size,
            per_device_eval_batch_size=opts.batch_size, max_steps=opts.steps, learning_rate=opts.learning_rate,
            report_to="none", use_cpu=True, save_strategy="no", logging_steps=5, seed=0, **kwargs,
        )
        return EarlyExitTrainer(model=model, args=args, train_dataset=splits["train"],
                                eval_dataset=splits["validation"], data_collator=collator)

    results = {"setup": vars(opts)}
    # 1. Untrained shared-head exits at many depths.
    probe = MultiExitForCausalLM.from_backbone(SMOLLM2, exit_layers=opts.probe_layers)
    probe_layers = probe.config.exit_layers
    start = time.perf_counter()
    untrained = per_exit(trainer_for(probe).evaluate(), probe_layers)
    results["untrained_probe"] = {"metrics": untrained, "eval_seconds": time.perf_counter() - start}
    print(table(untrained, "Untrained exits (shared final norm + LM head), validation"))
    del probe

    # 2. Exit adapters trained with a frozen backbone, distilled from the final exit.
    model = MultiExitForCausalLM.from_backbone(
        SMOLLM2, exit_layers=opts.exit_layers, exit_adapter=opts.adapter, exit_adapter_rank=opts.rank
    )
    layers = model.config.exit_layers
    trainable = sum(p.numel() for p in model.exit_adapters.parameters())
    # The frozen final exit gets weight 0: its loss has no gradient, and the logged loss is then the exits' own.
    weights = [1.0] * (len(layers) - 1) + [0.0]
    trainer = trainer_for(model, distill_from="final_exit", alpha=1.0, temperature=1.0, freeze_backbone=True,
                          exit_loss_weights=weights)
    before = per_exit(trainer.evaluate(), layers)
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    after = per_exit(trainer.evaluate(), layers)
    train_tokens = sum(len(ids) for ids in splits["train"]["input_ids"])
    tokens_per_step = opts.batch_size * train_tokens / len(splits["train"])  # mean tokens of a batch
    step = statistics.median(timer.times[1:] or timer.times)  # the first step warms up
    seconds_per_million = step / tokens_per_step * 1e6
    results["training"] = {
        "trainable_parameters": trainable, "median_step_seconds": step, "tokens_per_step": tokens_per_step,
        "seconds_per_million_tokens": seconds_per_million, "before": before, "after": after,
    }
    print(table(before, "Before training (adapters = identity), validation"))
    print(table(after, f"After {opts.steps} steps (frozen backbone, {opts.adapter} adapters), validation"))
    print(f"\ntrainable parameters {trainable:,}; median step {step:.2f} s for {tokens_per_step:.0f} tokens; "
          f"{seconds_per_million / 3600:.2f} CPU-hours per 1M training tokens")

    # 3. Per-exit temperatures fitted on validation, applied to test.
    fit = calibrate_exit_temperatures(model, splits["validation"], calibrated_on="BBC News validation rows")
    test = calibrate_exit_temperatures(model, splits["test"], temperatures=fit.temperatures)
    results["calibration"] = {"validation_fit": fit.to_dict(), "test": test.to_dict()}
    for name, result in (("validation (the fit)", fit), ("test (the validation temperatures)", test)):
        print(f"\n### Per-exit temperatures fitted on validation: {name}, {result.num_tokens} tokens\n")
        print("| exit layer | T | ECE before | ECE after | NLL before | NLL after | Brier before | Brier after |")
        print("|---|---|---|---|---|---|---|---|")
        for j, layer in enumerate(layers):
            b, a = result.before[j], result.after[j]
            print(f"| {layer} | {result.temperatures[j]:.3f} | {b['token_ece']:.4f} | {a['token_ece']:.4f} | "
                  f"{b['nll']:.4f} | {a['nll']:.4f} | {b['brier']:.4f} | {a['brier']:.4f} |")

    Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.json).write_text(json.dumps(results, indent=1, default=float))
    if opts.output_dir:
        model.config.hf_kd_exit_temperatures = fit.temperatures
        model.save_pretrained(opts.output_dir)
        tokenizer.save_pretrained(opts.output_dir)
        print(f"saved the trained model to {opts.output_dir}")


if __name__ == "__main__":
    main()
