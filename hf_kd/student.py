"""Making a smaller student from its teacher: keep a subset of the teacher's transformer layers.

DistilBERT (Sanh et al., 2019, https://huggingface.co/papers/1910.01108) initialises its student by taking one layer
in two from the teacher. Starting from a fine-tuned teacher's own layers, embeddings and head puts the student close
to the teacher's function before distillation begins, which matters most when the training budget is small.
"""

from __future__ import annotations

import copy
import re

from torch import nn

# `<prefix>.encoder.layer.<i>.` in BERT, RoBERTa, MPNet, ELECTRA, DeBERTa... (every encoder whose layers live in a
# ModuleList named `layer` under `encoder`).
_LAYER_KEY = re.compile(r"^(.*\bencoder\.layer\.)(\d+)(\..*)$")


def every_other_layer(num_layers: int) -> list[int]:
    """`[1, 3, 5, ...]`: one layer in two, ending with the last layer (the one the head was trained on).

    Args:
        num_layers (`int`): depth of the teacher, >= 2.
    """
    if num_layers < 2:
        raise ValueError(f"num_layers must be >= 2 to drop every other layer, got {num_layers}")
    return list(range(num_layers - 1, -1, -2))[::-1]


def student_from_teacher_layers(teacher: nn.Module, layers: list[int] | None = None) -> nn.Module:
    """Build a shallower copy of `teacher` that keeps only the transformer layers `layers` (in that order).

    Embeddings, pooler and classification head are copied unchanged; the config's `num_hidden_layers` is updated, so
    the student saves and reloads with `from_pretrained` as an ordinary model of the teacher's class.

    Args:
        teacher (`PreTrainedModel`):
            An encoder model with `config.num_hidden_layers` and layers at `*.encoder.layer.<i>` (BERT, MiniLM,
            MPNet, RoBERTa, ...). It is not modified.
        layers (`list[int]`, *optional*, defaults to [`every_other_layer`]):
            0-based indices of the teacher layers to keep, strictly increasing.

    Returns:
        `PreTrainedModel`: a new model of the teacher's class with `len(layers)` layers, in training mode.

    Example:

    ```python
    >>> from transformers import AutoModelForSequenceClassification
    >>> from hf_kd.student import student_from_teacher_layers
    >>> teacher = AutoModelForSequenceClassification.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    >>> student = student_from_teacher_layers(teacher)  # layers 1, 3, 5
    >>> student.config.num_hidden_layers
    3
    ```
    """
    depth = teacher.config.num_hidden_layers
    layers = every_other_layer(depth) if layers is None else list(layers)
    if not layers or any(not 0 <= i < depth for i in layers) or layers != sorted(set(layers)):
        raise ValueError(
            f"layers must be strictly increasing indices in [0, {depth}) (the teacher has {depth} layers), got {layers}"
        )
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    student = type(teacher)(config)

    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match is None:
            state[key] = value
        elif int(match.group(2)) in new_index:
            state[f"{match.group(1)}{new_index[int(match.group(2))]}{match.group(3)}"] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    # Non-persistent buffers (position ids) may be reported missing; parameters must all be there.
    missing_params = [k for k in missing if k in dict(student.named_parameters())]
    if missing_params or unexpected:
        raise ValueError(
            f"Could not map the teacher's layers onto a {len(layers)}-layer {type(teacher).__name__}: missing "
            f"{missing_params[:5]}, unexpected {unexpected[:5]}. Is this an encoder with layers at '*.encoder.layer.<i>'?"
        )
    student.train()
    return student
