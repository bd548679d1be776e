from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
from torch import nn
from transformers import AutoConfig

from ..losses import kd_loss
from ..metrics import make_compute_metrics
from ..teacher import (
    TEACHER_INPUT_NAMES,
    TEACHER_LOGITS_COLUMN,
    TeacherLogitsCache,
    check_label_spaces,
    check_vocabularies,
    compute_teacher_logits,
    dataset_fingerprint,
    load_teacher,
    load_teacher_tokenizer,
    teacher_fingerprint,
    teacher_logits_for_batch,
)
from .base_trainer import _BaseTrainer
from .distill_config import DistillConfig


class DistillTrainer(_BaseTrainer):
    r"""
    [`~transformers.Trainer`] that distils a frozen teacher into the student `model` (Hinton et al., 2015,
    https://huggingface.co/papers/1503.02531).

    The loss is [`hf_kd.losses.kd_loss`] with `args.temperature` and `args.alpha`, normalised by the number of labelled
    examples in the whole accumulated batch so that it is exact under gradient accumulation and data parallelism. The
    teacher is frozen, in eval mode, run without gradients and placed by Accelerate with `evaluation_mode=True` (never
    wrapped in DDP: it has nothing to synchronise). Its logits come, in this order of preference, from a
    `teacher_logits` column of the dataset, from the on-disk cache (`args.cache_teacher_logits`), or from a teacher
    forward at every step.

    At every evaluation, besides the loss, the default `compute_metrics` logs accuracy, ECE (15 bins), NLL, Brier,
    mean predictive entropy and, since the teacher's logits are known, the confidence-preservation sigma of Vengertsev
    & Sherman (2024, https://huggingface.co/papers/2401.11365) and the teacher's own accuracy and entropy.

    Args:
        model (`PreTrainedModel` or `nn.Module`):
            The student, a sequence classifier whose output has `logits` of shape `(batch, num_labels)`.
        args ([`DistillConfig`]):
            Training and distillation arguments.
        teacher_model (`PreTrainedModel`, `nn.Module` or `str`, *optional*):
            The teacher, or its Hub id / path. Defaults to `args.teacher_model_name_or_path`. May be omitted when every
            dataset already carries a `teacher_logits` column.
        teacher_processing_class (`PreTrainedTokenizerBase`, *optional*):
            The teacher's tokenizer, used to compare vocabularies. Loaded from the teacher's id when that is a string.
        compute_metrics (`Callable`, *optional*):
            Defaults to [`hf_kd.metrics.make_compute_metrics`]`()`.

        The other arguments are those of [`~transformers.Trainer`].

    Example:

    ```python
    >>> from hf_kd import DistillConfig, DistillTrainer
    >>> args = DistillConfig(output_dir="student", temperature=2.0, alpha=0.5, cache_teacher_logits=True)
    >>> trainer = DistillTrainer(model=student, args=args, teacher_model="my-org/minilm-l6-rt",
    ...                          train_dataset=train, eval_dataset=validation, processing_class=tokenizer)
    >>> trainer.train()
    ```
    """

    _tag_names = ["hf_kd", "distillation"]
    _name = "Knowledge distillation"
    _paper = {
        "title": "Distilling the Knowledge in a Neural Network",
        "id": "1503.02531",
        "citation": (
            "@article{hinton2015distilling,\n  title={Distilling the Knowledge in a Neural Network},\n"
            "  author={Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff},\n  journal={arXiv:1503.02531},\n"
            "  year={2015}\n}"
        ),
    }

    def __init__(
        self,
        model: nn.Module,
        args: DistillConfig,
        teacher_model: nn.Module | str | None = None,
        data_collator: Callable | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        teacher_processing_class=None,
        compute_metrics: Callable | None = None,
        **kwargs: Any,
    ):
        if not isinstance(args, DistillConfig):
            raise TypeError(f"args must be a DistillConfig, got {type(args).__name__}")
        teacher = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if isinstance(teacher, nn.Module) and args.teacher_model_init_kwargs:
            load_teacher(teacher, args.teacher_model_init_kwargs)  # raises: kwargs would be ignored

        if compute_metrics is None:
            compute_metrics = make_compute_metrics()
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            **kwargs,
        )
        # compute_loss normalises by `num_items_in_batch` itself: declaring loss kwargs makes Trainer count the items
        # of the accumulated batch and skip its own division by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

        self._teacher_source = teacher
        self._teacher = None
        self._token_id_map = None
        if teacher is not None:
            self._token_id_map = self._check_teacher_compatibility(teacher, processing_class, teacher_processing_class)
        self._logits_cache = None
        if args.cache_teacher_logits:
            if teacher is None:
                raise ValueError(
                    "cache_teacher_logits=True needs a teacher: pass teacher_model or set teacher_model_name_or_path."
                )
            self._logits_cache = TeacherLogitsCache(
                args.teacher_logits_cache_dir, teacher_fingerprint(teacher, args.teacher_model_init_kwargs)
            )
            self.train_dataset = self.with_teacher_logits(self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self.with_teacher_logits(v, k) for k, v in self.eval_dataset.items()}
            else:
                self.eval_dataset = self.with_teacher_logits(self.eval_dataset, "eval")
        elif teacher is None and not self._has_teacher_logits(self.train_dataset):
            raise ValueError(
                "DistillTrainer needs a teacher: pass teacher_model, set teacher_model_name_or_path, or give a "
                f"train_dataset with a '{TEACHER_LOGITS_COLUMN}' column."
            )
        elif teacher is not None and not self._has_teacher_logits(self.train_dataset):
            self._load_teacher()  # online teacher: load it now so a bad id fails before training starts

    def _model_card_info(self) -> dict[str, Any]:
        """The teacher and the loss settings, for the model card (see [`_BaseTrainer.create_model_card`])."""
        teacher = self._teacher_source
        if isinstance(teacher, nn.Module):
            teacher = teacher.config._name_or_path if hasattr(teacher, "config") else None
        return {
            "teacher_model": str(teacher) if teacher else None,
            "hyperparameters": {"temperature": self.args.temperature, "alpha": self.args.alpha},
        }

    # ---- teacher ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _has_teacher_logits(dataset) -> bool:
        return dataset is not None and TEACHER_LOGITS_COLUMN in getattr(dataset, "column_names", ())

    def _check_teacher_compatibility(self, teacher, processing_class, teacher_processing_class):
        """Label space and vocabulary checks, from configs and tokenizers only (teacher weights are not loaded)."""
        student_config = self.accelerator.unwrap_model(self.model).config
        hub_kwargs = {
            k: v
            for k, v in (self.args.teacher_model_init_kwargs or {}).items()
            if k in ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code")
        }
        if isinstance(teacher, nn.Module):
            teacher_config = teacher.config
        else:
            teacher_config = AutoConfig.from_pretrained(str(teacher), **hub_kwargs)
        check_label_spaces(student_config, teacher_config)
        if teacher_processing_class is None and not isinstance(teacher, nn.Module):
            teacher_processing_class = load_teacher_tokenizer(str(teacher), hub_kwargs)
        student_tokenizer = getattr(processing_class, "tokenizer", processing_class)
        return check_vocabularies(
            student_config,
            teacher_config,
            student_tokenizer,
            teacher_processing_class,
            self.args.map_teacher_token_ids,
        )

    def _load_teacher(self) -> nn.Module:
        """Load (once) and place the frozen teacher. Cached runs never get here."""
        if self._teacher is None:
            teacher = load_teacher(self._teacher_source, self.args.teacher_model_init_kwargs)
            self._teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        return self._teacher

    @property
    def teacher_model(self) -> nn.Module | None:
        """The frozen teacher, or `None` while it has not been loaded (a fully cached run never loads it)."""
        return self._teacher

    def with_teacher_logits(self, dataset, split: str = "dataset"):
        """Return `dataset` with a `teacher_logits` column `(num_rows, num_labels)`, from the cache when possible.

        On a cache miss the teacher is loaded and run once over the dataset on the main process; the other processes
        wait and read the file it wrote.
        """
        if dataset is None or self._has_teacher_logits(dataset):
            return dataset
        import datasets

        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(
                f"cache_teacher_logits needs a datasets.Dataset for the {split} split, got {type(dataset).__name__}. "
                f"Add a '{TEACHER_LOGITS_COLUMN}' column yourself or train with an online teacher."
            )
        if "input_ids" not in dataset.column_names:
            raise ValueError(
                f"The {split} dataset has no 'input_ids' column (columns: {dataset.column_names}); tokenize it before "
                "building the trainer so teacher logits can be cached."
            )
        columns = [c for c in TEACHER_INPUT_NAMES if c in dataset.column_names]
        data_key = dataset_fingerprint(dataset, columns)
        path = self._logits_cache.path_for(data_key, self._token_id_map)
        with self.args.main_process_first(desc=f"teacher logits for the {split} split"):
            logits = self._logits_cache.load(path, len(dataset))
            if logits is None:
                logits = compute_teacher_logits(
                    self._load_teacher(),
                    dataset,
                    self.data_collator,
                    self.args.per_device_eval_batch_size,
                    self.args.device,
                    self._token_id_map,
                    desc=f"Teacher logits ({split})",
                )
                if self.args.should_save:
                    self._logits_cache.save(path, logits, data_key)
        return dataset.add_column(TEACHER_LOGITS_COLUMN, logits.tolist())

    def _set_signature_columns_if_needed(self):
        # Keep the teacher logits column through Trainer's removal of columns the model's forward does not take.
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns.append(TEACHER_LOGITS_COLUMN)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self._logits_cache is not None and eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self.with_teacher_logits(eval_dataset, metric_key_prefix)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        if self._logits_cache is not None:
            test_dataset = self.with_teacher_logits(test_dataset, metric_key_prefix)
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    # ---- loss ------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels", None)
        teacher_logits = inputs.pop(TEACHER_LOGITS_COLUMN, None)
        student_logits = model(**inputs).logits
        if teacher_logits is None:
            if self._teacher_source is None:
                raise ValueError(
                    f"This batch has no '{TEACHER_LOGITS_COLUMN}' and the trainer has no teacher: add the column to "
                    "every dataset (train and eval) or pass a teacher."
                )
            teacher_logits = teacher_logits_for_batch(self._load_teacher(), inputs, self._token_id_map)
        teacher_logits = teacher_logits.to(student_logits.device)

        T, alpha = self.args.temperature, self.args.alpha
        loss = kd_loss(student_logits, teacher_logits, labels, T, alpha, num_items_in_batch=num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts the items of every process; DDP averages gradients over processes.
            loss = loss * self.accelerator.num_processes

        mode = "train" if model.training else "eval"
        with torch.no_grad():
            self._metrics[mode]["kd_loss"].append(
                kd_loss(student_logits, teacher_logits, labels, T, alpha=1.0).detach()
            )
            if labels is not None:
                self._metrics[mode]["ce_loss"].append(
                    kd_loss(student_logits, teacher_logits, labels, T, alpha=0.0).detach()
                )
        if return_outputs:
            # Both logits reach compute_metrics as predictions=(student_logits, teacher_logits): sigma needs both.
            return loss, {"logits": student_logits, TEACHER_LOGITS_COLUMN: teacher_logits}
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._metrics[mode].items():
            if values:
                # Mean over this process's batches since the last log (no collective here: a rank with no batch
                # would hang the others).
                logs[prefix + key] = torch.stack(values).mean().item()
        self._metrics[mode].clear()
        super().log(logs, start_time)
