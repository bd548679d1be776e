from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..losses import kd_loss
from ..metrics import make_exit_compute_metrics
from ..modeling import MultiExitConfig, MultiExitForSequenceClassification
from ..teacher import TEACHER_LOGITS_COLUMN, load_teacher
from .base_trainer import _BaseTrainer
from .early_exit_config import EarlyExitConfig
from .teacher_mixin import _TeacherMixin


class EarlyExitTrainer(_TeacherMixin, _BaseTrainer):
    r"""
    [`~transformers.Trainer`] that trains every exit of a [`MultiExitForSequenceClassification`] jointly, as DeeBERT
    (Xin et al., 2020, https://huggingface.co/papers/2004.12993) and PABEE (Zhou et al., 2020,
    https://huggingface.co/papers/2006.04152) do, optionally distilling into the exits.

    The loss is `sum_i w_i * loss_i` ([`EarlyExitTrainer.early_exit_loss`]), with `w` the normalised
    `args.exit_loss_weights` and, for exit `i` with logits `z_i`:

    - `args.distill_from="none"`: `loss_i = CE(y, z_i)`;
    - `"final_exit"` (self-distillation): `loss_i = alpha * T^2 * KL(p_final^T || p_i^T) + (1 - alpha) * CE(y, z_i)`
      for the earlier exits, with the final exit's logits detached; the final exit gets `CE(y, z_final)`;
    - `"teacher"`: the same with an external frozen teacher as the source of every exit. The teacher is handled as
      by [`DistillTrainer`] (model or Hub id, frozen, eval mode, no gradients, Accelerate `evaluation_mode`
      placement, `teacher_logits` column, on-disk logits cache, label-space and vocabulary checks).

    The loss is normalised by the number of labelled examples in the whole accumulated batch, so it is exact under
    gradient accumulation and data parallelism. Per-exit cross-entropies are logged as `exit_{i}_ce_loss`. At every
    evaluation the default `compute_metrics` ([`hf_kd.metrics.make_exit_compute_metrics`]) logs the final exit's
    accuracy, ECE, NLL, Brier and entropy, and `exit_{i}_accuracy`, `exit_{i}_ece`, `exit_{i}_entropy` for every exit.

    Args:
        model ([`MultiExitForSequenceClassification`]):
            The multi-exit model; its forward returns `exit_logits`, one `(batch, num_labels)` tensor per exit.
        args ([`EarlyExitConfig`]):
            Training, exit-weighting and distillation arguments.
        teacher_model (`PreTrainedModel`, `nn.Module` or `str`, *optional*):
            The teacher for `distill_from="teacher"`, or its Hub id / path. Defaults to
            `args.teacher_model_name_or_path`. May be omitted when every dataset already carries a `teacher_logits`
            column. An error with any other `distill_from`.
        teacher_processing_class (`PreTrainedTokenizerBase`, *optional*):
            The teacher's tokenizer, used to compare vocabularies. Loaded from the teacher's id when that is a string.
        compute_metrics (`Callable`, *optional*):
            Defaults to [`hf_kd.metrics.make_exit_compute_metrics`]`(with_teacher=args.distill_from == "teacher")`.

        The other arguments are those of [`~transformers.Trainer`].

    Example:

    ```python
    >>> from hf_kd import EarlyExitConfig, EarlyExitTrainer, MultiExitForSequenceClassification
    >>> model = MultiExitForSequenceClassification.from_backbone(
    ...     "sentence-transformers/all-MiniLM-L6-v2", exit_layers=[2, 4], num_labels=2
    ... )
    >>> args = EarlyExitConfig(output_dir="multi-exit", exit_loss_weights="linear", distill_from="final_exit")
    >>> trainer = EarlyExitTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
    ...                            processing_class=tokenizer)
    >>> trainer.train()
    ```
    """

    _tag_names = ["hf_kd", "early-exit"]
    _name = "Early-exit training"
    _paper = {
        "title": "DeeBERT: Dynamic Early Exiting for Accelerating BERT Inference",
        "id": "2004.12993",
        "citation": (
            "@inproceedings{xin2020deebert,\n  title={{DeeBERT}: Dynamic Early Exiting for Accelerating {BERT} "
            "Inference},\n  author={Xin, Ji and Tang, Raphael and Lee, Jaejun and Yu, Yaoliang and Lin, Jimmy},\n"
            "  booktitle={Proceedings of ACL},\n  year={2020}\n}"
        ),
    }

    def __init__(
        self,
        model: MultiExitForSequenceClassification,
        args: EarlyExitConfig,
        teacher_model: nn.Module | str | None = None,
        data_collator: Callable | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        teacher_processing_class=None,
        compute_metrics: Callable | None = None,
        **kwargs: Any,
    ):
        if not isinstance(args, EarlyExitConfig):
            raise TypeError(f"args must be an EarlyExitConfig, got {type(args).__name__}")
        teacher = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher is not None and args.distill_from != "teacher":
            raise ValueError(f"A teacher was given but distill_from={args.distill_from!r}: set distill_from='teacher'.")
        if isinstance(teacher, nn.Module) and args.teacher_model_init_kwargs:
            load_teacher(teacher, args.teacher_model_init_kwargs)  # raises: kwargs would be ignored

        if compute_metrics is None:
            compute_metrics = make_exit_compute_metrics(with_teacher=args.distill_from == "teacher")
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

        config = self.accelerator.unwrap_model(self.model).config
        if not isinstance(config, MultiExitConfig):
            raise TypeError(
                f"EarlyExitTrainer trains a MultiExitForSequenceClassification, got a model with a "
                f"{type(config).__name__}."
            )
        self.exit_loss_weights = self._resolve_exit_loss_weights(args.exit_loss_weights, config)
        if args.distill_from == "teacher":
            self._init_teacher(teacher, processing_class, teacher_processing_class)

    @staticmethod
    def _resolve_exit_loss_weights(weights: str | list[float] | None, config) -> list[float]:
        """The per-exit weights of `args.exit_loss_weights`, normalised to sum to 1, one per `config.exit_layers`."""
        num_exits = len(config.exit_layers)
        if weights is None:
            return list(config.normalized_exit_loss_weights)
        if weights == "uniform":
            weights = [1.0] * num_exits
        elif weights == "linear":
            weights = [float(layer) for layer in config.exit_layers]  # proportional to depth, as PABEE's average
        elif len(weights) != num_exits:
            raise ValueError(
                f"exit_loss_weights has {len(weights)} weights but the model has {num_exits} exits "
                f"(exit_layers={config.exit_layers}), got {weights}"
            )
        total = sum(weights)
        return [w / total for w in weights]

    def _model_card_info(self) -> dict[str, Any]:
        """The teacher, the exits' weights and the loss settings, for the model card."""
        hyperparameters = {"exit_loss_weights": [round(w, 4) for w in self.exit_loss_weights]}
        hyperparameters["distill_from"] = self.args.distill_from
        if self.args.distill_from != "none":
            hyperparameters.update(temperature=self.args.temperature, alpha=self.args.alpha)
        return {"teacher_model": self._teacher_name(), "hyperparameters": hyperparameters}

    def latest_eval_metrics(self) -> dict[str, dict[str, float]]:
        # `eval_exit_0_accuracy` reads as the metric `accuracy` of a split `eval_exit_0`: the card reports the final
        # exit only (its metrics carry no exit prefix).
        return {
            split: metrics
            for split, metrics in super().latest_eval_metrics().items()
            if not re.search(r"(^|_)exit_\d+$", split)
        }

    # ---- loss ------------------------------------------------------------------------------------------------------

    @staticmethod
    def early_exit_loss(
        exit_logits: Sequence[torch.Tensor],
        labels: torch.Tensor | None,
        weights: Sequence[float],
        soft_targets: Sequence[torch.Tensor | None],
        temperature: float = 2.0,
        alpha: float = 0.5,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        r"""
        Weighted multi-exit loss `sum_i weights[i] * loss_i`, where `loss_i` is
        [`hf_kd.losses.kd_loss`]`(exit_logits[i], soft_targets[i], labels, temperature, alpha)` when exit `i` has soft
        targets, and the cross-entropy `CE(labels, exit_logits[i])` when `soft_targets[i]` is `None`.

        Args:
            exit_logits (sequence of `torch.Tensor` of shape `(batch, num_labels)`):
                Logits of every exit, shallowest first.
            labels (`torch.Tensor` of shape `(batch,)`, *optional*):
                Class indices, `-100` for ignored rows. Without labels every exit needs soft targets.
            weights (sequence of `float`):
                One weight per exit (normalised by the caller).
            soft_targets (sequence of `torch.Tensor` of shape `(batch, num_labels)` or `None`):
                Source logits per exit (detached), `None` for plain cross-entropy.
            temperature (`float`, *optional*, defaults to `2.0`), alpha (`float`, *optional*, defaults to `0.5`):
                As in [`hf_kd.losses.kd_loss`].
            num_items_in_batch (`int` or `torch.Tensor`, *optional*):
                Number of labelled rows of the accumulated batch; the loss is then `sum / num_items_in_batch`.

        Returns:
            `(loss, exit_losses)`: the scalar weighted loss and the unweighted per-exit losses.
        """
        if not len(exit_logits) == len(weights) == len(soft_targets):
            raise ValueError(
                f"got {len(exit_logits)} exit logits, {len(weights)} weights and {len(soft_targets)} soft targets"
            )
        exit_losses = []
        for logits, source in zip(exit_logits, soft_targets):
            if source is None:
                if labels is None:
                    raise ValueError("an exit without soft targets needs labels for its cross-entropy")
                # alpha=0 against the exit's own detached logits: kd_loss's cross-entropy, with its handling of -100
                # rows and of num_items_in_batch (the soft term is exactly 0 and weighted by 0).
                source, exit_alpha = logits.detach(), 0.0
            else:
                exit_alpha = alpha
            exit_losses.append(
                kd_loss(logits, source, labels, temperature, exit_alpha, num_items_in_batch=num_items_in_batch)
            )
        loss = sum(w * exit_loss for w, exit_loss in zip(weights, exit_losses))
        return loss, exit_losses

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels", None)
        teacher_logits = inputs.pop(TEACHER_LOGITS_COLUMN, None)
        outputs = model(**inputs)
        exit_logits = tuple(outputs.exit_logits)  # num_exits x (batch, num_labels), exit_logits[-1] = outputs.logits
        num_exits = len(exit_logits)

        distill_from = self.args.distill_from
        if distill_from == "teacher":
            teacher_logits = self._batch_teacher_logits(inputs, teacher_logits).to(exit_logits[-1].device)
            soft_targets = [teacher_logits] * num_exits
        elif distill_from == "final_exit":
            # Self-distillation: the final exit teaches the earlier ones but receives no gradient from them.
            soft_targets = [exit_logits[-1].detach()] * (num_exits - 1) + [None]
        else:
            soft_targets = [None] * num_exits
        if labels is None and distill_from != "teacher":
            raise ValueError(f"distill_from={distill_from!r} trains on labels, but this batch has no 'labels'.")

        T, alpha = self.args.temperature, self.args.alpha
        loss, _ = self.early_exit_loss(
            exit_logits, labels, self.exit_loss_weights, soft_targets, T, alpha, num_items_in_batch
        )
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts the items of every process; DDP averages gradients over processes.
            loss = loss * self.accelerator.num_processes

        mode = "train" if model.training else "eval"
        if labels is not None:
            with torch.no_grad():
                for i, logits in enumerate(exit_logits):
                    self._metrics[mode][f"exit_{i}_ce_loss"].append(
                        kd_loss(logits, logits, labels, T, alpha=0.0).detach()
                    )
        if return_outputs:
            # predictions = (final, exit_0, ..., exit_{L-1}[, teacher]) in this order: make_exit_compute_metrics reads
            # them by position (Trainer keeps the dict's order).
            predictions = {"logits": exit_logits[-1]}
            predictions.update({f"exit_{i}_logits": logits for i, logits in enumerate(exit_logits)})
            if distill_from == "teacher":
                predictions[TEACHER_LOGITS_COLUMN] = teacher_logits
            return loss, predictions
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
