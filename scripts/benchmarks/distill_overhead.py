"""Training-time overhead of DistillTrainer over a plain Trainer, and peak memory, measured in one run.

Four ways of training the same student (paraphrase-MiniLM-L3-v2) on the same Rotten Tomatoes rows, same batches:

  plain           transformers.Trainer, cross-entropy                        (the floor)
  handwritten     a Trainer subclass whose compute_loss runs the teacher and a KD loss inline: what users write
                  today, i.e. student step + teacher forward, with nothing else
  hf_kd_cached    DistillTrainer, teacher logits cached beforehand (target: <= 1.05x plain)
  hf_kd_online    DistillTrainer, teacher (all-MiniLM-L6-v2, fine-tuned head irrelevant for timing) run every step
                  (target: <= 1.05x handwritten)

Each configuration runs in its own subprocess (clean peak-RSS measurement), the four are interleaved and repeated
(`--repeats`), and the ratio uses the median seconds per step, the first `--warmup` steps excluded. Writes JSON and a
Markdown table to docs/benchmarks/.

    HF_HUB_OFFLINE=1 python scripts/benchmarks/distill_overhead.py --steps 40 --repeats 3
"""

import json
import os
from pathlib import Path

from _common import (
    PeakRSS,
    StepTimer,
    forwarded_args,
    interleaved,
    launch_worker,
    median_summary,
    overhead_parser,
    step_summary,
    step_table,
    write_overhead_report,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ("plain", "handwritten", "hf_kd_cached", "hf_kd_online")
STUDENT = "sentence-transformers/paraphrase-MiniLM-L3-v2"
TEACHER = "sentence-transformers/all-MiniLM-L6-v2"


def worker(config: str, steps: int, warmup: int, batch_size: int, threads: int, cache_dir: str) -> dict:
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from hf_kd import DistillConfig, DistillTrainer, data, kd_loss

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(STUDENT)
    train = data.load_rotten_tomatoes()["train"].select(range(steps * batch_size))
    train = train.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True)
    student = AutoModelForSequenceClassification.from_pretrained(STUDENT, num_labels=2)
    # Only the hand-written baseline builds the teacher here; DistillTrainer gets the Hub id, so a cached run
    # never loads it and its peak memory shows that.
    teacher = AutoModelForSequenceClassification.from_pretrained(TEACHER, num_labels=2).eval() if config == "handwritten" else None

    class HandwrittenKD(Trainer):
        """The KD compute_loss override of the transformers docs' KD guide: teacher forward + loss, nothing else."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            student_logits = model(**inputs).logits
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits
            loss = kd_loss(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5)
            return (loss, student_logits) if return_outputs else loss

    common = dict(
        output_dir=str(Path(cache_dir) / f"run_{config}"), per_device_train_batch_size=batch_size, max_steps=steps,
        logging_steps=steps, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    timer = StepTimer()
    kwargs = dict(model=student, train_dataset=train, processing_class=tokenizer,
                  data_collator=DataCollatorWithPadding(tokenizer), callbacks=[timer])
    if config == "plain":
        trainer = Trainer(args=TrainingArguments(**common), **kwargs)
    elif config == "handwritten":
        trainer = HandwrittenKD(args=TrainingArguments(**common), **kwargs)
    else:
        cached = config == "hf_kd_cached"
        args = DistillConfig(**common, cache_teacher_logits=cached, teacher_logits_cache_dir=cache_dir)
        # The cache is filled by an earlier process (see main); a cached run never loads the teacher.
        trainer = DistillTrainer(args=args, teacher_model=TEACHER, **kwargs)
    with PeakRSS() as memory:
        trainer.train()
    return {"config": config, **step_summary(timer.times, warmup), "peak_rss_mb": memory.peak_mb}


def main():
    opts = overhead_parser(__doc__, CONFIGS, str(ROOT / "docs" / "benchmarks"), ("--steps", 40), 5,
                           ("--cache_dir", "/tmp/hf_kd_bench_cache")).parse_args()

    if opts.worker:
        print(json.dumps(worker(opts.worker, opts.steps, opts.warmup, opts.batch_size, opts.threads, opts.cache_dir)))
        return

    worker_args = forwarded_args(opts, ["steps", "warmup", "batch_size", "threads", "cache_dir"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def launch(config):
        return launch_worker(__file__, config, worker_args, env)

    launch("hf_kd_cached")  # fills the teacher-logits cache; not timed
    runs = interleaved(CONFIGS, opts.repeats, launch)
    summary = median_summary(runs)
    ratios = {
        "hf_kd_cached / plain": summary["hf_kd_cached"]["seconds_per_step"] / summary["plain"]["seconds_per_step"],
        "hf_kd_online / handwritten": summary["hf_kd_online"]["seconds_per_step"]
        / summary["handwritten"]["seconds_per_step"],
        "handwritten / plain": summary["handwritten"]["seconds_per_step"] / summary["plain"]["seconds_per_step"],
    }
    targets = {"hf_kd_cached / plain": "<= 1.05", "hf_kd_online / handwritten": "<= 1.05", "handwritten / plain": "-"}
    write_overhead_report(opts.out, "distill_overhead", opts, runs, summary, ratios, step_table(summary), targets)

if __name__ == "__main__":
    main()
