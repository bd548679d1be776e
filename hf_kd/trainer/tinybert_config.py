from dataclasses import dataclass, field

from ..options import TinyBERTProjection, to_enum
from .distill_config import DistillConfig


@dataclass
class TinyBERTConfig(DistillConfig):
    r"""
    Configuration of [`TinyBERTTrainer`]: TinyBERT's intermediate-layer distillation (Jiao et al., 2020,
    https://huggingface.co/papers/1909.10351) on top of [`DistillConfig`] (every teacher, cache and loss field of which
    applies).

    TinyBERT adds MSE losses between the student's and the teacher's embedding outputs, layer outputs (through a
    learned projection to the teacher's width) and pre-softmax attention scores ([`hf_kd.tinybert`]). The loss is
    `prediction_loss_weight * kd_loss + embedding_loss_weight * L_embd + hidden_loss_weight * L_hidn +
    attention_loss_weight * L_attn`. The intermediate losses need a live teacher (not `cache_teacher_logits`).
    TinyBERT's two stages are two runs: `hidden_loss_weight=attention_loss_weight=embedding_loss_weight=1,
    prediction_loss_weight=0`, then the defaults (every intermediate weight 0: the prediction layer only; recipe:
    `trainers/configs/tinybert_*`).

    > Parameters that control intermediate-layer (TinyBERT) distillation

    Args:
        hidden_loss_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the hidden-state MSE, summed over the student's layers.
        attention_loss_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the attention-score MSE, summed over the student's layers (student and teacher need the same
            number of heads).
        embedding_loss_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the embedding-output MSE.
        prediction_loss_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the KD loss on logits (0 in TinyBERT's intermediate stage).
        intermediate_layer_map (`list[int]`, *optional*):
            One 1-based teacher layer per student layer; defaults to the uniform map
            ([`hf_kd.tinybert.uniform_layer_map`]: 6 -> 3 layers gives `[2, 4, 6]`). Entries out of
            `[1, teacher layers]` are an error when the trainer is built.
        intermediate_projection (`str` or [`TinyBERTProjection`], *optional*, defaults to `"linear"`):
            `"linear"` (learned, shared by all layers, identity-initialised for equal widths) or `"identity"`. The
            projection is trained by the trainer's optimizer and saved beside the student as
            `intermediate_projection.safetensors`, not inside it.

    Example:

    ```python
    >>> from hf_kd import TinyBERTConfig
    >>> stage1 = TinyBERTConfig(output_dir="stage1", teacher_model_name_or_path="my-org/minilm-l6-rt",
    ...                         hidden_loss_weight=1.0, attention_loss_weight=1.0, embedding_loss_weight=1.0,
    ...                         prediction_loss_weight=0.0)
    >>> stage2 = TinyBERTConfig(output_dir="stage2", teacher_model_name_or_path="my-org/minilm-l6-rt", temperature=1.0,
    ...                         alpha=1.0, cache_teacher_logits=True)
    ```
    """

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
            "help": "'linear': a learned Linear(student width -> teacher width) shared by all layers (TinyBERT's "
            "fit_dense; identity-initialised for equal widths), or 'identity' (none; equal widths only).",
            "choices": [kind.value for kind in TinyBERTProjection],
        },
    )

    @property
    def uses_intermediate_losses(self) -> bool:
        """Whether any intermediate-layer loss has a positive weight."""
        return self.hidden_loss_weight > 0 or self.attention_loss_weight > 0 or self.embedding_loss_weight > 0

    def __post_init__(self):
        super().__post_init__()
        weights = ("hidden_loss_weight", "attention_loss_weight", "embedding_loss_weight", "prediction_loss_weight")
        for name in weights:
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not any(getattr(self, name) > 0 for name in weights):
            raise ValueError(f"At least one of {', '.join(weights)} must be > 0: every loss is switched off.")
        self.intermediate_projection = to_enum(TinyBERTProjection, self.intermediate_projection, "intermediate_projection")
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
