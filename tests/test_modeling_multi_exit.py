"""Multi-exit sequence classifier: config, forward/loss, save/load + Auto classes, and real early-exit inference."""

import json

import pytest
import torch
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    ResNetConfig,
)

from hf_kd import ExitPolicy, MultiExitConfig, MultiExitForSequenceClassification
from hf_kd.early_exit import (
    NO_EXIT_THRESHOLD,
    budget_exit_fractions,
    fit_budget_thresholds,
    model_internal_ensemble,
    simulate_exits,
)

from .testing_utils import MULTI_EXIT_NUM_LABELS as NUM_LABELS
from .testing_utils import TEXT_BATCH as BATCH
from .testing_utils import TEXT_SEQ as SEQ
from .testing_utils import padded_text_batch, text_inputs_for, tiny_backbone_config, tiny_eval_multi_exit

# --------------------------------------------------------------------------------------------------- config


def test_config_defaults_and_final_exit():
    config = MultiExitConfig(backbone_config=tiny_backbone_config(), num_labels=NUM_LABELS)
    assert config.exit_layers == [1, 2, 3]
    assert config.exit_head_type == "linear"
    assert config.normalized_exit_loss_weights == pytest.approx([1 / 3] * 3)
    config = MultiExitConfig(backbone_config=tiny_backbone_config().to_dict(), exit_layers=[2, 1, 2])
    assert config.exit_layers == [1, 2, 3]  # sorted, deduplicated, final layer added
    assert isinstance(config.backbone_config, BertConfig)
    config = MultiExitConfig(backbone_config=tiny_backbone_config(), exit_layers=[1], exit_loss_weights=[1, 3])
    assert config.normalized_exit_loss_weights == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize("bad", [0, 4, -1])
def test_config_bad_exit_layer_names_value_and_depth(bad):
    with pytest.raises(ValueError, match=rf"exit layer {bad} .*3 layers"):
        MultiExitConfig(backbone_config=tiny_backbone_config(), exit_layers=[1, bad])


def test_config_other_errors():
    with pytest.raises(ValueError, match="num_hidden_layers"):
        MultiExitConfig(backbone_config=ResNetConfig())
    with pytest.raises(ValueError, match="exit_head_type"):
        MultiExitConfig(backbone_config=tiny_backbone_config(), exit_head_type="mlp")
    with pytest.raises(ValueError, match=r"exit_pooling must be one of \('mean', 'cls'\), got 'max'"):
        MultiExitConfig(backbone_config=tiny_backbone_config(), exit_pooling="max")
    with pytest.raises(ValueError, match="2 weights but there are 3 exits"):
        MultiExitConfig(backbone_config=tiny_backbone_config(), exit_loss_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="model_type"):
        MultiExitConfig(backbone_config={"hidden_size": 32})


# --------------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_forward_shapes_and_loss_only_with_labels(kind):
    model = tiny_eval_multi_exit(kind, exit_layers=[1], exit_loss_weights=[1.0, 3.0])
    input_ids, attention_mask = text_inputs_for(kind)
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    assert out.loss is None and out.hidden_states is None
    assert out.logits.shape == (BATCH, NUM_LABELS)
    assert len(out.exit_logits) == 2 and all(z.shape == (BATCH, NUM_LABELS) for z in out.exit_logits)
    assert torch.equal(out.logits, out.exit_logits[-1])

    labels = torch.randint(0, NUM_LABELS, (BATCH,))
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True)
    expected = 0.25 * F.cross_entropy(out.exit_logits[0], labels) + 0.75 * F.cross_entropy(out.exit_logits[1], labels)
    torch.testing.assert_close(out.loss, expected)
    assert len(out.hidden_states) == 4
    out.loss.backward()
    assert model.exits[0].classifier.weight.grad is not None

    loss, logits, exit_logits = model(
        input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_dict=False
    )
    torch.testing.assert_close(logits, exit_logits[-1])


def test_exit_pooling_reads_masked_mean_or_first_token():
    input_ids, attention_mask = padded_text_batch()
    for pooling in ("mean", "cls"):
        model = tiny_eval_multi_exit(exit_pooling=pooling)
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        h = out.hidden_states[model.config.exit_layers[0]]  # (B, L, hidden)
        if pooling == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).float()
            pooled = (h * m).sum(1) / m.sum(1)
        torch.testing.assert_close(out.exit_logits[0], model.exits[0].classifier(pooled))
    # Padding does not change a row's mean-pooled exits: the same row alone, unpadded, gives the same logits.
    model = tiny_eval_multi_exit(exit_pooling="mean")
    row = int((attention_mask.sum(-1) < attention_mask.shape[1]).nonzero()[0])
    length = int(attention_mask[row].sum())
    alone = model(input_ids=input_ids[row : row + 1, :length])
    batched = model(input_ids=input_ids, attention_mask=attention_mask)
    for a, b in zip(alone.exit_logits, batched.exit_logits):
        torch.testing.assert_close(a[0], b[row], atol=1e-5, rtol=0)


def test_pooler_head():
    model = tiny_eval_multi_exit(exit_head_type="pooler")
    assert model.exits[0].dense is not None
    input_ids, attention_mask = padded_text_batch()
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    pred = model.predict_with_exits(input_ids, attention_mask, threshold=1.0)
    torch.testing.assert_close(pred.logits, out.logits, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------- save / load / Auto


def test_save_load_round_trip_and_auto_class(tmp_path):
    model = tiny_eval_multi_exit(exit_layers=[2], id2label={0: "a", 1: "b", 2: "c"})
    input_ids, attention_mask = padded_text_batch()
    before = model(input_ids=input_ids, attention_mask=attention_mask)
    model.save_pretrained(tmp_path)

    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["model_type"] == "hf_kd_multi_exit"
    assert config_json["auto_map"]["AutoModelForSequenceClassification"].endswith("MultiExitForSequenceClassification")
    assert config_json["auto_map"]["AutoConfig"].endswith("MultiExitConfig")
    assert config_json["backbone_config"]["model_type"] == "bert"

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MultiExitConfig) and config.exit_layers == [2, 3] and config.num_labels == NUM_LABELS
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is MultiExitForSequenceClassification
    after = loaded(input_ids=input_ids, attention_mask=attention_mask)
    for a, b in zip(before.exit_logits, after.exit_logits):
        assert torch.equal(a, b)
    assert loaded.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_from_backbone_model_and_path(tmp_path):
    torch.manual_seed(0)
    backbone = BertModel(tiny_backbone_config()).eval()
    backbone.save_pretrained(tmp_path)
    input_ids, attention_mask = padded_text_batch()
    reference = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    for source in (backbone, str(tmp_path)):
        model = MultiExitForSequenceClassification.from_backbone(source, exit_layers=[1], num_labels=4).eval()
        assert model.config.exit_layers == [1, 3] and model.config.num_labels == 4
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        torch.testing.assert_close(out.hidden_states[-1], reference)
        assert out.logits.shape == (BATCH, 4)
    with pytest.raises(TypeError):
        MultiExitForSequenceClassification.from_backbone(42)


# --------------------------------------------------------------------------------------------------- early exits


def expected_exits(exit_logits, policy, threshold=None, patience=None):
    """Per-row exit index implied by the full forward's exit logits (reference implementation of the policies)."""
    n_exits = len(exit_logits)
    result = []
    for row in range(exit_logits[0].shape[0]):
        counter, previous, chosen = 0, None, n_exits - 1
        for j in range(n_exits - 1):
            p = exit_logits[j][row].softmax(-1)
            if policy == "max_prob":
                fire = p.max().item() >= threshold
            elif policy == "entropy":
                fire = -(p * p.log()).sum().item() < threshold
            else:
                prediction = p.argmax().item()
                counter = counter + 1 if previous is not None and prediction == previous else 0
                previous = prediction
                fire = counter >= patience
            if fire:
                chosen = j
                break
        result.append(chosen)
    return torch.tensor(result)


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_never_exit_equals_final_logits(kind):
    model = tiny_eval_multi_exit(kind)
    input_ids, attention_mask = text_inputs_for(kind)
    full = model(input_ids=input_ids, attention_mask=attention_mask)
    pred = model.predict_with_exits(input_ids, attention_mask, policy="max_prob", threshold=1.0)
    torch.testing.assert_close(pred.logits, full.logits, atol=1e-5, rtol=0)
    assert pred.exit_layer.tolist() == [3] * BATCH and pred.exit_index.tolist() == [2] * BATCH
    assert pred.layers_run == 3 * BATCH
    pred = model.predict_with_exits(input_ids, attention_mask, policy=ExitPolicy.ENTROPY, threshold=0.0)
    torch.testing.assert_close(pred.logits, full.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_always_exit_first(kind):
    model = tiny_eval_multi_exit(kind, exit_layers=[2])
    input_ids, attention_mask = text_inputs_for(kind)
    full = model(input_ids=input_ids, attention_mask=attention_mask)
    for policy, threshold in (("max_prob", 0.0), ("entropy", 10.0)):
        pred = model.predict_with_exits(input_ids, attention_mask, policy=policy, threshold=threshold)
        torch.testing.assert_close(pred.logits, full.exit_logits[0], atol=1e-5, rtol=0)
        assert pred.exit_layer.tolist() == [2] * BATCH and pred.exit_index.tolist() == [0] * BATCH
        assert pred.layers_run == 2 * BATCH
        assert pred.flops < pred.full_flops


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
@pytest.mark.parametrize("policy", ["max_prob", "entropy"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_mixed_batch_matches_full_forward(kind, policy, pooling):
    model = tiny_eval_multi_exit(kind, sharpen=40.0, exit_pooling=pooling)
    input_ids, attention_mask = text_inputs_for(kind)
    full = model(input_ids=input_ids, attention_mask=attention_mask)
    probs = full.exit_logits[0].softmax(-1)
    if policy == "max_prob":
        threshold = probs.max(-1).values.median().item()
    else:
        threshold = (-(probs * probs.log()).sum(-1)).median().item() + 1e-6
    expected = expected_exits(full.exit_logits, policy, threshold=threshold)
    assert len(set(expected.tolist())) > 1, "the test batch should mix exits"

    pred = model.predict_with_exits(input_ids, attention_mask, policy=policy, threshold=threshold)
    assert torch.equal(pred.exit_index, expected)
    assert torch.equal(pred.exit_layer, torch.tensor(model.config.exit_layers)[expected])
    stacked = torch.stack(full.exit_logits)  # (num_exits, B, K)
    torch.testing.assert_close(pred.logits, stacked[expected, torch.arange(BATCH)], atol=1e-5, rtol=0)
    assert pred.layers_run == int(pred.exit_layer.sum())
    # Each layer runs on the rows still in the batch, trimmed to the longest of them (right padding).
    h, inter = 32, 37
    lengths = attention_mask.sum(-1)
    layers = 0.0
    for layer in range(1, model.config.backbone_config.num_hidden_layers + 1):
        running = pred.exit_layer >= layer
        length = int(lengths[running].max()) if running.any() else 0
        layers += int(running.sum()) * length * (8 * h * h + 4 * h * inter + 4 * length * h)
    heads = sum(int((pred.exit_index >= j).sum()) for j in range(3)) * 2 * h * NUM_LABELS
    assert pred.flops == pytest.approx(layers + heads)


@pytest.mark.parametrize("patience", [1, 2])
def test_patience_follows_pabee(patience):
    model = tiny_eval_multi_exit(sharpen=40.0)
    input_ids, attention_mask = padded_text_batch(seed=3)
    full = model(input_ids=input_ids, attention_mask=attention_mask)
    pred = model.predict_with_exits(input_ids, attention_mask, policy="patience", patience=patience)
    expected = expected_exits(full.exit_logits, "patience", patience=patience)
    assert torch.equal(pred.exit_index, expected)
    stacked = torch.stack(full.exit_logits)
    torch.testing.assert_close(pred.logits, stacked[expected, torch.arange(BATCH)], atol=1e-5, rtol=0)
    if patience == 2:  # 3 exits: the counter can reach 2 only at the final exit
        assert pred.exit_index.tolist() == [2] * BATCH
    agree = full.exit_logits[0].argmax(-1) == full.exit_logits[1].argmax(-1)
    if patience == 1:
        assert torch.equal(pred.exit_index == 1, agree)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"policy": "max_prob", "threshold": 1.5}, r"\[0, 1\]"),
        ({"policy": "max_prob", "threshold": -0.1}, r"\[0, 1\]"),
        ({"policy": "max_prob"}, "threshold"),
        ({"policy": "entropy", "threshold": -1.0}, ">= 0"),
        ({"policy": "entropy", "threshold": float("nan")}, "finite"),
        ({"policy": "patience", "patience": 0}, ">= 1"),
        ({"policy": "patience", "patience": 1.5}, ">= 1"),
        ({"policy": "patience"}, ">= 1"),
    ],
)
def test_bad_policy_arguments(kwargs, match):
    model = tiny_eval_multi_exit()
    input_ids, attention_mask = padded_text_batch()
    with pytest.raises(ValueError, match=match):
        model.predict_with_exits(input_ids, attention_mask, **kwargs)
    with pytest.raises(ValueError):
        model.predict_with_exits(input_ids, attention_mask, policy="confidence", threshold=0.5)


def test_unsupported_architecture_for_stepwise_inference():
    model = tiny_eval_multi_exit("roberta")
    input_ids, attention_mask = padded_text_batch(pad_id=1)
    assert model(input_ids=input_ids, attention_mask=attention_mask).logits.shape == (BATCH, NUM_LABELS)
    with pytest.raises(NotImplementedError, match="BERT-like"):
        model.predict_with_exits(input_ids, attention_mask, threshold=0.5)


# --------------------------------------------------------------------------------------------------- budget, MIE, trim


def exit_probs_of(full):
    return torch.stack([z.softmax(-1) for z in full.exit_logits])  # (num_exits, B, K)


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_budget_policy_matches_offline_simulation_and_forward(kind):
    model = tiny_eval_multi_exit(kind, sharpen=40.0)
    input_ids, attention_mask = text_inputs_for(kind)
    full = model(input_ids=input_ids, attention_mask=attention_mask)
    probs = exit_probs_of(full)
    thresholds = fit_budget_thresholds(probs.max(-1).values.T, budget_exit_fractions(12, 3))
    # Each fitted threshold is a confidence of the batch: move it off that example, away from float noise.
    thresholds = [t - 1e-6 for t in thresholds]
    expected = simulate_exits(probs, thresholds).exit_index
    assert len(set(expected.tolist())) > 1, "the test batch should mix exits"

    pred = model.predict_with_exits(input_ids, attention_mask, policy="budget", thresholds=thresholds)
    assert torch.equal(pred.exit_index, expected)
    stacked = torch.stack(full.exit_logits)
    torch.testing.assert_close(pred.logits, stacked[expected, torch.arange(BATCH)], atol=1e-5, rtol=0)
    torch.testing.assert_close(pred.probs, pred.logits.softmax(-1), atol=1e-6, rtol=0)
    # A threshold above 1 closes an exit; 0 sends everyone out there.
    pred = model.predict_with_exits(input_ids, attention_mask, policy="budget", thresholds=[NO_EXIT_THRESHOLD, 0.0])
    assert pred.exit_index.tolist() == [1] * BATCH


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
@pytest.mark.parametrize("policy", ["max_prob", "budget"])
def test_mie_matches_offline_ensemble(kind, policy):
    model = tiny_eval_multi_exit(kind, sharpen=40.0)
    input_ids, attention_mask = text_inputs_for(kind)
    full = model(input_ids=input_ids, attention_mask=attention_mask)
    ensembled = model_internal_ensemble(exit_probs_of(full), model.exit_flops(SEQ))  # (num_exits, B, K)
    confidences = ensembled.max(-1).values
    if policy == "max_prob":
        kwargs = {"threshold": confidences[0].median().item() - 1e-6}
    else:
        thresholds = fit_budget_thresholds(confidences.T, budget_exit_fractions(12, 3))
        kwargs = {"thresholds": [t - 1e-6 for t in thresholds]}  # off the batch's own confidences (float noise)
    expected = simulate_exits(ensembled, policy=policy, **kwargs)
    assert len(set(expected.exit_index.tolist())) > 1, "the test batch should mix exits"

    pred = model.predict_with_exits(input_ids, attention_mask, policy=policy, mie=True, **kwargs)
    assert torch.equal(pred.exit_index, expected.exit_index)
    torch.testing.assert_close(pred.probs, expected.probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(pred.logits, pred.probs.log(), atol=1e-5, rtol=0)  # logits of the ensemble
    # At the first exit the ensemble is the exit itself.
    first = pred.exit_index == 0
    torch.testing.assert_close(pred.probs[first], full.exit_logits[0][first].softmax(-1), atol=1e-5, rtol=0)


def test_exit_flops_formula():
    model = tiny_eval_multi_exit(exit_layers=[1])
    h, inter = 32, 37
    per_row_layer = 5 * (8 * h * h + 4 * h * inter + 4 * 5 * h)
    head = 2 * h * NUM_LABELS
    assert model.exit_flops(5) == pytest.approx([per_row_layer + head, 3 * per_row_layer + 2 * head])
    with pytest.raises(ValueError, match="seq_len"):
        model.exit_flops(0)


def long_row_leaves_first_batch(model, kind):
    """A right-padded batch where only row 0 is full length and leaves at the first exit (with `threshold`), while
    others go on: after the first exit the sequence can be cut."""
    for seed in range(20):
        input_ids, attention_mask = padded_text_batch(seed=seed, pad_id=1 if kind == "mpnet" else 0)
        attention_mask[1:, SEQ - 2 :] = 0  # only row 0 reaches the last 2 positions
        input_ids[attention_mask == 0] = 1 if kind == "mpnet" else 0
        full = model(input_ids=input_ids, attention_mask=attention_mask)
        conf = full.exit_logits[0].softmax(-1).max(-1).values
        threshold = conf[0].item() - 1e-6
        if (conf < threshold).any() and not ((conf >= threshold) & (conf < conf[0] + 1e-5)).sum() > 1:
            return input_ids, attention_mask, full, threshold
    raise AssertionError("no batch found")


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_trims_right_padding_after_rows_leave(kind):
    model = tiny_eval_multi_exit(kind, sharpen=40.0)
    input_ids, attention_mask, full, threshold = long_row_leaves_first_batch(model, kind)
    pred = model.predict_with_exits(input_ids, attention_mask, policy="max_prob", threshold=threshold)
    expected = expected_exits(full.exit_logits, "max_prob", threshold=threshold)
    assert torch.equal(pred.exit_index, expected) and expected[0] == 0
    stacked = torch.stack(full.exit_logits)
    torch.testing.assert_close(pred.logits, stacked[expected, torch.arange(BATCH)], atol=1e-5, rtol=0)

    # FLOPs: layer 1 at the full length; later layers at the longest row still running.
    h, inter = 32, 37
    lengths = attention_mask.sum(-1)

    def per_row(length):
        return length * (8 * h * h + 4 * h * inter + 4 * length * h)

    running = [pred.exit_layer >= layer for layer in (1, 2, 3)]
    layer_flops = BATCH * per_row(SEQ) + sum(
        int(rows.sum()) * per_row(int(lengths[rows].max())) for rows in running[1:] if rows.any()
    )
    heads = sum(int(rows.sum()) for rows in running) * 2 * h * NUM_LABELS
    assert pred.flops == pytest.approx(layer_flops + heads)
    assert pred.flops < pred.layers_run * per_row(SEQ) + heads  # the cut saved work

    # Left padding is never cut: same exits and logits, FLOPs at the padded length.
    left_ids, left_mask = input_ids.flip(-1), attention_mask.flip(-1)
    full_left = model(input_ids=left_ids, attention_mask=left_mask)
    pred = model.predict_with_exits(left_ids, left_mask, policy="max_prob", threshold=threshold)
    expected = expected_exits(full_left.exit_logits, "max_prob", threshold=threshold)
    assert torch.equal(pred.exit_index, expected)
    stacked = torch.stack(full_left.exit_logits)
    torch.testing.assert_close(pred.logits, stacked[expected, torch.arange(BATCH)], atol=1e-5, rtol=0)
    heads = sum(int((pred.exit_index >= j).sum()) for j in range(3)) * 2 * h * NUM_LABELS
    assert pred.flops == pytest.approx(pred.layers_run * per_row(SEQ) + heads)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"policy": "budget", "thresholds": [0.5]}, r"needs 2 thresholds, one per non-final exit of the 3 exits"),
        ({"policy": "budget", "thresholds": [0.5, 0.5, 0.5]}, r"needs 2 thresholds.*got 3 values"),
        ({"policy": "budget", "thresholds": [0.5, float("nan")]}, "finite, got nan at index 1"),
        ({"policy": "budget", "thresholds": [float("inf"), 0.5]}, "finite, got inf at index 0"),
        ({"policy": "budget", "thresholds": [0.5, -1.0]}, ">= 0.*got -1.0 at index 1"),
        ({"policy": "budget"}, "needs thresholds="),
        ({"policy": "budget", "threshold": 0.5}, "threshold=0.5"),
        ({"policy": "max_prob", "threshold": 0.5, "thresholds": [0.5, 0.5]}, "only used by policy='budget'"),
        ({"policy": "max_prob", "threshold": 0.5, "mie": 1}, "mie must be True or False"),
    ],
)
def test_bad_budget_and_mie_arguments(kwargs, match):
    model = tiny_eval_multi_exit()
    input_ids, attention_mask = padded_text_batch()
    with pytest.raises(ValueError, match=match):
        model.predict_with_exits(input_ids, attention_mask, **kwargs)


def test_config_options_are_str_enums_stored_as_strings():
    from hf_kd.modeling.configuration_multi_exit import ExitHeadType, ExitPooling

    config = MultiExitConfig(
        backbone_config=tiny_backbone_config(), exit_head_type=ExitHeadType.POOLER, exit_pooling=ExitPooling.CLS
    )
    stored = config.to_dict()
    assert (stored["exit_head_type"], stored["exit_pooling"]) == ("pooler", "cls")
    assert type(stored["exit_head_type"]) is str and type(stored["exit_pooling"]) is str  # plain JSON strings
    model = MultiExitForSequenceClassification(config)
    assert model.exits[0].dense is not None and model.exits[0].pooling == ExitPooling.CLS
