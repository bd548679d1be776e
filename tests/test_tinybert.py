"""TinyBERT's pure pieces ([`hf_kd.tinybert`]): layer maps, losses against naive references, pre-softmax attention
scores against transformers' eager attention, the projection's initialisation."""


import pytest
import torch
from torch.nn import functional as F

from hf_kd.tinybert import (
    IntermediateProjection,
    attention_score_mse,
    check_layer_map,
    encoder_layers,
    hidden_state_mse,
    record_attention_scores,
    self_attention_module,
    uniform_layer_map,
)

from .testing_utils import hooked_scores, tiny_bert, tiny_mpnet, tinybert_masked


def padded_batch():
    ids = torch.tensor([[2, 5, 6, 7, 8, 3], [2, 9, 10, 3, 0, 0], [2, 11, 3, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class SoftmaxInputs:
    """Records what every `torch.nn.functional.softmax` call receives: in an eager attention forward, the scores."""

    def __init__(self, monkeypatch):
        self.inputs, original = [], F.softmax

        def softmax(x, *args, **kwargs):
            self.inputs.append(x.detach().clone())
            return original(x, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "softmax", softmax)


# ---- layer maps --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "student, teacher, expected",
    [(4, 12, [3, 6, 9, 12]), (6, 12, [2, 4, 6, 8, 10, 12]), (3, 6, [2, 4, 6]), (4, 6, [2, 3, 5, 6]),
     (6, 3, [1, 1, 2, 2, 3, 3]), (1, 1, [1]), (6, 6, [1, 2, 3, 4, 5, 6])],
)
def test_uniform_layer_map(student, teacher, expected):
    assert uniform_layer_map(student, teacher) == expected
    if teacher % student == 0:  # TinyBERT's code: student layer i (0-based) <- teacher_atts[i * lpb + lpb - 1]
        lpb = teacher // student
        assert [i * lpb + lpb - 1 + 1 for i in range(student)] == expected


@pytest.mark.parametrize(
    "layer_map, message",
    [([0, 2, 4], r"in \[1, 6\].*got \[0\]"), ([2, 4, 7], r"got \[7\]"), ([2, 4], "the student has 3 layers, the map 2"),
     ([2, True, 4], r"got \[True\]")],
)
def test_bad_layer_map_is_named(layer_map, message):
    with pytest.raises(ValueError, match=message):
        check_layer_map(layer_map, 3, 6)
    assert check_layer_map([1, 1, 6], 3, 6) == [1, 1, 6]


# ---- losses ------------------------------------------------------------------------------------------------------


class TestHiddenStateMse:
    def test_without_padding_is_elementwise_mse(self):
        s, t = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
        torch.testing.assert_close(hidden_state_mse(s, t), F.mse_loss(s, t))
        torch.testing.assert_close(hidden_state_mse(s, t, torch.ones(3, 5)), F.mse_loss(s, t))

    def test_padding_is_ignored(self):
        s, t, mask = torch.randn(3, 6, 8), torch.randn(3, 6, 8), padded_batch()["attention_mask"]
        naive = torch.stack([F.mse_loss(s[i, mask[i] == 1], t[i, mask[i] == 1]) for i in range(3)])
        torch.testing.assert_close(hidden_state_mse(s, t, mask, reduction="none"), naive)
        torch.testing.assert_close(hidden_state_mse(s, t, mask), naive.mean())
        # Whatever sits at padded positions changes nothing.
        s2 = s.clone()
        s2[mask == 0] = 100.0
        torch.testing.assert_close(hidden_state_mse(s2, t, mask), naive.mean())

    def test_item_mask_and_num_items(self):
        s, t = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
        per_item = hidden_state_mse(s, t, reduction="none")
        items = torch.tensor([True, False, True, True])
        torch.testing.assert_close(hidden_state_mse(s, t, item_mask=items), per_item[items].mean())
        torch.testing.assert_close(hidden_state_mse(s, t, item_mask=items, num_items_in_batch=10), per_item[items].sum() / 10)
        assert hidden_state_mse(s, t, item_mask=items, reduction="none")[1] == 0

    def test_shape_mismatch_is_an_error(self):
        with pytest.raises(ValueError, match="project the student to the teacher's width"):
            hidden_state_mse(torch.randn(2, 5, 8), torch.randn(2, 5, 16))


class TestAttentionScoreMse:
    def test_without_padding_is_tinybert_formula(self):
        s, t = torch.randn(2, 4, 5, 5) * 3, torch.randn(2, 4, 5, 5) * 3
        s[0, 0, 0, 0], t[1, 2, 3, 4] = -150.0, -1e4  # TinyBERT zeroes every score <= -100, masked or not
        expected = F.mse_loss(tinybert_masked(s), tinybert_masked(t))
        torch.testing.assert_close(attention_score_mse(s, t), expected)

    def test_padding_pairs_are_ignored(self):
        mask = padded_batch()["attention_mask"]
        s, t = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
        additive = (1 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        naive = []
        for i in range(3):
            n = int(mask[i].sum())
            naive.append(F.mse_loss(s[i, :, :n, :n], t[i, :, :n, :n]))
        got = attention_score_mse(s + additive, t + additive, mask, reduction="none")
        torch.testing.assert_close(got, torch.stack(naive))


# ---- pre-softmax attention scores --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_scores_equal_eager_softmax_inputs(monkeypatch, family):
    """The hooked scores are exactly what eager attention feeds its softmax (mask included), for BERT-style and MPNet
    (relative position bias) self-attention, with padding."""
    model = tiny_bert(layers=3, hidden=32) if family == "bert" else tiny_mpnet(layers=3)
    model.set_attn_implementation("eager")
    model.eval()
    batch = padded_batch()
    recorder = SoftmaxInputs(monkeypatch)
    with torch.no_grad():
        scores = hooked_scores(model, batch)
    assert len(recorder.inputs) == 3
    for ours, eager in zip(scores, recorder.inputs, strict=True):
        assert ours.shape == eager.shape == (3, 4, 6, 6)
        torch.testing.assert_close(tinybert_masked(ours), tinybert_masked(eager), atol=1e-5, rtol=1e-5)
        assert torch.equal(ours <= -100, eager <= -100)
    assert (scores[0][1, :, :, 4:] <= -100).all() and (scores[0][1, :, :, :4] > -100).all()  # padded keys masked


def test_sdpa_model_gives_eager_scores():
    """Same weights, SDPA vs eager kernels (the SDPA mask is boolean, or None without padding): same scores."""
    sdpa, eager = tiny_bert(layers=2), tiny_bert(layers=2)
    eager.set_attn_implementation("eager")
    assert sdpa.config._attn_implementation == "sdpa"
    for batch in (padded_batch(), {"input_ids": padded_batch()["input_ids"][:1]}):
        with torch.no_grad():
            for a, b in zip(hooked_scores(sdpa, batch), hooked_scores(eager, batch), strict=True):
                torch.testing.assert_close(tinybert_masked(a), tinybert_masked(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compute_in_forward", [False, True])
def test_scores_carry_gradients(compute_in_forward):
    model = tiny_bert(layers=2)
    model.train()
    layers = encoder_layers(model)
    modules = {i + 1: self_attention_module(layer) for i, layer in enumerate(layers)}
    with record_attention_scores(modules, compute_in_forward=compute_in_forward) as scores:
        model(**padded_batch())
    (scores[1].sum() + scores[2].sum()).backward()
    for layer in layers:
        assert layer.attention.self.query.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_scores_under_gradient_checkpointing(use_reentrant):
    """Under either kind of activation checkpointing the scores (computed after the forward from the layers' real
    inputs) get the same gradients as without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_bert(layers=2)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        scores = hooked_scores(model, padded_batch())
        (tinybert_masked(scores[0]).pow(2).mean() + tinybert_masked(scores[1]).pow(2).mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and any("layer.0.attention.self.query" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_unsupported_models_are_named():
    with pytest.raises(ValueError, match="encoder.layer"):
        encoder_layers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="attention_loss_weight=0"):
        self_attention_module(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_projection_init():
    square = IntermediateProjection(8, 8)
    torch.testing.assert_close(square.dense.weight, torch.eye(8))
    wide = IntermediateProjection(8, 16, init_std=0.02)
    assert wide.dense.weight.shape == (16, 8) and wide.dense.bias.abs().sum() == 0
    assert 0.01 < wide.dense.weight.std() < 0.03
    assert list(IntermediateProjection(8, 8, "identity").parameters()) == []
    with pytest.raises(ValueError, match="needs equal widths.*8.*16"):
        IntermediateProjection(8, 16, "identity")
