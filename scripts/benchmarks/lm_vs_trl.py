"""Causal-LM distillation side by side with TRL 1.16: step time, peak memory, held-out perplexity, in one run (CPU).

Same student, teacher, data, sequence length, batch, steps, optimiser, seed and gradient-checkpointing setting for:

  trl_gkd         trl.experimental.gkd.GKDTrainer, beta=0, lmbda=0, seq_kd=False: supervised forward KL
                  KL(p_T || p_S) on the dataset's completions, full-vocabulary log_softmax of both models' logits
  hf_kd           hf_kd.DistillTrainer, loss_type="forward_kl", alpha=1, temperature=1 (the same objective),
                  live teacher, chunked hf_kd.losses.lm_kd_loss with the LM heads run inside it (lm_fused_head,
                  the default: neither model makes (batch, seq, vocab) logits)
  hf_kd_full_logits  the same with lm_fused_head=False: both models make full logits, the loss reads them
  hf_kd_cached    the same with cache_teacher_logits=True, lm_cache_top_k=--top_k (bucket tail): the teacher's
                  top-k logits are cached by an untimed run first; a cached run never loads the teacher

TRL 1.16's `DistillationTrainer` (trl.trainer.distillation_trainer) is not compared: it is on-policy only (every
step the student generates completions of the prompts, `max_completion_length` tokens; it has no lmbda and never
trains on a dataset's completions), so it cannot run this supervised workload.

Teacher: SmolLM2-135M-Instruct (30 layers). Student: the same with 15 layers kept (`hf_kd.student.make_student`,
every other layer), built once and saved, so every trainer starts from identical weights. Data: BBC News articles as
chat `messages` (user: "Write a BBC news article with the headline: ...", assistant: the article's body), each
exactly `--max_length` tokens under the chat template, so that TRL's collator (left padding and truncation) and
hf_kd's tokenizer (right) produce the same tensors (checked); rows in order (`train_sampling_strategy="sequential"`).

Each trainer runs in its own subprocess (a fresh interpreter, `--threads` torch threads). The configurations are
repeated `--repeats` times, the order reversed every other round (ABC, CBA, ...), so that drifts in the load of this
shared machine hit them alike. Step time: median over the steps after `--warmup`, then the median over repeats; the
phases of a step (student forward, teacher forward, loss, backward + optimiser) are timed with forward hooks and a
wrapper around `compute_loss`. Peak memory: the largest resident set size (psutil, sampled every 10 ms) during
`trainer.train()` (the largest over repeats), and the same minus the RSS just before training (model weights, data,
interpreter), i.e. what training adds. Held-out perplexity and top-1 agreement with the teacher: one function
(`_common.lm_held_out`) on the same `--eval_rows` validation articles, for every trained student of the last round.

Run (writes docs/benchmarks/<--name>.json and <--name>_table.md, which docs/benchmarks/lm_vs_trl.md discusses;
larger --batch_size / --max_length show the loss's memory better). The published runs:

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 PYTHONPATH=. \
        python scripts/benchmarks/lm_vs_trl.py --top_k 256 --name lm_vs_trl_k256
    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 PYTHONPATH=. \
        python scripts/benchmarks/lm_vs_trl.py --batch_size 8 --top_k 256 --name lm_vs_trl_b8_k256
"""

import json
import os
import statistics
import time
from pathlib import Path

from _common import (
    SMOLLM2,
    PeakRSS,
    StepTimer,
    alternating,
    article_messages,
    forwarded_args,
    launch_worker,
    lm_held_out,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ("trl_gkd", "hf_kd", "hf_kd_full_logits", "hf_kd_cached")
WORKERS = CONFIGS + ("prepare", "evaluate", "loss_profile")


def parse_args():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--gradient_checkpointing", type=int, default=0, help="1 to turn it on (both trainers)")
    parser.add_argument("--student_layers", type=int, default=15)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--eval_rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--name", default="lm_vs_trl", help="results go to <out>/<name>.json and <name>_table.md")
    parser.add_argument("--scratch", default="/tmp/hf_kd_bench_lm_vs_trl")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    return parser.parse_args()


def datasets(opts, tokenizer):
    """The `steps * batch_size` training conversations (`messages`): one pass, each row seen once."""
    train = article_messages(tokenizer, "train", opts.steps * opts.batch_size, opts.max_length)
    return train


class PhaseTimer:
    """Seconds spent in the student's forward, the teacher's forward and `compute_loss` (which contains both), summed
    over the optimiser steps after warm-up; backward + optimiser = step - compute_loss."""

    def __init__(self):
        self.totals = {"student_forward": 0.0, "teacher_forward": 0.0, "compute_loss": 0.0}
        self._starts = {}

    def hook(self, model, name):
        def pre(*_):
            self._starts[name] = time.perf_counter()

        def post(*_):
            self.totals[name] += time.perf_counter() - self._starts[name]

        model.register_forward_pre_hook(pre)
        model.register_forward_hook(post)

    def wrap(self, trainer):
        compute_loss = trainer.compute_loss

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return compute_loss(*args, **kwargs)
            finally:
                self.totals["compute_loss"] += time.perf_counter() - start

        trainer.compute_loss = timed

    def reset(self):
        self.totals = dict.fromkeys(self.totals, 0.0)


def train_worker(opts) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from hf_kd.lm_data import tokenize_lm_dataset

    torch.set_num_threads(opts.threads)
    config, scratch = opts.worker, Path(opts.scratch)
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    train = datasets(opts, tokenizer)
    student = AutoModelForCausalLM.from_pretrained(scratch / "student_init")
    common = dict(
        output_dir=str(scratch / f"run_{config}"), per_device_train_batch_size=opts.batch_size,
        max_steps=opts.steps, learning_rate=opts.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=bool(opts.gradient_checkpointing),
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    phases = PhaseTimer()
    phases.hook(student, "student_forward")
    if config == "trl_gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        teacher = AutoModelForCausalLM.from_pretrained(SMOLLM2).eval()
        phases.hook(teacher, "teacher_forward")
        args = GKDConfig(**common, lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False, max_length=opts.max_length)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                             processing_class=tokenizer)
    else:
        from hf_kd import DistillConfig, DistillTrainer

        cached = config == "hf_kd_cached"
        cache = dict(cache_teacher_logits=True, lm_cache_top_k=opts.top_k,
                     teacher_logits_cache_dir=str(scratch / "cache")) if cached else {}
        # The cached run gets the Hub id: the cache was filled by the prepare worker, so the teacher is never loaded.
        teacher = SMOLLM2 if cached else AutoModelForCausalLM.from_pretrained(SMOLLM2).eval()
        if not cached:
            phases.hook(teacher, "teacher_forward")
        if config == "hf_kd_full_logits":
            cache["lm_fused_head"] = False
        args = DistillConfig(**common, loss_type="forward_kl", alpha=1.0, temperature=1.0, **cache)
        trainer = DistillTrainer(model=student, args=args, teacher_model=teacher,
                                 train_dataset=tokenize_lm_dataset(train, tokenizer, max_length=opts.max_length),
                                 processing_class=tokenizer, data_collator=DataCollatorForSeq2Seq(tokenizer))
    measured = timed_training(trainer, phases, opts.warmup)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    trainer.model.save_pretrained(scratch / f"trained_{config}")
    return {"config": config, **measured, "losses": losses}


def rounds_summary(results: list[dict]) -> dict:
    """One trainer's rounds of [`timed_training`] in one: the median step time and phases, the largest peaks."""
    return {
        "seconds_per_step": statistics.median(r["seconds_per_step"] for r in results),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "train_peak_over_start_mb": max(r["train_peak_over_start_mb"] for r in results),
        "phases_per_step": {k: statistics.median(r["phases_per_step"][k] for r in results)
                            for k in results[0]["phases_per_step"]},
    }


def step_cells(config: str, s: dict) -> str:
    """The first eight cells of a results-table row from a [`rounds_summary`]: trainer, s/step, student forward,
    teacher forward, the rest of compute_loss, backward + optimiser, peak RSS, what training adds (then `|`)."""
    p = s["phases_per_step"]
    loss = p["compute_loss"] - p["student_forward"] - p["teacher_forward"]
    return (
        f"| {config} | {s['seconds_per_step']:.2f} | {p['student_forward']:.2f} | {p['teacher_forward']:.2f} | "
        f"{loss:.2f} | {s['seconds_per_step'] - p['compute_loss']:.2f} | {s['peak_rss_mb']:.0f} | "
        f"{s['train_peak_over_start_mb']:.0f} |"
    )


def timed_training(trainer, phases: PhaseTimer, warmup: int) -> dict:
    """`trainer.train()` timed: the median seconds per step after `warmup` steps and every step's time, the phases
    per step after warm-up (`phases` already hooked on the models), the peak RSS during training and what training
    adds to the RSS it started from."""
    import psutil
    from transformers import TrainerCallback

    phases.wrap(trainer)
    timer = StepTimer()

    class ResetAfterWarmup(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                phases.reset()

    trainer.add_callback(timer)
    trainer.add_callback(ResetAfterWarmup())
    rss_before = psutil.Process().memory_info().rss / 2**20
    with PeakRSS() as memory:
        trainer.train()
    timed = timer.times[warmup:]
    return {
        "seconds_per_step": statistics.median(timed), "step_times": timer.times,
        "phases_per_step": {k: v / len(timed) for k, v in phases.totals.items()},
        "peak_rss_mb": memory.peak_mb, "rss_before_train_mb": rss_before,
        "train_peak_over_start_mb": memory.peak_mb - rss_before,
    }


def prepare_worker(opts) -> dict:
    """Save the initial student; check both trainers' data paths give the same tensors; fill hf_kd's cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq
    from trl.experimental.utils import DataCollatorForChatML

    from hf_kd import DistillConfig, DistillTrainer
    from hf_kd.lm_data import tokenize_lm_dataset
    from hf_kd.student import make_student

    torch.set_num_threads(opts.threads)
    scratch = Path(opts.scratch)
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    teacher = AutoModelForCausalLM.from_pretrained(SMOLLM2).eval()
    torch.manual_seed(0)
    make_student(teacher, opts.student_layers).save_pretrained(scratch / "student_init")
    train = datasets(opts, tokenizer)
    ours = DataCollatorForSeq2Seq(tokenizer)(list(tokenize_lm_dataset(train, tokenizer, max_length=opts.max_length)))
    theirs = DataCollatorForChatML(tokenizer=tokenizer, max_length=opts.max_length)(list(train))
    for key in ("input_ids", "attention_mask", "labels"):
        if not torch.equal(ours[key], theirs[key]):
            raise RuntimeError(f"hf_kd's and TRL's {key} differ: the comparison would not be on the same tokens")
    if "hf_kd_cached" in opts.configs:
        args = DistillConfig(output_dir=str(scratch / "run_prepare"), use_cpu=True, report_to="none",
                             cache_teacher_logits=True, lm_cache_top_k=opts.top_k,
                             teacher_logits_cache_dir=str(scratch / "cache"))
        DistillTrainer(model=AutoModelForCausalLM.from_pretrained(scratch / "student_init"), args=args,
                       teacher_model=SMOLLM2, processing_class=tokenizer,
                       train_dataset=tokenize_lm_dataset(train, tokenizer, max_length=opts.max_length))
    labels = ours["labels"][:, 1:]
    return {"train_rows": len(train), "completion_tokens_per_step": int((labels != -100).sum()) / opts.steps}


def evaluate_worker(opts) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd.lm_data import tokenize_lm_dataset

    torch.set_num_threads(opts.threads)
    scratch = Path(opts.scratch)
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    held_out = tokenize_lm_dataset(article_messages(tokenizer, "validation", opts.eval_rows, opts.max_length),
                                   tokenizer, max_length=opts.max_length)
    names = ["student_init"] + [f"trained_{c}" for c in opts.configs]
    models = {name: AutoModelForCausalLM.from_pretrained(scratch / name).eval() for name in names}
    teacher = AutoModelForCausalLM.from_pretrained(SMOLLM2).eval()
    models["teacher"] = teacher
    return lm_held_out(models, teacher, held_out, opts.batch_size)


def loss_profile_worker(opts) -> dict:
    """The one part of a step that differs between the trainers, alone and interleaved in one process (so that the
    machine's load hits the variants alike), forward + backward, with the counted tokens of the training batch:

    - from float32 logits of the benchmark's shape `(batch, max_length - 1, 49,152)`: TRL's
      `GKDTrainer.generalized_jsd_loss` (beta=0: full-tensor log_softmax of both logits, `kl_div`, masked select)
      and one call of `hf_kd.losses.lm_kd_loss` (chunked);
    - from the final hidden states `(batch, max_length - 1, 576)` and SmolLM2's LM head `(49,152, 576)` (the
      student's with a gradient, the teacher's without), i.e. the heads included, as a training step runs them: both
      heads then TRL's loss; both heads then `lm_kd_loss` (`lm_fused_head=False`); `lm_kd_loss` on
      `LMHeadInputs`, the heads run chunk by chunk inside the loss (`lm_fused_head`, the default).

    Median seconds over `--repeats * 3` rounds."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq
    from trl.experimental.gkd import GKDTrainer

    from hf_kd.lm_data import tokenize_lm_dataset
    from hf_kd.losses import LMHeadInputs, lm_kd_loss

    torch.set_num_threads(opts.threads)
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    rows = tokenize_lm_dataset(datasets(opts, tokenizer), tokenizer, max_length=opts.max_length)
    labels = DataCollatorForSeq2Seq(tokenizer)(list(rows.select(range(opts.batch_size))))["labels"][:, 1:]
    generator = torch.Generator().manual_seed(0)
    student, teacher = (3 * torch.randn((*labels.shape, 49152), generator=generator) for _ in range(2))
    hidden_student, hidden_teacher = (torch.randn((*labels.shape, 576), generator=generator) for _ in range(2))
    head_student, head_teacher = (torch.randn(49152, 576, generator=generator) / 24 for _ in range(2))
    options = dict(loss_type="forward_kl", alpha=1.0, temperature=1.0)

    def trl():
        s = student.clone().requires_grad_()
        GKDTrainer.generalized_jsd_loss(s, teacher, labels, beta=0.0).backward()

    def hf_kd():
        s = student.clone().requires_grad_()
        lm_kd_loss(s, teacher, labels, **options).backward()

    def leaves():
        return hidden_student.clone().requires_grad_(), head_student.clone().requires_grad_()

    def heads_then(loss):
        h, w = leaves()
        with torch.no_grad():
            t = F.linear(hidden_teacher, head_teacher)
        loss(F.linear(h, w), t).backward()

    def fused():
        h, w = leaves()
        lm_kd_loss(LMHeadInputs(h, w), LMHeadInputs(hidden_teacher, head_teacher), labels, **options).backward()

    variants = {
        "trl_gkd_loss": trl,
        "hf_kd_lm_kd_loss": hf_kd,
        "trl_heads_and_loss": lambda: heads_then(lambda s, t: GKDTrainer.generalized_jsd_loss(s, t, labels, beta=0.0)),
        "hf_kd_heads_then_lm_kd_loss": lambda: heads_then(lambda s, t: lm_kd_loss(s, t, labels, **options)),
        "hf_kd_fused_heads_lm_kd_loss": fused,
    }
    times = {name: [] for name in variants}
    for _ in range(3 * opts.repeats + 1):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def report(opts, prepared, runs, held_out, loss_profile) -> None:
    import torch

    summary = {config: {**rounds_summary(results), **held_out[f"trained_{config}"]} for config, results in runs.items()}
    ratios = {}
    if "trl_gkd" in summary:
        base = summary["trl_gkd"]
        for config in summary:
            if config != "trl_gkd":
                s = summary[config]
                ratios[config] = {
                    "step_time": s["seconds_per_step"] / base["seconds_per_step"],
                    "peak_rss": s["peak_rss_mb"] / base["peak_rss_mb"],
                    "train_peak_over_start": s["train_peak_over_start_mb"] / base["train_peak_over_start_mb"],
                    "perplexity": s["perplexity"] / base["perplexity"],
                }
    settings = {k: v for k, v in vars(opts).items() if k not in ("worker", "out", "scratch", "name")}
    settings |= {"torch": torch.__version__, "cpu_count": os.cpu_count(), **prepared}
    result = {"settings": settings, "summary": summary, "ratios": ratios, "held_out": held_out,
              "loss_profile_seconds": loss_profile, "runs": runs}
    folder = Path(opts.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{opts.name}.json").write_text(json.dumps(result, indent=2))
    lines = [
        "| trainer | median s/step | student fwd | teacher fwd | loss (rest of compute_loss) | backward + optimiser "
        "| peak RSS (MB) | training adds (MB) | held-out perplexity | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, s in summary.items():
        lines.append(f"{step_cells(config, s)} {s['perplexity']:.2f} | {s['top1_agreement']:.3f} |")
    for name in ("student_init", "teacher"):
        lines.append(f"| ({name}, reference, not trained here) | - | - | - | - | - | - | - | {held_out[name]['perplexity']:.2f} "
                     f"| {held_out[name]['top1_agreement']:.3f} |")
    lines += ["", "| ratio to trl_gkd | step time | peak RSS | training adds | perplexity |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {r['step_time']:.3f} | {r['peak_rss']:.3f} | {r['train_peak_over_start']:.3f} | "
              f"{r['perplexity']:.4f} |" for c, r in ratios.items()]
    lines += ["", "goal: step time <= 0.8, peak memory <= 0.7, perplexity <= 1", "",
              "| loss alone (fwd + bwd, interleaved in one process) | median s |", "|---|---|"]
    lines += [f"| {name} | {seconds:.3f} |" for name, seconds in loss_profile.items()]
    (folder / f"{opts.name}_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    opts = parse_args()
    if opts.worker:
        worker = {"prepare": prepare_worker, "evaluate": evaluate_worker, "loss_profile": loss_profile_worker}.get(
            opts.worker, train_worker
        )
        print(json.dumps(worker(opts)))
        return

    args = forwarded_args(opts, ["steps", "warmup", "batch_size", "max_length", "learning_rate",
                                 "gradient_checkpointing", "student_layers", "top_k", "eval_rows", "threads",
                                 "scratch"])
    args += ["--configs", *opts.configs]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           "OMP_NUM_THREADS": str(opts.threads), "PYTHONPATH": str(ROOT)}
    prepared = launch_worker(__file__, "prepare", args, env)
    print("prepared", prepared, flush=True)
    runs = alternating(opts.configs, opts.repeats, lambda config: launch_worker(__file__, config, args, env),
                       lambda r: f"{r['seconds_per_step']:.2f} s/step  peak {r['peak_rss_mb']:.0f} MB "
                                 f"(+{r['train_peak_over_start_mb']:.0f})  "
                                 f"phases {({k: round(v, 2) for k, v in r['phases_per_step'].items()})}")
    held_out = launch_worker(__file__, "evaluate", args, env)
    loss_profile = launch_worker(__file__, "loss_profile", args + ["--repeats", str(opts.repeats)], env)
    report(opts, prepared, runs, held_out, loss_profile)


if __name__ == "__main__":
    main()
