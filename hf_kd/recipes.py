"""The training recipes as functions and as `hf-kd` commands: the one implementation behind `hf-kd distill`,
`hf-kd early-exit`, `hf-kd self-kd`, the thin scripts `trainers/distill.py` and `trainers/early_exit.py`,
`trainers/main_job.py` and the studies in `scripts/studies/`.

A recipe trains a text classifier on any data [`DataArguments`] describe (one of hf_kd's offline data sets, a Hub
dataset id, a local folder, or CSV / JSON lines / Parquet files) and ends with its test metrics, saved next to the
model with its card (pushed with `--push_to_hub`). `hf-kd distill` trains with one of the modes of Sultan (2023,
https://huggingface.co/papers/2301.12609):

- `erm`: fine-tune with cross-entropy (also how a teacher is made), with the stock `transformers.Trainer`;
- `ls`: cross-entropy with label smoothing (epsilon spread over all classes), with the stock `Trainer`;
- `kd`: distil `DistillConfig.teacher_model_name_or_path` into the model with [`DistillTrainer`]. KD, born-again KD
  (Furlanello et al., 2018, https://huggingface.co/papers/1805.04770) and reverse KD differ only in the pair: big
  teacher -> small student, same architecture, small teacher -> big student;
- `tinybert`: the same with [`TinyBERTTrainer`] and [`TinyBERTConfig`], TinyBERT's intermediate-layer losses (Jiao et
  al., 2020, https://huggingface.co/papers/1909.10351; recipes `trainers/configs/tinybert_*`).

`hf-kd early-exit` trains a multi-exit model with [`EarlyExitTrainer`] (DeeBERT / PABEE,
https://huggingface.co/papers/2004.12993, https://huggingface.co/papers/2006.04152), `hf-kd self-kd` with
[`SelfKDTrainer`] (Park et al., 2024, https://huggingface.co/papers/2406.09719).

Pieces: [`DataArguments`] / [`ScriptArguments`] / [`MultiExitScriptArguments`] (the recipes' own flags),
[`load_splits`] (load, split, encode labels, cut and tokenize), [`label_kwargs`], [`build_trainer`],
[`build_multi_exit_model`], [`finish`] (test metrics, save, card, `test_results.json`), [`run`], [`run_early_exit`],
[`run_self_kd`], [`parse_args`] / [`expand_recipe`] (a YAML recipe and flags through `HfArgumentParser`), [`COMMANDS`] (the `hf-kd`
training commands) and [`main_job_training_args`] (the optimiser settings of the main job, `trainers/main_job.py`).
"""

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from . import data
from .checkpoints import resolve_resume_checkpoint
from .evaluation import record_max_length
from .metrics import make_compute_metrics
from .modeling import MultiExitConfig, MultiExitForSequenceClassification
from .offline_models import placed_model_kwargs
from .options import BuiltinDataset, RecipeMethod, to_enum
from .peft_utils import LoraArguments, get_peft_config
from .trainer import (
    DistillConfig,
    DistillTrainer,
    EarlyExitConfig,
    EarlyExitTrainer,
    SelfKDConfig,
    SelfKDTrainer,
    TinyBERTConfig,
    TinyBERTTrainer,
)

__all__ = [
    "COMMANDS",
    "DATASETS",
    "DISTILL_METHODS",
    "DataArguments",
    "MultiExitScriptArguments",
    "ScriptArguments",
    "TrainingCommand",
    "build_multi_exit_model",
    "build_trainer",
    "finish",
    "label_kwargs",
    "load_splits",
    "main_job_training_args",
    "expand_recipe",
    "parse_args",
    "run",
    "run_early_exit",
    "run_self_kd",
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
    """The data flags every recipe shares (`hf-kd distill`, `hf-kd early-exit`, `hf-kd self-kd`), named as TRL's
    `ScriptArguments` name them.

    Args:
        dataset_name (`str`, *optional*):
            One of hf_kd's offline data sets ([`~hf_kd.options.BuiltinDataset`]: `rotten_tomatoes`,
            `crowdflower_tweets`, `bbc_news`), else a Hub dataset id or a local folder, read by
            [`datasets.load_dataset`]. Defaults to `"rotten_tomatoes"` when `data_files` is not given either.
        dataset_config (`str`, *optional*):
            The configuration (subset) of a Hub dataset, `load_dataset`'s `name`.
        data_files (`list[str]`, *optional*):
            Local files instead of `dataset_name`: `SPLIT=PATH` entries (`train=train.csv validation=val.csv`), CSV,
            JSON lines or Parquet.
        dataset_train_split / dataset_eval_split / dataset_test_split (`str`, *optional*):
            The splits to train on (`"train"`), to evaluate during training (`"validation"`) and to report on at the
            end (`"test"`). A missing eval or test split is cut from the train split by a shuffle seeded with
            `split_seed` (`validation_size` and `test_size` of its rows).
        text_column (`str`, *optional*, defaults to `"text"`), text_pair_column (`str`, *optional*):
            The text, and the second text of a pair (NLI's hypothesis).
        label_column (`str`, *optional*, defaults to `"label"`):
            Class ids, or label names: names are numbered in sorted order and become the model's `id2label`.
        validation_size (`float`, *optional*, defaults to `0.1`), test_size (`float`, *optional*, defaults to `0.2`):
            Fractions of the train rows cut off for a missing eval / test split.
        max_length (`int`, *optional*, defaults to `64`):
            Truncation length in tokens.
        max_train_samples (`int`, *optional*):
            Use N training rows (of the shuffled train split); all when `None`.
        max_eval_samples (`int`, *optional*):
            Use N validation and N test rows (of the shuffled splits); all when `None`.
        split_seed (`int`, *optional*, defaults to `42`):
            Seed of the built-in loaders' split, of the cut of missing splits and of the shuffle before cutting.
        report_train_sigma (`bool`, *optional*, defaults to `False`):
            KD (`kd`, `tinybert`) only: also evaluate the training and validation splits into `test_results.json` as
            `train_*` / `eval_*` (confidence preservation sigma is defined on the training set, Vengertsev & Sherman
            2024).
    """

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "One of hf_kd's offline data sets (" + ", ".join(d.value for d in BuiltinDataset) + "), a Hub "
            "dataset id or a local folder (default: rotten_tomatoes, unless --data_files is given)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration (subset) of a Hub dataset."})
    data_files: list[str] | None = field(
        default=None,
        metadata={"help": "Local files instead of --dataset_name: SPLIT=PATH ... (CSV, JSON lines or Parquet)."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_eval_split: str = field(
        default="validation", metadata={"help": "Split evaluated during training (cut from train when missing)."}
    )
    dataset_test_split: str = field(
        default="test", metadata={"help": "Split of the final metrics (cut from train when missing)."}
    )
    text_column: str = field(default="text", metadata={"help": "Text column."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text of a pair (NLI hypothesis)."})
    label_column: str = field(default="label", metadata={"help": "Label column: class ids or label names."})
    validation_size: float = field(default=0.1, metadata={"help": "Fraction of train cut off for a missing eval split."})
    test_size: float = field(default=0.2, metadata={"help": "Fraction of train cut off for a missing test split."})
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
        if self.dataset_name is not None and self.data_files is not None:
            raise ValueError(
                f"pass --dataset_name ({self.dataset_name!r}) or --data_files ({self.data_files}), not both"
            )
        if self.dataset_name is None and self.data_files is None:
            self.dataset_name = BuiltinDataset.ROTTEN_TOMATOES
        if self.dataset_name in {d.value for d in BuiltinDataset}:
            self.dataset_name = to_enum(BuiltinDataset, self.dataset_name, "dataset_name")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None: every row), got {getattr(self, name)}")


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
    """Load the data of `script_args`, pick or cut its splits, encode its labels, cut the splits and tokenize them.

    The source is read by [`hf_kd.data.load_source`] (a built-in loader with `seed=script_args.split_seed`, a Hub id,
    a folder or local files), the splits picked by [`hf_kd.data.select_splits`] (a missing eval or test split is cut
    from train by a seeded shuffle) and the labels made a `ClassLabel` column `label` by [`hf_kd.data.encode_labels`]
    (label names numbered in sorted order; eval or test labels that train never has are an error). A split with a
    limit (`max_train_samples` for `train`, `max_eval_samples` for `validation` and `test`) is shuffled with
    `split_seed` first, then cut: the rows of a data set are often grouped by source (e.g. by movie), so a plain head
    would not be representative. Under several processes, call it inside `args.main_process_first()` (the recipes
    do): the main process reads and caches, the others then read the cache.

    Args:
        script_args ([`DataArguments`]): the source, columns, splits, limits, split seed and `max_length`.
        tokenizer: called on each batch of `text_column` (and `text_pair_column`) with `truncation=True,
            max_length=script_args.max_length`.

    Returns:
        [`~datasets.DatasetDict`]: `train`, `validation`, `test`, with the source's columns (the label column renamed
        `label`) plus the tokenizer's (`input_ids`, `attention_mask`, ...; unpadded).

    Raises:
        `ValueError`: a source that cannot be read, a missing column or split, an empty split, unseen labels.
    """
    source = data.load_source(
        script_args.dataset_name, script_args.dataset_config, script_args.data_files, seed=script_args.split_seed
    )
    splits = data.select_splits(
        source, script_args.dataset_train_split, script_args.dataset_eval_split, script_args.dataset_test_split,
        seed=script_args.split_seed, validation_size=script_args.validation_size, test_size=script_args.test_size,
    )
    splits = data.encode_labels(
        splits, script_args.label_column, (script_args.text_column, script_args.text_pair_column)
    )
    limits = {"train": script_args.max_train_samples}
    limits["validation"] = limits["test"] = script_args.max_eval_samples
    for name, limit in limits.items():
        if limit is not None:
            # Rows are grouped by source (e.g. by movie): shuffle before cutting so a slice is representative.
            shuffled = splits[name].shuffle(seed=script_args.split_seed)
            splits[name] = shuffled.select(range(min(limit, len(shuffled)))).flatten_indices()
    return data.tokenize_dataset(
        splits, tokenizer, script_args.text_column, script_args.text_pair_column, script_args.max_length
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
    """Evaluate on the test split, save the model (an adapter for PEFT students) with its model card (pushed to the
    Hub with `args.push_to_hub`) and `test_results.json` (`summary`, the number of processes, the teacher's placement,
    the test metrics); print the test metrics and where everything went; return the test metrics.

    hf_kd's trainers render their card at every save (test metrics included, they are evaluated first); the stock
    `Trainer` of `erm` / `ls` gets `Trainer.create_model_card`'s.
    """
    metrics = {**trainer.evaluate(test, metric_key_prefix="test"), **(extra_metrics or {})}
    trainer.save_model(args.output_dir)  # with args.push_to_hub, Trainer.save_model also pushes (card included)
    if type(trainer) is Trainer:
        trainer.create_model_card(dataset=getattr(trainer.train_dataset.info, "dataset_name", None))
    if trainer.is_world_process_zero():
        summary = {**summary, "num_processes": trainer.accelerator.num_processes}
        if hasattr(trainer, "teacher_placement"):
            summary["teacher_placement"] = trainer.teacher_placement
        with open(os.path.join(args.output_dir, "test_results.json"), "w") as f:
            json.dump({**summary, **metrics}, f, indent=2)
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
        print(f"Test metrics: {json.dumps(shown)}\nModel, card (README.md) and test_results.json: {args.output_dir}")
        if args.push_to_hub:
            print(f"Pushed to the Hub: {args.hub_model_id or Path(args.output_dir).absolute().name}")
    return metrics


def _train_and_finish(trainer, args, splits, summary: dict, extra_splits: tuple = ()) -> dict:
    """`trainer.train()` (`--resume_from_checkpoint latest`: from the newest complete checkpoint of `output_dir`, or
    afresh), then `extra_splits` (`(split, metric prefix)` pairs) evaluated and [`finish`]."""
    trainer.train(resume_from_checkpoint=resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir))
    extra = {}
    for split, prefix in extra_splits:
        extra.update(trainer.evaluate(splits[split], metric_key_prefix=prefix))
    return finish(trainer, args, splits["test"], summary, extra)


def _tokenizer_and_splits(script_args: DataArguments, args: TrainingArguments):
    name = script_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(name, **placed_model_kwargs(name))
    # The main process reads (and datasets caches) the data first, the others then read the cache.
    with args.main_process_first(desc="loading and tokenizing the data"):
        splits = load_splits(script_args, tokenizer)
    return tokenizer, splits


def run(script_args: ScriptArguments, args: DistillConfig, lora_args: LoraArguments | None = None) -> dict:
    """Train, evaluate on the test split, save model + tokenizer + card + `test_results.json`; return the test
    metrics. The recipe of `hf-kd distill`.

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
    tokenizer, splits = _tokenizer_and_splits(script_args, args)
    peft_config = get_peft_config(lora_args) if lora_args is not None else None
    trainer = build_trainer(script_args, args, splits, tokenizer, peft_config)
    extra = ()
    if script_args.report_train_sigma and script_args.method in DISTILL_METHODS:
        extra = (("train", "train"), ("validation", "eval"))
    summary = {"method": script_args.method, "model": script_args.model_name_or_path}
    return _train_and_finish(trainer, args, splits, summary, extra)


@dataclass
class MultiExitScriptArguments(DataArguments):
    """The flags of `hf-kd early-exit` and `hf-kd self-kd` besides their config's: [`DataArguments`] and

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"sentence-transformers/paraphrase-MiniLM-L3-v2"`):
            An encoder to put exits on, or a saved multi-exit model (trained further as it is).
        exit_layers (`list[int]`, *optional*):
            1-based layers followed by an exit (the last layer always is); every layer when `None`.
    """

    model_name_or_path: str = field(
        default="sentence-transformers/paraphrase-MiniLM-L3-v2",
        metadata={"help": "Encoder to put exits on (Hub id or path), or a saved multi-exit model."},
    )
    exit_layers: list[int] | None = field(
        default=None, metadata={"help": "1-based layers followed by an exit (the last layer always is); default: all."}
    )


def build_multi_exit_model(script_args: MultiExitScriptArguments, args: TrainingArguments, splits, peft: bool):
    """A saved multi-exit model as is, or exits on an encoder ([`MultiExitForSequenceClassification.from_backbone`],
    labels from `splits`). A LoRA adapter names the model it adapts: exits built here are saved to
    `<output_dir>/base_model` first, so that the adapter reloads onto them."""
    name = script_args.model_name_or_path
    if AutoConfig.from_pretrained(name, **placed_model_kwargs(name)).model_type == MultiExitConfig.model_type:
        return AutoModelForSequenceClassification.from_pretrained(name, **placed_model_kwargs(name, model=True))
    set_seed(args.seed)  # fresh exit heads: the same initialisation on every process count and launcher
    model = MultiExitForSequenceClassification.from_backbone(
        name, exit_layers=script_args.exit_layers, backbone_kwargs=placed_model_kwargs(name, model=True),
        **label_kwargs(splits),
    )
    if peft:
        base = Path(args.output_dir) / "base_model"
        if args.should_save:
            model.save_pretrained(base)
        model.config._name_or_path = str(base)  # every process built the same model (same seed)
    return model


def _run_multi_exit(trainer_class, script_args, args, lora_args, summary: dict) -> dict:
    tokenizer, splits = _tokenizer_and_splits(script_args, args)
    peft_config = get_peft_config(lora_args) if lora_args is not None else None
    model = build_multi_exit_model(script_args, args, splits, peft=peft_config is not None)
    record_max_length(model.config, script_args.max_length)  # `hf-kd evaluate` then truncates as this run did
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        peft_config=peft_config,
    )
    return _train_and_finish(trainer, args, splits, {**summary, "model": script_args.model_name_or_path})


def run_early_exit(
    script_args: MultiExitScriptArguments, args: EarlyExitConfig, lora_args: LoraArguments | None = None
) -> dict:
    """Train a multi-exit classifier with [`EarlyExitTrainer`] (every exit jointly; `args.distill_from` adds a
    teacher or the final exit as the exits' teacher), evaluate on the test split, save; the recipe of
    `hf-kd early-exit`. Returns the test metrics (final exit: accuracy, ECE with 15 bins, NLL, Brier, entropy; every
    exit's accuracy, ECE and entropy)."""
    return _run_multi_exit(
        EarlyExitTrainer, script_args, args, lora_args, {"method": "early_exit", "distill_from": args.distill_from}
    )


def run_self_kd(
    script_args: MultiExitScriptArguments, args: SelfKDConfig, lora_args: LoraArguments | None = None
) -> dict:
    """Self-knowledge distillation from lower layers (Park et al., 2024, https://huggingface.co/papers/2406.09719)
    with [`SelfKDTrainer`] on exits after every layer of an encoder (the source layer is selected on the validation
    split), evaluated on the test split and saved; the recipe of `hf-kd self-kd`. Returns the test metrics."""
    return _run_multi_exit(SelfKDTrainer, script_args, args, lora_args, {"method": "self_kd"})


# --------------------------------------------------------------------------------------------------------------------
# The command line: a YAML recipe and flags, parsed by HfArgumentParser
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None, dataclass_types: tuple[type, ...]) -> tuple:
    """Parse `[recipe.yaml | --config recipe.yaml] [--flag value ...]` into `dataclass_types`: the YAML recipe's keys
    as flags, overridden by the flags given on the command line (as `trl <command> --config` does).

    Args:
        argv (`list[str]`, *optional*): the arguments; `sys.argv[1:]` when `None`. The `deepspeed` launcher's
            `--local_rank=N` may come first.
        dataclass_types (`tuple[type, ...]`): e.g. `(ScriptArguments, DistillConfig, LoraArguments)`.

    Returns:
        `tuple`: one instance per dataclass type.

    Raises:
        `FileNotFoundError`: a recipe file that does not exist. `ValueError`: a recipe that is not a YAML mapping.
    """
    parser = HfArgumentParser(dataclass_types)
    # For --help only (expand_recipe reads it): SUPPRESS keeps it out of the namespace, so no extra output is returned.
    parser.add_argument(
        "--config", default=argparse.SUPPRESS, help="A YAML recipe (flag: value); the flags given here override it."
    )
    return parser.parse_args_into_dataclasses(args=expand_recipe(sys.argv[1:] if argv is None else argv))


def expand_recipe(argv: list[str]) -> list[str]:
    """`argv` with its YAML recipe (first argument ending in `.yaml` / `.yml`, or `--config PATH`) replaced by the
    recipe's keys as flags, put first so that the other flags override them (a list value becomes several values, a
    dict its JSON); the `deepspeed` launcher's `--local_rank=N` moved last."""
    argv = list(argv)
    # The `deepspeed` launcher puts --local_rank=N before the script's own arguments.
    launcher = [a for a in argv if a.startswith("--local_rank=")]
    argv = [a for a in argv if not a.startswith("--local_rank=")] + launcher
    recipe = None
    if argv and argv[0].endswith((".yaml", ".yml")):
        recipe, argv = argv[0], argv[1:]
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            recipe, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
            break
        if arg.startswith("--config="):
            recipe, argv = arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
            break
    if recipe is None:
        return argv
    import yaml

    if not Path(recipe).is_file():
        raise FileNotFoundError(f"recipe file not found: {recipe}")
    with open(recipe) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ValueError(f"a recipe is a YAML mapping of flag: value, got {type(config).__name__} in {recipe}")
    flags = []
    for key, value in config.items():
        if isinstance(value, list):
            flags += [f"--{key}", *map(str, value)]
        else:
            flags += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags + argv


def distill_dataclass_types(argv: list[str]) -> tuple[type, ...]:
    """`(ScriptArguments, <the method's config>, LoraArguments)`: [`TinyBERTConfig`] for `--method tinybert` (on the
    command line or in the recipe), [`DistillConfig`] otherwise."""
    flags = expand_recipe(argv)
    # The last --method wins, as in argparse; --method=x is read too.
    method = "kd"
    for i, arg in enumerate(flags):
        if arg == "--method" and i + 1 < len(flags):
            method = flags[i + 1]
        elif arg.startswith("--method="):
            method = arg.split("=", 1)[1]
    return (ScriptArguments, DISTILL_METHODS.get(method, (DistillConfig,))[0], LoraArguments)


@dataclass(frozen=True)
class TrainingCommand:
    """One `hf-kd` training command: what its flags are parsed into, and the recipe that runs them.

    Args:
        help (`str`): one line for `hf-kd --help`.
        dataclass_types (`Callable[[list[str]], tuple[type, ...]]`): the dataclasses of the arguments (which may
            depend on them, e.g. the config of `--method`); the first is the script's own, the second a
            `TrainingArguments` subclass.
        run (`Callable`): called with the parsed dataclasses; returns the test metrics.
    """

    help: str
    dataclass_types: Callable[[list[str]], tuple[type, ...]]
    run: Callable[..., dict]

    def main(self, argv: list[str] | None = None) -> dict:
        """Parse `argv` ([`parse_args`]), run the recipe, end the process group (`accelerate launch`, `deepspeed`)."""
        from .distributed import end_distributed

        argv = sys.argv[1:] if argv is None else list(argv)
        metrics = self.run(*parse_args(argv, self.dataclass_types(argv)))
        end_distributed()
        return metrics


COMMANDS = {
    "distill": TrainingCommand(
        "Train a classifier: --method erm | ls | kd | tinybert (DistillTrainer, TinyBERTTrainer).",
        distill_dataclass_types,
        run,
    ),
    "early-exit": TrainingCommand(
        "Train a multi-exit classifier (EarlyExitTrainer: DeeBERT / PABEE, --distill_from).",
        lambda argv: (MultiExitScriptArguments, EarlyExitConfig, LoraArguments),
        run_early_exit,
    ),
    "self-kd": TrainingCommand(
        "Self-knowledge distillation from lower layers (SelfKDTrainer, Park et al. 2024).",
        lambda argv: (MultiExitScriptArguments, SelfKDConfig, LoraArguments),
        run_self_kd,
    ),
}
"""The `hf-kd` training commands by name (see `hf_kd.cli`): each parses a YAML recipe and/or flags and runs its
recipe. A new one is one more [`TrainingCommand`] here, or in its own module listed in `hf_kd.cli`."""


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
