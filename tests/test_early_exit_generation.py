"""Early-exit generation of a multi-exit causal LM: LayerSkip self-speculative decoding (identical to greedy, layers
1..E never recomputed), CALM confident decoding with deferred KV (against a from-scratch reference), Learn-then-Test
thresholds, and `MultiExitForCausalLM.generate(early_exit=...)`; one SmolLM2 integration test.

The tiny models run in float64 with large random weights: their greedy tokens vary, and the comparisons with
`generate` and the references are exact (no argmax flips from float rounding)."""

import math

import pytest
import torch
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from hf_kd.modeling import MultiExitForCausalLM
from hf_kd.modeling.early_exit_generation import (
    EarlyExitGenerateOutput,
    confident_generate,
    fit_exit_thresholds,
    learn_then_test_threshold,
    min_calibration_tokens,
    self_speculative_generate,
)

from .testing_utils import SMOLLM2, causal_lm, causal_lm_tokenizer, tiny_llama

PROMPT_LEN = 7


def expressive_model(exit_layers=(1, 2, 3), layers=4, seed=0, identity_after=None):
    """A tiny multi-exit Llama (vocab 64) in float64 whose weights are N(0, 0.3): varied greedy tokens. With
    `identity_after=E` the layers after E add nothing (zero output projections), so exit E agrees with the final exit."""
    backbone = tiny_llama(layers=layers, seed=seed).eval().double()
    with torch.no_grad():
        for name, parameter in backbone.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, 0.3)
        for layer in backbone.model.layers[identity_after or layers :]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return MultiExitForCausalLM.from_backbone(backbone, exit_layers=list(exit_layers)).eval()


def left_padded_prompts(batch=3, seed=0):
    """`(batch, 7)` prompts, rows after the first left-padded by 3 and 1 tokens (pad id 0)."""
    ids = torch.randint(3, 64, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, pad in zip(range(1, batch), (3, 1)):
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


def greedy(model, ids, mask, max_new_tokens, **kwargs):
    return model.backbone.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0, **kwargs
    )


# --------------------------------------------------------------------------------------------------- LayerSkip


@pytest.mark.parametrize("exit_layer", [1, 2, 3])
@pytest.mark.parametrize("num_draft_tokens", [1, 3, 5])
def test_self_speculative_is_greedy_with_left_padded_batches(exit_layer, num_draft_tokens):
    model = expressive_model()
    ids, mask = left_padded_prompts()
    out = self_speculative_generate(
        model, ids, mask, exit_layer=exit_layer, max_new_tokens=16, num_draft_tokens=num_draft_tokens
    )
    reference = greedy(model, ids, mask, 16, eos_token_id=[])
    assert torch.equal(out.sequences, greedy(model, ids, mask, 16)) and not torch.equal(out.sequences, reference)
    assert torch.equal(
        self_speculative_generate(model, ids, mask, exit_layer=exit_layer, max_new_tokens=16,
                                  num_draft_tokens=num_draft_tokens, eos_token_id=[]).sequences,
        reference,
    )
    # Each verification pass adds a row's accepted drafts and one token (the first token comes from the prompt's
    # pass), until the row has 16 tokens (the last pass may overshoot: the extra tokens are dropped) or its EOS.
    assert out.accepted_per_step.shape == (3, out.num_verify_passes)
    assert ((out.accepted_per_step >= -1) & (out.accepted_per_step <= num_draft_tokens)).all()
    for row, sequence in zip(out.accepted_per_step.tolist(), out.sequences):
        produced = 1 + sum(a + 1 for a in row if a >= 0)
        assert produced >= 16 or 2 in sequence[PROMPT_LEN:produced + PROMPT_LEN]
        assert produced < 16 + num_draft_tokens + 1


def test_self_speculative_rows_keep_their_own_acceptance():
    """Rows that accept fewer drafts than another row in the same pass leave rejected drafts as holes in the cache."""
    model = expressive_model()
    ids, mask = left_padded_prompts()
    out = self_speculative_generate(model, ids, mask, exit_layer=3, max_new_tokens=20, num_draft_tokens=3,
                                    eos_token_id=[])
    assert torch.equal(out.sequences, greedy(model, ids, mask, 20, eos_token_id=[]))
    differs = [len(set(column) - {-1}) > 1 for column in out.accepted_per_step.T.tolist()]
    assert any(differs)


def test_self_speculative_batch_of_one_and_varied_acceptance():
    model = expressive_model(exit_layers=[3])
    ids, mask = left_padded_prompts(batch=1, seed=3)
    out = self_speculative_generate(model, ids, mask, exit_layer=3, max_new_tokens=24, num_draft_tokens=3)
    assert torch.equal(out.sequences, greedy(model, ids, mask, 24))
    assert len(set(out.accepted_per_step[0].tolist())) > 1  # some drafts rejected, some accepted: the cache was cropped


def test_all_drafts_accepted_when_the_later_layers_add_nothing():
    model = expressive_model(exit_layers=[2], identity_after=2)
    ids, mask = left_padded_prompts()
    out = self_speculative_generate(model, ids, mask, exit_layer=2, max_new_tokens=13, num_draft_tokens=4)
    assert torch.equal(out.sequences, greedy(model, ids, mask, 13))
    assert out.accepted_per_step.tolist() == [[4, 4, 1]] * 3  # 1 + 5 + 5 + 2 tokens: the last cycle drafts only the rest
    assert out.layers_run == 4 * (5 + 5 + 2)


def test_verification_never_recomputes_the_draft_layers():
    """Every layer sees each position once per cycle: layers 1..E in the draft, E+1..L in verification."""
    model = expressive_model()
    ids, mask = left_padded_prompts(batch=1)
    positions = [0] * 4
    hooks = [
        layer.register_forward_hook(lambda module, args, output, i=i: positions.__setitem__(i, positions[i] + args[0].shape[1]))
        for i, layer in enumerate(model.backbone.model.layers)
    ]
    out = self_speculative_generate(model, ids, mask, exit_layer=2, max_new_tokens=12, num_draft_tokens=3)
    for hook in hooks:
        hook.remove()
    per_layer = out.layers_run // 4
    assert positions == [PROMPT_LEN + per_layer] * 4
    # A pass after `n` tokens runs min(3, 12 - n - 1) drafts and the token before them through every layer.
    tokens, expected = 1, 0
    for accepted in out.accepted_per_step[0].tolist():
        expected += min(3, 12 - tokens - 1) + 1
        tokens += accepted + 1
    assert per_layer == expected


def test_self_speculative_stops_at_eos_like_generate():
    model = expressive_model()
    ids, mask = left_padded_prompts()
    plain = greedy(model, ids, mask, 16, eos_token_id=[])
    eos = int(plain[1, PROMPT_LEN + 4])  # row 1 ends at its 5th token; the others go on (or end too)
    reference = greedy(model, ids, mask, 16, eos_token_id=eos)
    out = self_speculative_generate(model, ids, mask, exit_layer=1, max_new_tokens=16, num_draft_tokens=3,
                                    eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out.sequences, reference)
    assert (reference[1, PROMPT_LEN + 5 :] == 0).all()


# --------------------------------------------------------------------------------------------------- CALM


def naive_confident(model, ids, mask, thresholds, max_new_tokens):
    """Reference: each step recomputes the whole sequence through every layer, then gives each row the token of its
    first exit whose confidence clears the threshold (the final exit otherwise); no cache, no deferral."""
    depth = model.config.exit_layers[-1]
    sequences, exits = ids, []
    for step in range(max_new_tokens):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = model.backbone(input_ids=sequences, attention_mask=mask, position_ids=position_ids,
                                output_hidden_states=True).hidden_states
        token = model.backbone.lm_head(hidden[depth][:, -1]).argmax(-1)  # hidden[depth] is already normed
        exit_layer = torch.full_like(token, depth)
        for layer in sorted(thresholds, reverse=True) if step else []:  # the first confident exit wins: last write
            logits = model.exit_logits_from_hidden(hidden[layer][:, -1], layer)
            confident = torch.softmax(logits, -1).amax(-1) >= thresholds[layer]
            token = torch.where(confident, logits.argmax(-1), token)
            exit_layer = torch.where(confident, layer, exit_layer)
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        exits.append(exit_layer)
    return sequences, torch.stack(exits, dim=1)


def test_confident_with_thresholds_that_never_fire_is_greedy():
    model = expressive_model()
    ids, mask = left_padded_prompts()
    out = confident_generate(model, ids, mask, thresholds={1: 1.0, 3: 1.0}, max_new_tokens=12)
    assert torch.equal(out.sequences, greedy(model, ids, mask, 12))
    assert (out.exit_layers == 4).all() and out.exit_layers.shape == (3, 12)
    assert out.layers_run == 4 * 11


@pytest.mark.parametrize("thresholds", [{2: 0.0}, {1: 0.0}, {3: 0.0}])
def test_confident_always_exiting_matches_the_from_scratch_reference(thresholds):
    model = expressive_model()
    ids, mask = left_padded_prompts()
    out = confident_generate(model, ids, mask, thresholds=thresholds, max_new_tokens=10, eos_token_id=[])
    sequences, exits = naive_confident(model, ids, mask, thresholds, 10)
    assert torch.equal(out.sequences, sequences)
    assert torch.equal(out.exit_layers, exits) and exits[0].tolist() == [4] + [next(iter(thresholds))] * 9


def test_confident_mixed_exits_match_the_reference_and_run_the_deferred_layers():
    model = expressive_model()
    ids, mask = left_padded_prompts(batch=1)
    # Thresholds near the exits' typical confidence: some tokens leave at 1, some at 3, some run every layer.
    thresholds = {1: 0.3, 3: 0.2}
    out = confident_generate(model, ids, mask, thresholds=thresholds, max_new_tokens=16, eos_token_id=[])
    sequences, exits = naive_confident(model, ids, mask, thresholds, 16)
    assert torch.equal(out.sequences, sequences)
    assert out.exit_layers.tolist() == exits.tolist() == [[4, 1, 1, 4, 3, 3, 3, 1, 3, 4, 4, 1, 4, 4, 4, 1]]
    # The 15 input tokens after the prompt each run every layer exactly once (the skipped ones deferred to a later
    # pass), except the 3 layers the last one still owes: it left at exit 1 after a token that ran them all.
    assert out.layers_run == 4 * 15 - 3


def test_confident_rows_of_a_batch_exit_on_their_own():
    model = expressive_model()
    ids, mask = left_padded_prompts()
    thresholds = {1: 0.2, 2: 0.15, 3: 0.15}
    out = confident_generate(model, ids, mask, thresholds=thresholds, max_new_tokens=16, eos_token_id=[])
    sequences, exits = naive_confident(model, ids, mask, thresholds, 16)
    assert torch.equal(out.sequences, sequences) and torch.equal(out.exit_layers, exits)
    assert any(len(set(column)) > 1 for column in exits.T.tolist())  # rows left at different exits in one pass
    # A row's output does not depend on the batch: each row alone (its padding dropped) gives the same tokens.
    for row in range(3):
        alone = ids[row : row + 1, mask[row].bool()]
        single = confident_generate(model, alone, None, thresholds=thresholds, max_new_tokens=16, eos_token_id=[])
        assert torch.equal(single.sequences[0, alone.shape[1] :], out.sequences[row, PROMPT_LEN:])
        assert torch.equal(single.exit_layers[0], out.exit_layers[row])


def test_confident_uses_per_exit_temperatures():
    model = expressive_model()
    ids, mask = left_padded_prompts(batch=1)
    # A huge temperature flattens exit 1 to near-uniform confidence (~1/64): threshold 0.05 then never fires there.
    hot = confident_generate(model, ids, mask, thresholds={1: 0.05}, temperatures={1: 1e6}, max_new_tokens=8)
    assert (hot.exit_layers == 4).all()
    cold = confident_generate(model, ids, mask, thresholds={1: 0.05}, temperatures={1: 1e-3}, max_new_tokens=8)
    assert (cold.exit_layers[0, 1:] == 1).all()


# --------------------------------------------------------------------------------------------------- Learn-then-Test


def test_learn_then_test_certifies_down_to_the_disagreements():
    generator = torch.Generator().manual_seed(0)
    confidence = torch.rand(4000, generator=generator, dtype=torch.float64)
    disagree = confidence < 0.5  # the exit is wrong exactly when unsure
    grid = [i / 100 for i in range(101)]
    threshold = learn_then_test_threshold(confidence, disagree, epsilon=0.05, delta=0.1, grid=grid)
    # The risk of t is P(t <= confidence < 0.5) = 0.5 - t: certified a little above 0.45, never below.
    assert 0.45 <= threshold <= 0.5
    assert learn_then_test_threshold(confidence, torch.zeros_like(disagree), 0.05, 0.1, grid) == 0.0
    # Always wrong: the risk of t is P(confidence >= t) = 1 - t, certified just above 0.95.
    assert 0.95 < learn_then_test_threshold(confidence, torch.ones_like(disagree), 0.05, 0.1, grid) <= 0.97
    assert learn_then_test_threshold(confidence[:10], disagree[:10], 0.05, 0.1, grid) is None  # too few to reject


def test_min_calibration_tokens_is_the_zero_error_bound():
    n = min_calibration_tokens(0.01, 0.05)
    assert n == math.ceil(math.log(0.05) / math.log(0.99)) == 299
    assert 0.99**n <= 0.05 < 0.99 ** (n - 1)


def test_fit_exit_thresholds_rejects_a_too_small_calibration_set():
    model = expressive_model()
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match=r"has 17 tokens, too few for epsilon=0.01 and delta=0.05: with 3 early exits "
                                         r"each test runs at delta/3=0.01667.*n >= log\(0.01667\)/log\(1-0.01\) = 408"):
        fit_exit_thresholds(model, ids, epsilon=0.01, delta=0.05, attention_mask=mask)
    with pytest.raises(ValueError, match="epsilon must be in \\(0, 1\\), got 0"):
        fit_exit_thresholds(model, ids, epsilon=0, delta=0.05)
    with pytest.raises(ValueError, match="need a tokenizer"):
        fit_exit_thresholds(model, ["some text"], epsilon=0.1, delta=0.1)


def test_model_fit_exit_thresholds_is_stored_saved_and_used(tmp_path):
    model = expressive_model(exit_layers=[2], identity_after=2)  # exit 2 always agrees with the final exit
    calibration = torch.randint(3, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    fit = model.fit_exit_thresholds(calibration, epsilon=0.05, delta=0.1, batch_size=4)
    assert fit.num_tokens == 128 and fit.thresholds == {2: 0.0} and fit.disagreement == {2: 0.0}
    assert model.config.exit_thresholds == {"2": 0.0} and model.config.exit_temperatures is None
    model.save_pretrained(tmp_path)
    reloaded = MultiExitForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.exit_thresholds == {"2": 0.0}
    ids, mask = left_padded_prompts()
    out = reloaded.generate(ids, attention_mask=mask, early_exit="confident", max_new_tokens=6)
    assert (out.exit_layers[:, 1:] == 2).all()
    assert torch.equal(out.sequences, greedy(model, ids, mask, 6))  # layers 3-4 add nothing: same tokens
    # save_pretrained copied early_exit_generation.py beside the modeling file: the trust_remote_code class generates.
    remote_class = get_class_from_dynamic_module("modeling_multi_exit_causal_lm.MultiExitForCausalLM", tmp_path)
    assert remote_class is not MultiExitForCausalLM
    remote = remote_class.from_pretrained(tmp_path).eval()
    assert torch.equal(remote.generate(ids, attention_mask=mask, early_exit="confident", max_new_tokens=6).sequences,
                       out.sequences)


def test_fit_from_texts_tokenizes_them_and_counts_non_padding_tokens():
    def tokenizer(texts, padding, return_tensors):  # one id per character, right-padded with 0
        width = max(len(text) for text in texts)
        ids = [[3 + ord(c) % 61 for c in text] + [0] * (width - len(text)) for text in texts]
        return {"input_ids": torch.tensor(ids), "attention_mask": (torch.tensor(ids) > 0).long()}

    model = expressive_model(exit_layers=[2], identity_after=2)
    texts = ["the quick brown fox jumps over the lazy dog"] * 3 + ["a short one"]
    fit = fit_exit_thresholds(model, texts, epsilon=0.05, delta=0.1, tokenizer=tokenizer)
    assert fit.num_tokens == 3 * 43 + 11 and fit.thresholds == {2: 0.0}
    as_lists = fit_exit_thresholds(model, [tokenizer([t], True, "pt")["input_ids"][0].tolist() for t in texts],
                                   epsilon=0.05, delta=0.1)
    assert as_lists == fit


def test_fit_on_an_untrained_exit_certifies_only_high_thresholds():
    model = expressive_model(exit_layers=[1])
    calibration = torch.randint(3, 64, (16, 32), generator=torch.Generator().manual_seed(2))
    fit = fit_exit_thresholds(model, calibration, epsilon=0.05, delta=0.1)
    # The guarantee's side: the calibration rate of leaving-and-disagreeing is within epsilon.
    assert fit.num_tokens == 512 and all(rate <= 0.05 for rate in fit.disagreement.values())
    assert fit.thresholds.get(1, 1.0) > 0.0  # this exit disagrees often: it cannot always leave


# --------------------------------------------------------------------------------------------------- generate


def test_generate_dispatches_and_defaults_to_the_backbone():
    model = expressive_model()
    ids, mask = left_padded_prompts()
    plain = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(plain, greedy(model, ids, mask, 8))
    fast = model.generate(ids, attention_mask=mask, early_exit="self_speculative", exit_layer=2, num_draft_tokens=2,
                          max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert isinstance(fast, EarlyExitGenerateOutput) and torch.equal(fast.sequences, plain)
    calm = model.generate(input_ids=ids, attention_mask=mask, early_exit="confident", thresholds={2: 1.0},
                          max_new_tokens=8, pad_token_id=0)
    assert torch.equal(calm.sequences, plain) and calm.accepted_per_step is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"early_exit": "layerskip"}, r"early_exit must be None or one of \['confident', 'self_speculative'\], "
                                      "got 'layerskip'"),
        ({"early_exit": "self_speculative", "exit_layer": 5}, r"exit_layer=5 is not an exit of this model: "
                                                              r"exit_layers=\[1, 2, 3, 4\]"),
        ({"early_exit": "self_speculative"}, r"needs exit_layer, one of the early exits \[1, 2, 3\]"),
        ({"early_exit": "self_speculative", "exit_layer": 4}, r"must be an early exit \(< 4\)"),
        ({"early_exit": "confident"}, r"needs per-exit confidence thresholds: .*model.fit_exit_thresholds"),
        ({"early_exit": "confident", "thresholds": {4: 0.5}}, "the last layer \\(4\\) always exits"),
        ({"early_exit": "confident", "thresholds": {}}, "No exit has a threshold: the fit certified none"),
        ({"early_exit": "self_speculative", "exit_layer": 2, "do_sample": True}, "decodes greedily only"),
        ({"early_exit": "confident", "num_beams": 2}, r"does not support \['num_beams'\]"),
    ],
)
def test_generate_early_exit_errors(kwargs, match):
    model = expressive_model()
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match=match):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, **kwargs)


def test_right_padding_and_bad_thresholds_in_the_config_are_errors():
    model = expressive_model()
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="needs left padding"):
        self_speculative_generate(model, ids, mask.flip(-1), exit_layer=1, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"exit_thresholds\[1\] must be a number \[0.0, 1.0\], got 1.5"):
        type(model.config)(backbone_config=model.config.backbone_config, exit_layers=[1], exit_thresholds={1: 1.5})
    with pytest.raises(ValueError, match=r"exit_temperatures has layer 3, which is not an exit: exit_layers=\[1, 4\]"):
        type(model.config)(backbone_config=model.config.backbone_config, exit_layers=[1], exit_temperatures={3: 2.0})


# --------------------------------------------------------------------------------------------------- SmolLM2


def test_smollm2_self_speculative_is_greedy():
    tokenizer = causal_lm_tokenizer(SMOLLM2)
    model = MultiExitForCausalLM.from_backbone(causal_lm(SMOLLM2), exit_layers=[8]).eval()
    chats = [[{"role": "user", "content": "What is the capital of France?"}], [{"role": "user", "content": "Hi"}]]
    prompts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        reference = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    out = model.generate(**inputs, early_exit="self_speculative", exit_layer=8, num_draft_tokens=3, max_new_tokens=8)
    assert torch.equal(out.sequences, reference)
    assert tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1] :]).startswith("The capital of France is")
