"""`_LetKDArguments`: the letKD fields of [`DistillConfig`] (KD layers supervised by the teacher's decisions).

Görgün, Gürbüz & Alatan, "Knowledge Distillation Layer that Lets the Student Decide", BMVC 2023
(https://huggingface.co/papers/2309.02843). A plain dataclass listed after `TrainingArguments` in the config's bases,
like `_TeacherArguments`; the config calls [`~_LetKDArguments._letkd_post_init`] from its `__post_init__`.
"""

import json
from dataclasses import dataclass, field

from ..kd_layer_targets import KMEANS_BACKENDS, TEACHER_RESIZES


@dataclass
class _LetKDArguments:
    # Parameters that control letKD (KD layers)
    letkd: int = field(
        default=0,
        metadata={
            "help": "letKD variant: 0 (off), 1 (letKD-1: the student's penultimate KD layer) or 2 (letKD-2: "
            "intermediate + penultimate KD layers). The student must have KD layers there."
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
        default="auto", metadata={"help": "K-means backend: 'faiss', 'sklearn' or 'auto' (faiss when installed)."}
    )
    letkd_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Directory of the cached KD layer targets (default $HF_HOME/hf_kd/kd_layer_targets)."},
    )

    def _letkd_post_init(self) -> None:
        if isinstance(self.letkd_teacher_layers, str):  # HfArgumentParser hands dicts over as JSON strings
            self.letkd_teacher_layers = json.loads(self.letkd_teacher_layers)
        if self.letkd not in (0, 1, 2) or isinstance(self.letkd, bool):
            raise ValueError(f"letkd must be 0 (off), 1 (letKD-1) or 2 (letKD-2), got {self.letkd!r}")
        for name in ("letkd_penultimate_weight", "letkd_intermediate_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.letkd_temperature > 0:
            raise ValueError(f"letkd_temperature must be > 0, got {self.letkd_temperature}")
        if self.letkd_teacher_resize not in TEACHER_RESIZES:
            raise ValueError(f"letkd_teacher_resize must be one of {TEACHER_RESIZES}, got {self.letkd_teacher_resize!r}")
        if self.letkd_kmeans_backend not in KMEANS_BACKENDS:
            raise ValueError(f"letkd_kmeans_backend must be one of {KMEANS_BACKENDS}, got {self.letkd_kmeans_backend!r}")
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
