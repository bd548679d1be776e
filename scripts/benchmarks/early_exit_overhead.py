"""Training-time overhead of EarlyExitTrainer over a plain Trainer step on the same backbone (target <= 1.10x).

Same backbone (all-MiniLM-L6-v2), same Rotten Tomatoes rows, same batches:

  plain                     transformers.Trainer on AutoModelForSequenceClassification (one head, cross-entropy):
                            the floor
  plain_multi_exit          transformers.Trainer on MultiExitForSequenceClassification (6 exits, the model's own loss)
  early_exit                EarlyExitTrainer, 6 exits, cross-entropy per exit             (target: <= 1.10x plain)
  early_exit_final_exit_kd  EarlyExitTrainer, 6 exits, distillation from the final exit into the earlier ones
                            (distill_from="final_exit")                                   (target: <= 1.10x plain)

Each configuration runs in its own subprocess, interleaved and repeated; ratios use the median seconds per step with
the first `--warmup` steps excluded (scripts/benchmarks/_common.py). Writes docs/benchmarks/early_exit_overhead.{json,md}.

    HF_HUB_OFFLINE=1 python scripts/benchmarks/early_exit_overhead.py --steps 40 --repeats 3
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
CONFIGS = ("plain", "plain_multi_exit", "early_exit", "early_exit_final_exit_kd")
BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"


def worker(config: str, steps: int, warmup: int, batch_size: int, threads: int, output_dir: str) -> dict:
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from hf_kd import EarlyExitConfig, EarlyExitTrainer, MultiExitForSequenceClassification, data

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(BACKBONE)
    train = data.load_rotten_tomatoes()["train"].select(range(steps * batch_size))
    train = train.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True)
    torch.manual_seed(0)
    if config == "plain":
        model = AutoModelForSequenceClassification.from_pretrained(BACKBONE, num_labels=2)
    else:
        model = MultiExitForSequenceClassification.from_backbone(BACKBONE, num_labels=2)
    common = dict(
        output_dir=str(Path(output_dir) / f"run_{config}"), per_device_train_batch_size=batch_size, max_steps=steps,
        logging_steps=steps, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    timer = StepTimer()
    kwargs = dict(model=model, train_dataset=train, processing_class=tokenizer,
                  data_collator=DataCollatorWithPadding(tokenizer), callbacks=[timer])
    if config.startswith("plain"):
        trainer = Trainer(args=TrainingArguments(**common), **kwargs)
    else:
        distill_from = "final_exit" if config == "early_exit_final_exit_kd" else "none"
        trainer = EarlyExitTrainer(args=EarlyExitConfig(**common, distill_from=distill_from), **kwargs)
    with PeakRSS() as memory:
        trainer.train()
    return {"config": config, **step_summary(timer.times, warmup), "peak_rss_mb": memory.peak_mb}


def main():
    opts = overhead_parser(__doc__, CONFIGS, str(ROOT / "docs" / "benchmarks"), ("--steps", 40), 5,
                           ("--output_dir", "/tmp/hf_kd_bench_early_exit")).parse_args()
    if opts.worker:
        print(json.dumps(worker(opts.worker, opts.steps, opts.warmup, opts.batch_size, opts.threads, opts.output_dir)))
        return

    worker_args = forwarded_args(opts, ["steps", "warmup", "batch_size", "threads", "output_dir"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = interleaved(CONFIGS, opts.repeats, lambda config: launch_worker(__file__, config, worker_args, env))
    summary = median_summary(runs)
    plain = summary["plain"]["seconds_per_step"]
    ratios = {f"{config} / plain": summary[config]["seconds_per_step"] / plain for config in CONFIGS[1:]}

    targets = {k: "<= 1.10" for k in ratios if "early_exit" in k}
    write_overhead_report(opts.out, "early_exit_overhead", opts, runs, summary, ratios, step_table(summary), targets)

if __name__ == "__main__":
    main()
