"""hf_kd.lm_head: which causal LMs' heads the loss may run itself, and skipping a head in a forward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_kd.lm_head import lm_head_skipped, lm_head_unsupported_reason

from .testing_utils import require_peft, tiny_llama


def test_llama_head_is_skipped_and_put_back():
    model = tiny_llama(layers=2).eval()
    ids = torch.randint(3, 64, (2, 7))
    logits = model(input_ids=ids).logits
    head = model.lm_head
    assert lm_head_unsupported_reason(model) is None
    with lm_head_skipped(model) as skipped:
        hidden = model(input_ids=ids).logits
        assert list(model.lm_head.parameters()) == []  # the weight is not registered twice
    assert skipped is head and model.lm_head is head
    assert hidden.shape == (2, 7, 32)
    torch.testing.assert_close(F.linear(hidden, skipped.weight), logits)


def test_head_is_put_back_when_the_forward_fails():
    model = tiny_llama(layers=2)
    head = model.lm_head
    with pytest.raises(RuntimeError, match="boom"), lm_head_skipped(model):
        raise RuntimeError("boom")
    assert model.lm_head is head


def test_wrapped_models_are_unwrapped():
    """DDP and DeepSpeed engines hold the model as `.module`; a base-model teacher as `.peft_model`."""
    model = tiny_llama(layers=2)

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **inputs):
            return self.module(**inputs)

    wrapped, original = Wrapper(model), model.lm_head
    assert lm_head_unsupported_reason(wrapped) is None
    with lm_head_skipped(wrapped) as head:
        assert head is original
        assert wrapped(input_ids=torch.tensor([[3, 4]])).logits.shape == (1, 2, 32)
    assert model.lm_head is original


def test_heads_that_are_not_a_plain_projection_are_named():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    with_bias = tiny_llama(layers=1)
    with_bias.lm_head = nn.Linear(32, 64, bias=True)
    assert lm_head_unsupported_reason(with_bias) == "its LM head has a bias"
    gemma2 = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0,
    ))
    assert "final_logit_softcapping=30.0" in lm_head_unsupported_reason(gemma2)
    with pytest.raises(ValueError, match="Cannot skip the LM head of Gemma2ForCausalLM: .*final_logit_softcapping"):
        with lm_head_skipped(gemma2):
            pass
    assert "not one of transformers' ...ForCausalLM" in lm_head_unsupported_reason(nn.Linear(2, 2))


def test_multi_exit_causal_lm_skips_the_shared_head_of_every_exit():
    """hf_kd's multi-exit LM projects every exit with its backbone's head: skipped, the final logits and each exit's
    are the normed hidden states that head reads (adapters applied), and the head is put back."""
    from hf_kd.modeling import MultiExitForCausalLM

    torch.manual_seed(0)
    model = MultiExitForCausalLM.from_backbone(tiny_llama(layers=3), exit_layers=[1, 2], exit_adapter="linear").eval()
    for adapter in model.exit_adapters.values():  # not the identity, so that the adapters must be applied
        nn.init.normal_(adapter.up.weight, std=0.5)
    ids = torch.randint(3, 64, (2, 7))
    outputs = model(input_ids=ids)
    assert lm_head_unsupported_reason(model) is None
    head = model.backbone.lm_head
    with lm_head_skipped(model) as skipped:
        hidden = model(input_ids=ids)
    assert skipped is head and model.backbone.lm_head is head
    assert hidden.logits.shape == (2, 7, 32) and len(hidden.exit_logits) == 3
    torch.testing.assert_close(F.linear(hidden.logits, head.weight), outputs.logits)
    for exit_hidden, exit_logits in zip(hidden.exit_logits, outputs.exit_logits):
        torch.testing.assert_close(F.linear(exit_hidden, head.weight), exit_logits)


@require_peft
def test_peft_students_lora_body_allowed_lora_head_refused():
    from peft import LoraConfig, get_peft_model

    body = get_peft_model(tiny_llama(layers=1), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert lm_head_unsupported_reason(body) is None
    ids = torch.tensor([[3, 4, 5]])
    logits = body(input_ids=ids).logits
    with lm_head_skipped(body) as head:
        torch.testing.assert_close(F.linear(body(input_ids=ids).logits, head.weight), logits)
    head_lora = get_peft_model(tiny_llama(layers=1, seed=1, tie_word_embeddings=False), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert "not a plain nn.Linear" in lm_head_unsupported_reason(head_lora)
