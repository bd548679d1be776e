"""Training cost of the exits of an early-exit LLM per 1M tokens (issue 18): frozen backbone, targets from the live
final exit or from a cached top-k, the shared LM head in the loss or full logits per exit (CPU).

SmolLM2-135M-Instruct as a [`hf_kd.MultiExitForCausalLM`] with exits after `--exit_layers` (a `low_rank` adapter of
rank `--rank` each), `freeze_backbone=True`, `alpha=1`, `T=1`, exit loss weights `[1, ..., 1, 0]` (the frozen final
exit has nothing to learn), AdamW, on BBC News articles cut to `--max_length` tokens (every token counted). Configs:

  final_exit              distill_from="final_exit" (LayerSkip's early-exit loss with the final layer as teacher),
                          lm_fused_head=None: the loss runs the shared head on each exit's normed hidden states, a
                          chunk of tokens at a time; no (batch, seq, vocab) tensor is made
  final_exit_full_logits  the same with lm_fused_head=False (the path before the head moved into the loss: full
                          logits for every exit, their gradients)
  cached                  distill_from="teacher" with the teacher SmolLM2 itself (the same final layer) through
                          hf_kd's top-k cache (cache_teacher_logits, lm_cache_top_k=`--top_k`): the loss reads the
                          cached targets, no final-exit projection
  cached_full_logits      the same with lm_fused_head=False

A prepare worker fills the cache once (its time is reported per 1M tokens: paid once per dataset, not per epoch).
Each config then trains in its own subprocess for `--steps` steps (`--warmup` not timed), `--repeats` rounds, the
order reversed every other round. Per config: the median wall seconds per step, the CPU seconds of this process per
step (user + system, all threads: less sensitive than wall time to other jobs on a shared machine), the counted
tokens per step, hence hours per 1M training tokens both ways, the peak RSS during training and what training adds to
the RSS it started from, and the first and last logged loss.

Run (writes docs/benchmarks/<--name>.json and prints the markdown table of docs/benchmarks/early_exit_lm.md):

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. \\
        python scripts/benchmarks/early_exit_lm_training_cost.py
"""

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from _common import SMOLLM2, PeakRSS, alternating, forwarded_args, launch_worker

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ("final_exit", "final_exit_full_logits", "cached", "cached_full_logits")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_rows", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--exit_layers", type=int, nargs="+", default=[8, 15])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--name", default="early_exit_lm_training_cost")
    parser.add_argument("--scratch", default="/tmp/hf_kd_bench_early_exit_lm_training_cost")
    parser.add_argument("--worker", choices=CONFIGS + ("prepare",), help=argparse.SUPPRESS)
    return parser.parse_args()


def trainer_for(opts, config: str):
    """The EarlyExitTrainer of `config` on a fresh multi-exit SmolLM2 and the training rows."""
    import torch
    from transformers import AutoTokenizer

    from hf_kd import EarlyExitConfig, EarlyExitTrainer, MultiExitForCausalLM
    from hf_kd.lm_data import LMDataCollator
    from hf_kd.lm_recipes import LMScriptArguments, load_lm_splits

    torch.set_num_threads(opts.threads)
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    data = LMScriptArguments(model_name_or_path=SMOLLM2, dataset="text", max_train_samples=opts.train_rows,
                             max_eval_samples=1)
    train = load_lm_splits(data, tokenizer, opts.max_length)["train"]
    model = MultiExitForCausalLM.from_backbone(SMOLLM2, exit_layers=opts.exit_layers, exit_adapter="low_rank",
                                               exit_adapter_rank=opts.rank)
    cached = config.startswith("cached")
    teacher = dict(distill_from="teacher", teacher_model_name_or_path=SMOLLM2, cache_teacher_logits=True,
                   lm_cache_top_k=opts.top_k, teacher_logits_cache_dir=str(Path(opts.scratch) / "cache"))
    args = EarlyExitConfig(
        output_dir=str(Path(opts.scratch) / config), per_device_train_batch_size=opts.batch_size,
        max_steps=opts.steps, learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no",
        eval_strategy="no", logging_steps=1, seed=0, disable_tqdm=True, freeze_backbone=True, alpha=1.0,
        temperature=1.0, exit_loss_weights=[1.0] * len(opts.exit_layers) + [0.0],
        lm_fused_head=False if config.endswith("full_logits") else None,
        **(teacher if cached else {"distill_from": "final_exit"}),
    )
    return EarlyExitTrainer(model=model, args=args, train_dataset=train, data_collator=LMDataCollator.for_tokenizer(
        tokenizer)), train


def prepare_worker(opts) -> dict:
    """Fill the top-k cache of the training rows (the teacher's one pass) and time it."""
    start = time.perf_counter()
    cpu = time.process_time()
    _, train = trainer_for(opts, "cached")  # the trainer fills the cache when it is built
    tokens = sum(sum(1 for label in row[1:] if label != -100) for row in train["labels"])
    return {"cache_fill_seconds": time.perf_counter() - start, "cache_fill_cpu_seconds": time.process_time() - cpu,
            "cached_tokens": tokens}


def train_worker(opts) -> dict:
    """Train `opts.worker` and time every step, wall and CPU."""
    import psutil
    from transformers import TrainerCallback

    trainer, _ = trainer_for(opts, opts.worker)

    class Timer(TrainerCallback):
        """Wall and process CPU seconds of every optimiser step."""

        def __init__(self):
            self.wall, self.cpu = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self._start, self._cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.wall.append(time.perf_counter() - self._start)
            self.cpu.append(time.process_time() - self._cpu)

    counted = []
    get_batch_samples = trainer.get_batch_samples

    def counting(*args, **kwargs):
        batches, num_items = get_batch_samples(*args, **kwargs)
        counted.append(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
        return batches, num_items

    trainer.get_batch_samples = counting
    timer = Timer()
    trainer.add_callback(timer)
    rss_before = psutil.Process().memory_info().rss / 2**20
    with PeakRSS() as memory:
        trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    w = opts.warmup
    return {
        "config": opts.worker, "seconds_per_step": statistics.median(timer.wall[w:]),
        "cpu_seconds_per_step": statistics.median(timer.cpu[w:]), "step_times": timer.wall, "cpu_times": timer.cpu,
        "tokens_per_step": statistics.mean(counted[w:]), "peak_rss_mb": memory.peak_mb,
        "train_peak_over_start_mb": memory.peak_mb - rss_before, "first_loss": losses[0], "last_loss": losses[-1],
    }


def main():
    opts = parse_args()
    if opts.worker:
        result = prepare_worker(opts) if opts.worker == "prepare" else train_worker(opts)
        print(json.dumps(result))
        return
    # A cache left by an earlier run would be read instead of filled: the fill time must be measured.
    shutil.rmtree(Path(opts.scratch) / "cache", ignore_errors=True)
    Path(opts.scratch).mkdir(parents=True, exist_ok=True)
    script, env = str(Path(__file__).resolve()), {**os.environ, "OMP_NUM_THREADS": str(opts.threads)}
    forwarded = forwarded_args(opts, ["train_rows", "max_length", "batch_size", "steps", "warmup", "rank", "top_k",
                                      "threads", "scratch"]) + ["--exit_layers", *map(str, opts.exit_layers)]
    prepared = launch_worker(script, "prepare", forwarded, env)
    print(f"cache filled: {prepared}", flush=True)
    runs = alternating(opts.configs, opts.repeats, lambda config: launch_worker(script, config, forwarded, env),
                       lambda r: f"{r['seconds_per_step']:.2f} s/step, {r['cpu_seconds_per_step']:.2f} CPU s/step, "
                                 f"peak {r['peak_rss_mb']:.0f} MB")
    summary = {}
    for config, results in runs.items():
        step, cpu = (statistics.median(r[key] for r in results) for key in ("seconds_per_step", "cpu_seconds_per_step"))
        tokens = results[0]["tokens_per_step"]
        summary[config] = {
            "seconds_per_step": step, "cpu_seconds_per_step": cpu, "tokens_per_step": tokens,
            "hours_per_million_tokens": step / tokens * 1e6 / 3600,
            "cpu_hours_per_million_tokens": cpu / tokens * 1e6 / 3600,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "train_peak_over_start_mb": max(r["train_peak_over_start_mb"] for r in results),
            "first_loss": results[0]["first_loss"], "last_loss": results[0]["last_loss"],
        }
    fill = prepared["cache_fill_seconds"] / prepared["cached_tokens"] * 1e6 / 3600
    lines = [
        "| configuration | s/step | CPU s/step | tokens/step | hours per 1M tokens | CPU-hours per 1M tokens | peak RSS (MB) "
        "| training adds (MB) | first loss | last loss |", "|---" * 10 + "|",
    ]
    for config, s in summary.items():
        lines.append(
            f"| {config} | {s['seconds_per_step']:.2f} | {s['cpu_seconds_per_step']:.2f} | {s['tokens_per_step']:.0f} "
            f"| {s['hours_per_million_tokens']:.2f} | {s['cpu_hours_per_million_tokens']:.2f} | {s['peak_rss_mb']:.0f} "
            f"| {s['train_peak_over_start_mb']:.0f} | {s['first_loss']:.4f} | {s['last_loss']:.4f} |"
        )
    lines.append(f"\nCache fill (one teacher pass, top-{opts.top_k}): {prepared['cache_fill_seconds']:.1f} s for "
                 f"{prepared['cached_tokens']} tokens, {fill:.2f} hours per 1M tokens (once per dataset).")
    print("\n".join(lines))
    out = ROOT / "docs" / "benchmarks" / f"{opts.name}.json"
    out.write_text(json.dumps({"options": vars(opts), "prepare": prepared, "runs": runs, "summary": summary},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
