"""Cross-tokenizer distillation side by side with TRL 1.16's GOLDTrainer (issue 19): step time, peak memory,
held-out perplexity, in one run (CPU).

Teacher google/gemma-3-270m (SentencePiece, 262,144 tokens), student SmolLM2-135M-Instruct with `--student_layers` of
its 30 layers kept (`hf_kd.student.make_student`, built once and saved, so every trainer starts from the same
weights). Configurations:

  trl_gold         trl.experimental.gold.GOLDTrainer, use_uld_loss=True, use_extended_uld=False,
                   uld_token_merge_strategy="bayesian" (the logit slice shifted so that position k predicts answer
                   token k, as hf_kd's spans read it), lmbda=0 (no on-policy generation: every batch is the
                   dataset's completions), seq_kd=False, uld_distillation_weight=alpha,
                   uld_crossentropy_weight=1 - alpha, student and teacher temperature `--temperature`,
                   uld_skip_student_eos=False / uld_skip_teacher_eos=True (chat rows end with the student's
                   "<|im_end|>\\n" and no EOS; the teacher's appended EOS is dropped). GOLD's span alignment
                   (use_extended_uld=True, its default) refuses Gemma's tokenizer ("supports only ByteLevel BPE
                   tokenizers": the prepare worker records the exact error); use_extended_uld=False is GOLD's
                   documented setting "for SentencePiece or other non-ByteLevel tokenizers": the original ULD
                   paper's pairing of the k-th answer token of each side, cut to the shorter side
  trl_gold_hybrid  the same with uld_use_hybrid_loss=True, beta=0 (forward KL on the matched tokens) and fixed
                   weights uld_hybrid_matched_weight = 0.5 = 1 - uld_hybrid_unmatched_weight
  hf_kd_uld        hf_kd.DistillTrainer, cross_tokenizer="uld", alpha, temperature (live teacher)
  hf_kd_hybrid     hf_kd.DistillTrainer, cross_tokenizer="hybrid", cross_tokenizer_shared_weight=0.5

What still differs between the two (by design of each library, not settable) is listed in
docs/benchmarks/cross_tokenizer_vs_gold.md: GOLD's pairing of positions (without its span alignment), the loss
normalisation, the shared vocabulary of the hybrid, the KL on renormalised vs raw shared probabilities, and when the
teacher's text is tokenised.

GOLDTrainer's train sampler is TRL's `RepeatSampler(shuffle=True)`; it is replaced here by a sequential sampler (a
subclass overriding `_get_train_sampler`, nothing else) so that both trainers see the same rows in the same order.
Data: BBC News articles as chat `messages` of exactly `--max_length` student tokens (`_common.article_messages`, the
rows of lm_vs_trl.py), so nothing is padded or truncated. The prepare worker checks that the batches both trainers'
dataloaders yield have the same student `input_ids`, `attention_mask` and `labels` in the same order, compares the
teacher's tokens (GOLD's `build_teacher_inputs_from_texts` against hf_kd's `teacher_input_ids`) and counts the
aligned spans on each side.

Each trainer runs in its own subprocess (`--threads` torch threads), `--repeats` rounds, the order reversed every
other round (ABCD, DCBA). Step time: median over the steps after `--warmup` (phases: student forward, teacher forward,
the rest of `compute_loss` = the loss plus, for GOLD, the teacher's tokenisation of each batch, and backward +
optimiser), then the median over rounds. Peak memory: the largest RSS during `trainer.train()` and the same minus the
RSS before it (what training adds). Held-out perplexity of the trained students (last round) on the same validation
articles, two ways: `_common.lm_held_out` on `--eval_rows` chat rows like the training rows (completion tokens; its
top-1 agreement is with the full 30-layer SmolLM2-135M-Instruct, the student's parent, as a reference: the Gemma
teacher has another vocabulary), and `cross_tokenizer.held_out_perplexity` (the first 8 validation articles as plain
text, 128 tokens each: the figure of docs/methods/cross_tokenizer.md). First and last logged training loss
(each library's own objective and normalisation: compare the trend, not the values across libraries).
Last, the ULD loss alone (`loss_profile_worker`: hf_kd's span log-probs + `uld_loss` against GOLD's positional
softmax + sort + L1, forward + backward on random logits of the run's shapes; `--worker loss_profile` runs it alone).

Run (writes docs/benchmarks/<--name>.json and <--name>_table.md, discussed in docs/benchmarks/cross_tokenizer_vs_gold.md):

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 PYTHONPATH=. \\
        python scripts/benchmarks/cross_tokenizer_vs_gold.py
"""

import json
import os
import statistics
import time
import traceback
from pathlib import Path

from _common import SMOLLM2, article_messages, forwarded_args, launch_worker, lm_held_out
from cross_tokenizer import GEMMA3, held_out_perplexity
from lm_vs_trl import PhaseTimer, rounds_summary, step_cells, timed_training

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ("trl_gold", "hf_kd_uld", "hf_kd_hybrid", "trl_gold_hybrid")
PAIRS = {"hf_kd_uld": "trl_gold", "hf_kd_hybrid": "trl_gold_hybrid"}
WORKERS = CONFIGS + ("prepare", "evaluate", "loss_profile")


def parse_args():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=96, help="student tokens per row (every row exactly)")
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term (1 - alpha: CE)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--student_layers", type=int, default=26)
    parser.add_argument("--eval_rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--name", default="cross_tokenizer_vs_gold")
    parser.add_argument("--scratch", default="/tmp/hf_kd_bench_cross_tokenizer_vs_gold")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    return parser.parse_args()


def common_args(opts, config: str) -> dict:
    """The TrainingArguments both libraries get (GOLDConfig is an SFTConfig; its defaults are overridden here)."""
    return dict(
        output_dir=str(Path(opts.scratch) / f"run_{config}"), per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=1, max_steps=opts.steps, learning_rate=opts.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=False, train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )


def build_trainer(config: str, opts, student, teacher, student_tokenizer, teacher_tokenizer, train,
                  extended_uld: bool = False):
    """The trainer of `config` on the `messages` rows `train` (both libraries tokenise them themselves);
    `extended_uld`: GOLD's span alignment (refused for this teacher, see the prepare worker)."""
    if config.startswith("trl_gold"):
        from torch.utils.data import SequentialSampler
        from trl.experimental.gold import GOLDConfig, GOLDTrainer

        class SequentialGOLDTrainer(GOLDTrainer):
            """GOLDTrainer with the rows in dataset order (its RepeatSampler shuffles): the only change."""

            def _get_train_sampler(self, dataset=None):
                return SequentialSampler(dataset if dataset is not None else self.train_dataset)

        hybrid = {"uld_use_hybrid_loss": True, "uld_hybrid_matched_weight": 0.5,
                  "uld_hybrid_unmatched_weight": 0.5} if config == "trl_gold_hybrid" else {}
        args = GOLDConfig(
            **common_args(opts, config), max_length=opts.max_length, max_completion_length=opts.max_length // 2,
            lmbda=0.0, beta=0.0, seq_kd=False, temperature=opts.temperature,
            use_uld_loss=True, use_extended_uld=extended_uld, uld_token_merge_strategy="bayesian",
            uld_distillation_weight=opts.alpha, uld_crossentropy_weight=1.0 - opts.alpha,
            uld_student_temperature=opts.temperature, uld_teacher_temperature=opts.temperature,
            uld_skip_student_eos=False, uld_skip_teacher_eos=True, teacher_tokenizer_name_or_path=GEMMA3, **hybrid,
        )
        return SequentialGOLDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                                     processing_class=student_tokenizer)
    from hf_kd import DistillConfig, DistillTrainer

    args = DistillConfig(**common_args(opts, config), alpha=opts.alpha, temperature=opts.temperature,
                         lm_max_length=opts.max_length, cross_tokenizer=config.removeprefix("hf_kd_"),
                         cross_tokenizer_shared_weight=0.5)
    return DistillTrainer(model=student, args=args, teacher_model=teacher, train_dataset=train,
                          processing_class=student_tokenizer, teacher_processing_class=teacher_tokenizer)


def load(opts):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(opts.threads)
    smol, gemma = AutoTokenizer.from_pretrained(SMOLLM2), AutoTokenizer.from_pretrained(GEMMA3)
    teacher = AutoModelForCausalLM.from_pretrained(GEMMA3, dtype=torch.float32).eval()
    train = article_messages(smol, "train", opts.steps * opts.batch_size, opts.max_length)
    return smol, gemma, teacher, train


def train_worker(opts) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    config, scratch = opts.worker, Path(opts.scratch)
    smol, gemma, teacher, train = load(opts)
    student = AutoModelForCausalLM.from_pretrained(scratch / "student_init", dtype=torch.float32)
    phases = PhaseTimer()
    phases.hook(student, "student_forward")
    phases.hook(teacher, "teacher_forward")
    start = time.perf_counter()
    trainer = build_trainer(config, opts, student, teacher, smol, gemma, train)
    init_seconds = time.perf_counter() - start
    measured = timed_training(trainer, phases, opts.warmup)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    trainer.model.save_pretrained(scratch / f"trained_{config}")
    out = {
        "config": config, **measured, "trainer_init_seconds": init_seconds,
        "losses": [log["loss"] for log in logs],
        "kd_losses": [log.get("kd_loss") for log in logs], "ce_losses": [log.get("ce_loss") for log in logs],
    }
    if config.startswith("trl_gold"):  # lmbda=0: every step must have been off-policy (the dataset's completions)
        out["gold_on_policy_steps"] = sum(1 for log in logs if "on_policy_loss" in log)
        out["gold_off_policy_steps"] = sum(1 for log in logs if "off_policy_loss" in log)
        out["gold_matched_losses"] = [log.get("matched_loss") for log in logs]
        out["gold_unmatched_losses"] = [log.get("unmatched_loss") for log in logs]
        out["gold_vocabulary_matches"] = (len(trainer.uld_loss_fn._vocab_mapping)
                                          if trainer.uld_loss_fn._vocab_mapping is not None else None)
    return out


def prepare_worker(opts) -> dict:
    """Save the initial student; check that both trainers' dataloaders yield the same student tensors in the same
    order; compare the teacher's tokens and the aligned spans of the two libraries on those batches."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.experimental.gold.gold_trainer import build_teacher_inputs_from_texts

    from hf_kd.student import make_student

    scratch = Path(opts.scratch)
    smol, gemma, teacher, train = load(opts)
    full = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    torch.manual_seed(0)
    make_student(full, opts.student_layers).save_pretrained(scratch / "student_init")
    init = AutoModelForCausalLM.from_pretrained(scratch / "student_init", dtype=torch.float32)
    batches = {}
    for config in ("trl_gold", "hf_kd_uld"):
        trainer = build_trainer(config, opts, init, teacher, smol, gemma, train)
        batches[config] = list(trainer.get_train_dataloader())
    gold, ours = batches["trl_gold"], batches["hf_kd_uld"]
    if len(gold) < opts.steps or len(ours) < opts.steps:
        raise RuntimeError(f"dataloaders give {len(gold)} (GOLD) and {len(ours)} (hf_kd) batches, {opts.steps} needed")
    for step, (g, h) in enumerate(zip(gold, ours)):
        for key in ("input_ids", "attention_mask", "labels"):
            if not torch.equal(g[key], h[key]):
                raise RuntimeError(f"step {step}: hf_kd's and GOLD's student {key} differ: not the same tokens")
    teacher_rows_equal, gold_spans, hf_kd_spans, rows, gold_pairs_same_text = 0, 0, 0, 0, 0
    gold_teacher_tokens, hf_kd_teacher_tokens = 0, 0
    for g, h in zip(gold, ours):
        t_ids, t_labels, t_mask, _ = build_teacher_inputs_from_texts(
            gemma, g["original_prompt_text"], g["original_completion_text"], use_extended_uld=False)
        for row in range(len(t_ids)):
            rows += 1
            g_row = t_ids[row][t_mask[row]].tolist()[:-1]  # GOLD's row without its appended EOS (skipped in the loss)
            h_row = h["teacher_input_ids"][row][h["teacher_attention_mask"][row].bool()].tolist()
            teacher_rows_equal += g_row == h_row
            gold_teacher_tokens += len(g_row)
            hf_kd_teacher_tokens += len(h_row)
            hf_kd_spans += int((h["student_span_starts"][row] >= 0).sum())
            s_answer = g["labels"][row] != -100
            t_answer = t_labels[row] != -100
            # use_extended_uld=False: GOLD pairs the answer positions one to one, as many as the shorter side has
            # (uld_skip_teacher_eos drops the teacher's appended EOS)
            pairs = min(int(s_answer.sum()), int(t_answer.sum()) - 1)
            gold_spans += pairs
            # which of those pairs cover the same characters: a one-token span on both sides in hf_kd's alignment
            s0, t0 = int(s_answer.nonzero()[0, 0]), int(t_answer.nonzero()[0, 0])
            one_to_one = {(int(a) - s0, int(b) - t0) for a, b, c, d in zip(*(h[k][row] for k in (
                "student_span_starts", "teacher_span_starts", "student_span_ends", "teacher_span_ends")))
                if a >= 0 and c - a == 1 and d - b == 1}
            gold_pairs_same_text += sum(1 for k in range(pairs) if (k, k) in one_to_one)
    # GOLD's span alignment (use_extended_uld=True, its default): one training step, the error recorded
    student = AutoModelForCausalLM.from_pretrained(scratch / "student_init", dtype=torch.float32)
    trainer = build_trainer("trl_gold", opts, student, teacher, smol, gemma, train, extended_uld=True)
    trainer.args.max_steps = 1
    try:
        trainer.train()
        extended_uld_error = None
    except Exception as error:  # noqa: BLE001 - recorded as a result
        where = traceback.extract_tb(error.__traceback__)[-1]
        extended_uld_error = f"{type(error).__name__}: {error} (raised in {Path(where.filename).name}:{where.lineno})"
    labels = torch.cat([b["labels"][:, 1:] for b in ours])
    return {
        "gold_extended_uld_error": extended_uld_error,
        "train_rows": len(train), "same_student_batches": True,
        "completion_tokens_per_step": int((labels != -100).sum()) / opts.steps,
        "teacher_rows_equal": f"{teacher_rows_equal}/{rows}",
        "teacher_tokens_per_row": {"trl_gold": gold_teacher_tokens / rows, "hf_kd": hf_kd_teacher_tokens / rows},
        "aligned_spans_per_row": {"trl_gold": gold_spans / rows, "hf_kd": hf_kd_spans / rows},
        "gold_pairs_covering_the_same_text": gold_pairs_same_text / gold_spans,
    }


def evaluate_worker(opts) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd.lm_data import tokenize_lm_dataset

    torch.set_num_threads(opts.threads)
    scratch = Path(opts.scratch)
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    held_out = tokenize_lm_dataset(article_messages(tokenizer, "validation", opts.eval_rows, opts.max_length),
                                   tokenizer, max_length=opts.max_length)
    names = ["student_init"] + [f"trained_{c}" for c in opts.configs if (scratch / f"trained_{c}").exists()]
    models = {name: AutoModelForCausalLM.from_pretrained(scratch / name, dtype=torch.float32).eval()
              for name in names}
    reference = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    result = lm_held_out({**models, "smollm2_135m_full": reference}, reference, held_out, opts.batch_size)
    for name, model in models.items():
        result[name]["text_perplexity"] = held_out_perplexity(model, tokenizer, 8)
    return result


def loss_profile_worker(opts) -> dict:
    """The ULD loss alone, forward + backward, on random float32 logits of the benchmark's shapes (`--batch_size`
    rows of `--max_length` student and 122 teacher positions, the last 47 of each scored, one token per span: the
    measured run's averages), interleaved, median of 5: hf_kd's `span_log_probs` (both sides, over the whole rows) +
    `uld_loss`; the teacher's `span_log_probs` alone over the whole row and over the row cut to the positions the spans
    read; `uld_loss` alone (from the span log-probs); GOLD's positional ULD (per row: softmax of the answer slices,
    sort, zero-pad, L1, as `ULDLoss._compute_distillation_loss` with `use_extended_uld=False`)."""
    import torch
    import torch.nn.functional as F

    from hf_kd.losses import span_log_probs, uld_loss

    torch.set_num_threads(opts.threads)
    generator = torch.Generator().manual_seed(0)
    rows, s_len, t_len, spans, s_vocab, t_vocab = opts.batch_size, opts.max_length, 122, 47, 49152, 262144
    student = 3 * torch.randn(rows, s_len, s_vocab, generator=generator)
    teacher = 3 * torch.randn(rows, t_len, t_vocab, generator=generator)
    s_ids = torch.randint(0, s_vocab, (rows, s_len), generator=generator)
    t_ids = torch.randint(0, t_vocab, (rows, t_len), generator=generator)
    s_starts = torch.arange(s_len - spans, s_len).expand(rows, spans).contiguous()
    t_starts = torch.arange(t_len - spans, t_len).expand(rows, spans).contiguous()
    cut = t_len - spans - 1

    def hf_kd():
        x = student.clone().requires_grad_()
        s = span_log_probs(x, s_ids, s_starts, s_starts + 1)
        uld_loss(s, span_log_probs(teacher, t_ids, t_starts, t_starts + 1), reduction="sum").backward()

    teacher_spans = span_log_probs(teacher, t_ids, t_starts, t_starts + 1)

    def uld_alone():
        x = student.clone().requires_grad_()
        s = span_log_probs(x, s_ids, s_starts, s_starts + 1).detach().requires_grad_()
        uld_loss(s, teacher_spans, reduction="sum").backward()

    def gold():
        x, losses = student.clone().requires_grad_(), []
        for row in range(rows):
            p_s = F.softmax(x[row, s_len - spans - 1 : s_len - 1], -1)
            p_t = F.softmax(teacher[row, cut : t_len - 1], -1)
            p_s = F.pad(p_s.sort(-1, descending=True).values, (0, t_vocab - s_vocab))
            losses.append(F.l1_loss(p_s, p_t.sort(-1, descending=True).values, reduction="sum") / spans)
        torch.stack(losses).mean().backward()

    variants = {
        "hf_kd_span_log_probs_and_uld_loss": hf_kd,
        "hf_kd_teacher_span_log_probs_whole_row": lambda: span_log_probs(teacher, t_ids, t_starts, t_starts + 1),
        "hf_kd_teacher_span_log_probs_cut_row": lambda: span_log_probs(teacher[:, cut:], t_ids[:, cut:],
                                                                       t_starts - cut, t_starts + 1 - cut),
        "hf_kd_uld_loss_alone": uld_alone,
        "trl_gold_positional_uld": gold,
    }
    times = {name: [] for name in variants}
    for _ in range(6):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def report(opts, prepared, runs, failures, held_out, loss_profile) -> None:
    import torch
    import transformers
    import trl

    summary = {}
    for config, results in runs.items():
        if not results:
            continue
        summary[config] = {
            **rounds_summary(results),
            "trainer_init_seconds": statistics.median(r["trainer_init_seconds"] for r in results),
            "first_loss": results[-1]["losses"][0], "last_loss": results[-1]["losses"][-1],
            **held_out.get(f"trained_{config}", {}),
        }
    ratios = {}
    for ours, theirs in PAIRS.items():
        if ours in summary and theirs in summary:
            a, b = summary[ours], summary[theirs]
            ratios[f"{ours} / {theirs}"] = {
                "step_time": a["seconds_per_step"] / b["seconds_per_step"],
                "peak_rss": a["peak_rss_mb"] / b["peak_rss_mb"],
                "train_peak_over_start": a["train_peak_over_start_mb"] / b["train_peak_over_start_mb"],
                "perplexity": a["perplexity"] / b["perplexity"],
                "text_perplexity": a["text_perplexity"] / b["text_perplexity"],
            }
    settings = {k: v for k, v in vars(opts).items() if k not in ("worker", "out", "scratch", "name")}
    settings |= {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                 "cpu_count": os.cpu_count(), **prepared}
    result = {"settings": settings, "summary": summary, "ratios": ratios, "held_out": held_out,
              "loss_profile_seconds": loss_profile, "runs": runs, "failures": failures}
    folder = Path(opts.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{opts.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| trainer | median s/step | student fwd | teacher fwd | loss (rest of compute_loss) | backward + optimiser "
        "| peak RSS (MB) | training adds (MB) | first loss | last loss | held-out ppl (chat) | held-out ppl (text) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, s in summary.items():
        lines.append(
            f"{step_cells(config, s)} {s['first_loss']:.4f} | {s['last_loss']:.4f} | "
            f"{s.get('perplexity', float('nan')):.2f} | {s.get('text_perplexity', float('nan')):.2f} |"
        )
    init = held_out.get("student_init", {})
    lines.append(f"| (student before training) | - | - | - | - | - | - | - | - | - | "
                 f"{init.get('perplexity', float('nan')):.2f} | {init.get('text_perplexity', float('nan')):.2f} |")
    lines += ["", "| ratio | step time | peak RSS | training adds | held-out ppl (chat) | held-out ppl (text) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {c} | {r['step_time']:.3f} | {r['peak_rss']:.3f} | {r['train_peak_over_start']:.3f} | "
              f"{r['perplexity']:.4f} | {r['text_perplexity']:.4f} |" for c, r in ratios.items()]
    lines += ["", "| the ULD loss alone (fwd + bwd, random logits, interleaved) | median s |", "|---|---|"]
    lines += [f"| {name} | {seconds:.3f} |" for name, seconds in loss_profile.items()]
    for config, error in failures.items():
        lines += ["", f"{config} failed: {error.strip().splitlines()[-1]}"]
    (folder / f"{opts.name}_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    opts = parse_args()
    if opts.worker:
        worker = {"prepare": prepare_worker, "evaluate": evaluate_worker, "loss_profile": loss_profile_worker}.get(
            opts.worker, train_worker)
        print(json.dumps(worker(opts)))
        return

    args = forwarded_args(opts, ["steps", "warmup", "batch_size", "max_length", "learning_rate", "alpha",
                                 "temperature", "student_layers", "eval_rows", "threads", "scratch"])
    args += ["--configs", *opts.configs]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           "OMP_NUM_THREADS": str(opts.threads), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    prepared = launch_worker(__file__, "prepare", args, env)
    print("prepared", prepared, f"({time.perf_counter() - start:.0f} s)", flush=True)
    runs, failures = {config: [] for config in opts.configs}, {}
    for repeat in range(opts.repeats):
        order = opts.configs if repeat % 2 == 0 else opts.configs[::-1]
        for config in order:
            if config in failures:
                continue
            try:
                result = launch_worker(__file__, config, args, env)
            except RuntimeError:  # recorded, and the other configurations still run
                failures[config] = traceback.format_exc()
                print(failures[config], flush=True)
                continue
            runs[config].append(result)
            print(f"repeat {repeat} {config:<15} {result['seconds_per_step']:.2f} s/step  peak "
                  f"{result['peak_rss_mb']:.0f} MB (+{result['train_peak_over_start_mb']:.0f})  losses "
                  f"{result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    held_out = launch_worker(__file__, "evaluate", args, env)
    loss_profile = launch_worker(__file__, "loss_profile", args, env)
    report(opts, prepared, runs, failures, held_out, loss_profile)


if __name__ == "__main__":
    main()
