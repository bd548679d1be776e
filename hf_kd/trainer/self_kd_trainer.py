from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

from ..losses import self_kd_loss
from ..metrics import make_exit_compute_metrics
from ..modeling import MultiExitForSequenceClassification
from .dedier import SAMPLE_INDEX_COLUMN, with_sample_index
from .early_exit_trainer import EarlyExitTrainer
from .multi_exit_trainer import _MultiExitTrainer
from .self_kd_callback import HUMAN_DISTRIBUTION_COLUMN, SelfKDCallback
from .self_kd_config import SelfKDConfig


class SelfKDTrainer(_MultiExitTrainer):
    r"""
    [`~transformers.Trainer`] for self-knowledge distillation from lower layers for learning ambiguity (Park, Jeong,
    Cho & Park, 2024, https://huggingface.co/papers/2406.09719): a classifier trained on single labels that predicts
    label distributions closer to human judgements, with no teacher and no extra model.

    It trains a multi-exit model with one classifier per layer ([`MultiExitForSequenceClassification`] with the
    default `exit_layers`), so the result is a standard hf_kd model whose final exit is the classifier. The epochs
    pass through three phases ([`SelfKDConfig`]; state machine in [`~self_kd_callback.SelfKDCallback`]):

    - **A, warm-up**: loss `sum_j CE(y, p_j)` over every exit ([`EarlyExitTrainer.early_exit_loss`] with unit
      weights by default, `args.warmup_exit_loss_weights`). After each epoch the mean predictive entropy of every exit on the validation set is logged
      (`val_entropy_layer_{l}`), saved (`output_dir/self_kd/layer_entropy.json`, plotted into `layer_entropy.png` at
      the end of training), and the source
      layer is chosen where the entropy drops ([`hf_kd.self_kd.select_source_exit`]); the warm-up ends when that
      choice has been stable for `selection_stable_epochs` epochs, or after `warmup_max_epochs`.
    - **B, self-distillation**: the main classifier learns `(1 - lambda) CE(y, p_L) + lambda KL(sg[p_s] || p_L)`, the
      source layer `CE(y, p_s)` plus `KL(sg[p_L] || p_s)` on the samples it gets wrong and the main classifier right,
      the other exits their cross-entropy ([`hf_kd.losses.self_kd_loss`]).
    - **C, re-calibration** (`recalibration_percent = m > 0`): the level of ambiguity of every training sample,
      `p_s(y | x)` at the source layer, is computed in one pass over the train set; for the `m %` lowest, the main
      classifier's loss becomes `KL(u || p_L)`, towards the uniform distribution.

    The phase, the per-epoch entropy curves and selections, the source layer, the per-sample ambiguity scores and the
    re-calibration set are trainer state: saved in every checkpoint, restored exactly on `resume_from_checkpoint`.
    The loss is normalised by the number of labelled examples of the whole accumulated batch (exact under gradient
    accumulation and data parallelism); its parts are logged as `main_loss`, `source_loss`, `other_exits_loss`,
    `source_correction_fraction`, `recalibrated_fraction`, and every exit's cross-entropy as `exit_{i}_ce_loss`.
    Evaluation uses the current phase's loss without re-calibration.

    At every evaluation the default `compute_metrics` ([`hf_kd.metrics.make_exit_compute_metrics`] with
    `with_human=True`) reports the final exit's accuracy, ECE, NLL, Brier, entropy, per-exit accuracy, ECE and entropy,
    and, when the evaluation set has a `human_label_dist` column (the [`hf_kd.data`] loaders write it), KL(human ||
    model) and the Jensen-Shannon distance exactly as ChaosNLI computes them, for the final exit (`kl`,
    `js_distance`: they go to the model card) and every exit. The card also reports the source layer, `lambda`, `m`,
    the other settings and the entropy table of the selection.

    Args:
        model ([`MultiExitForSequenceClassification`] or another multi-exit model):
            A model whose config has `exit_layers` (at least 2 exits; 3 with `source_layer_side="after_drop"`) and
            whose output has `exit_logits`, one `(batch, num_labels)` tensor per exit, the final one last.
        args ([`SelfKDConfig`]):
            Training and self-distillation arguments.
        eval_dataset ([`~datasets.Dataset`] or `dict`):
            Required: the validation set the source layer is selected on (a dict needs
            `args.selection_dataset_name`). It needs no labels for the selection; a `human_label_dist` column adds
            the distribution metrics.
        compute_metrics (`Callable`, *optional*):
            Defaults to [`hf_kd.metrics.make_exit_compute_metrics`]`(with_human=True)`; it receives
            `predictions = (final_logits, exit_0_logits, ..., exit_{L-1}_logits, human_label_dist)`, the last one NaN
            where the evaluation set has no human distributions.

        The other arguments are those of [`~transformers.Trainer`]. With `recalibration_percent > 0` the train set
        gets a `sample_index` column (as [`EarlyExitTrainer`]'s DEDIER does).

    Example:

    ```python
    >>> from hf_kd import MultiExitForSequenceClassification, SelfKDConfig, SelfKDTrainer
    >>> model = MultiExitForSequenceClassification.from_backbone("sentence-transformers/all-MiniLM-L6-v2", num_labels=3)
    >>> args = SelfKDConfig(output_dir="self-kd", num_train_epochs=5, kd_lambda=0.6, recalibration_percent=10)
    >>> trainer = SelfKDTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
    ...                         processing_class=tokenizer)
    >>> trainer.train()
    >>> trainer.source_layer, trainer.recalibration_set[:5]
    ```
    """

    _tag_names = ["hf_kd", "self-distillation", "label-distribution-learning"]
    _name = "Self-knowledge distillation from lower layers"
    _paper = {
        "title": "Self-Knowledge Distillation for Learning Ambiguity",
        "id": "2406.09719",
        "citation": (
            "@article{park2024selfkd,\n  title={Self-Knowledge Distillation for Learning Ambiguity},\n"
            "  author={Park, Hancheol and Jeong, Soyeong and Cho, Sukmin and Park, Jong C.},\n"
            "  journal={arXiv:2406.09719},\n  year={2024}\n}"
        ),
    }
    # Kept through Trainer's column removal: the sample index (re-calibration set) and the human distributions
    # (evaluation metrics).
    _extra_columns = (SAMPLE_INDEX_COLUMN, HUMAN_DISTRIBUTION_COLUMN)

    def __init__(
        self,
        model: MultiExitForSequenceClassification,
        args: SelfKDConfig,
        data_collator: Callable | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics: Callable | None = None,
        **kwargs: Any,
    ):
        if not isinstance(args, SelfKDConfig):
            raise TypeError(f"args must be a SelfKDConfig, got {type(args).__name__}")
        if eval_dataset is None:
            raise ValueError(
                "SelfKDTrainer selects its source layer from the validation entropy of every layer during the warm-up: "
                "pass an eval_dataset (a held-out split; it needs no labels)."
            )
        name = args.selection_dataset_name
        if isinstance(eval_dataset, dict) and name not in eval_dataset:
            raise ValueError(
                f"eval_dataset is a dict: set selection_dataset_name to the key of the validation set the source layer "
                f"is selected on, one of {sorted(eval_dataset)}; got {name!r}"
            )
        if not isinstance(eval_dataset, dict) and name is not None:
            raise ValueError(f"selection_dataset_name={name!r} only applies to a dict of eval datasets")
        if compute_metrics is None:
            compute_metrics = make_exit_compute_metrics(with_human=True)
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

        config = self._check_multi_exit_config()
        num_exits = len(config.exit_layers)
        if num_exits < 2:
            raise ValueError(
                f"SelfKDTrainer distils from a lower layer into the main classifier, so it needs at least 2 exits; the "
                f"model has {num_exits} (exit_layers={list(config.exit_layers)}): a backbone with one layer has "
                "nothing below its classifier. Use a deeper backbone."
            )
        if args.source_layer_side == "after_drop" and num_exits < 3:
            raise ValueError(
                f"source_layer_side='after_drop' needs at least 3 exits (the exit after a drop must not be the main "
                f"classifier); the model has {num_exits} (exit_layers={list(config.exit_layers)}): use "
                "source_layer_side='before_drop' or more exits"
            )
        # Normalised to sum to the number of exits: "uniform" is the warm-up's plain sum of cross-entropies.
        warmup_weights = EarlyExitTrainer._resolve_exit_loss_weights(args.warmup_exit_loss_weights, config)
        self.warmup_exit_loss_weights = [w * num_exits for w in warmup_weights]
        if self.train_dataset is None:
            raise ValueError("SelfKDTrainer needs a train_dataset.")
        num_samples = None
        if args.recalibrates:
            self.train_dataset = with_sample_index(self.train_dataset, purpose="recalibration_percent > 0")
            num_samples = len(self.train_dataset)
        self._self_kd = SelfKDCallback(self, num_samples=num_samples)
        self.add_callback(self._self_kd)
        self._training_state_callbacks = (self._self_kd,)

    # ---- state -------------------------------------------------------------------------------------------------

    @property
    def selection_dataset(self):
        """The validation set whose entropy per exit selects the source layer."""
        name = self.args.selection_dataset_name
        return self.eval_dataset[name] if name is not None else self.eval_dataset

    @property
    def phase(self) -> str:
        """`"warmup"`, `"distill"` or `"recalibrate"`: the phase of the next training step."""
        return self._self_kd.phase

    @property
    def source_exit(self) -> int | None:
        """0-based index of the source layer's exit, `None` during the warm-up."""
        return self._self_kd.source_exit

    @property
    def source_layer(self) -> int | None:
        """The source layer (1-based, a value of `config.exit_layers`), `None` during the warm-up."""
        exit_index = self._self_kd.source_exit
        return None if exit_index is None else self._exit_layers()[exit_index]

    @property
    def ambiguity_scores(self) -> np.ndarray | None:
        """Level of ambiguity `(N,)` of every training sample, by `sample_index` (`+inf` for unlabelled ones), as of
        the last re-calibration set selection; `None` before it."""
        return self._self_kd.ambiguity

    @property
    def recalibration_set(self) -> np.ndarray:
        """Sorted sample indices `(n,)` of the current re-calibration set (empty before it is selected)."""
        return self._self_kd.recalibration_set

    @property
    def layer_entropy(self) -> dict:
        """The per-epoch validation entropy of every exit, with the phases and selections (`layer_entropy.json`)."""
        return self._self_kd.layer_entropy_record(self._exit_layers())

    def _exit_layers(self) -> list[int]:
        return list(self.accelerator.unwrap_model(self.model).config.exit_layers)

    def _model_card_info(self) -> dict[str, Any]:
        """The source layer, lambda, m and the other settings, and the entropy table of the selection."""
        args = self.args
        hyperparameters = {
            "source_layer": self.source_layer if self.source_layer is not None else "not selected yet",
            "warmup_epochs": self._self_kd.warmup_epochs,
            "kd_lambda": args.kd_lambda,
            "recalibration_percent": args.recalibration_percent,
            "recalibration_set_size": int(self.recalibration_set.size),
            "temperature": args.temperature,
            "distill_divergence": str(args.distill_divergence),
            "entropy_drop_rule": str(args.entropy_drop_rule),
            "source_layer_side": str(args.source_layer_side),
            "selection_stable_epochs": args.selection_stable_epochs,
            "warmup_max_epochs": args.warmup_max_epochs,
            "warmup_exit_loss_weights": [round(w, 4) for w in self.warmup_exit_loss_weights],
            "source_correction": str(args.source_correction),
            "other_exits": str(args.other_exits),
            "ambiguity_score": str(args.ambiguity_score),
            "recalibration_timing": str(args.recalibration_timing),
            "recalibration_loss": str(args.recalibration_loss),
        }
        selection = self.layer_entropy
        for epoch in selection["epochs"]:
            epoch["entropy"] = [round(h, 4) for h in epoch["entropy"]]
        # Before the first epoch's end there is nothing to tabulate.
        return {"hyperparameters": hyperparameters, "layer_selection": selection if selection["epochs"] else None}

    # ---- loss --------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels", None)
        sample_index = inputs.pop(SAMPLE_INDEX_COLUMN, None)
        human = inputs.pop(HUMAN_DISTRIBUTION_COLUMN, None)
        exit_logits = self._exit_logits(model(**inputs))
        if labels is None:
            raise ValueError("SelfKDTrainer trains and evaluates on labels, but this batch has no 'labels'.")
        state, args = self._self_kd, self.args
        mode = "train" if model.training else "eval"

        if state.phase == "warmup":
            weights = self.warmup_exit_loss_weights
            loss, _ = EarlyExitTrainer.early_exit_loss(
                exit_logits, labels, weights, [None] * len(weights), num_items_in_batch=num_items_in_batch
            )
        else:
            recalibrate = None
            if state.phase == "recalibrate" and model.training:  # evaluation losses are not re-calibrated
                if sample_index is None:
                    raise ValueError(f"re-calibration: this training batch has no '{SAMPLE_INDEX_COLUMN}'.")
                mask = state.recalibration_mask
                recalibrate = mask[sample_index.to(mask.device)].to(labels.device)
            loss, parts = self_kd_loss(
                exit_logits,
                labels,
                state.source_exit,
                lmbda=args.kd_lambda,
                temperature=args.temperature,
                divergence=args.distill_divergence,
                source_correction=args.source_correction,
                other_exits=args.other_exits,
                recalibrate=recalibrate,
                recalibration_loss=args.recalibration_loss,
                num_items_in_batch=num_items_in_batch,
            )
            for key, value in parts.items():
                self._metrics[mode][key].append(value)
        loss = self._scale_for_processes(loss, num_items_in_batch)

        with torch.no_grad():
            for i, logits in enumerate(exit_logits):
                self._metrics[mode][f"exit_{i}_ce_loss"].append(
                    F.cross_entropy(logits.float(), labels, ignore_index=-100).detach()
                )
        if return_outputs:
            # predictions = (final, exit_0, ..., exit_{L-1}, human) in this order: make_exit_compute_metrics reads
            # them by position (Trainer keeps the dict's order). The human distributions travel as a prediction so
            # that Trainer gathers them across processes like the logits; NaN rows mark examples without them.
            final = exit_logits[-1]
            predictions = {"logits": final}
            predictions.update({f"exit_{i}_logits": logits for i, logits in enumerate(exit_logits)})
            if human is None:
                human = torch.full(final.shape, float("nan"), device=final.device)
            predictions[HUMAN_DISTRIBUTION_COLUMN] = human.to(final.device, torch.float32)
            return loss, predictions
        return loss
