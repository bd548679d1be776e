"""Making a smaller student from its teacher: keep a subset of the teacher's transformer layers.

DistilBERT (Sanh et al., 2019, https://huggingface.co/papers/1910.01108) initialises its student by taking one layer
in two from the teacher. Starting from a fine-tuned teacher's own layers, embeddings and head puts the student close
to the teacher's function before distillation begins, which matters most when the training budget is small.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from .options import StudentLayerRule, to_enum

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


# ----- decoder-only causal LMs (Llama, Qwen2, Mistral, Gemma 3, ...): drop whole decoder layers -----


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The `ModuleList` of decoder layers of a transformers causal LM (`model.model.layers` for Llama-family)."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(model, "config"):
        raise ValueError(
            f"{type(model).__name__} has no decoder layers at `model.base_model.layers` (an nn.ModuleList): expected "
            "a transformers decoder-only causal LM such as LlamaForCausalLM, Qwen2ForCausalLM or Gemma3ForCausalLM"
        )
    if len(layers) != model.config.num_hidden_layers:
        raise ValueError(
            f"{type(model).__name__} has {len(layers)} decoder layers but config.num_hidden_layers = "
            f"{model.config.num_hidden_layers}"
        )
    return layers


def evenly_spaced_layers(num_layers: int, num_kept: int) -> list[int]:
    """`num_kept` of `num_layers` layer indices, evenly spaced and ending with the last layer.

    Index `i` of the result is `round((i + 1) * num_layers / num_kept) - 1`; with `num_kept = num_layers / 2` this is
    [`every_other_layer`] (`[1, 3, ..., num_layers - 1]`, DistilBERT's initialisation).

    Args:
        num_layers (`int`): depth of the teacher.
        num_kept (`int`): number of layers to keep, in `[1, num_layers]`.
    """
    if not 1 <= num_kept <= num_layers:
        raise ValueError(f"num_kept must be in [1, {num_layers}] (the teacher's depth), got {num_kept}")
    return [round((i + 1) * num_layers / num_kept) - 1 for i in range(num_kept)]


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of a decoder-only causal LM that keeps only the decoder layers `keep` (in that order).

    Embeddings, final norm and LM head are kept unchanged (tied embeddings stay tied). The copy is made consistent
    so that it runs, generates with a KV cache, saves and reloads as an ordinary model of the same class:
    `config.num_hidden_layers` becomes `len(keep)`, `config.layer_types` (per-layer attention kinds of Gemma 3,
    Qwen2, Mistral, ...) keeps the entries of the kept layers, and every `layer_idx` attribute inside a kept layer (the
    attention module's index into the KV cache) is renumbered to the layer's new position.

    Args:
        model (`PreTrainedModel`):
            A transformers decoder-only causal LM with its layers at `model.base_model.layers` (Llama, Qwen2,
            Mistral, Gemma 3, SmolLM2, ...). It is not modified.
        keep (`list[int]`):
            0-based indices of the layers to keep, strictly increasing.

    Returns:
        `PreTrainedModel`: a new model of the same class, dtype and device, in the model's train/eval mode.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from hf_kd.student import drop_layers
    >>> teacher = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> student = drop_layers(teacher, keep=list(range(1, 30, 2)))
    >>> student.config.num_hidden_layers
    15
    ```
    """
    depth = len(_decoder_layers(model))
    keep = list(keep)
    if not keep or any(not 0 <= i < depth for i in keep) or keep != sorted(set(keep)):
        raise ValueError(
            f"keep must be strictly increasing indices in [0, {depth}) (the model has {depth} layers), got {keep}"
        )
    # Copy everything but the dropped layers (deepcopy's memo maps them to None instead of copying them).
    layers = _decoder_layers(model)
    dropped = {id(layer): None for i, layer in enumerate(layers) if i not in keep}
    student = copy.deepcopy(model, memo=dropped)
    kept_layers = [student.base_model.layers[i] for i in keep]
    student.base_model.layers = nn.ModuleList(kept_layers)
    for new_index, layer in enumerate(kept_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = student.config
    config.num_hidden_layers = len(keep)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == depth:
        config.layer_types = [layer_types[i] for i in keep]
    return student


@torch.no_grad()
def block_influence(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    batch_size: int = 8) -> torch.Tensor:
    r"""
    Block influence of every decoder layer, ShortGPT's layer-importance score (Men et al., 2024,
    https://huggingface.co/papers/2403.03853, Eq. 1):

    ```
    BI_i = 1 - E_{x, t} [ cos(X_{i,t}, X_{i+1,t}) ]
    ```

    where `X_i` is the hidden state entering layer `i` and `X_{i+1}` the one leaving it (captured with forward hooks
    on the layers, before the final norm), and the mean runs over every non-padding token `t` of the calibration
    text `x`. A layer that barely changes its input (cosine near 1) has a BI near 0 and is the first to drop.

    Args:
        model (`PreTrainedModel`):
            A decoder-only causal LM (see [`drop_layers`]); put in eval mode for the measurement and restored after.
        input_ids (`torch.Tensor` of shape `(num_texts, seq)`):
            Tokenised calibration text (the paper uses PG19 samples; any text of the student's domain does).
        attention_mask (`torch.Tensor` of shape `(num_texts, seq)`, *optional*):
            1 for real tokens, 0 for padding (padding is left out of the mean).
        batch_size (`int`, *optional*, defaults to `8`):
            Texts per forward pass.

    Returns:
        `torch.Tensor` of shape `(num_layers,)`, float32: `BI_i` for each layer, in `[0, 2]`.
    """
    layers = _decoder_layers(model)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids must have shape (num_texts, seq) and attention_mask the same shape, got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    if not attention_mask.any():
        raise ValueError("attention_mask has no real token: block influence needs at least one calibration token")
    device = next(model.parameters()).device
    similarity_sum = torch.zeros(len(layers), dtype=torch.float64)
    current_mask = None

    def record(index):
        def hook(module, args, kwargs, output):
            entering = args[0] if args else kwargs["hidden_states"]
            leaving = output[0] if isinstance(output, tuple) else output
            cosine = torch.nn.functional.cosine_similarity(entering.float(), leaving.float(), dim=-1)
            similarity_sum[index] += cosine[current_mask].double().sum().cpu()
        return hook

    handles = [layer.register_forward_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            mask = attention_mask[start : start + batch_size].to(device)
            current_mask = mask.bool()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return (1.0 - similarity_sum / attention_mask.sum().item()).float()


def make_student(
    teacher: nn.Module,
    num_layers: int,
    rule: StudentLayerRule | str = "every_other",
    calibration: dict | torch.Tensor | None = None,
) -> nn.Module:
    """A shallower causal-LM student initialised from its teacher's own layers (see [`drop_layers`]).

    Which `num_layers` layers are kept:

    - `"every_other"`: evenly spaced, ending with the last layer ([`evenly_spaced_layers`]); with half the depth,
      one layer in two, as DistilBERT (Sanh et al., 2019, https://huggingface.co/papers/1910.01108) initialises its
      student.
    - `"block_influence"`: ShortGPT (Men et al., 2024, https://huggingface.co/papers/2403.03853): the layers with the
      lowest [`block_influence`] on `calibration` text are removed, the others kept in order (ShortGPT prunes
      this way with no training at all; here the pruned model is the starting point of distillation).

    Args:
        teacher (`PreTrainedModel`):
            A decoder-only causal LM; it is not modified.
        num_layers (`int`):
            Depth of the student, in `[1, teacher depth]`.
        rule ([`~hf_kd.options.StudentLayerRule`] or `str`, *optional*, defaults to `"every_other"`):
            `"every_other"` or `"block_influence"`.
        calibration (`dict` or `torch.Tensor`, *optional*):
            Only for `"block_influence"` (required there): `input_ids` of shape `(num_texts, seq)`, or a tokenizer
            output with `input_ids` and `attention_mask`.

    Returns:
        `PreTrainedModel`: the student, with `student.config.hf_kd_kept_layers` set to the kept teacher indices (saved
        in `config.json`, so a card or a later run can tell which layers it started from), all of its weights trainable
        even when the teacher is frozen.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from hf_kd.student import make_student
    >>> teacher = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> tokenizer = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> calibration = tokenizer(["Some text of the target domain."] * 4, return_tensors="pt")
    >>> student = make_student(teacher, 15, rule="block_influence", calibration=calibration)
    ```
    """
    depth = len(_decoder_layers(teacher))
    rule = to_enum(StudentLayerRule, rule, "rule")
    if rule is StudentLayerRule.EVERY_OTHER:
        if calibration is not None:
            raise ValueError("calibration is only used by rule='block_influence'; rule='every_other' ignores it")
        keep = evenly_spaced_layers(depth, num_layers)
    else:
        if calibration is None:
            raise ValueError("rule='block_influence' needs calibration text: pass calibration=tokenizer(texts, ...)")
        if not 1 <= num_layers <= depth:
            raise ValueError(f"num_layers must be in [1, {depth}] (the teacher's depth), got {num_layers}")
        if isinstance(calibration, torch.Tensor):
            scores = block_influence(teacher, calibration)
        else:
            scores = block_influence(teacher, calibration["input_ids"], calibration.get("attention_mask"))
        # Stable sort: among equal scores the shallower layer is dropped first.
        order = sorted(range(depth), key=lambda i: (scores[i].item(), i))
        keep = sorted(order[depth - num_layers :])
    student = drop_layers(teacher, keep)
    student.config.hf_kd_kept_layers = keep
    # A teacher that a trainer already froze would pass requires_grad=False on to its copy: a student is trained.
    student.requires_grad_(True)
    return student
