"""The causal-LM recipes as functions: the distillation recipe of `trainers/distill_lm.py`, shared with
`trainers/demo_llm.py` and `scripts/studies/lm_kd_vs_sft.py`, and the early-exit recipe of `hf-kd early-exit-lm`.

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

`hf-kd early-exit-lm` ([`run_early_exit_lm`]) is the early-exit recipe on the same data: exits on a causal LM
([`~hf_kd.modeling.MultiExitForCausalLM`]) trained by [`EarlyExitTrainer`], one temperature per exit fitted on the
validation split ([`EarlyExitTrainer.calibrate_exits`]), optionally confidence thresholds certified on a held-out half of the validation split
([`~hf_kd.modeling.fit_exit_thresholds`], Learn-then-Test), the model saved with its card and a per-exit table
printed.

Pieces: [`LMDataArguments`] (the data flags of both commands), [`LMScriptArguments`] / [`EarlyExitLMScriptArguments`]
(each command's own flags), [`load_lm_splits`], [`build_lm_student`], [`build_multi_exit_lm`],
[`check_threshold_data`], [`lm_test_metrics`], [`generation_tokens_per_second`], [`count_parameters`],
[`exit_summary_table`], [`run_lm`] / [`run_early_exit_lm`] (all of it), [`COMMANDS`] (`hf-kd distill-lm`,
`hf-kd early-exit-lm`).
"""

import json
import os
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, set_seed

from . import data
from .calibration import ExitCalibrationResult, calibrate_exit_temperatures
from .checkpoints import resolve_resume_checkpoint
from .hub import _markdown_table
from .lm_data import LM_CHAT_TASKS, LMDataCollator, lm_chat_dataset, lm_text_dataset, tokenize_lm_dataset
from .metrics import lm_metrics_from_token_statistics, lm_token_statistics
from .modeling import ExitAdapterType, MultiExitForCausalLM
from .modeling.early_exit_generation import min_calibration_tokens
from .offline_models import placed_model_kwargs
from .options import StudentLayerRule, to_enum
from .recipes import TrainingCommand
from .student import make_student
from .trainer import DistillConfig, DistillTrainer, EarlyExitConfig, EarlyExitTrainer

__all__ = [
    "COMMANDS",
    "LM_DATASETS",
    "LM_METHODS",
    "SMOLLM2",
    "EarlyExitLMScriptArguments",
    "LMDataArguments",
    "LMScriptArguments",
    "build_lm_student",
    "build_multi_exit_lm",
    "check_threshold_data",
    "exit_summary_table",
    "count_parameters",
    "generation_tokens_per_second",
    "lm_demo_training_args",
    "lm_test_metrics",
    "load_lm_splits",
    "run_early_exit_lm",
    "run_lm",
]

LM_METHODS = ("kd", "sft")
"""Methods of the LM recipe: `kd` (the teacher's soft targets) and `sft` (the SFT-only baseline, `alpha = 0`)."""

LM_DATASETS = ("text",) + tuple(task for task in LM_CHAT_TASKS if task != "summarize")
"""Data of the LM recipe: `text` (BBC News articles) and the chat tasks with a gold answer (`topic`, `sentiment`).
`summarize` has no gold completion: a teacher must write them first (sequence-level KD), not a recipe input."""


@dataclass
class LMDataArguments:
    """The data flags of the causal-LM recipes (`hf-kd distill-lm`, `hf-kd early-exit-lm`), read by
    [`load_lm_splits`]: one of hf_kd's offline corpora, a Hub dataset id or folder, or local files.

    Args:
        dataset (`str`, *optional*):
            hf_kd's offline corpora: `"text"` (BBC News articles, every token counted; the default when neither
            `dataset_name` nor `data_files` is given) or a chat task with a gold answer, `"topic"` or `"sentiment"`
            (only the answer counted); see [`LM_DATASETS`].
        dataset_name (`str`, *optional*):
            A Hub dataset id or a local dataset folder ([`datasets.load_dataset`], through [`hf_kd.data.load_source`])
            in one of TRL's formats ([`~hf_kd.lm_data.tokenize_lm_dataset`]: `text`, `messages`, or `prompt` +
            `completion`).
        dataset_config (`str`, *optional*): the configuration (subset) of a `dataset_name`.
        data_files (`list[str]`, *optional*):
            Local files instead: `SPLIT=PATH` entries (`train=a.jsonl validation=b.jsonl`), CSV, JSON lines or Parquet,
            in one of TRL's formats. A source without a `validation` or `test` split gets one cut from `train` by a
            shuffle seeded with `split_seed` (10% and 20% of its rows, [`hf_kd.data.select_splits`]).
        max_words (`int`, *optional*): chat tasks: keep the first `max_words` words of each article or review.
        max_train_samples (`int`, *optional*): use the first N training rows (all when `None`).
        max_eval_samples (`int`, *optional*): use the first N validation and N test rows (all when `None`).
        split_seed (`int`, *optional*, defaults to `42`): seed of the train/validation/test split.
    """

    dataset: str | None = field(
        default=None,
        metadata={"help": "hf_kd's offline corpora: text (BBC News articles; the default without --dataset_name or "
                  "--data_files), topic or sentiment (chat tasks with a gold answer).", "choices": list(LM_DATASETS)},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub dataset id or a local dataset folder in one of TRL's formats (text, messages, "
                  "prompt + completion)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration (subset) of --dataset_name."})
    data_files: list[str] | None = field(
        default=None,
        metadata={"help": "Local files instead: SPLIT=PATH ... (CSV, JSON lines or Parquet) in one of TRL's formats; "
                  "a missing validation or test split is cut from train."},
    )
    max_words: int | None = field(
        default=None, metadata={"help": "Chat tasks: keep the first max_words words of each article or review."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N validation/test rows."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the train/validation/test split."})

    def __post_init__(self):
        given = {name: getattr(self, name) for name in ("dataset", "dataset_name", "data_files")
                 if getattr(self, name) is not None}
        if len(given) > 1:
            raise ValueError(f"pass one data source, got {' and '.join(f'{k}={v!r}' for k, v in given.items())}")
        if not given:
            self.dataset = "text"
        if self.dataset is not None and self.dataset not in LM_DATASETS:
            raise ValueError(f"dataset must be one of {LM_DATASETS}, got {self.dataset!r}")
        if self.dataset_config is not None and self.dataset_name is None:
            raise ValueError(f"dataset_config={self.dataset_config!r} is a configuration of a dataset_name: pass one")
        for name in ("max_train_samples", "max_eval_samples", "max_words"):
            _check_positive_int(self, name)

    @property
    def source(self) -> str:
        """The data's name for reports and cards: `dataset`, `dataset_name`, or `"data_files"`."""
        return self.dataset or self.dataset_name or "data_files"


def _check_positive_int(arguments, name: str) -> None:
    """A `ValueError` naming `name` unless `arguments.<name>` is `None` or an int >= 1 (a bool is not an int here)."""
    value = getattr(arguments, name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


@dataclass
class LMScriptArguments(LMDataArguments):
    """The flags of `hf-kd distill-lm` besides [`DistillConfig`]'s: [`LMDataArguments`] and the student's."""

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

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is required: the student's starting weights (a Hub id or a folder)")
        if self.method not in LM_METHODS:
            raise ValueError(f"method must be one of {LM_METHODS} for a causal-LM recipe, got {self.method!r}")
        super().__post_init__()
        self.student_rule = to_enum(StudentLayerRule, self.student_rule, "student_rule")
        _check_positive_int(self, "student_layers")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {self.calibration_samples}")


def load_lm_splits(script_args: LMDataArguments, tokenizer, max_length: int):
    """The recipe's data: `train`, `validation`, `test` of `script_args`'s source (an offline corpus, a Hub id or
    folder, local files; a missing validation or test split cut from train), cut to `max_train_samples` /
    `max_eval_samples` rows, tokenized to `max_length` ([`tokenize_lm_dataset`]), with the columns `input_ids`,
    `attention_mask`, `labels` (`-100` on prompt tokens).

    Raises:
        `ValueError`: a source that cannot be read, no train split, an empty split, rows in no TRL format, prompt-only
        data, a prompt too long for `max_length`.
    """
    if script_args.dataset == "text":
        splits = lm_text_dataset(seed=script_args.split_seed)
    elif script_args.dataset is not None:
        splits = lm_chat_dataset(script_args.dataset, seed=script_args.split_seed, max_words=script_args.max_words)
    else:
        source = data.load_source(script_args.dataset_name, script_args.dataset_config, script_args.data_files,
                                  seed=script_args.split_seed)
        if "train" not in source:  # said here: select_splits' message names a flag these recipes do not have
            raise ValueError(f"the data has no train split; its splits are {list(source)}")
        splits = data.select_splits(source, seed=script_args.split_seed)
    limits = {"train": script_args.max_train_samples, "validation": script_args.max_eval_samples,
              "test": script_args.max_eval_samples}
    for split, limit in limits.items():
        if limit is not None:
            splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
    splits = tokenize_lm_dataset(splits, tokenizer, max_length=max_length)
    if "labels" not in splits["train"].column_names:
        raise ValueError(f"{script_args.source} is prompt-only data (no completion, no text): nothing to train on")
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
                   "student_rule": str(script_args.student_rule), "dataset": script_args.source,
                   "lm_max_length": args.lm_max_length, "alpha": args.alpha, "temperature": args.temperature,
                   "train_split_tokens": sum(sum(1 for t in row[1:] if t != -100) for row in splits["train"]["labels"]),
                   "num_processes": trainer.accelerator.num_processes}
        with open(os.path.join(args.output_dir, "test_results.json"), "w") as f:
            json.dump({**summary, **metrics}, f, indent=2)
    return metrics


# --------------------------------------------------------------------------------------------------------------------
# hf-kd early-exit-lm: exits on a causal LM, trained, calibrated per exit, optionally with certified thresholds
# --------------------------------------------------------------------------------------------------------------------

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The default backbone of `hf-kd early-exit-lm` (30 layers; placed offline by [`hf_kd.offline_models`])."""


@dataclass
class EarlyExitLMScriptArguments(LMDataArguments):
    """The flags of `hf-kd early-exit-lm` besides [`EarlyExitConfig`]'s: [`LMDataArguments`] and

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"HuggingFaceTB/SmolLM2-135M-Instruct"`):
            The Llama-family causal LM (Hub id or folder) the exits go on
            ([`MultiExitForCausalLM.from_backbone`]).
        exit_layers (`list[int]`, *optional*):
            1-based decoder layers followed by an exit; the last layer is always added. Every layer when `None`
            (30 exits on SmolLM2: pass a few).
        exit_adapter (`str`, *optional*):
            `None` (the exits share the backbone's final norm and LM head, LayerSkip's exits), `"linear"` or
            `"low_rank"`: a residual adapter per early exit, what learns with `--freeze_backbone`.
        exit_adapter_rank (`int`, *optional*, defaults to `64`): rank of the `"low_rank"` adapters.
        lm_max_length (`int`, *optional*, defaults to `1024`):
            Tokens per example ([`~hf_kd.lm_data.tokenize_lm_dataset`]: longer texts are cut on the right); the same
            flag as `hf-kd distill-lm`'s (there a [`DistillConfig`] field).
        exit_epsilon (`float`, *optional*), exit_delta (`float`, *optional*):
            Both or neither, each in `(0, 1)`. With them, after training, per-exit confidence thresholds for
            `generate(early_exit="confident")` are fitted by Learn-then-Test on the second half of the validation
            split (the temperatures on the first)
            ([`~hf_kd.modeling.fit_exit_thresholds`]): with probability at least `1 - exit_delta`, every early exit's
            rate of tokens leaving there with another prediction than the final exit is at most `exit_epsilon`.
    """

    model_name_or_path: str = field(
        default=SMOLLM2, metadata={"help": "Llama-family causal LM (Hub id or folder) to put exits on."}
    )
    exit_layers: list[int] | None = field(
        default=None, metadata={"help": "1-based layers followed by an exit (the last layer always is); default: all."}
    )
    exit_adapter: str | None = field(
        default=None,
        metadata={"help": "Per-exit residual adapter: linear or low_rank (what learns with --freeze_backbone); "
                  "default: none, the exits share the backbone's final norm and LM head.",
                  "choices": [a.value for a in ExitAdapterType]},
    )
    exit_adapter_rank: int = field(default=64, metadata={"help": "Rank of the low_rank adapters."})
    lm_max_length: int = field(
        default=1024, metadata={"help": "Tokens per example: longer texts are cut on the right."}
    )
    exit_epsilon: float | None = field(
        default=None,
        metadata={"help": "With --exit_delta: fit confidence thresholds (Learn-then-Test, on half the validation split) so that "
                  "each early exit disagrees with the final exit on at most this rate of tokens, in (0, 1)."},
    )
    exit_delta: float | None = field(
        default=None,
        metadata={"help": "With --exit_epsilon: probability in (0, 1) that the threshold guarantee fails."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path must name a causal LM (a Hub id or a folder), got an empty value")
        if self.exit_adapter is not None:
            self.exit_adapter = to_enum(ExitAdapterType, self.exit_adapter, "exit_adapter")
        _check_positive_int(self, "exit_adapter_rank")
        if isinstance(self.lm_max_length, bool) or not isinstance(self.lm_max_length, int) or self.lm_max_length < 2:
            # One token predicts nothing: a next-token example needs two.
            raise ValueError(f"lm_max_length must be an int >= 2, got {self.lm_max_length!r}")
        if (self.exit_epsilon is None) != (self.exit_delta is None):
            raise ValueError(
                f"exit_epsilon and exit_delta go together (the thresholds' guarantee needs both), got "
                f"exit_epsilon={self.exit_epsilon} and exit_delta={self.exit_delta}"
            )
        for name in ("exit_epsilon", "exit_delta"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")


def build_multi_exit_lm(script_args: EarlyExitLMScriptArguments) -> MultiExitForCausalLM:
    """Exits on `script_args.model_name_or_path` ([`MultiExitForCausalLM.from_backbone`], loaded offline when
    [`hf_kd.offline_models`] placed it), after `exit_layers`, with `exit_adapter` adapters of rank
    `exit_adapter_rank`.

    Args:
        script_args ([`EarlyExitLMScriptArguments`]): `model_name_or_path`, `exit_layers` (`None`: every layer),
            `exit_adapter` (`None`: shared final norm and LM head), `exit_adapter_rank` (default `64`).

    Returns:
        [`MultiExitForCausalLM`] in training mode with the backbone's weights and dtype; `config.exit_layers` ends
        with the last layer; untrained adapters are the identity.

    Raises:
        `ValueError`: an exit layer out of range (named, with the backbone's depth), a model that is not a
        Llama-family decoder.
    """
    name = script_args.model_name_or_path
    return MultiExitForCausalLM.from_backbone(
        name, exit_layers=script_args.exit_layers, exit_adapter=script_args.exit_adapter,
        exit_adapter_rank=script_args.exit_adapter_rank, backbone_kwargs=placed_model_kwargs(name, model=True),
    )


def check_threshold_data(model: MultiExitForCausalLM, input_ids: list, epsilon: float, delta: float) -> None:
    """
    Fail before training when [`~hf_kd.modeling.fit_exit_thresholds`] would fail after it: the calibration rows
    `input_ids` (every token counts) must hold at least [`~hf_kd.modeling.early_exit_generation.min_calibration_tokens`]
    `(epsilon, delta / number of early exits)` tokens, and the model needs an early exit.

    Args:
        model ([`MultiExitForCausalLM`]): read for `config.exit_layers` only.
        input_ids (`list[list[int]]`): the calibration rows (the second half of the validation split), unpadded.
        epsilon (`float`), delta (`float`): `--exit_epsilon`, `--exit_delta`, each in `(0, 1)`.

    Raises:
        `ValueError`: naming the token count, `epsilon`, `delta` and the tokens needed.
    """
    early_exits = model.config.exit_layers[:-1]
    if not early_exits:
        raise ValueError(
            f"exit_epsilon / exit_delta fit thresholds of the early exits, but exit_layers={model.config.exit_layers} "
            "has none before the last layer: add --exit_layers"
        )
    level = delta / len(early_exits)  # fit_exit_thresholds tests each exit at delta / exits (Bonferroni)
    needed, tokens = min_calibration_tokens(epsilon, level), sum(len(row) for row in input_ids)
    if tokens < needed:
        raise ValueError(
            f"the threshold rows (the second half of the validation split) have {tokens} tokens, too few to fit thresholds with exit_epsilon={epsilon} and "
            f"exit_delta={delta}: with {len(early_exits)} early exits each needs n >= log({level:.4g}) / "
            f"log(1 - {epsilon}) = {needed} tokens. Raise --max_eval_samples or --lm_max_length, or exit_epsilon or "
            "exit_delta"
        )


def exit_summary_table(exit_layers: list[int], temperatures: list[float], metrics: dict,
                       test_calibration: ExitCalibrationResult, thresholds: dict[int, float] | None) -> str:
    """
    The markdown table `hf-kd early-exit-lm` prints: one row per exit with its layer, its temperature, the test
    split's top-1 agreement with the final exit and next-token accuracy (`metrics`: `test_exit_{i}_*` of
    `trainer.evaluate(test, metric_key_prefix="test")`), its token ECE before -> after the temperature
    (`test_calibration`: [`calibrate_exit_temperatures`] on the test split at those temperatures) and its confidence
    threshold (`-` for an exit without one: the final exit, or an exit no threshold was certified for).

    Args:
        exit_layers (`list[int]`), temperatures (`list[float]`): one per exit, the final exit last.
        metrics (`dict`): with `test_exit_{i}_top1_agreement` and `test_exit_{i}_token_accuracy` for every exit `i`.
        test_calibration ([`ExitCalibrationResult`]): its `before` / `after` token ECE per exit, and `n_bins`.
        thresholds (`dict[int, float]`, *optional*): per early exit layer ([`ExitThresholdFit`]`.thresholds`).

    Returns:
        `str`: a markdown table, one row per exit.
    """
    rows = []
    for i, layer in enumerate(exit_layers):
        threshold = (thresholds or {}).get(layer)
        rows.append([
            str(i), str(layer), f"{temperatures[i]:.3f}", f"{metrics[f'test_exit_{i}_top1_agreement']:.4f}",
            f"{metrics[f'test_exit_{i}_token_accuracy']:.4f}",
            f"{test_calibration.before[i]['token_ece']:.4f} -> {test_calibration.after[i]['token_ece']:.4f}",
            "-" if threshold is None else f"{threshold:.2f}",
        ])
    header = ["exit", "layer", "T", "top-1 agreement", "token accuracy",
              f"token ECE ({test_calibration.n_bins} bins)", "threshold"]
    return _markdown_table(header, rows)


def run_early_exit_lm(script_args: EarlyExitLMScriptArguments, args: EarlyExitConfig) -> dict:
    """
    The recipe of `hf-kd early-exit-lm`: put exits on a causal LM, train them with [`EarlyExitTrainer`], calibrate
    them, optionally fit their confidence thresholds, save the model with its card, print a per-exit table.

    1. Exits after `script_args.exit_layers` of `model_name_or_path` ([`build_multi_exit_lm`]); data
       [`load_lm_splits`] (`train`, `validation`, `test` at `lm_max_length` tokens).
    2. [`EarlyExitTrainer`] on `train` (`args`: `distill_from` `"final_exit"` for LayerSkip-style self-distillation,
       or `"teacher"` with `cache_teacher_logits` for a teacher's cached top-k targets; `freeze_backbone`;
       `exit_loss_weights`; `final_exit_temperature`), `validation` as its `eval_dataset`.
    3. [`EarlyExitTrainer.calibrate_exits`] on `validation`: one temperature per exit (Guo et al., 2017,
       https://huggingface.co/papers/1706.04599), every exit's token ECE / NLL / Brier before and after and its
       reliability diagram go to `exit_calibration.json`, `exit_calibration/` and the card's model-index; the
       temperatures to `config.exit_temperatures`.
    4. The test split: `trainer.evaluate` (each exit's perplexity, token accuracy, ECE, top-1 agreement with the
       final exit, into the card), and every exit's token ECE at T = 1 and at its validation temperature
       ([`calibrate_exit_temperatures`] with `temperatures=`).
    5. With `exit_epsilon` / `exit_delta`: [`MultiExitForCausalLM.fit_exit_thresholds`] (Learn-then-Test,
       Angelopoulos et al., 2021, https://huggingface.co/papers/2110.01052), stored in `config.exit_thresholds`.
       The validation split is then cut in two halves: the temperatures of step 3 are fitted on the first, the
       thresholds certified on the second, because the guarantee holds for a confidence score fixed before the
       thresholds' data is seen; the test split is never used to fit anything.
    6. Save model (`AutoModelForCausalLM.from_pretrained(output_dir)` with hf_kd imported, or
       `trust_remote_code=True` without it), tokenizer, card and `test_results.json`; print the table
       ([`exit_summary_table`]).

    Too few threshold rows (half the validation split) and an exit layer out of range fail before training.

    Args:
        script_args ([`EarlyExitLMScriptArguments`]): backbone, exits, data, thresholds.
        args ([`EarlyExitConfig`]): training, exit weighting and distillation arguments.

    Returns:
        `dict`: the test metrics (`test_perplexity`, ..., `test_exit_{i}_top1_agreement`, ...) plus, per exit,
        `test_exit_{i}_uncalibrated_token_ece` / `test_exit_{i}_calibrated_token_ece` (at T = 1 / its temperature).
    """
    set_seed(args.seed)  # fresh exit adapters: the same initialisation on every process count and launcher
    name = script_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(name, **placed_model_kwargs(name))
    with args.main_process_first(desc="loading and tokenizing the data"):
        splits = load_lm_splits(script_args, tokenizer, script_args.lm_max_length)
    model = build_multi_exit_lm(script_args)
    temperature_rows = threshold_rows = splits["validation"]
    if script_args.exit_epsilon is not None:
        # Two disjoint halves of the validation split: the thresholds' guarantee holds for a confidence score fixed
        # before their data is seen, so the temperatures (part of that score) are fitted on the first half and the
        # thresholds certified on the second; the test split stays untouched for the reported numbers.
        half = len(splits["validation"]) // 2
        temperature_rows = splits["validation"].select(range(half))
        threshold_rows = splits["validation"].select(range(half, len(splits["validation"])))
        check_threshold_data(model, threshold_rows["input_ids"], script_args.exit_epsilon, script_args.exit_delta)
    collator = LMDataCollator.for_tokenizer(tokenizer)
    trainer = EarlyExitTrainer(
        model=model, args=args, train_dataset=splits["train"], eval_dataset=splits["validation"],
        processing_class=tokenizer, data_collator=collator,
    )
    trainer.train(resume_from_checkpoint=resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir))

    model = trainer.accelerator.unwrap_model(trainer.model)
    first = " (its first half; the second certifies the thresholds)" if threshold_rows is not temperature_rows else ""
    described = (f"{script_args.source}/validation{first} ({len(temperature_rows)} rows of at most "
                 f"{script_args.lm_max_length} tokens)")
    calibration = trainer.calibrate_exits(temperature_rows, calibrated_on=described,
                                          split="eval" if not first else "calibration")
    layers, temperatures = calibration.exit_layers, calibration.temperatures
    # In the config, generate(early_exit="confident") and fit_exit_thresholds divide each exit's logits by its own.
    model.config.exit_temperatures = {str(layer): t for layer, t in zip(layers, temperatures)}
    metrics = trainer.evaluate(splits["test"], metric_key_prefix="test")  # logged: the card's model-index reads it
    test_calibration = calibrate_exit_temperatures(
        model, splits["test"], n_bins=calibration.n_bins, batch_size=args.per_device_eval_batch_size,
        data_collator=collator, temperatures=temperatures,
    )
    for i in range(len(layers)):
        metrics[f"test_exit_{i}_uncalibrated_token_ece"] = test_calibration.before[i]["token_ece"]
        metrics[f"test_exit_{i}_calibrated_token_ece"] = test_calibration.after[i]["token_ece"]
    fit = None
    if script_args.exit_epsilon is not None:
        fit = model.fit_exit_thresholds(threshold_rows["input_ids"], script_args.exit_epsilon, script_args.exit_delta,
                                        batch_size=args.per_device_eval_batch_size)
    trainer.save_model(args.output_dir)  # weights, config (temperatures, thresholds), card, exit_calibration/
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
        summary = {
            "method": "early_exit_lm", "model": name, "exit_layers": layers, "dataset": script_args.source,
            "lm_max_length": script_args.lm_max_length, "distill_from": str(args.distill_from),
            "freeze_backbone": args.freeze_backbone, "exit_temperatures": temperatures,
            "exit_thresholds": None if fit is None else {str(k): v for k, v in fit.thresholds.items()},
            "threshold_disagreement": None if fit is None else {str(k): v for k, v in fit.disagreement.items()},
            "num_processes": trainer.accelerator.num_processes,
        }
        with open(os.path.join(args.output_dir, "test_results.json"), "w") as f:
            json.dump({**summary, **metrics}, f, indent=2)
        where = f"exit_epsilon={fit.epsilon}, exit_delta={fit.delta}, {fit.num_tokens} tokens" if fit else "none"
        table = exit_summary_table(layers, temperatures, metrics, test_calibration, fit.thresholds if fit else None)
        print(f"\nExits of {name}: temperatures fitted on {described}; test split ({len(splits['test'])} rows): "
              f"top-1 agreement with the final exit, token accuracy, token ECE at T = 1 -> at T; thresholds: {where}."
              f"\n\n{table}"
              f"\n\nModel, card (README.md), exit_calibration/ and test_results.json: {args.output_dir}")
    return metrics


COMMANDS = {
    "distill-lm": TrainingCommand(
        "Distil a causal LM (DistillTrainer, token-level KD; --method kd | sft).",
        lambda argv: (LMScriptArguments, DistillConfig),
        run_lm,
    ),
    "early-exit-lm": TrainingCommand(
        "Train, calibrate and threshold the exits of a causal LM (EarlyExitTrainer on MultiExitForCausalLM).",
        lambda argv: (EarlyExitLMScriptArguments, EarlyExitConfig),
        run_early_exit_lm,
    ),
}
"""`hf-kd distill-lm` and `hf-kd early-exit-lm` (listed in `hf_kd.cli`): a YAML recipe
(`trainers/configs/distill_lm_*.yaml`, `trainers/configs/early_exit_lm_*.yaml`) and/or flags into
[`LMScriptArguments`] and [`DistillConfig`], then [`run_lm`]; into [`EarlyExitLMScriptArguments`] and
[`EarlyExitConfig`], then [`run_early_exit_lm`]."""
