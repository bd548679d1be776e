"""`LetKDTrainer`: letKD's KD-layer losses on top of [`DistillTrainer`] (Görgün et al., BMVC 2023,
https://huggingface.co/papers/2309.02843); the targets' math lives in [`hf_kd.kd_layer_targets`]."""

from __future__ import annotations

from typing import Any

import torch

from ..kd_layer_targets import (
    KDLayerTargetsCache,
    accepts_kd_features,
    collect_teacher_features,
    fit_targets,
    match_positions,
    position_labels,
    resolve_kmeans_backend,
    subclasses_per_class,
    teacher_features_for_batch,
)
from ..losses import kd_layer_loss
from ..teacher import TEACHER_INPUT_NAMES, TEACHER_LOGITS_COLUMN, dataset_fingerprint, teacher_fingerprint
from .distill_trainer import DistillTrainer
from .letkd_config import LetKDConfig

LETKD_LOCATIONS = {1: ("penultimate",), 2: ("intermediate", "penultimate")}


class LetKDTrainer(DistillTrainer):
    r"""
    [`DistillTrainer`] with letKD, KD layers that let the student decide (Görgün, Gürbüz & Alatan, BMVC 2023,
    https://huggingface.co/papers/2309.02843).

    The student is an hf_kd KD-layer model ([`hf_kd.KDLayerForImageClassification`], or
    [`hf_kd.KDLayerForSequenceClassification.from_backbone`]) whose KD layers score each position's features against
    learned templates. Before training, the teacher's targets are fitted once on the train set and cached
    ([`hf_kd.kd_layer_targets`]: K-means templates of its penultimate features, for letKD-2 also sub-classes of each
    class from LDA-projected intermediate features); at every step the frozen teacher's features give each position's
    target distribution `p_T = softmax(-t ||F_T - rho_k||^2)` and the student's KD layers are pulled towards it:

    `L = kd_loss + a_pen * KL(p_T || softmax(s_pen)) + a_inter * KL(p_T^inter || softmax(s_inter))`

    ([`hf_kd.losses.kd_layer_loss`]). With `alpha=0`, `kd_loss` is the cross-entropy: the paper's
    `L = CE + L_pen (+ L_inter)`. The KD layer losses are logged as `letkd_penultimate_loss` and
    `letkd_intermediate_loss`. The teacher runs live (one forward per step gives both its features and its logits).

    Args:
        model (`nn.Module`):
            The student, an hf_kd KD-layer model with KD layers at every location `args.letkd` trains.
        args ([`LetKDConfig`]):
            Training, distillation and letKD arguments.
        train_dataset (`datasets.Dataset`):
            Labelled training data (the targets are fitted on it before training).

        The other arguments are those of [`DistillTrainer`].

    Example:

    ```python
    >>> from hf_kd import KDLayerForImageClassification, LetKDConfig, LetKDTrainer
    >>> args = LetKDConfig(output_dir="letkd2", letkd=2, alpha=0.0)
    >>> trainer = LetKDTrainer(model=student, args=args, teacher_model=teacher, train_dataset=train)
    >>> trainer.train()
    ```
    """

    _tag_names = ["hf_kd", "distillation", "letkd"]
    _name = "letKD"
    _config_class = LetKDConfig
    _paper = {
        "title": "Knowledge Distillation Layer that Lets the Student Decide",
        "id": "2309.02843",
        "citation": (
            "@inproceedings{gorgun2023letkd,\n  title={Knowledge Distillation Layer that Lets the Student Decide},\n"
            "  author={G{\\\"o}rg{\\\"u}n, Ada and G{\\\"u}rb{\\\"u}z, Yeti Ziya and Alatan, A. Ayd{\\i}n},\n"
            "  booktitle={Proceedings of BMVC},\n  year={2023}\n}"
        ),
    }

    _letkd_targets = None  # {location: TemplateTargets | SubclassTargets} when args.letkd

    def __init__(self, *args, **kwargs):
        # The arguments of DistillTrainer (which checks that `args` is a LetKDConfig); then the method's own set-up.
        super().__init__(*args, **kwargs)
        self._init_letkd()

    def _init_letkd(self) -> None:
        """Check the student and the teacher, then load (or fit and cache) the teacher targets of each location."""
        args = self.args
        self._letkd_locations = locations = LETKD_LOCATIONS[args.letkd]
        student = self.accelerator.unwrap_model(self.model)
        templates = getattr(student.config, "kd_layer_templates", None) or {}
        missing = [location for location in locations if location not in templates]
        if missing:
            raise ValueError(
                f"letkd={args.letkd} trains KD layers at {list(locations)} but the student "
                f"({type(student).__name__}) has KD layers at {sorted(templates)}: build it with "
                f"kd_layer_templates={{{', '.join(repr(m) + ': K' for m in locations)}}} "
                "(hf_kd.KDLayerForImageClassification, or KDLayerForSequenceClassification.from_backbone)."
            )
        if self._teacher_source is None:
            raise ValueError(
                f"letkd={args.letkd} needs the teacher itself (its features at every step), not only "
                "'teacher_logits' columns: pass teacher_model or set teacher_model_name_or_path."
            )
        num_classes = student.config.num_labels
        if "intermediate" in locations:
            subclasses_per_class(templates["intermediate"], num_classes)  # raises unless C divides K_inter
        teacher = self._load_teacher()
        self._letkd_teacher_layers = self._resolve_letkd_teacher_layers(teacher, locations)

        import datasets

        train = self.train_dataset
        if not isinstance(train, datasets.Dataset):
            raise TypeError(
                f"letkd fits the teacher's targets on the train set before training: it needs a datasets.Dataset, "
                f"got {type(train).__name__}."
            )
        # The student's map size at each location decides how teacher maps are pooled, so it is part of the key.
        first = self.data_collator([train.select_columns(self._letkd_input_columns(train))[i] for i in range(2)])
        student_shapes = self._letkd_student_shapes(student, first, locations)
        backend = resolve_kmeans_backend(args.letkd_kmeans_backend)
        cache = KDLayerTargetsCache(
            args.letkd_cache_dir, teacher_fingerprint(self._teacher_source, args.teacher_model_init_kwargs)
        )
        inputs_key = dataset_fingerprint(train, [c for c in TEACHER_INPUT_NAMES if c in train.column_names])
        label_key = dataset_fingerprint(train, self._letkd_input_columns(train))
        paths = {}
        for location in locations:
            layer = "kd_features" if self._letkd_teacher_layers is None else self._letkd_teacher_layers[location]
            settings = {
                "location": location, "templates": templates[location], "num_classes": num_classes,
                "lda_components": args.letkd_lda_components, "iterations": args.letkd_kmeans_iterations,
                "seed": args.letkd_kmeans_seed, "backend": backend, "teacher_layer": layer, "resize": args.letkd_teacher_resize,
                "student_shape": student_shapes[location],
                "token_id_map": None if self._token_id_map is None else self._token_id_map.tolist(),
            }
            paths[location] = (cache.path_for(label_key if location == "intermediate" else inputs_key, settings),
                               settings)

        with args.main_process_first(desc="letKD teacher targets"):
            targets = {loc: cache.load(path, args.letkd_temperature, settings) for loc, (path, settings) in paths.items()}
            todo = tuple(loc for loc in locations if targets[loc] is None)
            if todo:
                features, labels = collect_teacher_features(
                    teacher, train, self.data_collator, todo, student_shapes, self._letkd_teacher_layers,
                    args.letkd_teacher_resize, args.per_device_eval_batch_size, args.device, self._token_id_map,
                )
                fitted = fit_targets(
                    features, labels, templates, num_classes, args.letkd_temperature, args.letkd_lda_components,
                    args.letkd_kmeans_iterations, args.letkd_kmeans_seed, backend,
                )
                del features
                for location, value in fitted.items():
                    targets[location] = value
                    if args.should_save:
                        cache.save(paths[location][0], value, paths[location][1])
        self._letkd_targets = targets

    @staticmethod
    def _letkd_input_columns(dataset) -> list[str]:
        label = next((c for c in ("labels", "label") if c in dataset.column_names), None)
        if label is None:
            raise ValueError(
                f"letkd needs labelled training data (a 'labels' or 'label' column); columns: {dataset.column_names}."
            )
        return [c for c in TEACHER_INPUT_NAMES if c in dataset.column_names] + [label]

    def _letkd_student_shapes(self, student, batch: dict, locations) -> dict[str, list[int]]:
        """Per-example shape of the student's features at each location, from one eval-mode forward."""
        batch = {k: v.to(self.args.device) for k, v in batch.items() if k in TEACHER_INPUT_NAMES}
        was_training = student.training
        student.eval()
        with torch.no_grad():
            out = student(**batch, output_kd_features=True)
        student.train(was_training)
        # Tokens: only the hidden size is fixed (the length is each batch's).
        return {
            location: list(out.kd_features[location].shape[1:] if out.kd_features[location].dim() == 4
                           else out.kd_features[location].shape[2:])
            for location in locations
        }

    def _resolve_letkd_teacher_layers(self, teacher, locations) -> dict[str, int] | None:
        """`None` (the teacher's own `kd_features`) or a `hidden_states` index per location."""
        layers = self.args.letkd_teacher_layers
        if layers is None and accepts_kd_features(teacher):
            return None
        layers = {"penultimate": -1, **(layers or {})}
        if "intermediate" in locations and "intermediate" not in layers:
            raise ValueError(
                f"letkd=2 needs the teacher's intermediate features, but the teacher ({type(teacher).__name__}) does "
                "not name its locations: set letkd_teacher_layers={'intermediate': i}, the index of the teacher's "
                "hidden_states (output_hidden_states=True) that matches the student's intermediate KD layer."
            )
        return layers

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels", None)
        teacher_logits = inputs.pop(TEACHER_LOGITS_COLUMN, None)
        outputs = model(**inputs, output_kd_features=True)
        letkd_loss, live_logits, losses = self._letkd_loss(outputs, inputs, labels, num_items_in_batch, model.training)
        mode = "train" if model.training else "eval"
        for location, value in losses.items():
            self._metrics[mode][f"letkd_{location}_loss"].append(value.detach())
        # The batch's teacher_logits column when it has one, else the logits of the teacher forward that gave the
        # features (the teacher runs once per step).
        teacher_logits = live_logits if teacher_logits is None else teacher_logits
        student_logits = outputs.logits
        loss, teacher_logits = self._kd_loss(model, inputs, student_logits, teacher_logits, labels, num_items_in_batch)
        loss = self._scale_for_processes(loss + letkd_loss, num_items_in_batch)
        if return_outputs:
            return loss, {"logits": student_logits, TEACHER_LOGITS_COLUMN: teacher_logits}
        return loss

    def _letkd_loss(
        self, outputs, inputs: dict, labels: torch.Tensor | None, num_items_in_batch, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted KD layer losses of one batch, the teacher's logits (from the same teacher forward) and the
        unweighted loss of each location, for logging.

        Each location's loss is the mean over this batch's positions; with `num_items_in_batch` it is scaled by this
        batch's share of the examples, which is exact under gradient accumulation when every example has the same
        number of positions (feature maps) and weighs each micro-batch by its examples for tokens.
        """
        args = self.args
        teacher_logits, teacher_features = teacher_features_for_batch(
            self._load_teacher(), inputs, self._letkd_teacher_layers, self._letkd_locations, self._token_id_map
        )
        mask = inputs.get("attention_mask")
        weights = {"penultimate": args.letkd_penultimate_weight, "intermediate": args.letkd_intermediate_weight}
        total, losses = 0.0, {}
        for location in self._letkd_locations:
            student_shape = outputs.kd_features[location].shape
            if location == "intermediate" and labels is None:
                if training:
                    raise ValueError("letkd=2 needs labels: the intermediate targets are the gold class's sub-classes.")
                continue
            features = match_positions(
                teacher_features[location], student_shape, mask, args.letkd_teacher_resize, location
            )
            position_classes = None if labels is None else position_labels(labels, student_shape, mask)
            targets = self._letkd_targets[location](features, position_classes)
            losses[location] = kd_layer_loss(outputs.kd_layer_scores[location], targets)
            total = total + weights[location] * losses[location]
        if num_items_in_batch is not None and labels is not None:
            total = total * (labels != -100).sum() / num_items_in_batch
        return total, teacher_logits, losses

    def _model_card_info(self) -> dict[str, Any]:
        """The teacher, the KD loss settings and the letKD settings of the run, for the model card."""
        info = super()._model_card_info()
        args = self.args
        info["hyperparameters"].update(
            letkd=args.letkd,
            letkd_penultimate_weight=args.letkd_penultimate_weight,
            **({"letkd_intermediate_weight": args.letkd_intermediate_weight} if args.letkd == 2 else {}),
            letkd_templates={loc: t.num_templates for loc, t in self._letkd_targets.items()},
        )
        return info
