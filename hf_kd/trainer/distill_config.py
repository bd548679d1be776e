from dataclasses import dataclass, field

from transformers import TrainingArguments

from .intermediate_config import _IntermediateArguments
from .letkd_config import _LetKDArguments
from .teacher_config import _TeacherArguments


@dataclass
class DistillConfig(TrainingArguments, _TeacherArguments, _IntermediateArguments, _LetKDArguments):
    r"""
    Configuration of [`DistillTrainer`]: teacher-to-student knowledge distillation (Hinton et al., 2015,
    https://huggingface.co/papers/1503.02531) on top of [`~transformers.TrainingArguments`].

    The student minimises `alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(y, z_s)`
    ([`hf_kd.losses.kd_loss`]). The same trainer runs every training mode of Sultan (2023,
    https://huggingface.co/papers/2301.12609): KD (big teacher, small student), self-KD (same architecture) and reverse
    KD (small teacher, big student); only the teacher/student pair changes.

    > Parameters that control the teacher

    Args:
        teacher_model_name_or_path (`str`, *optional*):
            Hub id or local folder of the teacher, loaded with `AutoModelForSequenceClassification`. Ignored when a
            teacher model is passed to the trainer.
        teacher_model_init_kwargs (`dict`, *optional*):
            Keyword arguments for the teacher's `from_pretrained` (e.g. `{"torch_dtype": "bfloat16"}`).
        map_teacher_token_ids (`bool`, *optional*, defaults to `False`):
            Map student token ids to teacher token ids by token string, for a teacher whose vocabulary holds the
            student's tokens under other ids (an MPNet teacher for a BERT/MiniLM student). Without it a vocabulary
            mismatch is an error before training.
        teacher_from_base_model (`bool`, *optional*, defaults to `False`):
            Self-distillation of a PEFT student: the teacher is the student's own base model, i.e. the student with
            its adapters (and its `modules_to_save` copies) disabled. No second copy of the weights and nothing to
            load. Needs a PEFT student (`peft_config=` or a `PeftModel`) and no other teacher.
        teacher_zero_stage (`int`, *optional*, defaults to `3`):
            ZeRO stage of the teacher in a DeepSpeed run, whatever the student's stage: `3` shards its weights over
            the processes (initialised for inference by DeepSpeed), `0` keeps a full copy on each process (no
            all-gather per forward: faster for a small teacher). Ignored without DeepSpeed.

    > Parameters that control the loss

    Args:
        temperature (`float`, *optional*, defaults to `2.0`):
            Softmax temperature `T` of the soft targets; the soft term is scaled by `T^2`.
        alpha (`float`, *optional*, defaults to `0.5`):
            Weight of the soft (teacher) term in `[0, 1]`; `1 - alpha` weighs the cross-entropy with the labels.

    > Parameters that control the teacher logits cache

    Args:
        cache_teacher_logits (`bool`, *optional*, defaults to `False`):
            Run the teacher once over each dataset, store its logits on disk (keyed by teacher weights and data) and
            train from them: later epochs and later runs never load the teacher. A dataset that already has a
            `teacher_logits` column is used as is, cache or not.
        teacher_logits_cache_dir (`str`, *optional*):
            Where cached logits live. Defaults to `$HF_HOME/hf_kd/teacher_logits`.

    > Parameters that control intermediate-layer (TinyBERT) distillation

    TinyBERT (Jiao et al., 2020, https://huggingface.co/papers/1909.10351) adds MSE losses between the student's and
    the teacher's embedding outputs, layer outputs (through a learned projection to the teacher's width) and
    pre-softmax attention scores ([`hf_kd.intermediate_distillation`]). The loss is then
    `prediction_loss_weight * kd_loss + embedding_loss_weight * L_embd + hidden_loss_weight * L_hidn +
    attention_loss_weight * L_attn`. They need a live teacher (not `cache_teacher_logits`). TinyBERT's two stages are
    two runs: `hidden_loss_weight=attention_loss_weight=embedding_loss_weight=1, prediction_loss_weight=0`, then the
    defaults (recipe: `trainers/configs/tinybert_*`).

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
            ([`hf_kd.intermediate_distillation.uniform_layer_map`]: 6 -> 3 layers gives `[2, 4, 6]`). Entries out of
            `[1, teacher layers]` are an error when the trainer is built.
        intermediate_projection (`str`, *optional*, defaults to `"linear"`):
            `"linear"` (learned, shared by all layers, identity-initialised for equal widths) or `"identity"`. The
            projection is trained by the trainer's optimizer and saved beside the student as
            `intermediate_projection.safetensors`, not inside it.

    > Parameters that control letKD, KD layers that let the student decide (Görgün et al., 2023,
      https://huggingface.co/papers/2309.02843; the student must be an hf_kd KD-layer model)

    Args:
        letkd (`int`, *optional*, defaults to `0`):
            `1` (letKD-1): train the student's penultimate KD layer on the teacher's K-means assignments; `2`
            (letKD-2): also its intermediate KD layer on the teacher's sub-class decisions; `0`: off. The targets are
            fitted on the train set once and cached (`hf_kd.kd_layer_targets`); the loss becomes
            `kd_loss + letkd_penultimate_weight * L_pen + letkd_intermediate_weight * L_inter` (the paper: `alpha=0`).
        letkd_penultimate_weight, letkd_intermediate_weight (`float`, *optional*, defaults to `1.0`): `a_pen`, `a_inter`.
        letkd_teacher_layers (`dict[str, int]`, *optional*):
            Index of the teacher's `hidden_states` at each location. Defaults to an hf_kd KD-layer teacher's own
            locations, else `{"penultimate": -1}` (the intermediate index must then be given).
        letkd_teacher_resize (`str`, *optional*):
            `None` (teacher maps of the student's size, or an integer multiple average-pooled), `"adaptive_avg_pool"`
            or `"bilinear"` for other sizes.
        letkd_temperature (`float`, *optional*, defaults to `1.0`): `t` of `softmax(-t ||F_T - rho_k||^2)`.
        letkd_lda_components (`int`, *optional*): LDA dimensions (default `min(num_labels - 1, d_T)`).
        letkd_kmeans_iterations (`int`, *optional*, defaults to `20`), letkd_kmeans_seed (`int`, *optional*, defaults
            to `0`; not the run's seed, so students of every seed share the targets), letkd_kmeans_backend (`str`,
            *optional*, defaults to `"auto"`: faiss when installed, else scikit-learn).
        letkd_cache_dir (`str`, *optional*): where targets are cached (`$HF_HOME/hf_kd/kd_layer_targets`).

    Example:

    ```python
    >>> from hf_kd import DistillConfig
    >>> args = DistillConfig(output_dir="student", teacher_model_name_or_path="my-org/minilm-l6-rt", temperature=2.0)
    >>> stage1 = DistillConfig(output_dir="stage1", hidden_loss_weight=1.0, attention_loss_weight=1.0,
    ...                        embedding_loss_weight=1.0, prediction_loss_weight=0.0)
    ```
    """

    # The teacher and teacher logits cache fields come from _TeacherArguments.

    # Parameters that control the loss
    temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature T of the soft targets (> 0); soft term scaled by T^2."}
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight in [0, 1] of the soft teacher term; 1 - alpha weighs cross-entropy with the labels."},
    )

    def __post_init__(self):
        super().__post_init__()
        self._teacher_post_init()
        self._intermediate_post_init()
        self._letkd_post_init()
        if self.letkd and self.uses_intermediate_losses:
            raise ValueError(
                f"letkd={self.letkd} and the TinyBERT intermediate losses (hidden/attention/embedding_loss_weight) are "
                "two kinds of feature distillation for different students: use one of them (set letkd=0 or the "
                "intermediate weights to 0)."
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0.0, 1.0], got {self.alpha}")
        if self.label_smoothing_factor != 0:
            raise ValueError(
                f"label_smoothing_factor={self.label_smoothing_factor} is not used by DistillTrainer: the teacher's "
                "soft targets take its place. For the label smoothing baseline train with transformers.Trainer and "
                "TrainingArguments(label_smoothing_factor=...) (recipe: trainers/distill.py --method ls)."
            )
