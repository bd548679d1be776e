"""
The output layer of a causal LM, skipped in a forward so that the loss projects the hidden states itself.

A causal LM's logits are `(batch, seq, vocab)`: 200 MB in float32 for SmolLM2 at 8 x 128 tokens, and the training
step makes three of them (the student's logits, their gradient, the teacher's logits). [`lm_head_skipped`] runs a
model's own `forward` (through its DDP / DeepSpeed / PEFT wrappers, so gradient synchronisation and adapters work as
usual) with the LM head replaced by the identity, so its `logits` are the final hidden states `(batch, seq, hidden)`;
[`hf_kd.losses.LMHeadInputs`] then hands them with the head's weight to [`hf_kd.losses.lm_kd_loss`], which projects a
chunk of counted tokens at a time and never makes those tensors (measured in docs/benchmarks/lm_vs_trl.md). This is
the "fused linear" loss of Liger-Kernel and of TRL's `DistillationTrainer`, here without running the head twice.

Only a head that is exactly `hidden @ weight.T` can be skipped this way: [`lm_head_unsupported_reason`] says why
a model's is not (a bias, logit soft-capping as in Gemma 2, logit scaling as in Cohere or Granite, a LoRA-wrapped
head, ZeRO-3-partitioned weights, a model class that transformers does not define, whose forward may use the head
for more than the logits).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .distributed import is_zero3_partitioned
from .modeling.modeling_multi_exit_causal_lm import MultiExitForCausalLM
from .peft_utils import is_peft_model

__all__ = ["lm_head_skipped", "lm_head_unsupported_reason"]

# Config attributes that make a transformers causal LM's logits more than `lm_head(hidden)`, with their neutral
# values: final_logit_softcapping (Gemma 2 / 3), logit_scale (Cohere), logits_scaling (Granite).
_LOGIT_TRANSFORMS = {"final_logit_softcapping": (None,), "logit_scale": (None, 1, 1.0), "logits_scaling": (None, 1, 1.0)}


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under the wrappers hf_kd meets: a base-model teacher (`peft_model`), DDP and DeepSpeed
    engines (`module`), PEFT (`get_base_model()`), and [`MultiExitForCausalLM`] (its `backbone`, whose head makes the
    final logits and every exit's: `lm_head(norm(adapter(h)))`)."""
    model = getattr(model, "peft_model", model)
    model = getattr(model, "module", model)
    model = model.get_base_model() if is_peft_model(model) else model
    return model.backbone if isinstance(model, MultiExitForCausalLM) else model


def lm_head_unsupported_reason(model: nn.Module) -> str | None:
    """
    Why the logits of `model` are not `hidden_states @ lm_head.weight.T` from its own forward, or `None` when they are
    and [`lm_head_skipped`] may be used.

    Args:
        model (`nn.Module`): a causal LM, possibly wrapped (DDP, DeepSpeed engine, PEFT model,
            [`hf_kd.peft_utils.BaseModelTeacher`]).

    Returns:
        `str | None`: a sentence naming what stands in the way (for logs and errors), or `None`.
    """
    inner = _causal_lm(model)
    name = type(inner).__name__
    if not type(inner).__module__.startswith("transformers.models.") or not name.endswith("ForCausalLM"):
        return f"{name} is not one of transformers' ...ForCausalLM classes, whose forward uses the head for the logits only"
    head = inner.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"its output layer is a {type(head).__name__}, not a plain nn.Linear (a LoRA-wrapped head, for example)"
    if head.bias is not None:
        return "its LM head has a bias"
    if is_zero3_partitioned(inner):
        return "its weights are partitioned by DeepSpeed ZeRO-3 (the head's weight is not whole outside its forward)"
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    for attribute, neutral in _LOGIT_TRANSFORMS.items():
        if getattr(config, attribute, None) not in neutral:
            return f"its config sets {attribute}={getattr(config, attribute)!r}, which transforms the head's output"
    return None


class _TiedToWeight(torch.autograd.Function):
    """The hidden states as they are, tied in the autograd graph to the head's weight (no gradient flows that way)."""

    @staticmethod
    def forward(ctx, hidden_states, weight):
        return hidden_states.view_as(hidden_states)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SkippedHead(nn.Module):
    """
    What [`lm_head_skipped`] puts in the head's place: it returns the hidden states, linked in the autograd graph to
    the head's weight. DDP with `find_unused_parameters=True` (Trainer's default for a transformers model without
    gradient checkpointing) marks every parameter it cannot reach from the forward's outputs as unused, and then fails
    when the loss, after the forward, gives that weight its gradient; the link makes it reachable. The weight is held
    in a tuple so that it is not registered a second time as a parameter.
    """

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self._weight = (weight,)

    def forward(self, hidden_states):
        return _TiedToWeight.apply(hidden_states, self._weight[0])


@contextmanager
def lm_head_skipped(model: nn.Module) -> Iterator[nn.Linear]:
    """
    Within the block, `model(**inputs).logits` are the final hidden states `(batch, seq, hidden)` instead of the
    logits `(batch, seq, vocab)` (and, for a [`MultiExitForCausalLM`], each of its `exit_logits` the normed hidden
    states its exit projects, `norm(adapter(h))`): the LM head is replaced by a module that returns its input and put
    back on exit (also on error). The model's parameters do not change, so optimizers, DDP buckets and checkpoints see
    the same model.

    Args:
        model (`nn.Module`): a causal LM for which [`lm_head_unsupported_reason`] is `None` (else `ValueError` with
            that reason).

    Yields:
        `nn.Linear`: the head, whose `weight` `(vocab, hidden)` projects the hidden states
        ([`hf_kd.losses.LMHeadInputs`]).
    """
    reason = lm_head_unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"Cannot skip the LM head of {type(_causal_lm(model)).__name__}: {reason}.")
    inner = _causal_lm(model)
    head = inner.get_output_embeddings()
    inner.set_output_embeddings(_SkippedHead(head.weight))
    try:
        yield head
    finally:
        inner.set_output_embeddings(head)
