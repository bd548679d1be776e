"""Cross-tokenizer distillation (issue 19) on CPU: the cost of aligning two tokenizations, and a short run of
google/gemma-3-270m (SentencePiece, 262,144 tokens) distilled into a SmolLM2 student (byte-level BPE, 49,152 tokens).

Part 1, alignment (tokenizers only): for `--align_rows` BBC News training articles ([`hf_kd.lm_data.lm_text_dataset`],
`text` rows, cut to `--align_max_length` student tokens) the seconds per 1,000 rows of

  student_row    hf_kd.lm_data.tokenize_lm_example with the student's tokenizer (the same-tokenizer path's cost)
  cross_row      hf_kd.cross_tokenizer.tokenize_cross_tokenizer_example (both tokenizers with offsets, alignment,
                 spans, EOS pair, truncation): what a cross-tokenizer run adds is cross_row - student_row
  align_only     hf_kd.cross_tokenizer.align_token_spans alone on precomputed offsets

and statistics of the aligned spans (tokens per row on each side, share of spans that merge tokens), plus the size
and build time of the shared vocabulary (hf_kd.cross_tokenizer.shared_vocabulary_map).

Part 2, training (`--steps` optimiser steps of `--batch_size` rows of `--max_length` student tokens, BBC articles as
`text`, alpha=0.5, temperature 1, AdamW lr `--learning_rate`, one process, `--threads` torch threads). The student is
SmolLM2-135M-Instruct with `--student_layers` of its 30 layers kept (hf_kd.student.make_student, every other layer),
rebuilt identically for each configuration:

  ce             transformers.Trainer, the student's own cross-entropy (no teacher)
  same_kd        DistillTrainer, teacher SmolLM2-135M-Instruct (same tokenizer), forward KL (lm_kd_loss)
  uld            DistillTrainer, teacher gemma-3-270m, cross_tokenizer="uld"
  hybrid         DistillTrainer, teacher gemma-3-270m, cross_tokenizer="hybrid" (shared weight 0.5)
  uld_cached     uld with cache_teacher_logits=True, lm_cache_top_k=`--cache_top_k`: one teacher pass over the
  hybrid_cached  training rows before training (timed apart, `cache_pass_seconds`), then steps without the teacher;
                 the cache (a fresh folder under `--scratch`) is reported as file bytes, cached teacher tokens and
                 bytes per cached teacher token. `kd_loss_first_step_vs_live`: the relative difference of the
                 first step's logged kd_loss from the live configuration's (the same student, batch and teacher
                 before any update: only the top-k approximation differs), when that configuration ran too.

Step time: median over the steps after the first. Held-out perplexity: the trained student on the first `--eval_rows`
validation articles (student tokens, cut to 128), exp of the mean next-token NLL. The configurations run one after
the other in this process (not interleaved): on a shared machine compare step times with care. TRL's GOLDTrainer is
not run here.

Run (the defaults are the published run's; writes <out>/<name>.json and <name>.md):

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. python scripts/benchmarks/cross_tokenizer.py

The cache figures (docs/benchmarks/cross_tokenizer_cache.*; `--align_rows 0` skips part 1):

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=. python scripts/benchmarks/cross_tokenizer.py \
        --align_rows 0 --configs uld uld_cached hybrid hybrid_cached --name cross_tokenizer_cache
"""

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import torch
from _common import SMOLLM2, StepTimer

ROOT = Path(__file__).resolve().parents[2]
GEMMA3 = "google/gemma-3-270m"
CONFIGS = ("ce", "same_kd", "uld", "hybrid", "uld_cached", "hybrid_cached")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--align_rows", type=int, default=1000)
    parser.add_argument("--align_max_length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--student_layers", type=int, default=26)
    parser.add_argument("--eval_rows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache_top_k", type=int, default=64, help="lm_cache_top_k of the *_cached configurations")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--name", default="cross_tokenizer")
    parser.add_argument("--scratch", default="/tmp/hf_kd_bench_cross_tokenizer")
    return parser.parse_args()


def per_thousand(seconds: float, rows: int) -> float:
    return round(1000 * seconds / rows, 3)


def alignment_cost(opts, smol, gemma) -> dict:
    from hf_kd.cross_tokenizer import align_token_spans, shared_vocabulary_map, tokenize_cross_tokenizer_example
    from hf_kd.lm_data import lm_text_dataset, tokenize_lm_example

    texts = lm_text_dataset()["train"]["text"][: opts.align_rows]
    start = time.perf_counter()
    for text in texts:
        tokenize_lm_example({"text": text}, smol, opts.align_max_length)
    student_row = time.perf_counter() - start
    start = time.perf_counter()
    rows = [tokenize_cross_tokenizer_example({"text": text}, smol, gemma, opts.align_max_length) for text in texts]
    cross_row = time.perf_counter() - start
    offsets = [(smol(t, return_offsets_mapping=True)["offset_mapping"], gemma(t, return_offsets_mapping=True)[
        "offset_mapping"], len(t)) for t in texts]
    start = time.perf_counter()
    spans = [align_token_spans(s, t, n) for s, t, n in offsets]
    align_only = time.perf_counter() - start
    start = time.perf_counter()
    student_ids, _ = shared_vocabulary_map(smol, gemma)
    shared_seconds = time.perf_counter() - start
    all_spans = [span for row in spans for span in row]
    merged = sum(1 for s in all_spans if (s.student_end - s.student_start, s.teacher_end - s.teacher_start) != (1, 1))
    return {
        "rows": len(texts),
        "seconds_per_1000_rows": {"student_row": per_thousand(student_row, len(texts)),
                                  "cross_row": per_thousand(cross_row, len(texts)),
                                  "align_only_full_articles": per_thousand(align_only, len(texts))},
        "cut_rows": {"student_tokens": statistics.mean(len(r["input_ids"]) for r in rows),
                     "teacher_tokens": statistics.mean(len(r["teacher_input_ids"]) for r in rows),
                     "spans": statistics.mean(len(r["student_span_starts"]) for r in rows)},
        "full_articles": {
            "student_tokens": statistics.mean(len(s) for s, _, _ in offsets),
            "teacher_tokens": statistics.mean(len(t) for _, t, _ in offsets),
            "spans": statistics.mean(len(row) for row in spans),
            "merged_span_share": round(merged / len(all_spans), 4),
        },
        "shared_vocabulary": {"size": len(student_ids), "student_vocab": len(smol), "teacher_vocab": len(gemma),
                              "build_seconds": round(shared_seconds, 2)},
    }


def held_out_perplexity(model, tokenizer, rows: int) -> float:
    from hf_kd.lm_data import lm_text_dataset

    texts = lm_text_dataset()["validation"]["text"][:rows]
    nll, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"][:128]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def train(config: str, opts, smol, gemma, smol_model, gemma_model) -> dict:
    import datasets
    from transformers import Trainer, TrainingArguments

    from hf_kd import DistillConfig, DistillTrainer
    from hf_kd.lm_data import LMDataCollator, lm_text_dataset, tokenize_lm_dataset
    from hf_kd.student import make_student

    texts = lm_text_dataset()["train"]["text"][: opts.steps * opts.batch_size]
    data = datasets.Dataset.from_dict({"text": texts})
    student = make_student(smol_model, opts.student_layers)
    common = dict(
        output_dir=f"{opts.scratch}/{config}", per_device_train_batch_size=opts.batch_size, max_steps=opts.steps,
        learning_rate=opts.learning_rate, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, train_sampling_strategy="sequential", disable_tqdm=True,
    )
    timer = StepTimer()
    if config == "ce":
        trainer = Trainer(model=student, args=TrainingArguments(**common),
                          train_dataset=tokenize_lm_dataset(data, smol, opts.max_length),
                          data_collator=LMDataCollator.for_tokenizer(smol), callbacks=[timer])
    else:
        kd = dict(alpha=0.5, temperature=1.0, lm_max_length=opts.max_length)
        if config == "same_kd":
            args = DistillConfig(**common, **kd)
            trainer = DistillTrainer(model=student, args=args, teacher_model=smol_model, train_dataset=data,
                                     processing_class=smol, callbacks=[timer])
        else:
            cache = {}
            if config.endswith("_cached"):
                folder = Path(opts.scratch) / f"{config}_cache"
                shutil.rmtree(folder, ignore_errors=True)  # a fresh cache: the pass below is timed
                cache = dict(cache_teacher_logits=True, lm_cache_top_k=opts.cache_top_k,
                             teacher_logits_cache_dir=str(folder))
            args = DistillConfig(**common, **kd, **cache, cross_tokenizer=config.removesuffix("_cached"))
            start = time.perf_counter()
            trainer = DistillTrainer(model=student, args=args, teacher_model=gemma_model, train_dataset=data,
                                     processing_class=smol, teacher_processing_class=gemma, callbacks=[timer])
            setup_seconds = time.perf_counter() - start
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    losses = [log["loss"] for log in logs]
    out = {
        "step_seconds_median": round(statistics.median(timer.times[1:]), 3),
        "first_loss": losses[0], "last_loss": losses[-1],
        "first_kd_loss": logs[0].get("kd_loss"),
        "held_out_perplexity": round(held_out_perplexity(student, smol, opts.eval_rows), 3),
    }
    if config.endswith("_cached"):
        (path,) = Path(args.teacher_logits_cache_dir).glob("*.safetensors")
        tokens = trainer._lm_top_k["tokens"]
        out.update({
            "cache_pass_seconds": round(setup_seconds, 2), "teacher_loaded_during_training": False,
            "cache_top_k": opts.cache_top_k, "cache_file_bytes": path.stat().st_size, "cached_teacher_tokens": tokens,
            "bytes_per_cached_teacher_token": round(path.stat().st_size / tokens, 1),
            "formula_bytes_per_teacher_token": 6 * opts.cache_top_k + 16,
            "student_completion_tokens": sum(sum(1 for x in row["labels"][1:] if x != -100)
                                             for row in trainer.train_dataset),
        })
    return out


def markdown(result: dict) -> str:
    lines = []
    align = result.get("alignment")
    if align:
        lines += ["| rows | student row (s / 1,000) | cross-tokenizer row (s / 1,000) | align_token_spans alone, full "
                  "articles (s / 1,000) |", "|---|---|---|---|"]
        per = align["seconds_per_1000_rows"]
        lines += [f"| {align['rows']} | {per['student_row']} | {per['cross_row']} | "
                  f"{per['align_only_full_articles']} |", ""]
    lines += ["| configuration | step (s, median) | first loss | last loss | held-out perplexity |",
              "|---|---|---|---|---|"]
    for name, row in result["training"].items():
        lines.append(f"| {name} | {row['step_seconds_median']} | {row['first_loss']:.4f} | {row['last_loss']:.4f} | "
                     f"{row['held_out_perplexity']} |")
    cached = {name: row for name, row in result["training"].items() if "cache_file_bytes" in row}
    if cached:
        lines += ["", "| configuration | k | cache pass (s) | file bytes | cached teacher tokens | bytes / teacher "
                  "token (6k + 16) | first-step kd_loss vs live |", "|---|---|---|---|---|---|---|"]
        for name, row in cached.items():
            lines.append(
                f"| {name} | {row['cache_top_k']} | {row['cache_pass_seconds']} | {row['cache_file_bytes']} | "
                f"{row['cached_teacher_tokens']} | {row['bytes_per_cached_teacher_token']} "
                f"({row['formula_bytes_per_teacher_token']}) | {row.get('kd_loss_first_step_vs_live', 'n/a')} |"
            )
    return "\n".join(lines) + "\n"


def main():
    opts = parse_args()
    torch.set_num_threads(opts.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd.offline_models import install_offline_models
    from hf_kd.student import make_student

    install_offline_models([SMOLLM2, GEMMA3])
    smol, gemma = AutoTokenizer.from_pretrained(SMOLLM2), AutoTokenizer.from_pretrained(GEMMA3)
    result = {"options": vars(opts), "training": {}}
    if opts.align_rows > 0:
        result["alignment"] = alignment_cost(opts, smol, gemma)
        print(json.dumps(result["alignment"], indent=1), flush=True)
    smol_model = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    gemma_model = AutoModelForCausalLM.from_pretrained(GEMMA3, dtype=torch.float32).eval()
    before = make_student(smol_model, opts.student_layers)
    result["student_before"] = {"held_out_perplexity": round(held_out_perplexity(before, smol, opts.eval_rows), 3)}
    for config in opts.configs:
        result["training"][config] = train(config, opts, smol, gemma, smol_model, gemma_model)
        print(config, result["training"][config], flush=True)
    for config, row in result["training"].items():
        live = result["training"].get(config.removesuffix("_cached"))
        if config.endswith("_cached") and live is not None:
            row["kd_loss_first_step_vs_live"] = round(row["first_kd_loss"] / live["first_kd_loss"] - 1, 5)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{opts.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{opts.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
