"""Top-k teacher-logit cache of causal LMs against full-logit KD: quality after training, disk size, step time (CPU).

SmolLM2-135M-Instruct teacher, a 15-layer student made from it ([`hf_kd.student.make_student`], every other layer),
BBC News articles as chat `messages` of exactly `--max_length` tokens (`_common.article_messages`, the data of
lm_vs_trl.py). For the live teacher (full logits, [`hf_kd.losses.lm_kd_loss`]) and for the cache at each `k`
([`hf_kd.losses.sparse_lm_kd_loss`], each tail of `--tails`), from the same initial student, it reports:

- bytes per completion token of the cache file (and the seconds of the cache pass: a teacher forward over the data);
- the distillation loss (`alpha=1`) of the untrained student on the first batch at each of `--temperatures`;
- the median wall time of the training steps after the first (a cached step has no teacher forward);
- after `--steps` training steps (`forward_kl`, `alpha=1`, `T=1`, constant learning rate, rows in order, one pass):
  held-out perplexity and next-token top-1 agreement with the teacher on `--eval_rows` validation articles
  (`_common.lm_held_out`, the same function for every row).

Run (prints a markdown table; docs/benchmarks/lm_topk_cache.md records one run):

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. python scripts/benchmarks/lm_topk_cache.py
"""

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import SMOLLM2, StepTimer, article_messages, lm_held_out
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from hf_kd import DistillConfig, DistillTrainer
from hf_kd.lm_data import tokenize_lm_dataset
from hf_kd.offline_models import install_offline_models
from hf_kd.student import make_student


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--eval-rows", type=int, default=16)
    parser.add_argument("--top-k", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--tails", nargs="+", default=["bucket"], choices=["bucket", "renormalise"])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the rows here")
    opts = parser.parse_args()

    torch.set_num_threads(opts.threads)
    install_offline_models([SMOLLM2])
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    teacher = AutoModelForCausalLM.from_pretrained(SMOLLM2).eval()
    torch.manual_seed(0)
    student = make_student(teacher, 15)
    messages = article_messages(tokenizer, "train", opts.steps * opts.batch_size, opts.max_length)
    train = tokenize_lm_dataset(messages, tokenizer, max_length=opts.max_length)
    held_out = tokenize_lm_dataset(article_messages(tokenizer, "validation", opts.eval_rows, opts.max_length),
                                   tokenizer, max_length=opts.max_length)
    tokens = sum(sum(1 for label in row[1:] if label != -100) for row in train["labels"])
    collator = DataCollatorForSeq2Seq(tokenizer)
    work = Path(tempfile.mkdtemp(prefix="lm_topk_cache_"))

    def trainer(k, tail="bucket", **kwargs):
        cache = {} if k is None else dict(cache_teacher_logits=True, lm_cache_top_k=k, lm_cache_tail=tail,
                                         teacher_logits_cache_dir=str(work / "cache"))
        args = DistillConfig(
            output_dir=str(work / "out"), per_device_train_batch_size=opts.batch_size,
            per_device_eval_batch_size=opts.batch_size, max_steps=opts.steps, learning_rate=opts.learning_rate,
            lr_scheduler_type="constant", train_sampling_strategy="sequential", report_to="none", use_cpu=True,
            save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True, loss_type="forward_kl", **cache, **kwargs,
        )
        return DistillTrainer(model=copy.deepcopy(student), args=args, teacher_model=teacher, train_dataset=train,
                              processing_class=tokenizer, data_collator=collator)

    configs = [(None, "full")] + [(k, tail) for k in opts.top_k for tail in opts.tails]
    rows, trained = [], {"student_init": student}
    for k, tail in configs:
        name = "full logits" if k is None else f"k={k} {tail}"
        row = {"k": "full logits (live teacher)" if k is None else k, "tail": "-" if k is None else tail}
        if k is not None:
            before = set((work / "cache").glob("*.safetensors")) if (work / "cache").exists() else set()
            start = time.perf_counter()
            trainer(k, tail, alpha=1.0)
            row["cache_s"] = time.perf_counter() - start
            new = set((work / "cache").glob("*.safetensors")) - before
            if new:
                row["bytes_per_token"] = next(iter(new)).stat().st_size / tokens
            else:  # an earlier tail of this k wrote it (the tail is not part of the key)
                row["bytes_per_token"] = next(r["bytes_per_token"] for r in rows if r["k"] == k)
                row["cache_s"] = float("nan")
        for temperature in opts.temperatures:
            t = trainer(k, tail, alpha=1.0, temperature=temperature)
            batch = t.data_collator([t.train_dataset[i] for i in range(opts.batch_size)])
            with torch.no_grad():
                row[f"loss_T{temperature:g}"] = t.compute_loss(t.model.eval(), batch).item()
        t = trainer(k, tail, alpha=1.0, temperature=1.0)
        timer = StepTimer()
        t.add_callback(timer)
        t.train()
        row["step_s"] = statistics.median(timer.times[1:] or timer.times)
        row["train_loss"] = [log["loss"] for log in t.state.log_history if "loss" in log]
        trained[name] = t.model.eval()
        rows.append(row)
        print(row, flush=True)

    quality = lm_held_out(trained | {"teacher": teacher}, teacher, held_out, opts.batch_size)
    for (k, tail), row in zip(configs, rows):
        row.update(quality["full logits" if k is None else f"k={k} {tail}"])
    if opts.json:
        Path(opts.json).write_text(json.dumps({"settings": vars(opts) | {"completion_tokens": tokens,
                                                                          "torch": torch.__version__},
                                               "rows": rows, "references": quality}, indent=2))

    print(f"\n{len(train)} rows x {opts.max_length} tokens, {tokens} completion tokens, batch {opts.batch_size}, "
          f"{opts.steps} steps, torch {torch.__version__}\n")
    losses = " | ".join(f"KD loss T={t:g} (untrained)" for t in opts.temperatures)
    print(f"| k | tail | bytes / token | cache pass (s) | {losses} | step (s) | held-out perplexity | "
          "top-1 agreement |")
    print("|---|---|---|---|" + "---|" * len(opts.temperatures) + "---|---|---|")
    for row in rows:
        size = f"{row['bytes_per_token']:.0f}" if "bytes_per_token" in row else "-"
        cache_s = f"{row['cache_s']:.1f}" if row.get("cache_s", float("nan")) == row.get("cache_s") else "-"
        values = " | ".join(f"{row[f'loss_T{t:g}']:.4f}" for t in opts.temperatures)
        print(f"| {row['k']} | {row['tail']} | {size} | {cache_s} | {values} | {row['step_s']:.2f} | "
              f"{row['perplexity']:.2f} | {row['top1_agreement']:.3f} |")
    for name in ("student_init", "teacher"):
        print(f"| ({name}) | | | | " + "| " * len(opts.temperatures) + f"| {quality[name]['perplexity']:.2f} | "
              f"{quality[name]['top1_agreement']:.3f} |")


if __name__ == "__main__":
    main()
