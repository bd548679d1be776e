"""Quality at equal tokens: KD against SFT-only for the layer-dropped causal-LM student (issue 17), several seeds.

SmolLM2-135M-Instruct teacher (30 layers), student = every other teacher layer (15, hf_kd.student.make_student),
BBC News articles (hf_kd.lm_data.lm_text_dataset) cut to `--max_length` tokens. For each seed, the same student is
trained `--steps` steps on the same `--steps x --batch_size` articles in the same order twice: SFT (completion-token
cross-entropy alone, `method sft`, alpha 0) and KD (forward KL to the teacher's cached top-64 next-token
distributions at `--temperature`, weight `--alpha`); both through hf_kd.lm_recipes.run_lm with the same settings
(hf_kd.lm_recipes.lm_demo_training_args). The seed sets the data order and dropout-free training noise only (the
student's initial weights are the teacher's layers). Scored on `--eval_samples` held-out test articles: perplexity
and top-1 agreement with the teacher, and the share of the SFT student's perplexity gap to the teacher that KD closes,
(ppl_SFT - ppl_KD) / (ppl_SFT - ppl_teacher). Results are appended to `<output_dir>/runs.jsonl` as runs finish (an
interrupted study resumes), and a markdown table is printed.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. python scripts/studies/lm_kd_vs_sft.py
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq  # noqa: E402

from hf_kd.lm_recipes import (  # noqa: E402
    LMScriptArguments,
    lm_demo_training_args,
    lm_test_metrics,
    load_lm_splits,
    run_lm,
)

TEACHER = "HuggingFaceTB/SmolLM2-135M-Instruct"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/lm_kd_vs_sft")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--eval_samples", type=int, default=32)
    parser.add_argument("--top_k", type=int, default=64, help="the teacher cache's k; 0: a live teacher, full logits")
    parser.add_argument("--methods", nargs="+", default=["sft", "kd"], choices=["sft", "kd"])
    opts = parser.parse_args(argv)
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    done = [json.loads(line) for line in runs_path.read_text().splitlines()] if runs_path.exists() else []
    settings = {k: v for k, v in vars(opts).items() if k not in ("output_dir", "seeds", "methods")}
    done = [run for run in done if run["settings"] == settings]

    script = dict(model_name_or_path=TEACHER, student_layers=15, dataset="text",
                  max_train_samples=opts.steps * opts.batch_size, max_eval_samples=opts.eval_samples)
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    test = load_lm_splits(LMScriptArguments(**script), tokenizer, opts.max_length)["test"]
    teacher_metrics, teacher_top1 = lm_test_metrics(
        AutoModelForCausalLM.from_pretrained(TEACHER), test, DataCollatorForSeq2Seq(tokenizer), 8
    )
    print(f"teacher: perplexity {teacher_metrics['perplexity']:.3f}", flush=True)
    for seed in opts.seeds:
        for method in opts.methods:
            if any(run["seed"] == seed and run["method"] == method for run in done):
                continue
            start, cpu = time.perf_counter(), time.process_time()
            args = lm_demo_training_args(
                str(out / f"{method}-{seed}"), TEACHER, seed, opts.steps, opts.batch_size, opts.learning_rate,
                str(out / "teacher_logits_cache"), temperature=opts.temperature,
                alpha=opts.alpha if method == "kd" else 0.0, lm_max_length=opts.max_length,
                cache_teacher_logits=opts.top_k > 0, lm_cache_top_k=max(opts.top_k, 1),
            )
            metrics = run_lm(LMScriptArguments(**script, method=method), args, teacher_top1)
            run = {"seed": seed, "method": method, "settings": settings, **metrics,
                   "wall_seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}
            done.append(run)
            with runs_path.open("a") as f:
                f.write(json.dumps(run) + "\n")
            print(json.dumps(run), flush=True)

    by = {(run["seed"], run["method"]): run for run in done}
    seeds = [s for s in opts.seeds if (s, "sft") in by and (s, "kd") in by]
    ppl_teacher = teacher_metrics["perplexity"]
    lines = ["| seed | ppl SFT | ppl KD | agreement SFT | agreement KD | gap closed by KD |", "|---|---:|---:|---:|---:|---:|"]
    gaps = []
    for seed in seeds:
        sft, kd = by[(seed, "sft")], by[(seed, "kd")]
        gap = (sft["test_perplexity"] - kd["test_perplexity"]) / (sft["test_perplexity"] - ppl_teacher)
        gaps.append(gap)
        lines.append(f"| {seed} | {sft['test_perplexity']:.2f} | {kd['test_perplexity']:.2f} | "
                     f"{sft['test_top1_agreement']:.4f} | {kd['test_top1_agreement']:.4f} | {100 * gap:.1f}% |")

    def mean_std(key, method):
        values = [by[(s, method)][key] for s in seeds]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    (ps, pss), (pk, pks) = mean_std("test_perplexity", "sft"), mean_std("test_perplexity", "kd")
    (a_s, ass), (ak, aks) = mean_std("test_top1_agreement", "sft"), mean_std("test_top1_agreement", "kd")
    g, gs = statistics.mean(gaps), statistics.stdev(gaps) if len(gaps) > 1 else 0.0
    lines.append(f"| mean +- std | {ps:.2f} +- {pss:.2f} | {pk:.2f} +- {pks:.2f} | {a_s:.4f} +- {ass:.4f} | "
                 f"{ak:.4f} +- {aks:.4f} | {100 * g:.1f}% +- {100 * gs:.1f}% |")
    table = "\n".join(lines)
    print(f"\nteacher perplexity {ppl_teacher:.3f} ({len(test)} test articles x {opts.max_length} tokens), "
          f"torch {torch.__version__}\n\n{table}")
    (out / "results.json").write_text(json.dumps(
        {"teacher": teacher_metrics, "runs": [by[(s, m)] for s in seeds for m in ("sft", "kd")],
         "gap_closed": gaps, "table": table, "settings": settings}, indent=2))


if __name__ == "__main__":
    main()
