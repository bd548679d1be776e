from dataclasses import dataclass, field

from transformers import TrainingArguments

from .teacher_config import _TeacherArguments

EXIT_LOSS_WEIGHTINGS = ("uniform", "linear")
DISTILL_SOURCES = ("none", "final_exit", "teacher")


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

    > Parameters that control distillation into the exits

    Args:
        distill_from (`str`, *optional*, defaults to `"none"`):
            Soft-target source of the exits. `"none"`: cross-entropy only. `"final_exit"`: self-distillation, every
            earlier exit learns from the model's own final exit (detached, so no gradient flows into it from the soft
            term), the final exit itself gets plain cross-entropy. `"teacher"`: every exit learns from an external
            frozen teacher, handled exactly as by [`DistillTrainer`].
        temperature (`float`, *optional*, defaults to `2.0`):
            Softmax temperature `T` of the soft targets; the soft term is scaled by `T^2`. Unused with `"none"`.
        alpha (`float`, *optional*, defaults to `0.5`):
            Weight of the soft term in `[0, 1]`; `1 - alpha` weighs the cross-entropy. Unused with `"none"`.

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
        cache_teacher_logits (`bool`, *optional*, defaults to `False`):
            Run the teacher once over each dataset, store its logits on disk (keyed by teacher weights and data) and
            train from them: later epochs and later runs never load the teacher.
        teacher_logits_cache_dir (`str`, *optional*):
            Where cached logits live. Defaults to `$HF_HOME/hf_kd/teacher_logits`.

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

    # Parameters that control distillation into the exits
    distill_from: str = field(
        default="none",
        metadata={
            "help": "Soft-target source of the exits: 'none' (cross-entropy only), 'final_exit' (self-distillation "
            "from the detached final exit) or 'teacher' (an external frozen teacher).",
            "choices": list(DISTILL_SOURCES),
        },
    )
    temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature T of the soft targets (> 0); soft term scaled by T^2."}
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight in [0, 1] of the soft term; 1 - alpha weighs cross-entropy with the labels."},
    )

    # The teacher and teacher logits cache fields come from _TeacherArguments.

    def __post_init__(self):
        super().__post_init__()
        self._teacher_post_init()
        weights = self.exit_loss_weights
        if isinstance(weights, str):
            if weights not in EXIT_LOSS_WEIGHTINGS:
                try:
                    weights = [float(w) for w in weights.replace(",", " ").split()]
                except ValueError:
                    raise ValueError(
                        f"exit_loss_weights must be one of {EXIT_LOSS_WEIGHTINGS}, a list of floats or None, "
                        f"got {weights!r}"
                    ) from None
        if isinstance(weights, (list, tuple)):
            weights = [float(w) for w in weights]
            if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"exit_loss_weights must be >= 0 with a positive sum, got {weights}")
        self.exit_loss_weights = weights
        if self.distill_from not in DISTILL_SOURCES:
            raise ValueError(f"distill_from must be one of {DISTILL_SOURCES}, got {self.distill_from!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0.0, 1.0], got {self.alpha}")
        if self.distill_from != "teacher" and (self.teacher_model_name_or_path or self.cache_teacher_logits):
            raise ValueError(
                f"teacher_model_name_or_path={self.teacher_model_name_or_path!r} and "
                f"cache_teacher_logits={self.cache_teacher_logits} are only used with distill_from='teacher', got "
                f"distill_from={self.distill_from!r}"
            )
        if self.label_smoothing_factor != 0:
            raise ValueError(
                f"label_smoothing_factor={self.label_smoothing_factor} is not used by EarlyExitTrainer, which computes "
                "its own per-exit losses."
            )
