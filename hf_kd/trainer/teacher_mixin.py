"""`_TeacherMixin`: the frozen-teacher machinery shared by [`DistillTrainer`] and [`EarlyExitTrainer`].

One copy of: teacher/student compatibility checks (label spaces, vocabularies), loading and placement of the frozen
teacher (Accelerate, or DeepSpeed with the teacher sharded by ZeRO-3: [`hf_kd.distributed`]), the PEFT student's base
model as its own teacher, the on-disk teacher logits cache and its `teacher_logits` dataset column (computed by all
processes together in a multi-process run), and [`~_TeacherMixin._with_eval_columns`], which adds that column to
datasets passed to `evaluate`/`predict`. A trainer with a teacher lists `TEACHER_LOGITS_COLUMN` in its `_extra_columns`.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ..cross_tokenizer import CROSS_TOKENIZER_COLUMNS, span_token_mask, tokenizer_fingerprint
from ..distributed import is_zero3_partitioned, prepare_deepspeed_teacher, teacher_placement
from ..lm_data import LMDataCollator
from ..lm_head import lm_head_skipped, lm_head_unsupported_reason
from ..losses import LMHeadInputs
from ..peft_utils import BaseModelTeacher, frozen_tensors, is_peft_model, warn_if_base_head_untrained
from ..teacher import (
    LM_TOP_K_SPAN_TENSORS,
    TEACHER_CACHE_INDEX_COLUMN,
    TEACHER_INPUT_NAMES,
    TEACHER_LOGITS_COLUMN,
    TeacherLogitsCache,
    check_datasets_label_names,
    check_label_spaces,
    check_lm_vocabularies,
    check_vocabularies,
    compute_teacher_lm_top_k,
    compute_teacher_logits,
    dataset_fingerprint,
    lm_top_k_data_key,
    load_lm_top_k,
    load_teacher,
    load_teacher_config,
    load_teacher_tokenizer,
    save_lm_top_k,
    teacher_fingerprint,
    teacher_logits_for_batch,
    tensors_fingerprint,
)
from .base_trainer import is_causal_lm

logger = logging.getLogger(__name__)


class _TeacherMixin:
    """
    Frozen teacher for a [`~transformers.Trainer`] subclass whose `args` inherit [`_TeacherArguments`].

    The trainer calls [`~_TeacherMixin._init_teacher`] at the end of its `__init__` (after `Trainer.__init__`, which
    builds the accelerator and the datasets), then gets each batch's teacher logits from
    [`~_TeacherMixin._batch_teacher_logits`]. The teacher is frozen, in eval mode and run without gradients. It is
    placed by Accelerate with `evaluation_mode=True` (never wrapped in DDP: it has nothing to synchronise), or, in a
    DeepSpeed run, initialised for inference by DeepSpeed and sharded with ZeRO-3 (`args.teacher_zero_stage`). With
    `args.teacher_from_base_model` the teacher is the PEFT student itself with its adapters disabled. Its logits come,
    in this order of preference, from a `teacher_logits` column of the dataset, from the on-disk cache
    (`args.cache_teacher_logits`), or from a teacher forward at every step.
    """

    # A trainer that never calls _init_teacher (EarlyExitTrainer without a teacher) has no teacher and no cache.
    _teacher_source = None
    _teacher = None
    _token_id_map = None
    _logits_cache = None
    _teacher_placement = None
    _teacher_config = None
    _teacher_tokenizer = None  # cross_tokenizer: the teacher's own tokenizer (DistillTrainer sets it)
    _lm_fused_heads = None  # {(side, id(model)): whether the loss runs that model's LM head}, see _lm_fused_head

    @staticmethod
    def _resolve_teacher(teacher_model, args):
        """The teacher a trainer was given: `teacher_model` (a module or a Hub id / path), else
        `args.teacher_model_name_or_path` (`None` when neither). Called before `Trainer.__init__`, so that a built
        teacher given with `teacher_model_init_kwargs` (which would be ignored) fails before any set-up."""
        teacher = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if isinstance(teacher, nn.Module) and args.teacher_model_init_kwargs:
            load_teacher(teacher, args.teacher_model_init_kwargs)  # raises, naming both
        return teacher

    def _init_teacher(self, teacher, processing_class, teacher_processing_class) -> None:
        """Check the teacher against the student, add cached logits to the datasets, or load an online teacher.

        Args:
            teacher (`nn.Module`, `str` or `None`):
                The teacher, its Hub id / path, or `None` when every dataset carries a `teacher_logits` column.
            processing_class (`PreTrainedTokenizerBase`, *optional*):
                The student's tokenizer (or processor).
            teacher_processing_class (`PreTrainedTokenizerBase`, *optional*):
                The teacher's tokenizer; loaded from the teacher's id when that is a string.
        """
        if self.args.teacher_from_base_model:
            teacher = self._base_model_teacher(teacher)
        self._teacher_source = teacher
        self._teacher = None
        self._token_id_map = None
        if teacher is not None and not isinstance(teacher, BaseModelTeacher):
            self._token_id_map = self._check_teacher_compatibility(teacher, processing_class, teacher_processing_class)
        self._logits_cache = None
        self._lm_top_k = None  # the causal-LM top-k cache of every split, once loaded (see _with_lm_top_k)
        vocab_size = self._student_lm_vocab_size()
        if self.args.cache_teacher_logits and vocab_size is not None:
            whose = "student's"
            if self._cross_tokenizer_cache():
                # The cache holds the teacher's logits over its own vocabulary (the width of its logits).
                whose, vocab_size = "teacher's", self._teacher_config.vocab_size
            if self.args.lm_cache_top_k > vocab_size:
                raise ValueError(
                    f"lm_cache_top_k={self.args.lm_cache_top_k} is larger than the {whose} vocabulary "
                    f"({vocab_size} tokens): choose 1 <= lm_cache_top_k <= {vocab_size}."
                )
            self._lm_top_k = {"paths": {}, "parts": [], "rows": 0, "tokens": 0, "vocab_size": vocab_size}
            # The collator never sees the index column (a user's collator may drop unknown keys): it is carried past it.
            self.data_collator = _WithCacheIndex(self.data_collator)
        if self.args.cache_teacher_logits:
            if teacher is None:
                raise ValueError(
                    "cache_teacher_logits=True needs a teacher: pass teacher_model or set teacher_model_name_or_path."
                )
            self._logits_cache = TeacherLogitsCache(self.args.teacher_logits_cache_dir, self._teacher_fingerprint())
            self.train_dataset = self.with_teacher_logits(self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self.with_teacher_logits(v, k) for k, v in self.eval_dataset.items()}
            else:
                self.eval_dataset = self.with_teacher_logits(self.eval_dataset, "eval")
        elif teacher is None and not self._has_teacher_logits(self.train_dataset):
            raise ValueError(
                f"{type(self).__name__} needs a teacher: pass teacher_model, set teacher_model_name_or_path, set "
                f"teacher_from_base_model=True (PEFT students), or give a train_dataset with a "
                f"'{TEACHER_LOGITS_COLUMN}' column."
            )
        elif teacher is not None and not self._has_teacher_logits(self.train_dataset):
            self._load_teacher()  # online teacher: load it now so a bad id fails before training starts

    def _base_model_teacher(self, teacher) -> BaseModelTeacher:
        """The teacher of `args.teacher_from_base_model=True`: the PEFT student with its adapters disabled."""
        student = self.accelerator.unwrap_model(self.model)
        if teacher is not None:
            raise ValueError(
                "teacher_from_base_model=True uses the PEFT student's base model as the teacher, but a teacher was "
                f"given too ({type(teacher).__name__ if isinstance(teacher, nn.Module) else repr(teacher)}): "
                "choose one."
            )
        if not is_peft_model(student):
            raise ValueError(
                f"teacher_from_base_model=True needs a PEFT student (pass peft_config=... or a peft.PeftModel), got a "
                f"{type(student).__name__}: without adapters the student's base model is the student itself."
            )
        warn_if_base_head_untrained(student)
        return BaseModelTeacher(student)

    def _teacher_fingerprint(self) -> str:
        """The cache key of the teacher: its weights (gathered under ZeRO-3) or, given by name, its files."""
        teacher = self._teacher_source
        if isinstance(teacher, BaseModelTeacher):
            # The outputs with adapters disabled depend on the frozen weights only (not on the adapter's init).
            base = teacher.peft_model.get_base_model()
            return tensors_fingerprint(base, sorted(frozen_tensors(teacher.peft_model).items()))
        return teacher_fingerprint(teacher, self.args.teacher_model_init_kwargs)

    def _teacher_name(self) -> str | None:
        """The teacher's id or path for the model card, `None` when unknown."""
        teacher = self._teacher_source
        if isinstance(teacher, (nn.Module, BaseModelTeacher)):
            teacher = teacher.config._name_or_path if hasattr(teacher, "config") else None
        return str(teacher) if teacher else None

    @staticmethod
    def _has_teacher_logits(dataset) -> bool:
        return dataset is not None and TEACHER_LOGITS_COLUMN in getattr(dataset, "column_names", ())

    @staticmethod
    def _teacher_hub_kwargs(args) -> dict:
        """The Hub keyword arguments of `args.teacher_model_init_kwargs` that also apply to the teacher's config and
        tokenizer files."""
        return {
            k: v
            for k, v in (args.teacher_model_init_kwargs or {}).items()
            if k in ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code")
        }

    def _check_teacher_compatibility(self, teacher, processing_class, teacher_processing_class):
        """Label space and vocabulary checks, from configs and tokenizers only (teacher weights are not loaded)."""
        student_config = self.accelerator.unwrap_model(self.model).config
        hub_kwargs = self._teacher_hub_kwargs(self.args)
        if isinstance(teacher, nn.Module):
            teacher_config = teacher.config
        else:
            teacher_config = load_teacher_config(teacher, hub_kwargs)
        if teacher_processing_class is None and not isinstance(teacher, nn.Module):
            teacher_processing_class = load_teacher_tokenizer(str(teacher), hub_kwargs)
        student_tokenizer = getattr(processing_class, "tokenizer", processing_class)
        student_is_lm = self._student_lm_vocab_size() is not None
        teacher_is_lm = is_causal_lm(teacher if isinstance(teacher, nn.Module) else teacher_config)
        if student_is_lm != teacher_is_lm:
            kinds = ["a causal LM" if lm else "not a causal LM (...ForCausalLM)" for lm in (student_is_lm, teacher_is_lm)]
            raise ValueError(
                f"The student ({type(self.accelerator.unwrap_model(self.model)).__name__}) is {kinds[0]} but the "
                f"teacher ({type(teacher).__name__ if isinstance(teacher, nn.Module) else repr(str(teacher))}, "
                f"architectures {getattr(teacher_config, 'architectures', None)}) is {kinds[1]}: distil a causal LM "
                "into a causal LM, or a classifier into a classifier."
            )
        if student_is_lm:
            if self.args.map_teacher_token_ids:
                raise ValueError(
                    "map_teacher_token_ids=True is for classifiers reading the same text through two vocabularies; "
                    "a causal-LM teacher's next-token distribution must be over the student's own vocabulary."
                )
            self._teacher_config = teacher_config
            # cross_tokenizer (DistillConfig): another vocabulary is what the cross-tokenizer loss is for.
            if getattr(self.args, "cross_tokenizer", None) is None:
                check_lm_vocabularies(student_config, teacher_config, student_tokenizer, teacher_processing_class)
            return None
        check_label_spaces(student_config, teacher_config)
        # A student with default LABEL_i names passes check_label_spaces: the datasets' label names are checked
        # against the teacher's too (evaluate / predict check theirs with _BaseTrainer._label_spaces).
        self._teacher_config = teacher_config
        check_datasets_label_names(self.train_dataset, self.eval_dataset, {"teacher": teacher_config})
        # A MultiExitConfig keeps vocab_size in its backbone's config.
        return check_vocabularies(
            getattr(student_config, "backbone_config", None) or student_config,
            getattr(teacher_config, "backbone_config", None) or teacher_config,
            student_tokenizer,
            teacher_processing_class,
            self.args.map_teacher_token_ids,
        )

    def _load_teacher(self) -> nn.Module:
        """Load (once) and place the frozen teacher; on every process (placing a sharded teacher is a collective).
        Cached runs never get here."""
        if self._teacher is None:
            source = self._teacher_source
            if isinstance(source, BaseModelTeacher):
                self._teacher, kind = source, "student_base_model"
            elif self.is_deepspeed_enabled:
                stage = self.args.teacher_zero_stage
                self._teacher = prepare_deepspeed_teacher(
                    source, self.accelerator, self.args, stage, self.args.teacher_model_init_kwargs,
                    causal_lm=self._student_lm_vocab_size() is not None,
                )
                kind = "zero3_sharded" if stage == 3 else "replicated"
            else:
                if isinstance(source, nn.Module) and is_zero3_partitioned(source):
                    raise ValueError(
                        "The teacher is partitioned by DeepSpeed ZeRO-3 but this run does not use DeepSpeed: build "
                        "it outside the ZeRO-3 run, or pass its Hub id or path."
                    )
                causal_lm = self._student_lm_vocab_size() is not None
                teacher = load_teacher(source, self.args.teacher_model_init_kwargs, causal_lm=causal_lm)
                self._teacher, kind = self.accelerator.prepare_model(teacher, evaluation_mode=True), "replicated"
            self._teacher_placement = teacher_placement(self._teacher, self.accelerator, kind)
            if self.args.should_log:
                logger.info(f"Teacher placement: {self._teacher_placement}")
        return self._teacher

    @property
    def teacher_model(self) -> nn.Module | None:
        """The frozen teacher (a DeepSpeed engine in a DeepSpeed run; its `.module` is the model), or `None` while it
        has not been loaded (a fully cached run never loads it)."""
        return self._teacher

    @property
    def teacher_placement(self) -> dict:
        """
        Where the teacher's weights live: `kind` (`"zero3_sharded"`, `"replicated"`, `"student_base_model"`, or
        `"none"` when no teacher was loaded, e.g. a fully cached run), `num_processes`, and for a loaded model
        `parameters` (the whole teacher) and `parameters_per_process` (what each process holds: about
        `parameters / num_processes` when sharded). The same on every process.
        """
        if self._teacher_placement is None:
            return {"kind": "none", "num_processes": self.accelerator.num_processes}
        return dict(self._teacher_placement)

    def _batch_teacher_logits(self, inputs: dict, teacher_logits):
        """The batch's teacher logits `(batch, num_labels)`: the popped `teacher_logits` column when the batch had
        one, else a forward of the (frozen, no-grad) teacher on `inputs`."""
        if teacher_logits is None:
            if self._teacher_source is None:
                raise ValueError(
                    f"This batch has no '{TEACHER_LOGITS_COLUMN}' and the trainer has no teacher: add the column to "
                    "every dataset (train and eval) or pass a teacher."
                )
            teacher_logits = teacher_logits_for_batch(self._load_teacher(), inputs, self._token_id_map)
        return teacher_logits

    def _lm_fused_head(self, model, side: str) -> bool:
        """Whether the loss runs `model`'s LM head itself (`side`: `"student"` or `"teacher"`), by
        `args.lm_fused_head` and [`hf_kd.lm_head.lm_head_unsupported_reason`]; decided once per model and side, the
        reason for full logits logged once (or raised, with `lm_fused_head=True`)."""
        if self._lm_fused_heads is None:
            self._lm_fused_heads = {}
        key = (side, id(model))
        decided = self._lm_fused_heads.get(key)
        if decided is None:
            setting = self.args.lm_fused_head
            reason = "lm_fused_head=False" if setting is False else lm_head_unsupported_reason(model)
            if reason is not None and setting is True:
                raise ValueError(
                    f"lm_fused_head=True, but the {side}'s LM head cannot run inside the loss: {reason}. Set "
                    "lm_fused_head=None (full logits for that model) or False."
                )
            decided = self._lm_fused_heads[key] = reason is None
            if self.args.should_log:
                logger.info(f"The {side}'s LM head " + ("runs inside the loss" if decided else f"makes full logits ({reason})"))
        return decided

    def _lm_teacher_outputs(self, inputs: dict, fused: bool) -> torch.Tensor | LMHeadInputs:
        """The live teacher's logits for this batch (no gradient), or with `fused` its hidden states and (detached)
        head weight."""
        if not fused:
            return self._batch_teacher_logits(inputs, None)
        teacher = self._load_teacher()
        with lm_head_skipped(teacher) as head:
            hidden = teacher_logits_for_batch(teacher, inputs, self._token_id_map)
        return LMHeadInputs(hidden, head.weight.detach())

    def with_teacher_logits(self, dataset, split: str = "dataset"):
        """Return `dataset` with a `teacher_logits` column `(num_rows, num_labels)`, from the cache when possible.

        On a cache miss the teacher is loaded and run once over the dataset, each process computing its share of the
        batches; the main process writes the file.
        """
        if self._lm_top_k is not None:
            return self._with_lm_top_k(dataset, split)
        if dataset is None or self._has_teacher_logits(dataset):
            return dataset
        import datasets

        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(
                f"cache_teacher_logits needs a datasets.Dataset for the {split} split, got {type(dataset).__name__}. "
                f"Add a '{TEACHER_LOGITS_COLUMN}' column yourself or train with an online teacher."
            )
        if "input_ids" not in dataset.column_names and "pixel_values" not in dataset.column_names:
            raise ValueError(
                f"The {split} dataset has no 'input_ids' or 'pixel_values' column (columns: {dataset.column_names}); "
                "tokenize it before building the trainer so teacher logits can be cached."
            )
        columns = [c for c in TEACHER_INPUT_NAMES if c in dataset.column_names]
        data_key = dataset_fingerprint(dataset, columns)
        path = self._logits_cache.path_for(data_key, self._token_id_map)
        num_labels = getattr(getattr(self.accelerator.unwrap_model(self.model), "config", None), "num_labels", None)
        logits = self._logits_cache.load(path, len(dataset), data_key, num_labels)
        num_processes = self.accelerator.num_processes
        if num_processes > 1:
            # Every process computes the logits of its share of the batches and an all-reduce assembles them: N
            # times faster than one process computing them all, and the only way with a ZeRO-3 teacher, whose
            # forward is a collective. All processes compute, or none: one missing file makes them all compute.
            missing = torch.tensor([float(logits is None)], device=self.args.device)
            if self.accelerator.reduce(missing, reduction="sum").item() > 0:
                logits = None
        if logits is None:
            with self._student_gathered_for_base_teacher():
                logits = compute_teacher_logits(
                    self._load_teacher(),
                    dataset,
                    self.data_collator,
                    self.args.per_device_eval_batch_size,
                    self.args.device,
                    self._token_id_map,
                    desc=f"Teacher logits ({split})",
                    process_index=self.accelerator.process_index,
                    num_processes=num_processes,
                )
            if num_processes > 1:
                logits = self.accelerator.reduce(logits.to(self.args.device), reduction="sum").cpu()
            if self.args.should_save:
                self._logits_cache.save(path, logits, data_key)
        return dataset.add_column(TEACHER_LOGITS_COLUMN, logits.tolist())

    def _cross_tokenizer_cache(self) -> bool:
        """Whether the top-k cache is the cross-tokenizer one (`args.cross_tokenizer`, [`DistillConfig`] only): the
        teacher's logits on its own tokens, at the positions its aligned spans read."""
        return getattr(self.args, "cross_tokenizer", None) is not None

    def _lm_cache_view(self, dataset):
        """
        What the top-k cache pass reads of `dataset`, its key's columns, the collator of the pass and the pass's
        options. Same tokenizer: the rows themselves (inputs and completion labels), at temperature 1 (the loss
        tempers the cached logits). Cross-tokenizer: the teacher's rows (`teacher_input_ids`) with "labels" equal to
        its tokens inside the aligned spans ([`hf_kd.cross_tokenizer.span_token_mask`]), so that the pass stores the
        positions [`hf_kd.losses.span_log_probs`] reads, at `args.temperature` and with the three span tensors: the key
        adds the teacher's tokenizer, the temperature (a cached chain-rule factor is a tempered log-prob) and the
        student's vocabulary size (the rank past which the far tail is summed).
        """
        if not self._cross_tokenizer_cache():
            columns = [c for c in (*TEACHER_INPUT_NAMES, "labels") if c in dataset.column_names]
            return dataset.select_columns(columns), columns, self.data_collator.collator, "", {}
        columns = ["teacher_input_ids", "teacher_span_starts", "teacher_span_ends"]

        def teacher_row(row):
            ids = torch.tensor(row["teacher_input_ids"])
            mask = span_token_mask(torch.tensor([row["teacher_span_starts"]]), torch.tensor([row["teacher_span_ends"]]),
                                   len(ids))[0]
            return {"input_ids": ids.tolist(), "labels": torch.where(mask, ids, -100).tolist()}

        view = dataset.select_columns(columns).map(teacher_row, remove_columns=columns, desc="Teacher cache rows")
        temperature, student_vocab = self.args.temperature, self._student_lm_vocab_size()
        extra = (f":cross-tokenizer:{tokenizer_fingerprint(self._teacher_tokenizer)}:T={float(temperature)!r}"
                 f":far-rank={student_vocab}")
        collator = LMDataCollator(self.data_collator.collator.teacher_pad_token_id)
        return view, columns, collator, extra, {"temperature": temperature, "span_tensors": student_vocab}

    def _with_lm_top_k(self, dataset, split: str):
        """
        Causal-LM students: return `dataset` with a `teacher_cache_index` column pointing each row at its completion
        tokens' cached top-k teacher logits ([`hf_kd.teacher.compute_teacher_lm_top_k`]), computed on a cache miss
        (the teacher is then loaded; every process runs the whole pass, the main process writes the file). The splits'
        caches are kept in memory one after the other, so the index is unique across splits. With `cross_tokenizer`
        the cached tokens are the teacher's ([`~_TeacherMixin._lm_cache_view`]).
        """
        if dataset is None:
            return dataset
        import datasets

        cross = self._cross_tokenizer_cache()
        needed = ["labels", *CROSS_TOKENIZER_COLUMNS] if cross else ["labels"]
        if not isinstance(dataset, datasets.Dataset) or any(c not in dataset.column_names for c in needed):
            raise TypeError(
                f"cache_teacher_logits with a causal-LM student needs a tokenized datasets.Dataset with 'input_ids' "
                f"and {needed} for the {split} split, got {type(dataset).__name__} with columns "
                f"{getattr(dataset, 'column_names', None)}."
            )
        store, top_k = self._lm_top_k, self.args.lm_cache_top_k
        view, columns, collator, extra, options = self._lm_cache_view(dataset)
        data_key = lm_top_k_data_key(dataset_fingerprint(dataset, columns) + extra, top_k)
        path = self._logits_cache.path_for(data_key, None)
        if path not in store["paths"]:
            teacher_key, vocab_size = self._logits_cache.teacher_key, store["vocab_size"]
            cached = load_lm_top_k(path, teacher_key, data_key, len(dataset), top_k, vocab_size, span_tensors=cross)
            if cached is None:
                with self._student_gathered_for_base_teacher():
                    cached = compute_teacher_lm_top_k(
                        self._load_teacher(), view, collator, self.args.per_device_eval_batch_size, self.args.device,
                        top_k, desc=f"Teacher top-{top_k} logits ({split})", **options,
                    )
                if self.args.should_save:
                    save_lm_top_k(path, cached, teacher_key, data_key)
            store["paths"][path] = store["rows"]
            store["parts"].append((store["rows"], store["tokens"], cached))
            store["rows"] += len(dataset)
            store["tokens"] += cached["topk_ids"].shape[0]
            # One tensor per field over all splits, for a single gather per batch.
            fields = [part for _, _, part in store["parts"]]
            store["offsets"] = torch.cat(
                [fields[0]["offsets"][:1]]
                + [part["offsets"][1:] + base for (_, base, _), part in zip(store["parts"], fields)]
            )
            for name in ("topk_ids", "topk_logprobs", "logsumexp", *(LM_TOP_K_SPAN_TENSORS if cross else ())):
                store[name] = torch.cat([part[name] for part in fields])
        if TEACHER_CACHE_INDEX_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(TEACHER_CACHE_INDEX_COLUMN)
        first = store["paths"][path]
        return dataset.add_column(TEACHER_CACHE_INDEX_COLUMN, list(range(first, first + len(dataset))))

    def _cached_lm_fields(self, index: torch.Tensor, counted: torch.Tensor, names) -> dict[str, torch.Tensor]:
        """
        The cached fields `names` of a batch's rows (`index`, the `teacher_cache_index` column `(batch,)`), laid out
        like `counted` `(batch, seq)`, the positions the cache holds (shifted labels `!= -100`; with `cross_tokenizer`
        the teacher's span positions): `(batch, seq, k)` or `(batch, seq)`, on `counted`'s device, zero elsewhere.
        Integer fields come as int64, float fields as float32.
        """
        store = self._lm_top_k
        index = index.cpu().long()
        counts = counted.sum(1).cpu()
        starts, ends = store["offsets"][index], store["offsets"][index + 1]
        if not torch.equal(counts, ends - starts):
            bad = (counts != ends - starts).nonzero()[0, 0]
            raise ValueError(
                f"Row {int(index[bad])} of this batch has {int(counts[bad])} completion tokens but the teacher cache "
                f"holds {int(ends[bad] - starts[bad])} for it: the data collator must not change the labels "
                "(e.g. truncate) between the cache pass and training."
            )
        tokens = torch.cat([torch.arange(int(a), int(b)) for a, b in zip(starts, ends)])
        device = counted.device
        out = {}
        for name in names:
            values = store[name][tokens].to(device)
            values = values.long() if not values.is_floating_point() else values.float()
            out[name] = values.new_zeros(*counted.shape, *values.shape[1:])
            out[name][counted] = values
        return out

    def _cached_lm_top_k(self, index: torch.Tensor, labels: torch.Tensor):
        """
        The cached teacher targets of a causal-LM batch, laid out like its shifted `labels` `(batch, seq)`:
        `topk_ids` `(batch, seq, k)` (int64), `topk_logits` `(batch, seq, k)` and `logsumexp` `(batch, seq)` (float32),
        zero at the positions that do not count, for [`hf_kd.losses.sparse_lm_kd_loss`].
        """
        counted = labels != -100
        fields = self._cached_lm_fields(index, counted, ("topk_ids", "topk_logprobs", "logsumexp"))
        logsumexp = fields["logsumexp"]
        logits = torch.where(counted[..., None], fields["topk_logprobs"] + logsumexp[..., None], 0.0)
        return fields["topk_ids"], logits, logsumexp

    def _student_gathered_for_base_teacher(self):
        """Context for a cache pass of the base-model teacher. A student partitioned by ZeRO-3 at load time
        (`zero.Init`) has no gathering hooks until DeepSpeed wraps it at `train()` / `evaluate()`: a pass before that
        runs with its weights gathered (the whole base model on each process, once). Otherwise a no-op."""
        source = self._teacher_source
        if isinstance(source, BaseModelTeacher) and self.deepspeed is None and is_zero3_partitioned(source.peft_model):
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(source.peft_model.parameters()))
        return contextlib.nullcontext()

    def _with_eval_columns(self, dataset, split: str):
        # Datasets passed to evaluate/predict get the cached teacher logits column, as the init-time ones did.
        if self._logits_cache is not None:
            return self.with_teacher_logits(dataset, split)
        return dataset


class _WithCacheIndex:
    """A data collator that carries the `teacher_cache_index` of each example past the wrapped `collator` (which
    then sees the examples without it) and adds it to the batch as an int64 tensor `(batch,)`."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        if not features or TEACHER_CACHE_INDEX_COLUMN not in features[0]:
            return self.collator(features)
        index = torch.tensor([f[TEACHER_CACHE_INDEX_COLUMN] for f in features], dtype=torch.long)
        batch = self.collator([{k: v for k, v in f.items() if k != TEACHER_CACHE_INDEX_COLUMN} for f in features])
        batch[TEACHER_CACHE_INDEX_COLUMN] = index
        return batch
