"""letKD's KD layer (Görgün et al., BMVC 2023): the layer against its formula, tokens with padding, the loss, the CNN
and per-token transformer models, save/load with the Auto classes and trust_remote_code."""

import copy
import json
import math
import re

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from hf_kd import KDLayer, KDLayerForImageClassification, KDLayerForSequenceClassification, KDLayerImageConfig
from hf_kd.losses import kd_layer_loss
from hf_kd.modeling import KDLayerConfig

from .testing_utils import tiny_bert


def reference_kd_layer(layer: KDLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official computation on flat positions `(N, d)`, in training mode: cosine templates, batch-statistics
    BatchNorm (biased variance), ReLU, cosine values, residual."""
    w1 = layer.templates.weight / layer.templates.weight.norm(dim=1, keepdim=True)
    scores = layer.templates.scale * (x / x.norm(dim=1, keepdim=True)) @ w1.T
    mean, var = scores.mean(0), scores.var(0, unbiased=False)
    normed = (scores - mean) / torch.sqrt(var + layer.norm.eps) * layer.norm.weight + layer.norm.bias
    hidden = F.relu(normed)
    w2 = layer.values.weight / layer.values.weight.norm(dim=1, keepdim=True)
    values = layer.values.scale * (hidden / hidden.norm(dim=1, keepdim=True)) @ w2.T
    return x + layer.residual_weight * values, scores


def randomize_norm(layer: KDLayer) -> KDLayer:
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.norm.bias.uniform_(-0.5, 0.5)
        layer.norm.running_mean.uniform_(-0.3, 0.3)
        layer.norm.running_var.uniform_(0.5, 2.0)
    return layer


# ------------------------------------------------------------------------------------------------------ KDLayer


def test_initialisation_is_the_official_one():
    torch.manual_seed(0)
    layer = KDLayer(hidden_size=64, num_templates=4096)
    assert layer.templates.weight.shape == (4096, 64) and layer.values.weight.shape == (64, 4096)
    # N(0, 2 / in_planes): std sqrt(2/64) = 0.177 for the templates, sqrt(2/4096) = 0.022 for the values.
    assert layer.templates.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.02)
    assert layer.values.weight.std().item() == pytest.approx(math.sqrt(2 / 4096), rel=0.02)
    assert layer.templates.scale.item() == 3.0 and layer.values.scale.item() == 1.0
    assert layer.templates.scale.requires_grad and layer.values.scale.requires_grad
    assert torch.equal(layer.norm.weight, torch.ones(4096)) and torch.equal(layer.norm.bias, torch.zeros(4096))
    assert layer.residual_weight == 1.0


@pytest.mark.parametrize("residual_weight", [1.0, 0.1])
def test_feature_map_matches_the_formula(residual_weight):
    torch.manual_seed(0)
    layer = randomize_norm(KDLayer(8, 12, score_scale=2.5, value_scale=1.5, residual_weight=residual_weight)).train()
    x = torch.randn(3, 8, 4, 5)
    out, scores = layer(x)
    flat = x.permute(0, 2, 3, 1).reshape(-1, 8)  # positions in (b, h, w) order
    expected_out, expected_scores = reference_kd_layer(layer, flat)
    torch.testing.assert_close(scores, expected_scores)
    torch.testing.assert_close(out, expected_out.reshape(3, 4, 5, 8).permute(0, 3, 1, 2))
    assert out.shape == x.shape and scores.shape == (60, 12)


def test_gradients_reach_every_parameter_and_the_input():
    torch.manual_seed(0)
    layer = KDLayer(8, 12)
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    out, scores = layer(x)
    (out.square().sum() + scores.logsumexp(-1).sum()).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_tokens_with_padding_are_left_alone():
    """Padding keeps its states, has no score row and never enters the BatchNorm statistics."""
    torch.manual_seed(0)
    layer = randomize_norm(KDLayer(8, 12)).train()
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    reference = copy.deepcopy(layer)
    out, scores = layer(x, mask)
    expected_out, expected_scores = reference_kd_layer(reference, x[mask.bool()])
    assert scores.shape == (9, 12)
    torch.testing.assert_close(scores, expected_scores)
    torch.testing.assert_close(out[mask.bool()], expected_out)
    assert torch.equal(out[~mask.bool()], x[~mask.bool()])

    # Other values at the padded positions change nothing: not the outputs, not the running statistics.
    other = copy.deepcopy(reference)
    y = torch.where(mask.bool().unsqueeze(-1), x, 100 * torch.randn_like(x))
    out_y, scores_y = other(y, mask)
    torch.testing.assert_close(out_y[mask.bool()], out[mask.bool()])
    torch.testing.assert_close(other.norm.running_mean, layer.norm.running_mean)
    torch.testing.assert_close(other.norm.running_var, layer.norm.running_var)


def test_eval_mode_is_per_position():
    torch.manual_seed(0)
    layer = randomize_norm(KDLayer(8, 12)).eval()
    x = torch.randn(4, 8)
    together, _ = layer(x)
    alone = torch.cat([layer(x[i : i + 1])[0] for i in range(4)])
    torch.testing.assert_close(together, alone)


@pytest.mark.parametrize(
    "x, mask, match",
    [
        (torch.randn(2, 7, 3, 3), None, "expects 8 channels at dim 1"),
        (torch.randn(2, 3, 7), None, r"\(batch, seq_len, 8\) token states"),
        (torch.randn(2, 8, 3, 3), torch.ones(2, 3), "only accepted with token inputs"),
        (torch.randn(2, 3, 8), torch.ones(2, 4), r"attention_mask must have shape \(2, 3\)"),
    ],
)
def test_bad_inputs(x, mask, match):
    with pytest.raises(ValueError, match=match):
        KDLayer(8, 12)(x, mask)


@pytest.mark.parametrize("kwargs", [{"hidden_size": 0, "num_templates": 4}, {"hidden_size": 4, "num_templates": 2.5}])
def test_bad_sizes(kwargs):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        KDLayer(**kwargs)


# ------------------------------------------------------------------------------------------------------ loss


def test_kd_layer_loss_is_batchmean_kl_over_positions():
    torch.manual_seed(0)
    scores, targets = torch.randn(10, 6), torch.softmax(3 * torch.randn(10, 6), -1)
    expected = F.kl_div(F.log_softmax(scores, -1), targets, reduction="batchmean")
    torch.testing.assert_close(kd_layer_loss(scores, targets), expected)
    torch.testing.assert_close(kd_layer_loss(scores, targets, reduction="sum"), expected * 10)
    assert kd_layer_loss(scores, targets, reduction="none").shape == (10,)
    assert kd_layer_loss(scores, torch.softmax(scores, -1)).abs().item() < 1e-6
    # One-hot targets against a -inf score where the target is 0: finite, 0 * log 0 = 0.
    scores[0, 1:] = -float("inf")
    one_hot = F.one_hot(torch.zeros(10, dtype=torch.long), 6).float()
    assert math.isfinite(kd_layer_loss(scores, one_hot).item())
    assert kd_layer_loss(scores[:0], targets[:0]).item() == 0.0


def test_kd_layer_loss_bad_shapes():
    with pytest.raises(ValueError, match="num_positions, num_templates"):
        kd_layer_loss(torch.randn(4, 3), torch.randn(4, 5))


# ------------------------------------------------------------------------------------------------------ CNN model

NUM_LABELS = 4


def tiny_kd_cnn(seed=0, templates=None, **kwargs):
    torch.manual_seed(seed)
    templates = {"penultimate": 16, "intermediate": 2 * NUM_LABELS} if templates is None else templates
    config = KDLayerImageConfig(
        stem_channels=4, stage_channels=[4, 8], num_labels=NUM_LABELS, image_size=16, kd_layer_templates=templates,
        **kwargs,
    )
    return KDLayerForImageClassification(config)


def test_cnn_locations_scores_and_features():
    model = tiny_kd_cnn().train()
    x = torch.rand(3, 1, 16, 16)
    out = model(x, labels=torch.tensor([0, 1, 2]), output_kd_features=True, output_hidden_states=True)
    assert out.logits.shape == (3, NUM_LABELS)
    assert out.kd_layer_scores["penultimate"].shape == (3 * 4 * 4, 16)
    assert out.kd_layer_scores["intermediate"].shape == (3 * 4 * 4, 8)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, torch.tensor([0, 1, 2])))
    # intermediate = after the first block of the last stage; penultimate = its output before its KD layer.
    with torch.no_grad():
        h = model.stages[0](model.stem(x))
        first = model.stages[1][0](h)
        torch.testing.assert_close(out.kd_features["intermediate"], first)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (3, 8, 4, 4)


def test_cnn_classifier_reads_the_transformed_features():
    """With residual weights 0 the KD layers are identities: the logits equal those of the same CNN without them."""
    model = tiny_kd_cnn(kd_layer_residual_weights={"penultimate": 0.0, "intermediate": 0.0}).eval()
    plain_config = {**model.config.to_dict(), "kd_layer_templates": {}, "kd_layer_residual_weights": {}}
    plain = KDLayerForImageClassification(KDLayerImageConfig(**plain_config))
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("kd_layers.") for k in unexpected)
    plain.eval()
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(model(x).logits, plain(x).logits)
    active = tiny_kd_cnn().eval()
    active.load_state_dict(model.state_dict())
    assert not torch.allclose(active(x).logits, plain(x).logits)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kd_layer_templates": {"final": 4}}, r"Unknown KD layer location\(s\) \['final'\]"),
        ({"kd_layer_templates": {"penultimate": 0}}, r"kd_layer_templates\['penultimate'\] must be an integer >= 1"),
        ({"kd_layer_templates": [4]}, "must be a dict"),
        ({"kd_layer_templates": {"intermediate": 8}, "convs_per_stage": 1}, "needs convs_per_stage >= 2"),
        ({"kd_layer_templates": {"penultimate": 8}, "kd_layer_residual_weights": {"intermediate": 1.0}},
         "without a KD layer"),
        ({"kd_layer_templates": {"penultimate": 8}, "kd_layer_residual_weights": {"penultimate": -1}}, ">= 0"),
        ({"kd_layer_score_scale": 0}, "kd_layer_score_scale must be > 0"),
    ],
)
def test_cnn_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KDLayerImageConfig(num_labels=4, **kwargs)


def assert_no_hf_kd_imports(folder, names):
    for name in names:
        source = (folder / f"{name}.py").read_text()
        assert not re.search(r"^\s*(from|import)\s+hf_kd", source, flags=re.MULTILINE), name


def test_cnn_save_load_round_trip_auto_class_and_remote_code(tmp_path):
    model = tiny_kd_cnn(id2label={i: f"c{i}" for i in range(NUM_LABELS)})
    model.train()
    model(torch.rand(8, 1, 16, 16))  # non-trivial BatchNorm running statistics
    model.eval()
    x = torch.rand(3, 1, 16, 16)
    before = model(x).logits
    model.save_pretrained(tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["model_type"] == "hf_kd_kd_layer_cnn"
    assert config_json["kd_layer_templates"] == {"intermediate": 8, "penultimate": 16}
    assert config_json["auto_map"]["AutoModelForImageClassification"] == (
        "modeling_kd_layer_cnn.KDLayerForImageClassification"
    )
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is KDLayerForImageClassification and loaded.config.id2label[3] == "c3"
    assert torch.equal(loaded(x).logits, before)
    assert_no_hf_kd_imports(tmp_path, ["modeling_kd_layer_cnn", "configuration_kd_layer_cnn", "kd_layer"])
    remote_class = get_class_from_dynamic_module(config_json["auto_map"]["AutoModelForImageClassification"], tmp_path)
    assert remote_class is not KDLayerForImageClassification
    torch.testing.assert_close(remote_class.from_pretrained(tmp_path).eval()(x).logits, before)


# ------------------------------------------------------------------------------------------------------ sequence model


def tiny_wrapper(templates=None, residual=None, seed=0, **kwargs):
    backbone = tiny_bert(layers=3, seed=seed)
    templates = {"penultimate": 16, "intermediate": 4} if templates is None else templates
    model = KDLayerForSequenceClassification.from_backbone(
        backbone, kd_layer_templates=templates, kd_layer_residual_weights=residual, **kwargs
    )
    return backbone, model


def batch_with_padding():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 99, (3, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    return ids * mask, mask


def test_sequence_config_defaults_and_errors():
    backbone = tiny_bert(layers=3).config
    config = KDLayerConfig(backbone_config=backbone, kd_layer_templates={"penultimate": 8, "intermediate": 4})
    assert config.intermediate_layer == 2 and config.num_labels == 2 and config.kd_layer_residual_weights == {
        "intermediate": 1.0, "penultimate": 1.0}
    with pytest.raises(ValueError, match=r"intermediate_layer must be an integer in \[1, 2\]"):
        KDLayerConfig(backbone_config=backbone, kd_layer_templates={"intermediate": 4}, intermediate_layer=3)
    with pytest.raises(ValueError, match="needs a backbone with >= 2 layers"):
        KDLayerConfig(backbone_config=tiny_bert(layers=1).config, kd_layer_templates={"intermediate": 4})
    with pytest.raises(ValueError, match="must contain a 'model_type'"):
        KDLayerConfig(backbone_config={"hidden_size": 4})


def test_zero_residual_wrapper_equals_its_backbone():
    backbone, model = tiny_wrapper(residual={"penultimate": 0.0, "intermediate": 0.0})
    backbone.eval(), model.eval()
    ids, mask = batch_with_padding()
    out = model(input_ids=ids, attention_mask=mask, output_kd_features=True)
    plain = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(out.logits, plain.logits)
    # The features entering the KD layers are the backbone's states after layer 2 and layer 3.
    torch.testing.assert_close(out.kd_features["intermediate"], plain.hidden_states[2])
    torch.testing.assert_close(out.kd_features["penultimate"], plain.hidden_states[3])
    assert out.kd_layer_scores["penultimate"].shape == (15, 16) and out.kd_layer_scores["intermediate"].shape == (15, 4)


def test_kd_layers_feed_the_next_layers_and_the_head():
    _, model = tiny_wrapper(templates={"intermediate": 4}, residual={"intermediate": 1.0})
    model.eval()
    ids, mask = batch_with_padding()
    out = model(input_ids=ids, attention_mask=mask, output_kd_features=True, output_hidden_states=True)
    transformed, _ = model.kd_layers["intermediate"](out.kd_features["intermediate"], mask)
    # hidden_states[2] is the transformed output of layer 2: what layer 3 reads.
    torch.testing.assert_close(out.hidden_states[2], transformed)
    layer3 = model.backbone.bert.encoder.layer[2]
    from transformers.masking_utils import create_bidirectional_mask

    extended = create_bidirectional_mask(config=model.backbone.config, inputs_embeds=transformed, attention_mask=mask)
    torch.testing.assert_close(out.hidden_states[3], layer3(transformed, extended))


def test_padding_does_not_change_predictions():
    _, model = tiny_wrapper()
    model.train()
    model(input_ids=torch.randint(5, 99, (6, 5)))  # non-trivial running statistics
    model.eval()
    ids, mask = batch_with_padding()
    padded = model(input_ids=ids, attention_mask=mask).logits
    for row in range(3):
        length = int(mask[row].sum())
        alone = model(input_ids=ids[row : row + 1, :length]).logits
        torch.testing.assert_close(padded[row : row + 1], alone, atol=1e-5, rtol=1e-4)


def test_deepcopy_hooks_call_the_copy():
    _, model = tiny_wrapper()
    model.eval()
    ids, mask = batch_with_padding()
    before = model(input_ids=ids, attention_mask=mask).logits
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.kd_layers["penultimate"].values.scale.fill_(50.0)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    assert not torch.allclose(clone(input_ids=ids, attention_mask=mask).logits, before)


def test_sequence_save_load_round_trip_auto_class_and_remote_code(tmp_path):
    _, model = tiny_wrapper()
    model.eval()
    ids, mask = batch_with_padding()
    before = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["model_type"] == "hf_kd_kd_layer" and config_json["intermediate_layer"] == 2
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is KDLayerForSequenceClassification
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, before)
    assert_no_hf_kd_imports(tmp_path, ["modeling_kd_layer", "configuration_kd_layer", "kd_layer"])
    remote_class = get_class_from_dynamic_module(
        config_json["auto_map"]["AutoModelForSequenceClassification"], tmp_path
    )
    assert remote_class is not KDLayerForSequenceClassification
    remote = remote_class.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(remote(input_ids=ids, attention_mask=mask).logits, before)


def test_from_backbone_needs_encoder_layers():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    gpt = GPT2ForSequenceClassification(GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=20, pad_token_id=0))
    with pytest.raises(ValueError, match=r"no transformer layers at '\*\.encoder\.layer'"):
        KDLayerForSequenceClassification.from_backbone(gpt, kd_layer_templates={"penultimate": 4})


def test_return_dict_false_gives_the_output_as_a_tuple():
    # transformers' can_return_tuple handles return_dict (the argument, else config.return_dict) for both KD-layer models.
    _, model = tiny_wrapper()
    ids, mask = batch_with_padding()
    labels = torch.tensor([0, 1, 1])
    output = model.eval()(input_ids=ids, attention_mask=mask, labels=labels, output_kd_features=True)
    as_tuple = model(input_ids=ids, attention_mask=mask, labels=labels, output_kd_features=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(output.to_tuple())
    assert torch.equal(as_tuple[0], output.loss) and torch.equal(as_tuple[1], output.logits)
    cnn = tiny_kd_cnn().eval()
    pixels = torch.randn(2, cnn.config.num_channels, 16, 16)
    cnn.config.return_dict = False
    loss, logits = cnn(pixels, labels=torch.tensor([0, 1]))[:2]
    cnn.config.return_dict = True
    output = cnn(pixels, labels=torch.tensor([0, 1]))
    assert torch.equal(loss, output.loss) and torch.equal(logits, output.logits)
