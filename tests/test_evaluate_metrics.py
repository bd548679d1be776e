"""hf_kd's metrics as Hugging Face `evaluate` modules (hf_kd/evaluate_metrics, issue 21): loaded offline from
`hf_kd.metrics.module_path`, results identical to the hf_kd functions, the same errors on bad input,
`evaluate.combine`, the probability evaluator with a saved MiniLM classifier on Rotten Tomatoes, and
`hf-kd push-metrics` to the local Hub server read back by `evaluate.load("<namespace>/<name>")` in a fresh process.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch

from hf_kd import metrics
from hf_kd.evaluate_metrics.base import ProbabilityTextClassificationEvaluator
from hf_kd.prediction_sets import prediction_set_metrics

from .hub_server import HubServer, hub_env

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_hfkdTestSecretToken0123456789abcdefXYZ"
STUDENT_ID = "sentence-transformers/paraphrase-MiniLM-L3-v2"
CLASSIFICATION = ("expected_calibration_error", "maximum_calibration_error", "negative_log_likelihood", "brier_score")


def load(name, **options):
    return evaluate.load(metrics.module_path(name), **options)


def probabilities(n=40, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(k, 0.7), size=n), rng.integers(0, k, size=n)


def error_of(function, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        function(*args, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------------------------------------------------
# Loading, info and results
# --------------------------------------------------------------------------------------------------------------------


def test_module_path_names_every_shipped_module():
    for name in metrics.EVALUATE_MODULES:
        folder = Path(metrics.module_path(name))
        assert folder.name == name and (folder / f"{name}.py").is_file() and (folder / "README.md").is_file()
    shipped = {p.name for p in Path(metrics.module_path("brier_score")).parent.iterdir() if (p / "README.md").exists()}
    assert shipped == set(metrics.EVALUATE_MODULES)
    with pytest.raises(ValueError, match="unknown hf_kd evaluate module 'ece'; expected one of expected_calibration"):
        metrics.module_path("ece")


@pytest.mark.parametrize("name", metrics.EVALUATE_MODULES)
def test_module_info_names_the_paper_and_the_inputs(name):
    module = load(name)
    assert module.name == name
    info = module.info
    assert "hf_kd." in info.description and "@" in info.citation and "year" in info.citation
    assert info.reference_urls and all(url.startswith("https://") for url in info.reference_urls)
    assert "predictions" in info.features and "Args:" in info.inputs_description
    # The script imports one module per line: what evaluate's dependency check reads.
    script = (Path(metrics.module_path(name)) / f"{name}.py").read_text()
    imports = [line for line in script.splitlines() if line.startswith(("import ", "from "))]
    assert imports and all("," not in line for line in imports)
    card = (Path(metrics.module_path(name)) / "README.md").read_text()
    assert card.startswith("---\ntitle:") and "sdk: gradio" in card and info.citation.strip() in card


@pytest.mark.parametrize("n_bins", [1, 7, 15])
def test_binned_metrics_match_hf_kd_with_options_at_load_and_compute_time(n_bins):
    probs, labels = probabilities()
    ece, mce = load("expected_calibration_error", n_bins=n_bins), load("maximum_calibration_error", n_bins=n_bins)
    assert ece.compute(predictions=probs, references=labels) == {
        "expected_calibration_error": metrics.expected_calibration_error(probs, labels, n_bins), "n_bins": n_bins
    }
    assert mce.compute(predictions=probs, references=labels)["maximum_calibration_error"] == (
        metrics.maximum_calibration_error(probs, labels, n_bins)
    )
    # A compute-time option wins for that call only.
    default = load("expected_calibration_error")
    assert default.compute(predictions=probs, references=labels, n_bins=n_bins)["expected_calibration_error"] == (
        metrics.expected_calibration_error(probs, labels, n_bins)
    )
    assert default.compute(predictions=probs, references=labels)["n_bins"] == 15


def test_scoring_rules_entropy_sigma_and_human_divergence_match_hf_kd():
    probs, labels = probabilities(seed=1)
    teacher, _ = probabilities(seed=2)
    assert load("negative_log_likelihood").compute(predictions=probs, references=labels) == {
        "negative_log_likelihood": metrics.negative_log_likelihood(probs, labels)
    }
    assert load("negative_log_likelihood", eps=1e-3).compute(predictions=probs, references=labels)[
        "negative_log_likelihood"] == metrics.negative_log_likelihood(probs, labels, eps=1e-3)
    assert load("brier_score").compute(predictions=probs, references=labels) == {
        "brier_score": metrics.brier_score(probs, labels)
    }
    assert load("predictive_entropy").compute(predictions=probs) == {
        "predictive_entropy": metrics.predictive_entropy(probs)
    }
    sigma = load("confidence_preservation")
    for class_index in (0, 2, None):
        assert sigma.compute(predictions=probs, references=labels, teacher_predictions=teacher,
                             class_index=class_index) == {
            "sigma": metrics.confidence_preservation(teacher, probs, labels, class_index=class_index)
        }
    gold = load("confidence_preservation", class_index=None)
    assert gold.compute(predictions=probs, references=labels, teacher_predictions=teacher)["sigma"] == (
        metrics.confidence_preservation(teacher, probs, labels, class_index=None)
    )
    human = np.random.default_rng(3).dirichlet(np.ones(3), size=len(probs))
    human[0] = [0.0, 1.0, 0.0]  # zeros are allowed in human distributions
    assert load("human_distribution_divergence").compute(predictions=probs, references=human) == (
        metrics.human_distribution_divergence(human, probs)
    )


def test_prediction_sets_and_lm_metrics_match_hf_kd():
    rng = np.random.default_rng(4)
    sets = rng.random((3, 20, 4)) < 0.5  # (exits, examples, classes)
    labels = rng.integers(0, 4, size=20)
    per_example = sets.transpose(1, 0, 2).tolist()  # evaluate's rows are examples
    assert load("prediction_set_metrics").compute(predictions=per_example, references=labels) == (
        prediction_set_metrics(sets, labels)
    )

    logits = torch.randn(3, 6, 11)
    token_labels = torch.randint(0, 11, (3, 6))
    token_labels[0, :2] = -100
    expected = metrics.lm_metrics(logits, token_labels, n_bins=5)
    module = load("lm_metrics", n_bins=5)
    assert module.compute(predictions=logits.numpy(), references=token_labels.numpy()) == expected
    # Sequences of different lengths: padded with ignored tokens, same result as the padded batch.
    token_labels[1, 4:] = -100
    ragged_logits = [logits[0].numpy(), logits[1, :4].numpy(), logits[2].numpy()]
    ragged_labels = [token_labels[0].numpy(), token_labels[1, :4].numpy(), token_labels[2].numpy()]
    assert load("lm_metrics").compute(predictions=ragged_logits, references=ragged_labels) == (
        metrics.lm_metrics(logits, token_labels)
    )


def test_combine_and_add_batch_give_the_hf_kd_numbers():
    probs, labels = probabilities(n=64, k=2, seed=5)
    combined = evaluate.combine(
        [load("expected_calibration_error", n_bins=10), load("maximum_calibration_error", n_bins=10),
         load("negative_log_likelihood"), load("brier_score"), load("predictive_entropy")]
    )
    for start in range(0, 64, 16):  # streamed in batches, as in an evaluation loop
        combined.add_batch(predictions=probs[start : start + 16], references=labels[start : start + 16])
    results = combined.compute()
    expected = metrics.classification_metrics(probs, labels, n_bins=10)
    assert results == {
        "expected_calibration_error": expected["ece"], "expected_calibration_error_n_bins": 10,
        "maximum_calibration_error": expected["mce"], "maximum_calibration_error_n_bins": 10,
        "negative_log_likelihood": expected["nll"], "brier_score": expected["brier"],
        "predictive_entropy": expected["entropy"],
    }


# --------------------------------------------------------------------------------------------------------------------
# Bad input: hf_kd's errors
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_logits_and_bad_labels_get_hf_kd_errors(name):
    module, function = load(name), getattr(metrics, name)
    probs, labels = probabilities(n=6, k=3, seed=6)
    logits = np.log(probs) - np.log(probs).min() + 1.0  # positive scores: caught by the row sums, not the signs
    mixed = probs.copy()
    mixed[4] = logits[4]  # one row of logits among probabilities
    out_of_range = labels.copy()
    out_of_range[2] = 3
    for predictions, references in ((logits, labels), (mixed, labels), (probs, out_of_range)):
        message = error_of(function, predictions, references)
        with pytest.raises(ValueError) as info:
            module.compute(predictions=predictions, references=references)
        assert str(info.value) == message
    assert "row 4" in error_of(module.compute, predictions=mixed, references=labels)
    assert "not logits" in error_of(module.compute, predictions=mixed, references=labels)
    assert "labels must be in [0, 3)" in error_of(module.compute, predictions=probs, references=out_of_range)


def test_other_bad_input():
    probs, labels = probabilities(n=6, k=3, seed=7)
    human = np.full((6, 2), 0.5)  # two classes where the model has three
    assert error_of(load("human_distribution_divergence").compute, predictions=probs, references=human) == error_of(
        metrics.human_distribution_divergence, human, probs
    )
    assert "same shape" in error_of(load("human_distribution_divergence").compute, predictions=probs,
                                    references=human)
    ragged = [[0.5, 0.5], [0.2, 0.3, 0.5]]
    assert "row 0 has (2,) and row 1 has (3,)" in error_of(
        load("expected_calibration_error").compute, predictions=ragged, references=[0, 1]
    )
    teacher = np.full((6, 3), 1 / 3)
    assert error_of(load("confidence_preservation").compute, predictions=probs, references=labels,
                    teacher_predictions=teacher, class_index=3) == error_of(
        metrics.confidence_preservation, teacher, probs, labels, class_index=3
    )
    scores = np.random.default_rng(8).random((6, 2, 3))  # scores, not membership masks
    assert "membership masks" in error_of(load("prediction_set_metrics").compute, predictions=scores,
                                          references=labels)
    assert "n_bins must be an int >= 1, got 0" in error_of(
        load("expected_calibration_error", n_bins=0).compute, predictions=probs, references=labels
    )
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['nbins'\]; its options are \['n_bins'\]"):
        load("expected_calibration_error", nbins=10)


# --------------------------------------------------------------------------------------------------------------------
# The evaluator: a saved classifier's pipeline on Rotten Tomatoes
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_classifier(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_kd.data import load_rotten_tomatoes
    from hf_kd.offline_models import placed_model_kwargs

    test = load_rotten_tomatoes()["test"].select(range(48))
    names = test.features["label"].names
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        STUDENT_ID, num_labels=2, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        **placed_model_kwargs(STUDENT_ID, model=True),
    )
    folder = tmp_path_factory.mktemp("student") / "rt-student"
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(STUDENT_ID, **placed_model_kwargs(STUDENT_ID))
    tokenizer.save_pretrained(folder)
    with torch.no_grad():
        batch = tokenizer(list(test["text"]), padding=True, truncation=True, return_tensors="pt")
        probs = torch.softmax(model.eval()(**batch).logits.double(), dim=-1).numpy()
    return {"folder": str(folder), "data": test, "probs": probs, "labels": np.array(list(test["label"]))}


def test_evaluator_passes_probabilities_from_a_saved_classifier(saved_classifier):
    from transformers import pipeline

    pipe = pipeline("text-classification", model=saved_classifier["folder"], device=-1)
    combined = evaluate.combine(
        [load("expected_calibration_error", n_bins=10), load("negative_log_likelihood"), load("brier_score")]
    )
    results = ProbabilityTextClassificationEvaluator().compute(
        pipe, data=saved_classifier["data"], metric=combined, input_column="text", label_column="label"
    )
    probs, labels = saved_classifier["probs"], saved_classifier["labels"]
    assert results["n_bins"] == 10 and results["total_time_in_seconds"] > 0
    np.testing.assert_allclose(
        [results["expected_calibration_error"], results["negative_log_likelihood"], results["brier_score"]],
        [metrics.expected_calibration_error(probs, labels, 10), metrics.negative_log_likelihood(probs, labels),
         metrics.brier_score(probs, labels)],
        rtol=1e-5,
    )
    # An explicit label mapping (pipeline label -> class index) gives the same; a wrong one is a clear error.
    again = ProbabilityTextClassificationEvaluator().compute(
        pipe, data=saved_classifier["data"], metric=load("brier_score"), label_mapping={"rotten": 0, "fresh": 1}
    )
    assert again["brier_score"] == results["brier_score"]
    with pytest.raises(ValueError, match="pipeline label 'rotten' is not in label_mapping"):
        ProbabilityTextClassificationEvaluator().compute(
            pipe, data=saved_classifier["data"], metric=load("brier_score"),
            label_mapping={"LABEL_0": 0, "LABEL_1": 1},
        )
    # A saved folder works as well as a ready pipeline.
    from_folder = ProbabilityTextClassificationEvaluator().compute(
        saved_classifier["folder"], data=saved_classifier["data"], metric=load("brier_score")
    )
    assert from_folder["brier_score"] == results["brier_score"]
    # evaluate's own text-classification evaluator passes predicted labels: the module refuses them. (It is given
    # the folder: a ready pipeline fails in evaluate 0.4.6 under transformers 5, see prepare_pipeline.)
    with pytest.raises(ValueError, match="don't match the expected format"):
        evaluate.evaluator("text-classification").compute(
            saved_classifier["folder"], data=saved_classifier["data"], metric=load("expected_calibration_error"),
            label_mapping={"rotten": 0, "fresh": 1},
        )


# --------------------------------------------------------------------------------------------------------------------
# Publishing: hf-kd push-metrics, then evaluate.load("<namespace>/<name>") in a fresh process
# --------------------------------------------------------------------------------------------------------------------

LOAD_FROM_HUB = """
import json, sys
import evaluate
import numpy as np
ece = evaluate.load("hfkd-test/expected_calibration_error", n_bins=10)
sigma = evaluate.load("hfkd-test/confidence_preservation")
probs, labels, teacher = (np.array(x) for x in json.loads(sys.argv[1]))
print(json.dumps({
    "ece": ece.compute(predictions=probs, references=labels),
    "sigma": sigma.compute(predictions=probs, references=labels, teacher_predictions=teacher),
    "class": type(ece).__module__,
}))
"""


def test_push_metrics_then_load_from_the_hub(tmp_path):
    hub = HubServer(TOKEN)
    try:
        env = {**hub_env(hub, tmp_path, TOKEN), "HF_UPDATE_DOWNLOAD_COUNTS": "0"}
        command = [sys.executable, "-m", "hf_kd.cli", "push-metrics", "--namespace", "hfkd-test",
                   "--metrics", "expected_calibration_error", "confidence_preservation"]
        pushed = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert pushed.returncode == 0, pushed.stderr
        assert "evaluate.load('hfkd-test/expected_calibration_error')" in pushed.stdout
        for name in ("expected_calibration_error", "confidence_preservation"):
            folder = Path(metrics.module_path(name))
            assert hub.file(f"spaces/hfkd-test/{name}", f"{name}.py") == (folder / f"{name}.py").read_bytes()
            assert hub.file(f"spaces/hfkd-test/{name}", "README.md") == (folder / "README.md").read_bytes()
            assert f'evaluate.load("hfkd-test/{name}")' in hub.file(f"spaces/hfkd-test/{name}", "app.py").decode()
            assert b"hf_kd[evaluate]" in hub.file(f"spaces/hfkd-test/{name}", "requirements.txt")
        assert not any(repo.startswith("hfkd-test/") for repo in hub.state.repos)  # Spaces, not model repos

        probs, labels = probabilities(n=30, k=2, seed=9)
        teacher, _ = probabilities(n=30, k=2, seed=10)
        inputs = json.dumps([probs.tolist(), labels.tolist(), teacher.tolist()])
        loaded = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD_FROM_HUB), inputs], env=env,
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert loaded.returncode == 0, loaded.stderr
        out = json.loads(loaded.stdout.strip().splitlines()[-1])
        assert "hfkd-test--expected_calibration_error" in out["class"]  # the Hub copy, not the local folder
        assert out["ece"] == {"expected_calibration_error": metrics.expected_calibration_error(probs, labels, 10),
                              "n_bins": 10}
        assert out["sigma"] == {"sigma": metrics.confidence_preservation(teacher, probs, labels)}
        assert ("HEAD", "/spaces/hfkd-test/expected_calibration_error/resolve/main/expected_calibration_error.py",
                200) in hub.state.requests
        for text in (pushed.stdout, pushed.stderr, loaded.stdout, loaded.stderr):
            assert TOKEN not in text

        bad = subprocess.run([sys.executable, "-m", "hf_kd.cli", "push-metrics", "--namespace", "bad--name"],
                             env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 1 and "namespace 'bad--name' does not make a valid Hub repo id" in bad.stderr
    finally:
        hub.shutdown()
