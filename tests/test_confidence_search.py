"""Confidence-preservation search (Vengertsev & Sherman 2024): Pareto front, search space, the optuna search through
Trainer.hyperparameter_search on tiny models, and `hf-kd confidence-search`."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from transformers import DataCollatorWithPadding, TrainerCallback

from hf_kd import DistillConfig, DistillTrainer
from hf_kd.cli import main
from hf_kd.confidence_search import SearchSpace, pareto_front, search_confidence_preservation
from hf_kd.evaluation import compute_logits
from hf_kd.metrics import confidence_preservation

from .testing_utils import WORDS, tiny_bert, tiny_dataset, tiny_tokenizer

SPACE = SearchSpace(learning_rate=(1e-4, 1e-2), num_train_epochs=(1, 2), per_device_train_batch_size=(4, 8),
                    weight_decay=(1e-6, 0.1))
BASELINE = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 8, "weight_decay": 0.01}


def test_pareto_front_against_brute_force():
    rng = np.random.default_rng(0)
    sigmas, accs = rng.random(40).round(2).tolist(), rng.random(40).round(2).tolist()
    sigmas[3] = math.nan
    front = pareto_front(sigmas, accs)
    for i, on_front in enumerate(front):
        if math.isnan(sigmas[i]):
            assert not on_front
            continue
        better = [j for j in range(40) if j != i and not math.isnan(sigmas[j]) and sigmas[j] <= sigmas[i]
                  and accs[j] >= accs[i] and (sigmas[j], accs[j]) != (sigmas[i], accs[i])]
        assert on_front == (not better), i
    assert pareto_front([0.1, 0.1], [0.8, 0.8]) == [True, True]  # ties dominate nobody
    assert pareto_front([0.1, 0.2, 0.05], [0.8, 0.9, 0.7]) == [True, True, True]
    assert pareto_front([0.1, 0.2], [0.9, 0.8]) == [True, False]


@pytest.mark.parametrize(
    "kwargs, message",
    [({"learning_rate": (0.0, 1e-3)}, "learning_rate range must be 0 < low <= high"),
     ({"num_train_epochs": (3, 2)}, "num_train_epochs range must be integers"),
     ({"per_device_train_batch_size": (16, 0)}, "per_device_train_batch_size must be positive ints"),
     ({"weight_decay": (0.1, 0.01)}, "weight_decay range")],
)
def test_search_space_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace(**kwargs)
    assert SearchSpace().contains({"learning_rate": 3e-5, "num_train_epochs": 3, "per_device_train_batch_size": 32,
                                   "weight_decay": 0.01})
    assert not SearchSpace().contains({**BASELINE, "per_device_train_batch_size": 8})


class KeepModel(TrainerCallback):
    """Keeps a copy of each trial's trained student (hyperparameter_search frees it)."""

    def __init__(self):
        self.models = []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.models.append(copy.deepcopy(model).eval())


def teacher():
    """A tiny BERT whose probabilities vary across inputs (see test_calibration.expressive_bert)."""
    return tiny_bert(seed=7, initializer_range=0.5)


def labelled_by_teacher(n, seed):
    """Tiny data labelled by the teacher's argmax: every split has examples both models can get right."""
    dataset = tiny_dataset(n, seed=seed)
    labels = compute_logits(teacher(), dataset).argmax(-1)
    return dataset.remove_columns("label").add_column("label", labels.tolist())


def search_trainer(tmp_path, **kwargs):
    tokenizer = tiny_tokenizer(tmp_path)
    settings = dict(
        output_dir=str(tmp_path / "out"), eval_strategy="no", save_strategy="no", report_to="none", use_cpu=True,
        seed=0, teacher_logits_cache_dir=str(tmp_path / "cache"), cache_teacher_logits=True, temperature=1.0,
        alpha=1.0, per_device_eval_batch_size=16, disable_tqdm=True, **BASELINE,
    )
    args = DistillConfig(**{**settings, **kwargs})
    return DistillTrainer(
        model=None, model_init=lambda: tiny_bert(seed=1), args=args, teacher_model=teacher(),
        train_dataset=labelled_by_teacher(32, 0), processing_class=tokenizer,
        eval_dataset=None if args.eval_strategy == "no" else labelled_by_teacher(8, 2), data_collator=DataCollatorWithPadding(tokenizer),
    )


def test_search_on_tiny_models(tmp_path):
    trainer = search_trainer(tmp_path)
    keep = KeepModel()
    trainer.add_callback(keep)
    train, dev = labelled_by_teacher(32, 0), labelled_by_teacher(24, 1)
    result = search_confidence_preservation(trainer, train, dev, n_trials=3, kappa=0.05, search_space=SPACE, seed=0)

    assert [t.number for t in result.trials] == [0, 1, 2, 3] and len(keep.models) == 4
    assert result.baseline.number == 0 and result.baseline.params == BASELINE
    assert all(SPACE.contains(t.params) for t in result.trials)
    assert len({tuple(sorted(t.params.items())) for t in result.trials}) == 4  # the sampler explored
    for t in result.trials:
        for key in ("eval_train_sigma", "eval_dev_sigma", "eval_train_accuracy", "eval_dev_accuracy",
                    "eval_dev_teacher_accuracy"):
            assert key in t.metrics, key
        assert t.accepted == (t.sigma_train <= 0.05 and t.accuracy_dev >= result.baseline.accuracy_dev - 0.01)
    assert [t.pareto for t in result.trials] == pareto_front([t.sigma_train for t in result.trials],
                                                             [t.accuracy_dev for t in result.trials])

    # The recorded sigma on train is the sigma of that trial's trained student, recomputed from scratch.
    teacher_model = teacher().eval()
    collate = DataCollatorWithPadding(tiny_tokenizer(tmp_path))
    batch = collate([{k: r[k] for k in ("input_ids", "attention_mask")} for r in train])
    with torch.no_grad():
        teacher_probs = torch.softmax(teacher_model(**batch).logits, -1)
        for trial, model in zip(result.trials, keep.models, strict=True):
            student_probs = torch.softmax(model(**batch).logits, -1)
            expected = confidence_preservation(teacher_probs, student_probs, np.array(train["label"]))
            assert trial.sigma_train == pytest.approx(expected, abs=1e-5) and expected > 1e-3

    paths = result.save(tmp_path / "report")
    table = paths["markdown"].read_text()
    assert "| trial | learning rate |" in table and "0 (baseline)" in table and "kappa 0.05" in table
    assert len(json.loads(paths["json"].read_text())["trials"]) == 4


def test_search_input_errors(tmp_path):
    trainer = search_trainer(tmp_path)
    with pytest.raises(ValueError, match="outside the search space"):
        search_confidence_preservation(trainer, tiny_dataset(8), tiny_dataset(8), baseline={"learning_rate": 1.0},
                                       search_space=SPACE)
    with pytest.raises(ValueError, match="unknown"):
        search_confidence_preservation(trainer, tiny_dataset(8), tiny_dataset(8), baseline={"temperature": 2.0})
    with pytest.raises(ValueError, match="kappa must be > 0"):
        search_confidence_preservation(trainer, tiny_dataset(8), tiny_dataset(8), kappa=0.0)
    with pytest.raises(ValueError, match="eval_strategy='no'"):
        search_confidence_preservation(search_trainer(tmp_path, eval_strategy="epoch"), tiny_dataset(8),
                                       tiny_dataset(8))
    tokenizer = tiny_tokenizer(tmp_path)
    plain = DistillTrainer(model=tiny_bert(seed=1), args=DistillConfig(output_dir=str(tmp_path / "c"), use_cpu=True),
                           teacher_model=tiny_bert(seed=7), train_dataset=tiny_dataset(8), processing_class=tokenizer)
    with pytest.raises(ValueError, match="needs a model_init"):
        search_confidence_preservation(plain, tiny_dataset(8), tiny_dataset(8))


def test_cli_confidence_search(tmp_path, capsys):
    tokenizer = tiny_tokenizer(tmp_path)
    for name, seed in (("teacher", 7), ("student", 1)):
        tiny_bert(seed=seed).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 24), ("validation", 16)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                ids = torch.randint(0, len(WORDS), (4,), generator=g).tolist()
                f.write(json.dumps({"text": " ".join(WORDS[i] for i in ids), "label": ids[0] % 2}) + "\n")
    out = tmp_path / "search"
    argv = ["confidence-search", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
            "--data_files", f"train={tmp_path / 'train.jsonl'}", f"validation={tmp_path / 'validation.jsonl'}",
            "--output_dir", str(out), "--n_trials", "1", "--learning_rate", "1e-3", "--num_train_epochs", "1",
            "--per_device_train_batch_size", "8", "--epochs_range", "1", "2", "--batch_sizes", "8",
            "--learning_rate_range", "1e-4", "1e-2", "--cache_dir", str(tmp_path / "cache"), "--sigma_class", "gold"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Baseline (trial 0)" in printed and "| trial |" in printed
    saved = json.loads((out / "confidence_search.json").read_text())
    assert len(saved["trials"]) == 2 and saved["trials"][0]["baseline"]
    assert main([*argv[:-2], "--sigma_class", "first"]) == 1
    assert "--sigma_class must be a class index or 'gold'" in capsys.readouterr().err
