"""Top-k teacher-logit cache of causal LMs: disk size, loss values against full-logit KD, step time (CPU).

SmolLM2-135M-Instruct teacher, a 15-layer student made from it ([`hf_kd.student.make_student`]), the first
`--rows` rows of `lm_chat_dataset("sentiment", max_words=8)` tokenized to 64 tokens. For the live teacher (full
logits, [`hf_kd.losses.lm_kd_loss`]) and for the cache at each `k` ([`hf_kd.losses.sparse_lm_kd_loss`], both tails),
it reports: the cache file's bytes per completion token, the distillation loss (`alpha=1`) of the untrained student on
the same first batch at T=1 and T=2, and the median wall time of `--steps` training steps (the cache is built before
the timed run: a cached step has no teacher forward).

Run (prints a markdown table; docs/benchmarks/lm_topk_cache.md records one run):

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. python scripts/benchmarks/lm_topk_cache.py
"""

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, TrainerCallback

from hf_kd import DistillConfig, DistillTrainer
from hf_kd.lm_data import lm_chat_dataset, tokenize_lm_dataset
from hf_kd.offline_models import install_offline_models
from hf_kd.student import make_student

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top-k", type=int, nargs="+", default=[16, 64, 256])
    opts = parser.parse_args()

    install_offline_models([SMOLLM2])
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    teacher = AutoModelForCausalLM.from_pretrained(SMOLLM2).eval()
    student = make_student(teacher, 15)
    data = lm_chat_dataset("sentiment", max_words=8)["train"].select(range(opts.rows))
    train = tokenize_lm_dataset(data, tokenizer, max_length=64).select_columns(["input_ids", "attention_mask", "labels"])
    tokens = sum(sum(1 for label in row[1:] if label != -100) for row in train["labels"])
    collator = DataCollatorForSeq2Seq(tokenizer)
    work = Path(tempfile.mkdtemp(prefix="lm_topk_cache_"))

    def trainer(k, tail="bucket", **kwargs):
        cache = {} if k is None else dict(cache_teacher_logits=True, lm_cache_top_k=k, lm_cache_tail=tail,
                                         teacher_logits_cache_dir=str(work / "cache"))
        args = DistillConfig(
            output_dir=str(work / "out"), per_device_train_batch_size=opts.batch_size,
            per_device_eval_batch_size=opts.batch_size, max_steps=opts.steps, learning_rate=1e-5, report_to="none",
            use_cpu=True, save_strategy="no", logging_steps=1, seed=0, **cache, **kwargs,
        )
        return DistillTrainer(model=copy.deepcopy(student), args=args, teacher_model=teacher, train_dataset=train,
                              processing_class=tokenizer, data_collator=collator)

    configs = [(None, "full")] + [(k, tail) for k in opts.top_k for tail in ("bucket", "renormalise")]
    rows = []
    for k, tail in configs:
        row = {"k": "full logits" if k is None else k, "tail": "-" if k is None else tail}
        if k is not None:
            before = set((work / "cache").glob("*.safetensors")) if (work / "cache").exists() else set()
            start = time.perf_counter()
            trainer(k, tail, alpha=1.0)
            row["cache_s"] = time.perf_counter() - start
            new = set((work / "cache").glob("*.safetensors")) - before
            if new:
                row["bytes_per_token"] = next(iter(new)).stat().st_size / tokens
            else:  # the bucket run of this k wrote it
                row["bytes_per_token"] = rows[-1]["bytes_per_token"]
                row["cache_s"] = float("nan")
        for temperature in (1.0, 2.0):
            t = trainer(k, tail, alpha=1.0, temperature=temperature)
            batch = t.data_collator([t.train_dataset[i] for i in range(opts.batch_size)])
            with torch.no_grad():
                row[f"loss_T{temperature:g}"] = t.compute_loss(t.model.eval(), batch).item()
        t = trainer(k, tail, alpha=0.5, temperature=2.0)
        timer = StepTimer()
        t.add_callback(timer)
        t.train()
        row["step_s"] = statistics.median(timer.times[1:] or timer.times)
        rows.append(row)
        print(row, flush=True)

    print(f"\n{opts.rows} rows, {tokens} completion tokens, batch {opts.batch_size}, torch {torch.__version__}\n")
    print("| k | tail | bytes / token | cache pass (s) | KD loss T=1 | KD loss T=2 | step (s) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        size = f"{row['bytes_per_token']:.0f}" if "bytes_per_token" in row else "-"
        cache_s = f"{row['cache_s']:.1f}" if row.get("cache_s", float("nan")) == row.get("cache_s") else "-"
        print(f"| {row['k']} | {row['tail']} | {size} | {cache_s} | {row['loss_T1']:.4f} | {row['loss_T2']:.4f} | "
              f"{row['step_s']:.2f} |")


if __name__ == "__main__":
    main()
