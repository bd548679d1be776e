"""`_BaseTrainer`: what every hf_kd trainer adds to [`~transformers.Trainer`] besides its loss: PEFT students, logged
loss parts, the model card.

Logged loss parts: a trainer's `compute_loss` appends detached scalars to `self._metrics[mode][name]`; `log()` logs
their mean over this process's batches since the last log, prefixed at evaluation with its `metric_key_prefix`
(`eval_`, `test_`, ...), as TRL's trainers do. Losses are normalised by `num_items_in_batch` in `compute_loss`
(`model_accepts_loss_kwargs = True`) and rescaled for DDP by [`~_BaseTrainer._scale_for_processes`].

PEFT: `peft_config=` wraps the student with [`hf_kd.peft_utils.prepare_peft_model`] before `Trainer.__init__` (as TRL
does), so that hf_kd's heads train and are saved with the adapter; an already wrapped `PeftModel` is checked for
frozen heads. A saved adapter points at its base model's Hub id whenever the base came from the Hub.

Model cards: whenever a model is saved (`save_model`, each checkpoint, and
`push_to_hub`), the main process renders hf_kd's card (see [`hf_kd.hub.generate_model_card`]) into the saved folder
and into `output_dir`, with a `model-index` built from the latest evaluation metrics in `state.log_history`:
calibration metrics included, which the stock `Trainer.create_model_card` drops. `trainer.push_to_hub()` calls
[`_BaseTrainer.create_model_card`], so it pushes this card rather than overwriting it with the stock one.

Faults ([`hf_kd.checkpoints`]): before anything is built, `output_dir` must be writable and, when checkpoints are
saved, its disk must have room for one; `train(resume_from_checkpoint=...)` also takes `"latest"` (resume if there is
a checkpoint, else start afresh) and `args.resume_from_checkpoint` when the argument is not given, skips incomplete
checkpoints, and checks every file of the checkpoint before any is loaded.

Bad data ([`check_dataset`]): the train and eval datasets (and those given to `evaluate` / `predict`) are checked when
the trainer is built, before the teacher or any step runs: a dataset type, at least one row, labels in
`[0, num_labels)` or `-100`, and a `teacher_logits` column of `num_labels` finite values per row.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from ..checkpoints import check_output_dir, checkpoint_bytes, resolve_resume_checkpoint
from ..distributed import fill_auto_bucket_sizes
from ..hub import generate_model_card, pipeline_tag_of, save_model_card
from ..metric_keys import split_metric_key
from ..peft_utils import is_peft_model, point_adapter_at_hub_base, prepare_peft_model
from ..teacher import TEACHER_LOGITS_COLUMN, check_datasets_label_names, check_label_names

# The columns Trainer feeds to the loss as gold labels: `label` is renamed `labels` by the default collators.
_LABEL_COLUMNS = ("labels", "label")


def is_causal_lm(model) -> bool:
    """
    Whether hf_kd treats `model` as a causal language model: its Hub task ([`hf_kd.hub.pipeline_tag_of`]) is
    `"text-generation"`, i.e. its class (a PEFT model's base model's) or its config's `architectures` ends in
    `ForCausalLM`. The one rule every trainer uses to pick the token-level loss, checks and metrics.
    """
    try:
        return pipeline_tag_of(model) == "text-generation"
    except ValueError:
        return False


def check_dataset(dataset, split: str, num_labels: int | None, lm_vocab_size: int | None = None) -> None:
    """
    Check a dataset given to an hf_kd trainer before anything is computed on it, so that bad data fails when the
    trainer is built, naming the row and the value, instead of as an `IndexError` from `cross_entropy` in the middle
    of an epoch (or, for a non-finite teacher logit, as a NaN loss that trains nothing).

    Args:
        dataset (`datasets.Dataset`, `torch.utils.data.Dataset`, `IterableDataset` or a list of dicts):
            The data; `None` (no such split) is accepted.
        split (`str`):
            `"train_dataset"`, `"eval_dataset"` or `"eval_dataset['<name>']"`, for the messages.
        num_labels (`int`, *optional*):
            The student's number of classes; labels must be in `[0, num_labels)` or `-100` (ignored).
        lm_vocab_size (`int`, *optional*):
            Set for a causal-LM student (its vocabulary size; `num_labels` is then ignored): every row must have
            `labels`, a sequence of token ids in `[0, lm_vocab_size)` or `-100` (not trained on) with at least one
            counted token after the first (the first token is never predicted), as
            [`hf_kd.lm_data.tokenize_lm_dataset`] makes them; a `teacher_logits` column is not supported yet.

    Raises:
        `TypeError`: not a dataset. `ValueError`: no rows; a label that is not an integer class index in
        `[0, num_labels)` or `-100`; a `teacher_logits` column whose rows are not `num_labels` finite numbers; token
        labels given to a classifier, class labels given to a causal LM, or an LM row with no counted token.
    """
    import datasets
    import numpy as np
    from torch.utils.data import Dataset, IterableDataset

    if dataset is None or isinstance(dataset, (datasets.IterableDataset, IterableDataset)):
        return  # a stream cannot be checked up front
    if isinstance(dataset, datasets.DatasetDict):
        raise TypeError(f"{split} is a DatasetDict with splits {list(dataset)}: pass one split, e.g. {split}['train'].")
    is_rows = isinstance(dataset, (list, tuple)) and all(isinstance(row, dict) for row in dataset)
    if not isinstance(dataset, (datasets.Dataset, Dataset)) and not is_rows:
        kind = type(dataset).__name__
        if isinstance(dataset, (list, tuple)) and dataset:
            kind += f" of {type(dataset[0]).__name__}"
        raise TypeError(
            f"{split} must be a datasets.Dataset, a torch Dataset or a list of dicts (one per row), got {kind}"
        )
    if len(dataset) == 0:
        raise ValueError(f"{split} has no rows: pass a non-empty dataset (or None to skip this split).")
    if not isinstance(dataset, datasets.Dataset):
        return  # a map-style torch Dataset is read lazily: its rows are checked by the loss

    def column(name: str) -> np.ndarray:
        # One column, read as a whole (numpy format: a (rows, K) array for equal-length lists, else dtype object).
        return dataset.select_columns([name]).with_format("numpy")[:][name]

    label_column = next((c for c in _LABEL_COLUMNS if c in dataset.column_names), None)
    if lm_vocab_size is not None:
        _check_lm_dataset(dataset, split, label_column, lm_vocab_size, column)
        return
    if label_column is not None and num_labels is not None:
        labels = column(label_column)
        if labels.dtype == object or labels.ndim != 1:
            raise ValueError(
                f"{split} column {label_column!r} must hold one integer class index per row, got "
                f"{dataset.features[label_column]}. Token labels per row are causal-LM data: distil a causal LM "
                "(an ...ForCausalLM student and teacher) on it."
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{split} column {label_column!r} must hold integer class indices in [0, {num_labels}) or -100, got "
                f"dtype {labels.dtype} (e.g. {labels[0].item()!r} in row 0)"
            )
        bad = np.flatnonzero(((labels < 0) | (labels >= num_labels)) & (labels != -100))
        if bad.size:
            raise ValueError(
                f"{split} column {label_column!r} has label {labels[bad[0]]} in row {bad[0]} ({bad.size} bad row(s)): "
                f"labels must be in [0, {num_labels}) (the student's num_labels) or -100 (ignored)"
            )
    if TEACHER_LOGITS_COLUMN in dataset.column_names:
        logits = column(TEACHER_LOGITS_COLUMN)
        if logits.dtype == object or logits.ndim != 2 or (num_labels is not None and logits.shape[1] != num_labels):
            raise ValueError(
                f"{split} column {TEACHER_LOGITS_COLUMN!r} must hold {num_labels or 'num_labels'} teacher logits per "
                f"row (shape ({len(dataset)}, {num_labels or 'num_labels'})), got "
                f"{logits.shape if logits.dtype != object else 'rows of different lengths'}"
            )
        rows = np.flatnonzero(~np.isfinite(logits).all(axis=1))
        if rows.size:
            raise ValueError(
                f"{split} column {TEACHER_LOGITS_COLUMN!r} has a non-finite value in row {rows[0]} "
                f"({logits[rows[0]].tolist()}; {rows.size} bad row(s)): teacher logits must be finite. Recompute them "
                "(an fp16 teacher overflows: run it in fp32 or bf16)."
            )


def _check_lm_dataset(dataset, split: str, label_column: str | None, vocab_size: int, column) -> None:
    """The causal-LM half of [`check_dataset`]."""
    import numpy as np

    if TEACHER_LOGITS_COLUMN in dataset.column_names:
        raise ValueError(
            f"{split} has a {TEACHER_LOGITS_COLUMN!r} column, which is not supported yet for causal-LM students "
            "(a top-k logit cache is planned): drop the column; the teacher runs live at every step."
        )
    if label_column is None:
        raise ValueError(
            f"{split} has no 'labels' column (columns: {dataset.column_names}): a causal-LM student needs token "
            "labels with -100 on the prompt tokens, as hf_kd.lm_data.tokenize_lm_dataset makes them."
        )
    if label_column == "labels" and "label" in dataset.column_names:
        raise ValueError(
            f"{split} has both 'labels' (token labels) and 'label' columns: collators and Trainer read 'label' as the "
            "labels when it is there. Drop the 'label' column (dataset.remove_columns('label'))."
        )
    labels = column(label_column)
    if labels.dtype != object and labels.ndim == 1:
        raise ValueError(
            f"{split} column {label_column!r} holds one class index per row ({dataset.features[label_column]}), but "
            "the student is a causal LM, which needs a sequence of token labels per row "
            "(hf_kd.lm_data.tokenize_lm_dataset). For class labels, distil a sequence classifier."
        )
    for row, tokens in enumerate(labels):
        tokens = np.asarray(tokens)
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{split} column {label_column!r} row {row} must hold integer token ids, got {tokens.dtype}")
        bad = np.flatnonzero(((tokens < 0) | (tokens >= vocab_size)) & (tokens != -100))
        if bad.size:
            raise ValueError(
                f"{split} column {label_column!r} has token label {tokens[bad[0]]} in row {row}: labels must be token "
                f"ids in [0, {vocab_size}) (the student's vocab_size) or -100 (not trained on)"
            )
        if not (tokens[1:] != -100).any():
            raise ValueError(
                f"{split} row {row} has an empty completion: no token after the first is labelled (every label is "
                "-100), so there is nothing to distil. Drop such rows (dataset.filter) or check the tokenisation."
            )


# The columns of TRL's dataset formats ([`hf_kd.lm_data.tokenize_lm_dataset`] reads them) and what it makes of them.
_LM_FORMAT_COLUMNS = ("text", "messages", "prompt")
_LM_TOKENIZED_COLUMNS = ("input_ids", "attention_mask", "labels")


def map_datasets(dataset, split: str, prepare):
    """`prepare(dataset, split)` on a `datasets.Dataset`, on each of a dict of them (the split named
    `split[name]`); anything else (a torch dataset, a stream, `None`) as it is."""
    import datasets

    if isinstance(dataset, dict) and not isinstance(dataset, datasets.DatasetDict):
        return {name: map_datasets(d, f"{split}[{name!r}]", prepare) for name, d in dataset.items()}
    return prepare(dataset, split) if isinstance(dataset, datasets.Dataset) else dataset


def tokenized_by_trainer(split: str, tokenize):
    """`tokenize()`, its `ValueError` naming the split and the length option (the trainer tokenizes the user's rows,
    so the error must say which rows and which setting)."""
    try:
        return tokenize()
    except ValueError as error:
        raise ValueError(f"{split}: {error} (the trainer's tokenization: DistillConfig.lm_max_length)") from None


def prepare_lm_dataset(dataset, split: str, tokenizer, max_length: int):
    """
    A causal-LM student's dataset as the trainer reads it: a `datasets.Dataset` in one of TRL's `SFTTrainer` formats
    (a `text`, `messages` or `prompt` (+ `completion`) column, and no `input_ids`) is tokenized with
    [`hf_kd.lm_data.tokenize_lm_dataset`] (completion-only labels, rows cut to `max_length` tokens on the right, a
    prompt that leaves no completion token refused) and reduced to `input_ids`, `attention_mask` and `labels` (other
    columns, e.g. a class `label`, are dropped, as SFTTrainer drops what its collator does not read). Anything else
    (pre-tokenized data, a torch dataset, a stream, `None`) is returned as is; a dict of datasets is prepared per name.

    Raises:
        `ValueError`: data in a TRL format without a tokenizer, or a row `tokenize_lm_dataset` refuses (named with its
        split and row).
    """

    def prepare(dataset, split):
        found = [column for column in _LM_FORMAT_COLUMNS if column in dataset.column_names]
        if "input_ids" in dataset.column_names or not found:
            return dataset
        if tokenizer is None:
            raise ValueError(
                f"{split} has a {found[0]!r} column (TRL's dataset format) and no 'input_ids': pass "
                "processing_class=<the student's tokenizer> so that the trainer tokenizes it, or tokenize it yourself "
                "(hf_kd.lm_data.tokenize_lm_dataset)."
            )
        from ..lm_data import tokenize_lm_dataset

        tokenized = tokenized_by_trainer(
            split, lambda: tokenize_lm_dataset(dataset, getattr(tokenizer, "tokenizer", tokenizer), max_length)
        )
        return tokenized.select_columns([c for c in _LM_TOKENIZED_COLUMNS if c in tokenized.column_names])

    return map_datasets(dataset, split, prepare)


def default_lm_data_collator(tokenizer, model):
    """
    The data collator of a causal-LM student when none is given: [`hf_kd.lm_data.LMDataCollator`], right-padding
    `input_ids` with the tokenizer's pad token (its EOS token when it has none), `attention_mask` with 0 and `labels`
    with -100. Without a tokenizer, the student's `config.pad_token_id` (else `eos_token_id`) pads.

    Raises:
        `ValueError`: no pad or EOS token to pad with, naming the fix.
    """
    from ..lm_data import LMDataCollator

    if tokenizer is not None:
        return LMDataCollator.for_tokenizer(getattr(tokenizer, "tokenizer", tokenizer))
    config = getattr(model, "config", None)
    pad = next((i for i in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None))
                if isinstance(i, int)), None)
    if pad is None:
        raise ValueError(
            f"No tokenizer and the student's config ({type(model).__name__}) has no pad_token_id or eos_token_id to "
            "pad causal-LM batches with: pass processing_class=<the student's tokenizer>, or "
            "data_collator=hf_kd.lm_data.LMDataCollator(pad_token_id=...)."
        )
    return LMDataCollator(pad)


class _BaseTrainer(Trainer):
    """
    Base class of hf_kd trainers: [`~transformers.Trainer`] plus PEFT students and hf_kd model cards.

    Subclasses set `_tag_names` (card tags), `_name` (method name), `_paper` (`{"title", "id", "citation"}`) and,
    when they report method-specific settings, override [`~_BaseTrainer._model_card_info`]. They pass `peft_config`
    through to this `__init__` (keyword), which every hf_kd trainer accepts. `_extra_columns` names the dataset
    columns their `compute_loss` pops (e.g. `teacher_logits`), kept through Trainer's removal of the columns the
    model's forward does not take. Loss parts appended to `self._metrics[mode][name]` in `compute_loss` are logged
    (see the module docstring).

    Args:
        model (`nn.Module`):
            The student; a `peft.PeftModel` is accepted as is (without `peft_config`).
        args ([`~transformers.TrainingArguments`]):
            The run's arguments.
        peft_config (`peft.PeftConfig`, *optional*):
            Train a PEFT adapter (e.g. `peft.LoraConfig(r=8)`) on the student instead of all its weights; the
            student's heads are trained in full and saved with the adapter ([`hf_kd.peft_utils.prepare_peft_model`]).
            Needs `pip install hf_kd[peft]`.

        The other arguments are those of [`~transformers.Trainer`].
    """

    _tag_names: list[str] = []
    _name: str = "Fine-tuning"
    _paper: dict = {}
    _model_card_template: str | None = None  # None: the template of the model's task (hf_kd.hub.TASKS)
    _resumed_from: str | None = None  # the checkpoint folder of the current train(), for error messages
    _extra_columns: tuple[str, ...] = ()
    _eval_prefix: str | None = None  # the metric_key_prefix of the evaluation in progress, for log()

    def __init__(self, model=None, args=None, *positional, peft_config=None, **kwargs):
        if model is None and peft_config is not None:
            raise ValueError("peft_config needs the student `model` (model_init cannot be combined with peft_config).")
        if args is not None and args.should_save:
            # Before the datasets, the teacher and its cache are built: a run that could not save fails in a second.
            saves_checkpoints = args.save_strategy != "no"
            needed = checkpoint_bytes(model, with_optimizer=not args.save_only_model) if model is not None else 0
            check_output_dir(args.output_dir, needed if saves_checkpoints else 0)
        if model is not None:
            model = prepare_peft_model(model, peft_config, seed=getattr(args, "seed", None))
        super().__init__(model, args, *positional, **kwargs)
        self._check_datasets()
        if self.is_deepspeed_enabled and self.model is not None:
            fill_auto_bucket_sizes(
                self.accelerator.state.deepspeed_plugin.hf_ds_config,
                getattr(self.accelerator.unwrap_model(self.model), "config", None),
            )
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        # hf_kd's compute_loss normalises by `num_items_in_batch` itself: declaring loss kwargs makes Trainer count
        # the items of the accumulated batch and skip its own division by the accumulation steps.
        self.model_accepts_loss_kwargs = True

    def _student_num_labels(self) -> int | None:
        if self.model is None:
            return None
        return getattr(getattr(self.accelerator.unwrap_model(self.model), "config", None), "num_labels", None)

    def _student_lm_vocab_size(self) -> int | None:
        """The vocabulary size of a causal-LM student (see [`is_causal_lm`]), `None` for any other student."""
        if self.model is None:
            return None
        student = self.accelerator.unwrap_model(self.model)
        return student.config.vocab_size if is_causal_lm(student) else None

    def _check_dataset(self, dataset, split: str) -> None:
        """[`check_dataset`] against the student: its `num_labels`, or its vocabulary for a causal LM."""
        check_dataset(dataset, split, self._student_num_labels(), self._student_lm_vocab_size())

    def _check_datasets(self) -> None:
        """[`check_dataset`] on the train and eval datasets, against the student."""
        self._check_dataset(self.train_dataset, "train_dataset")
        if isinstance(self.eval_dataset, dict):
            for name, dataset in self.eval_dataset.items():
                self._check_dataset(dataset, f"eval_dataset[{name!r}]")
        else:
            self._check_dataset(self.eval_dataset, "eval_dataset")
        check_datasets_label_names(self.train_dataset, self.eval_dataset, self._label_spaces())

    def _label_spaces(self) -> dict:
        """The models whose `label2id` the datasets' `ClassLabel` names must follow ([`check_label_names`]): the
        student, and the teacher once a trainer with one has read its config (`_teacher_config`)."""
        student = None if self.model is None else getattr(self.accelerator.unwrap_model(self.model), "config", None)
        return {"student": student, "teacher": getattr(self, "_teacher_config", None)}

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """
        [`~transformers.Trainer.train`], resuming safely.

        Args:
            resume_from_checkpoint (`str` or `bool`, *optional*, defaults to `args.resume_from_checkpoint`):
                `True`: the newest complete checkpoint of `output_dir` (an error if none); `"latest"`: the same, or
                a fresh start when there is none yet; a path: that checkpoint. Checkpoints whose save was cut off
                (no `trainer_state.json`) are skipped, and every file of the chosen one is checked before anything
                is loaded ([`hf_kd.checkpoints.verify_checkpoint`]): a truncated or damaged file is an error naming
                it, never used.
        """
        if resume_from_checkpoint is None:
            resume_from_checkpoint = self.args.resume_from_checkpoint
        self._resumed_from = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        return super().train(self._resumed_from, trial, ignore_keys_for_eval, **kwargs)

    def _scale_for_processes(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """The loss normalised by `num_items_in_batch` (see `model_accepts_loss_kwargs`), rescaled for DDP's gradient
        averaging."""
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts the items of every process; DDP averages gradients over processes.
            return loss * self.accelerator.num_processes
        return loss

    def _with_eval_columns(self, dataset, split: str):
        """`dataset` as `evaluate`/`predict` should read it: a trainer whose loss needs columns computed from the data
        (the cached teacher logits, see [`_TeacherMixin`]) adds them here. Returns `dataset` itself by default."""
        return dataset

    def _prepare_lm_data(self, dataset, split: str):
        """[`prepare_lm_dataset`] for a causal-LM student whose config has an `lm_max_length` ([`DistillConfig`]):
        data in TRL's formats given to `evaluate`/`predict` is tokenized like the datasets given at init."""
        max_length = getattr(self.args, "lm_max_length", None)
        if max_length is None or self._student_lm_vocab_size() is None:
            return dataset
        return prepare_lm_dataset(dataset, split, self.processing_class, max_length)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._prepare_lm_data(eval_dataset, "eval_dataset")
            eval_dataset = self._with_eval_columns(eval_dataset, metric_key_prefix)
        # The datasets given at init were checked then; Trainer.evaluate of a dict of them calls this again with each
        # one at every evaluation, which must not re-read their columns.
        given = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else (self.eval_dataset,)
        if eval_dataset is not None and not isinstance(eval_dataset, str) and all(eval_dataset is not d for d in given):
            self._check_dataset(eval_dataset, "eval_dataset")
            check_label_names(eval_dataset, "eval_dataset", self._label_spaces())
        # log() must know which evaluation it is logging (a "test" or "train" split's metrics start with its prefix,
        # not "eval_"); Trainer.evaluate of a dict of datasets calls this again per dataset, hence the restore.
        outer, self._eval_prefix = self._eval_prefix, metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._eval_prefix = outer

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        test_dataset = self._with_eval_columns(self._prepare_lm_data(test_dataset, "test_dataset"), metric_key_prefix)
        self._check_dataset(test_dataset, "test_dataset")
        check_label_names(test_dataset, "test_dataset", self._label_spaces())
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self._eval_prefix is None else "eval"
        prefix = "" if self._eval_prefix is None else f"{self._eval_prefix}_"
        for key, values in self._metrics[mode].items():
            if values:
                # Mean over this process's batches since the last log (no collective here: a rank with no batch
                # would hang the others).
                logs[prefix + key] = torch.stack(values).mean().item()
        self._metrics[mode].clear()
        super().log(logs, start_time)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns += list(self._extra_columns)

    def _model_card_info(self) -> dict[str, Any]:
        """Method-specific card fields: `teacher_model` (id or path), `hyperparameters` (a dict), `layer_selection`
        (self-distillation's source-layer selection) and `exit_calibration` (an early-exit causal LM's per-exit
        temperatures), see [`hf_kd.hub.generate_model_card`]."""
        return {}

    def latest_eval_metrics(self) -> dict[str, dict[str, float]]:
        """
        The latest value of every card metric per evaluation prefix in `state.log_history`: `{"eval": {...},
        "test": {...}}` (`eval` is the `eval_dataset`, other prefixes come from `metric_key_prefix`).
        """
        by_split: dict[str, dict[str, float]] = {}
        for entry in reversed(self.state.log_history):
            found: dict[str, dict[str, float]] = {}
            for key, value in entry.items():
                parsed = split_metric_key(key)
                if parsed is not None and parsed[0] not in by_split:
                    found.setdefault(parsed[0], {})[parsed[1]] = value
            for split, metrics in found.items():
                by_split.setdefault(split, metrics)
        # log_history was read newest first: list the splits in the order they were first evaluated.
        return dict(reversed(list(by_split.items())))

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        language: str | list[str] | None = None,
        license: str | None = None,
        finetuned_from: str | None = None,
        dataset: str | None = None,
        output_dir: str | os.PathLike | None = None,
    ) -> None:
        """
        Write hf_kd's model card to `output_dir/README.md` (default `args.output_dir`) on the main process.

        Args:
            model_name (`str`, *optional*):
                Defaults to the last part of `args.hub_model_id`, else the name of `args.output_dir`.
            dataset_name (`str`, *optional*):
                Dataset of the `model-index` (a Hub id where there is one; it then also goes to `datasets`).
                Defaults to the training set's `info.dataset_name`, else `"custom"`.
            tags (`str` or `list[str]`, *optional*):
                Extra tags, added to `hf_kd` and the trainer's `_tag_names`.
            language (`str` or `list[str]`, *optional*):
                Language code(s).
            license (`str`, *optional*):
                License id.
            finetuned_from (`str`, *optional*):
                `base_model`; defaults to the model's `config._name_or_path` (local paths are never written).
            dataset (`str`, *optional*):
                Alias of `dataset_name`, the name [`~transformers.Trainer.create_model_card`] uses.
            output_dir (`str` or `os.PathLike`, *optional*):
                Folder to write the card into.
        """
        if not self.args.should_save:
            return
        if model_name is None:
            model_name = (
                self.args.hub_model_id.split("/")[-1]
                if self.args.hub_model_id
                else Path(self.args.output_dir).absolute().name
            )
        dataset_name = dataset_name or dataset
        if dataset_name is None:
            info = getattr(self.train_dataset, "info", None)
            dataset_name = getattr(info, "dataset_name", None)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        unwrapped = self.accelerator.unwrap_model(self.model)
        config = unwrapped.config
        calibration = None
        hf_kd_config = getattr(config, "hf_kd", None) or {}
        if hf_kd_config.get("temperature") is not None:
            calibration = {k: hf_kd_config.get(k) for k in ("temperature", "calibrated_on", "objective")}
        info = self._model_card_info()
        card = generate_model_card(
            model_name,
            base_model=finetuned_from or getattr(config, "_name_or_path", None) or None,
            teacher_model=info.get("teacher_model"),
            method_name=self._name,
            trainer_name=type(self).__name__,
            paper=self._paper or None,
            hyperparameters=info.get("hyperparameters"),
            layer_selection=info.get("layer_selection"),
            metrics_by_split=self.latest_eval_metrics(),
            dataset_type=dataset_name or "custom",
            dataset_name=dataset_name or "Custom dataset",
            datasets=dataset_name,
            calibration=calibration,
            exit_calibration=info.get("exit_calibration"),
            hub_model_id=self.args.hub_model_id,
            tags=list(self._tag_names) + tags,
            license=license,
            language=language,
            template=self._model_card_template,
            library_name="peft" if is_peft_model(unwrapped) else "transformers",
            pipeline_tag=pipeline_tag_of(unwrapped),
        )
        save_model_card(card, output_dir if output_dir is not None else self.args.output_dir)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.hub_token is not None:
            # Trainer pickles TrainingArguments, hub_token included, into training_args.bin, which push_to_hub
            # uploads: save it again without the token.
            args = copy.copy(self.args)
            args.hub_token = None
            torch.save(args, os.path.join(output_dir, "training_args.bin"))
        point_adapter_at_hub_base(output_dir)  # PEFT writes the base model's local path, if it was loaded from one
        self.create_model_card(output_dir=output_dir)  # replaces PEFT's own card

    def _save_checkpoint(self, model, trial) -> None:
        # Refresh output_dir/README.md before the checkpoint is saved (and possibly pushed from output_dir); the
        # checkpoint folder gets its own card through _save.
        self.create_model_card()
        super()._save_checkpoint(model, trial)
