"""The LLM demo: distil SmolLM2-135M-Instruct into a 15-layer student on BBC News articles, against the SFT baseline.

    python trainers/demo_llm.py                          # `make demo-llm` (after set-up), offline, 2 CPU cores
    python trainers/demo_llm.py --steps 200 --output_dir outputs/demo_llm_long

Steps: (1) the teacher, HuggingFaceTB/SmolLM2-135M-Instruct (30 layers); (2) the pruned student, every other
teacher layer (15 of 30, hf_kd.student.make_student), untrained; (3) that student after `--steps` steps of SFT (the
completion-token cross-entropy alone: hf_kd.lm_recipes, method sft, alpha 0); (4) the same student after the same
steps on the same tokens with KD (method kd: forward KL to the teacher's cached top-64 next-token distributions,
T 1, mixed half and half with the cross-entropy, alpha 0.5; one teacher pass over the training rows, shared with
(3)). Data: hf_kd.lm_data.lm_text_dataset, BBC News articles split by article, each cut to its first
`--max_length` tokens; every token counts. Each model is scored on `--eval_samples` held-out test articles
(perplexity, top-1 agreement with the teacher, token ECE with 15 bins) and on greedy generation speed (batch 1,
the fixed PROMPTS, exactly `--max_new_tokens` new tokens each). Writes `<output_dir>/results.json` (and the SFT
and KD students in `<output_dir>/sft`, `<output_dir>/kd`), prints the table.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as trainers/main_job.py: no "no GPU found" warning from DeepSpeed

from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from hf_kd import DistillConfig
from hf_kd.lm_recipes import (
    LMScriptArguments,
    build_lm_student,
    count_parameters,
    generation_tokens_per_second,
    lm_demo_training_args,
    lm_test_metrics,
    load_lm_splits,
    run_lm,
)
from hf_kd.offline_models import install_offline_models

TEACHER = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPTS = (
    "The government announced on Monday that",
    "Shares in the technology company rose sharply after",
    "The film, which opens in cinemas next week,",
)
COLUMNS = (("perplexity", "ppl", ".2f"), ("top1_agreement", "agree", ".3f"), ("token_ece", "ECE", ".3f"),
           ("tokens_per_second", "gen tok/s", ".1f"), ("parameters", "params (M)", ".1f"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo_llm")
    parser.add_argument("--student_layers", type=int, default=15)
    parser.add_argument("--steps", type=int, default=60, help="Training steps of SFT and of KD (equal tokens).")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=64, help="Tokens per article.")
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.5, help="KD's weight of the soft term (the rest: cross-entropy).")
    parser.add_argument("--eval_samples", type=int, default=32, help="Held-out test articles scored.")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def training_args(opts, output_dir: str, method: str) -> DistillConfig:
    """The SFT and KD runs' settings: identical but for alpha (0 for sft)."""
    return lm_demo_training_args(
        output_dir, TEACHER, opts.seed, opts.steps, opts.batch_size, opts.learning_rate,
        str(Path(opts.output_dir) / "teacher_logits_cache"), temperature=opts.temperature,
        alpha=opts.alpha if method == "kd" else 0.0, lm_max_length=opts.max_length,
    )


def print_table(rows: dict[str, dict]) -> str:
    header = f"| {'model':<44} | " + " | ".join(f"{title:>10}" for _, title, _ in COLUMNS) + " |"
    lines = [header, "|---|" + "---:|" * len(COLUMNS)]
    for name, row in rows.items():
        cells = [f"{row[key] / (1e6 if key == 'parameters' else 1):>10{fmt}}" for key, _, fmt in COLUMNS]
        lines.append(f"| {name:<44} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    return table


def main(argv=None) -> dict:
    opts = parse_args(argv)
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    install_offline_models([TEACHER])  # no-op once `make setup` placed it
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    script = dict(model_name_or_path=TEACHER, student_layers=opts.student_layers, dataset="text",
                  max_train_samples=opts.steps * opts.batch_size, max_eval_samples=opts.eval_samples,
                  split_seed=opts.seed)
    splits = load_lm_splits(LMScriptArguments(**script), tokenizer, opts.max_length)
    collator = DataCollatorForSeq2Seq(tokenizer)
    rows, stages = {}, {}

    def score(name: str, model, top1=None) -> list:
        start = time.perf_counter()
        metrics, predicted = lm_test_metrics(model, splits["test"], collator, 8, top1)
        if top1 is None:  # the teacher agrees with itself
            metrics["top1_agreement"] = 1.0
        metrics["tokens_per_second"] = generation_tokens_per_second(model, tokenizer, list(PROMPTS), opts.max_new_tokens)
        metrics["parameters"] = count_parameters(model)
        rows[name] = metrics
        stages[f"score {name}"] = time.perf_counter() - start
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
        return predicted

    depth = f"{opts.student_layers} layers"
    print(f"[1/4] Teacher {TEACHER} on {len(splits['test'])} held-out BBC articles ({opts.max_length} tokens each)")
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER).eval()
    teacher_top1 = score("teacher SmolLM2-135M-Instruct (30 layers)", teacher)
    del teacher
    print(f"[2/4] The pruned student: every other teacher layer ({depth}), untrained")
    score(f"student ({depth}), pruned, before training", build_lm_student(LMScriptArguments(**script)).eval(),
          teacher_top1)
    for step, method in ((3, "sft"), (4, "kd")):
        what = "SFT (cross-entropy only)" if method == "sft" else (
            f"KD (forward KL to the cached top-64 teacher, T={opts.temperature:g}, alpha={opts.alpha:g})")
        print(f"[{step}/4] {what}: {opts.steps} steps x {opts.batch_size} articles x {opts.max_length} tokens")
        start = time.perf_counter()
        run_lm(LMScriptArguments(**script, method=method), training_args(opts, str(out / method), method), teacher_top1)
        stages[f"train {method}"] = time.perf_counter() - start
        score(f"student ({depth}) after {method.upper()}", AutoModelForCausalLM.from_pretrained(out / method), teacher_top1)

    table = print_table(rows)
    names = list(rows)
    ppl = {key: rows[name]["perplexity"] for key, name in zip(("teacher", "pruned", "sft", "kd"), names)}
    gap_closed = (ppl["sft"] - ppl["kd"]) / (ppl["sft"] - ppl["teacher"])
    results = {
        "rows": rows, "table": table, "kd_share_of_sft_teacher_gap_closed": gap_closed,
        "wall_seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
        "stage_wall_seconds": stages, "load_average": os.getloadavg(), "torch_threads": torch.get_num_threads(),
        "settings": vars(opts), "prompts": PROMPTS,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nKD closes {100 * gap_closed:.1f}% of the perplexity gap between the SFT student and the teacher "
          f"(held-out perplexity, {len(splits['test'])} BBC test articles x {opts.max_length} tokens; ECE: 15 bins).\n"
          f"Wall {results['wall_seconds']:.0f} s, CPU {results['cpu_seconds']:.0f} s ({torch.get_num_threads()} "
          f"threads, load average {results['load_average'][0]:.1f}). Saved {out / 'results.json'}")
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
