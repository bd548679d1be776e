from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..cross_tokenizer import (
    CROSS_TOKENIZER_COLUMNS,
    CrossTokenizerCollator,
    check_offset_tokenizer,
    shared_vocabulary_map,
    span_token_mask,
    tokenize_cross_tokenizer_dataset,
)
from ..distributed import is_zero3_partitioned
from ..lm_head import lm_head_skipped
from ..losses import (
    LMHeadInputs,
    cached_span_log_probs,
    cached_span_top_k,
    cached_uld_loss,
    hybrid_loss,
    kd_loss,
    lm_kd_loss,
    shifted_logits,
    span_log_probs,
    sparse_lm_kd_loss,
    uld_loss,
)
from ..metrics import make_compute_metrics, make_lm_compute_metrics, preprocess_lm_logits_for_metrics
from ..peft_utils import BaseModelTeacher
from ..teacher import (
    TEACHER_CACHE_INDEX_COLUMN,
    TEACHER_LOGITS_COLUMN,
    load_teacher_tokenizer,
    teacher_logits_for_batch,
)
from .base_trainer import (
    _BaseTrainer,
    default_lm_data_collator,
    is_causal_lm,
    map_datasets,
    prepare_lm_dataset,
    tokenized_by_trainer,
)
from .distill_config import DistillConfig
from .teacher_mixin import _TeacherMixin

logger = logging.getLogger(__name__)


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
    naming both vocabulary sizes and tokenizers otherwise), unless `args.cross_tokenizer` is `"uld"` or `"hybrid"`:
    then each text is tokenised by both tokenizers, the tokens are aligned into spans covering the same characters
    and the span distributions are compared with [`hf_kd.losses.uld_loss`] / [`hf_kd.losses.hybrid_loss`]
    ([`hf_kd.cross_tokenizer`], [`~DistillTrainer._compute_cross_tokenizer_loss`]; with `args.cache_teacher_logits`
    the teacher's top-k at its span positions is cached once, as below, and a cached run never loads it). It runs live
    at every step, or with `args.cache_teacher_logits` once per dataset: each completion token's top
    `args.lm_cache_top_k` teacher logits are cached on disk ([`hf_kd.teacher.compute_teacher_lm_top_k`]) and the loss
    is [`hf_kd.losses.sparse_lm_kd_loss`] (tail `args.lm_cache_tail`; a cached evaluation logs `top1_agreement` from
    the cached top-1 ids, the cache's first top-k id). In training the loss runs the models' LM heads itself, chunk by
    chunk on the completion tokens, wherever a model allows it (`args.lm_fused_head`, [`hf_kd.lm_head`],
    [`hf_kd.losses.LMHeadInputs`]): no `(batch, seq, vocab)` logits are made.
    Data: as for TRL's `SFTTrainer`, a dataset with a `text`, `messages` or `prompt` + `completion` column (strings or
    lists of messages) is tokenized by the trainer with `processing_class` ([`hf_kd.lm_data.tokenize_lm_dataset`]:
    completion-only labels, rows cut on the right to `args.lm_max_length` tokens, a prompt that leaves no completion token
    refused); pre-tokenized `input_ids` + `labels` (-100 on the prompt) are used as they are. Without a
    `data_collator`, batches are right-padded by [`hf_kd.lm_data.LMDataCollator`] (pad token, else EOS; labels -100).
    Each evaluation logs `perplexity`, `token_accuracy`, `token_ece` (15 bins), `token_entropy` and `top1_agreement`
    with the teacher ([`hf_kd.metrics.lm_metrics`]), each batch's logits being reduced to five numbers per token
    ([`hf_kd.metrics.preprocess_lm_logits_for_metrics`]) so that no vocabulary-sized tensor is accumulated; the card's
    task is `text-generation`.

    On-policy and sequence-level data (GKD, Agarwal et al., 2024, https://huggingface.co/papers/2306.13649), causal
    LMs only: with probability `args.lmbda` a training micro-batch's completions are generated by the student from its
    prompts, else, with `args.seq_kd`, by the teacher ([`~DistillTrainer.get_batch_samples`],
    [`~DistillTrainer._generated_batch`]; at most `args.max_new_tokens` tokens, sampled at
    `args.generation_temperature`). They are made before the step, so that `num_items_in_batch` counts the generated
    tokens; the coin and the sampling seed depend on `(args.seed, global step, micro-batch)` only, so a resumed run
    draws the same and every process flips the same coin; under ZeRO-3 generation runs with `synced_gpus=True`.
    The share of on-policy micro-batches is logged as `on_policy`.

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
            The teacher's tokenizer, used to compare vocabularies, and with `args.cross_tokenizer` to tokenise each
            text for the teacher. Loaded from the teacher's id when that is a string (with `cross_tokenizer`, also
            from a teacher module's `config._name_or_path`).
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
    _extra_columns = (TEACHER_LOGITS_COLUMN, TEACHER_CACHE_INDEX_COLUMN, *CROSS_TOKENIZER_COLUMNS)
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
        if not self._causal_lm and (args.lmbda > 0 or args.seq_kd):
            raise ValueError(
                f"lmbda={args.lmbda} / seq_kd={args.seq_kd} generate completions, which needs a causal-LM student; "
                f"a sequence-classification student ({type(model).__name__}) has none: keep lmbda=0 and seq_kd=False."
            )
        if self._causal_lm and args.lmbda > 0 and not callable(getattr(model, "generate", None)):
            raise ValueError(
                f"lmbda={args.lmbda} makes the student generate completions, but the student "
                f"({type(model).__name__}) has no generate() method: use a transformers ...ForCausalLM student."
            )
        self._shared_vocabulary = None  # cross_tokenizer="hybrid": (student_ids, teacher_ids) of the shared tokens
        if args.cross_tokenizer is not None:
            teacher_processing_class = self._cross_tokenizer_set_up(
                model, teacher, processing_class, teacher_processing_class, args
            )
            self._teacher_tokenizer = teacher_processing_class  # evaluate / predict tokenise their data with it too
        if self._causal_lm and args.cross_tokenizer is not None:
            # Both tokenizers read each text; the rows carry the teacher's ids and the aligned completion spans.
            train_dataset, eval_dataset = (
                _prepare_cross_tokenizer_dataset(data, split, processing_class, teacher_processing_class, args)
                for data, split in ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset"))
            )
            if data_collator is None:
                data_collator = default_lm_data_collator(processing_class, model)
            teacher_tokenizer = getattr(teacher_processing_class, "tokenizer", teacher_processing_class)
            pad = next((i for i in (teacher_tokenizer.pad_token_id, teacher_tokenizer.eos_token_id) if i is not None), 0)
            data_collator = CrossTokenizerCollator(data_collator, pad)
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

    def _cross_tokenizer_set_up(self, model, teacher, processing_class, teacher_processing_class, args):
        """
        Checks of `args.cross_tokenizer` before any data is read: a causal-LM student, a teacher, two fast tokenizers
        (the teacher's given, or saved with the teacher's id / `config._name_or_path`), and for `"hybrid"` a shared
        vocabulary (kept in `self._shared_vocabulary`). Returns the teacher's tokenizer.
        """
        name = f"cross_tokenizer={str(args.cross_tokenizer)!r}"
        if not self._causal_lm:
            raise ValueError(
                f"{name} distils causal LMs with different tokenizers; the student ({type(model).__name__}) is not a "
                "causal LM (...ForCausalLM)."
            )
        if teacher is None:
            raise ValueError(f"{name} needs a teacher: pass teacher_model or set teacher_model_name_or_path.")
        if teacher_processing_class is None:
            source = teacher if isinstance(teacher, str) else getattr(getattr(teacher, "config", None), "_name_or_path", "")
            if source:
                try:
                    teacher_processing_class = load_teacher_tokenizer(str(source), self._teacher_hub_kwargs(args))
                except (OSError, ValueError):  # a name_or_path that is no longer there: same error as no tokenizer
                    teacher_processing_class = None
            if teacher_processing_class is None:
                raise ValueError(
                    f"{name} needs the teacher's tokenizer to tokenize each text for it, and none is available: pass "
                    f"teacher_processing_class=AutoTokenizer.from_pretrained(<teacher id>) (no tokenizer was saved with "
                    f"the teacher {source or type(teacher).__name__!r})."
                )
        if processing_class is None:
            raise ValueError(
                f"{name} needs the student's tokenizer (processing_class=...) to tokenize each text and align it with "
                "the teacher's tokens."
            )
        check_offset_tokenizer(processing_class, "student")
        check_offset_tokenizer(teacher_processing_class, "teacher")
        if args.cross_tokenizer == "hybrid":
            student_ids, teacher_ids = shared_vocabulary_map(
                getattr(processing_class, "tokenizer", processing_class),
                getattr(teacher_processing_class, "tokenizer", teacher_processing_class),
            )
            if len(student_ids) == 0:
                raise ValueError(
                    f"{name} needs tokens both vocabularies share (the exact KL part), but the student's tokenizer "
                    f"{getattr(processing_class, 'name_or_path', '')!r} and the teacher's "
                    f"{getattr(teacher_processing_class, 'name_or_path', '')!r} share none: use cross_tokenizer='uld'."
                )
            self._shared_vocabulary = (student_ids, teacher_ids)
        return teacher_processing_class

    def _prepare_lm_data(self, dataset, split: str):
        """Data in TRL's formats given to `evaluate` / `predict`: with `args.cross_tokenizer`, tokenised by both
        tokenizers like the datasets given at init ([`_prepare_cross_tokenizer_dataset`])."""
        if self.args.cross_tokenizer is None:
            return super()._prepare_lm_data(dataset, split)
        return _prepare_cross_tokenizer_dataset(dataset, split, self.processing_class, self._teacher_tokenizer,
                                                self.args)

    def _model_card_info(self) -> dict[str, Any]:
        """The teacher and the loss settings, for the model card (see [`_BaseTrainer.create_model_card`])."""
        hyperparameters = {"temperature": self.args.temperature, "alpha": self.args.alpha}
        if self.args.cross_tokenizer is not None:
            hyperparameters["cross_tokenizer"] = str(self.args.cross_tokenizer)
            if self.args.cross_tokenizer == "hybrid":
                hyperparameters["cross_tokenizer_shared_weight"] = self.args.cross_tokenizer_shared_weight
        elif self._causal_lm:
            hyperparameters["loss_type"] = str(self.args.loss_type)
            if self.args.loss_type == "jsd":
                hyperparameters["beta"] = self.args.beta
        return {"teacher_model": self._teacher_name(), "hyperparameters": hyperparameters}

    # ---- loss ------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._causal_lm and self.args.cross_tokenizer is not None:
            return self._compute_cross_tokenizer_loss(model, inputs, return_outputs, num_items_in_batch)
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
        # Training: the heads run inside the loss where the models allow it (no (batch, seq, vocab) tensors);
        # evaluation needs the full logits for its metrics.
        fused = not return_outputs and self._lm_fused_head(model, "student")
        student = self._lm_outputs(model, inputs, fused)  # no labels: the model does not compute its own loss
        device = student.hidden_states.device if fused else student.device
        args = self.args
        options = {
            "loss_type": args.loss_type, "beta": args.beta, "temperature": args.temperature, "alpha": args.alpha,
            "num_items_in_batch": num_items_in_batch, "chunk_size": args.lm_chunk_size, "return_parts": True,
        }
        # One pass gives the loss and its two logged parts (three calls cost three times the loss on vocab-sized logits).
        teacher = None
        if cache_index is None:
            fused_teacher = not return_outputs and self._lm_fused_head(self._load_teacher(), "teacher")
            teacher = self._lm_teacher_outputs(inputs, fused_teacher)
            parts = lm_kd_loss(shifted_logits(student, device), shifted_logits(teacher, device), labels[:, 1:],
                               **options)
        else:  # cached run: the teacher's top-k logits of these rows' completion tokens, no teacher forward
            targets = self._cached_lm_top_k(cache_index, labels[:, 1:].to(device))
            parts = sparse_lm_kd_loss(
                shifted_logits(student, device), *targets, labels[:, 1:], **options, tail=args.lm_cache_tail
            )
        mode = "train" if model.training else "eval"
        self._metrics[mode]["kd_loss"].append(parts.kd)
        self._metrics[mode]["ce_loss"].append(parts.ce)
        loss = parts.loss
        loss = self._scale_for_processes(loss, num_items_in_batch)
        if return_outputs:  # never fused: `student` and `teacher` are full logits
            if teacher is None:
                # Cached run: no full teacher logits, but the cache's first top-k id is the teacher's top-1 token,
                # enough for top1_agreement ([`preprocess_lm_logits_for_metrics`] reads integer (batch, seq) ids).
                # Laid out like the logits (position t predicts t + 1); -1 where nothing is counted.
                top1 = torch.full_like(labels, -1, device=device)
                top1[:, :-1] = torch.where(labels[:, 1:].to(device) != -100, targets[0][..., 0], -1)
                return loss, {"logits": student, "teacher_top1": top1}
            return loss, {"logits": student, TEACHER_LOGITS_COLUMN: teacher.to(device)}
        return loss

    @staticmethod
    def _lm_outputs(model, inputs: dict, fused: bool) -> torch.Tensor | LMHeadInputs:
        """`model`'s logits `(batch, seq, vocab)`, or with `fused` its final hidden states and LM head weight."""
        if not fused:
            return model(**inputs).logits
        with lm_head_skipped(model) as head:
            return LMHeadInputs(model(**inputs).logits, head.weight)

    def _compute_cross_tokenizer_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """
        `compute_loss` with `args.cross_tokenizer` (a teacher with another tokenizer, [`hf_kd.cross_tokenizer`]):

        `(alpha * T^2 * sum_spans D(span_T, span_S) + (1 - alpha) * sum_tokens CE) / num_items_in_batch`

        where the spans are the batch's aligned completion spans, each side's span distribution is
        [`hf_kd.losses.span_log_probs`] at temperature `T` (chain rule: the span's last-token distribution times the
        probability of its earlier tokens), `D` is [`hf_kd.losses.uld_loss`] or [`hf_kd.losses.hybrid_loss`], and
        CE is the student's token cross-entropy on its completion tokens (shifted labels). Both sums are divided by
        the same `num_items_in_batch`, the student's completion tokens of the whole accumulated batch (Trainer's count),
        so the loss is exact under gradient accumulation and data parallelism, as the same-tokenizer path; the soft
        term is then a per-student-token sum (spans merge tokens, so there are at most as many spans as tokens).
        Logged: `kd_loss` (mean `D` per span) and `ce_loss` (mean CE per token) of this batch.

        In a cached run (`args.cache_teacher_logits`; the batch has a `teacher_cache_index`) the teacher is never run:
        its span distributions come from the cache of its top `args.lm_cache_top_k` log-probabilities at the span
        positions, the chain-rule factors exact ([`hf_kd.losses.cached_span_top_k`]). ULD compares the sorted top k
        exactly and the tail masses as buckets ([`hf_kd.losses.cached_uld_loss`]: a lower bound, with the teacher's
        mass past the student's vocabulary size exact); the hybrid loss gets a dense vector with
        the teacher's tail spread evenly over its other tokens ([`hf_kd.losses.cached_span_log_probs`]).

        Returns the loss and, with `return_outputs`, `{"logits"}` (the student's: the teacher's are over another
        vocabulary and positions, so no `top1_agreement` is logged).
        """
        labels = inputs.pop("labels")
        teacher_ids, teacher_mask = inputs.pop("teacher_input_ids"), inputs.pop("teacher_attention_mask")
        student_starts, student_ends, teacher_starts, teacher_ends = (
            inputs.pop(name) for name in CROSS_TOKENIZER_COLUMNS[1:]
        )
        cache_index = inputs.pop(TEACHER_CACHE_INDEX_COLUMN, None)
        student_logits = model(**inputs).logits
        args = self.args
        T, alpha = args.temperature, args.alpha
        student_spans = span_log_probs(student_logits, inputs["input_ids"], student_starts, student_ends, T)
        if cache_index is None:
            teacher_logits = teacher_logits_for_batch(
                self._load_teacher(), {"input_ids": teacher_ids, "attention_mask": teacher_mask}
            ).to(student_logits.device)
            teacher_spans = span_log_probs(teacher_logits, teacher_ids.to(teacher_logits.device), teacher_starts,
                                           teacher_ends, T)
        else:  # cached run: the teacher's span distributions from its cached top-k (already at T), no teacher forward
            device = student_logits.device
            teacher_starts, teacher_ends = teacher_starts.to(device), teacher_ends.to(device)
            counted = span_token_mask(teacher_starts, teacher_ends, teacher_ids.shape[1])[:, 1:]
            names = ("topk_ids", "topk_logprobs", "tail_logprobs", "token_logprobs", "far_tail_logprobs")
            fields = self._cached_lm_fields(cache_index, counted, names)
            cached = [fields[name] for name in names[:4]]
            if args.cross_tokenizer == "hybrid":  # a value per teacher token: the tail spread over the others
                teacher_spans = cached_span_log_probs(*cached, teacher_starts, teacher_ends,
                                                      self._lm_top_k["vocab_size"])
            else:  # ULD needs only the sorted top k and the tail masses (buckets)
                teacher_spans = cached_span_top_k(*cached, teacher_starts, teacher_ends, fields["far_tail_logprobs"])
        if args.cross_tokenizer == "hybrid":
            kd = hybrid_loss(student_spans, teacher_spans, *self._shared_vocabulary,
                             shared_weight=args.cross_tokenizer_shared_weight, reduction="sum")
        elif cache_index is not None:
            kd = cached_uld_loss(student_spans, *teacher_spans[1:], reduction="sum")
        else:
            kd = uld_loss(student_spans, teacher_spans, reduction="sum")
        shifted = labels[:, 1:].to(student_logits.device)
        ce = nn.functional.cross_entropy(
            student_logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=-100, reduction="sum"
        )
        tokens = (shifted != -100).sum()
        normaliser = tokens.clamp_min(1) if num_items_in_batch is None else num_items_in_batch
        loss = (alpha * T**2 * kd + (1 - alpha) * ce) / normaliser
        mode = "train" if model.training else "eval"
        self._metrics[mode]["kd_loss"].append(kd.detach() / max(len(student_spans), 1))
        self._metrics[mode]["ce_loss"].append(ce.detach() / tokens.clamp_min(1))
        loss = self._scale_for_processes(loss, num_items_in_batch)
        return (loss, {"logits": student_logits}) if return_outputs else loss

    # ---- on-policy and sequence-level data (GKD) -------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """
        [`~transformers.Trainer.get_batch_samples`] (the micro-batches of one optimizer step and `num_items_in_batch`,
        their completion tokens over every process), with GKD's data: each micro-batch whose coin
        ([`~DistillTrainer._completion_source`]) says so gets completions generated by the student (on-policy,
        probability `args.lmbda`) or else, with `args.seq_kd`, by the teacher ([`~DistillTrainer._generated_batch`]).

        The generations are made here, before the step, rather than in `training_step` as TRL's GKDTrainer does, so
        that `num_items_in_batch` counts the generated completions (Trainer's own count, over the shifted labels and
        gathered over the processes): the loss stays exact under gradient accumulation and data parallelism whatever
        the generated lengths. No optimizer step happens between the micro-batches of a step, so the student that
        generates is the one a per-micro-batch generation would use.
        """
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        sources = [self._completion_source(i) for i in range(len(batch_samples))]
        if self.args.lmbda > 0:
            for source in sources:
                self._metrics["train"]["on_policy"].append(torch.tensor(float(source == "student"), device=device))
        if not any(sources):
            return batch_samples, num_items_in_batch
        batch_samples = [
            self._generated_batch(batch, source, i) if source else batch
            for i, (batch, source) in enumerate(zip(batch_samples, sources))
        ]
        # Trainer counted the dataset's completions: count the generated ones (every process makes the same call).
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def _step_rng(self, micro_batch: int, *more: int) -> np.random.Generator:
        """A generator seeded by `(args.seed, global step, micro-batch, *more)`: the on-policy coin and the generation
        seeds are a function of where training is, not of a stream that must be saved, so a run resumed from a
        checkpoint (which restores `global_step`) draws exactly what the uninterrupted run drew, on every process."""
        return np.random.default_rng([self.args.seed % 2**32, self.state.global_step, micro_batch, *more])

    def _completion_source(self, micro_batch: int) -> str | None:
        """
        Who writes the completions of micro-batch `micro_batch` of the current optimizer step: `"student"` with
        probability `args.lmbda` (GKD's coin, the same on every process, since a ZeRO-3 generation is a collective),
        else `"teacher"` with `args.seq_kd`, else `None` (the dataset's completions).
        """
        args = self.args
        if args.lmbda > 0 and self._step_rng(micro_batch).random() < args.lmbda:
            return "student"
        return "teacher" if args.seq_kd else None

    def _generated_batch(self, batch: dict, source: str, micro_batch: int) -> dict:
        """
        `batch` with each row's completion replaced by one generated by `source` (`"student"` or `"teacher"`) from the
        row's prompt.

        The prompt of a row is its (attended) tokens before its first counted label (`labels != -100`), and at least
        its first token (the first label is never predicted): a plain-text row, labelled throughout, continues its
        first token. Prompts are left-padded for a batched `generate` of at most `args.max_new_tokens` tokens, and at
        most `args.lm_max_length` minus the longest prompt's length (at least one), so rows stay within `lm_max_length`
        (sampling at `args.generation_temperature` over the whole vocabulary, greedy at 0; the model's other
        generation settings, e.g. its EOS ids, apply), with the model in eval mode and without gradients. The rows
        are rebuilt right-padded: prompt + generated tokens up to and including the first EOS (all of them if none),
        `labels` = those generated tokens and -100 elsewhere, so an EOS-first generation still has one counted token.

        Sampling draws from a fork of the global RNG seeded by [`~DistillTrainer._step_rng`] (and the process index):
        the student's own random stream (dropout, data order) is the same with and without generation, and a resumed
        run generates what the uninterrupted one did. Under DeepSpeed ZeRO-3 (a student or teacher whose weights are
        partitioned) `generate(synced_gpus=True)` keeps the processes stepping together until every one has finished,
        each forward gathering the layers' weights as in training.

        Args:
            batch (`dict`): a collated training batch with `input_ids`, `labels` `(batch, seq)` and optionally
                `attention_mask`; other per-token tensors cannot be rebuilt and are an error.
            source (`str`): `"student"` or `"teacher"`.
            micro_batch (`int`): index of the batch in the optimizer step (seeds the sampling).

        Returns:
            `dict`: the batch's other entries with new `input_ids`, `attention_mask` and `labels` `(batch, seq')`.
        """
        input_ids, labels = batch["input_ids"], batch["labels"]
        attention = batch.get("attention_mask")
        attention = torch.ones_like(input_ids) if attention is None else attention
        rebuilt = ("input_ids", "attention_mask", "labels")
        other = [k for k, v in batch.items() if k not in rebuilt and torch.is_tensor(v) and v.dim() >= 2]
        if other:
            raise ValueError(
                f"lmbda / seq_kd replace each row's completion, but the batch also has the per-token entries {other}, "
                f"which cannot be rebuilt for the new tokens: give batches with only {list(rebuilt)}."
            )
        model, adapters_off, was_training = self._generating_model(source)
        config = model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else model.config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = next((p for p in (config.pad_token_id, model.config.pad_token_id) if p is not None), eos[0] if eos else 0)
        prompts = []
        for row in range(input_ids.shape[0]):
            real = attention[row].bool()
            ids, counted = input_ids[row][real], (labels[row][real] != -100).nonzero()
            prompts.append(ids[: max(int(counted[0]) if len(counted) else len(ids), 1)])
        width = max(len(p) for p in prompts)
        prompt_ids = input_ids.new_full((len(prompts), width), pad)
        prompt_mask = torch.zeros_like(prompt_ids)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
            prompt_ids[row, width - len(prompt):], prompt_mask[row, width - len(prompt):] = prompt, 1
        # Rows stay within lm_max_length (the longest prompt bounds the batch's budget); at least one new token.
        max_new_tokens = min(self.args.max_new_tokens, max(self.args.lm_max_length - width, 1))
        temperature = self.args.generation_temperature
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {
            "do_sample": False}
        device = input_ids.device
        seed = int(self._step_rng(micro_batch, 1 + self.accelerator.process_index).integers(2**63))
        model.eval()
        try:
            with torch.no_grad(), adapters_off, torch.random.fork_rng(
                devices=[] if device.type == "cpu" else [device], device_type=device.type
            ):
                torch.random.default_generator.manual_seed(seed)
                if device.type != "cpu":
                    torch.get_device_module(device).manual_seed(seed)
                sequences = model.generate(
                    input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                    pad_token_id=pad, synced_gpus=is_zero3_partitioned(model) and self.accelerator.num_processes > 1,
                    **sampling,
                )
        finally:
            model.train(was_training)
        completions = sequences[:, width:]  # (batch, generated)
        is_eos = torch.isin(completions, torch.tensor(eos, device=device, dtype=completions.dtype))
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, completions.shape[1])
        rows = [torch.cat([p, c[:n]]) for p, c, n in zip(prompts, completions, first_eos.tolist())]
        width = max(len(r) for r in rows)
        new_ids = input_ids.new_full((len(rows), width), pad)
        new_mask, new_labels = torch.zeros_like(new_ids), torch.full_like(new_ids, -100)
        for row, (prompt, tokens) in enumerate(zip(prompts, rows)):
            new_ids[row, : len(tokens)], new_mask[row, : len(tokens)] = tokens, 1
            new_labels[row, len(prompt): len(tokens)] = tokens[len(prompt):]
        return {**batch, "input_ids": new_ids, "attention_mask": new_mask, "labels": new_labels}

    def _generating_model(self, source: str):
        """The model that writes `source`'s completions, unwrapped from DDP / DeepSpeed (ZeRO-3 hooks stay on its
        submodules); a context that disables a PEFT student's adapters for its base-model teacher (else a no-op); and
        whether the model was in train mode."""
        if source == "student":
            model = self.accelerator.unwrap_model(self.model_wrapped)
            return model, contextlib.nullcontext(), model.training
        teacher = self._load_teacher()
        if isinstance(teacher, BaseModelTeacher):
            return teacher.peft_model, teacher.peft_model.disable_adapter(), teacher.peft_model.training
        model = self.accelerator.unwrap_model(teacher)
        return model, contextlib.nullcontext(), model.training


def _prepare_cross_tokenizer_dataset(dataset, split: str, processing_class, teacher_processing_class, args):
    """
    A causal-LM dataset for `args.cross_tokenizer`: data in TRL's formats is tokenised by both tokenizers with its
    completion spans aligned ([`hf_kd.cross_tokenizer.tokenize_cross_tokenizer_dataset`], student rows cut to
    `args.lm_max_length`); rows that already carry [`hf_kd.cross_tokenizer.CROSS_TOKENIZER_COLUMNS`] are used as
    they are; a dict of datasets is prepared per name.

    Raises:
        `ValueError`: pre-tokenized rows without the teacher's columns, naming them.
    """

    def prepare(dataset, split):
        columns = dataset.column_names
        if "input_ids" in columns:
            missing = [c for c in CROSS_TOKENIZER_COLUMNS if c not in columns]
            if missing:
                raise ValueError(
                    f"{split} is pre-tokenized (input_ids) but cross_tokenizer={str(args.cross_tokenizer)!r} also "
                    f"needs the teacher's tokens and the aligned spans, and it lacks {missing}: give the text in one "
                    "of TRL's formats (text, messages, prompt + completion) so that the trainer tokenizes it with both "
                    "tokenizers, or build the rows with hf_kd.cross_tokenizer.tokenize_cross_tokenizer_dataset."
                )
            return dataset
        tokenized = tokenized_by_trainer(split, lambda: tokenize_cross_tokenizer_dataset(
            dataset, processing_class, teacher_processing_class, args.lm_max_length
        ))
        # As prepare_lm_dataset: only what the collator reads (a class label column would reach the student's forward).
        return tokenized.select_columns(["input_ids", "attention_mask", "labels", *CROSS_TOKENIZER_COLUMNS])

    return map_datasets(dataset, split, prepare)
