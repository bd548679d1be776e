"""hf_kd's choice options: every argument or config field with a fixed set of values is a `str` `Enum` defined here,
once, with one docstring per member (as laplace-torch's `laplace.utils.enums`).

The pure functions ([`hf_kd.losses`], [`hf_kd.self_kd`], [`hf_kd.tinybert`], [`hf_kd.kd_layer_targets`],
[`hf_kd.calibration`], [`hf_kd.prediction_sets`], [`hf_kd.student`]) and the configs of [`hf_kd.trainer`] take the
member or its plain string value (YAML recipes, command-line flags) and check it with [`to_enum`], so that one value
set has one definition and one error message. This module imports nothing from hf_kd, so that any module can import
it without a cycle. The exit options of [`hf_kd.modeling`] (`ExitPolicy`, `ExitHeadType`, `ExitPooling`,
`LinkApprox`, `KronPrior`) stay in `hf_kd/modeling/`, whose files are copied next to a saved model for
`trust_remote_code` and must not import the rest of hf_kd.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = [
    "AmbiguityScore",
    "BuiltinDataset",
    "CalibrationObjective",
    "CoverageRule",
    "CrossTokenizerLoss",
    "DedierReadoutOptimizer",
    "DistillDivergence",
    "DistillFrom",
    "EntropyDropRule",
    "ExitLossWeighting",
    "KMeansBackend",
    "LMLossType",
    "LetKDTeacherResize",
    "OtherExitLoss",
    "RecalibrationLoss",
    "RecalibrationTiming",
    "RecipeMethod",
    "Reduction",
    "SourceCorrection",
    "SourceLayerSide",
    "StrEnum",
    "StudentLayerRule",
    "TinyBERTProjection",
    "to_enum",
]

E = TypeVar("E", bound=Enum)


class StrEnum(str, Enum):
    """Base of hf_kd's choice options: a `str` whose `str()` and f-string form are its value (`"linear"`, not
    `"TinyBERTProjection.LINEAR"`), so that messages, file names and JSON read as the plain string did. A member
    compares (and hashes) equal to its value: `Reduction.MEAN == "mean"`."""

    def __str__(self) -> str:
        return self.value


def to_enum(enum_class: type[E], value, name: str, allow_none: bool = False) -> E | None:
    """
    `value` as a member of `enum_class`, for a config's `__post_init__` or a function's argument check.

    Args:
        enum_class (`type[Enum]`):
            A `class X(StrEnum)` of this module.
        value (`str` or `enum_class`):
            The member or its string value.
        name (`str`):
            The config field or argument, for the error.
        allow_none (`bool`, *optional*, defaults to `False`):
            Whether `None` (the option's "off" or default) is accepted; it is returned as is.

    Raises:
        `ValueError`: `value` is not one of the members' values; the message names it and the accepted values, e.g.
        `distill_from must be one of ('none', 'final_exit', 'teacher'), got 'teachr'`.

    Example:

    ```python
    >>> from hf_kd.options import Reduction, to_enum
    >>> to_enum(Reduction, "sum", "reduction")
    <Reduction.SUM: 'sum'>
    ```
    """
    if allow_none and value is None:
        return None
    try:
        return enum_class(value)
    except ValueError:
        accepted = ((None,) if allow_none else ()) + tuple(member.value for member in enum_class)
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}") from None


# ----- losses ([`hf_kd.losses`]) -------------------------------------------------------------------------------------


class Reduction(StrEnum):
    """How a loss of [`hf_kd.losses`] reduces its per-item values."""

    MEAN = "mean"
    """The mean over the valid items (or `sum / num_items_in_batch` when that is given)."""
    SUM = "sum"
    """The sum over the items."""
    NONE = "none"
    """One value per item, 0 at ignored items."""


class LMLossType(StrEnum):
    """The divergence `D` of [`hf_kd.losses.lm_kd_loss`] between the teacher's (`p_T`) and the student's (`p_S`)
    next-token distributions."""

    FORWARD_KL = "forward_kl"
    """`KL(p_T || p_S)`, mass-covering (Hinton et al., 2015; TRL `beta=0`)."""
    REVERSE_KL = "reverse_kl"
    """`KL(p_S || p_T)`, mode-seeking (MiniLLM, Gu et al., 2024, https://huggingface.co/papers/2306.08543; TRL
    `beta=1`)."""
    JSD = "jsd"
    """The generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024, https://huggingface.co/papers/2306.13649,
    Eq. 1) with weight `beta`, in TRL's convention (see [`hf_kd.losses.lm_kd_loss`])."""



class LMCacheTail(StrEnum):
    """How [`hf_kd.losses.sparse_lm_kd_loss`] treats the next-token probability outside the teacher's cached top-k."""

    BUCKET = "bucket"
    """One extra "rest" cell holding the mass outside the top-k on both sides (exact at temperature 1: a lower bound
    on the full loss, equal to it when k is the vocabulary)."""
    RENORMALISE = "renormalise"
    """Both distributions restricted to the top-k tokens and renormalised (a different objective, not an
    approximation of the full loss)."""


class CrossTokenizerLoss(StrEnum):
    """The token-level loss of [`hf_kd.DistillTrainer`] between a causal-LM teacher and student with **different**
    tokenizers (`DistillConfig.cross_tokenizer`, see [`hf_kd.cross_tokenizer`]), on aligned text spans."""

    ULD = "uld"
    """Universal Logit Distillation (Boizard et al., 2024, https://huggingface.co/papers/2402.12030): L1 distance
    between the sorted probability vectors ([`hf_kd.losses.uld_loss`])."""
    HYBRID = "hybrid"
    """Exact forward KL on the tokens both vocabularies share (renormalised) plus ULD on the rest
    ([`hf_kd.losses.hybrid_loss`], TRL GOLD's hybrid)."""


# ----- early exits ([`EarlyExitConfig`]) ------------------------------------------------------------------------------


class ExitLossWeighting(StrEnum):
    """A named weighting of the exits' losses (the alternative is one weight per exit)."""

    UNIFORM = "uniform"
    """The same weight for every exit."""
    LINEAR = "linear"
    """Proportional to the exit's depth (its layer), as PABEE's weighted average."""


class DistillFrom(StrEnum):
    """The soft-target source of an [`EarlyExitTrainer`]'s exits."""

    NONE = "none"
    """No distillation: cross-entropy only."""
    FINAL_EXIT = "final_exit"
    """Self-distillation: every earlier exit learns from the model's own (detached) final exit."""
    TEACHER = "teacher"
    """Every exit learns from an external frozen teacher."""


class DedierReadoutOptimizer(StrEnum):
    """The optimiser of DEDIER's readout."""

    ADAMW = "adamw"
    """AdamW."""
    SGD = "sgd"
    """SGD with momentum 0.9."""


# ----- self-distillation ([`hf_kd.self_kd`], [`hf_kd.losses.self_kd_loss`], [`SelfKDConfig`]) -----------------------


class EntropyDropRule(StrEnum):
    """How the source layer is read from the validation entropy of every exit ([`hf_kd.self_kd.select_source_exit`])."""

    LARGEST = "largest"
    """The largest entropy drop between consecutive exits."""
    FIRST_SIGNIFICANT = "first_significant"
    """The first drop of at least `entropy_drop_threshold` times the largest."""


class SourceLayerSide(StrEnum):
    """Which exit of the selected entropy drop is the source layer ([`hf_kd.self_kd.select_source_exit`])."""

    AFTER_DROP = "after_drop"
    """The exit right after the drop (`argmax_l (H_{l-1} - H_l)`)."""
    BEFORE_DROP = "before_drop"
    """The exit right before the drop, the last one that still has the higher entropy."""


class DistillDivergence(StrEnum):
    """The divergence of the distillation terms ([`hf_kd.losses.kd_loss`], [`hf_kd.losses.self_kd_loss`])."""

    KL = "kl"
    """`KL(teacher || student)`."""
    JS = "js"
    """The Jensen-Shannon divergence."""


class SourceCorrection(StrEnum):
    """The samples on which the source layer learns from the main classifier ([`hf_kd.losses.self_kd_loss`])."""

    SOURCE_WRONG_MAIN_RIGHT = "source_wrong_main_right"
    """Those the source gets wrong and the main classifier right."""
    SOURCE_WRONG = "source_wrong"
    """All those the source gets wrong."""


class OtherExitLoss(StrEnum):
    """The loss of the exits that are neither the source nor the main classifier after the warm-up
    ([`hf_kd.losses.self_kd_loss`])."""

    CE = "ce"
    """Their cross-entropy with the labels."""
    NONE = "none"
    """None: they stop training."""


class AmbiguityScore(StrEnum):
    """The level of ambiguity `LA(x)` of a training sample ([`hf_kd.self_kd.level_of_ambiguity`])."""

    SOURCE = "source"
    """`p_s(y | x)` at the source layer."""
    LOWER_MEAN = "lower_mean"
    """The mean of `p_j(y | x)` over the exits up to the source."""


class RecalibrationTiming(StrEnum):
    """When the re-calibration set is selected and trained on."""

    END = "end"
    """Selected once at the end of self-distillation, then `recalibration_epochs` epochs."""
    EVERY_EPOCH = "every_epoch"
    """Selected at the end of the warm-up and after every epoch; every later epoch trains with it."""


class RecalibrationLoss(StrEnum):
    """What `KL(u || p_L)` does to the main classifier's loss on the re-calibrated samples
    ([`hf_kd.losses.self_kd_loss`])."""

    REPLACE = "replace"
    """Replaces it (the pull of the gold label is what re-calibration removes)."""
    ADD = "add"
    """Is added to it."""


# ----- TinyBERT and letKD ([`hf_kd.tinybert`], [`hf_kd.kd_layer_targets`], their configs) --------------------------


class TinyBERTProjection(StrEnum):
    """How the student's hidden states reach the teacher's width in TinyBERT's hidden-state and embedding losses
    ([`hf_kd.tinybert.IntermediateProjection`])."""

    LINEAR = "linear"
    """A learned `Linear(student width -> teacher width)` shared by the embedding and every layer (TinyBERT's
    `fit_dense`), identity-initialised for equal widths."""
    IDENTITY = "identity"
    """No projection: student and teacher must have the same width."""


class LetKDTeacherResize(StrEnum):
    """How a teacher feature map of another size than the student's reaches it (`None`: equal sizes, or integer
    multiples average-pooled, as the paper)."""

    ADAPTIVE_AVG_POOL = "adaptive_avg_pool"
    """`adaptive_avg_pool2d` to the student's map size."""
    BILINEAR = "bilinear"
    """Bilinear interpolation to the student's map size."""


class KMeansBackend(StrEnum):
    """The K-means implementation that fits letKD's teacher targets ([`hf_kd.kd_layer_targets`])."""

    AUTO = "auto"
    """faiss when installed, else scikit-learn."""
    FAISS = "faiss"
    """faiss (`pip install faiss-cpu`)."""
    SKLEARN = "sklearn"
    """scikit-learn (slower)."""


# ----- data and recipes ([`hf_kd.data`], [`hf_kd.recipes`], `hf-kd`) ------------------------------------------------


class BuiltinDataset(StrEnum):
    """hf_kd's offline text-classification data sets, shipped inside pip packages ([`hf_kd.data.BUILTIN_DATASETS`]
    maps each to its loader; `--dataset` of `hf-kd` and `dataset_name` of the recipes)."""

    ROTTEN_TOMATOES = "rotten_tomatoes"
    """Movie-review sentences, positive or negative ([`hf_kd.data.load_rotten_tomatoes`])."""
    CROWDFLOWER_TWEETS = "crowdflower_tweets"
    """Tweets in emotion classes ([`hf_kd.data.load_crowdflower_tweets`])."""
    BBC_NEWS = "bbc_news"
    """BBC News articles in 5 topics ([`hf_kd.data.load_bbc_news`])."""


class RecipeMethod(StrEnum):
    """How `trainers/distill.py` ([`hf_kd.recipes.ScriptArguments`]) trains its model (Sultan, 2023's modes)."""

    ERM = "erm"
    """Fine-tuning with cross-entropy (also how a teacher is made)."""
    LS = "ls"
    """Cross-entropy with label smoothing."""
    KD = "kd"
    """Logit distillation of a teacher with [`DistillTrainer`]."""
    TINYBERT = "tinybert"
    """TinyBERT's intermediate-layer distillation with [`TinyBERTTrainer`]."""


# ----- calibration, prediction sets, students -----------------------------------------------------------------------


class CalibrationObjective(StrEnum):
    """What the temperature of [`hf_kd.calibration.calibrate_temperature`] is fitted to."""

    NLL = "nll"
    """Negative log-likelihood of the gold labels (Guo et al., 2017)."""
    KL = "kl"
    """KL(human || model) to human label distributions, batch mean (DistNLI `temperature_calibration.py`)."""


class CoverageRule(StrEnum):
    """When [`hf_kd.prediction_sets.fit_avcs_thresholds`] counts a configuration's calibration coverage as reaching
    `1 - alpha`; see [`hf_kd.prediction_sets.coverage_target`] for the counts and the reasons."""

    EMPIRICAL = "empirical"
    """The paper's (official code's) rule: the calibration coverage is `> 1 - alpha`."""
    CONFORMAL = "conformal"
    """The split-conformal level: at least `ceil((n + 1)(1 - alpha))` of the `n` calibration examples covered."""
    BINOMIAL = "binomial"
    """A one-sided binomial (Clopper-Pearson) lower confidence bound at level `1 - delta` on the coverage is
    `>= 1 - alpha` (and the conformal level is reached). The default."""


class StudentLayerRule(StrEnum):
    """Which teacher layers a causal-LM student made by [`hf_kd.student.make_student`] keeps."""

    EVERY_OTHER = "every_other"
    """Evenly spaced, ending with the last layer (DistilBERT's initialisation with half the depth)."""
    BLOCK_INFLUENCE = "block_influence"
    """ShortGPT (Men et al., 2024, https://huggingface.co/papers/2403.03853): the layers with the lowest block
    influence on calibration text are removed."""
