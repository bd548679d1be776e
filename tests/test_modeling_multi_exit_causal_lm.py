"""Multi-exit causal LM: config checks, forward (exit logits = norm + head of each layer's output, final = backbone),
adapters, save/load with the Auto classes and trust_remote_code, and one SmolLM2 integration test."""

import json
import math
import re

import datasets
import pytest
import torch
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    EvalPrediction,
    LlamaConfig,
    pipeline,
)
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from hf_kd import (
    EarlyExitConfig,
    EarlyExitTrainer,
    MultiExitCausalLMConfig,
    MultiExitForCausalLM,
    calibrate_exit_temperatures,
    fit_temperature,
)
from hf_kd.metrics import (
    brier_score,
    expected_calibration_error,
    lm_exit_token_statistics,
    lm_metrics,
    make_lm_exit_compute_metrics,
    negative_log_likelihood,
)

from .testing_utils import (
    SMOLLM2,
    causal_lm,
    causal_lm_tokenizer,
    lm_dataset,
    pad_collator,
    require_peft,
    tiny_llama,
    tiny_run_args,
)


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
    config = MultiExitCausalLMConfig(backbone_config=tiny_backbone_config(), exit_layers=[1, 3])
    assert config.exit_layers == [1, 3, 4]
    assert MultiExitCausalLMConfig(backbone_config=tiny_backbone_config(), exit_layers=[1, 4]).exit_layers == [1, 4] and config.vocab_size == 64 and config.exit_adapter is None
    assert config.num_exits == 3 and config.normalized_exit_loss_weights == pytest.approx([1 / 3] * 3)
    assert MultiExitCausalLMConfig(backbone_config=tiny_backbone_config()).exit_layers == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"exit_layers": [0]}, "exit layer 0 is out of range"),
        ({"exit_layers": [5]}, r"exit layer 5 is out of range.*valid: 1..4"),
        ({"exit_layers": [1.5]}, "1-based integer layer indices, got 1.5"),
        ({"exit_layers": [3, 1]}, r"increasing layer numbers without repeats, got \[3, 1\]; e.g. \[1, 3\]"),
        ({"exit_layers": [2, 2]}, r"increasing layer numbers without repeats, got \[2, 2\]; e.g. \[2\]"),
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
    # generate and the text-generation pipeline are the backbone's, with its generation defaults.
    assert model.generation_config.to_dict() == causal_lm(SMOLLM2).generation_config.to_dict()
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    answer = pipeline("text-generation", model=model, tokenizer=tokenizer)(
        chat, max_new_tokens=8, do_sample=False, return_full_text=False
    )
    assert answer[0]["generated_text"].startswith("The capital of France is Paris")


# --------------------------------------------------------------------------------------------------- EarlyExitTrainer


def lm_exit_args(tmp_path, **kwargs):
    defaults = dict(per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-2)
    defaults.update(kwargs)
    return tiny_run_args(EarlyExitConfig, tmp_path, **defaults)


def lm_exit_trainer(tmp_path, model, args, **kwargs):
    return EarlyExitTrainer(
        model=model, args=args, train_dataset=lm_dataset(8), eval_dataset=lm_dataset(6, seed=1),
        data_collator=pad_collator, **kwargs,
    )


def naive_token_loss(student, source, labels, temperature, alpha):
    """alpha T^2 KL(p_src^T || p^T) + (1 - alpha) CE, mean over the counted shifted tokens, written out."""
    student, labels = student[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1)
    keep = labels != -100
    student, labels = student[keep], labels[keep]
    ce = F.cross_entropy(student, labels)
    if source is None:
        return ce
    source = source[:, :-1].reshape(-1, 64)[keep]
    p = F.softmax(source / temperature, -1)
    kl = (p * (F.log_softmax(source / temperature, -1) - F.log_softmax(student / temperature, -1))).sum(-1).mean()
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def test_early_exit_lm_loss_is_the_weighted_token_loss_of_each_exit():
    torch.manual_seed(0)
    exit_logits = [torch.randn(2, 6, 64, requires_grad=True) for _ in range(3)]
    labels = token_batch(seq=6)
    labels[1, :4] = -100
    sources = [exit_logits[-1].detach(), exit_logits[-1].detach(), None]
    loss, parts, _ = EarlyExitTrainer.early_exit_lm_loss(exit_logits, labels, [0.2, 0.3, 0.5], sources, 2.0, 0.7)
    expected = [naive_token_loss(z, s, labels, 2.0, 0.7) for z, s in zip(exit_logits, sources)]
    for part, value in zip(parts, expected):
        torch.testing.assert_close(part, value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, sum(w * v for w, v in zip([0.2, 0.3, 0.5], expected)), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in exit_logits)
    with pytest.raises(ValueError, match="got 3 exit logits, 2 weights and 3 soft targets"):
        EarlyExitTrainer.early_exit_lm_loss(exit_logits, labels, [0.5, 0.5], sources)


def test_lm_exit_metrics_are_lm_metrics_of_each_exit_against_the_final_exit():
    torch.manual_seed(0)
    exit_logits = [torch.randn(3, 6, 64) for _ in range(2)]
    labels = token_batch(batch=3, seq=6)
    labels[0, :2] = -100
    statistics = lm_exit_token_statistics(exit_logits, labels)
    assert statistics.shape == (3, 6, 2, 5) and torch.isnan(statistics[:, 0]).all()
    results = make_lm_exit_compute_metrics()(EvalPrediction(predictions=statistics.numpy(), label_ids=labels.numpy()))
    for i, logits in enumerate(exit_logits):
        expected = lm_metrics(logits[:, :-1], labels[:, 1:], exit_logits[-1][:, :-1])
        for name in ("perplexity", "token_accuracy", "token_ece", "token_entropy", "top1_agreement"):
            assert results[f"exit_{i}_{name}"] == pytest.approx(expected[name], rel=1e-6)
    assert results["exit_1_top1_agreement"] == 1.0 and results["ece_bins"] == 15.0
    assert results["token_accuracy"] == results["exit_1_token_accuracy"] and "top1_agreement" not in results
    with pytest.raises(ValueError, match="per-exit token statistics"):
        make_lm_exit_compute_metrics()(EvalPrediction(predictions=statistics[:, :, 0].numpy(), label_ids=labels.numpy()))


def test_lm_exits_train_distilled_from_the_final_exit_and_log_per_exit_metrics(tmp_path):
    model = MultiExitForCausalLM.from_backbone(tiny_llama(layers=4), exit_layers=[1, 2])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = lm_exit_trainer(tmp_path, model, lm_exit_args(tmp_path, distill_from="final_exit", alpha=0.8))
    trainer.train()
    history = trainer.state.log_history
    evaluation = next(h for h in history if "eval_exit_0_token_accuracy" in h)
    for i in range(3):
        for name in ("perplexity", "token_accuracy", "token_ece", "token_entropy", "top1_agreement"):
            assert math.isfinite(evaluation[f"eval_exit_{i}_{name}"])
    assert evaluation["eval_exit_2_top1_agreement"] == 1.0 and 0 <= evaluation["eval_exit_0_top1_agreement"] <= 1
    assert evaluation["eval_perplexity"] == evaluation["eval_exit_2_perplexity"]
    assert any("exit_0_ce_loss" in h for h in history) and history[-1]["train_loss"] > 0
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters())  # everything trains


def test_freeze_backbone_trains_the_adapters_only_and_keeps_the_final_exit_bit_identical(tmp_path):
    model = MultiExitForCausalLM.from_backbone(tiny_llama(layers=4), exit_layers=[1, 2], exit_adapter="low_rank",
                                               exit_adapter_rank=4)
    ids = token_batch()
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=ids)
    backbone = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
    args = lm_exit_args(tmp_path, distill_from="final_exit", alpha=1.0, freeze_backbone=True, weight_decay=0.1)
    trainer = lm_exit_trainer(tmp_path, model, args)
    trainer.train()
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids)
    assert torch.equal(after.logits, reference.logits)
    assert all(torch.equal(backbone[name], p) for name, p in model.backbone.named_parameters())
    assert all(torch.count_nonzero(model.exit_adapters[str(layer)].up.weight) > 0 for layer in (1, 2))
    assert not torch.allclose(after.exit_logits[0], reference.exit_logits[0])
    assert trainer._model_card_info()["hyperparameters"]["freeze_backbone"] is True


def test_freeze_backbone_without_adapters_leaves_nothing_to_train(tmp_path):
    model = MultiExitForCausalLM.from_backbone(tiny_llama(), exit_layers=[2])
    with pytest.raises(ValueError, match="freeze_backbone=True leaves nothing to train.*exit_adapter='low_rank'"):
        lm_exit_trainer(tmp_path, model, lm_exit_args(tmp_path, freeze_backbone=True))


def test_lm_exits_distilled_from_a_teacher(tmp_path):
    teacher = tiny_llama(layers=3, seed=5)
    model = MultiExitForCausalLM.from_backbone(tiny_llama(layers=4), exit_layers=[2])
    trainer = lm_exit_trainer(
        tmp_path, model, lm_exit_args(tmp_path, distill_from="teacher", alpha=1.0, eval_strategy="no"),
        teacher_model=teacher,
    )
    batch = pad_collator([lm_dataset(8)[i] for i in range(4)])
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = trainer.compute_loss(model, dict(batch))
    expected = sum(0.5 * naive_token_loss(z, teacher_logits, batch["labels"], 2.0, 1.0) for z in out.exit_logits)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] > 0


def test_lm_exits_distilled_from_a_cached_teacher_equal_the_online_teacher_at_full_top_k(tmp_path):
    """With k = vocab the cached top-k loss is the online loss; then the cached run trains without a teacher forward."""
    teacher = tiny_llama(layers=3, seed=5)
    model = MultiExitForCausalLM.from_backbone(tiny_llama(layers=4), exit_layers=[2]).eval()
    common = dict(distill_from="teacher", alpha=0.7, eval_strategy="no")
    online = lm_exit_trainer(tmp_path, model, lm_exit_args(tmp_path, **common), teacher_model=teacher)
    cached = lm_exit_trainer(
        tmp_path, model, lm_exit_args(tmp_path, **common, cache_teacher_logits=True, lm_cache_top_k=64,
                                      teacher_logits_cache_dir=str(tmp_path / "cache")),
        teacher_model=teacher,
    )
    rows = [cached.eval_dataset[i] for i in range(4)]
    assert "teacher_cache_index" in rows[0]
    with torch.no_grad():
        cached_loss = cached.compute_loss(model, cached.data_collator(rows))
        online_loss = online.compute_loss(
            model, pad_collator([{k: v for k, v in r.items() if k != "teacher_cache_index"} for r in rows])
        )
    torch.testing.assert_close(cached_loss, online_loss, rtol=1e-4, atol=1e-5)
    cached.train()
    assert cached.state.log_history[-1]["train_loss"] > 0


def _lm_head_calls(model):
    """A list that grows by one at every call of `model`'s LM head (a multi-exit model's is its backbone's)."""
    calls = []
    getattr(model, "backbone", model).get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("distill_from", ["final_exit", "final_exit_one_exit", "teacher", "cached_teacher", "none"])
def test_fused_head_trains_the_exits_like_full_logits_without_running_the_head(tmp_path, distill_from):
    """lm_fused_head=None (the default: the loss runs the shared head on every exit's normed hidden states) and False
    (full logits per exit) train the same model: same logged losses and per-exit cross-entropies, same weights up to
    float rounding, the backbone and its tied head included; fused, no LM head runs in a training step (with one early
    exit the final exit's targets are projected inside its loss, with several once for all)."""
    runs = {}
    exit_layers = [2] if distill_from == "final_exit_one_exit" else [1, 2]
    distill_from = distill_from.removesuffix("_one_exit")
    for setting in (None, False):
        torch.manual_seed(0)
        model = MultiExitForCausalLM.from_backbone(tiny_llama(layers=4), exit_layers=exit_layers, exit_adapter="linear")
        for adapter in model.exit_adapters.values():  # not the identity: the adapters' gradients must be right too
            torch.nn.init.normal_(adapter.up.weight, std=0.1)
        teacher = tiny_llama(layers=3, seed=5)
        options = {"final_exit": dict(final_exit_temperature=2.0), "none": {},
                   "teacher": dict(teacher=teacher), "cached_teacher": dict(
                       teacher=teacher, cache_teacher_logits=True, lm_cache_top_k=8,
                       teacher_logits_cache_dir=str(tmp_path / "cache"))}[distill_from]
        teacher_kwargs = {"teacher_model": options.pop("teacher")} if "teacher" in options else {}
        # SGD: Adam's g / sqrt(v) would blow float rounding of near-zero gradients up to full-size steps.
        args = lm_exit_args(tmp_path / str(setting), distill_from=distill_from.removeprefix("cached_"), alpha=0.6,
                            temperature=1.5, lm_fused_head=setting, max_steps=2, optim="sgd", learning_rate=0.5,
                            eval_strategy="no", logging_steps=1, **options)
        trainer = lm_exit_trainer(tmp_path, model, args, **teacher_kwargs)
        student_calls, teacher_calls = _lm_head_calls(model), _lm_head_calls(teacher)
        trainer.train()
        logs = [{k: v for k, v in e.items() if k == "loss" or k.endswith("_ce_loss")}
                for e in trainer.state.log_history if "loss" in e]
        runs[setting] = model
        if setting is None:
            assert student_calls == [] and teacher_calls == []
            fused_logs = logs
        else:
            assert student_calls and (distill_from != "teacher" or teacher_calls)
            assert [sorted(e) for e in logs] == [sorted(e) for e in fused_logs]
            for full, fused in zip(logs, fused_logs):
                assert full == pytest.approx(fused, rel=1e-5)
        metrics = trainer.evaluate()  # evaluation runs the head: its metrics read the logits
        assert math.isfinite(metrics["eval_exit_0_perplexity"])
    for (name, fused), full in zip(runs[None].named_parameters(), runs[False].parameters()):
        torch.testing.assert_close(fused, full, atol=1e-5, rtol=1e-4, msg=name)


def _layer_calls(layers):
    """A list that grows by one at every call of any of `layers`."""
    calls = []
    for layer in layers:
        layer.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_forward_up_to_an_early_exit_is_the_full_forwards_exits_without_the_later_layers():
    torch.manual_seed(0)
    model = MultiExitForCausalLM.from_backbone(tiny_llama(layers=4), exit_layers=[1, 2], exit_adapter="linear").eval()
    for adapter in model.exit_adapters.values():
        torch.nn.init.normal_(adapter.up.weight, std=0.3)
    ids, mask = token_batch(), torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0  # left padding: the cut forward must build the same attention mask
    later_calls = _layer_calls(model.backbone.model.layers[2:])
    with torch.no_grad():
        cut = model(input_ids=ids, attention_mask=mask, last_layer=2)
        assert later_calls == []
        full = model(input_ids=ids, attention_mask=mask)
    assert len(cut.exit_logits) == 2 and torch.equal(cut.logits, cut.exit_logits[-1])
    for got, expected in zip(cut.exit_logits, full.exit_logits):
        torch.testing.assert_close(got, expected)
    assert len(model.backbone.model.layers) == 4 and not isinstance(model.backbone.model.norm, torch.nn.Identity)
    for kwargs, match in (({"last_layer": 3}, "not an exit"), ({"last_layer": 4}, "is the last layer"),
                          ({"last_layer": 2, "labels": ids}, "labels is not supported"),
                          ({"last_layer": 2, "use_cache": True}, "use_cache=False")):
        with pytest.raises(ValueError, match=match):
            model(input_ids=ids, **kwargs)


@pytest.mark.parametrize("distill_from", ["cached_teacher", "none"])
def test_frozen_early_exits_train_without_the_layers_after_the_last_one(tmp_path, distill_from):
    """freeze_backbone=True, the final exit weighted 0 and not the teacher: the training forward stops at the last
    early exit (no later layer runs in a training step) and trains exactly what the full forward trains."""
    runs = {}
    for cut in (True, False):
        torch.manual_seed(0)
        model = MultiExitForCausalLM.from_backbone(tiny_llama(layers=4), exit_layers=[1, 2], exit_adapter="low_rank",
                                                   exit_adapter_rank=4)
        options = dict(distill_from="none") if distill_from == "none" else dict(
            distill_from="teacher", cache_teacher_logits=True, lm_cache_top_k=8,
            teacher_logits_cache_dir=str(tmp_path / "cache"))
        teacher = {"teacher_model": tiny_llama(layers=3, seed=5)} if distill_from != "none" else {}
        args = lm_exit_args(tmp_path / str(cut), freeze_backbone=True, exit_loss_weights=[1.0, 1.0, 0.0], alpha=0.7,
                            max_steps=2, optim="sgd", learning_rate=0.5, eval_strategy="no", logging_steps=1, **options)
        trainer = lm_exit_trainer(tmp_path, model, args, **teacher)
        assert trainer._last_trained_layer == 2
        if not cut:
            trainer._last_trained_layer = None
        later_calls = _layer_calls(model.backbone.model.layers[2:])
        trainer.train()
        assert (later_calls == []) is cut
        runs[cut] = (model, [e for e in trainer.state.log_history if "loss" in e])
    (cut_model, cut_logs), (full_model, full_logs) = runs[True], runs[False]
    assert [e["loss"] for e in cut_logs] == pytest.approx([e["loss"] for e in full_logs], rel=1e-5)
    assert all("exit_2_ce_loss" not in e and "exit_1_ce_loss" in e for e in cut_logs)
    assert all("exit_2_ce_loss" in e for e in full_logs)
    for (name, p), q in zip(cut_model.named_parameters(), full_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in cut_model.exit_adapters.parameters())
    args = lm_exit_args(tmp_path / "final", freeze_backbone=True, exit_loss_weights=[1.0, 1.0, 0.0],
                        distill_from="final_exit", eval_strategy="no")
    assert lm_exit_trainer(tmp_path, cut_model, args)._last_trained_layer is None  # the final exit teaches


def test_fused_head_required_but_impossible_is_an_error(tmp_path):
    model = MultiExitForCausalLM.from_backbone(tiny_llama(layers=2), exit_layers=[1])
    model.backbone.lm_head = torch.nn.Linear(32, 64, bias=True)  # a head with a bias is not hidden @ weight.T
    trainer = lm_exit_trainer(tmp_path, model, lm_exit_args(tmp_path, lm_fused_head=True, max_steps=1))
    with pytest.raises(ValueError, match=r"lm_fused_head=True, but the student's LM head .*has a bias"):
        trainer.train()


@require_peft
def test_peft_lora_on_the_backbone_trains_the_exit_adapters_in_full(tmp_path):
    from peft import LoraConfig

    model = MultiExitForCausalLM.from_backbone(tiny_llama(), exit_layers=[2], exit_adapter="low_rank",
                                               exit_adapter_rank=4)
    trainer = lm_exit_trainer(tmp_path, model, lm_exit_args(tmp_path, distill_from="final_exit", eval_strategy="no"),
                              peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("lora_A" in name for name in trainable)
    assert {name.split("exit_adapters.")[1] for name in trainable if "exit_adapters" in name} == {
        "2.down.modules_to_save.default.weight", "2.up.modules_to_save.default.weight"
    }
    assert not any("lm_head" in name or "embed_tokens" in name for name in trainable)
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] > 0


def test_lm_student_rejects_dedier(tmp_path):
    model = MultiExitForCausalLM.from_backbone(tiny_llama(), exit_layers=[2])
    args = lm_exit_args(tmp_path, distill_from="teacher", dedier=True)
    with pytest.raises(ValueError, match="dedier=True re-weights classification examples"):
        lm_exit_trainer(tmp_path, model, args, teacher_model=tiny_llama(seed=3))


# --------------------------------------------------------------------------------------------------- calibration


def test_exit_temperatures_match_fit_temperature_on_the_full_logits():
    model = MultiExitForCausalLM.from_backbone(tiny_llama(layers=4), exit_layers=[1, 2], exit_adapter="linear")
    with torch.no_grad():
        for parameter in model.exit_adapters.parameters():
            parameter.normal_(std=0.05)
        model.backbone.lm_head.weight.mul_(4.0)  # sharper exits
    # Text sampled from the model's own final exit at temperature 2: the exits are overconfident on it, but it is
    # predictable, so each fitted temperature is an interior optimum (on random tokens it would run to the bound).
    torch.manual_seed(0)
    prompts = torch.randint(3, 64, (12, 2))
    ids = model.generate(prompts, do_sample=True, temperature=2.0, top_k=0, max_new_tokens=10, min_new_tokens=10,
                         pad_token_id=0)
    data = datasets.Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": [[-100] * 2 + row[2:] for row in ids.tolist()],
        }
    )
    result = calibrate_exit_temperatures(model, data, batch_size=5, chunk_size=7, calibrated_on="sampled text")
    assert model.training  # the model's mode is restored

    # Reference: every exit's full logits at the counted shifted positions, fitted by calibration.fit_temperature.
    batch = pad_collator([data[i] for i in range(len(data))])
    labels = batch.pop("labels")
    with torch.no_grad():
        exit_logits = model.eval()(**batch).exit_logits
    counted = labels[:, 1:] != -100
    targets = labels[:, 1:][counted]
    assert result.num_tokens == int(counted.sum()) and result.exit_layers == [1, 2, 4]
    assert result.calibrated_on == "sampled text" and result.n_bins == 15
    for j, logits in enumerate(exit_logits):
        z = logits[:, :-1][counted].double()
        assert result.temperatures[j] == pytest.approx(fit_temperature(z, targets), rel=1e-3)
        for metrics, temperature in ((result.before[j], 1.0), (result.after[j], result.temperatures[j])):
            probs = torch.softmax(z / temperature, -1).numpy()
            assert metrics["token_ece"] == pytest.approx(expected_calibration_error(probs, targets.numpy(), 15))
            assert metrics["nll"] == pytest.approx(negative_log_likelihood(probs, targets.numpy()), rel=1e-6)
            assert metrics["brier"] == pytest.approx(brier_score(probs, targets.numpy()), rel=1e-6)
            assert metrics["token_accuracy"] == pytest.approx(float((z.argmax(-1) == targets).double().mean()))
        assert result.after[j]["nll"] <= result.before[j]["nll"]
    # Every exit is overconfident on text sampled at T = 2: interior temperatures above 1, not the bound.
    assert all(1.2 < t < 10 for t in result.temperatures)
    # Given temperatures are evaluated, not fitted (a validation fit reported on test text).
    again = calibrate_exit_temperatures(model, data, temperatures=[2.0, 1.0, 3.0])
    assert again.temperatures == [2.0, 1.0, 3.0]
    for b, a in zip(again.before, result.before):
        assert b == pytest.approx(a, rel=1e-6)
    probs = torch.softmax(exit_logits[0][:, :-1][counted].double() / 2.0, -1).numpy()
    assert again.after[0]["nll"] == pytest.approx(negative_log_likelihood(probs, targets.numpy()), rel=1e-6)
    assert again.after[1] == pytest.approx(again.before[1], rel=1e-12)


def test_exit_calibration_bad_input():
    model = MultiExitForCausalLM.from_backbone(tiny_llama(), exit_layers=[2])
    with pytest.raises(TypeError, match="needs a multi-exit causal LM"):
        calibrate_exit_temperatures(tiny_llama(), lm_dataset(4))
    with pytest.raises(ValueError, match="has no 'labels' column"):
        calibrate_exit_temperatures(model, lm_dataset(4).remove_columns("labels"))
    with pytest.raises(ValueError, match="no token is counted"):
        calibrate_exit_temperatures(model, lm_dataset(4).map(lambda row: {"labels": [-100] * len(row["labels"])}))
    with pytest.raises(ValueError, match=r"temperatures has 1 values but the model has 2 exits \(exit_layers=\[2, 4\]\)"):
        calibrate_exit_temperatures(model, lm_dataset(4), temperatures=[1.0])
    with pytest.raises(ValueError, match=r"temperatures\[1\] must be a finite number > 0, got 0"):
        calibrate_exit_temperatures(model, lm_dataset(4), temperatures=[1.0, 0])
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1, got 0"):
        calibrate_exit_temperatures(model, lm_dataset(4), chunk_size=0)
