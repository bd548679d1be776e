"""`_IntermediateArguments`: the TinyBERT intermediate-layer distillation fields of [`DistillConfig`].

A plain dataclass mixed into `DistillConfig` after `TrainingArguments` (as `_TeacherArguments` is), so that
[`~transformers.HfArgumentParser`] sees every field; `DistillConfig.__post_init__` calls
[`~_IntermediateArguments._intermediate_post_init`]. The losses are in [`hf_kd.intermediate_distillation`].
"""

from dataclasses import dataclass, field

from ..intermediate_distillation import PROJECTION_KINDS


@dataclass
class _IntermediateArguments:
    # Parameters that control intermediate-layer (TinyBERT) distillation
    hidden_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight (>= 0) of TinyBERT's hidden-state MSE, summed over student layers (1.0 in TinyBERT's "
            "intermediate stage); 0 disables it."
        },
    )
    attention_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight (>= 0) of TinyBERT's pre-softmax attention-score MSE, summed over student layers; needs "
            "as many heads in student and teacher. 0 disables it."
        },
    )
    embedding_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight (>= 0) of TinyBERT's embedding-output MSE; 0 disables it."}
    )
    prediction_loss_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight (>= 0) of the prediction-layer loss (the KD loss on logits): 0 in TinyBERT's intermediate "
            "stage, 1 in its prediction stage."
        },
    )
    intermediate_layer_map: list[int] | None = field(
        default=None,
        metadata={
            "help": "One 1-based teacher layer per student layer (student layer m learns from teacher layer "
            "map[m-1]); default: TinyBERT's uniform map, e.g. 6 -> 3 layers: 2 4 6."
        },
    )
    intermediate_projection: str = field(
        default="linear",
        metadata={
            "help": f"One of {PROJECTION_KINDS}: a learned Linear(student width -> teacher width) shared by all "
            "layers (TinyBERT's fit_dense; identity-initialised for equal widths), or none (equal widths only)."
        },
    )

    @property
    def uses_intermediate_losses(self) -> bool:
        """Whether any intermediate-layer loss has a positive weight."""
        return self.hidden_loss_weight > 0 or self.attention_loss_weight > 0 or self.embedding_loss_weight > 0

    def _intermediate_post_init(self) -> None:
        weights = ("hidden_loss_weight", "attention_loss_weight", "embedding_loss_weight", "prediction_loss_weight")
        for name in weights:
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not any(getattr(self, name) > 0 for name in weights):
            raise ValueError(f"At least one of {', '.join(weights)} must be > 0: every loss is switched off.")
        if self.intermediate_projection not in PROJECTION_KINDS:
            raise ValueError(
                f"intermediate_projection must be one of {PROJECTION_KINDS}, got {self.intermediate_projection!r}"
            )
        if not self.uses_intermediate_losses:
            if self.intermediate_layer_map is not None:
                raise ValueError(
                    f"intermediate_layer_map={self.intermediate_layer_map} is set but every intermediate loss weight "
                    "is 0: set hidden_loss_weight and/or attention_loss_weight > 0, or drop the map."
                )
            return
        if self.cache_teacher_logits:
            # Hidden states and attention scores of every mapped layer for every example would be far larger than
            # the model: intermediate losses run the teacher live.
            raise ValueError(
                "cache_teacher_logits=True cannot serve intermediate-layer losses (hidden_loss_weight, "
                "attention_loss_weight, embedding_loss_weight), which need the teacher's hidden states and attention "
                "scores at every step: cache the logits for the prediction-layer stage only."
            )
        if self.intermediate_layer_map is not None:
            bad = [v for v in self.intermediate_layer_map if isinstance(v, bool) or not isinstance(v, int) or v < 1]
            if bad:
                raise ValueError(
                    f"intermediate_layer_map entries must be 1-based teacher layer numbers (ints >= 1), got {bad} in "
                    f"{self.intermediate_layer_map}"
                )
