"""Teacher targets of letKD's KD layers, computed once before training and cached on disk.

Görgün, Gürbüz & Alatan, "Knowledge Distillation Layer that Lets the Student Decide", BMVC 2023
(https://huggingface.co/papers/2309.02843; official code adagorgun/letKD-framework, supplement Alg. 1 and 2). A KD
layer ([`hf_kd.KDLayer`]) scores each position of the student's features against `K` templates; its target is the
teacher's soft decision at the same position:

- **Penultimate location** ([`TemplateTargets`]): K-means (20 iterations, no PCA/whitening, every position of every
  training image) over the teacher's last-stage features gives `K` centres `rho_k` (default 4096);
  `p_T = softmax_k(-t ||F_T - rho_k||^2)` with `t = 1`.
- **Intermediate location** ([`SubclassTargets`]): an LDA fitted on the teacher's intermediate features (labels = the
  image's class), K-means with `S` (default 8) sub-classes per class on each class's projected features, then a
  score matrix `s_T[j, j'] = fraction of the features of sub-class j whose nearest of the S*C prototypes is j'`.
  Online, a position's target is the row of its nearest sub-class among the gold class's `S` (label-masked).

K-means runs in faiss (`faiss-cpu`, as the official code) or scikit-learn; faiss is the default because it is faster
here (`scripts/benchmarks/letkd_cost.py`). The LDA is scikit-learn's. Teacher and student positions are matched by
[`match_positions`]: feature maps of equal size as they are, a teacher map an integer multiple of the student's by
average pooling (the paper's heterogeneous pairs), anything else only with an explicit `resize`; tokens one to one,
padding excluded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from .options import KMeansBackend, LetKDTeacherResize, to_enum
from .teacher import load_verified_file, save_file_atomically, teacher_inputs

if TYPE_CHECKING:
    import datasets
    from torch import nn

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# K-means
# --------------------------------------------------------------------------------------------------------------------


def resolve_kmeans_backend(backend: KMeansBackend | str = "auto") -> KMeansBackend:
    """[`~hf_kd.options.KMeansBackend`] `"faiss"` or `"sklearn"` (given as the member or its string); `"auto"` is
    faiss when `faiss-cpu` is installed (`pip install hf_kd[letkd]`)."""
    backend = to_enum(KMeansBackend, backend, "kmeans backend")
    if backend is KMeansBackend.SKLEARN:
        return backend
    try:
        import faiss  # noqa: F401
    except ImportError:
        if backend is KMeansBackend.FAISS:
            raise ImportError("The faiss K-means backend needs faiss-cpu: pip install hf_kd[letkd]") from None
        logger.warning("faiss-cpu is not installed: K-means runs in scikit-learn (slower; pip install hf_kd[letkd]).")
        return KMeansBackend.SKLEARN
    return KMeansBackend.FAISS


def kmeans(
    features: np.ndarray, num_clusters: int, num_iterations: int = 20, seed: int = 0, backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's K-means from `num_clusters` random data points, on every row (no subsampling), as the official code.

    Args:
        features (`np.ndarray` of shape `(N, d)`): the points (converted to float32).
        num_clusters (`int`): `K`, at most `N`.
        num_iterations (`int`, *optional*, defaults to 20): Lloyd iterations (official: 20).
        seed (`int`, *optional*, defaults to 0): seed of the initial centres.
        backend (`str`, *optional*, defaults to `"auto"`): `"faiss"`, `"sklearn"` or `"auto"` (faiss when installed).

    Returns:
        `(centres, assignments)`: `(K, d)` float32 centres and the `(N,)` int64 index of each point's nearest centre.

    Raises:
        `ValueError`: `num_clusters` larger than the number of points, or not a positive integer.
    """
    features = np.ascontiguousarray(features, dtype=np.float32)
    num_points, dim = features.shape
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"The number of K-means clusters must be an integer >= 1, got {num_clusters!r}.")
    if num_clusters > num_points:
        raise ValueError(
            f"K-means with K={num_clusters} clusters needs at least {num_clusters} points, got {num_points}."
        )
    if resolve_kmeans_backend(backend) is KMeansBackend.FAISS:
        import faiss

        # No subsampling of the points (faiss would keep 256 per centroid) and no warning for few points per centre.
        km = faiss.Kmeans(
            dim, num_clusters, niter=num_iterations, seed=seed, max_points_per_centroid=num_points,
            min_points_per_centroid=1,
        )
        km.train(features)
        _, assignments = km.index.search(features, 1)
        return km.centroids.astype(np.float32), assignments[:, 0].astype(np.int64)
    from sklearn.cluster import KMeans

    km = KMeans(
        n_clusters=num_clusters, init="random", n_init=1, max_iter=num_iterations, tol=0.0, algorithm="lloyd",
        random_state=seed,
    ).fit(features)
    return km.cluster_centers_.astype(np.float32), km.labels_.astype(np.int64)


def _squared_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """`||x_i - c_k||^2` `(N, K)` for `x` `(N, d)` and `centres` `(K, d)`, expanded as the official code does
    (`|x|^2 + |c|^2 - 2 x c^T`, one fused matmul-add), without gradients."""
    squares = x.pow(2).sum(-1, keepdim=True) + centres.pow(2).sum(-1)  # (N, K)
    return torch.addmm(squares, x, centres.T, alpha=-2).clamp_min_(0)


# --------------------------------------------------------------------------------------------------------------------
# The two kinds of targets
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TemplateTargets:
    r"""Penultimate-location targets of letKD: soft assignments to K-means centres of the teacher's features.

    `p_T(f) = softmax_k(-temperature * ||f - codebook_k||^2)` for a teacher feature `f`.

    Args:
        codebook (`torch.Tensor` of shape `(K, d_T)`): the K-means centres (a frozen VQ codebook).
        temperature (`float`, *optional*, defaults to 1.0): `t` (official: 1).
    """

    codebook: torch.Tensor
    temperature: float = 1.0
    kind = "templates"

    @property
    def num_templates(self) -> int:
        return self.codebook.shape[0]

    @property
    def feature_size(self) -> int:
        return self.codebook.shape[1]

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher features `(N, d_T)` -> target distributions `(N, K)`, without gradients (labels are not used)."""
        codebook = self.codebook.to(features.device, torch.float32)
        return F.softmax(_squared_distances(features.float(), codebook).mul_(-self.temperature), dim=-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the cache stores."""
        return {"codebook": self.codebook}


@dataclass
class SubclassTargets:
    r"""Intermediate-location targets of letKD: the teacher's sub-class decisions (supplement Alg. 2).

    A feature `f` of a position of an image of class `y` is projected by the LDA, `z = (f - lda_mean) @ lda_scalings`;
    its sub-class is the nearest of the `S` centres of class `y`, `j* = y * S + argmin_s ||z - centres[y * S + s]||`;
    its target is `score_matrix[j*]`.

    Args:
        lda_mean (`torch.Tensor` of shape `(d_T,)`): the LDA's overall mean (`xbar_`).
        lda_scalings (`torch.Tensor` of shape `(d_T, m)`): its first `m` discriminant directions (`scalings_`).
        centres (`torch.Tensor` of shape `(C * S, m)`): the sub-class prototypes, class-major.
        score_matrix (`torch.Tensor` of shape `(C * S, C * S)`): rows are distributions.
        subclasses_per_class (`int`): `S`.
    """

    lda_mean: torch.Tensor
    lda_scalings: torch.Tensor
    centres: torch.Tensor
    score_matrix: torch.Tensor
    subclasses_per_class: int
    kind = "subclasses"

    @property
    def num_templates(self) -> int:
        return self.centres.shape[0]

    @property
    def num_classes(self) -> int:
        return self.centres.shape[0] // self.subclasses_per_class

    @property
    def feature_size(self) -> int:
        return self.lda_mean.shape[0]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """LDA projection `(N, d_T)` -> `(N, m)`."""
        mean, scalings = self.lda_mean.to(features.device, torch.float32), self.lda_scalings.to(features.device)
        return (features.float() - mean) @ scalings.float()

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher features `(N, d_T)` and each position's class `(N,)` -> target distributions `(N, C * S)`,
        without gradients."""
        if labels is None:
            raise ValueError("Intermediate (sub-class) KD layer targets need the class label of every position.")
        S = self.subclasses_per_class
        z = self.project(features)  # (N, m)
        centres = self.centres.to(z.device, torch.float32).view(self.num_classes, S, -1)[labels]  # (N, S, m)
        nearest = (z.unsqueeze(1) - centres).pow(2).sum(-1).argmin(-1)  # (N,)
        return self.score_matrix.to(z.device, torch.float32)[labels * S + nearest]

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the cache stores."""
        return {
            "lda_mean": self.lda_mean,
            "lda_scalings": self.lda_scalings,
            "centres": self.centres,
            "score_matrix": self.score_matrix,
        }


def fit_template_targets(
    features: np.ndarray,
    num_templates: int = 4096,
    temperature: float = 1.0,
    num_iterations: int = 20,
    seed: int = 0,
    backend: str = "auto",
) -> TemplateTargets:
    """K-means over the teacher's penultimate features `(N, d_T)` (one row per position) -> [`TemplateTargets`].

    Raises:
        `ValueError`: `num_templates` larger than the number of teacher features `N`.
    """
    if num_templates > len(features):
        raise ValueError(
            f"The penultimate KD layer has K={num_templates} templates but the teacher gave only {len(features)} "
            f"features (one per position per training example): K-means needs K <= {len(features)}. Use fewer "
            "templates (kd_layer_templates['penultimate']) or more training data."
        )
    centres, _ = kmeans(features, num_templates, num_iterations, seed, backend)
    return TemplateTargets(torch.from_numpy(centres), temperature)


def fit_subclass_targets(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    subclasses_per_class: int = 8,
    lda_components: int | None = None,
    num_iterations: int = 20,
    seed: int = 0,
    backend: str = "auto",
) -> SubclassTargets:
    """LDA, per-class K-means and the sub-class score matrix over the teacher's intermediate features.

    Args:
        features (`np.ndarray` of shape `(N, d_T)`): one row per position.
        labels (`np.ndarray` of shape `(N,)`): the class of each position's example, in `[0, num_classes)`.
        num_classes (`int`): `C`.
        subclasses_per_class (`int`, *optional*, defaults to 8): `S` (official `K_inter = 8`).
        lda_components (`int`, *optional*, defaults to `min(C - 1, d_T)`): LDA dimensions `m` (official: 60 for
            CIFAR-100, 8 for CIFAR-10).
        num_iterations, seed, backend: of [`kmeans`].

    Returns:
        [`SubclassTargets`] with `C * S` sub-classes.

    Raises:
        `ValueError`: a class with fewer than `S` features (or none), or `lda_components` out of `[1, min(C - 1, d_T)]`.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    features = np.ascontiguousarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got {labels.max()}.")
    short = [c for c in range(num_classes) if counts[c] < subclasses_per_class]
    if short:
        raise ValueError(
            f"The intermediate KD layer has S={subclasses_per_class} sub-classes per class but class(es) {short[:10]} "
            f"have only {[int(counts[c]) for c in short[:10]]} teacher features: per-class K-means needs at least S "
            "features per class. Use fewer sub-classes (kd_layer_templates['intermediate'] = S * num_classes) or "
            "more training data."
        )
    max_components = min(num_classes - 1, features.shape[1])
    lda_components = max_components if lda_components is None else lda_components
    if isinstance(lda_components, bool) or not isinstance(lda_components, int) or not (
        1 <= lda_components <= max_components
    ):
        raise ValueError(
            f"lda_components must be an integer in [1, {max_components}] (min(num_classes - 1, feature size)), got "
            f"{lda_components!r}."
        )
    lda = LinearDiscriminantAnalysis(n_components=lda_components).fit(features, labels)
    scalings = lda.scalings_[:, :lda_components].astype(np.float32)
    mean = lda.xbar_.astype(np.float32)
    projected = (features - mean) @ scalings  # (N, m)

    S = subclasses_per_class
    centres = np.empty((num_classes * S, lda_components), dtype=np.float32)
    subclass = np.empty(len(labels), dtype=np.int64)
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        centres[c * S : (c + 1) * S], assignment = kmeans(projected[rows], S, num_iterations, seed + c, backend)
        subclass[rows] = c * S + assignment
    nearest = np.empty(len(labels), dtype=np.int64)
    centres_t = torch.from_numpy(centres)
    for start in range(0, len(labels), 65536):  # chunks: N x C*S distances at once could be large
        chunk = torch.from_numpy(projected[start : start + 65536])
        nearest[start : start + len(chunk)] = _squared_distances(chunk, centres_t).argmin(-1).numpy()
    pairs = np.bincount(subclass * (num_classes * S) + nearest, minlength=(num_classes * S) ** 2)
    pairs = pairs.reshape(num_classes * S, num_classes * S).astype(np.float64)
    score_matrix = pairs / pairs.sum(1, keepdims=True)  # K-means leaves no sub-class empty
    return SubclassTargets(
        torch.from_numpy(mean),
        torch.from_numpy(scalings),
        centres_t,
        torch.from_numpy(score_matrix.astype(np.float32)),
        S,
    )


# --------------------------------------------------------------------------------------------------------------------
# Teacher features and position matching
# --------------------------------------------------------------------------------------------------------------------


def match_positions(
    teacher_features: torch.Tensor,
    student_shape: tuple[int, ...],
    attention_mask: torch.Tensor | None = None,
    resize: str | None = None,
    location: str = "penultimate",
) -> torch.Tensor:
    """The teacher's features at the student's positions, one row per position `(N, d_T)`, in the order of the
    student's KD layer scores.

    Args:
        teacher_features (`torch.Tensor`): `(batch, d_T, H_T, W_T)` feature maps or `(batch, L, d_T)` token states.
        student_shape (`tuple[int, ...]`): shape of the student's features at the same location,
            `(batch, d_S, H_S, W_S)` or `(batch, L, d_S)`. Channels may differ: the KD layer maps the student's
            `d_S` channels to the templates, whatever `d_T`.
        attention_mask (`torch.Tensor` of shape `(batch, L)`, *optional*): for tokens, the positions that count.
        resize ([`~hf_kd.options.LetKDTeacherResize`] or `str`, *optional*): how a teacher map of another size reaches
            the student's:
            - `None` (default, the paper): equal sizes as they are; a teacher map an integer multiple of the student's
              is average-pooled by that factor; anything else is an error;
            - `"adaptive_avg_pool"`: `adaptive_avg_pool2d` to the student's size;
            - `"bilinear"`: bilinear interpolation to the student's size.
        location (`str`): for error messages.

    Raises:
        `ValueError`: incompatible sizes without a `resize` that allows them, token counts that differ, or a teacher
        and a student whose features are of different kinds.
    """
    resize = to_enum(LetKDTeacherResize, resize, "resize", allow_none=True)
    if teacher_features.dim() != len(student_shape) or teacher_features.dim() not in (3, 4):
        raise ValueError(
            f"At the {location} location the teacher gives features of shape {tuple(teacher_features.shape)} and the "
            f"student {tuple(student_shape)}: both must be feature maps (batch, channels, height, width) or both "
            "token states (batch, seq_len, hidden)."
        )
    if teacher_features.shape[0] != student_shape[0]:
        raise ValueError(f"Teacher and student batch sizes differ: {teacher_features.shape[0]} vs {student_shape[0]}.")
    if teacher_features.dim() == 3:
        if teacher_features.shape[1] != student_shape[1]:
            raise ValueError(
                f"At the {location} location the teacher has {teacher_features.shape[1]} token positions and the "
                f"student {student_shape[1]}: per-token KD layers need teacher and student to read the same tokens "
                "(the same tokenizer, or a one-to-one id map)."
            )
        if attention_mask is None:
            return teacher_features.reshape(-1, teacher_features.shape[-1])
        return teacher_features[attention_mask != 0]  # (num_tokens, d_T)
    (height, width), (student_height, student_width) = teacher_features.shape[2:], student_shape[2:]
    if (height, width) != (student_height, student_width):
        if resize is LetKDTeacherResize.ADAPTIVE_AVG_POOL:
            teacher_features = F.adaptive_avg_pool2d(teacher_features, (student_height, student_width))
        elif resize is LetKDTeacherResize.BILINEAR:
            teacher_features = F.interpolate(
                teacher_features, size=(student_height, student_width), mode="bilinear", align_corners=False
            )
        elif height % student_height == 0 and width % student_width == 0:
            teacher_features = F.avg_pool2d(teacher_features, (height // student_height, width // student_width))
        else:
            raise ValueError(
                f"At the {location} location the teacher's feature map is {height}x{width} and the student's "
                f"{student_height}x{student_width}: without a configured projection the teacher map must have the "
                "student's size or an integer multiple of it (average-pooled, as the paper). Set "
                "letkd_teacher_resize='adaptive_avg_pool' or 'bilinear' to resize it, or pick another location."
            )
    return teacher_features.permute(0, 2, 3, 1).reshape(-1, teacher_features.shape[1])  # (B*H*W, d_T)


def position_labels(labels: torch.Tensor, student_shape: tuple[int, ...], attention_mask=None) -> torch.Tensor:
    """Each position's class (its example's label), in the order of [`match_positions`]."""
    if len(student_shape) == 4:
        return labels.repeat_interleave(student_shape[2] * student_shape[3])
    expanded = labels[:, None].expand(student_shape[:2])
    return expanded.reshape(-1) if attention_mask is None else expanded[attention_mask != 0]


def accepts_kd_features(teacher: nn.Module) -> bool:
    """Whether the teacher is an hf_kd KD-layer model, which names its features by location (`kd_features`)."""
    import inspect

    model = getattr(teacher, "module", teacher)
    return "output_kd_features" in inspect.signature(model.forward).parameters


@torch.no_grad()
def teacher_features_for_batch(
    teacher: nn.Module,
    inputs: dict[str, Any],
    teacher_layers: dict[str, int] | None,
    locations: tuple[str, ...],
    token_id_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One frozen-teacher forward: its logits `(batch, num_labels)` and its features at each location.

    With `teacher_layers=None` the teacher must be an hf_kd KD-layer model and its `kd_features` are used; otherwise
    `teacher_layers[location]` indexes its `hidden_states` (e.g. `-1`, the last layer or stage).
    """
    batch = teacher_inputs(inputs, teacher, token_id_map)
    if teacher_layers is None:
        out = teacher(**batch, output_kd_features=True)
        return out.logits, {location: out.kd_features[location] for location in locations}
    out = teacher(**batch, output_hidden_states=True)
    hidden_states = out.hidden_states
    for location in locations:
        if not -len(hidden_states) <= teacher_layers[location] < len(hidden_states):
            raise ValueError(
                f"letkd_teacher_layers[{location!r}]={teacher_layers[location]} is out of range: the teacher returns "
                f"{len(hidden_states)} hidden states (valid indices {-len(hidden_states)}..{len(hidden_states) - 1})."
            )
    return out.logits, {location: hidden_states[teacher_layers[location]] for location in locations}


@torch.no_grad()
def collect_teacher_features(
    teacher: nn.Module,
    dataset: datasets.Dataset,
    collator,
    locations: tuple[str, ...],
    student_shapes: dict[str, tuple[int, ...]],
    teacher_layers: dict[str, int] | None = None,
    resize: str | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    token_id_map: torch.Tensor | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run the frozen teacher over `dataset` (in order, without gradients) and keep its features at the student's
    positions ([`match_positions`]).

    Args:
        teacher (`nn.Module`): the frozen teacher.
        dataset (`datasets.Dataset`): the train set, with teacher inputs and a `labels` (or `label`) column.
        collator: the trainer's data collator.
        locations (`tuple[str, ...]`): the KD layer locations to collect.
        student_shapes (`dict[str, tuple[int, ...]]`): per location, the shape of one example's student features:
            `(C, H, W)` for maps (a teacher map is pooled to `H x W`), `(hidden,)` for tokens (every real token).
        teacher_layers, token_id_map: of [`teacher_features_for_batch`].
        resize: of [`match_positions`].
        batch_size (`int`, *optional*, defaults to 256) and device: of the teacher passes.

    Returns:
        `({location: (N, d_T) float32 array}, {location: (N,) int64 array})`: one row per position of the student at
        that location, and the class of that position's example.
    """
    from tqdm.auto import tqdm

    from .teacher import TEACHER_INPUT_NAMES

    label_column = next((c for c in ("labels", "label") if c in dataset.column_names), None)
    if label_column is None:
        raise ValueError(f"letKD targets need a 'labels' or 'label' column; the train set has {dataset.column_names}.")
    rows = dataset.select_columns([c for c in TEACHER_INPUT_NAMES if c in dataset.column_names] + [label_column])
    features = {location: [] for location in locations}
    labels = {location: [] for location in locations}
    for start in tqdm(range(0, len(rows), batch_size), desc="Teacher features", unit="batch", leave=False):
        batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        batch_labels = batch.pop("labels")
        mask = batch.get("attention_mask")
        _, teacher_features = teacher_features_for_batch(teacher, batch, teacher_layers, locations, token_id_map)
        for location in locations:
            feats = teacher_features[location]
            # Maps: the student's size; tokens: this batch's length (teacher and student read the same tokens).
            per_example = tuple(student_shapes[location]) if feats.dim() == 4 else (feats.shape[1], -1)
            shape = (len(feats),) + per_example
            features[location].append(match_positions(feats, shape, mask, resize, location).float().cpu().numpy())
            labels[location].append(position_labels(batch_labels, shape, mask).cpu().numpy())
    return (
        {location: np.concatenate(chunks) for location, chunks in features.items()},
        {location: np.concatenate(chunks) for location, chunks in labels.items()},
    )


# --------------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------------


def default_targets_cache_dir() -> Path:
    """`$HF_HOME/hf_kd/kd_layer_targets` (beside the teacher logits cache)."""
    from .teacher import default_cache_dir

    return default_cache_dir().parent / "kd_layer_targets"


class KDLayerTargetsCache:
    """letKD targets stored on disk, one file per (teacher, data, location, settings) key.

    The key hashes the teacher fingerprint ([`hf_kd.teacher.teacher_fingerprint`], weights and config), the data
    fingerprint ([`hf_kd.teacher.dataset_fingerprint`] of the teacher inputs, plus the labels for the intermediate
    location) and every setting the fit depends on (`settings`: location, K or S, LDA size, K-means iterations,
    seed and backend, teacher layer, resize and the student's map size, the token id map). A run that finds its file
    skips the teacher pass and the clustering.

    Args:
        cache_dir (`str` or `Path`, *optional*, defaults to [`default_targets_cache_dir`]).
        teacher_key (`str`): the teacher's fingerprint.
    """

    def __init__(self, cache_dir: str | os.PathLike | None, teacher_key: str):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_targets_cache_dir()
        self.teacher_key = teacher_key

    def path_for(self, data_key: str, settings: dict[str, Any]) -> Path:
        blob = json.dumps({"teacher": self.teacher_key, "data": data_key, "settings": settings}, sort_keys=True)
        return self.cache_dir / f"{hashlib.sha256(blob.encode()).hexdigest()[:32]}.safetensors"

    def load(
        self, path: Path, temperature: float = 1.0, settings: dict[str, Any] | None = None
    ) -> TemplateTargets | SubclassTargets | None:
        """
        The cached targets, `None` if the file is absent.

        The file is checked first ([`hf_kd.teacher.load_verified_file`]): readable in full, its tensors match its
        `sha256` checksum, it was written for this teacher and, when `settings` are given, for these settings; and
        the tensors' shapes fit together (and `settings["templates"]`). Any failure is a `ValueError` naming the file
        and saying to delete it: a bad file is never used.
        """
        if not path.exists():
            return None
        expected = {"teacher": self.teacher_key}
        if settings is not None:
            expected["settings"] = json.dumps(settings, sort_keys=True)
        tensors, metadata = load_verified_file(path, "KD layer targets cache", expected)
        try:
            if metadata.get("kind") == TemplateTargets.kind:
                targets = TemplateTargets(tensors["codebook"], temperature)
                shapes_fit = targets.codebook.dim() == 2
            elif metadata.get("kind") == SubclassTargets.kind:
                targets = SubclassTargets(**tensors, subclasses_per_class=int(metadata["subclasses_per_class"]))
                n, m = targets.centres.shape
                shapes_fit = (
                    targets.lda_scalings.shape == (targets.feature_size, m)
                    and targets.score_matrix.shape == (n, n)
                    and n % targets.subclasses_per_class == 0
                )
            else:
                raise KeyError(f"kind={metadata.get('kind')!r}")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"The KD layer targets cache file {path} is unreadable ({type(err).__name__}: {err}). It was not used; "
                "delete it to recompute it."
            ) from err
        if settings is not None and settings.get("templates") not in (None, targets.num_templates):
            shapes_fit = False
        if not shapes_fit or not all(torch.isfinite(t).all() for t in tensors.values()):
            raise ValueError(
                f"The KD layer targets cache file {path} holds tensors of inconsistent shapes or non-finite values "
                f"({ {k: tuple(v.shape) for k, v in tensors.items()} }). It was not used; delete it to recompute it."
            )
        return targets

    def save(self, path: Path, targets: TemplateTargets | SubclassTargets, settings: dict[str, Any]) -> None:
        metadata = {"kind": targets.kind, "teacher": self.teacher_key, "settings": json.dumps(settings, sort_keys=True)}
        if isinstance(targets, SubclassTargets):
            metadata["subclasses_per_class"] = str(targets.subclasses_per_class)
        save_file_atomically({k: v.float() for k, v in targets.tensors().items()}, path, metadata)


def fit_targets(
    features: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    num_templates: dict[str, int],
    num_classes: int,
    temperature: float = 1.0,
    lda_components: int | None = None,
    num_iterations: int = 20,
    seed: int = 0,
    backend: str = "auto",
) -> dict[str, TemplateTargets | SubclassTargets]:
    """Fit the targets of every location from collected teacher features and labels ([`collect_teacher_features`]).

    `num_templates["penultimate"]` is `K` ([`fit_template_targets`]); `num_templates["intermediate"]` is
    `S * num_classes` and must be a multiple of `num_classes` ([`fit_subclass_targets`]).
    """
    targets = {}
    for location, feats in features.items():
        if location == "penultimate":
            targets[location] = fit_template_targets(
                feats, num_templates[location], temperature, num_iterations, seed, backend
            )
        else:
            targets[location] = fit_subclass_targets(
                feats, labels[location], num_classes, subclasses_per_class(num_templates[location], num_classes),
                lda_components, num_iterations, seed, backend,
            )
    return targets


def subclasses_per_class(num_templates: int, num_classes: int) -> int:
    """`S = K_inter / C` for an intermediate KD layer of `K_inter` templates; an error unless `C` divides it."""
    if num_templates % num_classes:
        raise ValueError(
            f"The intermediate KD layer's templates are sub-classes, S per class: its {num_templates} templates must "
            f"be a multiple of the {num_classes} classes (letKD: 8 per class, {8 * num_classes})."
        )
    return num_templates // num_classes


__all__ = [
    "KDLayerTargetsCache",
    "SubclassTargets",
    "TemplateTargets",
    "accepts_kd_features",
    "collect_teacher_features",
    "default_targets_cache_dir",
    "fit_subclass_targets",
    "fit_targets",
    "fit_template_targets",
    "kmeans",
    "match_positions",
    "position_labels",
    "resolve_kmeans_backend",
    "subclasses_per_class",
    "teacher_features_for_batch",
]
