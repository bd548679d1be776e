"""DistillTrainer with causal-LM students and teachers (issue 17): token-level loss, exact normalisation under
gradient accumulation, LM evaluation metrics, text-generation cards, PEFT students, bad input."""

import copy
import math

import datasets
import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from hf_kd import DistillConfig, DistillTrainer
from hf_kd.hub import pipeline_tag_of
from hf_kd.losses import lm_kd_loss, sparse_lm_kd_loss
from hf_kd.metrics import lm_metrics, make_lm_compute_metrics, preprocess_lm_logits_for_metrics

from .testing_utils import (
    SMOLLM2,
    causal_lm,
    causal_lm_tokenizer,
    lm_dataset,
    pad_collator,
    require_peft,
    snapshot,
    tiny_bert,
    tiny_dataset,
    tiny_llama,
)

VOCAB = 64


def tiny_lm(layers=2, seed=0, vocab_size=VOCAB):
    return tiny_llama(layers=layers, seed=seed, vocab_size=vocab_size, tie_word_embeddings=False)


def make_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
        num_train_epochs=1, learning_rate=1e-2, logging_steps=1, eval_strategy="no", save_strategy="no",
        report_to="none", use_cpu=True, seed=0,
    )
    defaults.update(kwargs)
    return DistillConfig(**defaults)


def make_trainer(tmp_path, args=None, student=None, teacher=None, train=None, eval_=None, **kwargs):
    return DistillTrainer(
        model=student if student is not None else tiny_lm(seed=1),
        args=args if args is not None else make_args(tmp_path),
        teacher_model=teacher if teacher is not None else tiny_lm(layers=3, seed=0),
        train_dataset=train if train is not None else lm_dataset(8),
        eval_dataset=eval_ if eval_ is not None else lm_dataset(6, seed=1),
        data_collator=pad_collator,
        **kwargs,
    )


# ---- metrics --------------------------------------------------------------------------------------------------------


def naive_lm_metrics(student, labels, teacher, n_bins=15):
    """Token by token, in float64 numpy."""
    conf, correct, nll, entropy, agree = [], [], [], [], []
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1]):
            if labels[b, i] == -100:
                continue
            z = student[b, i].astype(np.float64)
            p = np.exp(z - z.max())
            p /= p.sum()
            conf.append(p.max())
            correct.append(float(p.argmax() == labels[b, i]))
            nll.append(-np.log(p[labels[b, i]]))
            entropy.append(-(p * np.log(p)).sum())
            agree.append(float(p.argmax() == teacher[b, i].argmax()))
    conf, correct = np.array(conf), np.array(correct)
    ece = 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi) if k else (conf >= lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return {"perplexity": math.exp(np.mean(nll)), "token_accuracy": correct.mean(), "token_ece": ece,
            "token_entropy": np.mean(entropy), "top1_agreement": np.mean(agree)}


def test_lm_metrics_match_a_naive_implementation():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(3, 7, 11)) * 2
    teacher = student + rng.normal(size=(3, 7, 11))
    labels = rng.integers(0, 11, size=(3, 7))
    labels[0, :3] = -100
    labels[2, 5:] = -100
    got = lm_metrics(torch.tensor(student), torch.tensor(labels), torch.tensor(teacher), n_bins=15)
    expected = naive_lm_metrics(student, labels, teacher)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert got["ece_bins"] == 15.0
    assert "top1_agreement" not in lm_metrics(torch.tensor(student), torch.tensor(labels))


def test_preprocessed_statistics_give_the_same_metrics_as_the_logits():
    """The Trainer path (per-batch statistics, padded with -100 across batches) equals lm_metrics on shifted logits."""
    from transformers import EvalPrediction

    rng = np.random.default_rng(1)
    student, teacher = torch.tensor(rng.normal(size=(4, 9, 13))), torch.tensor(rng.normal(size=(4, 9, 13)))
    labels = torch.tensor(rng.integers(0, 13, size=(4, 9)))
    labels[1, :4] = -100
    statistics = preprocess_lm_logits_for_metrics((student, teacher), labels)
    assert statistics.shape == (4, 9, 5)  # five numbers per token, nothing vocabulary-sized
    got = make_lm_compute_metrics()(EvalPrediction(predictions=statistics.numpy(), label_ids=labels.numpy()))
    expected = lm_metrics(student[:, :-1], labels[:, 1:], teacher[:, :-1])
    assert got == pytest.approx(expected)


def test_lm_compute_metrics_rejects_full_logits():
    from transformers import EvalPrediction

    with pytest.raises(ValueError, match="preprocess_lm_logits_for_metrics"):
        make_lm_compute_metrics()(EvalPrediction(predictions=np.zeros((2, 5, 64)), label_ids=np.zeros((2, 5))))


# ---- training -------------------------------------------------------------------------------------------------------


def test_lm_student_trains_teacher_frozen_loss_parts_and_metrics_logged(tmp_path):
    args = make_args(tmp_path, eval_strategy="epoch")
    trainer = make_trainer(tmp_path, args=args)
    student_before = snapshot(trainer.model)
    teacher = trainer.teacher_model
    teacher_before = snapshot(teacher)
    trainer.train()
    assert any(not torch.equal(student_before[n], p) for n, p in trainer.model.named_parameters())
    assert all(torch.equal(teacher_before[n], p) for n, p in teacher.named_parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    logs = trainer.state.log_history
    train_logs = [e for e in logs if "loss" in e]
    assert train_logs and all(math.isfinite(e["loss"]) and "kd_loss" in e and "ce_loss" in e for e in train_logs)
    evaluation = next(e for e in logs if "eval_perplexity" in e)
    for key in ("eval_loss", "eval_kd_loss", "eval_ce_loss", "eval_token_accuracy", "eval_token_ece",
                "eval_token_entropy", "eval_top1_agreement"):
        assert math.isfinite(evaluation[key]), key
    assert 1.0 < evaluation["eval_perplexity"] < 10 * VOCAB
    assert 0.0 <= evaluation["eval_top1_agreement"] <= 1.0


@pytest.mark.parametrize("loss_type, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_each_loss_type_trains_and_matches_lm_kd_loss(tmp_path, loss_type, beta):
    args = make_args(tmp_path, loss_type=loss_type, beta=beta, temperature=2.0, alpha=0.7, max_steps=1)
    trainer = make_trainer(tmp_path, args=args)
    batch = pad_collator([trainer.train_dataset[i] for i in range(4)])
    student, teacher = trainer.model.eval(), trainer.teacher_model
    with torch.no_grad():
        got = trainer.compute_loss(student, dict(batch))
        s, t = student(**{k: v for k, v in batch.items() if k != "labels"}).logits, teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = lm_kd_loss(s[:, :-1], t[:, :-1], batch["labels"][:, 1:], loss_type, beta, 2.0, 0.7)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    trainer.model.train()
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def _one_sgd_step_gradient(tmp_path, batch_size, accumulation, data):
    args = make_args(
        tmp_path / f"b{batch_size}", per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
        weight_decay=0.0, alpha=0.6, temperature=1.5,
    )
    trainer = make_trainer(tmp_path, args=args, train=data)
    before = snapshot(trainer.model)
    trainer.train()
    return {n: before[n] - p.detach() for n, p in trainer.model.named_parameters()}  # lr = 1: the gradient


def test_gradient_accumulation_is_exact_with_uneven_completions(tmp_path):
    """2 micro-batches of 2 give the gradient of one batch of 4, and both are the gradient of the mean over every
    completion token of the 4 rows (not a mean of per-batch means, not counting position 0)."""
    data = lm_dataset(4, seed=3, min_len=4, max_len=14)
    accumulated = _one_sgd_step_gradient(tmp_path, 2, 2, data)
    whole = _one_sgd_step_gradient(tmp_path, 4, 1, data)
    student, teacher = tiny_lm(seed=1), tiny_lm(layers=3, seed=0).eval()
    batch = pad_collator([data[i] for i in range(4)])
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lm_kd_loss(logits[:, :-1], teacher_logits[:, :-1], batch["labels"][:, 1:], temperature=1.5, alpha=0.6).backward()
    reference = {n: p.grad for n, p in student.named_parameters()}
    for name, grad in reference.items():
        torch.testing.assert_close(whole[name], grad, atol=2e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(accumulated[name], grad, atol=2e-5, rtol=1e-4, msg=name)


def test_card_is_text_generation_with_lm_metrics(tmp_path):
    import yaml

    args = make_args(tmp_path, loss_type="jsd", beta=0.2)
    trainer = make_trainer(tmp_path, args=args)
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    text = (tmp_path / "out" / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["pipeline_tag"] == "text-generation"
    results = meta["model-index"][0]["results"]
    assert {r["task"]["type"] for r in results} == {"text-generation"}
    metric_types = {m["type"] for r in results for m in r["metrics"]}
    assert {"perplexity", "token_accuracy", "token_ece", "token_entropy", "top1_agreement"} <= metric_types
    assert meta["hf_kd"]["hyperparameters"]["loss_type"] == "jsd" and meta["hf_kd"]["hyperparameters"]["beta"] == 0.2
    assert 'pipeline("text-generation"' in text and "Token-level ECE (15 bins)" in text
    assert pipeline_tag_of(trainer.model) == "text-generation"


def test_save_and_resume_gives_the_same_student(tmp_path):
    """Two steps in one go equal one step, a checkpoint, and a resumed second step."""
    data = lm_dataset(8, seed=5)
    straight = make_trainer(tmp_path / "a", args=make_args(tmp_path / "a", max_steps=2), train=data)
    straight.train()
    args = make_args(tmp_path / "b", max_steps=2, save_strategy="steps", save_steps=1)
    first = make_trainer(tmp_path / "b", args=args, train=data)
    first.train()
    resumed = make_trainer(tmp_path / "b", args=args, train=data, student=tiny_lm(seed=7))
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-1"))
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, msg=name)


@require_peft
def test_peft_lora_student_trains_its_adapter_only(tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    trainer = make_trainer(tmp_path, args=make_args(tmp_path, max_steps=2), peft_config=config)
    before = snapshot(trainer.model)
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)
    trainer.save_model()
    assert (tmp_path / "out" / "adapter_config.json").exists()
    meta = (tmp_path / "out" / "README.md").read_text()
    assert "pipeline_tag: text-generation" in meta and "library_name: peft" in meta


@require_peft
def test_peft_student_distilled_from_its_own_base_model(tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    args = make_args(tmp_path, max_steps=2, teacher_from_base_model=True, eval_strategy="steps", eval_steps=2)
    trainer = DistillTrainer(model=tiny_lm(seed=1), args=args, train_dataset=lm_dataset(8),
                             eval_dataset=lm_dataset(4, seed=1), data_collator=pad_collator, peft_config=config)
    trainer.train()
    assert trainer.teacher_placement["kind"] == "student_base_model"
    evaluation = next(e for e in trainer.state.log_history if "eval_top1_agreement" in e)
    assert evaluation["eval_top1_agreement"] > 0.5  # two small steps away from its base model


# ---- on-policy and sequence-level data (GKD) ------------------------------------------------------------------------


def first_batches(data, sizes=(4, 4)):
    """The collated micro-batches of `data`, in order, of `sizes` rows each."""
    starts = np.cumsum((0,) + tuple(sizes))
    return [pad_collator([data[i] for i in range(a, b)]) for a, b in zip(starts[:-1], starts[1:])]


def generated_rows(trainer, batches):
    """`trainer.get_batch_samples` on `batches` (as one optimizer step): the batches and `num_items_in_batch`."""
    return trainer.get_batch_samples(iter(batches), len(batches), torch.device("cpu"))


def greedy_completion(model, prompt, max_new_tokens, eos):
    """`model`'s greedy completion of one unpadded `prompt`, up to and including its first `eos`."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=prompt[None], attention_mask=torch.ones_like(prompt)[None], do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=0)[0, len(prompt):]
    model.train(was_training)
    hits = (out == eos).nonzero()
    return out[: int(hits[0]) + 1] if len(hits) else out


def row_prompt(batch, row):
    """The prompt of `row`: its attended tokens before the first label != -100, at least one token."""
    real = batch["attention_mask"][row].bool()
    counted = (batch["labels"][row][real] != -100).nonzero()
    return batch["input_ids"][row][real][: max(int(counted[0]), 1)]


def assert_rebuilt_from(new, old, generator, max_new_tokens, eos):
    """Each row of `new` is `old`'s prompt (unchanged) + `generator`'s greedy completion, labelled on the completion
    only, right-padded (attention 0, label -100)."""
    for row in range(old["input_ids"].shape[0]):
        prompt = row_prompt(old, row)
        completion = greedy_completion(generator, prompt, max_new_tokens, eos)
        n, p = len(prompt) + len(completion), len(prompt)
        torch.testing.assert_close(new["input_ids"][row, :p], prompt)
        torch.testing.assert_close(new["input_ids"][row, p:n], completion)
        assert (new["labels"][row, :p] == -100).all() and (new["labels"][row, n:] == -100).all()
        torch.testing.assert_close(new["labels"][row, p:n], completion)
        assert new["attention_mask"][row, :n].all() and not new["attention_mask"][row, n:].any()


def test_lmbda_one_trains_on_the_students_own_completions(tmp_path):
    """lmbda=1: every row becomes its prompt + the student's generation (labels on the generated tokens only, the
    plain-text row 0 continuing its first token), and num_items_in_batch counts the generated tokens."""
    args = make_args(tmp_path, lmbda=1.0, max_new_tokens=5, generation_temperature=0.0)
    trainer = make_trainer(tmp_path, args=args)
    batches = first_batches(lm_dataset(8))
    new, num_items = generated_rows(trainer, batches)
    assert trainer.model.training  # generation ran in eval mode, and the train mode is back
    for old, rebuilt in zip(batches, new):
        assert_rebuilt_from(rebuilt, old, trainer.model, 5, eos=2)
    assert int(num_items) == sum(int((b["labels"][:, 1:] != -100).sum()) for b in new)
    assert not any(torch.equal(o["input_ids"], n["input_ids"]) for o, n in zip(batches, new))


def test_generated_rows_stay_within_lm_max_length(tmp_path):
    """Generation is cut so that prompt + completion fits lm_max_length (the longest prompt sets the budget)."""
    batches = first_batches(lm_dataset(8))
    longest_prompt = max(len(row_prompt(b, r)) for b in batches for r in range(b["input_ids"].shape[0]))
    args = make_args(tmp_path, lmbda=1.0, max_new_tokens=50, generation_temperature=0.0,
                     lm_max_length=longest_prompt + 2)
    new, _ = generated_rows(make_trainer(tmp_path, args=args), batches)
    assert max(int(b["attention_mask"].sum(1).max()) for b in new) <= longest_prompt + 2


def test_seq_kd_trains_on_the_teachers_completions(tmp_path):
    args = make_args(tmp_path, seq_kd=True, max_new_tokens=4, generation_temperature=0.0)
    trainer = make_trainer(tmp_path, args=args)
    batches = first_batches(lm_dataset(8))
    new, num_items = generated_rows(trainer, batches)
    for old, rebuilt in zip(batches, new):
        assert_rebuilt_from(rebuilt, old, trainer.teacher_model, 4, eos=2)
    assert int(num_items) == sum(int((b["labels"][:, 1:] != -100).sum()) for b in new)


def test_lmbda_zero_without_seq_kd_leaves_the_data_untouched(tmp_path):
    trainer = make_trainer(tmp_path)
    batches = first_batches(lm_dataset(8))
    new, num_items = generated_rows(trainer, [dict(b) for b in batches])
    for old, same in zip(batches, new):
        assert same.keys() == old.keys() and all(torch.equal(same[k], old[k]) for k in old)
    assert int(num_items) == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert trainer._completion_source(0) is None


def test_on_policy_gradient_is_exact_with_an_eos_first_row_and_accumulation(tmp_path):
    """One SGD step on generated batches (2 micro-batches of 2, greedy completions, one row whose generation is its
    EOS only) is the gradient of the mean loss over every generated token of the 4 rows: num_items_in_batch is
    counted on the generated labels."""
    data = lm_dataset(4, seed=3, min_len=4, max_len=10)
    student = tiny_lm(seed=1)
    # Row 2's greedy first token becomes the EOS: its generation is [EOS] (one counted token).
    eos = int(greedy_completion(copy.deepcopy(student), row_prompt(first_batches(data, (4,))[0], 2), 1, -1)[0])
    student.generation_config.eos_token_id = eos
    args = make_args(
        tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1, optim="sgd",
        learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, alpha=0.6,
        temperature=1.5, lmbda=1.0, max_new_tokens=6, generation_temperature=0.0,
    )
    trainer = make_trainer(tmp_path, args=args, student=student, train=data)
    seen = []
    get_batch_samples = trainer.get_batch_samples

    def capture(*a, **k):
        batches, num_items = get_batch_samples(*a, **k)
        seen.append((batches, num_items))
        return batches, num_items

    trainer.get_batch_samples = capture
    reference = copy.deepcopy(student)
    before = snapshot(trainer.model)
    trainer.train()
    ((batches, num_items),) = seen
    assert int(num_items) == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert any((b["labels"] != -100).sum(1).eq(1).any() for b in batches), "no EOS-only row"
    teacher = trainer.teacher_model
    for b in batches:
        logits = reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        with torch.no_grad():
            teacher_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lm_kd_loss(logits[:, :-1], teacher_logits[:, :-1], b["labels"][:, 1:], temperature=1.5, alpha=0.6,
                   num_items_in_batch=num_items).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(before[name] - trainer.model.get_parameter(name).detach(), p.grad, atol=2e-5,
                                   rtol=1e-4, msg=name)


def test_on_policy_coin_is_reproducible_and_leaves_the_global_rng_alone(tmp_path):
    """The coin of (seed, step, micro-batch) is the same for every trainer with that seed (so on every process),
    comes up about lmbda of the time, and sampling draws from a forked RNG: the training RNG is untouched."""

    def coins(seed, steps=200):
        trainer = make_trainer(tmp_path, args=make_args(tmp_path, lmbda=0.3, seed=seed))
        drawn = []
        for step in range(steps):
            trainer.state.global_step = step
            drawn.append([trainer._completion_source(i) == "student" for i in range(2)])
        return np.array(drawn)

    first = coins(0)
    assert (first == coins(0)).all() and not (first == coins(1)).all()
    assert 0.2 < first.mean() < 0.4
    trainer = make_trainer(tmp_path, args=make_args(tmp_path, lmbda=1.0, max_new_tokens=4))
    state = torch.random.get_rng_state()
    generated_rows(trainer, first_batches(lm_dataset(8)))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_on_policy_run_resumed_from_a_checkpoint_gives_the_same_student(tmp_path):
    """lmbda=0.5 with sampled completions and seq_kd, a student with dropout: three steps in one go equal one step, a
    checkpoint, and two resumed steps (coins and samples are drawn again exactly, and sampling leaves the dropout's
    random stream alone: Trainer restores that stream only after the first resumed step's batches are made)."""
    data = lm_dataset(8, seed=5)
    settings = dict(lmbda=0.5, seq_kd=True, max_new_tokens=4, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2, max_steps=3, seed=3)

    def student(seed):
        model = tiny_lm(seed=seed)
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.3
        return model

    straight = make_trainer(tmp_path / "a", args=make_args(tmp_path / "a", **settings), train=data, student=student(1))
    straight.train()
    on_policy = [e["on_policy"] for e in straight.state.log_history if "on_policy" in e]  # per step, of 2 batches
    assert len(on_policy) == 3 and 0 < sum(on_policy) < 3, f"no mix of data sources {on_policy}: the coin is unseen"
    args = make_args(tmp_path / "b", save_strategy="steps", save_steps=1, **settings)
    make_trainer(tmp_path / "b", args=args, train=data, student=student(1)).train()
    resumed = make_trainer(tmp_path / "b", args=args, train=data, student=student(7))
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-1"))
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, msg=name)


@require_peft
def test_seq_kd_with_the_base_model_teacher_generates_with_adapters_disabled(tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    args = make_args(tmp_path, teacher_from_base_model=True, seq_kd=True, max_new_tokens=4,
                     generation_temperature=0.0)
    base = tiny_lm(seed=1)
    trainer = DistillTrainer(model=copy.deepcopy(base), args=args, train_dataset=lm_dataset(8),
                             data_collator=pad_collator, peft_config=config)
    with torch.no_grad():  # adapters that change the outputs
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batches = first_batches(lm_dataset(8))
    new, _ = generated_rows(trainer, batches)
    assert trainer.model.training and any(not m.disable_adapters for m in trainer.model.modules()
                                          if hasattr(m, "disable_adapters"))
    for old, rebuilt in zip(batches, new):
        assert_rebuilt_from(rebuilt, old, base, 4, eos=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lmbda": 1.5}, "lmbda must be a number in [0.0, 1.0], got 1.5"),
        ({"lmbda": -0.1}, "lmbda must be a number in [0.0, 1.0], got -0.1"),
        ({"seq_kd": "yes"}, "seq_kd must be True or False, got 'yes'"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1, got 0"),
        ({"generation_temperature": -1.0}, "generation_temperature must be a number >= 0 (0: greedy), got -1.0"),
        ({"lmbda": 0.5, "cache_teacher_logits": True}, "cache_teacher_logits=True cannot be combined with lmbda=0.5"),
        ({"seq_kd": True, "cache_teacher_logits": True}, "cannot be combined with lmbda=0.0 / seq_kd=True"),
    ],
)
def test_on_policy_settings_reject_bad_values(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as err:
        make_args(tmp_path, **kwargs)
    assert message in str(err.value)


def test_on_policy_data_is_refused_for_classifiers_and_extra_token_inputs(tmp_path):
    with pytest.raises(ValueError, match="lmbda=1.0 / seq_kd=False generate completions, which needs a causal-LM"):
        DistillTrainer(model=tiny_bert(), args=make_args(tmp_path, lmbda=1.0), teacher_model=tiny_bert(),
                       train_dataset=tiny_dataset(8))
    trainer = make_trainer(tmp_path, args=make_args(tmp_path, lmbda=1.0, max_new_tokens=2))
    batch = first_batches(lm_dataset(4), (4,))[0]
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    with pytest.raises(ValueError, match=r"per-token entries \['position_ids'\]"):
        generated_rows(trainer, [batch])


# ---- bad input ------------------------------------------------------------------------------------------------------


def test_different_vocabularies_fail_before_training_naming_both(tmp_path):
    with pytest.raises(ValueError, match=r"student vocab_size=64.*teacher vocab_size=80"):
        make_trainer(tmp_path, teacher=tiny_lm(seed=0, vocab_size=80))


def test_different_vocabularies_name_the_tokenizers():
    from hf_kd.teacher import check_lm_vocabularies


    smol = causal_lm_tokenizer(SMOLLM2)
    student_config, teacher_config = LlamaConfig(vocab_size=len(smol)), LlamaConfig(vocab_size=len(smol) + 1)
    with pytest.raises(ValueError, match=r"SmolLM2-135M-Instruct', 49152 tokens.*teacher vocab_size=49153"):
        check_lm_vocabularies(student_config, teacher_config, smol, None)
    # Same sizes, different tokens: the tokenizers decide.
    with pytest.raises(ValueError, match="vocabularies differ"):
        check_lm_vocabularies(student_config, student_config, smol, _SwappedVocab(smol))


class _SwappedVocab:
    """A tokenizer of the same size whose first two tokens have swapped ids."""

    name_or_path = "swapped"

    def __init__(self, tokenizer):
        self.vocab = dict(tokenizer.get_vocab())
        (a, i), (b, j) = sorted(self.vocab.items(), key=lambda item: item[1])[:2]
        self.vocab[a], self.vocab[b] = j, i

    def __len__(self):
        return len(self.vocab)

    def get_vocab(self):
        return self.vocab


def test_classifier_student_with_lm_data_and_lm_student_with_class_labels(tmp_path):
    with pytest.raises(ValueError, match="causal-LM data"):
        DistillTrainer(model=tiny_bert(vocab_size=VOCAB), args=make_args(tmp_path), teacher_model=tiny_bert(),
                       train_dataset=lm_dataset(4), data_collator=pad_collator)
    with pytest.raises(ValueError, match="holds one class index per row.*causal LM"):
        make_trainer(tmp_path, train=tiny_dataset(8, vocab_size=VOCAB))


def test_lm_student_with_classifier_teacher_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="is a causal LM but the teacher.*is not a causal LM"):
        make_trainer(tmp_path, teacher=tiny_bert(vocab_size=VOCAB))


def test_empty_completion_is_an_error_naming_the_row(tmp_path):
    rows = lm_dataset(4).to_list()
    rows[2]["labels"] = [-100] * (len(rows[2]["labels"]) - 0)
    with pytest.raises(ValueError, match="row 2 has an empty completion"):
        make_trainer(tmp_path, train=datasets.Dataset.from_list(rows))
    rows[2]["labels"][0] = 5  # the first token is never predicted: still empty
    with pytest.raises(ValueError, match="row 2 has an empty completion"):
        make_trainer(tmp_path, train=datasets.Dataset.from_list(rows))


def test_token_label_outside_the_vocabulary_is_an_error(tmp_path):
    rows = lm_dataset(4).to_list()
    rows[1]["labels"][-1] = VOCAB
    with pytest.raises(ValueError, match=f"token label {VOCAB} in row 1"):
        make_trainer(tmp_path, train=datasets.Dataset.from_list(rows))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": "kl"}, "loss_type must be one of ('forward_kl', 'reverse_kl', 'jsd'), got 'kl'"),
        ({"beta": 1.5}, "beta must be in [0.0, 1.0], got 1.5"),
        ({"beta": -0.1}, "beta must be in [0.0, 1.0], got -0.1"),
        ({"alpha": 2.0}, "alpha must be in [0.0, 1.0], got 2.0"),
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"lm_chunk_size": 0}, "lm_chunk_size must be a positive int, got 0"),
    ],
)
def test_config_rejects_out_of_range_values(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make_args(tmp_path, **kwargs)


def test_lm_loss_types_are_refused_for_classifiers(tmp_path):
    with pytest.raises(ValueError, match="loss_type='reverse_kl' is for causal-LM students"):
        DistillTrainer(model=tiny_bert(), args=make_args(tmp_path, loss_type="reverse_kl"), teacher_model=tiny_bert(),
                       train_dataset=tiny_dataset(8))


# ---- a real model ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_teacher_into_a_15_layer_student_on_chat_data(tmp_path):
    from transformers import DataCollatorForSeq2Seq

    from hf_kd.lm_data import lm_chat_dataset, tokenize_lm_dataset
    from hf_kd.student import make_student


    tokenizer = causal_lm_tokenizer(SMOLLM2)
    teacher = causal_lm(SMOLLM2)
    student = make_student(teacher, 15)
    data = lm_chat_dataset("sentiment", max_words=8)  # prompts of ~60 tokens: the answer fits in 64
    columns = ["input_ids", "attention_mask", "labels"]
    with pytest.raises(ValueError, match="both 'labels' \\(token labels\\) and 'label' columns"):
        DistillTrainer(model=student, args=make_args(tmp_path), teacher_model=SMOLLM2,
                       train_dataset=tokenize_lm_dataset(data["train"].select(range(2)), tokenizer, max_length=64))
    train = tokenize_lm_dataset(data["train"].select(range(8)), tokenizer, max_length=64).select_columns(columns)
    validation = tokenize_lm_dataset(data["validation"].select(range(4)), tokenizer, max_length=64).select_columns(
        columns
    )
    args = make_args(tmp_path, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-5)
    trainer = DistillTrainer(
        model=student, args=args, teacher_model=SMOLLM2, train_dataset=train,
        eval_dataset=validation, processing_class=tokenizer, data_collator=DataCollatorForSeq2Seq(tokenizer),
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)
    assert all(math.isfinite(metrics[f"eval_{m}"]) for m in ("perplexity", "token_ece", "token_entropy"))
    assert 0.0 <= metrics["eval_top1_agreement"] <= 1.0
    # The teacher evaluated as its own student: full agreement, and the perplexity of a trained model on one-word
    # answers, far below the half-depth student's.
    itself = DistillTrainer(
        model=copy.deepcopy(teacher), args=make_args(tmp_path / "itself"), teacher_model=SMOLLM2,
        eval_dataset=validation,
        train_dataset=train, processing_class=tokenizer, data_collator=DataCollatorForSeq2Seq(tokenizer),
    ).evaluate()
    assert itself["eval_top1_agreement"] == 1.0
    assert itself["eval_kd_loss"] == pytest.approx(0.0, abs=1e-5)
    assert 1.0 < itself["eval_perplexity"] < 50 < metrics["eval_perplexity"]


def test_pipeline_tag_of_causal_lms_and_their_configs():
    assert pipeline_tag_of(tiny_lm()) == "text-generation"
    assert pipeline_tag_of({"architectures": ["Gemma3ForCausalLM"]}) == "text-generation"
    config = tiny_lm().config
    config.architectures = ["LlamaForCausalLM"]  # what save_pretrained records
    assert pipeline_tag_of(config) == "text-generation"
    assert pipeline_tag_of(tiny_bert()) == "text-classification"


# ---- the top-k teacher-logit cache ----------------------------------------------------------------------------------


def cache_args(tmp_path, **kwargs):
    return make_args(tmp_path, cache_teacher_logits=True, teacher_logits_cache_dir=str(tmp_path / "cache"), **kwargs)


def saved_teacher(tmp_path):
    path = tmp_path / "teacher"
    tiny_lm(layers=3, seed=0).save_pretrained(path)
    return str(path)


def test_cached_run_trains_from_the_cache_without_loading_the_teacher(tmp_path, monkeypatch):
    teacher = saved_teacher(tmp_path)
    first = make_trainer(tmp_path, args=cache_args(tmp_path, lm_cache_top_k=8), teacher=teacher)
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 2  # train and eval
    assert first.train_dataset["teacher_cache_index"] == list(range(8))
    assert first.eval_dataset["teacher_cache_index"] == list(range(8, 14))

    import hf_kd.trainer.teacher_mixin as teacher_mixin

    def no_teacher(*args, **kwargs):
        raise AssertionError("a cached run must not load the teacher")

    monkeypatch.setattr(teacher_mixin, "load_teacher", no_teacher)
    student = tiny_lm(seed=1)
    before = copy.deepcopy(student.state_dict())
    trainer = make_trainer(tmp_path, args=cache_args(tmp_path, lm_cache_top_k=8, eval_strategy="epoch"),
                           student=student, teacher=teacher)
    trainer.train()
    assert trainer.teacher_model is None and trainer.teacher_placement["kind"] == "none"
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert logs and all(math.isfinite(log["kd_loss"]) and log["kd_loss"] >= 0 for log in logs)
    assert any("eval_perplexity" in log for log in trainer.state.log_history)
    assert sorted((tmp_path / "cache").glob("*.safetensors")) == files  # nothing recomputed


def test_cached_loss_with_k_equal_vocab_is_the_live_loss(tmp_path):
    teacher = tiny_lm(layers=3, seed=0)
    for loss_type in ("forward_kl", "jsd"):
        options = dict(loss_type=loss_type, temperature=2.0, alpha=0.7)
        live = make_trainer(tmp_path, args=make_args(tmp_path, **options), teacher=teacher)
        cached = make_trainer(tmp_path, args=cache_args(tmp_path, lm_cache_top_k=VOCAB, **options), teacher=teacher,
                              student=live.model)
        rows = [cached.train_dataset[i] for i in (3, 0, 5, 1)]
        batch = cached.data_collator(rows)
        assert batch["teacher_cache_index"].tolist() == [3, 0, 5, 1]
        expected = live.compute_loss(live.model, pad_collator(rows))
        # float16 log-probs in the file: equal up to their rounding.
        torch.testing.assert_close(cached.compute_loss(cached.model, batch), expected, rtol=2e-3, atol=2e-3)


def test_cached_loss_is_sparse_lm_kd_loss_of_the_teacher_top_k(tmp_path):
    teacher = tiny_lm(layers=3, seed=0)
    trainer = make_trainer(tmp_path, args=cache_args(tmp_path, lm_cache_top_k=5, lm_cache_tail="renormalise",
                                                      temperature=1.5, alpha=0.6), teacher=teacher)
    rows = [trainer.train_dataset[i] for i in (2, 7)]
    batch = pad_collator(rows)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        student_logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    values, ids = teacher_logits.topk(5, dim=-1)
    expected = sparse_lm_kd_loss(student_logits[:, :-1], ids, values, teacher_logits.logsumexp(-1),
                                 batch["labels"][:, 1:], temperature=1.5, alpha=0.6, tail="renormalise")
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    torch.testing.assert_close(loss, expected, rtol=2e-3, atol=2e-3)


def test_cache_file_size_is_six_k_plus_four_bytes_per_completion_token(tmp_path):
    data = lm_dataset(8)
    tokens = sum(sum(1 for label in row["labels"][1:] if label != -100) for row in data)
    for k in (4, 16):
        directory = tmp_path / f"k{k}"
        make_trainer(tmp_path, args=make_args(tmp_path, cache_teacher_logits=True, lm_cache_top_k=k,
                                              teacher_logits_cache_dir=str(directory)), train=data, eval_=data)
        (path,) = directory.glob("*.safetensors")
        payload = tokens * (6 * k + 4) + 8 * (len(data) + 1)
        assert payload <= path.stat().st_size <= payload + 1024  # + the safetensors header


def test_damaged_lm_cache_file_is_an_error_naming_it(tmp_path):
    teacher = tiny_lm(layers=3, seed=0)
    make_trainer(tmp_path, args=cache_args(tmp_path, lm_cache_top_k=4), teacher=teacher, eval_=lm_dataset(8))
    (path,) = (tmp_path / "cache").glob("*.safetensors")
    from safetensors.torch import load_file

    original = {name: tensor.clone() for name, tensor in load_file(path).items()}  # not a view of the file
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{path}.*sha256 checksum.*It was not used; delete it to recompute it"):
        make_trainer(tmp_path, args=cache_args(tmp_path, lm_cache_top_k=4), teacher=teacher, eval_=lm_dataset(8))
    path.write_bytes(bytes(raw[: len(raw) // 2]))  # cut off mid-write (by another tool: hf_kd writes atomically)
    with pytest.raises(ValueError, match=f"{path} is unreadable.*delete it to recompute it"):
        make_trainer(tmp_path, args=cache_args(tmp_path, lm_cache_top_k=4), teacher=teacher, eval_=lm_dataset(8))
    # As documented: deleting the file makes the next run recompute it, the same as the first time.
    path.unlink()
    trainer = make_trainer(tmp_path, args=cache_args(tmp_path, lm_cache_top_k=4), teacher=teacher, eval_=lm_dataset(8))
    assert path.exists() and trainer.train_dataset["teacher_cache_index"] == list(range(8))
    recomputed = load_file(path)
    for name, tensor in original.items():
        torch.testing.assert_close(recomputed[name], tensor, msg=name)


def test_lm_cache_top_k_must_fit_the_vocabulary(tmp_path, monkeypatch):
    import hf_kd.trainer.teacher_mixin as teacher_mixin

    def no_pass(*args, **kwargs):
        raise AssertionError("the error must come before the teacher pass")

    monkeypatch.setattr(teacher_mixin, "compute_teacher_lm_top_k", no_pass)
    with pytest.raises(ValueError, match=f"lm_cache_top_k=65 is larger than the student's vocabulary \\({VOCAB} tokens"
                                         f"\\): choose 1 <= lm_cache_top_k <= {VOCAB}"):
        make_trainer(tmp_path, args=cache_args(tmp_path, lm_cache_top_k=VOCAB + 1))
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="lm_cache_top_k must be an int >= 1, got 0"):
        cache_args(tmp_path, lm_cache_top_k=0)
    with pytest.raises(ValueError, match="lm_cache_tail must be one of"):
        cache_args(tmp_path, lm_cache_tail="drop")


def test_collator_that_changes_the_labels_is_an_error(tmp_path):
    trainer = make_trainer(tmp_path, args=cache_args(tmp_path, lm_cache_top_k=4), eval_=None)
    rows = [trainer.train_dataset[i] for i in (1, 2)]
    batch = trainer.data_collator(rows)
    batch["labels"][0, -1] = -100 if batch["labels"][0, -1] != -100 else 5
    with pytest.raises(ValueError, match="Row 1 of this batch has .* completion tokens but the teacher cache holds"):
        trainer.compute_loss(trainer.model, batch)


@pytest.mark.parametrize("cached", [False, True])
def test_logged_loss_parts_are_the_alpha_one_and_zero_losses_from_one_pass(tmp_path, cached):
    teacher = tiny_lm(layers=3, seed=0)
    options = dict(temperature=2.0, alpha=0.3, loss_type="jsd", beta=0.4)
    args = cache_args(tmp_path, lm_cache_top_k=6, **options) if cached else make_args(tmp_path, **options)
    trainer = make_trainer(tmp_path, args=args, teacher=teacher)
    rows = [trainer.train_dataset[i] for i in (1, 4, 6)]
    batch = trainer.data_collator(rows)
    plain = pad_collator(rows)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        student_logits = trainer.model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
        teacher_logits = teacher(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
    (kd,), (ce,) = trainer._metrics["train"]["kd_loss"], trainer._metrics["train"]["ce_loss"]
    shifted = (student_logits[:, :-1], teacher_logits[:, :-1], plain["labels"][:, 1:])
    options = dict(loss_type="jsd", beta=0.4, temperature=2.0)
    if cached:  # the cached parts are sparse_lm_kd_loss's; the cross-entropy is the same as the live one's
        values, ids = teacher_logits[:, :-1].topk(6, dim=-1)
        top = (ids, values, teacher_logits[:, :-1].logsumexp(-1))
        expected_kd = sparse_lm_kd_loss(shifted[0], *top, shifted[2], **options, alpha=1.0)
        torch.testing.assert_close(kd, expected_kd, rtol=2e-3, atol=2e-3)
    else:
        torch.testing.assert_close(kd, lm_kd_loss(*shifted, **options, alpha=1.0))
    torch.testing.assert_close(ce, lm_kd_loss(*shifted, **options, alpha=0.0))
    torch.testing.assert_close(loss, 0.3 * kd + 0.7 * ce, rtol=1e-5, atol=1e-6)


def test_cached_evaluation_logs_top1_agreement_from_the_cached_top1_ids(tmp_path):
    teacher = tiny_lm(layers=3, seed=0)
    student = tiny_lm(seed=1)
    eval_data = lm_dataset(6, seed=1)
    live = make_trainer(tmp_path, args=make_args(tmp_path), teacher=teacher, student=student, eval_=eval_data)
    cached = make_trainer(tmp_path, args=cache_args(tmp_path, lm_cache_top_k=3), teacher=teacher, student=student,
                          eval_=eval_data)
    live_metrics, cached_metrics = live.evaluate(), cached.evaluate()
    assert "eval_top1_agreement" in cached_metrics
    assert cached_metrics["eval_top1_agreement"] == live_metrics["eval_top1_agreement"]
    for key in ("eval_perplexity", "eval_token_accuracy", "eval_token_ece", "eval_ce_loss"):
        assert cached_metrics[key] == pytest.approx(live_metrics[key], rel=1e-5), key
    # The agreement itself, token by token from the teacher's argmax.
    batch = pad_collator([eval_data[i] for i in range(len(eval_data))])
    with torch.no_grad():
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        top_s, top_t = student.eval()(**inputs).logits.argmax(-1), teacher(**inputs).logits.argmax(-1)
    counted = batch["labels"][:, 1:] != -100
    expected = (top_s[:, :-1] == top_t[:, :-1])[counted].float().mean().item()
    assert cached_metrics["eval_top1_agreement"] == pytest.approx(expected)


def test_lm_token_statistics_from_top1_ids_equal_those_from_the_teacher_logits():
    from hf_kd.metrics import lm_token_statistics

    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 9, generator=generator), torch.randn(2, 5, 9, generator=generator)
    labels = torch.randint(0, 9, (2, 5), generator=generator)
    full = lm_token_statistics(student, labels, teacher_logits=teacher)
    torch.testing.assert_close(lm_token_statistics(student, labels, teacher_top1=teacher.argmax(-1)), full)
    both = preprocess_lm_logits_for_metrics((student, teacher.argmax(-1)), labels)
    torch.testing.assert_close(both, preprocess_lm_logits_for_metrics((student, teacher), labels), equal_nan=True)
    with pytest.raises(ValueError, match=r"teacher_top1 must hold integer token ids of shape \(2, 5\)"):
        lm_token_statistics(student, labels, teacher_top1=teacher.argmax(-1)[:, :3])
    with pytest.raises(ValueError, match="not both"):
        lm_token_statistics(student, labels, teacher_logits=teacher, teacher_top1=teacher.argmax(-1))


# ---- data in TRL's SFTTrainer formats, tokenized by the trainer -----------------------------------------------------

TRL_FORMATS = {
    "text": [{"text": "The film is good."}, {"text": "A long and very bad film."}, {"text": "Good news today."}],
    "messages": [
        {"messages": [{"role": "user", "content": "Is the film good?"}, {"role": "assistant", "content": "Yes."}]},
        {"messages": [{"role": "user", "content": "Topic?"}, {"role": "assistant", "content": "Sport."},
                      {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes, sport."}]},
    ],
    "prompt_completion": [{"prompt": "The film is", "completion": " good."}, {"prompt": "Topic:", "completion": " sport"}],
    "conversational_prompt_completion": [
        {"prompt": [{"role": "user", "content": "Positive or negative: a fine film."}],
         "completion": [{"role": "assistant", "content": "positive"}]},
        {"prompt": [{"role": "user", "content": "Topic of: the match ended 2-1."}],
         "completion": [{"role": "assistant", "content": "sport"}]},
    ],
}


def smollm2_vocab_llama(seed):
    """A tiny llama over the SmolLM2 tokenizer's vocabulary (49,152)."""
    return tiny_llama(layers=1, seed=seed, vocab_size=49152, tie_word_embeddings=True)


@pytest.mark.parametrize("format", list(TRL_FORMATS))
def test_trl_format_datasets_are_tokenized_by_the_trainer(tmp_path, format):
    from hf_kd.lm_data import LMDataCollator, tokenize_lm_dataset

    tokenizer = causal_lm_tokenizer(SMOLLM2)
    data = datasets.Dataset.from_list(TRL_FORMATS[format])
    args = make_args(tmp_path, per_device_train_batch_size=2, max_steps=1, lm_max_length=64)
    trainer = DistillTrainer(model=smollm2_vocab_llama(1), args=args, teacher_model=smollm2_vocab_llama(0),
                             train_dataset=data, eval_dataset=data, processing_class=tokenizer)
    expected = tokenize_lm_dataset(data, tokenizer, max_length=64)
    assert trainer.train_dataset.column_names == ["input_ids", "attention_mask", "labels"]
    assert trainer.train_dataset["labels"] == expected["labels"]
    assert trainer.train_dataset["input_ids"] == expected["input_ids"]
    if format != "text":  # completion-only: the prompt is not trained on
        assert all(labels[0] == -100 for labels in trainer.train_dataset["labels"])
    assert isinstance(trainer.data_collator, LMDataCollator) and trainer.data_collator.pad_token_id == 2
    trainer.train()
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics["eval_perplexity"])
    # evaluate() of a dataset in a TRL format tokenizes it the same way.
    assert trainer.evaluate(data)["eval_loss"] == pytest.approx(metrics["eval_loss"])


def test_default_collator_right_pads_with_the_pad_token_and_minus_100():
    from hf_kd.lm_data import LMDataCollator

    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [8], "labels": [8]}]
    batch = LMDataCollator(pad_token_id=2)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert LMDataCollator(2, pad_to_multiple_of=4)(rows)["input_ids"].shape == (2, 4)
    with pytest.raises(ValueError, match="pad_token_id must be a token id"):
        LMDataCollator(pad_token_id=None)


def test_pre_tokenized_data_without_a_collator_gets_the_default_one(tmp_path):
    from hf_kd.lm_data import LMDataCollator

    trainer = DistillTrainer(model=tiny_lm(seed=1), args=make_args(tmp_path, max_steps=1),
                             teacher_model=tiny_lm(layers=3, seed=0), train_dataset=lm_dataset(8))
    assert isinstance(trainer.data_collator, LMDataCollator) and trainer.data_collator.pad_token_id == 0  # config's
    trainer.train()
    rows = [trainer.train_dataset[i] for i in range(3)]
    for key, value in pad_collator(rows).items():
        assert torch.equal(trainer.data_collator(rows)[key], value), key
    no_pad = tiny_lm(seed=1)
    no_pad.config.pad_token_id = no_pad.config.eos_token_id = None
    with pytest.raises(ValueError, match="no pad_token_id or eos_token_id .* pass processing_class="):
        DistillTrainer(model=no_pad, args=make_args(tmp_path), teacher_model=tiny_lm(layers=3, seed=0),
                       train_dataset=lm_dataset(8))


def test_trl_format_bad_input_is_named(tmp_path):
    tokenizer = causal_lm_tokenizer(SMOLLM2)
    data = datasets.Dataset.from_list(TRL_FORMATS["prompt_completion"])
    args = make_args(tmp_path, lm_max_length=4)

    def build(train, processing_class=tokenizer, args=args):
        return DistillTrainer(model=smollm2_vocab_llama(1), args=args, teacher_model=smollm2_vocab_llama(0),
                              train_dataset=train, processing_class=processing_class)

    with pytest.raises(ValueError, match="train_dataset has a 'prompt' column .* pass processing_class="):
        build(data, processing_class=None)
    # A prompt of lm_max_length tokens or more is refused (nothing of its completion would fit), naming the row.
    long = datasets.Dataset.from_list([{"prompt": "a b c d e f", "completion": " g"}])
    with pytest.raises(ValueError, match=r"train_dataset: Row 0: The prompt has 6 tokens, so nothing of the completion "
                                         r"fits in max_length=4.*DistillConfig.lm_max_length"):
        build(long)
    # A long completion is cut on the right: the row keeps lm_max_length tokens.
    cut = build(datasets.Dataset.from_list([{"prompt": "a b", "completion": " c d e f g"}]))
    assert len(cut.train_dataset[0]["input_ids"]) == 4 and cut.train_dataset[0]["labels"][:2] == [-100, -100]
    with pytest.raises(ValueError, match=r"Row 1: completion is empty"):
        build(datasets.Dataset.from_list([{"prompt": "a", "completion": " b"}, {"prompt": "a", "completion": " "}]))
    empty_turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    with pytest.raises(ValueError, match=r"Row 0: messages has an empty assistant turn"):
        build(datasets.Dataset.from_list([{"messages": empty_turn}]))
    with pytest.raises(ValueError, match="lm_max_length must be an int >= 2"):
        make_args(tmp_path, lm_max_length=1)
    # No pad token and no EOS: the default collator cannot pad; the error names the fix.
    bare = copy.deepcopy(tokenizer)
    bare.pad_token, bare.eos_token = None, None
    with pytest.raises(ValueError, match=r"no pad token and no EOS token .*\(tokenizer.pad_token = "):
        build(data, processing_class=bare, args=make_args(tmp_path, lm_max_length=32))


def test_lm_helpers_are_exported_from_hf_kd():
    import hf_kd
    from hf_kd import lm_data, losses, metrics, student

    modules = {
        losses: ("LMLossParts", "lm_kd_loss", "sparse_lm_kd_loss"),
        metrics: ("lm_metrics", "make_lm_compute_metrics", "preprocess_lm_logits_for_metrics"),
        lm_data: ("LMDataCollator", "tokenize_lm_dataset", "lm_text_dataset", "lm_chat_dataset"),
        student: ("make_student", "drop_layers"),
    }
    for module, names in modules.items():
        for name in names:
            assert name in hf_kd.__all__, name
            assert getattr(hf_kd, name) is getattr(module, name), name
            if module is not student:  # hf_kd.student has no __all__
                assert name in module.__all__, name


def test_lm_fields_parse_next_to_the_recipes_data_arguments():
    """trainers/distill.py parses DataArguments (whose --max_length is the classification truncation) with
    DistillConfig: the LM length is lm_max_length, so the two never clash."""
    from transformers import HfArgumentParser

    from hf_kd.recipes import DataArguments

    data, config = HfArgumentParser((DataArguments, DistillConfig)).parse_args_into_dataclasses(
        args=["--output_dir", "out", "--max_length", "32", "--lm_max_length", "256", "--report_to", "none"]
    )
    assert data.max_length == 32 and config.lm_max_length == 256


# ---- the LM heads run inside the loss (lm_fused_head) ----------------------------------------------------------------


def _head_calls(model):
    """A list that grows by one at every call of `model`'s LM head."""
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("cached", [False, True])
def test_fused_heads_train_like_full_logits_without_running_the_heads(tmp_path, cached):
    """lm_fused_head=None (the default, fused where possible) and False train the same student (same losses, same
    weights up to float rounding); fused, neither model's LM head runs in a training step, so no (batch, seq, vocab)
    logits exist; evaluation still runs the heads (its metrics read the logits)."""
    runs = {}
    for setting in (None, False):
        extra = dict(cache_teacher_logits=True, lm_cache_top_k=8, teacher_logits_cache_dir=str(tmp_path / "cache"),
                     lm_cache_tail="bucket") if cached else {}
        # SGD: Adam's g / sqrt(v) would blow float rounding of near-zero gradients up to full-size steps.
        args = make_args(tmp_path / str(setting), lm_fused_head=setting, max_steps=2, alpha=0.6, temperature=1.5,
                         optim="sgd", learning_rate=0.5, **extra)
        teacher = tiny_lm(layers=3, seed=0)
        trainer = make_trainer(tmp_path, args=args, teacher=teacher if not cached else saved_teacher(tmp_path))
        student_calls, teacher_calls = _head_calls(trainer.model), _head_calls(teacher)
        trainer.train()
        runs[setting] = trainer
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        if setting is None:
            assert student_calls == [] and teacher_calls == []
            fused_losses = losses
        else:
            assert student_calls and (cached or teacher_calls)
            assert losses == pytest.approx(fused_losses, rel=1e-5)
        metrics = trainer.evaluate()
        assert math.isfinite(metrics["eval_perplexity"]) and "eval_top1_agreement" in metrics
    assert student_calls  # evaluation made full logits
    for (name, fused), full in zip(runs[None].model.named_parameters(), runs[False].model.parameters()):
        torch.testing.assert_close(fused, full, atol=1e-5, rtol=1e-4, msg=name)


def test_fused_head_required_but_impossible_is_an_error_and_default_falls_back(tmp_path, caplog):
    student = tiny_lm(seed=1)
    student.lm_head = torch.nn.Linear(32, VOCAB, bias=True)  # a head with a bias is not hidden @ weight.T
    trainer = make_trainer(tmp_path, args=make_args(tmp_path / "required", lm_fused_head=True, max_steps=1),
                           student=copy.deepcopy(student))
    with pytest.raises(ValueError, match=r"lm_fused_head=True, but the student's LM head .*has a bias.*"
                                         r"lm_fused_head=None"):
        trainer.train()
    trainer = make_trainer(tmp_path, args=make_args(tmp_path / "auto", max_steps=2), student=student)
    teacher_calls, student_calls = _head_calls(trainer.teacher_model), _head_calls(trainer.model)
    with caplog.at_level("INFO", logger="hf_kd.trainer.teacher_mixin"):
        trainer.train()
    assert student_calls and not teacher_calls  # each model decided on its own
    assert "The student's LM head makes full logits (its LM head has a bias)" in caplog.text
    assert "The teacher's LM head runs inside the loss" in caplog.text


def test_lm_fused_head_rejects_other_values(tmp_path):
    with pytest.raises(ValueError, match="lm_fused_head must be None .*, True or False, got 'yes'"):
        make_args(tmp_path, lm_fused_head="yes")
