"""The text-classification recipes of `trainers/` as functions: the one implementation that `trainers/distill.py`,
`trainers/early_exit.py`, `trainers/main_job.py` and the studies in `scripts/studies/` share.

A recipe trains a classifier on one of [`DATASETS`] with one of the modes of Sultan (2023,
https://huggingface.co/papers/2301.12609) and writes its test metrics next to the saved model:

- `erm`: fine-tune with cross-entropy (also how a teacher is made), with the stock `transformers.Trainer`;
- `ls`: cross-entropy with label smoothing (epsilon spread over all classes), with the stock `Trainer`;
- `kd`: distil `DistillConfig.teacher_model_name_or_path` into the model with [`DistillTrainer`]. KD, born-again KD
  (Furlanello et al., 2018, https://huggingface.co/papers/1805.04770) and reverse KD differ only in the pair: big
  teacher -> small student, same architecture, small teacher -> big student;
- `tinybert`: the same with [`TinyBERTTrainer`] and [`TinyBERTConfig`], TinyBERT's intermediate-layer losses (Jiao et
  al., 2020, https://huggingface.co/papers/1909.10351; recipes `trainers/configs/tinybert_*`).

Pieces: [`DataArguments`] / [`ScriptArguments`] (the recipes' own flags), [`load_splits`] (load, cut and tokenize),
[`label_kwargs`], [`build_trainer`], [`finish`] (test metrics, save, `test_results.json`), [`run`] (all of it), and
[`main_job_training_args`] (the optimiser settings of the main job, `trainers/main_job.py`).
"""

import json
import os
from dataclasses import dataclass, field, fields

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from . import data
from .checkpoints import resolve_resume_checkpoint
from .evaluation import record_max_length
from .metrics import make_compute_metrics
from .offline_models import placed_model_kwargs
from .options import BuiltinDataset, RecipeMethod, to_enum
from .peft_utils import LoraArguments, get_peft_config
from .trainer import DistillConfig, DistillTrainer, TinyBERTConfig, TinyBERTTrainer

__all__ = [
    "DATASETS",
    "DISTILL_METHODS",
    "DataArguments",
    "ScriptArguments",
    "build_trainer",
    "finish",
    "label_kwargs",
    "load_splits",
    "main_job_training_args",
    "run",
]

# The recipes' data sets: hf_kd's offline ones ([`~hf_kd.options.BuiltinDataset`] -> loader).
DATASETS = data.BUILTIN_DATASETS
# The distillation methods: their config (what the flags are parsed into) and their trainer.
DISTILL_METHODS = {
    RecipeMethod.KD: (DistillConfig, DistillTrainer),
    RecipeMethod.TINYBERT: (TinyBERTConfig, TinyBERTTrainer),
}


@dataclass
class DataArguments:
    """The data flags every recipe shares (`trainers/distill.py`, `trainers/early_exit.py`).

    Args:
        dataset_name (`str`, *optional*, defaults to `"rotten_tomatoes"`):
            A [`~hf_kd.options.BuiltinDataset`] (or its string).
        max_length (`int`, *optional*, defaults to `64`):
            Truncation length in tokens.
        max_train_samples (`int`, *optional*):
            Use N training rows (of the shuffled train split); all when `None`.
        max_eval_samples (`int`, *optional*):
            Use N validation and N test rows (of the shuffled splits); all when `None`.
        split_seed (`int`, *optional*, defaults to `42`):
            Seed of the train/validation/test split and of the shuffle before cutting.
        report_train_sigma (`bool`, *optional*, defaults to `False`):
            KD (`kd`, `tinybert`) only: also evaluate the training and validation splits into `test_results.json` as `train_*` /
            `eval_*` (confidence preservation sigma is defined on the training set, Vengertsev & Sherman 2024).
    """

    dataset_name: str = field(
        default="rotten_tomatoes",
        metadata={"help": "One of hf_kd's offline data sets.", "choices": [d.value for d in BuiltinDataset]},
    )
    max_length: int = field(default=64, metadata={"help": "Truncation length in tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N validation/test rows."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the train/validation/test split."})
    report_train_sigma: bool = field(
        default=False,
        metadata={
            "help": "KD only: also evaluate the training and validation splits (confidence preservation sigma is "
            "defined on the training set, Vengertsev & Sherman 2024) into test_results.json as train_* / eval_*."
        },
    )

    def __post_init__(self):
        self.dataset_name = to_enum(BuiltinDataset, self.dataset_name, "dataset_name")


@dataclass
class ScriptArguments(DataArguments):
    """The flags of `trainers/distill.py` besides [`DistillConfig`]'s: [`DataArguments`] and

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"sentence-transformers/paraphrase-MiniLM-L3-v2"`):
            The student (or the ERM / LS model): a Hub id or a folder.
        method (`str`, *optional*, defaults to `"kd"`):
            A [`~hf_kd.options.RecipeMethod`] (or its string): `"erm"`, `"ls"`, `"kd"` or `"tinybert"`.
        label_smoothing (`float`, *optional*, defaults to `0.1`):
            Epsilon of `method="ls"`.
    """

    model_name_or_path: str = field(
        default="sentence-transformers/paraphrase-MiniLM-L3-v2", metadata={"help": "Student (or ERM/LS model)."}
    )
    method: str = field(
        default="kd", metadata={"help": "How to train the model.", "choices": [m.value for m in RecipeMethod]}
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "Epsilon of --method ls."})

    def __post_init__(self):
        super().__post_init__()
        self.method = to_enum(RecipeMethod, self.method, "method")


def load_splits(script_args: DataArguments, tokenizer):
    """Load `script_args.dataset_name`, cut its splits and tokenize them.

    The splits come from the [`DATASETS`] loader with `seed=script_args.split_seed`. A split with a limit
    (`max_train_samples` for `train`, `max_eval_samples` for `validation` and `test`) is shuffled with `split_seed`
    first, then cut: the rows are grouped by source (e.g. by movie), so a plain head would not be representative.

    Args:
        script_args ([`DataArguments`]): the dataset, limits, split seed and `max_length`.
        tokenizer: called on each batch of `text` with `truncation=True, max_length=script_args.max_length`.

    Returns:
        [`~datasets.DatasetDict`]: `train`, `validation`, `test`, with the loader's columns plus the tokenizer's
        (`input_ids`, `attention_mask`, ...; unpadded).
    """
    splits = DATASETS[script_args.dataset_name](seed=script_args.split_seed)
    limits = {"train": script_args.max_train_samples}
    limits["validation"] = limits["test"] = script_args.max_eval_samples
    for name, limit in limits.items():
        if limit is not None:
            # Rows are grouped by source (e.g. by movie): shuffle before cutting so a slice is representative.
            shuffled = splits[name].shuffle(seed=script_args.split_seed)
            splits[name] = shuffled.select(range(min(limit, len(shuffled)))).flatten_indices()
    return splits.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=script_args.max_length),
        batched=True,
        desc="Tokenizing",
    )


def label_kwargs(splits) -> dict:
    """`num_labels`, `id2label` and `label2id` of the train split's `label` feature."""
    names = splits["train"].features["label"].names
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def build_trainer(script_args: ScriptArguments, args: DistillConfig, splits, tokenizer, peft_config=None):
    """The trainer of a recipe: [`DistillTrainer`] for `method="kd"`, [`TinyBERTTrainer`] for `"tinybert"`, the stock `transformers.Trainer` for `"erm"`
    and `"ls"` (label smoothing through `label_smoothing_factor`), on a fresh classification head of
    `script_args.model_name_or_path` (seeded with `args.seed`), trained on `splits["train"]`, evaluated on
    `splits["validation"]`.

    Raises:
        `ValueError`: a `peft_config` with `method` `"erm"` or `"ls"` (LoRA students are for hf_kd's trainers).
    """
    set_seed(args.seed)  # a fresh classifier: the same initialisation on every process count and launcher
    name = script_args.model_name_or_path
    model = AutoModelForSequenceClassification.from_pretrained(name, **placed_model_kwargs(name, label_kwargs(splits), model=True))
    # Saved in config.json: `hf-kd evaluate` / `calibrate` then truncate as this run did (not at their own default).
    record_max_length(model.config, script_args.max_length)
    common = dict(
        model=model,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    if script_args.method in DISTILL_METHODS:
        trainer_class = DISTILL_METHODS[script_args.method][1]
        return trainer_class(args=args, peft_config=peft_config, **common)
    if peft_config is not None:
        raise ValueError(
            f"--use_peft is for --method kd or tinybert (hf_kd's trainers), got --method {script_args.method}"
        )
    # The baselines use the stock Trainer: hf_kd adds nothing to plain cross-entropy but its metrics.
    plain = {f.name: getattr(args, f.name) for f in fields(TrainingArguments) if f.init}
    plain["label_smoothing_factor"] = script_args.label_smoothing if script_args.method is RecipeMethod.LS else 0.0
    return Trainer(args=TrainingArguments(**plain), compute_metrics=make_compute_metrics(), **common)


def finish(trainer, args, test, summary: dict, extra_metrics: dict | None = None) -> dict:
    """Evaluate on the test split, save the model (an adapter for PEFT students) and `test_results.json` (`summary`,
    the number of processes, the teacher's placement, the test metrics); return the test metrics."""
    metrics = {**trainer.evaluate(test, metric_key_prefix="test"), **(extra_metrics or {})}
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        summary = {**summary, "num_processes": trainer.accelerator.num_processes}
        if hasattr(trainer, "teacher_placement"):
            summary["teacher_placement"] = trainer.teacher_placement
        with open(os.path.join(args.output_dir, "test_results.json"), "w") as f:
            json.dump({**summary, **metrics}, f, indent=2)
    return metrics


def run(script_args: ScriptArguments, args: DistillConfig, lora_args: LoraArguments | None = None) -> dict:
    """Train, evaluate on the test split, save model + tokenizer + `test_results.json`; return the test metrics.

    `args.resume_from_checkpoint="latest"` resumes from the newest complete checkpoint of `args.output_dir`, or
    starts afresh when there is none (see [`hf_kd.checkpoints.resolve_resume_checkpoint`]).

    Args:
        script_args ([`ScriptArguments`]): the data, the model and the method.
        args ([`DistillConfig`]): the training arguments (the KD fields are read by `method="kd"` only; a
            [`TinyBERTConfig`] for `method="tinybert"`).
        lora_args ([`~hf_kd.peft_utils.LoraArguments`], *optional*): a LoRA student when `use_peft` is set.

    Returns:
        `dict`: the `test_*` metrics (accuracy, ECE with 15 bins, NLL, Brier, mean entropy; sigma for KD), plus the
        `train_*` / `eval_*` ones with `script_args.report_train_sigma` and `method="kd"`.
    """
    tokenizer = AutoTokenizer.from_pretrained(
        script_args.model_name_or_path, **placed_model_kwargs(script_args.model_name_or_path)
    )
    splits = load_splits(script_args, tokenizer)
    peft_config = get_peft_config(lora_args) if lora_args is not None else None
    trainer = build_trainer(script_args, args, splits, tokenizer, peft_config)
    # --resume_from_checkpoint latest: resume from the newest complete checkpoint of output_dir, or start afresh.
    trainer.train(resume_from_checkpoint=resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir))
    extra = {}
    if script_args.report_train_sigma and script_args.method in DISTILL_METHODS:
        for split, prefix in (("train", "train"), ("validation", "eval")):
            extra.update(trainer.evaluate(splits[split], metric_key_prefix=prefix))
    summary = {"method": script_args.method, "model": script_args.model_name_or_path}
    return finish(trainer, args, splits["test"], summary, extra)


def main_job_training_args(output_dir: str, seed: int, epochs: float, **kwargs) -> DistillConfig:
    """The training arguments of the main job (`trainers/main_job.py`, teacher and student alike), also used by
    `scripts/studies/calibration_sweep_rt.py` to train its students the main job's way: lr 1e-4 with 10% warm-up,
    batch 32 (eval 128), no evaluation or checkpoints during training, a log every 25 steps, no reporting.

    Args:
        output_dir (`str`): where the run saves.
        seed (`int`): the training seed.
        epochs (`float`): `num_train_epochs`.
        kwargs: further [`DistillConfig`] fields (the KD ones: teacher, temperature, alpha, cache).
    """
    return DistillConfig(
        output_dir=output_dir,
        num_train_epochs=epochs,
        learning_rate=1e-4,
        warmup_steps=0.1,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=25,
        seed=seed,
        report_to="none",
        # Pinned memory only helps a copy to an accelerator; without one, torch's DataLoader warns at every epoch
        # (a bare `super().__init__(loader)` line in the demo's output) and pins nothing.
        dataloader_pin_memory=torch.accelerator.is_available(),
        **kwargs,
    )
