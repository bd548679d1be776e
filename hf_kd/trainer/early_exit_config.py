import math
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from ..options import DedierReadoutOptimizer, DistillFrom, ExitLossWeighting, to_enum
from .teacher_config import _TeacherArguments


def parse_exit_loss_weights(weights, name: str):
    """[`ExitLossWeighting`] (given as `"uniform"`, `"linear"` or a member), `None`, or a list of non-negative
    floats with a positive sum (on the command line a string `"1,2,3"`); `ValueError` naming `name` otherwise."""
    accepted = tuple(weighting.value for weighting in ExitLossWeighting)
    if isinstance(weights, str) and weights in accepted:
        return ExitLossWeighting(weights)
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"{name} must be one of {accepted}, a list of floats or None, got {weights!r}") from None
    if isinstance(weights, (list, tuple)):
        weights = [float(w) for w in weights]
        if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"{name} must be >= 0 with a positive sum, got {weights}")
    return weights


FITTED = "fitted"


def parse_final_exit_temperature(value) -> None | str | float:
    """`None`, `"fitted"`, or a finite float `> 0` (given as a number or, on the command line, a string such as
    `"1.5"`); a `ValueError` naming `final_exit_temperature` otherwise."""
    if value is None or value == FITTED:
        return value
    try:
        temperature = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"final_exit_temperature must be None, '{FITTED}' or a number > 0, got {value!r}"
        ) from None
    if isinstance(value, bool) or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"final_exit_temperature must be a finite number > 0 (or None or '{FITTED}'), got {value!r}")
    return temperature


@dataclass
class EarlyExitConfig(TrainingArguments, _TeacherArguments):
    r"""
    Configuration of [`EarlyExitTrainer`]: joint training of every exit of a [`MultiExitForSequenceClassification`],
    optionally distilling into the exits, on top of [`~transformers.TrainingArguments`].

    The loss is `sum_i w_i * loss_i` over the exits `i`, with `w` the normalised `exit_loss_weights` and `loss_i` the
    cross-entropy of exit `i` (DeeBERT, Xin et al., 2020, https://huggingface.co/papers/2004.12993; PABEE, Zhou et
    al., 2020, https://huggingface.co/papers/2006.04152). With distillation, an exit with a soft-target source gets
    `alpha * T^2 * KL(softmax(z_src / T) || softmax(z_i / T)) + (1 - alpha) * CE(y, z_i)` instead
    ([`hf_kd.losses.kd_loss`]).

    > Parameters that control the exits

    Args:
        exit_loss_weights (`str` or `list[float]`, *optional*):
            Per-exit loss weights, normalised to sum to 1 (on the command line: `linear` or `1,2,3`). `"uniform"`: `1 / L`. `"linear"`: proportional to the depth
            of the exit (its layer in `model.config.exit_layers`), the weighted average of PABEE and DeeBERT's
            emphasis on deeper exits. A list: one non-negative weight per exit, positive sum; its length is checked
            against the model when the trainer is built. `None` uses the model's own
            `config.normalized_exit_loss_weights`, uniform unless the model was configured otherwise.

        freeze_backbone (`bool`, *optional*, defaults to `False`):
            Train the exits only: every parameter of `model.backbone` is frozen (`requires_grad=False`, left out of
            the optimiser), so the final exit's outputs stay bit-identical to the untrained model's. For a
            [`MultiExitForSequenceClassification`] the exit heads learn; for a [`MultiExitForCausalLM`] the exits
            share the backbone's final norm and LM head, so only its per-exit adapters learn and a model without
            adapters (`exit_adapter=None`) is an error.

    > Parameters that control distillation into the exits

    Args:
        distill_from (`str` or [`DistillFrom`], *optional*, defaults to `"none"`):
            Soft-target source of the exits. `"none"`: cross-entropy only. `"final_exit"`: self-distillation, every
            earlier exit learns from the model's own final exit (detached, so no gradient flows into it from the soft
            term), the final exit itself gets plain cross-entropy. `"teacher"`: every exit learns from an external
            frozen teacher, handled exactly as by [`DistillTrainer`]. For a causal LM ([`MultiExitForCausalLM`]) the
            losses are token-level on the completion tokens (labels shifted by one, `-100` ignored) with
            [`hf_kd.losses.lm_kd_loss`]: `alpha * T^2 * KL(p_src^T || p_i^T) + (1 - alpha) * CE` per token.
        temperature (`float`, *optional*, defaults to `2.0`):
            Softmax temperature `T` of the soft targets; the soft term is scaled by `T^2`. Unused with `"none"`.
        alpha (`float`, *optional*, defaults to `0.5`):
            Weight of the soft term in `[0, 1]`; `1 - alpha` weighs the cross-entropy. Unused with `"none"`.
        final_exit_temperature (`float` or `str`, *optional*):
            With `distill_from="final_exit"` only: the exits learn from the final exit's logits divided by this
            temperature, i.e. from a temperature-calibrated final exit rather than the raw one ("Knowledge
            Distillation Using Early Exit LLMs: experiments on confidence scoring"; temperature scaling, Guo et al.,
            2017, https://huggingface.co/papers/1706.04599). The targets are then `softmax(z_final /
            final_exit_temperature / temperature)`: the calibration first, the distillation temperature on top.
            `None` (the default): the raw final exit. A float `> 0`: that temperature (`1.0` is bit-identical to
            `None`). `"fitted"`: before training, the final exit's temperature is fitted on the trainer's
            `eval_dataset` (next-token NLL of a causal LM, [`hf_kd.calibration.fit_exit_temperature`]; NLL of the
            labels for a classifier, [`hf_kd.calibration.calibrate_temperature`]); the value is logged as
            `final_exit_temperature`, saved in every checkpoint's `trainer_state.json` and reused, not refitted, by
            `resume_from_checkpoint`. The final exit itself still trains on plain cross-entropy.

    > Parameters that control DEDIER re-weighting (Tiwari et al., WACV 2024, https://huggingface.co/papers/2310.18590)

    Args:
        dedier (`bool`, *optional*, defaults to `False`):
            "Using Early Readouts to Mediate Featural Bias in Distillation". After every epoch but the last, a fresh
            early readout is trained on the frozen model's hidden state at `dedier_layer` over the whole training set;
            every sample it gets wrong gets the weight `exp(dedier_beta * margin^dedier_alpha)`
            ([`hf_kd.losses.dedier_weights`]; `margin` = top-1 minus top-2 readout probability), the others keep
            theirs. The weights start at 1, persist across epochs and in checkpoints, and multiply each sample's loss
            at every exit; the batch loss stays the plain mean of `w * loss`. Needs `distill_from="teacher"` (the
            weighted term is the teacher KD, `alpha` and `temperature` as above; the paper uses `alpha=1`, `T=3`).
            The paper selects the epoch with the best validation mean-group accuracy: give the evaluation set an
            integer `group` column and set `metric_for_best_model="mean_group_accuracy"`.
        dedier_layer (`int`, *optional*, defaults to `1`):
            1-based layer (sequence models) or stage (image models) whose output feeds the readout: index
            `dedier_layer` of the model's `hidden_states` (embeddings or stem first). The paper reads after the first
            ResNet stage (1) for images and uses 2 for MultiNLI.
        dedier_alpha (`float`, *optional*, defaults to `0.2`):
            Exponent `alpha >= 0` of the readout margin. 0.2 is the paper's MultiNLI (text) setting; it uses 0.05
            for Waterbirds and Jigsaw and 0.1 for CelebA.
        dedier_beta (`float`, *optional*, defaults to `3.0`):
            Scale `beta >= 0`: a misread sample weighs up to `e^beta` (about 20 for 3). The paper's MultiNLI and
            Jigsaw setting; 4 for Waterbirds, 3.5 for CelebA.
        dedier_readout_epochs (`int`, *optional*, defaults to `1`):
            Epochs of readout training at each re-weighting (the paper: 1).
        dedier_readout_lr (`float`, *optional*):
            Learning rate of the readout; defaults to `learning_rate` (the paper uses the student's). Its weight
            decay is `weight_decay`, its batch size `per_device_train_batch_size`.
        dedier_readout_optimizer (`str` or [`DedierReadoutOptimizer`], *optional*, defaults to `"adamw"`):
            `"adamw"` (the paper's optimiser for BERT students) or `"sgd"` (SGD with momentum 0.9, the paper's
            optimiser for ResNet students and their readouts).

    > Parameters that control the teacher (`distill_from="teacher"` only)

    Args:
        teacher_model_name_or_path (`str`, *optional*):
            Hub id or local folder of the teacher, loaded with `AutoModelForSequenceClassification`. Ignored when a
            teacher model is passed to the trainer.
        teacher_model_init_kwargs (`dict`, *optional*):
            Keyword arguments for the teacher's `from_pretrained` (e.g. `{"torch_dtype": "bfloat16"}`).
        map_teacher_token_ids (`bool`, *optional*, defaults to `False`):
            Map student token ids to teacher token ids by token string. Without it a vocabulary mismatch is an error
            before training.
        teacher_from_base_model (`bool`, *optional*, defaults to `False`):
            Self-distillation of a PEFT student: the teacher is the student's own base model, i.e. the student with
            its adapters (and its `modules_to_save` copies) disabled. No second copy of the weights and nothing to
            load. Needs a PEFT student (`peft_config=` or a `PeftModel`) and no other teacher.
        teacher_zero_stage (`int`, *optional*, defaults to `3`):
            ZeRO stage of the teacher in a DeepSpeed run, whatever the student's stage: `3` shards its weights over
            the processes (initialised for inference by DeepSpeed), `0` keeps a full copy on each process (no
            all-gather per forward: faster for a small teacher). Ignored without DeepSpeed.
        cache_teacher_logits (`bool`, *optional*, defaults to `False`):
            Run the teacher once over each dataset, store its logits on disk (keyed by teacher weights and data) and
            train from them: later epochs and later runs never load the teacher.
        teacher_logits_cache_dir (`str`, *optional*):
            Where cached logits live. Defaults to `$HF_HOME/hf_kd/teacher_logits`.
        lm_cache_top_k (`int`, *optional*, defaults to `64`):
            With `cache_teacher_logits=True` and a causal-LM student ([`MultiExitForCausalLM`]): how many of the
            teacher's largest logits are cached per completion token; every exit's loss is then
            [`hf_kd.losses.sparse_lm_kd_loss`].
        lm_cache_tail (`str` or [`~hf_kd.options.LMCacheTail`], *optional*, defaults to `"bucket"`):
            The tail of that sparse loss: `"bucket"` or `"renormalise"` (see [`DistillConfig`]).
        lm_chunk_size (`int`, *optional*, defaults to `128`):
            Causal-LM exits: tokens processed at once by each exit's token loss (memory only).
        lm_fused_head (`bool` or `None`, *optional*, defaults to `None`):
            Causal-LM exits: whether the loss runs the shared LM head itself, one chunk of completion tokens at a
            time, on every exit's normed hidden state ([`hf_kd.lm_head.lm_head_skipped`],
            [`hf_kd.losses.LMHeadInputs`]), so that training makes no `(batch, seq, vocab)` logits tensor (nor its
            gradient) per exit, nor for a live teacher; only `distill_from="final_exit"` with several early exits
            projects the final exit's targets once for all of them (one such tensor, without gradient). Same loss
            and gradients up to float rounding. `None`:
            wherever the backbone's head allows it (a bias-free `nn.Linear` without logit soft-capping or scaling, not
            ZeRO-3-partitioned; the reason for full logits logged once); `True`: required (an error naming the reason
            otherwise); `False`: full logits. Evaluation always computes full logits (the metrics read them).

    Example:

    ```python
    >>> from hf_kd import EarlyExitConfig
    >>> args = EarlyExitConfig(output_dir="multi-exit", exit_loss_weights="linear", distill_from="final_exit")
    ```
    """

    # Parameters that control the exits
    # None first: HfArgumentParser then reads the flag as a `str` ("linear", or "1,2,3" parsed in __post_init__).
    exit_loss_weights: None | str | list[float] = field(
        default=None,
        metadata={
            "help": "Per-exit loss weights: 'uniform', 'linear' (proportional to exit depth) or one weight per exit "
            "('1,2,3'); normalised to sum to 1. Default: the model config's exit_loss_weights (uniform unless set).",
        },
    )

    freeze_backbone: bool = field(
        default=False,
        metadata={
            "help": "Freeze model.backbone and train the exits only (exit heads, or a causal LM's exit adapters); the "
            "final exit's outputs stay unchanged.",
        },
    )

    # Parameters that control distillation into the exits
    distill_from: str = field(
        default="none",
        metadata={
            "help": "Soft-target source of the exits: 'none' (cross-entropy only), 'final_exit' (self-distillation "
            "from the detached final exit) or 'teacher' (an external frozen teacher).",
            "choices": [source.value for source in DistillFrom],
        },
    )
    temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature T of the soft targets (> 0); soft term scaled by T^2."}
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight in [0, 1] of the soft term; 1 - alpha weighs cross-entropy with the labels."},
    )

    # None first: HfArgumentParser then reads the flag as a `str` ("fitted", or "1.5" parsed in __post_init__).
    final_exit_temperature: None | str | float = field(
        default=None,
        metadata={
            "help": "distill_from='final_exit' only: divide the final exit's logits by this temperature (> 0) to form "
            "the exits' targets, or 'fitted' to fit it on the eval set before training. Default: the raw final exit.",
        },
    )

    # Parameters that control DEDIER re-weighting
    dedier: bool = field(
        default=False,
        metadata={
            "help": "DEDIER (Tiwari et al., WACV 2024): after every epoch, up-weight in the distillation loss the "
            "samples that an early readout gets confidently wrong. Needs distill_from='teacher'.",
        },
    )
    dedier_layer: int = field(
        default=1, metadata={"help": "1-based layer (or image stage) whose hidden state feeds the DEDIER readout."}
    )
    dedier_alpha: float = field(
        default=0.2, metadata={"help": "DEDIER margin exponent alpha >= 0: w = exp(beta * margin^alpha)."}
    )
    dedier_beta: float = field(
        default=3.0, metadata={"help": "DEDIER scale beta >= 0: a misread sample weighs up to exp(beta)."}
    )
    dedier_readout_epochs: int = field(
        default=1, metadata={"help": "Epochs of DEDIER readout training at each re-weighting (>= 1)."}
    )
    dedier_readout_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the DEDIER readout (> 0). Default: learning_rate."}
    )
    dedier_readout_optimizer: str = field(
        default="adamw",
        metadata={
            "help": "Optimiser of the DEDIER readout: 'adamw' or 'sgd' (momentum 0.9).",
            "choices": [optimizer.value for optimizer in DedierReadoutOptimizer],
        },
    )

    # The teacher and teacher logits cache fields come from _TeacherArguments.

    def __post_init__(self):
        super().__post_init__()
        self._teacher_post_init()
        self.exit_loss_weights = parse_exit_loss_weights(self.exit_loss_weights, "exit_loss_weights")
        self.distill_from = to_enum(DistillFrom, self.distill_from, "distill_from")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0.0, 1.0], got {self.alpha}")
        if self.distill_from != "teacher" and (
            self.teacher_model_name_or_path or self.cache_teacher_logits or self.teacher_from_base_model
        ):
            raise ValueError(
                f"teacher_model_name_or_path={self.teacher_model_name_or_path!r}, "
                f"cache_teacher_logits={self.cache_teacher_logits} and "
                f"teacher_from_base_model={self.teacher_from_base_model} are only used with distill_from='teacher', "
                f"got distill_from='{self.distill_from}'"
            )
        self.final_exit_temperature = parse_final_exit_temperature(self.final_exit_temperature)
        if self.final_exit_temperature is not None and self.distill_from != "final_exit":
            raise ValueError(
                f"final_exit_temperature={self.final_exit_temperature!r} scales the final exit's logits into the "
                f"exits' targets and needs distill_from='final_exit', got distill_from='{self.distill_from}'"
            )
        self._dedier_post_init()
        if self.label_smoothing_factor != 0:
            raise ValueError(
                f"label_smoothing_factor={self.label_smoothing_factor} is not used by EarlyExitTrainer, which computes "
                "its own per-exit losses."
            )

    def _dedier_post_init(self) -> None:
        if not self.dedier:
            changed = [
                f"{f.name}={getattr(self, f.name)!r}"
                for f in fields(self)
                if f.name.startswith("dedier_") and getattr(self, f.name) != f.default
            ]
            if changed:
                raise ValueError(f"{', '.join(changed)} only apply with dedier=True, got dedier=False")
            return
        if self.distill_from != "teacher":
            # DEDIER re-weights the transfer of a frozen (ideally group-robust) teacher's knowledge. With
            # "final_exit" the source would be the final exit, itself trained by re-weighted cross-entropy: that is
            # JTT-style re-weighted ERM with soft targets from a model being re-weighted at the same time, a method
            # the paper neither defines nor evaluates. With "none" there is no distillation at all.
            raise ValueError(
                f"dedier=True re-weights distillation from a teacher and needs distill_from='teacher', got "
                f"distill_from='{self.distill_from}'"
            )
        layer = self.dedier_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise ValueError(f"dedier_layer must be a 1-based layer index (an int >= 1), got {layer!r}")
        for name in ("dedier_alpha", "dedier_beta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        epochs = self.dedier_readout_epochs
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"dedier_readout_epochs must be an int >= 1, got {epochs!r}")
        if self.dedier_readout_lr is not None and not self.dedier_readout_lr > 0:
            raise ValueError(f"dedier_readout_lr must be > 0 or None (learning_rate), got {self.dedier_readout_lr}")
        self.dedier_readout_optimizer = to_enum(
            DedierReadoutOptimizer, self.dedier_readout_optimizer, "dedier_readout_optimizer"
        )
