from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..losses import kd_loss, lm_kd_loss, sparse_lm_kd_loss
from ..metrics import make_compute_metrics, make_lm_compute_metrics, preprocess_lm_logits_for_metrics
from ..teacher import TEACHER_CACHE_INDEX_COLUMN, TEACHER_LOGITS_COLUMN
from .base_trainer import _BaseTrainer, default_lm_data_collator, is_causal_lm, prepare_lm_dataset
from .distill_config import DistillConfig
from .teacher_mixin import _TeacherMixin


class DistillTrainer(_TeacherMixin, _BaseTrainer):
    r"""
    [`~transformers.Trainer`] that distils a frozen teacher into the student `model` (Hinton et al., 2015,
    https://huggingface.co/papers/1503.02531).

    The loss is [`hf_kd.losses.kd_loss`] with `args.temperature` and `args.alpha`,
    `alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(y, z_s)`, normalised by the number of
    labelled examples in the whole accumulated batch so that it is exact under gradient accumulation and data
    parallelism. The teacher is frozen, in eval mode, run without gradients and placed by Accelerate with
    `evaluation_mode=True` (never wrapped in DDP: it has nothing to synchronise); in a DeepSpeed run it is initialised
    for inference by DeepSpeed and sharded with ZeRO-3 over the processes (`args.teacher_zero_stage`, see [`hf_kd.distributed`]). Its logits come, in
    this order of preference, from a `teacher_logits` column of the dataset, from the on-disk cache
    (`args.cache_teacher_logits`), or from a teacher forward at every step.

    At every evaluation, besides the loss, the default `compute_metrics` logs accuracy, ECE (15 bins), NLL, Brier,
    mean predictive entropy and, since the teacher's logits are known, the confidence-preservation sigma of Vengertsev
    & Sherman (2024, https://huggingface.co/papers/2401.11365) and the teacher's own accuracy and entropy.

    Causal language models: a student whose class (or `config.architectures`) ends in `ForCausalLM` ([`is_causal_lm`],
    the same rule as the card's `text-generation` task, checked when the trainer is built) is distilled token by
    token with [`hf_kd.losses.lm_kd_loss`]: `alpha * T^2 * D(p_T, p_S) + (1 - alpha) * CE` over the completion tokens
    only (`labels != -100`, as [`hf_kd.lm_data.tokenize_lm_dataset`] makes them), the logits at position `t`
    predicting the label at `t + 1`, `D` chosen by `args.loss_type` (`forward_kl`, `reverse_kl`, `jsd` with
    `args.beta`), at temperature `args.temperature` on both sides. The loss is normalised by the number of completion
    tokens of the whole accumulated batch (`num_items_in_batch`, counted over the shifted labels), so it is exact under
    gradient accumulation and data parallelism. The teacher must be a causal LM with the same vocabulary (an error
    naming both vocabulary sizes and tokenizers otherwise). It runs live at every step, or with
    `args.cache_teacher_logits` once per dataset: each completion token's top `args.lm_cache_top_k` teacher logits are
    cached on disk ([`hf_kd.teacher.compute_teacher_lm_top_k`]) and the loss is [`hf_kd.losses.sparse_lm_kd_loss`]
    (tail `args.lm_cache_tail`; a cached evaluation logs `top1_agreement` from the cached top-1 ids, the cache's
    first top-k id).
    Data: as for TRL's `SFTTrainer`, a dataset with a `text`, `messages` or `prompt` + `completion` column (strings or
    lists of messages) is tokenized by the trainer with `processing_class` ([`hf_kd.lm_data.tokenize_lm_dataset`]:
    completion-only labels, rows cut on the right to `args.lm_max_length` tokens, a prompt that leaves no completion token
    refused); pre-tokenized `input_ids` + `labels` (-100 on the prompt) are used as they are. Without a
    `data_collator`, batches are right-padded by [`hf_kd.lm_data.LMDataCollator`] (pad token, else EOS; labels -100).
    Each evaluation logs `perplexity`, `token_accuracy`, `token_ece` (15 bins), `token_entropy` and `top1_agreement`
    with the teacher ([`hf_kd.metrics.lm_metrics`]), each batch's logits being reduced to five numbers per token
    ([`hf_kd.metrics.preprocess_lm_logits_for_metrics`]) so that no vocabulary-sized tensor is accumulated; the card's
    task is `text-generation`.

    The loss parts `kd_loss` (the soft term, `alpha=1`) and `ce_loss` (the hard term, `alpha=0`) are logged as their
    mean since the last log. Two methods extend this trainer with losses on the student's inside:
    [`TinyBERTTrainer`] (TinyBERT's intermediate layers) and [`LetKDTrainer`] (letKD's KD layers).

    Args:
        model (`PreTrainedModel` or `nn.Module`):
            The student: a sequence classifier whose output has `logits` of shape `(batch, num_labels)`, or a causal
            LM (`...ForCausalLM`, logits `(batch, seq, vocab)`).
        args ([`DistillConfig`]):
            Training and distillation arguments.
        teacher_model (`PreTrainedModel`, `nn.Module` or `str`, *optional*):
            The teacher, or its Hub id / path. Defaults to `args.teacher_model_name_or_path`. May be omitted when every
            dataset already carries a `teacher_logits` column.
        teacher_processing_class (`PreTrainedTokenizerBase`, *optional*):
            The teacher's tokenizer, used to compare vocabularies. Loaded from the teacher's id when that is a string.
        data_collator (`Callable`, *optional*):
            Defaults to Trainer's; for a causal-LM student to [`hf_kd.lm_data.LMDataCollator`] padding with
            `processing_class`'s pad token (its EOS token when it has none; the student's `config.pad_token_id`
            without a tokenizer).
        processing_class (`PreTrainedTokenizerBase`, *optional*):
            The student's tokenizer: saved with the model, and for a causal-LM student used to tokenize data given
            in TRL's formats and to pad batches.
        compute_metrics (`Callable`, *optional*):
            Defaults to [`hf_kd.metrics.make_compute_metrics`]`()`, or for a causal LM
            [`hf_kd.metrics.make_lm_compute_metrics`]`()` with `preprocess_logits_for_metrics` defaulting to
            [`hf_kd.metrics.preprocess_lm_logits_for_metrics`].
        peft_config (`peft.PeftConfig`, *optional*):
            Train a PEFT adapter (e.g. `peft.LoraConfig(r=8, task_type="SEQ_CLS")`, or `task_type="CAUSAL_LM"` for a
            causal LM) on the student's backbone instead
            of all its weights. The student's heads (`classifier` / `score`) are added to `modules_to_save`, so they train in full and
            are saved with the adapter. A `peft.PeftModel` student is accepted without `peft_config` (its frozen heads
            are warned about). With `args.teacher_from_base_model=True` the teacher is the student's base model
            (adapters disabled). Needs `pip install hf_kd[peft]`.

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
    _extra_columns = (TEACHER_LOGITS_COLUMN, TEACHER_CACHE_INDEX_COLUMN)
    _config_class = DistillConfig  # what `args` must be: each method's own config
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
        peft_config=None,
        **kwargs: Any,
    ):
        if not isinstance(args, self._config_class):
            raise TypeError(f"args must be a {self._config_class.__name__}, got {type(args).__name__}")
        teacher = self._resolve_teacher(teacher_model, args)
        # The student's task decides the loss, the data checks and the metrics; decided once, here.
        self._causal_lm = model is not None and is_causal_lm(model)
        if not self._causal_lm and args.loss_type != "forward_kl":
            raise ValueError(
                f"loss_type={str(args.loss_type)!r} is for causal-LM students; a sequence-classification student "
                f"({type(model).__name__}) is distilled with Hinton's loss, loss_type='forward_kl'."
            )
        if self._causal_lm:
            # Data in TRL's SFTTrainer formats is tokenized here (completion-only labels), before any check reads it.
            train_dataset = prepare_lm_dataset(train_dataset, "train_dataset", processing_class, args.lm_max_length)
            eval_dataset = prepare_lm_dataset(eval_dataset, "eval_dataset", processing_class, args.lm_max_length)
            if data_collator is None:
                data_collator = default_lm_data_collator(processing_class, model)
            if compute_metrics is None:
                compute_metrics = make_lm_compute_metrics()
                kwargs.setdefault("preprocess_logits_for_metrics", preprocess_lm_logits_for_metrics)
        elif compute_metrics is None:
            compute_metrics = make_compute_metrics()
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            peft_config=peft_config,
            **kwargs,
        )
        self._init_teacher(teacher, processing_class, teacher_processing_class)
        if self._causal_lm:
            # The LM loss compares logits[:, t] with labels[:, t + 1]: Trainer must count the items of the accumulated
            # batch over the shifted labels (it does for a model whose own loss shifts; a custom student may not).
            self._loss_shifts_labels = True

    def _model_card_info(self) -> dict[str, Any]:
        """The teacher and the loss settings, for the model card (see [`_BaseTrainer.create_model_card`])."""
        hyperparameters = {"temperature": self.args.temperature, "alpha": self.args.alpha}
        if self._causal_lm:
            hyperparameters["loss_type"] = str(self.args.loss_type)
            if self.args.loss_type == "jsd":
                hyperparameters["beta"] = self.args.beta
        return {"teacher_model": self._teacher_name(), "hyperparameters": hyperparameters}

    # ---- loss ------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._causal_lm:
            return self._compute_lm_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels", None)
        teacher_logits = inputs.pop(TEACHER_LOGITS_COLUMN, None)
        student_logits = model(**inputs).logits
        loss, teacher_logits = self._kd_loss(model, inputs, student_logits, teacher_logits, labels, num_items_in_batch)
        loss = self._scale_for_processes(loss, num_items_in_batch)
        if return_outputs:
            # Both logits reach compute_metrics as predictions=(student_logits, teacher_logits): sigma needs both.
            return loss, {"logits": student_logits, TEACHER_LOGITS_COLUMN: teacher_logits}
        return loss

    def _kd_loss(self, model, inputs, student_logits, teacher_logits, labels, num_items_in_batch):
        """
        The KD loss of one batch, normalised by `num_items_in_batch` (not yet rescaled for DDP), and the teacher's
        logits it used; logs its two parts (`kd_loss`, `ce_loss`).

        Args:
            model (`nn.Module`): the student as `compute_loss` got it (its `training` flag picks the logged mode).
            inputs (`dict`): the model inputs, without `labels` and `teacher_logits`.
            student_logits (`torch.Tensor` of shape `(batch, num_labels)`): the student's logits.
            teacher_logits (`torch.Tensor` of shape `(batch, num_labels)`, *optional*): the batch's teacher logits
                when known (a dataset column, or a teacher forward run by the caller); else the cached or a live
                teacher's ([`~_TeacherMixin._batch_teacher_logits`]).
            labels (`torch.Tensor` of shape `(batch,)`, *optional*): gold labels, `-100` ignored.
            num_items_in_batch (`int` or `torch.Tensor`, *optional*): labelled examples in the accumulated batch.

        Returns:
            `(loss, teacher_logits)`.
        """
        teacher_logits = self._batch_teacher_logits(inputs, teacher_logits).to(student_logits.device)
        T, alpha = self.args.temperature, self.args.alpha
        loss = kd_loss(student_logits, teacher_logits, labels, T, alpha, num_items_in_batch=num_items_in_batch)
        mode = "train" if model.training else "eval"
        with torch.no_grad():
            self._metrics[mode]["kd_loss"].append(
                kd_loss(student_logits, teacher_logits, labels, T, alpha=1.0).detach()
            )
            if labels is not None:
                self._metrics[mode]["ce_loss"].append(
                    kd_loss(student_logits, teacher_logits, labels, T, alpha=0.0).detach()
                )
        return loss, teacher_logits

    def _compute_lm_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """
        `compute_loss` of a causal-LM student: [`hf_kd.losses.lm_kd_loss`] on the shifted logits and labels (position
        `t` predicts label `t + 1`), normalised by `num_items_in_batch` (the counted tokens of the accumulated batch)
        and rescaled for DDP ([`hf_kd.losses.sparse_lm_kd_loss`] on the cached top-k in a cached run); logs its two
        parts (`kd_loss`, `ce_loss`, each a mean over this batch's tokens), which the same call returns
        (`return_parts=True`).

        Returns the loss and, with `return_outputs`, `{"logits", "teacher_logits"}` (both `(batch, seq, vocab)`,
        reduced per batch by `preprocess_logits_for_metrics` at evaluation), or in a cached run `{"logits",
        "teacher_top1"}` (the teacher's top-1 ids `(batch, seq)`, for `top1_agreement`).
        """
        labels = inputs.pop("labels")
        cache_index = inputs.pop(TEACHER_CACHE_INDEX_COLUMN, None)
        student_logits = model(**inputs).logits  # no labels: the model does not compute its own loss
        args = self.args
        options = {
            "loss_type": args.loss_type, "beta": args.beta, "temperature": args.temperature, "alpha": args.alpha,
            "num_items_in_batch": num_items_in_batch, "chunk_size": args.lm_chunk_size, "return_parts": True,
        }
        # One pass gives the loss and its two logged parts (three calls cost three times the loss on vocab-sized logits).
        if cache_index is None:
            teacher_logits = self._batch_teacher_logits(inputs, None).to(student_logits.device)
            parts = lm_kd_loss(student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:], **options)
        else:  # cached run: the teacher's top-k logits of these rows' completion tokens, no teacher forward
            teacher_logits = None
            targets = self._cached_lm_top_k(cache_index, labels[:, 1:].to(student_logits.device))
            parts = sparse_lm_kd_loss(student_logits[:, :-1], *targets, labels[:, 1:], **options, tail=args.lm_cache_tail)
        mode = "train" if model.training else "eval"
        self._metrics[mode]["kd_loss"].append(parts.kd)
        self._metrics[mode]["ce_loss"].append(parts.ce)
        loss = parts.loss
        loss = self._scale_for_processes(loss, num_items_in_batch)
        if return_outputs:
            if teacher_logits is None:
                # Cached run: no full teacher logits, but the cache's first top-k id is the teacher's top-1 token,
                # enough for top1_agreement ([`preprocess_lm_logits_for_metrics`] reads integer (batch, seq) ids).
                # Laid out like the logits (position t predicts t + 1); -1 where nothing is counted.
                top1 = torch.full_like(labels, -1, device=student_logits.device)
                top1[:, :-1] = torch.where(labels[:, 1:].to(top1.device) != -100, targets[0][..., 0], -1)
                return loss, {"logits": student_logits, "teacher_top1": top1}
            return loss, {"logits": student_logits, TEACHER_LOGITS_COLUMN: teacher_logits}
        return loss
