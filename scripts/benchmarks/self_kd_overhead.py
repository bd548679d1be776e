"""Training-step cost of SelfKDTrainer over an ERM step on the same backbone (issue 6 target: <= 1.10x).

Same backbone (all-MiniLM-L6-v2), same MD-Agreement tweets (max_length 64), same batches, 3 epochs each:

  erm              transformers.Trainer on AutoModelForSequenceClassification (one head, cross-entropy): the floor
  erm_final_exit   transformers.Trainer on MultiExitForSequenceClassification with one exit, the last layer (the ERM
                   baseline of the studies: the same head as SelfKD's main classifier)
  selfkd           SelfKDTrainer, a head per layer, warm-up 1 epoch (E = 1), self-distillation 1 epoch,
                   re-calibration (m = 10 %) 1 epoch: its steps are timed per phase

Each configuration runs in its own subprocess, interleaved and repeated; ratios use the median seconds per step
(first `--warmup` steps of the run excluded; per phase for selfkd). Besides the steps, SelfKD runs one pass over the
validation set after each epoch (entropy per layer) and one over the train set when it selects the re-calibration
set: reported separately, as the whole-run wall-clock ratio. Writes docs/benchmarks/self_kd_overhead.{json,md}.

    PYTHONPATH=. python scripts/benchmarks/self_kd_overhead.py --steps_per_epoch 30 --repeats 3
"""

import json
import os
import statistics
import time
from pathlib import Path

from _common import (
    PeakRSS,
    StepTimer,
    forwarded_args,
    interleaved,
    launch_worker,
    overhead_parser,
    write_overhead_report,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ("erm", "erm_final_exit", "selfkd")
PHASES = ("warmup", "distill", "recalibrate")
BACKBONE = "sentence-transformers/all-MiniLM-L6-v2"
SHARED_DATA = ROOT.parent / "shared" / "data"


def worker(config: str, steps_per_epoch: int, warmup: int, batch_size: int, threads: int, output_dir: str) -> dict:
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from hf_kd import MultiExitForSequenceClassification, SelfKDConfig, SelfKDTrainer
    from hf_kd.data import load_lewidi, tokenize_dataset

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(BACKBONE)
    rows = steps_per_epoch * batch_size
    train = load_lewidi(SHARED_DATA, split="train").select(range(rows)).remove_columns("human_label_dist")
    train = tokenize_dataset(train, tokenizer, max_length=64).remove_columns(["id", "text", "annotations", "annotators"])
    dev = tokenize_dataset(load_lewidi(SHARED_DATA, split="dev").select(range(200)), tokenizer, max_length=64)
    dev = dev.remove_columns(["id", "text", "annotations", "annotators"])
    torch.manual_seed(0)
    common = dict(
        output_dir=str(Path(output_dir) / f"run_{config}"), per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=64, num_train_epochs=3, logging_steps=steps_per_epoch, save_strategy="no",
        eval_strategy="no", report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    timer = StepTimer()
    kwargs = dict(train_dataset=train, processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                  callbacks=[timer])
    if config == "erm":
        model = AutoModelForSequenceClassification.from_pretrained(BACKBONE, num_labels=2)
        trainer = Trainer(model=model, args=TrainingArguments(**common), **kwargs)
    elif config == "erm_final_exit":
        model = MultiExitForSequenceClassification.from_backbone(BACKBONE, exit_layers=[6], num_labels=2)
        trainer = Trainer(model=model, args=TrainingArguments(**common), **kwargs)
    else:
        model = MultiExitForSequenceClassification.from_backbone(BACKBONE, num_labels=2)
        args = SelfKDConfig(**common, warmup_max_epochs=1, selection_stable_epochs=1, recalibration_percent=10)
        trainer = SelfKDTrainer(model=model, args=args, eval_dataset=dev, **kwargs)
    start = time.perf_counter()
    with PeakRSS() as memory:
        trainer.train()
    wall = time.perf_counter() - start
    times = timer.times
    result = {"config": config, "seconds_per_step": statistics.median(times[warmup:]), "steps": len(times),
              "wall_seconds": wall, "peak_rss_mb": memory.peak_mb}
    for index, phase in enumerate(PHASES):  # epoch e trains in phase e for selfkd; the same steps for the others
        chunk = times[index * steps_per_epoch:(index + 1) * steps_per_epoch]
        result[f"{phase}_seconds_per_step"] = statistics.median(chunk[warmup if index == 0 else 0:])
    if config == "selfkd":
        result["phases"] = trainer._self_kd.epoch_phases
    return result


def main():
    opts = overhead_parser(__doc__, CONFIGS, str(ROOT / "docs" / "benchmarks"), ("--steps_per_epoch", 30), 3,
                           ("--output_dir", "/tmp/hf_kd_bench_self_kd")).parse_args()
    if opts.worker:
        print(json.dumps(worker(opts.worker, opts.steps_per_epoch, opts.warmup, opts.batch_size, opts.threads,
                                opts.output_dir)))
        return

    worker_args = forwarded_args(opts, ["steps_per_epoch", "warmup", "batch_size", "threads", "output_dir"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    runs = interleaved(CONFIGS, opts.repeats, lambda config: launch_worker(__file__, config, worker_args, env))
    keys = ["seconds_per_step", "wall_seconds", *[f"{p}_seconds_per_step" for p in PHASES]]
    summary = {c: {k: statistics.median(r[k] for r in results) for k in keys} | {
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results)} for c, results in runs.items()}
    erm = summary["erm"]
    ratios = {f"selfkd {phase} step / erm step": summary["selfkd"][f"{phase}_seconds_per_step"]
              / erm[f"{phase}_seconds_per_step"] for phase in PHASES}
    ratios["selfkd step (all phases) / erm step"] = summary["selfkd"]["seconds_per_step"] / erm["seconds_per_step"]
    ratios["erm_final_exit step / erm step"] = summary["erm_final_exit"]["seconds_per_step"] / erm["seconds_per_step"]
    ratios["selfkd whole run / erm whole run (incl. entropy and ambiguity passes)"] = (
        summary["selfkd"]["wall_seconds"] / erm["wall_seconds"])

    table = ["| configuration | median s/step | warm-up epoch | self-distillation epoch | re-calibration epoch | "
             "whole run (s) | peak RSS (MB) |", "|---|---|---|---|---|---|---|"]
    table += [f"| {c} | {s['seconds_per_step']:.4f} | {s['warmup_seconds_per_step']:.4f} | "
              f"{s['distill_seconds_per_step']:.4f} | {s['recalibrate_seconds_per_step']:.4f} | "
              f"{s['wall_seconds']:.1f} | {s['peak_rss_mb']:.0f} |" for c, s in summary.items()]
    targets = {k: "<= 1.10" for k in ratios if "step / erm step" in k and k.startswith("selfkd")}
    write_overhead_report(opts.out, "self_kd_overhead", opts, runs, summary, ratios, table, targets)

if __name__ == "__main__":
    main()
