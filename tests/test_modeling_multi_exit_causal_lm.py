"""Multi-exit causal LM: config checks, forward (exit logits = norm + head of each layer's output, final = backbone),
adapters, save/load with the Auto classes and trust_remote_code, and one SmolLM2 integration test."""

import json
import re

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, BertModel, LlamaConfig
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from hf_kd import MultiExitCausalLMConfig, MultiExitForCausalLM

from .testing_utils import SMOLLM2, causal_lm, causal_lm_tokenizer, tiny_llama


def token_batch(seed=0, batch=2, seq=7, vocab=64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=generator)


def tiny_backbone_config(layers=4):
    return LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )


# --------------------------------------------------------------------------------------------------- config


def test_config_adds_the_last_layer_and_stores_the_vocabulary():
    config = MultiExitCausalLMConfig(backbone_config=tiny_backbone_config(), exit_layers=[3, 1, 1])
    assert config.exit_layers == [1, 3, 4] and config.vocab_size == 64 and config.exit_adapter is None
    assert config.num_exits == 3 and config.normalized_exit_loss_weights == pytest.approx([1 / 3] * 3)
    assert MultiExitCausalLMConfig(backbone_config=tiny_backbone_config()).exit_layers == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"exit_layers": [0]}, "exit layer 0 is out of range"),
        ({"exit_layers": [5]}, r"exit layer 5 is out of range.*valid: 1..4"),
        ({"exit_layers": [1.5]}, "1-based integer layer indices, got 1.5"),
        ({"exit_adapter": "mlp"}, r"exit_adapter must be one of \('linear', 'low_rank'\), got 'mlp'"),
        ({"exit_adapter_rank": 0}, "exit_adapter_rank must be an int >= 1, got 0"),
        ({"exit_layers": [1], "exit_loss_weights": [1.0]}, "1 weights but there are 2 exits"),
    ],
)
def test_config_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiExitCausalLMConfig(backbone_config=tiny_backbone_config(), **kwargs)


def test_an_encoder_is_not_a_causal_backbone():
    encoder = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    with pytest.raises(ValueError, match="lacks decoder layers at `model.layers`"):
        MultiExitForCausalLM(MultiExitCausalLMConfig(backbone_config=encoder))
    with pytest.raises(ValueError, match="not an encoder or a model without LM head"):
        MultiExitForCausalLM.from_backbone(BertModel(encoder))
    with pytest.raises(ValueError, match="an LM head at `lm_head`"):
        MultiExitForCausalLM.from_backbone(tiny_llama().model)  # a base model: layers and norm, no head
    with pytest.raises(TypeError, match="expects a Hub id, a local path or a PreTrainedModel"):
        MultiExitForCausalLM.from_backbone(42)
    missing = r"\(missing \['num_hidden_layers', 'hidden_size', 'vocab_size'\]"
    with pytest.raises(ValueError, match="is not a decoder-only causal LM config " + missing):
        MultiExitCausalLMConfig(backbone_config={"model_type": "resnet"})


# --------------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("adapter", [None, "linear", "low_rank"])
def test_forward_exit_logits_are_each_layer_through_the_shared_head(adapter):
    backbone = tiny_llama().eval()
    model = MultiExitForCausalLM.from_backbone(backbone, exit_layers=[1, 3], exit_adapter=adapter).eval()
    assert model.config.exit_layers == [1, 3, 4]
    ids = token_batch()
    out = model(input_ids=ids)
    reference = backbone(input_ids=ids, output_hidden_states=True)
    assert torch.equal(out.logits, reference.logits)  # the final exit is the backbone, bit for bit
    assert len(out.exit_logits) == 3 and out.exit_logits[-1] is out.logits
    for logits, layer in zip(out.exit_logits[:-1], [1, 3]):
        assert logits.shape == (2, 7, 64)
        # An untrained adapter is the identity: every exit is norm + head of its layer's raw output.
        expected = backbone.lm_head(backbone.model.norm(reference.hidden_states[layer]))
        torch.testing.assert_close(logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(model.exit_logits_from_hidden(reference.hidden_states[layer], layer), expected)
    assert out.hidden_states is None


def test_adapters_sit_on_the_early_exits_only_and_change_only_them():
    model = MultiExitForCausalLM.from_backbone(tiny_llama(), exit_layers=[2], exit_adapter="low_rank",
                                               exit_adapter_rank=4).eval()
    assert list(model.exit_adapters) == ["2"]
    adapter = model.exit_adapters["2"]
    assert adapter.down.weight.shape == (4, 32) and adapter.up.weight.shape == (32, 4)
    assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.down.weight) > 0
    ids = token_batch()
    before = model(input_ids=ids)
    with torch.no_grad():
        adapter.up.weight.normal_()
    after = model(input_ids=ids)
    assert torch.equal(before.logits, after.logits)
    assert not torch.allclose(before.exit_logits[0], after.exit_logits[0])
    hidden = model.backbone.model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    expected = model.backbone.lm_head(model.backbone.model.norm(hidden + adapter.up(adapter.down(hidden))))
    torch.testing.assert_close(after.exit_logits[0], expected)
    linear = MultiExitForCausalLM.from_backbone(tiny_llama(), exit_layers=[2], exit_adapter="linear")
    assert linear.exit_adapters["2"].down is None and linear.exit_adapters["2"].up.weight.shape == (32, 32)


def test_exit_logits_from_hidden_rejects_a_layer_that_is_not_an_exit():
    model = MultiExitForCausalLM.from_backbone(tiny_llama(), exit_layers=[2])
    with pytest.raises(ValueError, match=r"exit_layer=3 is not an exit of this model: exit_layers=\[2, 4\]"):
        model.exit_logits_from_hidden(torch.zeros(1, 32), 3)


def test_loss_is_the_weighted_shifted_cross_entropy_of_the_exits():
    model = MultiExitForCausalLM.from_backbone(tiny_llama(), exit_layers=[1], exit_loss_weights=[1.0, 3.0]).eval()
    ids = token_batch()
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt
    out = model(input_ids=ids, labels=labels)

    def ce(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)

    torch.testing.assert_close(out.loss, 0.25 * ce(out.exit_logits[0]) + 0.75 * ce(out.logits))
    final_only = model(input_ids=ids, labels=labels, output_exit_logits=False)
    assert final_only.exit_logits is None
    torch.testing.assert_close(final_only.loss, ce(out.logits))
    with pytest.raises(ValueError, match="use logits_to_keep=0 with labels"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)


def test_logits_to_keep_cache_passthrough_and_generate_is_the_backbones():
    backbone = tiny_llama().eval()
    model = MultiExitForCausalLM.from_backbone(backbone, exit_layers=[2]).eval()
    ids = token_batch()
    full = model(input_ids=ids)
    last = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    assert last.logits.shape == (2, 1, 64) and last.exit_logits[0].shape == (2, 1, 64)
    torch.testing.assert_close(last.exit_logits[0], full.exit_logits[0][:, -1:])
    assert last.past_key_values.get_seq_length() == 7
    # The next step reuses the cache: same logits as a full pass over the 8 tokens.
    step = torch.tensor([[5], [6]])
    cached = model(input_ids=step, past_key_values=last.past_key_values, use_cache=True)
    whole = model(input_ids=torch.cat([ids, step], 1))
    for a, b in zip(cached.exit_logits, whole.exit_logits):
        torch.testing.assert_close(a, b[:, -1:], rtol=1e-4, atol=1e-5)
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **greedy), backbone.generate(ids, **greedy))


# --------------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip_with_auto_classes_and_trust_remote_code(tmp_path):
    model = MultiExitForCausalLM.from_backbone(tiny_llama(), exit_layers=[1, 2], exit_adapter="linear").eval()
    with torch.no_grad():
        for parameter in model.exit_adapters.parameters():
            parameter.normal_(std=0.1)  # trained-looking adapters: they must be saved, not re-initialised
    ids = token_batch()
    before = model(input_ids=ids)
    model.save_pretrained(tmp_path)

    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["model_type"] == "hf_kd_multi_exit_causal_lm"
    assert config_json["auto_map"] == {
        "AutoConfig": "configuration_multi_exit_causal_lm.MultiExitCausalLMConfig",
        "AutoModelForCausalLM": "modeling_multi_exit_causal_lm.MultiExitForCausalLM",
    }
    assert config_json["backbone_config"]["model_type"] == "llama" and config_json["exit_layers"] == [1, 2, 4]

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MultiExitCausalLMConfig) and config.exit_adapter == "linear"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MultiExitForCausalLM
    # The tied head stays tied after loading.
    assert loaded.backbone.lm_head.weight.data_ptr() == loaded.backbone.model.embed_tokens.weight.data_ptr()
    for a, b in zip(before.exit_logits, loaded(input_ids=ids).exit_logits):
        assert torch.equal(a, b)

    # The copied code imports no hf_kd, so the folder loads with trust_remote_code where hf_kd is not installed.
    for name in ("modeling_multi_exit_causal_lm", "configuration_multi_exit_causal_lm"):
        source = (tmp_path / f"{name}.py").read_text()
        assert not re.search(r"^\s*(from|import)\s+hf_kd", source, flags=re.MULTILINE), name
    remote_class = get_class_from_dynamic_module(config_json["auto_map"]["AutoModelForCausalLM"], tmp_path)
    assert remote_class is not MultiExitForCausalLM
    remote = remote_class.from_pretrained(tmp_path).eval()
    for a, b in zip(before.exit_logits, remote(input_ids=ids).exit_logits):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------- SmolLM2


def test_smollm2_by_hub_id_offline():
    causal_lm_tokenizer(SMOLLM2)  # installs the offline copy
    model = MultiExitForCausalLM.from_backbone(SMOLLM2, exit_layers=[8, 15]).eval()
    assert model.config.exit_layers == [8, 15, 30] and model.config.vocab_size == 49152
    tokenizer = causal_lm_tokenizer(SMOLLM2)
    inputs = tokenizer(["The capital of France is", "Hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
        reference = causal_lm(SMOLLM2)(**inputs).logits
    assert [tuple(z.shape) for z in out.exit_logits] == [(2, inputs["input_ids"].shape[1], 49152)] * 3
    assert torch.equal(out.logits, reference)
    # An early exit of an untrained model is a different (worse) predictor, but a real distribution over the vocab.
    assert not torch.allclose(out.exit_logits[0], out.logits) and torch.isfinite(out.exit_logits[0]).all()
