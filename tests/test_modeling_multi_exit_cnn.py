"""Multi-exit CNN: config, forward/loss, FLOPs, early exits (shared policies, budget, MIE), save/load, Auto classes."""

import json
import re

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForImageClassification
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from hf_kd import MultiExitForImageClassification, MultiExitImageConfig
from hf_kd.early_exit import (
    NO_EXIT_THRESHOLD,
    budget_exit_fractions,
    fit_budget_thresholds,
    model_internal_ensemble,
    simulate_exits,
)

from .testing_utils import CNN_BATCH as BATCH
from .testing_utils import CNN_NUM_LABELS as NUM_LABELS
from .testing_utils import images, tiny_cnn


def exit_probs_of(full):
    return torch.stack([z.softmax(-1) for z in full.exit_logits])  # (num_exits, B, K)


# --------------------------------------------------------------------------------------------------- config


def test_config_defaults_and_final_exit():
    config = MultiExitImageConfig()
    assert (config.num_channels, config.image_size, config.stage_channels) == (1, 28, [32, 64, 128])
    assert config.exit_layers == [1, 2, 3] and config.num_hidden_layers == 3 and config.num_exits == 3
    assert config.normalized_exit_loss_weights == pytest.approx([1 / 3] * 3)
    config = MultiExitImageConfig(stage_channels=[8, 16, 32, 64], exit_layers=[2, 1, 2], exit_loss_weights=[1, 1, 2])
    assert config.exit_layers == [1, 2, 4] and config.num_hidden_layers == 4  # sorted, deduplicated, last added
    assert config.normalized_exit_loss_weights == pytest.approx([0.25, 0.25, 0.5])


@pytest.mark.parametrize("bad", [0, 4, -1])
def test_config_exit_after_missing_stage(bad):
    with pytest.raises(ValueError, match=rf"exit stage {bad} is out of range.*3 stages \(valid: 1..3\)"):
        MultiExitImageConfig(stage_channels=[8, 16, 32], exit_layers=[1, bad])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stage_channels": []}, "stage_channels must be a non-empty list"),
        ({"stage_channels": [8, 0]}, r"stage_channels\[1\] must be an integer >= 1, got 0"),
        ({"num_channels": 0}, "num_channels"),
        ({"convs_per_stage": 0}, "convs_per_stage"),
        ({"exit_layers": [1.5]}, "1-based integer stage indices"),
        ({"exit_loss_weights": [1.0, 1.0]}, "2 weights but there are 3 exits"),
        ({"exit_loss_weights": [1.0, -1.0, 1.0]}, ">= 0"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiExitImageConfig(**kwargs)


# --------------------------------------------------------------------------------------------------- forward


def test_forward_shapes_hidden_states_and_loss():
    model = tiny_cnn(exit_layers=[2], exit_loss_weights=[1.0, 3.0])
    x = images()
    out = model(x)
    assert out.loss is None and out.hidden_states is None
    assert len(out.exit_logits) == 2 and all(z.shape == (BATCH, NUM_LABELS) for z in out.exit_logits)
    assert torch.equal(out.logits, out.exit_logits[-1])

    labels = torch.arange(BATCH) % NUM_LABELS
    out = model(pixel_values=x, labels=labels, output_hidden_states=True)
    expected = 0.25 * F.cross_entropy(out.exit_logits[0], labels) + 0.75 * F.cross_entropy(out.exit_logits[1], labels)
    torch.testing.assert_close(out.loss, expected)
    # Stem output, then each stage: 28 -> 14 -> 7 -> 4.
    assert [tuple(h.shape) for h in out.hidden_states] == [
        (BATCH, 4, 28, 28),
        (BATCH, 4, 14, 14),
        (BATCH, 8, 7, 7),
        (BATCH, 8, 4, 4),
    ]
    loss, logits, exit_logits = model(x, labels=labels, return_dict=False)
    torch.testing.assert_close(logits, exit_logits[-1])
    with pytest.raises(ValueError, match=r"\(batch_size, 1, height, width\).*got \(12, 3, 28, 28\)"):
        model(torch.rand(BATCH, 3, 28, 28))


def test_training_steps_reduce_the_loss_and_reach_every_exit():
    model = tiny_cnn(image_size=12).train()
    x = images(size=12)
    labels = torch.arange(BATCH) % NUM_LABELS
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(head.classifier.weight.grad.abs().sum() > 0 for head in model.exits)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


# --------------------------------------------------------------------------------------------------- FLOPs


def test_exit_flops_from_conv_shapes():
    model = tiny_cnn(stem_channels=2, stage_channels=[4, 8], convs_per_stage=1, num_labels=3, image_size=8)
    stem = 2 * 9 * 1 * 2 * 8 * 8  # 3x3 conv, 1 -> 2 channels, 8x8 output
    stage1 = 2 * 9 * 2 * 4 * 4 * 4  # stride 2: 4x4 output
    stage2 = 2 * 9 * 4 * 8 * 2 * 2  # 2x2 output
    heads = [2 * 4 * 3, 2 * 8 * 3]
    assert model.exit_flops() == pytest.approx([stem + stage1 + heads[0], stem + stage1 + stage2 + sum(heads)])
    # A second convolution per stage, and another image size (ceil(7 / 2) = 4, then 2).
    model = tiny_cnn(stem_channels=2, stage_channels=[4, 8], convs_per_stage=2, num_labels=3)
    stem7 = 2 * 9 * 1 * 2 * 7 * 7
    stage1 = 2 * 9 * 2 * 4 * 4 * 4 + 2 * 9 * 4 * 4 * 4 * 4
    stage2 = 2 * 9 * 4 * 8 * 2 * 2 + 2 * 9 * 8 * 8 * 2 * 2
    assert model.exit_flops(7)[-1] == pytest.approx(stem7 + stage1 + stage2 + sum(heads))
    assert model.exit_flops((7, 7)) == model.exit_flops(7)
    with pytest.raises(ValueError, match="image_size"):
        model.exit_flops((7, 7, 1))


# --------------------------------------------------------------------------------------------------- early exits


def test_never_and_always_exit():
    model = tiny_cnn()
    x = images()
    full = model(x)
    pred = model.predict_with_exits(x, policy="max_prob", threshold=1.0)
    torch.testing.assert_close(pred.logits, full.logits, atol=1e-5, rtol=0)
    assert pred.exit_layer.tolist() == [3] * BATCH and pred.layers_run == 3 * BATCH
    assert pred.flops == pytest.approx(BATCH * model.exit_flops()[-1])
    pred = model.predict_with_exits(x, policy="entropy", threshold=10.0)
    torch.testing.assert_close(pred.logits, full.exit_logits[0], atol=1e-5, rtol=0)
    assert pred.exit_index.tolist() == [0] * BATCH and pred.layers_run == BATCH
    assert pred.flops == pytest.approx(BATCH * model.exit_flops()[0]) and pred.flops < pred.full_flops
    torch.testing.assert_close(pred.probs, full.exit_logits[0].softmax(-1), atol=1e-6, rtol=0)
    # A float64 model keeps float64 probabilities.
    pred = model.double().predict_with_exits(x.double(), policy="max_prob", threshold=0.0, mie=True)
    assert pred.probs.dtype == pred.logits.dtype == torch.float64


@pytest.mark.parametrize("policy", ["max_prob", "entropy", "patience", "budget"])
def test_mixed_batch_matches_forward_and_simulation(policy):
    model = tiny_cnn(seed=1, sharpen=100.0)
    x = images(seed=1, batch=32)
    full = model(x)
    probs = exit_probs_of(full)
    if policy == "max_prob":
        kwargs = {"threshold": probs[0].max(-1).values.median().item() - 1e-6}
    elif policy == "entropy":
        kwargs = {"threshold": torch.special.entr(probs[0]).sum(-1).median().item() + 1e-6}
    elif policy == "patience":
        kwargs = {"patience": 1}
    else:
        thresholds = fit_budget_thresholds(probs.max(-1).values.T, budget_exit_fractions(10, 3))
        kwargs = {"thresholds": [t - 1e-6 for t in thresholds]}  # off the batch's own confidences (float noise)
    expected = simulate_exits(probs, policy=policy, **kwargs).exit_index
    assert len(set(expected.tolist())) > 1, "the test batch should mix exits"

    pred = model.predict_with_exits(x, policy=policy, **kwargs)
    assert torch.equal(pred.exit_index, expected)
    assert torch.equal(pred.exit_layer, torch.tensor(model.config.exit_layers)[expected])
    stacked = torch.stack(full.exit_logits)
    torch.testing.assert_close(pred.logits, stacked[expected, torch.arange(32)], atol=1e-5, rtol=0)
    flops = model.exit_flops()
    assert pred.flops == pytest.approx(sum(flops[j] for j in expected.tolist()))
    assert pred.layers_run == int(pred.exit_layer.sum())


def test_mie_and_budget_match_offline_ensemble():
    model = tiny_cnn(sharpen=30.0, stage_channels=[4, 8, 8, 8])
    x = images(seed=2)
    full = model(x)
    ensembled = model_internal_ensemble(exit_probs_of(full), model.exit_flops())
    thresholds = fit_budget_thresholds(ensembled.max(-1).values.T, budget_exit_fractions(15, 4))
    thresholds = [t - 1e-6 for t in thresholds]
    expected = simulate_exits(ensembled, thresholds)
    assert len(set(expected.exit_index.tolist())) > 2, "the test batch should mix exits"
    pred = model.predict_with_exits(x, policy="budget", thresholds=thresholds, mie=True)
    assert torch.equal(pred.exit_index, expected.exit_index)
    torch.testing.assert_close(pred.probs, expected.probs.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(pred.logits.softmax(-1), pred.probs, atol=1e-5, rtol=0)
    pred = model.predict_with_exits(x, policy="budget", thresholds=[NO_EXIT_THRESHOLD] * 3, mie=True)
    torch.testing.assert_close(pred.probs, ensembled[-1].float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"policy": "budget", "thresholds": [0.5]}, "needs 2 thresholds, one per non-final exit of the 3 exits"),
        ({"policy": "budget", "thresholds": [0.5, float("inf")]}, "finite"),
        ({"policy": "budget", "thresholds": [0.5, -0.5]}, ">= 0"),
        ({"policy": "max_prob", "threshold": 2.0}, r"\[0, 1\]"),
        ({"policy": "patience", "patience": 0}, ">= 1"),
        ({"policy": "max_prob", "threshold": 0.5, "mie": "no"}, "mie"),
    ],
)
def test_bad_policy_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_cnn().predict_with_exits(images(), **kwargs)


# -------------------------------------------------------------------------------------------------- save / load / Auto


def test_save_load_round_trip_auto_class_and_remote_code(tmp_path):
    model = tiny_cnn(exit_layers=[2], id2label={i: f"c{i}" for i in range(NUM_LABELS)})
    x = images()
    before = model(x)
    model.save_pretrained(tmp_path)

    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["model_type"] == "hf_kd_multi_exit_cnn"
    assert config_json["auto_map"]["AutoConfig"] == "configuration_multi_exit_cnn.MultiExitImageConfig"
    assert (
        config_json["auto_map"]["AutoModelForImageClassification"]
        == "modeling_multi_exit_cnn.MultiExitForImageClassification"
    )
    assert "num_hidden_layers" not in config_json  # derived from stage_channels

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MultiExitImageConfig) and config.exit_layers == [2, 3] and config.num_hidden_layers == 3
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is MultiExitForImageClassification
    after = loaded(x)
    assert len(after.exit_logits) == 2 and loaded.config.id2label[3] == "c3"
    for a, b in zip(before.exit_logits, after.exit_logits):
        assert torch.equal(a, b)

    # The copied code is self-contained (relative imports of sibling files only), so the folder loads with
    # trust_remote_code where hf_kd is not installed.
    for name in ("modeling_multi_exit_cnn", "configuration_multi_exit_cnn", "exit_policies", "exit_laplace"):
        source = (tmp_path / f"{name}.py").read_text()
        assert not re.search(r"^\s*(from|import)\s+hf_kd", source, flags=re.MULTILINE), name
    remote_class = get_class_from_dynamic_module(config_json["auto_map"]["AutoModelForImageClassification"], tmp_path)
    assert remote_class is not MultiExitForImageClassification
    remote = remote_class.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(remote(x).logits, before.logits)
    pred = remote.predict_with_exits(x, policy="budget", thresholds=[0.5], mie=True)
    torch.testing.assert_close(
        pred.probs, model.predict_with_exits(x, policy="budget", thresholds=[0.5], mie=True).probs
    )


# --------------------------------------------------------------------------------------------------- image teacher


@pytest.mark.parametrize("cache", [False, True])
def test_image_teacher_distils_into_the_exits(tmp_path, cache):
    """An image classifier teaches through EarlyExitTrainer online and from the logits cache (no vocabulary to
    check), and the cached logits are the teacher's own."""
    import datasets
    from transformers import DefaultDataCollator

    from hf_kd import EarlyExitConfig, EarlyExitTrainer

    teacher = tiny_cnn(seed=1, stage_channels=[8, 8, 16])
    pixels = images(seed=3, batch=16)
    train = datasets.Dataset.from_dict({"pixel_values": pixels.tolist(), "labels": list(range(10)) + [0] * 6})
    train = train.with_format("torch")  # as image pipelines use it: the cache must fingerprint tensors too
    args = EarlyExitConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to="none", use_cpu=True,
        distill_from="teacher", alpha=1.0, cache_teacher_logits=cache, teacher_logits_cache_dir=str(tmp_path / "c"),
    )
    student = tiny_cnn(seed=2).train()
    trainer = EarlyExitTrainer(
        model=student, args=args, teacher_model=teacher, train_dataset=train, data_collator=DefaultDataCollator()
    )
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] > 0
    if cache:
        with torch.no_grad():
            expected = teacher(pixel_values=pixels).logits
        cached = trainer.train_dataset[:]["teacher_logits"]
        torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-5)
