"""Bad input across the public API and the `hf-kd` CLI: wrong types, empty data, labels out of range, NaN/inf in
(teacher) logits, mismatched lengths. Each case asserts the exception type and that the message names the bad value
(and, where there is one, the row). The matrix of entry points x categories, and which test covers each cell, is in
docs/hardening.md ("Bad input across the public API"). Cross-cutting on purpose (one matrix over every module); the
trainers come from the factories of tests/testing_utils.py, the saved model from the `model_dir` fixture of
tests/conftest.py."""

import json
import re

import datasets
import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from hf_kd import calibrate_temperature, evaluate_uncertainty, fit_temperature, losses
from hf_kd import early_exit as ee
from hf_kd import prediction_sets as ps
from hf_kd.cli import main
from hf_kd.metrics import make_compute_metrics, make_exit_compute_metrics
from hf_kd.teacher import TEACHER_LOGITS_COLUMN

from .testing_utils import (
    make_distill_args,
    make_distill_trainer,
    make_early_exit_args,
    make_early_exit_trainer,
    make_self_kd_trainer,
    tiny_bert,
    tiny_dataset,
)

NAN, INF = float("nan"), float("inf")
LOGITS = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1], [0.0, 2.0, 0.0], [-1.0, 0.0, 3.0]])
LABELS = torch.tensor([0, 1, 1, 2])


def with_value(tensor, index, value):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


# ---- losses: one table, every public loss ---------------------------------------------------------------------------

LOSS_CASES = {
    "kd_loss list": (lambda: losses.kd_loss(LOGITS.tolist(), LOGITS), TypeError, "student_logits must be a torch.Tensor, got list"),
    "kd_loss label >= C": (lambda: losses.kd_loss(LOGITS, LOGITS, torch.tensor([0, 1, 5, 2])), ValueError,
                           r"labels must be in \[0, 3\) or -100 \(ignored\), got 5 at index 2"),
    "kd_loss label < 0": (lambda: losses.kd_loss(LOGITS, LOGITS, torch.tensor([0, -3, 1, 2])), ValueError,
                          r"got -3 at index 1"),
    "kd_loss NaN teacher": (lambda: losses.kd_loss(LOGITS, with_value(LOGITS, (2, 1), NAN), LABELS), ValueError,
                            r"teacher_logits contain NaN or inf \(nan in item 2\)"),
    "kd_loss inf teacher": (lambda: losses.kd_loss(LOGITS, with_value(LOGITS, (3, 0), -INF)), ValueError,
                            r"teacher_logits contain NaN or inf \(-inf in item 3\)"),
    "kd_loss teacher shape": (lambda: losses.kd_loss(LOGITS, LOGITS[:3]), ValueError, r"got \(4, 3\) and \(3, 3\)"),
    "kd_loss labels length": (lambda: losses.kd_loss(LOGITS, LOGITS, LABELS[:3]), ValueError,
                              r"labels must have shape \(4,\) .* got \(3,\)"),
    "soft_cross_entropy list": (lambda: losses.soft_cross_entropy(LOGITS, LOGITS.tolist()), TypeError,
                                "target_probs must be a torch.Tensor, got list"),
    "soft_cross_entropy NaN target": (
        lambda: losses.soft_cross_entropy(LOGITS, with_value(LOGITS.softmax(-1), (1, 2), NAN)), ValueError,
        r"target_probs contain NaN or inf \(nan in item 1\)"),
    "label_smoothing_targets list": (lambda: losses.label_smoothing_targets([0, 1], 3, 0.1), TypeError,
                                     "labels must be a torch.Tensor, got list"),
    "label_smoothing_targets label >= C": (lambda: losses.label_smoothing_targets(torch.tensor([0, 3]), 3, 0.1),
                                           ValueError, r"in \[0, 3\) or -100 \(ignored\), got 3 at index 1"),
    "self_kd_loss label >= C": (
        lambda: losses.self_kd_loss([LOGITS, LOGITS], torch.tensor([0, 1, 7, 2]), source_exit=0), ValueError,
        "got 7 at index 2"),
    "self_kd_loss labels list": (lambda: losses.self_kd_loss([LOGITS, LOGITS], [0, 1, 1, 2], source_exit=0),
                                 TypeError, "labels must be a torch.Tensor, got list"),
    "kd_layer_loss array": (lambda: losses.kd_layer_loss(LOGITS.numpy(), LOGITS.softmax(-1)), TypeError,
                            "scores must be a torch.Tensor, got ndarray"),
    "dedier_weights label >= C": (lambda: losses.dedier_weights(LOGITS, torch.tensor([0, 1, 9, 2]), torch.ones(4)),
                                  ValueError, "got 9 at index 2"),
    "dedier_weights NaN readout": (
        lambda: losses.dedier_weights(with_value(LOGITS, (0, 0), NAN), LABELS, torch.ones(4)), ValueError,
        r"readout_logits contain NaN or inf \(nan in item 0\)"),
}


@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_losses(name):
    call, error, message = LOSS_CASES[name]
    with pytest.raises(error, match=message):
        call()


def test_valid_labels_and_ignored_items_still_pass():
    # The new checks accept what the losses always accepted: -100 items, and the boundary classes 0 and C-1.
    labels = torch.tensor([0, -100, 2, 1])
    assert torch.isfinite(losses.kd_loss(LOGITS, LOGITS.flip(0), labels))
    assert torch.isfinite(losses.self_kd_loss([LOGITS, LOGITS.flip(0)], labels, source_exit=0)[0])


# ---- metrics, calibration, prediction sets, early-exit budgets --------------------------------------------------------

PROBS = LOGITS.softmax(-1).numpy()
EXIT_PROBS = torch.stack([LOGITS, LOGITS.flip(0)]).softmax(-1)  # (2 exits, 4, 3)
FUNCTION_CASES = {
    "compute_metrics lengths": (lambda: make_compute_metrics()(EvalPrediction(LOGITS.numpy(), LABELS.numpy()[:3])),
                                r"label_ids must have shape \(4,\), got \(3,\)"),
    "compute_metrics label >= C": (
        lambda: make_compute_metrics()(EvalPrediction(LOGITS.numpy(), np.array([0, 1, 3, 2]))),
        r"labels must be in \[0, 3\) .*got 3 at index 2"),
    "compute_metrics NaN teacher": (
        lambda: make_compute_metrics()(EvalPrediction((LOGITS.numpy(), with_value(LOGITS, (0, 0), NAN).numpy()),
                                                      LABELS.numpy())),
        "teacher_logits must be finite, got 1 non-finite"),
    "exit_compute_metrics exit shape": (
        lambda: make_exit_compute_metrics()(EvalPrediction((LOGITS.numpy(), LOGITS.numpy()[:3]), LABELS.numpy())),
        r"exit_0_logits must have the final logits' shape \(4, 3\), got \(3, 3\)"),
    "fit_temperature lengths": (lambda: fit_temperature(LOGITS, LABELS[:3]),
                                r"labels must have shape \(4,\) to match the logits, got \(3,\)"),
    "raps label >= C": (lambda: ps.raps_prediction_sets(EXIT_PROBS.numpy(), np.array([0, 1, 5, 2]),
                                                        EXIT_PROBS.numpy()),
                        r"labels must be in \[0, 3\), got values in \[0, 5\]"),
    "prediction_set_metrics scores as sets": (
        lambda: ps.prediction_set_metrics(EXIT_PROBS.numpy(), LABELS.numpy()),
        "sets must be boolean membership masks .* got dtype float32"),
    "budgeted_evaluation label >= C": (
        lambda: ee.budgeted_evaluation(EXIT_PROBS, EXIT_PROBS, torch.tensor([0, 1, 7, 2]), [1.0, 2.0]),
        "got 7 at index 2"),
    "budgeted_evaluation lengths": (lambda: ee.budgeted_evaluation(EXIT_PROBS, EXIT_PROBS, LABELS[:3], [1.0, 2.0]),
                                    r"labels must have shape \(4,\) .*got \(3,\)"),
}


@pytest.mark.parametrize("name", list(FUNCTION_CASES))
def test_metrics_calibration_sets_budgets(name):
    call, message = FUNCTION_CASES[name]
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("function", [evaluate_uncertainty, calibrate_temperature])
def test_model_given_by_name(function):
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module sequence classifier, got str .*from_pretrained"):
        function("my-org/student", tiny_dataset(4))


# ---- trainers: datasets are checked when the trainer is built, before any step -----------------------------------------


def relabel(dataset, row, value):
    labels = list(dataset["label"])
    labels[row] = value
    return dataset.remove_columns("label").add_column("label", labels)


def teacher_logits_column(dataset, row=None, value=NAN, width=2):
    rows = [[0.1 * i] + [-0.1 * i] * (width - 1) for i in range(len(dataset))]
    if row is not None:
        rows[row][-1] = value
    return dataset.add_column(TEACHER_LOGITS_COLUMN, rows)


def build(trainer, tmp_path, **datasets):
    if trainer == "distill":
        return make_distill_trainer(tmp_path, tiny_bert(seed=0), args=make_distill_args(tmp_path), **datasets)
    if trainer == "early_exit":
        return make_early_exit_trainer(tmp_path, **datasets)
    return make_self_kd_trainer(tmp_path, **datasets)


LABEL_RANGE = r"labels must be in \[0, 2\) \(the student's num_labels\) or -100 \(ignored\)"
TRAINER_CASES = {
    "label >= num_labels (train)": (lambda: {"train": relabel(tiny_dataset(16), 11, 2)}, ValueError,
                                    rf"train_dataset column 'label' has label 2 in row 11 \(1 bad row\(s\)\): {LABEL_RANGE}"),
    "negative label (train)": (lambda: {"train": relabel(tiny_dataset(16), 3, -1)}, ValueError,
                               rf"train_dataset column 'label' has label -1 in row 3 .*{LABEL_RANGE}"),
    "label >= num_labels (eval)": (lambda: {"eval_": relabel(tiny_dataset(8), 5, 7)}, ValueError,
                                   "eval_dataset column 'label' has label 7 in row 5"),
    "float labels": (lambda: {"train": tiny_dataset(8).remove_columns("label").add_column("label", [0.5] * 8)},
                     ValueError, r"must hold integer class indices in \[0, 2\) or -100, got dtype float32 \(e.g. 0.5"),
    "empty train": (lambda: {"train": tiny_dataset(8).select([])}, ValueError, "train_dataset has no rows"),
    "empty eval": (lambda: {"eval_": tiny_dataset(8).select([])}, ValueError, "eval_dataset has no rows"),
    "train is a list of ints": (lambda: {"train": [1, 2, 3]}, TypeError,
                                "train_dataset must be a datasets.Dataset, a torch Dataset or a list of dicts .* got list of int"),
    "DatasetDict": (lambda: {"train": datasets.DatasetDict(train=tiny_dataset(8))}, TypeError,
                    r"train_dataset is a DatasetDict with splits \['train'\]"),
}


@pytest.mark.parametrize("trainer", ["distill", "early_exit", "self_kd"])
@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_trainer_datasets(tmp_path, trainer, case):
    datasets, error, message = TRAINER_CASES[case]
    with pytest.raises(error, match=message):
        build(trainer, tmp_path, **datasets())


def test_trainers_accept_ignored_labels(tmp_path):
    train = relabel(tiny_dataset(16), 4, -100)
    for trainer in ("distill", "early_exit", "self_kd"):
        (tmp_path / trainer).mkdir()
        build(trainer, tmp_path / trainer, train=train)  # no error


TEACHER_COLUMN_CASES = {
    "NaN": (lambda d: teacher_logits_column(d, 3, NAN),
            r"train_dataset column 'teacher_logits' has a non-finite value in row 3 \(\[0.30000001192092896, nan\]; "
            r"1 bad row\(s\)\): teacher logits must be finite"),
    "inf": (lambda d: teacher_logits_column(d, 0, -INF), r"non-finite value in row 0 \(\[0.0, -inf\]"),
    "wrong width": (lambda d: teacher_logits_column(d, width=3),
                    r"must hold 2 teacher logits per row \(shape \(16, 2\)\), got \(16, 3\)"),
}


@pytest.mark.parametrize("trainer", ["distill", "early_exit"])
@pytest.mark.parametrize("case", list(TEACHER_COLUMN_CASES))
def test_teacher_logits_column(tmp_path, trainer, case):
    column = TEACHER_COLUMN_CASES[case][0]
    eval_ = teacher_logits_column(tiny_dataset(8, seed=1))
    if trainer == "distill":
        def make():
            make_distill_trainer(tmp_path, None, args=make_distill_args(tmp_path), train=column(tiny_dataset(16)), eval_=eval_)
    else:
        def make():
            make_early_exit_trainer(tmp_path, args=make_early_exit_args(tmp_path, distill_from="teacher"),
                               train=column(tiny_dataset(16)), eval_=eval_)
    with pytest.raises(ValueError, match=TEACHER_COLUMN_CASES[case][1]):
        make()


def test_evaluate_and_predict_check_their_dataset(tmp_path):
    trainer = build("early_exit", tmp_path)
    with pytest.raises(ValueError, match="eval_dataset column 'label' has label 3 in row 2"):
        trainer.evaluate(relabel(tiny_dataset(4), 2, 3))
    with pytest.raises(ValueError, match="test_dataset has no rows"):
        trainer.predict(tiny_dataset(4).select([]))


# ---- the CLI: exit status 1 and one line naming the value, no traceback --------------------------------------------


def jsonl(path, rows, text=None):
    """A JSON-lines file of `rows` (or of the raw `text`)."""
    path.write_text(text if text is not None else "".join(json.dumps(row) + "\n" for row in rows))
    return path


CLI_CASES = {
    "missing MODEL folder": (lambda tmp, model: ["calibrate", str(tmp / "no_such_model"), "--dataset",
                                                 "rotten_tomatoes"],
                             "MODEL '{tmp}/no_such_model' is neither an existing folder nor a Hub id"),
    "missing --teacher folder": (lambda tmp, model: ["evaluate", str(model), "--teacher", str(tmp / "nope"),
                                                     "--data_files", f"test={jsonl(tmp / 't.jsonl', [{'text': 'w1', 'label': 0}])}"],
                                 "--teacher '{tmp}/nope' is neither an existing folder nor a Hub id"),
    "split without labels": (lambda tmp, model: ["calibrate", str(model), "--eval_split", "none", "--data_files",
                                                 f"validation={jsonl(tmp / 'v.jsonl', [{'text': 'w1'}] * 4)}"],
                             "data_files/validation has no 'label' column .*--label_column"),
    "label -1 (unlabelled test set)": (
        lambda tmp, model: ["calibrate", str(model), "--eval_split", "none", "--data_files",
                            f"validation={jsonl(tmp / 'v.jsonl', [{'text': 'w1', 'label': 0}, {'text': 'w2', 'label': -1}])}"],
        r"data_files/validation has label -1 in row 1 \(1 bad row\(s\)\): the model predicts 2 classes"),
    "label >= num_labels": (
        lambda tmp, model: ["evaluate", str(model), "--data_files",
                            f"test={jsonl(tmp / 't.jsonl', [{'text': 'w1', 'label': 4}] * 3)}"],
        r"data_files/test has label 4 in row 0 \(3 bad row\(s\)\)"),
    "empty data file": (lambda tmp, model: ["calibrate", str(model), "--eval_split", "none", "--data_files",
                                            f"validation={jsonl(tmp / 'v.jsonl', [])}"],
                        "data file for split 'validation' is empty: {tmp}/v.jsonl"),
    "blank data file": (lambda tmp, model: ["calibrate", str(model), "--eval_split", "none", "--data_files",
                                            f"validation={jsonl(tmp / 'v.jsonl', [], text=chr(10) * 3)}"],
                        "data file for split 'validation' could not be read as json"),
    "unknown split": (lambda tmp, model: ["calibrate", str(model), "--dataset", "rotten_tomatoes", "--split", "dev"],
                      r"--dataset rotten_tomatoes has splits \['train', 'validation', 'test'\], not 'dev'"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli(tmp_path, model_dir, capsys, case):  # noqa: F811 (model_dir is the fixture imported above)
    argv, message = CLI_CASES[case]
    assert main(argv(tmp_path, model_dir)) == 1
    err = capsys.readouterr().err
    # Progress bars also go to stderr; the error is one line of its own, the last, and there is no traceback.
    errors = [line for line in err.splitlines() if line.startswith("hf-kd ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    assert re.search(message.format(tmp=tmp_path), errors[0]), errors[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["calibrate", "m", "--dataset", "imdb"], "argument --dataset: invalid choice: 'imdb'"),
        (["evaluate", "m", "--dataset", "rotten_tomatoes", "--batch_size", "abc"], "invalid int value: 'abc'"),
        (["evaluate", "m", "--dataset", "rotten_tomatoes", "--n_bins", "0"], "--n_bins must be >= 1, got 0"),
    ],
)
def test_cli_bad_flags(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err
