import json
from dataclasses import dataclass, field

from ..options import KMeansBackend, LetKDTeacherResize, to_enum
from .distill_config import DistillConfig


@dataclass
class LetKDConfig(DistillConfig):
    r"""
    Configuration of [`LetKDTrainer`]: letKD, KD layers that let the student decide (Görgün, Gürbüz & Alatan, BMVC
    2023, https://huggingface.co/papers/2309.02843), on top of [`DistillConfig`] (every teacher, cache and loss field
    of which applies). The student must be an hf_kd KD-layer model ([`hf_kd.KDLayerForImageClassification`],
    [`hf_kd.KDLayerForSequenceClassification`]).

    The student's KD layers are trained on the teacher's decisions: targets fitted on the train set once and cached
    ([`hf_kd.kd_layer_targets`]). The loss is
    `kd_loss + letkd_penultimate_weight * L_pen + letkd_intermediate_weight * L_inter` (the paper: `alpha=0`, so that
    `kd_loss` is the cross-entropy).

    > Parameters that control letKD

    Args:
        letkd (`int`, *optional*, defaults to `1`):
            `1` (letKD-1): train the student's penultimate KD layer on the teacher's K-means assignments; `2`
            (letKD-2): also its intermediate KD layer on the teacher's sub-class decisions.
        letkd_penultimate_weight (`float`, *optional*, defaults to `1.0`):
            `a_pen`, the weight of the penultimate KD layer loss.
        letkd_intermediate_weight (`float`, *optional*, defaults to `1.0`):
            `a_inter`, the weight of the intermediate KD layer loss (letKD-2).
        letkd_teacher_layers (`dict[str, int]`, *optional*):
            Index of the teacher's `hidden_states` at each location. Defaults to an hf_kd KD-layer teacher's own
            locations, else `{"penultimate": -1}` (the intermediate index must then be given).
        letkd_teacher_resize (`str` or [`LetKDTeacherResize`], *optional*):
            `None` (teacher maps of the student's size, or an integer multiple average-pooled), `"adaptive_avg_pool"`
            or `"bilinear"` for other sizes.
        letkd_temperature (`float`, *optional*, defaults to `1.0`):
            `t` of `softmax(-t ||F_T - rho_k||^2)`.
        letkd_lda_components (`int`, *optional*):
            LDA dimensions (default `min(num_labels - 1, d_T)`).
        letkd_kmeans_iterations (`int`, *optional*, defaults to `20`):
            K-means iterations.
        letkd_kmeans_seed (`int`, *optional*, defaults to `0`):
            Seed of the K-means initialisation; not the run's seed, so students of every seed share the targets.
        letkd_kmeans_backend (`str` or [`KMeansBackend`], *optional*, defaults to `"auto"`):
            faiss when installed, else scikit-learn.
        letkd_cache_dir (`str`, *optional*):
            Where targets are cached (`$HF_HOME/hf_kd/kd_layer_targets`).

    Example:

    ```python
    >>> from hf_kd import LetKDConfig
    >>> args = LetKDConfig(output_dir="letkd2", teacher_model_name_or_path="my-org/cnn-teacher", letkd=2, alpha=0.0)
    ```
    """

    # Parameters that control letKD (KD layers)
    letkd: int = field(
        default=1,
        metadata={
            "help": "letKD variant: 1 (letKD-1: the student's penultimate KD layer) or 2 (letKD-2: intermediate + "
            "penultimate KD layers). The student must have KD layers there."
        },
    )
    letkd_penultimate_weight: float = field(
        default=1.0, metadata={"help": "Weight a_pen of the penultimate KD layer loss (paper: 1.0)."}
    )
    letkd_intermediate_weight: float = field(
        default=1.0, metadata={"help": "Weight a_inter of the intermediate KD layer loss (paper: 1.0)."}
    )
    letkd_teacher_layers: dict[str, int] | str | None = field(
        default=None,
        metadata={
            "help": "Teacher hidden_states index per location, e.g. {\"penultimate\": -1, \"intermediate\": 4} (dict "
            "or JSON). Default: an hf_kd KD-layer teacher's own locations; other teachers: penultimate = -1."
        },
    )
    letkd_teacher_resize: str | None = field(
        default=None,
        metadata={
            "help": "How a teacher feature map of another size reaches the student's: None (equal sizes, or integer "
            "multiples average-pooled, as the paper), 'adaptive_avg_pool' or 'bilinear'."
        },
    )
    letkd_temperature: float = field(
        default=1.0, metadata={"help": "t in p_T = softmax(-t ||F_T - rho_k||^2) (paper: 1.0)."}
    )
    letkd_lda_components: int | None = field(
        default=None, metadata={"help": "LDA dimensions of the intermediate targets (default min(num_labels - 1, d_T))."}
    )
    letkd_kmeans_iterations: int = field(default=20, metadata={"help": "K-means iterations (paper: 20)."})
    letkd_kmeans_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the K-means initialisation. Not the run's seed: the targets depend on teacher and data "
            "only, so students of every seed share them (the paper ships one codebook per teacher)."
        },
    )
    letkd_kmeans_backend: str = field(
        default="auto",
        metadata={
            "help": "K-means backend: 'faiss', 'sklearn' or 'auto' (faiss when installed).",
            "choices": [backend.value for backend in KMeansBackend],
        },
    )
    letkd_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Directory of the cached KD layer targets (default $HF_HOME/hf_kd/kd_layer_targets)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.letkd_teacher_layers, str):  # HfArgumentParser hands dicts over as JSON strings
            self.letkd_teacher_layers = json.loads(self.letkd_teacher_layers)
        if self.letkd not in (1, 2) or isinstance(self.letkd, bool):
            raise ValueError(
                f"letkd must be 1 (letKD-1) or 2 (letKD-2), got {self.letkd!r} (plain KD without KD layers: "
                "DistillConfig and DistillTrainer)"
            )
        for name in ("letkd_penultimate_weight", "letkd_intermediate_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.letkd_temperature > 0:
            raise ValueError(f"letkd_temperature must be > 0, got {self.letkd_temperature}")
        self.letkd_teacher_resize = to_enum(
            LetKDTeacherResize, self.letkd_teacher_resize, "letkd_teacher_resize", allow_none=True
        )
        self.letkd_kmeans_backend = to_enum(KMeansBackend, self.letkd_kmeans_backend, "letkd_kmeans_backend")
        if not isinstance(self.letkd_kmeans_iterations, int) or self.letkd_kmeans_iterations < 1:
            raise ValueError(f"letkd_kmeans_iterations must be an integer >= 1, got {self.letkd_kmeans_iterations!r}")
        layers = self.letkd_teacher_layers
        if layers is not None:
            if not isinstance(layers, dict) or any(
                k not in ("intermediate", "penultimate") or isinstance(v, bool) or not isinstance(v, int)
                for k, v in layers.items()
            ):
                raise ValueError(
                    "letkd_teacher_layers must map 'penultimate' / 'intermediate' to hidden_states indices (ints), "
                    f"got {layers!r}"
                )
