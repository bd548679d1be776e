"""letKD teacher targets (K-means templates, LDA sub-classes, position matching, cache) and LetKDTrainer:
loss, caching, errors, save/load, exact resume."""

import json
import math

import datasets
import numpy as np
import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForImageClassification, DataCollatorWithPadding, default_data_collator

import hf_kd.trainer.letkd_trainer
from hf_kd import (
    KDLayerForImageClassification,
    KDLayerForSequenceClassification,
    KDLayerImageConfig,
    LetKDConfig,
    LetKDTrainer,
    kd_loss,
)
from hf_kd.kd_layer_targets import (
    KDLayerTargetsCache,
    SubclassTargets,
    TemplateTargets,
    fit_subclass_targets,
    fit_template_targets,
    kmeans,
    match_positions,
    position_labels,
)
from hf_kd.losses import kd_layer_loss

from .testing_utils import snapshot, tiny_bert, tiny_dataset, tiny_tokenizer

NUM_LABELS = 3

# ------------------------------------------------------------------------------------------------------ K-means


def blobs(n_per=50, centres=((0, 0), (10, 0), (0, 10), (10, 10)), seed=0):
    rng = np.random.default_rng(seed)
    points = np.concatenate([rng.normal(c, 0.5, size=(n_per, 2)) for c in centres]).astype(np.float32)
    return points, np.repeat(np.arange(len(centres)), n_per)


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_kmeans_reaches_a_lloyd_fixed_point(backend):
    points, truth = blobs()
    centres, assignments = kmeans(points, 4, num_iterations=20, seed=0, backend=backend)
    assert centres.shape == (4, 2) and centres.dtype == np.float32 and assignments.shape == (200,)
    # Converged Lloyd: every point is assigned to its nearest centre and every centre is the mean of its points.
    nearest = ((points[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(assignments, nearest)
    for k in range(4):
        np.testing.assert_allclose(centres[k], points[assignments == k].mean(0), atol=1e-4)
    # Points of one blob never split between far-apart centres (blobs are 10 apart, spread 0.5).
    assert all(np.ptp(centres[assignments[truth == b]], axis=0).max() < 5 for b in range(4))


def test_kmeans_needs_as_many_points_as_clusters():
    with pytest.raises(ValueError, match="K=11 clusters needs at least 11 points, got 10"):
        kmeans(np.zeros((10, 2), np.float32), 11)


def test_kmeans_backend_name_is_checked():
    with pytest.raises(ValueError, match="kmeans backend must be one of"):
        kmeans(np.zeros((10, 2), np.float32), 2, backend="cuml")


# ------------------------------------------------------------------------------------------------------ targets


def test_template_targets_are_softmax_of_negative_squared_distances():
    points, _ = blobs()
    targets = fit_template_targets(points, num_templates=4, temperature=0.3, backend="sklearn")
    f = torch.randn(7, 2) * 5
    expected = F.softmax(-0.3 * torch.cdist(f.double(), targets.codebook.double()) ** 2, -1).float()
    torch.testing.assert_close(targets(f), expected, atol=1e-5, rtol=1e-4)
    assert targets.num_templates == 4 and targets.feature_size == 2


def test_more_templates_than_teacher_features_is_an_error():
    with pytest.raises(ValueError, match=r"K=300 templates but the teacher gave only 200 features"):
        fit_template_targets(blobs()[0], num_templates=300)


def subclass_data(seed=0, n=240, dim=6):
    """Three classes with two modes each, in 6 dimensions."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_LABELS), n // NUM_LABELS)
    modes = rng.integers(0, 2, size=n)
    centres = rng.normal(0, 4, size=(NUM_LABELS, 2, dim))
    features = centres[labels, modes] + rng.normal(0, 1, size=(n, dim))
    return features.astype(np.float32), labels


def test_subclass_targets_follow_the_supplement():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    features, labels = subclass_data()
    targets = fit_subclass_targets(features, labels, NUM_LABELS, subclasses_per_class=2, backend="sklearn")
    assert isinstance(targets, SubclassTargets) and targets.num_templates == 6 and targets.num_classes == 3
    # 1. The LDA projection is scikit-learn's transform (min(C - 1, d) = 2 components).
    lda = LinearDiscriminantAnalysis(n_components=2).fit(features, labels)
    z = targets.project(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(z, lda.transform(features), atol=1e-4, rtol=1e-4)
    # 2. Per class, the prototypes are the means of their clusters.
    centres = targets.centres.numpy()
    nearest_in_class = np.array(
        [labels[i] * 2 + ((z[i] - centres[labels[i] * 2 : labels[i] * 2 + 2]) ** 2).sum(-1).argmin() for i in
         range(len(z))]
    )
    for j in range(6):
        np.testing.assert_allclose(centres[j], z[nearest_in_class == j].mean(0), atol=1e-4)
    # 3-4. Row j of the score matrix: where the nearest of all 6 prototypes of sub-class j's features lies.
    nearest_any = ((z[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    naive = np.zeros((6, 6))
    for j in range(6):
        for k in range(6):
            naive[j, k] = np.mean(nearest_any[nearest_in_class == j] == k)
    np.testing.assert_allclose(targets.score_matrix.numpy(), naive, atol=1e-6)
    # Online: the nearest sub-class among the gold class's, then its row.
    out = targets(torch.from_numpy(features), torch.from_numpy(labels))
    np.testing.assert_allclose(out.numpy(), naive[nearest_in_class], atol=1e-6)
    # The gold class matters: the same feature with another label gets a row of that class's sub-classes.
    other = targets(torch.from_numpy(features[:1]), torch.tensor([1]))
    assert any(torch.equal(other[0], targets.score_matrix[j]) for j in (2, 3))
    with pytest.raises(ValueError, match="need the class label"):
        targets(torch.from_numpy(features))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"subclasses_per_class": 100}, r"S=100 sub-classes per class but class\(es\) \[0, 1, 2\] have only"),
        ({"lda_components": 3}, r"lda_components must be an integer in \[1, 2\]"),
    ],
)
def test_subclass_target_errors(kwargs, match):
    features, labels = subclass_data()
    with pytest.raises(ValueError, match=match):
        fit_subclass_targets(features, labels, NUM_LABELS, backend="sklearn", **kwargs)


def test_a_class_without_features_is_an_error():
    features, labels = subclass_data()
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] have only \[0\]"):
        fit_subclass_targets(features, labels, 4, subclasses_per_class=2, backend="sklearn")


# ------------------------------------------------------------------------------------------------------ positions


def test_match_positions_maps_and_tokens():
    teacher = torch.randn(2, 5, 8, 8)
    same = match_positions(teacher, (2, 3, 8, 8))
    torch.testing.assert_close(same, teacher.permute(0, 2, 3, 1).reshape(-1, 5))
    pooled = match_positions(teacher, (2, 3, 4, 4))  # integer multiple: average pooling by 2, as the paper
    torch.testing.assert_close(pooled, F.avg_pool2d(teacher, 2).permute(0, 2, 3, 1).reshape(-1, 5))
    assert match_positions(teacher, (2, 3, 3, 3), resize="adaptive_avg_pool").shape == (18, 5)
    assert match_positions(teacher, (2, 3, 16, 16), resize="bilinear").shape == (512, 5)
    tokens, mask = torch.randn(2, 4, 6), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    torch.testing.assert_close(match_positions(tokens, (2, 4, 9), mask), tokens[mask.bool()])
    labels = torch.tensor([4, 7])
    assert position_labels(labels, (2, 4, 9), mask).tolist() == [4, 4, 4, 7, 7]
    assert position_labels(labels, (2, 3, 2, 2)).tolist() == [4] * 4 + [7] * 4


@pytest.mark.parametrize(
    "teacher, student, kwargs, match",
    [
        (torch.randn(2, 5, 7, 7), (2, 3, 4, 4), {}, r"teacher's feature map is 7x7 and the student's 4x4"),
        (torch.randn(2, 5, 2, 2), (2, 3, 4, 4), {}, "letkd_teacher_resize='adaptive_avg_pool' or 'bilinear'"),
        (torch.randn(2, 5, 6), (2, 4, 6), {}, "teacher has 5 token positions and the student 4"),
        (torch.randn(2, 5, 6), (2, 3, 4, 4), {}, "both must be feature maps"),
        (torch.randn(2, 5, 4, 4), (3, 3, 4, 4), {}, "batch sizes differ"),
        (torch.randn(2, 5, 4, 4), (2, 3, 4, 4), {"resize": "nearest"}, "resize must be one of"),
    ],
)
def test_incompatible_positions_are_errors(teacher, student, kwargs, match):
    with pytest.raises(ValueError, match=match):
        match_positions(teacher, student, **kwargs)


def test_cache_round_trip_and_keys(tmp_path):
    cache = KDLayerTargetsCache(tmp_path, "teacher-key")
    template = TemplateTargets(torch.randn(5, 3))
    features, labels = subclass_data()
    subclass = fit_subclass_targets(features, labels, NUM_LABELS, subclasses_per_class=2, backend="sklearn")
    settings = {"location": "penultimate", "templates": 5}
    path = cache.path_for("data", settings)
    assert cache.load(path) is None
    cache.save(path, template, settings)
    loaded = cache.load(path, temperature=2.0)
    assert isinstance(loaded, TemplateTargets) and loaded.temperature == 2.0
    assert torch.equal(loaded.codebook, template.codebook)
    other = cache.path_for("data", {**settings, "templates": 6})
    assert other != path and cache.path_for("other-data", settings) != path
    assert KDLayerTargetsCache(tmp_path, "other-teacher").path_for("data", settings) != path
    cache.save(other, subclass, settings)
    loaded = cache.load(other)
    assert isinstance(loaded, SubclassTargets) and loaded.subclasses_per_class == 2
    for name, tensor in subclass.tensors().items():
        assert torch.equal(loaded.tensors()[name], tensor), name
    other.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        cache.load(other)


# ------------------------------------------------------------------------------------------------------ trainer

IMAGE = 16


def image_dataset(n=32, seed=0):
    """Images whose class sets the brightness of one quadrant: learnable by a tiny CNN."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_LABELS, (n,), generator=g)
    x = 0.3 * torch.rand(n, 1, IMAGE, IMAGE, generator=g)
    for i, y in enumerate(labels.tolist()):
        x[i, 0, : IMAGE // 2 * (y % 2 + 1), : IMAGE // 2] += 0.5 * (y + 1)
    return datasets.Dataset.from_dict({"pixel_values": x.numpy(), "labels": labels.numpy()})


def cnn(seed=0, stage_channels=(4, 8), templates=None, **kwargs):
    torch.manual_seed(seed)
    config = KDLayerImageConfig(
        num_labels=NUM_LABELS, stem_channels=4, stage_channels=list(stage_channels), image_size=IMAGE,
        kd_layer_templates=templates, **kwargs,
    )
    return KDLayerForImageClassification(config)


def teacher_cnn():
    return cnn(seed=7, stage_channels=(8, 8))  # a plain CNN: 16 -> 8 -> 4, 8 channels


def student_cnn(seed=1, penultimate=8, intermediate=2 * NUM_LABELS):
    templates = {"penultimate": penultimate}
    if intermediate:
        templates["intermediate"] = intermediate
    return cnn(seed=seed, templates=templates)


def letkd_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, per_device_eval_batch_size=16,
        num_train_epochs=1, learning_rate=1e-2, logging_steps=1, eval_strategy="no", save_strategy="no",
        report_to="none", use_cpu=True, seed=0, letkd=2, alpha=0.0, letkd_kmeans_backend="sklearn",
        letkd_cache_dir=str(tmp_path / "targets"), teacher_logits_cache_dir=str(tmp_path / "logits"),
    )
    defaults.update(kwargs)
    return LetKDConfig(**defaults)


def letkd_trainer(tmp_path, student=None, teacher=None, args=None, train=None, **kwargs):
    return LetKDTrainer(
        model=student if student is not None else student_cnn(),
        args=args if args is not None else letkd_args(tmp_path, **kwargs),
        teacher_model=teacher if teacher is not None else teacher_cnn(),
        train_dataset=train if train is not None else image_dataset(),
        eval_dataset=image_dataset(16, seed=1),
        data_collator=default_data_collator,
    )


class TestLetKDConfig:
    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"letkd": 3}, "letkd must be 1 .letKD-1. or 2 .letKD-2., got 3"),
            ({"letkd": 0}, "letkd must be 1 .letKD-1. or 2 .letKD-2., got 0 .plain KD without KD layers: DistillConfig"),
            ({"letkd_penultimate_weight": -1.0}, "letkd_penultimate_weight must be >= 0, got -1.0"),
            ({"letkd_temperature": 0.0}, "letkd_temperature must be > 0"),
            ({"letkd_teacher_resize": "nearest"}, "letkd_teacher_resize must be one of"),
            ({"letkd_kmeans_backend": "cuml"}, "letkd_kmeans_backend must be one of"),
            ({"letkd_kmeans_iterations": 0}, "letkd_kmeans_iterations must be an integer >= 1"),
            ({"letkd_teacher_layers": {"final": 3}}, "letkd_teacher_layers must map"),
        ],
    )
    def test_bad_values_are_named(self, tmp_path, kwargs, match):
        with pytest.raises(ValueError, match=match):
            LetKDConfig(output_dir=str(tmp_path), **kwargs)

    def test_choice_options_are_enums_given_as_strings_or_members(self, tmp_path):
        from hf_kd.trainer.letkd_config import KMeansBackend, LetKDTeacherResize

        args = LetKDConfig(output_dir=str(tmp_path), letkd_teacher_resize="bilinear", letkd_kmeans_backend="sklearn")
        assert args.letkd_teacher_resize is LetKDTeacherResize.BILINEAR
        assert args.letkd_kmeans_backend is KMeansBackend.SKLEARN and args.to_dict()["letkd_kmeans_backend"] == "sklearn"
        args = LetKDConfig(output_dir=str(tmp_path), letkd_kmeans_backend=KMeansBackend.FAISS)
        assert args.letkd_teacher_resize is None and args.letkd_kmeans_backend == "faiss"
        with pytest.raises(ValueError, match=r"one of \(None, 'adaptive_avg_pool', 'bilinear'\), got 'nearest'"):
            LetKDConfig(output_dir=str(tmp_path), letkd_teacher_resize="nearest")

    def test_teacher_layers_from_json(self, tmp_path):
        args = LetKDConfig(output_dir=str(tmp_path), letkd_teacher_layers='{"intermediate": 2}')
        assert args.letkd_teacher_layers == {"intermediate": 2}


class TestLetKDTrainer:
    def test_letkd2_trains_student_and_kd_layers_teacher_frozen(self, tmp_path):
        teacher, student = teacher_cnn(), student_cnn()
        teacher_before, student_before = snapshot(teacher), snapshot(student)
        trainer = letkd_trainer(tmp_path, student=student, teacher=teacher, eval_strategy="epoch")
        assert set(trainer._letkd_targets) == {"intermediate", "penultimate"}
        assert trainer._letkd_targets["penultimate"].codebook.shape == (8, 8)  # K x teacher channels
        assert trainer._letkd_targets["intermediate"].num_templates == 2 * NUM_LABELS
        trainer.train()
        for name, param in teacher.named_parameters():
            assert torch.equal(param, teacher_before[name]), name
        for name, param in student.named_parameters():
            assert not torch.equal(param, student_before[name]), f"student parameter {name} did not change"
        history = trainer.state.log_history
        assert all(math.isfinite(h["letkd_penultimate_loss"]) for h in history if "loss" in h)
        assert any("letkd_intermediate_loss" in h for h in history if "loss" in h)
        evaluation = next(h for h in history if "eval_loss" in h)
        assert "eval_letkd_penultimate_loss" in evaluation and "eval_letkd_intermediate_loss" in evaluation

    @pytest.mark.parametrize("letkd", [1, 2])
    def test_loss_is_ce_plus_weighted_kd_layer_losses(self, tmp_path, letkd):
        teacher, student = teacher_cnn().eval(), student_cnn()
        trainer = letkd_trainer(
            tmp_path, student=student, teacher=teacher, letkd=letkd, letkd_penultimate_weight=0.7,
            letkd_intermediate_weight=0.3, letkd_temperature=0.5,
        )
        batch = next(iter(trainer.get_train_dataloader()))
        torch.manual_seed(0)
        loss = trainer.compute_loss(student, dict(batch))
        torch.manual_seed(0)
        out = student(pixel_values=batch["pixel_values"], output_kd_features=True)
        with torch.no_grad():
            t = teacher(pixel_values=batch["pixel_values"], output_kd_features=True)
        labels = batch["labels"]
        expected = F.cross_entropy(out.logits, labels)
        pen = trainer._letkd_targets["penultimate"]
        assert pen.temperature == 0.5
        p_pen = pen(t.kd_features["penultimate"].permute(0, 2, 3, 1).reshape(-1, 8))
        expected = expected + 0.7 * kd_layer_loss(out.kd_layer_scores["penultimate"], p_pen)
        if letkd == 2:
            p_inter = trainer._letkd_targets["intermediate"](
                t.kd_features["intermediate"].permute(0, 2, 3, 1).reshape(-1, 8), labels.repeat_interleave(16)
            )
            expected = expected + 0.3 * kd_layer_loss(out.kd_layer_scores["intermediate"], p_inter)
        else:
            assert "intermediate" not in trainer._letkd_targets
        torch.testing.assert_close(loss, expected)

    def test_alpha_keeps_the_hinton_term(self, tmp_path):
        teacher, student = teacher_cnn().eval(), student_cnn()
        trainer = letkd_trainer(tmp_path, student=student, teacher=teacher, letkd=1, alpha=0.5, temperature=2.0)
        batch = next(iter(trainer.get_train_dataloader()))
        loss = trainer.compute_loss(student, dict(batch))
        out = student(pixel_values=batch["pixel_values"], output_kd_features=True)
        with torch.no_grad():
            t = teacher(pixel_values=batch["pixel_values"], output_kd_features=True)
        p = trainer._letkd_targets["penultimate"](t.kd_features["penultimate"].permute(0, 2, 3, 1).reshape(-1, 8))
        expected = kd_loss(out.logits, t.logits, batch["labels"], 2.0, 0.5) + kd_layer_loss(
            out.kd_layer_scores["penultimate"], p
        )
        torch.testing.assert_close(loss, expected)

    def test_kd_layer_losses_follow_num_items_in_batch(self, tmp_path):
        """Under gradient accumulation each micro-batch's KD-layer loss weighs its share of the examples."""
        teacher, student = teacher_cnn().eval(), student_cnn().eval()  # eval: no BatchNorm updates between calls
        trainer = letkd_trainer(tmp_path, student=student, teacher=teacher, letkd=2, alpha=1.0, temperature=1.0)
        batch = next(iter(trainer.get_train_dataloader()))
        full = trainer.compute_loss(student, dict(batch))
        half = trainer.compute_loss(student, dict(batch), num_items_in_batch=torch.tensor(16))
        torch.testing.assert_close(half, full / 2)

    def test_targets_are_cached_and_reused(self, tmp_path, monkeypatch):
        first = letkd_trainer(tmp_path)
        files = sorted((tmp_path / "targets").glob("*.safetensors"))
        assert len(files) == 2  # one per location
        metadata = {}
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as f:
                metadata[f.metadata()["kind"]] = json.loads(f.metadata()["settings"])
        assert metadata["templates"]["student_shape"] == [8, 4, 4] and metadata["templates"]["backend"] == "sklearn"

        def fail(*args, **kwargs):
            raise AssertionError("the teacher features were collected again")

        monkeypatch.setattr(hf_kd.trainer.letkd_trainer, "collect_teacher_features", fail)
        second = letkd_trainer(tmp_path)
        for location in ("penultimate", "intermediate"):
            for name, tensor in first._letkd_targets[location].tensors().items():
                assert torch.equal(second._letkd_targets[location].tensors()[name], tensor)
        # A letKD-1 run reuses the penultimate targets of the letKD-2 run; a student of another seed reuses both.
        letkd_trainer(tmp_path, student=student_cnn(intermediate=0), letkd=1)
        letkd_trainer(tmp_path, student=student_cnn(seed=4), seed=4)
        with pytest.raises(AssertionError, match="collected again"):
            letkd_trainer(tmp_path, letkd_kmeans_seed=1)
        # Other teacher weights: a new key, so the targets are fitted again.
        with pytest.raises(AssertionError, match="collected again"):
            letkd_trainer(tmp_path, teacher=cnn(seed=8, stage_channels=(8, 8)))

    def test_student_without_kd_layers_is_an_error(self, tmp_path):
        with pytest.raises(ValueError, match=r"letkd=2 trains KD layers at \['intermediate', 'penultimate'\]"):
            letkd_trainer(tmp_path, student=student_cnn(intermediate=0))

    def test_more_templates_than_teacher_features_is_an_error(self, tmp_path):
        # 32 images x 4 x 4 positions = 512 teacher features.
        with pytest.raises(ValueError, match="K=1024 templates but the teacher gave only 512 features"):
            letkd_trainer(tmp_path, student=student_cnn(penultimate=1024), letkd=1)

    def test_intermediate_templates_must_be_a_multiple_of_the_classes(self, tmp_path):
        with pytest.raises(ValueError, match="its 7 templates must be a multiple of the 3 classes"):
            letkd_trainer(tmp_path, student=student_cnn(intermediate=7))

    def test_incompatible_feature_maps_need_a_resize(self, tmp_path):
        teacher = cnn(seed=7, stage_channels=(8, 8, 8))  # 16 -> 8 -> 4 -> 2: a 2x2 map against the student's 4x4
        with pytest.raises(ValueError, match="teacher's feature map is 2x2 and the student's 4x4"):
            letkd_trainer(tmp_path, teacher=teacher, letkd=1, student=student_cnn(intermediate=0))
        trainer = letkd_trainer(
            tmp_path, teacher=teacher, letkd=1, student=student_cnn(intermediate=0), letkd_teacher_resize="bilinear",
            max_steps=1,
        )
        trainer.train()
        assert math.isfinite(trainer.state.log_history[0]["letkd_penultimate_loss"])

    def test_hidden_states_teacher_needs_an_intermediate_index(self, tmp_path):
        from hf_kd import MultiExitForImageClassification, MultiExitImageConfig

        torch.manual_seed(7)
        teacher = MultiExitForImageClassification(
            MultiExitImageConfig(num_labels=NUM_LABELS, stem_channels=4, stage_channels=[8, 8], exit_layers=[2])
        )
        with pytest.raises(ValueError, match=r"set letkd_teacher_layers=\{'intermediate': i\}"):
            letkd_trainer(tmp_path, teacher=teacher)
        with pytest.raises(ValueError, match=r"letkd_teacher_layers\['intermediate'\]=5 is out of range"):
            letkd_trainer(tmp_path, teacher=teacher, letkd_teacher_layers={"intermediate": 5})
        trainer = letkd_trainer(tmp_path, teacher=teacher, letkd_teacher_layers={"intermediate": 1}, max_steps=1)
        trainer.train()  # hidden_states[1] (stage 1, 8x8) is average-pooled to the student's 4x4

    def test_letkd_needs_the_teacher_itself(self, tmp_path):
        from hf_kd.teacher import TEACHER_LOGITS_COLUMN

        train = image_dataset()
        train = train.add_column(TEACHER_LOGITS_COLUMN, [[0.0] * NUM_LABELS] * len(train))
        with pytest.raises(ValueError, match="needs the teacher itself"):
            LetKDTrainer(
                model=student_cnn(), args=letkd_args(tmp_path), train_dataset=train, data_collator=default_data_collator
            )

    def test_saved_student_loads_with_its_kd_layers(self, tmp_path):
        trainer = letkd_trainer(tmp_path, max_steps=2)
        trainer.train()
        trainer.save_model(str(tmp_path / "student"))
        card = (tmp_path / "student" / "README.md").read_text()
        assert "letkd" in card
        loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "student").eval()
        assert type(loaded) is KDLayerForImageClassification and set(loaded.kd_layers) == {"intermediate", "penultimate"}
        x = torch.tensor(np.array(image_dataset(4, seed=3)["pixel_values"], dtype=np.float32))
        trainer.model.eval()
        torch.testing.assert_close(loaded(pixel_values=x).logits, trainer.model(pixel_values=x).logits)

    def test_resume_matches_uninterrupted_run(self, tmp_path):
        args = letkd_args(tmp_path, num_train_epochs=2, save_strategy="steps", save_steps=4)
        student = student_cnn()
        letkd_trainer(tmp_path, student=student, args=args).train()  # 4 steps per epoch
        final = snapshot(student)
        final_buffers = {n: b.clone() for n, b in student.named_buffers()}
        resumed_student = student_cnn(seed=5)  # other weights: everything must come from the checkpoint
        resumed = letkd_trainer(tmp_path, student=resumed_student, args=args)
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
        assert resumed.state.global_step == 8
        for name, param in resumed_student.named_parameters():
            torch.testing.assert_close(param, final[name], atol=0, rtol=0, msg=name)
        for name, buffer in resumed_student.named_buffers():
            torch.testing.assert_close(buffer, final_buffers[name], atol=0, rtol=0, msg=name)


class TestLetKDTransformer:
    def make(self, tmp_path, letkd=1, **kwargs):
        tokenizer = tiny_tokenizer(tmp_path)
        teacher = tiny_bert(seed=7, layers=2)
        student = KDLayerForSequenceClassification.from_backbone(
            tiny_bert(seed=1, layers=2), kd_layer_templates={"penultimate": 8, "intermediate": 4}
        )
        return LetKDTrainer(
            model=student, args=letkd_args(tmp_path, letkd=letkd, **kwargs), teacher_model=teacher,
            train_dataset=tiny_dataset(32), eval_dataset=tiny_dataset(16, seed=1), processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
        )

    def test_per_token_letkd_trains_on_real_tokens(self, tmp_path, monkeypatch):
        collected = {}
        collect = hf_kd.trainer.letkd_trainer.collect_teacher_features

        def spy(*args, **kwargs):
            features, labels = collect(*args, **kwargs)
            collected.update({location: (len(f), labels[location]) for location, f in features.items()})
            return features, labels

        monkeypatch.setattr(hf_kd.trainer.letkd_trainer, "collect_teacher_features", spy)
        trainer = self.make(tmp_path, letkd=2, letkd_teacher_layers={"intermediate": 1}, eval_strategy="epoch")
        # Targets were fitted on every real token of the train set (padding excluded), labelled with its row's class.
        train = tiny_dataset(32)
        tokens = [len(ids) for ids in train["input_ids"]]
        for location in ("intermediate", "penultimate"):
            count, labels = collected[location]
            assert count == sum(tokens)
            assert labels.tolist() == [y for y, n in zip(train["label"], tokens) for _ in range(n)]
        assert trainer._letkd_targets["penultimate"].codebook.shape == (8, 32)
        student_before = snapshot(trainer.model)
        trainer.train()
        for name, param in trainer.model.named_parameters():
            assert not torch.equal(param, student_before[name]), name
        evaluation = next(h for h in trainer.state.log_history if "eval_loss" in h)
        assert math.isfinite(evaluation["eval_letkd_penultimate_loss"])

    def test_intermediate_needs_a_teacher_layer(self, tmp_path):
        with pytest.raises(ValueError, match="does not name its locations"):
            self.make(tmp_path, letkd=2)


# ------------------------------------------------------------------------------------------------------ image teachers
# (hf_kd.teacher, shared with the teacher logits cache)


def test_image_teacher_fingerprint_covers_batchnorm_buffers():
    from hf_kd.teacher import teacher_fingerprint

    teacher = teacher_cnn()
    key = teacher_fingerprint(teacher)  # 0-dim num_batches_tracked buffers included
    with torch.no_grad():
        teacher.stem.norm.running_mean.add_(0.1)
    assert teacher_fingerprint(teacher) != key


def test_dataset_fingerprint_hashes_image_bytes_and_keeps_text_keys():
    import hashlib

    from hf_kd.teacher import dataset_fingerprint

    images = image_dataset(8)
    key = dataset_fingerprint(images, ["pixel_values", "labels"])
    assert dataset_fingerprint(image_dataset(8), ["pixel_values", "labels"]) == key
    assert dataset_fingerprint(images.select([1, 0, *range(2, 8)]), ["pixel_values", "labels"]) != key
    assert dataset_fingerprint(images, ["pixel_values"]) != key
    # Ragged token columns keep the JSON formula, so existing text cache keys are unchanged.
    text, columns = tiny_dataset(5000), ["input_ids", "attention_mask"]
    hasher = hashlib.sha256(json.dumps(columns).encode())
    for batch in text.select_columns(columns).iter(batch_size=2048):
        hasher.update(json.dumps(batch, sort_keys=True).encode())
    assert dataset_fingerprint(text, columns) == hasher.hexdigest()


def test_image_models_have_no_vocabulary_to_check():
    from hf_kd.teacher import check_vocabularies

    assert check_vocabularies(student_cnn().config, teacher_cnn().config, None, None, False) is None
    with pytest.raises(ValueError, match="Only the teacher has a vocabulary"):
        check_vocabularies(student_cnn().config, tiny_bert().config, None, None, False)


def test_teacher_fingerprint_ignores_where_the_teacher_was_loaded_from(tmp_path, monkeypatch):
    from hf_kd.teacher import teacher_fingerprint

    teacher_cnn().save_pretrained(tmp_path / "teacher")
    monkeypatch.chdir(tmp_path)
    relative = KDLayerForImageClassification.from_pretrained("teacher")
    absolute = KDLayerForImageClassification.from_pretrained(tmp_path / "teacher")
    assert relative.config._name_or_path != absolute.config._name_or_path
    assert teacher_fingerprint(relative) == teacher_fingerprint(absolute)
