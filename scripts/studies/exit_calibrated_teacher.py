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
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from hf_kd import EarlyExitConfig, EarlyExitTrainer, MultiExitForCausalLM, calibrate_exit_temperatures
from hf_kd.calibration import _pad_lm_rows
from hf_kd.lm_data import lm_text_dataset, tokenize_lm_dataset
from hf_kd.offline_models import install_offline_models
from hf_kd.plots import plot_reliability_diagram

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
EVAL_METRICS = ("top1_agreement", "token_accuracy", "perplexity")
VARIANTS = {"raw": None, "calibrated": "fitted"}


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
    parser.add_argument("--json", default="docs/benchmarks/exit_calibrated_teacher.json")
    opts = parser.parse_args()

    install_offline_models([SMOLLM2])
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    text = lm_text_dataset()
    columns = ["input_ids", "attention_mask", "labels"]
    splits = {
        name: tokenize_lm_dataset(text[name].select(range(rows)), tokenizer, max_length=opts.max_length)
        .select_columns(columns)
        for name, rows in (("train", opts.train_rows), ("validation", opts.eval_rows), ("test", opts.eval_rows))
    }
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collator(rows):
        return _pad_lm_rows(rows, pad_id)

    work = Path(tempfile.mkdtemp(prefix="exit_calibrated_teacher_"))
    figures = Path(opts.json).with_suffix("")
    results = {"setup": vars(opts), "variants": {}}
    for name, final_exit_temperature in VARIANTS.items():
        # Same seed: the same initial adapters and the same batch order in both variants.
        model = MultiExitForCausalLM.from_backbone(SMOLLM2, exit_layers=opts.exit_layers, exit_adapter="low_rank",
                                                   exit_adapter_rank=opts.rank)
        layers = model.config.exit_layers
        args = EarlyExitConfig(
            output_dir=str(work / name), per_device_train_batch_size=opts.batch_size,
            per_device_eval_batch_size=opts.batch_size, max_steps=opts.steps, learning_rate=opts.learning_rate,
            report_to="none", use_cpu=True, save_strategy="no", logging_steps=5, seed=0,
            distill_from="final_exit", alpha=1.0, temperature=1.0, freeze_backbone=True,
            final_exit_temperature=final_exit_temperature,
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
        results["variants"][name] = {
            "final_exit_temperature": trainer.final_exit_temperature,
            "train_seconds": seconds,
            "test": {
                layer: {m: evaluation[f"test_exit_{i}_{m}"] for m in EVAL_METRICS} for i, layer in enumerate(layers)
            },
            "calibration_test": test.to_dict(),
        }
        plot_reliability_diagram(
            {f"exit {i} (layer {layer})": test.reliability[i]["before"] for i, layer in enumerate(layers)},
            figures / f"{name}_test_reliability.png",
            title=f"Exits distilled from the {name} final exit: test tokens, before the exits' own temperatures",
        )
        del trainer, model

    layers = list(results["variants"]["raw"]["test"])
    fitted = results["variants"]["calibrated"]["final_exit_temperature"]
    print(f"\nfinal-exit temperature fitted on validation: {fitted:.4f}")
    print("\n| variant | exit layer | top-1 agreement | token accuracy | perplexity | T (exit) | ECE before | ECE after "
          "| NLL before | NLL after | Brier before | Brier after |")
    print("|---" * 12 + "|")
    for name, variant in results["variants"].items():
        calibration = variant["calibration_test"]
        for j, layer in enumerate(layers):
            m, b, a = variant["test"][layer], calibration["before"][j], calibration["after"][j]
            print(f"| {name} | {layer} | {m['top1_agreement']:.4f} | {m['token_accuracy']:.4f} | "
                  f"{m['perplexity']:.2f} | {calibration['temperatures'][j]:.3f} | {b['token_ece']:.4f} | "
                  f"{a['token_ece']:.4f} | {b['nll']:.4f} | {a['nll']:.4f} | {b['brier']:.4f} | {a['brier']:.4f} |")
    Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
