"""The causal-LM distillation recipe of `trainers/distill_lm.py` as functions, shared with `trainers/demo_llm.py` and
`scripts/studies/lm_kd_vs_sft.py`.

A recipe distils a causal-LM teacher (`DistillConfig.teacher_model_name_or_path`) into a student on the real corpora
of [`hf_kd.lm_data`] and writes its held-out metrics next to the saved student:

- the student is `model_name_or_path` itself, or, with `student_layers`, a layer-dropped copy of it
  ([`hf_kd.student.make_student`], rule `student_rule`: `every_other` as DistilBERT, or ShortGPT's
  `block_influence` measured on training text);
- the data is `dataset`: `"text"` (BBC News articles, [`~hf_kd.lm_data.lm_text_dataset`]: every token is a
  completion token, held-out perplexity on articles never trained on) or a chat task with a gold answer, `"topic"`
  or `"sentiment"` ([`~hf_kd.lm_data.lm_chat_dataset`]: only the answer is a completion token), tokenized to
  [`DistillConfig`]`.lm_max_length` tokens ([`~hf_kd.lm_data.tokenize_lm_dataset`]: longer texts are cut on the right);
- `method="kd"`: [`DistillTrainer`], `alpha * T^2 * D(p_T, p_S) + (1 - alpha) * CE` on the completion tokens
  (`loss_type`, `temperature`, `alpha`, the top-k cache `cache_teacher_logits` of [`DistillConfig`]); with the
  on-policy fields of GKD (`lmbda`, `seq_kd`);
- `method="sft"`: the SFT-only baseline, the **same** trainer with `alpha = 0`: its gradient is exactly the
  completion-token cross-entropy that TRL's `SFTTrainer` minimises, and it shares everything else with `kd` (data,
  collator, optimiser, evaluation, card), so a KD-vs-SFT comparison differs in the loss only. With
  `cache_teacher_logits` the teacher never runs during SFT training (its cache, keyed by teacher and data, is shared
  with the KD run of the same data).

The test split is evaluated once after training ([`lm_test_metrics`]): perplexity, token accuracy, token ECE (15
bins), mean entropy and top-1 agreement with the teacher, whose next-token predictions are computed once and kept
(so a cached run, whose trainer never loads the teacher, still reports agreement).

Pieces: [`LMScriptArguments`] (the recipe's own flags), [`load_lm_splits`], [`build_lm_student`],
[`lm_test_metrics`], [`generation_tokens_per_second`], [`count_parameters`], [`run_lm`] (all of it), [`COMMANDS`]
(`hf-kd distill-lm`).
"""

import json
import os
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, set_seed

from .checkpoints import resolve_resume_checkpoint
from .lm_data import LM_CHAT_TASKS, lm_chat_dataset, lm_text_dataset, tokenize_lm_dataset
from .metrics import lm_metrics_from_token_statistics, lm_token_statistics
from .offline_models import placed_model_kwargs
from .options import StudentLayerRule, to_enum
from .recipes import TrainingCommand
from .student import make_student
from .trainer import DistillConfig, DistillTrainer

__all__ = [
    "COMMANDS",
    "LM_DATASETS",
    "LM_METHODS",
    "LMScriptArguments",
    "build_lm_student",
    "count_parameters",
    "generation_tokens_per_second",
    "lm_demo_training_args",
    "lm_test_metrics",
    "load_lm_splits",
    "run_lm",
]

LM_METHODS = ("kd", "sft")
"""Methods of the LM recipe: `kd` (the teacher's soft targets) and `sft` (the SFT-only baseline, `alpha = 0`)."""

LM_DATASETS = ("text",) + tuple(task for task in LM_CHAT_TASKS if task != "summarize")
"""Data of the LM recipe: `text` (BBC News articles) and the chat tasks with a gold answer (`topic`, `sentiment`).
`summarize` has no gold completion: a teacher must write them first (sequence-level KD), not a recipe input."""


@dataclass
class LMScriptArguments:
    """The LM recipe's own flags (the training and distillation ones are [`DistillConfig`]'s)."""

    model_name_or_path: str = field(
        default=None,
        metadata={"help": "The student's starting weights (Hub id or folder); with --student_layers, the model whose "
                  "layers are kept (usually the teacher)."},
    )
    method: str = field(default="kd", metadata={"help": "kd, or sft (the SFT-only baseline: alpha = 0).",
                                                 "choices": list(LM_METHODS)})
    student_layers: int | None = field(
        default=None,
        metadata={"help": "Keep this many decoder layers of model_name_or_path (hf_kd.student.make_student); "
                  "default: train the model as it is."},
    )
    student_rule: str = field(
        default="every_other",
        metadata={"help": "Which layers --student_layers keeps: every_other or block_influence (ShortGPT, measured "
                  "on --calibration_samples training rows).", "choices": [r.value for r in StudentLayerRule]},
    )
    calibration_samples: int = field(
        default=16, metadata={"help": "Training rows that student_rule=block_influence measures the layers on."}
    )
    dataset: str = field(
        default="text",
        metadata={"help": "text (BBC News articles), topic or sentiment (chat tasks with a gold answer).",
                  "choices": list(LM_DATASETS)},
    )
    max_words: int | None = field(
        default=None, metadata={"help": "Chat tasks: keep the first max_words words of each article or review."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N validation/test rows."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the train/validation/test split."})

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is required: the student's starting weights (a Hub id or a folder)")
        if self.method not in LM_METHODS:
            raise ValueError(f"method must be one of {LM_METHODS} for a causal-LM recipe, got {self.method!r}")
        if self.dataset not in LM_DATASETS:
            raise ValueError(f"dataset must be one of {LM_DATASETS}, got {self.dataset!r}")
        self.student_rule = to_enum(StudentLayerRule, self.student_rule, "student_rule")
        for name in ("student_layers", "max_train_samples", "max_eval_samples", "max_words"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {self.calibration_samples}")


def load_lm_splits(script_args: LMScriptArguments, tokenizer, max_length: int):
    """The recipe's data: `train`, `validation`, `test` tokenized to `max_length` ([`tokenize_lm_dataset`]), cut to
    `max_train_samples` / `max_eval_samples` rows, with the columns `input_ids`, `attention_mask`, `labels` (`-100`
    on prompt tokens)."""
    if script_args.dataset == "text":
        splits = lm_text_dataset(seed=script_args.split_seed)
    else:
        splits = lm_chat_dataset(script_args.dataset, seed=script_args.split_seed, max_words=script_args.max_words)
    limits = {"train": script_args.max_train_samples, "validation": script_args.max_eval_samples,
              "test": script_args.max_eval_samples}
    for split, limit in limits.items():
        if limit is not None:
            splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
    splits = tokenize_lm_dataset(splits, tokenizer, max_length=max_length)
    return splits.select_columns(["input_ids", "attention_mask", "labels"])


def build_lm_student(script_args: LMScriptArguments, train=None):
    """The student: `model_name_or_path` as it is, or its `student_layers`-layer copy by `student_rule`
    (`block_influence` measures on the first `calibration_samples` rows of `train`, a tokenized split).

    Raises:
        `ValueError`: `student_layers` larger than the model's depth, or `block_influence` without `train`.
    """
    name = script_args.model_name_or_path
    model = AutoModelForCausalLM.from_pretrained(name, **placed_model_kwargs(name, model=True))
    if script_args.student_layers is None:
        return model
    depth = model.config.num_hidden_layers
    if script_args.student_layers > depth:
        raise ValueError(
            f"student_layers={script_args.student_layers} is more than the {depth} layers of {name}: a layer-dropped "
            f"student keeps between 1 and {depth} of them"
        )
    calibration = None
    if script_args.student_rule is StudentLayerRule.BLOCK_INFLUENCE:
        if train is None:
            raise ValueError("student_rule='block_influence' measures the layers on training text: pass train")
        rows = train.select(range(min(script_args.calibration_samples, len(train))))
        width = min(len(ids) for ids in rows["input_ids"])  # equal lengths: no padding to mask
        calibration = {"input_ids": torch.tensor([ids[:width] for ids in rows["input_ids"]])}
    return make_student(model.eval(), script_args.student_layers, rule=script_args.student_rule,
                        calibration=calibration)


@torch.no_grad()
def lm_test_metrics(model, dataset, collator, batch_size: int = 8, teacher_top1: list | None = None):
    """
    Next-token metrics of `model` on a tokenized split (see [`hf_kd.metrics.lm_metrics`]), batch by batch so that no
    vocabulary-sized tensor outlives its batch, and its top-1 predictions.

    Args:
        model (`PreTrainedModel`): a causal LM; evaluated in eval mode on its own device.
        dataset (`Dataset`): `input_ids`, `attention_mask`, `labels` (`-100` not counted).
        collator: pads a list of rows into a batch (e.g. `DataCollatorForSeq2Seq`).
        batch_size (`int`, *optional*, defaults to `8`).
        teacher_top1 (`list[torch.Tensor]`, *optional*): the teacher's top-1 next tokens per batch, as this function
            returned them for the teacher on the same `dataset` and `batch_size`; adds `top1_agreement`.

    Returns:
        `(metrics, top1)`: `dict` with `perplexity`, `token_accuracy`, `token_ece`, `token_entropy`, `ece_bins`
        (and `top1_agreement`), and the list of `(batch, seq - 1)` top-1 token tensors.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    statistics, top1 = [], []
    for i, start in enumerate(range(0, len(dataset), batch_size)):
        batch = collator([dataset[j] for j in range(start, min(start + batch_size, len(dataset)))])
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:, 1:].to(device)
        stats = lm_token_statistics(logits[:, :-1], labels)
        predicted = logits[:, :-1].argmax(-1)
        if teacher_top1 is not None:
            if teacher_top1[i].shape != predicted.shape:
                raise ValueError("teacher_top1 was computed on other data or another batch_size")
            stats[..., 4] = (teacher_top1[i].to(device) == predicted).float()
        statistics.append(stats[labels != -100].cpu())
        top1.append(predicted.cpu())
    model.train(was_training)
    return lm_metrics_from_token_statistics(torch.cat(statistics).numpy()), top1


@torch.no_grad()
def generation_tokens_per_second(model, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> float:
    """
    Greedy generation speed: batch 1, each prompt in turn, exactly `max_new_tokens` new tokens each
    (`min_new_tokens` too, so that an early end-of-sequence does not flatter a model), after one untimed warm-up.

    Returns:
        `float`: new tokens per second of wall time, over all prompts.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    options = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    encoded = [tokenizer(prompt, return_tensors="pt").to(device) for prompt in prompts]
    model.generate(**encoded[0], **{**options, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    start = time.perf_counter()
    for inputs in encoded:
        model.generate(**inputs, **options)
    seconds = time.perf_counter() - start
    model.train(was_training)
    return len(prompts) * max_new_tokens / seconds


def count_parameters(model) -> int:
    """Parameters of `model`, tied weights (input/output embeddings) counted once."""
    return sum(p.numel() for p in model.parameters())


def lm_demo_training_args(output_dir: str, teacher: str, seed: int, max_steps: int, batch_size: int,
                          learning_rate: float, cache_dir: str, **kwargs) -> DistillConfig:
    """The training arguments of `trainers/demo_llm.py` and `scripts/studies/lm_kd_vs_sft.py` (SFT and KD alike, so
    that they differ in the loss only): `max_steps` steps of `batch_size` rows, AdamW at `learning_rate` with 10%
    warm-up then linear decay, the teacher's top-64 logits cached in `cache_dir` (one teacher pass, shared by every
    run on the same data), no evaluation or checkpoint during training, a log every 10 steps.

    Args:
        kwargs: further [`DistillConfig`] fields (`temperature`, `alpha`, `loss_type`), or other values for the
            ones above (`cache_teacher_logits=False` for a live teacher, `lm_cache_top_k`).
    """
    settings = dict(
        output_dir=output_dir, teacher_model_name_or_path=teacher, cache_teacher_logits=True, lm_cache_top_k=64,
        teacher_logits_cache_dir=cache_dir, max_steps=max_steps, learning_rate=learning_rate, warmup_steps=0.1,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=8, eval_strategy="no",
        save_strategy="no", logging_steps=10, seed=seed, report_to="none",
        dataloader_pin_memory=torch.accelerator.is_available(),
    )
    return DistillConfig(**{**settings, **kwargs})


def run_lm(script_args: LMScriptArguments, args: DistillConfig, teacher_top1: list | None = None):
    """
    Train a causal-LM student by the recipe, evaluate it on the test split, save student, tokenizer,
    `test_results.json` and the model card (its `model-index` carries the test metrics); return the test metrics.

    `args.resume_from_checkpoint="latest"` resumes from the newest complete checkpoint of `args.output_dir` (see
    [`hf_kd.checkpoints.resolve_resume_checkpoint`]).

    Args:
        script_args ([`LMScriptArguments`]): model, student, data and method.
        args ([`DistillConfig`]): training and distillation arguments (`lm_max_length`: tokens per example);
            `method="sft"` sets `alpha = 0`.
        teacher_top1 (`list`, *optional*): the teacher's test-split top-1 tokens from [`lm_test_metrics`] (batch size
            `args.per_device_eval_batch_size`), to skip the teacher's forward pass here.

    Returns:
        `dict`: `test_perplexity`, `test_token_accuracy`, `test_token_ece`, `test_token_entropy`,
        `test_top1_agreement`, `test_ece_bins`.

    Raises:
        `ValueError`: no teacher, a student deeper than its model, unknown method or data (see the dataclasses).
    """
    if not args.teacher_model_name_or_path:
        raise ValueError(
            "teacher_model_name_or_path is required by the LM recipe, for method='kd' (the soft targets) and "
            "method='sft' alike (the test split's top-1 agreement with the teacher)"
        )
    if script_args.method == "sft":
        args.alpha = 0.0  # the SFT-only baseline: the completion-token cross-entropy alone
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(
        script_args.model_name_or_path, **placed_model_kwargs(script_args.model_name_or_path)
    )
    splits = load_lm_splits(script_args, tokenizer, args.lm_max_length)
    student = build_lm_student(script_args, splits["train"])
    collator = DataCollatorForSeq2Seq(tokenizer)
    trainer = DistillTrainer(
        model=student, args=args, train_dataset=splits["train"],
        eval_dataset=splits["validation"] if args.eval_strategy != "no" else None,
        processing_class=tokenizer, data_collator=collator,
    )
    trainer.train(resume_from_checkpoint=resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir))

    batch_size = args.per_device_eval_batch_size
    if teacher_top1 is None:
        name = args.teacher_model_name_or_path
        teacher = AutoModelForCausalLM.from_pretrained(name, **placed_model_kwargs(name, model=True))
        _, teacher_top1 = lm_test_metrics(teacher.to(args.device), splits["test"], collator, batch_size)
        del teacher
    metrics, _ = lm_test_metrics(trainer.model, splits["test"], collator, batch_size, teacher_top1)
    metrics = {f"test_{key}": value for key, value in metrics.items()}
    trainer.log(metrics)  # into log_history, where the model card reads its model-index
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
        summary = {"method": script_args.method, "model": script_args.model_name_or_path,
                   "teacher": args.teacher_model_name_or_path, "student_layers": script_args.student_layers,
                   "student_rule": str(script_args.student_rule), "dataset": script_args.dataset,
                   "lm_max_length": args.lm_max_length, "alpha": args.alpha, "temperature": args.temperature,
                   "train_split_tokens": sum(sum(1 for t in row[1:] if t != -100) for row in splits["train"]["labels"]),
                   "num_processes": trainer.accelerator.num_processes}
        with open(os.path.join(args.output_dir, "test_results.json"), "w") as f:
            json.dump({**summary, **metrics}, f, indent=2)
    return metrics


COMMANDS = {
    "distill-lm": TrainingCommand(
        "Distil a causal LM (DistillTrainer, token-level KD; --method kd | sft).",
        lambda argv: (LMScriptArguments, DistillConfig),
        run_lm,
    ),
}
"""`hf-kd distill-lm` (listed in `hf_kd.cli`): a YAML recipe (`trainers/configs/distill_lm_*.yaml`) and/or flags into
[`LMScriptArguments`] and [`DistillConfig`], then [`run_lm`]."""
