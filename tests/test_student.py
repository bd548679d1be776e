import pytest
import torch

from hf_kd.student import every_other_layer, student_from_teacher_layers

from .testing_utils import tiny_bert


def test_every_other_layer_ends_with_last():
    assert every_other_layer(6) == [1, 3, 5]
    assert every_other_layer(5) == [0, 2, 4]
    with pytest.raises(ValueError, match="got 1"):
        every_other_layer(1)


def test_keeping_all_layers_reproduces_the_teacher():
    teacher = tiny_bert(layers=4, seed=3).eval()
    student = student_from_teacher_layers(teacher, [0, 1, 2, 3]).eval()
    ids = torch.randint(5, 99, (2, 7))
    torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_kept_layers_are_copied_in_order(tmp_path):
    teacher = tiny_bert(layers=4, seed=3)
    student = student_from_teacher_layers(teacher)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    for new, old in enumerate([1, 3]):
        for (name, p_s), (_, p_t) in zip(student.bert.encoder.layer[new].named_parameters(),
                                         teacher.bert.encoder.layer[old].named_parameters()):
            assert torch.equal(p_s, p_t), name
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    # An independent copy that reloads as an ordinary model.
    student.classifier.weight.data.zero_()
    assert teacher.classifier.weight.abs().sum() > 0
    student.save_pretrained(tmp_path)
    reloaded = type(student).from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 2


@pytest.mark.parametrize("layers", [[0, 4], [2, 1], [], [1, 1]])
def test_bad_layer_lists(layers):
    with pytest.raises(ValueError, match="strictly increasing indices in \\[0, 4\\)"):
        student_from_teacher_layers(tiny_bert(layers=4), layers)


# ----- decoder-only causal LMs -----

from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

from hf_kd.student import block_influence, drop_layers, evenly_spaced_layers, make_student  # noqa: E402

from .testing_utils import causal_lm, causal_lm_tokenizer, tiny_llama  # noqa: E402


def _make_identity(layer):
    """Zero the residual branches' output projections: the layer then returns its input unchanged."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(30, 15) == list(range(1, 30, 2)) == every_other_layer(30)
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_layers(6, 2) == [2, 5]
    assert evenly_spaced_layers(5, 1) == [4]
    with pytest.raises(ValueError, match=r"num_kept must be in \[1, 4\].*got 5"):
        evenly_spaced_layers(4, 5)


def test_drop_layers_shapes_indices_and_weights():
    teacher = tiny_llama().eval()
    student = drop_layers(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert len(teacher.model.layers) == 4  # the teacher is untouched
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    assert [layer.self_attn.layer_idx for layer in teacher.model.layers] == [0, 1, 2, 3]
    for new, old in enumerate([0, 3]):
        for (name, p_s), (_, p_t) in zip(student.model.layers[new].named_parameters(),
                                         teacher.model.layers[old].named_parameters()):
            assert torch.equal(p_s, p_t) and p_s.data_ptr() != p_t.data_ptr(), name
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    ids = torch.randint(3, 64, (2, 9))
    with torch.no_grad():
        assert student(input_ids=ids).logits.shape == (2, 9, 64)


def test_dropping_an_identity_layer_changes_nothing():
    teacher = tiny_llama(seed=1).eval()
    _make_identity(teacher.model.layers[2])
    student = drop_layers(teacher, [0, 1, 3])
    ids = torch.randint(3, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_dropped_student_generates_with_its_kv_cache():
    student = drop_layers(tiny_llama(seed=2).eval(), [1, 3])
    prompt = torch.randint(3, 64, (2, 5))
    mask = torch.ones_like(prompt)
    mask[0, 0] = 0  # left padding
    options = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = student.generate(prompt, use_cache=True, **options)
    without_cache = student.generate(prompt, use_cache=False, **options)
    assert with_cache.shape == (2, 13)
    assert torch.equal(with_cache, without_cache)


def test_drop_layers_keeps_layer_types_consistent(tmp_path):
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"], pad_token_id=0,
    )
    teacher = Gemma3ForCausalLM(config).eval()
    student = drop_layers(teacher, [1, 2])
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    prompt = torch.randint(3, 64, (1, 6))
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    generated = student.generate(prompt, use_cache=True, **options)
    assert torch.equal(generated, student.generate(prompt, use_cache=False, **options))
    student.save_pretrained(tmp_path)
    reloaded = Gemma3ForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == ["full_attention", "sliding_attention"]
    assert torch.equal(reloaded.generate(prompt, use_cache=True, **options), generated)


def test_block_influence_finds_the_identity_layer():
    teacher = tiny_llama(seed=3).eval()
    _make_identity(teacher.model.layers[2])
    ids = torch.randint(3, 64, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    scores = block_influence(teacher, ids, mask, batch_size=2)
    assert scores.shape == (4,)
    assert scores[2].item() == pytest.approx(0.0, abs=1e-6)
    assert (scores[[0, 1, 3]] > 1e-3).all()
    # The mean is over real tokens only: garbage in the padded positions does not move it.
    poisoned = ids.clone()
    poisoned[1, :4] = 63
    torch.testing.assert_close(block_influence(teacher, poisoned, mask), scores, atol=1e-5, rtol=0)
    assert teacher.training is False

    student = make_student(teacher, 3, rule="block_influence", calibration={"input_ids": ids, "attention_mask": mask})
    assert student.config.hf_kd_kept_layers == [0, 1, 3]
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_make_student_every_other_and_errors():
    teacher = tiny_llama().eval()
    assert make_student(teacher, 2).config.hf_kd_kept_layers == [1, 3]
    with pytest.raises(ValueError, match="rule must be one of"):
        make_student(teacher, 2, rule="random")
    with pytest.raises(ValueError, match="needs calibration text"):
        make_student(teacher, 2, rule="block_influence")
    with pytest.raises(ValueError, match="only used by rule='block_influence'"):
        make_student(teacher, 2, calibration=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 4\]"):
        make_student(teacher, 0, rule="block_influence", calibration=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"strictly increasing indices in \[0, 4\)"):
        drop_layers(teacher, [2, 1])
    with pytest.raises(ValueError, match="no decoder layers"):
        drop_layers(tiny_bert(layers=2), [0])


@pytest.mark.slow
def test_smollm2_student_with_half_the_layers_generates_and_reloads(tmp_path):
    model, tokenizer = causal_lm(), causal_lm_tokenizer()
    student = make_student(model, 15)
    assert student.config.num_hidden_layers == 15 and model.config.num_hidden_layers == 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    options = dict(max_new_tokens=6, do_sample=False)
    generated = student.generate(**inputs, **options)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    student.save_pretrained(tmp_path)
    reloaded = type(student).from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 15 and reloaded.config.hf_kd_kept_layers == list(range(1, 30, 2))
    assert torch.equal(reloaded.generate(**inputs, **options), generated)
    assert sum(p.numel() for p in reloaded.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())


def test_make_student_of_a_frozen_teacher_is_trainable():
    """A teacher frozen by an earlier trainer (requires_grad=False) still gives a student whose weights all train."""
    teacher = tiny_llama(layers=4).requires_grad_(False)
    student = make_student(teacher, 2)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
