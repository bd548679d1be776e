from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..calibration import ExitCalibrationResult, calibrate_exit_temperatures, fit_exit_temperature
from ..hub import EXIT_CALIBRATION_FILENAME, EXIT_RELIABILITY_DIAGRAM
from ..import_utils import is_matplotlib_available
from ..lm_head import lm_head_skipped
from ..losses import LMHeadInputs, kd_loss, lm_kd_loss, shifted_logits, sparse_lm_kd_loss
from ..metrics import lm_exit_token_statistics, make_exit_compute_metrics, make_lm_exit_compute_metrics
from ..modeling import MultiExitCausalLMConfig, MultiExitForSequenceClassification
from ..modeling.exit_laplace import EXIT_LAPLACE_PROBS, MultiExitLaplace, capture_exit_features
from ..teacher import TEACHER_CACHE_INDEX_COLUMN, TEACHER_LOGITS_COLUMN
from .base_trainer import is_causal_lm
from .dedier import GROUP_COLUMN, SAMPLE_INDEX_COLUMN, DedierCallback, with_sample_index
from .early_exit_config import FITTED, EarlyExitConfig
from .full_pass import plain_loader
from .multi_exit_trainer import _MultiExitTrainer
from .teacher_mixin import _TeacherMixin


def _check_exit_inputs(exit_logits: Sequence, weights: Sequence, soft_targets: Sequence) -> None:
    """One weight and one soft-target entry per exit, or a `ValueError` with the three lengths."""
    if not len(exit_logits) == len(weights) == len(soft_targets):
        raise ValueError(
            f"got {len(exit_logits)} exit logits, {len(weights)} weights and {len(soft_targets)} soft targets"
        )


def _save_exit_calibration(result: ExitCalibrationResult, split: str, folder) -> None:
    """`folder/exit_calibration.json` (the result and its model-index `split`) and, with matplotlib, each exit's token
    reliability diagram before and after its temperature ([`hf_kd.plots.plot_reliability_diagram`])."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EXIT_CALIBRATION_FILENAME).write_text(json.dumps({**result.to_dict(), "split": split}, indent=2),
                                                    encoding="utf-8")
    if not is_matplotlib_available():
        return
    from ..plots import plot_reliability_diagram

    for i, (layer, temperature) in enumerate(zip(result.exit_layers, result.temperatures)):
        bins = result.reliability[i]
        plot_reliability_diagram(
            {"before (T = 1)": bins["before"], f"after (T = {temperature:.3f})": bins["after"]},
            folder / EXIT_RELIABILITY_DIAGRAM.format(i),
            title=f"Exit {i} (layer {layer}): next-token reliability",
        )


class FinalExitTemperatureCallback(TrainerCallback, ExportableState):
    """
    Holds the temperature fitted for `final_exit_temperature="fitted"`: at the start of training (or at an evaluation
    before it) the final exit's temperature is fitted on the trainer's `eval_dataset`
    ([`hf_kd.calibration.fit_exit_temperature`]), and logged when training starts. It is the callback's
    [`~transformers.ExportableState`], so every checkpoint's `trainer_state.json` records it and [`EarlyExitTrainer`]
    restores it on `resume_from_checkpoint`: the soft targets of a resumed run must be those of the interrupted one,
    although the backbone, hence a refit, may have changed since.
    """

    missing_state_message = (
        "it was not saved by a final_exit_temperature='fitted' run, so its fitted final-exit temperature is unknown"
    )

    def __init__(self, trainer: EarlyExitTrainer):
        self.trainer = trainer
        self.temperature: float | None = None

    def fit(self) -> float:
        """The temperature, fitted now unless already fitted or restored from a checkpoint."""
        if self.temperature is None:
            trainer = self.trainer
            model = trainer.accelerator.unwrap_model(trainer.model)
            self.temperature = fit_exit_temperature(model, trainer.eval_dataset,
                                                    batch_size=trainer.args.per_device_eval_batch_size)
        return self.temperature

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run has its value restored by now and keeps it; either way the run's log records it.
        self.trainer.log({"final_exit_temperature": self.fit()})

    def state(self) -> dict:
        return {"args": {}, "attributes": {"temperature": self.temperature}}

    def load_state(self, state: dict) -> None:
        """Restore the fitted temperature from [`~FinalExitTemperatureCallback.state`]'s output."""
        temperature = state["attributes"]["temperature"]
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"the fitted final-exit temperature must be a number > 0, got {temperature!r}")
        self.temperature = float(temperature)


class EarlyExitTrainer(_TeacherMixin, _MultiExitTrainer):
    r"""
    [`~transformers.Trainer`] that trains every exit of a multi-exit model jointly, as DeeBERT (Xin et al., 2020,
    https://huggingface.co/papers/2004.12993) and PABEE (Zhou et al., 2020, https://huggingface.co/papers/2006.04152)
    do, optionally distilling into the exits.

    Any model whose config has `exit_layers` and whose output has `exit_logits` (one `(batch, num_labels)` tensor per
    exit, the final one last) can be trained: [`MultiExitForSequenceClassification`], or an image model with the
    same outputs.

    The loss is `sum_i w_i * loss_i` ([`EarlyExitTrainer.early_exit_loss`]), with `w` the normalised
    `args.exit_loss_weights` and, for exit `i` with logits `z_i`:

    - `args.distill_from="none"`: `loss_i = CE(y, z_i)`;
    - `"final_exit"` (self-distillation): `loss_i = alpha * T^2 * KL(p_final^T || p_i^T) + (1 - alpha) * CE(y, z_i)`
      for the earlier exits, with the final exit's logits detached; the final exit gets `CE(y, z_final)`;
    - `"teacher"`: the same with an external frozen teacher as the source of every exit. The teacher is handled as
      by [`DistillTrainer`] (model or Hub id, frozen, eval mode, no gradients, Accelerate `evaluation_mode`
      placement or ZeRO-3 shards under DeepSpeed, `teacher_logits` column, on-disk logits cache, label-space and
      vocabulary checks; or, with `args.teacher_from_base_model`, a PEFT student's own base model).

    The loss is normalised by the number of labelled examples in the whole accumulated batch, so it is exact under
    gradient accumulation and data parallelism. Per-exit cross-entropies are logged as `exit_{i}_ce_loss`. At every
    evaluation the default `compute_metrics` ([`hf_kd.metrics.make_exit_compute_metrics`]) logs the final exit's
    accuracy, ECE, NLL, Brier and entropy, and `exit_{i}_accuracy`, `exit_{i}_ece`, `exit_{i}_entropy` for every exit.
    When the evaluation set has an integer `group` column (e.g. class x spurious attribute), it also logs the final
    exit's `worst_group_accuracy`, `mean_group_accuracy` and `group_{g}_accuracy` ([`hf_kd.metrics.group_accuracies`]).

    With `args.dedier=True` (DEDIER, Tiwari et al., WACV 2024, https://huggingface.co/papers/2310.18590), every
    training sample has a weight `w` that multiplies its loss at every exit, `sum_i w_i * mean_b(w_b * loss_{i,b})`
    (a plain mean, not normalised by the sum of `w`). After every epoch but the last, a [`~dedier.DedierCallback`]
    trains a fresh early readout on the model's hidden state at `args.dedier_layer` and sets the weight of each
    sample it misreads to `exp(dedier_beta * margin^dedier_alpha)`. It logs `dedier_mean_weight`,
    `dedier_upweighted_fraction` and `dedier_readout_accuracy`. The trainer adds a `sample_index` column to the train
    set to look the weights up; they are saved in every checkpoint and restored exactly by `resume_from_checkpoint`.
    Evaluation losses are not weighted.

    Early-exit LLMs: a [`MultiExitForCausalLM`] (any model whose class ends in `ForCausalLM` and whose output has
    `exit_logits`, one `(batch, seq, vocab)` tensor per exit) trains on causal-LM data (`input_ids`, `labels` = the
    input ids with `-100` on the prompt and padding) with token-level losses on the completion tokens, labels shifted
    by one ([`EarlyExitTrainer.early_exit_lm_loss`], [`hf_kd.losses.lm_kd_loss`]). `distill_from="final_exit"`
    distils the detached final exit into the earlier ones token by token (LayerSkip's early-exit loss, Elhoushi et
    al., 2024, https://huggingface.co/papers/2404.16710, with the final layer as teacher); `"teacher"` a causal-LM
    teacher with the same vocabulary, online or from its cached top-k logits per completion token
    (`args.cache_teacher_logits`, `args.lm_cache_top_k`, [`hf_kd.losses.sparse_lm_kd_loss`]). With `args.freeze_backbone=True`
    only the exit adapters learn and the final exit is unchanged; when, besides, the final exit weighs 0 and teaches
    nothing (`distill_from` not `"final_exit"`), the training forward stops at the last early exit
    (`MultiExitForCausalLM.forward(last_layer=...)`: the later layers never run, and the final exit's cross-entropy
    is not logged in training). In training the shared LM head runs inside the loss (`args.lm_fused_head`). At each
    evaluation the default `compute_metrics`
    ([`hf_kd.metrics.make_lm_exit_compute_metrics`]) logs the final exit's `perplexity`, `token_accuracy`,
    `token_ece`, `token_entropy`, and `exit_{i}_perplexity`, `exit_{i}_token_accuracy`, `exit_{i}_token_ece`,
    `exit_{i}_token_entropy` and `exit_{i}_top1_agreement` (with the final exit) for every exit. DEDIER and the
    per-exit Laplace are for classifiers. With `args.final_exit_temperature` the exits learn from a
    temperature-calibrated final exit ("Knowledge Distillation Using Early Exit LLMs: experiments on confidence
    scoring"; `"fitted"`: fitted on the eval set when training starts and kept in checkpoints); after training,
    [`EarlyExitTrainer.calibrate_exits`] fits one temperature per exit and puts every exit's token ECE, NLL and Brier
    score before and after, and its token reliability diagram, into the saved folder and its card.

    After training, [`EarlyExitTrainer.fit_exit_laplace`] fits a last-layer Laplace approximation per exit (Meronen
    et al., WACV 2024, https://huggingface.co/papers/2302.06359) with a temperature and a prior chosen per exit on
    the evaluation set; later evaluations then also log each exit's calibrated `exit_{i}_laplace_accuracy`, `_ece` and
    `_nll`, `save_model()` saves the fit with the model, and the card shows a per-exit table (softmax and Laplace).

    Args:
        model ([`MultiExitForSequenceClassification`] or another multi-exit model):
            The multi-exit model: its config has `exit_layers` (and `normalized_exit_loss_weights` when
            `args.exit_loss_weights` is `None`), its forward returns `exit_logits`, one `(batch, num_labels)` tensor
            per exit, and with `args.dedier=True`, `hidden_states` (embeddings or stem first) when called with
            `output_hidden_states=True`.
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
        peft_config (`peft.PeftConfig`, *optional*):
            Train a PEFT adapter (e.g. `peft.LoraConfig(r=8, task_type="SEQ_CLS")`) on the student's backbone instead
            of all its weights. The student's heads (every exit head) are added to `modules_to_save`, so they train in full and
            are saved with the adapter. A `peft.PeftModel` student is accepted without `peft_config` (its frozen heads
            are warned about). With `args.teacher_from_base_model=True` the teacher is the student's base model
            (adapters disabled). Needs `pip install hf_kd[peft]`.

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
    # Kept through Trainer's column removal: the teacher's logits, the sample index (DEDIER's weights) and the group
    # ids (group metrics).
    _extra_columns = (TEACHER_LOGITS_COLUMN, SAMPLE_INDEX_COLUMN, GROUP_COLUMN, TEACHER_CACHE_INDEX_COLUMN)

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
        peft_config=None,
        **kwargs: Any,
    ):
        if not isinstance(args, EarlyExitConfig):
            raise TypeError(f"args must be an EarlyExitConfig, got {type(args).__name__}")
        teacher = self._resolve_teacher(teacher_model, args)
        if teacher is not None and args.distill_from != "teacher":
            raise ValueError(f"A teacher was given but distill_from='{args.distill_from}': set distill_from='teacher'.")

        self._causal_lm = model is not None and is_causal_lm(model)
        if self._causal_lm and args.dedier:
            raise ValueError(
                "dedier=True re-weights classification examples by an early readout's errors: it is for classifiers, "
                "not for a causal-LM multi-exit model."
            )
        if compute_metrics is None and self._causal_lm:
            compute_metrics = make_lm_exit_compute_metrics()
        elif compute_metrics is None:
            compute_metrics = make_exit_compute_metrics(with_teacher=args.distill_from == "teacher")
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

        config = self._check_multi_exit_config()
        self.exit_loss_weights = self._resolve_exit_loss_weights(args.exit_loss_weights, config)
        if args.freeze_backbone:
            self._freeze_backbone()
        # A frozen causal LM whose final exit weighs 0 and teaches nothing: no training step reads the layers after
        # its last early exit, so the training forward stops there (MultiExitForCausalLM.forward(last_layer=...)).
        self._last_trained_layer = None
        if (self._causal_lm and args.freeze_backbone and args.distill_from != "final_exit"
                and self.exit_loss_weights[-1] == 0 and isinstance(config, MultiExitCausalLMConfig)):
            self._last_trained_layer = config.exit_layers[-2]
        if args.distill_from == "teacher":
            self._init_teacher(teacher, processing_class, teacher_processing_class)
        self._dedier = None
        if args.dedier:
            depth = max(config.exit_layers)  # the final exit sits after the last layer
            if args.dedier_layer > depth:
                raise ValueError(
                    f"dedier_layer={args.dedier_layer} is beyond the model's last layer {depth} "
                    f"(exit_layers={list(config.exit_layers)}); valid: 1..{depth}"
                )
            self.train_dataset = with_sample_index(self.train_dataset)
            self._dedier = DedierCallback(self, num_samples=len(self.train_dataset), seed=args.seed)
            self.add_callback(self._dedier)
            self._training_state_callbacks = (self._dedier,)
        self.exit_calibration: ExitCalibrationResult | None = None
        self._exit_calibration_split = None
        self._final_exit_temperature = None
        if args.final_exit_temperature == FITTED:
            if not self._causal_lm:
                raise ValueError(
                    "final_exit_temperature='fitted' fits the next-token temperature of a causal LM's final exit; for "
                    "a classifier, fit it with hf_kd.calibrate_temperature on held-out data and pass the float."
                )
            if self.eval_dataset is None or isinstance(self.eval_dataset, dict):
                raise ValueError(
                    "final_exit_temperature='fitted' fits the final exit's temperature on the eval set before "
                    "training: pass one eval_dataset (held-out text, not a dict of datasets), or give the temperature "
                    "as a float."
                )
            self._final_exit_temperature = FinalExitTemperatureCallback(self)
            self.add_callback(self._final_exit_temperature)
            self._training_state_callbacks += (self._final_exit_temperature,)

    def _freeze_backbone(self) -> None:
        """`requires_grad=False` on every parameter of `model.backbone` (the optimiser, built later, skips them);
        an error when nothing is left to train."""
        model = self.accelerator.unwrap_model(self.model)
        backbone = getattr(model, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise TypeError(
                f"freeze_backbone=True freezes `model.backbone`, but {type(model).__name__} has none: use an hf_kd "
                "multi-exit model (MultiExitForSequenceClassification, MultiExitForCausalLM, ...)."
            )
        backbone.requires_grad_(False)
        if not any(parameter.requires_grad for parameter in model.parameters()):
            raise ValueError(
                f"freeze_backbone=True leaves nothing to train in this {type(model).__name__}: its exits are the "
                "backbone's own final norm and LM head (exit_adapter=None). Give the exits adapters "
                "(MultiExitForCausalLM.from_backbone(..., exit_adapter='low_rank') or 'linear'), or train the backbone "
                "with them (freeze_backbone=False)."
            )

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
        hyperparameters["distill_from"] = str(self.args.distill_from)
        if self.args.freeze_backbone:
            hyperparameters["freeze_backbone"] = True
        if self.args.distill_from != "none":
            hyperparameters.update(temperature=self.args.temperature, alpha=self.args.alpha)
        if self.final_exit_temperature is not None:
            hyperparameters["final_exit_temperature"] = round(self.final_exit_temperature, 4)
        info = {}
        if self.exit_calibration is not None:
            info["exit_calibration"] = {**self.exit_calibration.to_dict(), "split": self._exit_calibration_split}
            if is_matplotlib_available():
                info["exit_calibration"]["reliability_diagrams"] = [
                    EXIT_RELIABILITY_DIAGRAM.format(i) for i in range(len(self.exit_calibration.exit_layers))
                ]
        if self.args.dedier:
            hyperparameters.update(
                dedier_layer=self.args.dedier_layer,
                dedier_alpha=self.args.dedier_alpha,
                dedier_beta=self.args.dedier_beta,
            )
        laplace = getattr(self.accelerator.unwrap_model(self.model), "exit_laplace", None)
        if laplace is not None:
            hyperparameters["exit_laplace"] = laplace.card_summary()
        return {"teacher_model": self._teacher_name(), "hyperparameters": hyperparameters, **info}

    def calibrate_exits(self, eval_dataset=None, calibrated_on: str | None = None, n_bins: int = 15,
                        split: str | None = None) -> ExitCalibrationResult:
        r"""
        Fit one temperature per exit of a multi-exit causal LM on held-out text and report each exit's next-token
        confidence before and after ([`hf_kd.calibrate_exit_temperatures`]; temperature scaling, Guo et al., 2017,
        https://huggingface.co/papers/1706.04599).

        The result is kept as `trainer.exit_calibration`; from then on every saved model folder and checkpoint gets
        `exit_calibration.json`, one token reliability diagram per exit (`exit_calibration/exit_{i}_reliability.png`,
        before and after side by side; needs matplotlib) and a card whose model-index holds every exit's token ECE,
        NLL and Brier score before and after ([`hf_kd.hub.build_eval_results`]), with a table and the diagrams
        linked. The model is not modified: the temperatures are for dividing each exit's logits.

        Args:
            eval_dataset (`datasets.Dataset`, *optional*): the held-out text (defaults to the trainer's
                `eval_dataset`), with `input_ids`, unshifted `labels` (`-100` where not counted) and optionally
                `attention_mask`.
            calibrated_on (`str`, *optional*): description of the text, for the card.
            n_bins (`int`, *optional*, defaults to `15`): bins of the token ECE.
            split (`str`, *optional*): the model-index split of the numbers; `"eval"` for the trainer's
                `eval_dataset`, `"calibration"` for another dataset.

        Returns:
            [`hf_kd.ExitCalibrationResult`].
        """
        if not self._causal_lm:
            raise TypeError(
                "calibrate_exits fits next-token temperatures of a multi-exit causal LM; for a classifier use "
                "fit_exit_laplace or hf_kd.calibrate_temperature."
            )
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if dataset is None or isinstance(dataset, dict):
            raise ValueError("calibrate_exits needs one held-out dataset: pass eval_dataset= (not a dict of them).")
        model = self.accelerator.unwrap_model(self.model)
        self.exit_calibration = calibrate_exit_temperatures(
            model, dataset, n_bins=n_bins, batch_size=self.args.per_device_eval_batch_size,
            calibrated_on=calibrated_on,
        )
        self._exit_calibration_split = split or ("eval" if eval_dataset is None else "calibration")
        return self.exit_calibration

    def create_model_card(self, *args, output_dir=None, **kwargs) -> None:
        # The card links the per-exit reliability diagrams: write them (and the numbers) into the card's folder first.
        if self.exit_calibration is not None and self.args.should_save:
            folder = output_dir if output_dir is not None else self.args.output_dir
            _save_exit_calibration(self.exit_calibration, self._exit_calibration_split, folder)
        super().create_model_card(*args, output_dir=output_dir, **kwargs)

    def fit_exit_laplace(
        self, train_dataset=None, eval_dataset=None, batch_size: int | None = None, **kwargs
    ) -> MultiExitLaplace:
        r"""Fit the per-exit last-layer Laplace approximation of Meronen et al. (2024,
        https://huggingface.co/papers/2302.06359) on the trained model and attach it (`model.exit_laplace`).

        One pass over `train_dataset` (default: the trainer's) gives every exit's KFAC factors, one pass over
        `eval_dataset` (default: the trainer's) selects each exit's temperature and prior variance; see
        [`~hf_kd.modeling.exit_laplace.ExitLaplaceMixin.fit_exit_laplace`] for `kwargs` (`mie`, `link_approx`, ...).
        Afterwards `evaluate()` also logs each exit's calibrated `exit_{i}_laplace_accuracy`, `_ece` and `_nll`,
        `save_model()` writes `exit_laplace.safetensors` next to the weights, and the card reports the calibrated
        per-exit metrics. Evaluate on data not used for the selection for honest numbers. Every process runs the full
        passes (no sharding), so all ranks hold the same fit.

        Args:
            train_dataset, eval_dataset (`datasets.Dataset`, *optional*): the data of the fit and of the selection.
            batch_size (`int`, *optional*, defaults to `args.per_device_eval_batch_size`).

        Returns:
            The fitted [`~hf_kd.modeling.exit_laplace.MultiExitLaplace`].
        """
        model = self.accelerator.unwrap_model(self.model)
        if not hasattr(model, "fit_exit_laplace"):
            raise TypeError(f"{type(model).__name__} has no per-exit Laplace: use an hf_kd multi-exit model.")
        train_dataset = self.train_dataset if train_dataset is None else train_dataset
        eval_dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if train_dataset is None or eval_dataset is None:
            raise ValueError("fit_exit_laplace needs a train_dataset (the fit) and an eval_dataset (the selection).")
        loaders = [plain_loader(self, d, batch_size or self.args.per_device_eval_batch_size, "exit Laplace")
                   for d in (train_dataset, eval_dataset)]
        return model.fit_exit_laplace(*loaders, **kwargs)

    @property
    def final_exit_temperature(self) -> float | None:
        """The temperature dividing the final exit's logits in the exits' targets: `args.final_exit_temperature` as a
        float, the fitted value with `"fitted"` (`None` until training or an evaluation starts), `None` for the raw
        final exit."""
        if self._final_exit_temperature is not None:
            return self._final_exit_temperature.temperature
        return self.args.final_exit_temperature

    def _final_exit_targets(self, final_logits: torch.Tensor) -> torch.Tensor:
        """The detached final-exit logits that the earlier exits learn from, divided by [`final_exit_temperature`]
        when there is one (left untouched otherwise, so that `None` is the raw final exit bit for bit). Also used
        on the final exit's hidden states, which the head maps linearly to the logits."""
        targets = final_logits.detach()
        if self.args.final_exit_temperature is None:
            return targets
        # "fitted": normally fitted at on_train_begin; an evaluation before training fits it here.
        temperature = self.args.final_exit_temperature
        if self._final_exit_temperature is not None:
            temperature = self._final_exit_temperature.fit()
        return targets / temperature

    @property
    def dedier_weights(self) -> torch.Tensor | None:
        """DEDIER's current per-sample weights `(N,)`, indexed by the train set's `sample_index`; `None` without
        `args.dedier`."""
        return None if self._dedier is None else self._dedier.weights

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
        sample_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        r"""
        Weighted multi-exit loss `sum_i weights[i] * loss_i`, where `loss_i` is
        [`hf_kd.losses.kd_loss`]`(exit_logits[i], soft_targets[i], labels, temperature, alpha)` when exit `i` has soft
        targets, and the cross-entropy `CE(labels, exit_logits[i])` when `soft_targets[i]` is `None`. With
        `sample_weights`, each is the plain mean of the per-sample losses times the sample weights.

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
            sample_weights (`torch.Tensor` of shape `(batch,)`, *optional*):
                Per-sample weights (DEDIER's) multiplying every exit's per-sample loss; not normalised by their sum.

        Returns:
            `(loss, exit_losses)`: the scalar weighted loss and the per-exit losses (not weighted by `weights`).
        """
        _check_exit_inputs(exit_logits, weights, soft_targets)
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
                kd_loss(
                    logits,
                    source,
                    labels,
                    temperature,
                    exit_alpha,
                    num_items_in_batch=num_items_in_batch,
                    sample_weights=sample_weights,
                )
            )
        loss = sum(w * exit_loss for w, exit_loss in zip(weights, exit_losses))
        return loss, exit_losses

    @staticmethod
    def early_exit_lm_loss(
        exit_logits: Sequence[torch.Tensor | LMHeadInputs],
        labels: torch.Tensor,
        weights: Sequence[float],
        soft_targets: Sequence[torch.Tensor | LMHeadInputs | tuple | None],
        temperature: float = 2.0,
        alpha: float = 0.5,
        num_items_in_batch: torch.Tensor | int | None = None,
        lm_cache_tail: str = "bucket",
        chunk_size: int = 128,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        r"""
        Weighted multi-exit token-level loss of a causal LM, `sum_i weights[i] * loss_i`, with `loss_i` the
        [`hf_kd.losses.lm_kd_loss`] (forward KL) of exit `i` on the shifted logits and labels (position `t` predicts
        `labels[:, t + 1]`): `alpha * T^2 * KL(p_src^T || p_i^T) + (1 - alpha) * CE` per counted token when exit `i`
        has soft targets, the next-token cross-entropy when `soft_targets[i]` is `None`.

        Args:
            exit_logits (sequence of `torch.Tensor` of shape `(batch, seq, vocab)` or [`hf_kd.losses.LMHeadInputs`]):
                The exits' logits, or their normed hidden states `(batch, seq, hidden)` with the LM head's weight
                (the loss then projects `chunk_size` counted tokens at a time and never makes the logits).
            labels (`torch.Tensor` of shape `(batch, seq)`): the model's labels, **not shifted**, `-100` ignored.
            weights (sequence of `float`): one weight per exit (normalised by the caller).
            soft_targets (sequence of `torch.Tensor` of shape `(batch, seq, vocab)`, `LMHeadInputs`, `tuple` or `None`):
                Source logits per exit (detached), not shifted, or [`~hf_kd.losses.LMHeadInputs`] that make them; or a
                cached teacher's top-k targets `(topk_ids, topk_logits, logsumexp)` already aligned with the shifted
                labels (`(batch, seq - 1, k)`, `(batch, seq - 1, k)`, `(batch, seq - 1)`), for
                [`hf_kd.losses.sparse_lm_kd_loss`] with tail `lm_cache_tail`; or `None` for plain cross-entropy.
            temperature (`float`, *optional*, defaults to `2.0`), alpha (`float`, *optional*, defaults to `0.5`):
                As in [`hf_kd.losses.lm_kd_loss`].
            num_items_in_batch (`int` or `torch.Tensor`, *optional*):
                Counted tokens of the accumulated batch; each loss is then `sum / num_items_in_batch`.
            lm_cache_tail (`str`, *optional*, defaults to `"bucket"`): the tail of the cached loss.
            chunk_size (`int`, *optional*, defaults to `128`): counted tokens processed at once (memory only).

        Returns:
            `(loss, exit_losses, exit_cross_entropies)`: the scalar weighted loss, the per-exit losses (not weighted
            by `weights`), and each exit's mean next-token cross-entropy over this call's counted tokens (detached;
            from the same pass over the tokens as its loss).
        """
        _check_exit_inputs(exit_logits, weights, soft_targets)
        counted = labels[:, 1:] != -100
        options = {"temperature": temperature, "num_items_in_batch": num_items_in_batch, "chunk_size": chunk_size}
        exit_losses, exit_cross_entropies = [], []
        for logits, source in zip(exit_logits, soft_targets):
            logits = shifted_logits(logits)
            if source is None:
                # alpha=0 is lm_kd_loss's plain cross-entropy: the source is never read (nor, for LMHeadInputs,
                # projected), so the exit's own detached inputs stand in for it.
                fused = isinstance(logits, LMHeadInputs)
                detached = LMHeadInputs(*(t.detach() for t in logits)) if fused else logits.detach()
                loss = lm_kd_loss(logits, detached, labels[:, 1:], alpha=0.0, **options)
                # loss = sum(CE) / num_items_in_batch; the logged figure is the mean over this call's tokens.
                scale = 1.0 if num_items_in_batch is None else num_items_in_batch / counted.sum().clamp(min=1)
                exit_losses.append(loss)
                exit_cross_entropies.append((loss * scale).detach())
                continue
            if isinstance(source, tuple) and not isinstance(source, LMHeadInputs):
                parts = sparse_lm_kd_loss(
                    logits, *source, labels[:, 1:], alpha=alpha, tail=lm_cache_tail, return_parts=True, **options
                )
            else:
                parts = lm_kd_loss(logits, shifted_logits(source), labels[:, 1:], alpha=alpha, return_parts=True,
                                   **options)
            exit_losses.append(parts.loss)
            exit_cross_entropies.append(parts.ce)
        loss = sum(w * exit_loss for w, exit_loss in zip(weights, exit_losses))
        return loss, exit_losses, exit_cross_entropies

    def _compute_lm_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """`compute_loss` of a multi-exit causal LM: [`early_exit_lm_loss`] over the exits, rescaled for DDP; logs
        each exit's next-token cross-entropy `exit_{i}_ce_loss` and returns, with `return_outputs`, the exits' token
        statistics ([`hf_kd.metrics.lm_exit_token_statistics`]) instead of vocabulary-sized logits.

        In training, where the backbone's head allows it (`args.lm_fused_head`), the shared LM head is skipped in the
        forward and every exit (and a live teacher) reaches the loss as its normed hidden states with the head's
        weight ([`hf_kd.losses.LMHeadInputs`]): no `(batch, seq, vocab)` tensor per exit."""
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("A causal-LM batch needs 'labels' (the input ids, -100 on tokens that do not count).")
        cache_index = inputs.pop(TEACHER_CACHE_INDEX_COLUMN, None)
        fused = not return_outputs and self._lm_fused_head(model, "student")
        # Training a frozen backbone's early exits only: the forward stops at the last of them, and the final exit
        # (weight 0, frozen) is left out of the loss and of the logged cross-entropies.
        cut = {"last_layer": self._last_trained_layer} if self._last_trained_layer and model.training else {}
        with lm_head_skipped(model) if fused else contextlib.nullcontext() as head:
            exit_logits = self._exit_logits(model(**inputs, **cut))  # num_exits x (batch, seq, vocab), fused: hidden
        if fused:
            exit_logits = [LMHeadInputs(hidden, head.weight) for hidden in exit_logits]
        final = exit_logits[-1]
        device = final.hidden_states.device if fused else final.device
        num_exits, distill_from = len(exit_logits), self.args.distill_from
        if distill_from == "teacher" and cache_index is not None:  # cached run: no teacher forward
            targets = self._cached_lm_top_k(cache_index, labels[:, 1:].to(device))
            soft_targets = [tuple(targets)] * num_exits
        elif distill_from == "teacher":
            fused_teacher = not return_outputs and self._lm_fused_head(self._load_teacher(), "teacher")
            teacher = self._lm_teacher_outputs(inputs, fused_teacher)
            teacher = LMHeadInputs(*(t.to(device) for t in teacher)) if fused_teacher else teacher.to(device)
            soft_targets = [teacher] * num_exits
        elif distill_from == "final_exit":
            # The final exit teaches the earlier ones but receives no gradient from them (nor does the shared head
            # through the targets).
            if fused and num_exits == 2:
                # One early exit: its loss projects the targets chunk by chunk, (h / T) W^T = (h W^T) / T.
                source = LMHeadInputs(self._final_exit_targets(final.hidden_states), final.weight.detach())
            elif fused:
                # Several early exits read the same targets: project them once (one (batch, seq, vocab) tensor
                # without gradient) rather than once in every exit's loss (+14% CPU per step with two exits,
                # docs/benchmarks/early_exit_lm.md).
                with torch.no_grad():
                    source = self._final_exit_targets(F.linear(final.hidden_states, final.weight))
            else:
                source = self._final_exit_targets(final)
            soft_targets = [source] * (num_exits - 1) + [None]
        else:
            soft_targets = [None] * num_exits
        loss, _, exit_cross_entropies = self.early_exit_lm_loss(
            exit_logits, labels, self.exit_loss_weights[:num_exits], soft_targets, self.args.temperature,
            self.args.alpha, num_items_in_batch, self.args.lm_cache_tail, self.args.lm_chunk_size,
        )
        loss = self._scale_for_processes(loss, num_items_in_batch)
        mode = "train" if model.training else "eval"
        for i, cross_entropy in enumerate(exit_cross_entropies):
            self._metrics[mode][f"exit_{i}_ce_loss"].append(cross_entropy)
        if return_outputs:
            return loss, {"exit_token_statistics": lm_exit_token_statistics(exit_logits, labels)}
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._causal_lm:
            return self._compute_lm_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels", None)
        teacher_logits = inputs.pop(TEACHER_LOGITS_COLUMN, None)
        sample_index = inputs.pop(SAMPLE_INDEX_COLUMN, None)
        groups = inputs.pop(GROUP_COLUMN, None)
        # Evaluation of a model with a fitted per-exit Laplace also returns its calibrated per-exit probabilities,
        # computed from the inputs of the exits' final layers recorded during this forward pass.
        unwrapped = self.accelerator.unwrap_model(model)
        laplace = None if model.training else getattr(unwrapped, "exit_laplace", None)
        capture = capture_exit_features(unwrapped) if laplace is not None else contextlib.nullcontext([])
        with capture as features:
            outputs = model(**inputs)
        exit_logits = self._exit_logits(outputs)  # num_exits x (batch, num_labels)
        num_exits = len(exit_logits)

        sample_weights = None
        if self._dedier is not None and model.training:  # evaluation losses stay unweighted
            if sample_index is None:
                raise ValueError(f"dedier=True: this training batch has no '{SAMPLE_INDEX_COLUMN}'.")
            sample_weights = self._dedier.weights[sample_index.to(self._dedier.weights.device)]  # (batch,)

        distill_from = self.args.distill_from
        if distill_from == "teacher":
            teacher_logits = self._batch_teacher_logits(inputs, teacher_logits).to(exit_logits[-1].device)
            soft_targets = [teacher_logits] * num_exits
        elif distill_from == "final_exit":
            # Self-distillation: the final exit teaches the earlier ones but receives no gradient from them.
            soft_targets = [self._final_exit_targets(exit_logits[-1])] * (num_exits - 1) + [None]
        else:
            soft_targets = [None] * num_exits
        if labels is None and distill_from != "teacher":
            raise ValueError(f"distill_from='{distill_from}' trains on labels, but this batch has no 'labels'.")

        T, alpha = self.args.temperature, self.args.alpha
        loss, _ = self.early_exit_loss(
            exit_logits, labels, self.exit_loss_weights, soft_targets, T, alpha, num_items_in_batch, sample_weights
        )
        loss = self._scale_for_processes(loss, num_items_in_batch)

        mode = "train" if model.training else "eval"
        if labels is not None:
            with torch.no_grad():
                for i, logits in enumerate(exit_logits):
                    self._metrics[mode][f"exit_{i}_ce_loss"].append(
                        kd_loss(logits, logits, labels, T, alpha=0.0).detach()
                    )
        if return_outputs:
            # predictions = (final, exit_0, ..., exit_{L-1}[, teacher][, group]) in this order:
            # make_exit_compute_metrics reads them by position (Trainer keeps the dict's order). The group ids travel
            # as a prediction so that Trainer gathers them across processes exactly like the logits.
            predictions = {"logits": exit_logits[-1]}
            predictions.update({f"exit_{i}_logits": logits for i, logits in enumerate(exit_logits)})
            if distill_from == "teacher":
                predictions[TEACHER_LOGITS_COLUMN] = teacher_logits
            if laplace is not None:
                # (batch, num_exits, num_labels): 3-D, so make_exit_compute_metrics tells it from the 2-D logits.
                predictions[EXIT_LAPLACE_PROBS] = laplace.predict(features).transpose(0, 1)
            if groups is not None:
                predictions[GROUP_COLUMN] = groups
            return loss, predictions
        return loss
