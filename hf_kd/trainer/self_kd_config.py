from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..options import (
    AmbiguityScore,
    DistillDivergence,
    EntropyDropRule,
    OtherExitLoss,
    RecalibrationLoss,
    RecalibrationTiming,
    SourceCorrection,
    SourceLayerSide,
    to_enum,
)
from .early_exit_config import parse_exit_loss_weights

# The choice options of SelfKDConfig and their enums, converted in __post_init__.
_CHOICES = {
    "entropy_drop_rule": EntropyDropRule,
    "source_layer_side": SourceLayerSide,
    "distill_divergence": DistillDivergence,
    "source_correction": SourceCorrection,
    "other_exits": OtherExitLoss,
    "ambiguity_score": AmbiguityScore,
    "recalibration_timing": RecalibrationTiming,
    "recalibration_loss": RecalibrationLoss,
}


@dataclass
class SelfKDConfig(TrainingArguments):
    r"""
    Configuration of [`SelfKDTrainer`]: self-knowledge distillation from lower layers for learning ambiguity (Park,
    Jeong, Cho & Park, 2024, https://huggingface.co/papers/2406.09719), on top of [`~transformers.TrainingArguments`].

    Training runs `num_train_epochs` epochs in three phases:

    - **A, warm-up**: every exit (one classifier per layer) learns `sum_j CE(y, p_j)`. After each epoch the mean
      predictive entropy of every exit on the validation set gives a source layer by the entropy-drop rule; the
      warm-up ends once the last `selection_stable_epochs` selections agree, or after `warmup_max_epochs` epochs.
    - **B, self-distillation**: the main classifier learns `(1 - lambda) CE(y, p_L) + lambda D(p_s || p_L)` from the
      source layer `s`, which learns from the main classifier on the samples it gets wrong
      ([`hf_kd.losses.self_kd_loss`]).
    - **C, re-calibration** (`recalibration_percent > 0`): the `m %` training samples with the lowest level of
      ambiguity are trained towards the uniform distribution.

    The paper's text was not available: every choice it leaves open (PAPERS.md section 2, marked [OPEN]) is a field
    below, defaulting to the proposed reading.

    > Phase A: warm-up and source-layer selection

    Args:
        warmup_exit_loss_weights (`str` or `list[float]`, *optional*, defaults to `"uniform"`):
            [OPEN] Weights of the exits' cross-entropies in the warm-up loss, as `EarlyExitConfig.exit_loss_weights`
            (`"uniform"`, `"linear"` in depth, or one weight per exit; on the command line `linear` or `1,2,3`).
            They are normalised to sum to the number of exits, so `"uniform"` is PAPERS.md's `sum_j CE(y, p_j)`,
            on the scale of the later phases' sum of per-exit losses.
        warmup_max_epochs (`int`, *optional*, defaults to `3`):
            Cap on the warm-up epochs (PAPERS.md: the normal fine-tuning budget, 2-3 epochs). `num_train_epochs`
            must leave at least one self-distillation epoch after it (and the re-calibration epochs).
        selection_stable_epochs (`int`, *optional*, defaults to `2`):
            `E`: the warm-up ends after the first epoch at which the last `E` selections (one per epoch) are the
            same layer, "the selected source layer remains unchanged". At most `warmup_max_epochs`. `1` ends the
            warm-up after its first epoch.
        entropy_drop_rule (`str` or [`EntropyDropRule`], *optional*, defaults to `"largest"`):
            [OPEN] `"largest"`: the largest entropy drop between consecutive exits. `"first_significant"`: the first
            drop of at least `entropy_drop_threshold` times the largest ([`hf_kd.self_kd.select_source_exit`]).
        entropy_drop_threshold (`float`, *optional*, defaults to `0.5`):
            `delta` in `(0, 1]` of `"first_significant"`.
        source_layer_side (`str` or [`SourceLayerSide`], *optional*, defaults to `"after_drop"`):
            Whether the source is the exit right after the selected drop (`"after_drop"`, PAPERS.md's `argmax_l
            (H_{l-1} - H_l)`; needs 3 exits or more) or right before it (`"before_drop"`, the last exit that still has
            the higher entropy).
        selection_dataset_name (`str`, *optional*):
            With a dict of evaluation datasets, the key of the one the entropies are measured on (required then).

    > Phase B: self-distillation

    Args:
        kd_lambda (`float`, *optional*, defaults to `0.6`):
            `lambda` in `[0, 1]`: weight of the source layer's distribution in the main classifier's loss, `1 -
            lambda` for the gold labels (the paper's 0.6).
        temperature (`float`, *optional*, defaults to `1.0`):
            [OPEN] Temperature `T > 0` of both distillation terms, scaled by `T^2`.
        distill_divergence (`str` or [`DistillDivergence`], *optional*, defaults to `"kl"`):
            [OPEN] `"kl"`: `KL(teacher || student)`. `"js"`: the Jensen-Shannon divergence.
        source_correction (`str` or [`SourceCorrection`], *optional*, defaults to `"source_wrong_main_right"`):
            Which samples teach the source layer from the main classifier: those the source gets wrong and the main
            classifier right (`"source_wrong_main_right"`), or all those the source gets wrong (`"source_wrong"`).
        other_exits (`str` or [`OtherExitLoss`], *optional*, defaults to `"ce"`):
            [OPEN] The exits that are neither the source nor the main classifier: `"ce"` keeps their cross-entropy,
            `"none"` stops training them.

    > Phase C: re-calibration of extremely ambiguous training samples

    Args:
        recalibration_percent (`float`, *optional*, defaults to `10.0`):
            `m` in `[0, 100)`: the share (percent) of labelled training samples with the lowest level of ambiguity
            that are re-calibrated. `0` disables Phase C (self-distillation alone, the paper's ablation).
        ambiguity_score (`str` or [`AmbiguityScore`], *optional*, defaults to `"source"`):
            [OPEN] The level of ambiguity `LA(x)`: `"source"`, `p_s(y | x)` at the source layer, or `"lower_mean"`,
            the mean of `p_j(y | x)` over the exits up to the source ([`hf_kd.self_kd.level_of_ambiguity`]). It is
            computed by the model in eval mode in one pass over the whole train set.
        recalibration_timing (`str` or [`RecalibrationTiming`], *optional*, defaults to `"end"`):
            [OPEN] `"end"`: the set is selected once, at the end of Phase B, and the last `recalibration_epochs`
            epochs train with the mixed objective. `"every_epoch"`: the set is selected at the end of the warm-up and
            re-selected after every epoch, and every epoch after the warm-up trains with the mixed objective.
        recalibration_epochs (`int`, *optional*, defaults to `1`):
            Epochs of Phase C with `recalibration_timing="end"` (PAPERS.md: one further epoch).
        recalibration_loss (`str` or [`RecalibrationLoss`], *optional*, defaults to `"replace"`):
            [OPEN] For the samples of the set, the main classifier's loss is replaced by `KL(u || p_L)` (`"replace"`:
            the pull of the gold label is what re-calibration removes) or gets it added (`"add"`).

    Example:

    ```python
    >>> from hf_kd import SelfKDConfig
    >>> args = SelfKDConfig(output_dir="self-kd", num_train_epochs=5, kd_lambda=0.6, recalibration_percent=10)
    ```
    """

    # Phase A
    # None first: HfArgumentParser then reads the flag as a `str` ("linear", or "1,2,3" parsed in __post_init__).
    warmup_exit_loss_weights: None | str | list[float] = field(
        default="uniform",
        metadata={"help": "Warm-up weights of the exits' cross-entropies: 'uniform', 'linear' (in depth) or one per "
                  "exit ('1,2,3'); normalised to sum to the number of exits."},
    )
    warmup_max_epochs: int = field(
        default=3, metadata={"help": "Cap on the warm-up epochs (>= 1) during which every exit is trained."}
    )
    selection_stable_epochs: int = field(
        default=2,
        metadata={"help": "E: the warm-up ends once the source layers selected at the last E epochs agree (>= 1)."},
    )
    entropy_drop_rule: str = field(
        default="largest",
        metadata={
            "help": "Source-layer rule on the validation entropy per exit: 'largest' drop or 'first_significant' "
            "drop (>= entropy_drop_threshold x the largest).",
            "choices": [choice.value for choice in EntropyDropRule],
        },
    )
    entropy_drop_threshold: float = field(
        default=0.5, metadata={"help": "delta in (0, 1] of entropy_drop_rule='first_significant'."}
    )
    source_layer_side: str = field(
        default="after_drop",
        metadata={
            "help": "The source is the exit right after the selected entropy drop ('after_drop') or right before it "
            "('before_drop').",
            "choices": [choice.value for choice in SourceLayerSide],
        },
    )
    selection_dataset_name: str | None = field(
        default=None,
        metadata={"help": "With a dict of eval datasets: the key of the one the source layer is selected on."},
    )

    # Phase B
    kd_lambda: float = field(
        default=0.6,
        metadata={"help": "lambda in [0, 1]: weight of the source layer's distribution in the main classifier's loss."},
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Temperature T > 0 of the distillation terms (scaled by T^2)."}
    )
    distill_divergence: str = field(
        default="kl",
        metadata={
            "help": "Divergence of the distillation terms: 'kl' or 'js'.",
            "choices": [choice.value for choice in DistillDivergence],
        },
    )
    source_correction: str = field(
        default="source_wrong_main_right",
        metadata={
            "help": "Samples on which the source layer learns from the main classifier: 'source_wrong_main_right' "
            "or 'source_wrong'.",
            "choices": [choice.value for choice in SourceCorrection],
        },
    )
    other_exits: str = field(
        default="ce",
        metadata={
            "help": "Loss of the exits that are neither the source nor the main classifier after the warm-up: 'ce' "
            "or 'none'.",
            "choices": [choice.value for choice in OtherExitLoss],
        },
    )

    # Phase C
    recalibration_percent: float = field(
        default=10.0,
        metadata={"help": "m in [0, 100): percent of training samples with the lowest level of ambiguity "
                  "re-calibrated towards uniform; 0 disables re-calibration."},
    )
    ambiguity_score: str = field(
        default="source",
        metadata={
            "help": "Level of ambiguity: 'source' (p_s(y|x)) or 'lower_mean' (mean p_j(y|x) over exits up to s).",
            "choices": [choice.value for choice in AmbiguityScore],
        },
    )
    recalibration_timing: str = field(
        default="end",
        metadata={
            "help": "'end': select the set once after self-distillation, then recalibration_epochs epochs; "
            "'every_epoch': select at the end of the warm-up and after every epoch.",
            "choices": [choice.value for choice in RecalibrationTiming],
        },
    )
    recalibration_epochs: int = field(
        default=1, metadata={"help": "Epochs of re-calibration with recalibration_timing='end' (>= 1)."}
    )
    recalibration_loss: str = field(
        default="replace",
        metadata={
            "help": "For the re-calibrated samples, KL(u || p_L) 'replace's the main classifier's loss or is 'add'ed.",
            "choices": [choice.value for choice in RecalibrationLoss],
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.warmup_exit_loss_weights = parse_exit_loss_weights(
            self.warmup_exit_loss_weights or "uniform", "warmup_exit_loss_weights"
        )
        for name in ("warmup_max_epochs", "selection_stable_epochs", "recalibration_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.selection_stable_epochs > self.warmup_max_epochs:
            raise ValueError(
                f"selection_stable_epochs={self.selection_stable_epochs} can never be reached within "
                f"warmup_max_epochs={self.warmup_max_epochs}: use selection_stable_epochs <= warmup_max_epochs"
            )
        for name, enum_class in _CHOICES.items():
            setattr(self, name, to_enum(enum_class, getattr(self, name), name))
        if not 0 < self.entropy_drop_threshold <= 1:
            raise ValueError(f"entropy_drop_threshold must be in (0, 1], got {self.entropy_drop_threshold}")
        if not 0.0 <= self.kd_lambda <= 1.0:
            raise ValueError(f"kd_lambda must be in [0, 1], got {self.kd_lambda}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.recalibration_percent < 100.0:
            raise ValueError(
                f"recalibration_percent (m) must be in [0, 100), got {self.recalibration_percent}; 0 disables "
                "re-calibration"
            )
        if self.label_smoothing_factor != 0:
            raise ValueError(
                f"label_smoothing_factor={self.label_smoothing_factor} is not used by SelfKDTrainer, which computes its "
                "own per-exit losses."
            )

    @property
    def min_train_epochs(self) -> int:
        """Fewest epochs that hold the longest warm-up, one self-distillation epoch and the re-calibration epochs."""
        recalibration = self.recalibration_epochs if self.recalibrates and self.recalibration_timing == "end" else 0
        return self.warmup_max_epochs + 1 + recalibration

    @property
    def recalibrates(self) -> bool:
        """Whether Phase C runs (`recalibration_percent > 0`)."""
        return self.recalibration_percent > 0
