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
