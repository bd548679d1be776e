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

Seed study (several `--seeds` and/or `--student_layers`; docs/benchmarks/cross_tokenizer_seeds.md). For each seed s
and student size: the training rows are `steps * batch_size` rows drawn by a `random.Random(s)` permutation of the
first `--pool` eligible training articles (the same rows and order for every trainer of that seed), TrainingArguments
`seed=s`; the initial student depends on the size only (`--student_layers 30`: the full SmolLM2-135M-Instruct, no
layer dropped). One more configuration, for the study:

  hf_kd_ce         the student's cross-entropy on the completion alone: transformers.Trainer on hf_kd's rows
                   (tokenize_lm_dataset, LMDataCollator; the prepare worker checks its batches equal GOLD's), the
                   loss DistillTrainer computes with alpha=0 but without the teacher's forward (and without the
                   teacher in memory), which DistillConfig cannot switch off

The evaluate worker also reports the top-1 agreement with the Gemma teacher across the two vocabularies
(`teacher_agreement`: on the held-out chat rows, over the aligned spans that are one token on each side, the share
where both top-1 next tokens stand for the same bytes). The study writes, after every (seed, size) cell, the mean ±
sample std over the seeds done of the held-out figures per size and configuration, and every run's figures, median
step time and peak RSS; no loss profile. Without `--pool` (the default) the rows are the first ones in order, as in
the single-seed run, which only accepts one seed.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 PYTHONPATH=. \\
        python scripts/benchmarks/cross_tokenizer_vs_gold.py --student_layers 26 30 --seeds 0 1 2 --pool 48 \\
        --steps 6 --repeats 1 --configs hf_kd_ce hf_kd_uld hf_kd_hybrid trl_gold trl_gold_hybrid \\
        --name cross_tokenizer_seeds --scratch /tmp/hf_kd_bench_cross_tokenizer_seeds
"""

import json
import os
import random
import shutil
import statistics
import time
import traceback
from pathlib import Path

from _common import SMOLLM2, alternating, article_messages, forwarded_args, launch_worker, lm_held_out
from cross_tokenizer import GEMMA3, held_out_perplexity
from lm_vs_trl import PhaseTimer, rounds_summary, step_cells, timed_training

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ("trl_gold", "hf_kd_uld", "hf_kd_hybrid", "trl_gold_hybrid")
EXTRA_CONFIGS = ("hf_kd_ce",)  # not in the default (single-seed, published) run
PAIRS = {"hf_kd_uld": "trl_gold", "hf_kd_hybrid": "trl_gold_hybrid"}
WORKERS = CONFIGS + EXTRA_CONFIGS + ("prepare", "evaluate", "loss_profile")
# the held-out figures of the seed study: (key in the evaluate worker's result, column heading)
METRICS = (("perplexity", "held-out ppl (chat)"), ("text_perplexity", "held-out ppl (text)"),
           ("teacher_top1_agreement", "top-1 = Gemma teacher (1:1 spans)"),
           ("top1_agreement", "top-1 = SmolLM2-135M"))


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
    parser.add_argument("--student_layers", type=int, nargs="+", default=[26],
                        help="layers of SmolLM2-135M-Instruct's 30 kept (30: the full model); several: one study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="TrainingArguments seed and, with --pool, the seeded choice of training rows")
    parser.add_argument("--pool", type=int, default=0,
                        help="draw each seed's steps * batch_size training rows from the first POOL eligible "
                             "articles (random.Random(seed) permutation); 0: the first rows in order (one seed only)")
    parser.add_argument("--eval_rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS + EXTRA_CONFIGS)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--name", default="cross_tokenizer_vs_gold")
    parser.add_argument("--scratch", default="/tmp/hf_kd_bench_cross_tokenizer_vs_gold")
    parser.add_argument("--resume", action="store_true",
                        help="seed study: keep the (seed, size) cells already in <--out>/<--name>.json, run the rest")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if len(opts.seeds) > 1 and not opts.pool:
        parser.error("several --seeds need --pool (without it every seed trains on the same rows in the same order)")
    return opts


def common_args(opts, config: str) -> dict:
    """The TrainingArguments both libraries get (GOLDConfig is an SFTConfig; its defaults are overridden here)."""
    return dict(
        output_dir=str(Path(opts.scratch) / f"run_{config}"), per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=1, max_steps=opts.steps, learning_rate=opts.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=False, train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=opts.seeds[0], dataloader_num_workers=0,
        disable_tqdm=True,
    )


def build_trainer(config: str, opts, student, teacher, student_tokenizer, teacher_tokenizer, train,
                  extended_uld: bool = False):
    """The trainer of `config` on the `messages` rows `train` (both libraries tokenise them themselves);
    `extended_uld`: GOLD's span alignment (refused for this teacher, see the prepare worker). `hf_kd_ce` is the
    student's cross-entropy on the completion alone: a plain `transformers.Trainer` on hf_kd's rows
    (`tokenize_lm_dataset`, `LMDataCollator`), the loss DistillTrainer computes with alpha=0, without the teacher's
    forward that DistillTrainer would still run (DistillConfig has no teacher-free setting); `teacher` is unused."""
    if config == "hf_kd_ce":
        from transformers import Trainer, TrainingArguments

        from hf_kd.lm_data import LMDataCollator, tokenize_lm_dataset

        return Trainer(model=student, args=TrainingArguments(**common_args(opts, config)),
                       train_dataset=tokenize_lm_dataset(train, student_tokenizer, max_length=opts.max_length),
                       data_collator=LMDataCollator.for_tokenizer(student_tokenizer))
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


def train_rows(tokenizer, opts):
    """The `messages` rows of one seed, in training order: without `--pool` the first `steps * batch_size`
    eligible training articles in order (the published single-seed run); with it, that many drawn by a
    `random.Random(seed)` permutation of the first `--pool` eligible articles, so every trainer of one seed sees the
    same rows in the same order and the seeds differ in which rows and in their order."""
    rows = opts.steps * opts.batch_size
    if not opts.pool:
        return article_messages(tokenizer, "train", rows, opts.max_length)
    if opts.pool < rows:
        raise ValueError(f"--pool {opts.pool} is smaller than the {rows} rows a run needs")
    order = list(range(opts.pool))
    random.Random(opts.seeds[0]).shuffle(order)
    return article_messages(tokenizer, "train", opts.pool, opts.max_length).select(order[:rows])


def load(opts, with_teacher: bool = True):
    """Both tokenizers, the Gemma teacher (None without `with_teacher`: the CE-only run does not load it, so its
    peak RSS is the student's alone) and this seed's training rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(opts.threads)
    smol, gemma = AutoTokenizer.from_pretrained(SMOLLM2), AutoTokenizer.from_pretrained(GEMMA3)
    teacher = AutoModelForCausalLM.from_pretrained(GEMMA3, dtype=torch.float32).eval() if with_teacher else None
    return smol, gemma, teacher, train_rows(smol, opts)


def train_worker(opts) -> dict:
    """Train the student of `--worker` (a configuration) from the saved initial student, timed; save it."""
    import torch
    from transformers import AutoModelForCausalLM

    config, scratch = opts.worker, Path(opts.scratch)
    smol, gemma, teacher, train = load(opts, with_teacher=config != "hf_kd_ce")
    student = AutoModelForCausalLM.from_pretrained(scratch / "student_init", dtype=torch.float32)
    phases = PhaseTimer()
    phases.hook(student, "student_forward")
    if teacher is not None:
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
    layers = opts.student_layers[0]
    # all 30 layers: the full model itself (make_student would copy every layer; nothing to drop)
    student = full if layers == full.config.num_hidden_layers else make_student(full, layers)
    student.save_pretrained(scratch / "student_init")
    init = AutoModelForCausalLM.from_pretrained(scratch / "student_init", dtype=torch.float32)
    checked = ["trl_gold", "hf_kd_uld"] + (["hf_kd_ce"] if "hf_kd_ce" in opts.configs else [])
    batches = {config: list(build_trainer(config, opts, init, teacher, smol, gemma, train).get_train_dataloader())
               for config in checked}
    gold, ours = batches["trl_gold"], batches["hf_kd_uld"]
    for config, yielded in batches.items():
        if len(yielded) < opts.steps:
            raise RuntimeError(f"{config}'s dataloader gives {len(yielded)} batches, {opts.steps} needed")
    for config in checked[1:]:
        for step, (g, h) in enumerate(zip(gold, batches[config])):
            for key in ("input_ids", "attention_mask", "labels"):
                if not torch.equal(g[key], h[key]):
                    raise RuntimeError(f"step {step}: {config}'s and GOLD's student {key} differ: not the same tokens")
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
        "train_rows": len(train), "same_student_batches": True, "same_batches_checked": checked,
        "first_train_headlines": [row[0]["content"].split("headline: ", 1)[-1][:60] for row in train["messages"][:3]],
        "completion_tokens_per_step": int((labels != -100).sum()) / opts.steps,
        "teacher_rows_equal": f"{teacher_rows_equal}/{rows}",
        "teacher_tokens_per_row": {"trl_gold": gold_teacher_tokens / rows, "hf_kd": hf_kd_teacher_tokens / rows},
        "aligned_spans_per_row": {"trl_gold": gold_spans / rows, "hf_kd": hf_kd_spans / rows},
        "gold_pairs_covering_the_same_text": gold_pairs_same_text / gold_spans,
    }


def teacher_agreement(models: dict, teacher, student_tokenizer, teacher_tokenizer, messages, max_length: int) -> dict:
    """Top-1 agreement of each model of `models` with the Gemma `teacher` across the two vocabularies, on the
    completions of the `messages` rows: over the aligned spans that are one student token and one teacher token
    (`hf_kd.cross_tokenizer`'s alignment, the spans the cross-tokenizer losses read), the fraction where the
    student's most likely next token (at the position before the span) and the teacher's stand for the same bytes
    (`token_bytes`: `Ġthe` and `▁the` are both b" the"). A special token (no bytes) on either side counts as a
    disagreement. Longer spans are left out: their next-token predictions are of different text pieces."""
    import torch

    from hf_kd.cross_tokenizer import token_bytes, tokenize_cross_tokenizer_dataset

    rows = tokenize_cross_tokenizer_dataset(messages, student_tokenizer, teacher_tokenizer, max_length=max_length)
    student_bytes, teacher_bytes = token_bytes(student_tokenizer), token_bytes(teacher_tokenizer)
    same, spans = dict.fromkeys(models, 0), 0
    with torch.no_grad():
        for row in rows:
            pairs = [(s - 1, t - 1) for s, s_end, t, t_end in zip(*(row[k] for k in (
                "student_span_starts", "student_span_ends", "teacher_span_starts", "teacher_span_ends")))
                if s_end - s == 1 and t_end - t == 1]  # position p predicts token p + 1
            student_at, teacher_at = (torch.tensor(side) for side in zip(*pairs))
            top = teacher(input_ids=torch.tensor([row["teacher_input_ids"]])).logits[0, teacher_at].argmax(-1)
            wanted = [teacher_bytes.get(int(i)) for i in top]
            spans += len(pairs)
            for name, model in models.items():
                top = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, student_at].argmax(-1)
                same[name] += sum(w is not None and student_bytes.get(int(i)) == w for i, w in zip(top, wanted))
    return {name: {"teacher_top1_agreement": count / spans, "one_to_one_spans": spans} for name, count in same.items()}


def evaluate_worker(opts) -> dict:
    """Held-out figures of the initial and every trained student (and of the full SmolLM2-135M-Instruct as a
    reference): chat perplexity and top-1 agreement with the full SmolLM2 (`lm_held_out`), plain-text perplexity
    (`held_out_perplexity`), top-1 agreement with the Gemma teacher (`teacher_agreement`), on the same
    `--eval_rows` validation chat rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd.lm_data import tokenize_lm_dataset

    torch.set_num_threads(opts.threads)
    scratch = Path(opts.scratch)
    tokenizer, gemma = AutoTokenizer.from_pretrained(SMOLLM2), AutoTokenizer.from_pretrained(GEMMA3)
    messages = article_messages(tokenizer, "validation", opts.eval_rows, opts.max_length)
    held_out = tokenize_lm_dataset(messages, tokenizer, max_length=opts.max_length)
    names = ["student_init"] + [f"trained_{c}" for c in opts.configs if (scratch / f"trained_{c}").exists()]
    models = {name: AutoModelForCausalLM.from_pretrained(scratch / name, dtype=torch.float32).eval()
              for name in names}
    reference = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    result = lm_held_out({**models, "smollm2_135m_full": reference}, reference, held_out, opts.batch_size)
    for name, model in models.items():
        result[name]["text_perplexity"] = held_out_perplexity(model, tokenizer, 8)
    teacher = AutoModelForCausalLM.from_pretrained(GEMMA3, dtype=torch.float32).eval()
    agreement = teacher_agreement({**models, "smollm2_135m_full": reference}, teacher, tokenizer, gemma, messages,
                                  opts.max_length)
    return {name: {**figures, **agreement[name]} for name, figures in result.items()}


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


def run_cell(opts, layers: int, seed: int, scratch: Path, env: dict, start: float) -> dict:
    """One student size and seed: the prepare worker, `--repeats` rounds of every configuration (each in its own
    subprocess, the order reversed every other round), then the evaluate worker. Returns `prepared`, `runs` (per
    configuration, a list of rounds), `failures` (configuration -> traceback) and `held_out`."""
    args = forwarded_args(opts, ["steps", "warmup", "batch_size", "max_length", "learning_rate", "alpha",
                                 "temperature", "eval_rows", "threads", "pool"])
    args += ["--student_layers", str(layers), "--seeds", str(seed), "--scratch", str(scratch),
             "--configs", *opts.configs]
    tag = f"layers {layers} seed {seed}"
    prepared = launch_worker(__file__, "prepare", args, env)
    print(tag, "prepared", prepared, f"({time.perf_counter() - start:.0f} s)", flush=True)
    failures = {}

    def run(config):
        if config in failures:
            return None
        try:
            return launch_worker(__file__, config, args, env)
        except RuntimeError:  # recorded, and the other configurations still run
            failures[config] = traceback.format_exc()
            print(failures[config], flush=True)
            return None

    runs = alternating(opts.configs, opts.repeats, run, lambda r: (
        f"{tag}: {r['seconds_per_step']:.2f} s/step  peak {r['peak_rss_mb']:.0f} MB "
        f"(+{r['train_peak_over_start_mb']:.0f})  losses {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}  "
        f"({time.perf_counter() - start:.0f} s)"))
    held_out = launch_worker(__file__, "evaluate", args, env)
    print(tag, "held out", json.dumps(held_out), f"({time.perf_counter() - start:.0f} s)", flush=True)
    return {"prepared": prepared, "runs": runs, "failures": failures, "held_out": held_out}


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and the values themselves."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def study_report(opts, cells: dict, seconds: float) -> None:
    """The seed study's `<--name>.json` and `<--name>_table.md`: per student size and configuration, mean ± sample
    std over the seeds of the held-out figures (`METRICS`), with every seed's figures, median step time, peak RSS
    and first/last logged loss per run; the student before training (the same for every seed: the same weights and
    held-out rows); the full SmolLM2-135M-Instruct as a reference. Written after every (seed, size) cell from the
    cells done so far, so an interrupted study leaves its finished seeds, marked as partial."""
    import torch
    import transformers
    import trl

    summary, per_seed = {}, []
    for layers in opts.student_layers:
        by_config = {}
        for config in ["student_init", *opts.configs]:
            seeds = [(seed, cells[(layers, seed)]) for seed in opts.seeds if (layers, seed) in cells]
            if not seeds:
                break
            key = config if config == "student_init" else f"trained_{config}"
            done = [(seed, cell) for seed, cell in seeds if key in cell["held_out"]]
            if not done:
                continue
            entry = {name: spread([cell["held_out"][key][name] for _, cell in done]) for name, _ in METRICS}
            entry["seeds"] = [seed for seed, _ in done]
            if config != "student_init":
                rounds = [cell["runs"][config] for _, cell in done]
                entry["seconds_per_step"] = spread([rounds_summary(r)["seconds_per_step"] for r in rounds])
                entry["peak_rss_mb"] = [rounds_summary(r)["peak_rss_mb"] for r in rounds]
                entry["train_peak_over_start_mb"] = [rounds_summary(r)["train_peak_over_start_mb"] for r in rounds]
                entry["first_loss"] = [r[-1]["losses"][0] for r in rounds]
                entry["last_loss"] = spread([r[-1]["losses"][-1] for r in rounds])
            by_config[config] = entry
            for index, (seed, cell) in enumerate(done):
                per_seed.append((layers, config, seed, cell["held_out"][key], entry, index))
        if by_config:
            reference = next(cell for (size, _), cell in cells.items() if size == layers)
            summary[str(layers)] = {"configs": by_config, "smollm2_135m_full": reference["held_out"]["smollm2_135m_full"]}
    settings = {k: v for k, v in vars(opts).items() if k not in ("worker", "out", "scratch", "name")}
    settings |= {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                 "cpu_count": os.cpu_count(), "total_seconds": seconds,
                 "complete": len(cells) == len(opts.seeds) * len(opts.student_layers)}
    failures = {f"{layers}/{seed}/{config}": error for (layers, seed), cell in cells.items()
                for config, error in cell["failures"].items()}
    result = {"settings": settings, "summary": summary, "failures": failures,
              "cells": {f"layers{layers}_seed{seed}": cell for (layers, seed), cell in cells.items()}}
    folder = Path(opts.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{opts.name}.json").write_text(json.dumps(result, indent=2) + "\n")

    def mean_std(figure: dict, digits: int) -> str:
        return f"{figure['mean']:.{digits}f} ± {figure['std']:.{digits}f}"

    digits = {"perplexity": 2, "text_perplexity": 2, "teacher_top1_agreement": 3, "top1_agreement": 3}
    done = ", ".join(f"{layers} layers seed {seed}" for layers, seed in cells)
    status = "" if settings["complete"] else f"PARTIAL: only {done} finished. "
    lines = [f"{status}Mean ± sample std over seeds {', '.join(map(str, sorted({seed for _, seed in cells})))}.", "",
             "| student layers | configuration | " + " | ".join(h for _, h in METRICS)
             + " | last loss | median s/step | peak RSS (MB) |", "|---" * (len(METRICS) + 5) + "|"]
    for layers, s in summary.items():
        for config, entry in s["configs"].items():
            figures = " | ".join(mean_std(entry[name], digits[name]) for name, _ in METRICS)
            if config == "student_init":
                lines.append(f"| {layers} | (before training) | {figures} | - | - | - |")
                continue
            lines.append(f"| {layers} | {config} | {figures} | {mean_std(entry['last_loss'], 4)} | "
                         f"{mean_std(entry['seconds_per_step'], 2)} | {max(entry['peak_rss_mb']):.0f} |")
        ref = s["smollm2_135m_full"]
        lines.append(f"| (reference) | full SmolLM2-135M, untrained | {ref['perplexity']:.2f} | - | "
                     f"{ref['teacher_top1_agreement']:.3f} | {ref['top1_agreement']:.3f} | - | - | - |")
    lines += ["", "Every seed:", "", "| student layers | configuration | seed | " + " | ".join(h for _, h in METRICS)
              + " | first loss | last loss | median s/step | peak RSS (MB) |", "|---" * (len(METRICS) + 7) + "|"]
    for layers, config, seed, figures, entry, index in per_seed:
        values = " | ".join(f"{figures[name]:.{digits[name]}f}" for name, _ in METRICS)
        run = ("| - | - | - | - |" if config == "student_init" else
               f"| {entry['first_loss'][index]:.4f} | {entry['last_loss']['per_seed'][index]:.4f} | "
               f"{entry['seconds_per_step']['per_seed'][index]:.2f} | {entry['peak_rss_mb'][index]:.0f} |")
        lines.append(f"| {layers} | {config} | {seed} | {values} {run}")
    for key, error in failures.items():
        lines += ["", f"{key} failed: {error.strip().splitlines()[-1]}"]
    (folder / f"{opts.name}_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    opts = parse_args()
    if opts.worker:
        worker = {"prepare": prepare_worker, "evaluate": evaluate_worker, "loss_profile": loss_profile_worker}.get(
            opts.worker, train_worker)
        print(json.dumps(worker(opts)))
        return

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           "OMP_NUM_THREADS": str(opts.threads), "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    study = len(opts.student_layers) > 1 or len(opts.seeds) > 1
    if not study:  # the single-seed side by side: its own table, and the ULD loss profile
        layers, seed = opts.student_layers[0], opts.seeds[0]
        cell = run_cell(opts, layers, seed, Path(opts.scratch), env, start)
        args = forwarded_args(opts, ["batch_size", "max_length", "threads"])
        loss_profile = launch_worker(__file__, "loss_profile", args, env)
        report(opts, cell["prepared"], cell["runs"], cell["failures"], cell["held_out"], loss_profile)
        return
    cells = {}
    if opts.resume:  # the cells of an interrupted study, as study_report wrote them ("layers26_seed0": cell)
        saved = json.loads((Path(opts.out) / f"{opts.name}.json").read_text())["cells"]
        cells = {tuple(int(part) for part in key.removeprefix("layers").split("_seed")): cell
                 for key, cell in saved.items()}
    for seed in opts.seeds:  # seeds outermost: a study cut short still has whole seeds of every student size
        for layers in opts.student_layers:
            if (layers, seed) in cells:
                continue
            scratch = Path(opts.scratch) / f"layers{layers}_seed{seed}"
            cells[(layers, seed)] = run_cell(opts, layers, seed, scratch, env, start)
            shutil.rmtree(scratch, ignore_errors=True)  # six students of 0.5 GB a cell: keep only the figures
            study_report(opts, cells, time.perf_counter() - start)


if __name__ == "__main__":
    main()
