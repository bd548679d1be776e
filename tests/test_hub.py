"""Model cards, EvalResults, the trainer's card, and pushes to a local Hub server (tests/hub_server.py).

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import, and this suite runs offline, so everything that talks
to the local Hub runs in a fresh subprocess with `hub_env` (online, HF_HUB_DISABLE_XET=1, a fake token, a fresh cache).
"""

import hashlib
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from transformers import DataCollatorWithPadding

from hf_kd import (
    DistillConfig,
    DistillTrainer,
    calibrate_temperature,
    evaluate_uncertainty,
    fold_temperature,
    generate_model_card,
    push_to_hub,
    update_model_card,
)
from hf_kd.hub import CALIBRATION_FILENAME, build_eval_results, resolve_hub_id

from .hub_server import HubServer, hub_env, validate_card
from .testing_utils import expressive_bert, labelled_by_model, tiny_bert, tiny_dataset, tiny_tokenizer

TOKEN = "hf_hfkdTestSecretToken0123456789abcdefXYZ"
REPO_ROOT = Path(__file__).resolve().parents[1]
STUDENT_ID = "sentence-transformers/paraphrase-MiniLM-L3-v2"

METRICS = {"accuracy": 0.81234, "ece": 0.0456, "mce": 0.12, "nll": 0.43, "brier": 0.29, "entropy": 0.33,
           "ece_bins": 15.0, "sigma": 0.05, "teacher_accuracy": 0.85, "teacher_ece": 0.06}


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_python(code: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def hub():
    server = HubServer(TOKEN)
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A calibrated tiny student folder as hf-kd calibrate writes it: model, tokenizer, reports, plots, card."""
    root = tmp_path_factory.mktemp("student")
    model, teacher = expressive_bert(), tiny_bert(seed=7)
    validation = labelled_by_model(model, 120, 2.0, seed=1)
    test = labelled_by_model(model, 120, 2.0, seed=2)
    result = calibrate_temperature(model, validation, calibrated_on="tiny/validation")
    before = evaluate_uncertainty(model, test, teacher=teacher, split="test")
    fold_temperature(model, result.temperature, calibrated_on=result.calibrated_on)
    after = evaluate_uncertainty(model, test, teacher=teacher, split="test")
    folder = root / "tiny-student"
    model.save_pretrained(folder)
    tiny_tokenizer(root).save_pretrained(folder)
    (folder / CALIBRATION_FILENAME).write_text(json.dumps(result.to_dict()))
    before.save(folder / "uncertainty" / "test-uncalibrated")
    after.save(folder / "uncertainty" / "test")
    update_model_card(folder, base_model=STUDENT_ID, dataset_type="tiny_parity", dataset_name="Tiny parity data")
    return {"folder": folder, "model": model.eval(), "temperature": result.temperature, "after": after}


class TestEvalResults:
    def test_one_result_per_metric_per_split(self):
        results = build_eval_results({"validation": METRICS, "test": dict(METRICS, sigma=float("nan"))},
                                     "rotten_tomatoes", "Rotten Tomatoes")
        by_split = {}
        for result in results:
            by_split.setdefault(result.dataset_split, []).append(result.metric_type)
        assert by_split == {"validation": ["accuracy", "ece", "mce", "nll", "brier", "entropy", "sigma"],
                            "test": ["accuracy", "ece", "mce", "nll", "brier", "entropy"]}  # NaN sigma left out
        ece = next(r for r in results if r.metric_type == "ece")
        assert (ece.metric_name, ece.metric_args, ece.metric_value) == ("ECE (15 bins)", {"n_bins": 15}, 0.0456)
        assert next(r for r in results if r.metric_type == "accuracy").metric_value == 0.8123  # rounded
        assert all(r.task_type == "text-classification" and r.dataset_type == "rotten_tomatoes" for r in results)

    def test_new_numbers_replace_old_ones(self):
        """metadata_update merges by is_equal_except_value: every new result must match exactly one old result."""
        old = build_eval_results({"test": METRICS}, "d", "D")
        new = build_eval_results({"test": {k: v / 2 for k, v in METRICS.items()} | {"ece_bins": 15.0}}, "d", "D")
        assert len(old) == len(new)
        for result in new:
            matches = [o for o in old if result.is_equal_except_value(o)]
            assert len(matches) == 1 and matches[0].metric_value != result.metric_value

    def test_reports_are_accepted(self, student):
        results = build_eval_results({"test": student["after"]}, "d", "D")
        assert {r.metric_type for r in results} >= {"accuracy", "ece", "nll", "brier", "entropy"}

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"metrics_by_split": {"test": {"ece": 0.1}}}, "without its number of bins"),
            ({"dataset_type": ""}, "dataset_type must be a non-empty string"),
            ({"dataset_config": 3}, "dataset_config must be a string or None"),
            ({"metrics_by_split": {"test": [0.1]}}, "must be a dict of floats or an UncertaintyReport"),
        ],
    )
    def test_bad_input(self, kwargs, message):
        arguments = {"metrics_by_split": {"test": METRICS}, "dataset_type": "d", "dataset_name": "D"} | kwargs
        with pytest.raises((ValueError, TypeError), match=message):
            build_eval_results(**arguments)


def card(**kwargs):
    arguments = dict(
        base_model=STUDENT_ID,
        teacher_model="sentence-transformers/all-MiniLM-L6-v2",
        method_name="Knowledge distillation",
        trainer_name="DistillTrainer",
        paper=DistillTrainer._paper,
        hyperparameters={"temperature": 2.0, "alpha": 0.5},
        metrics_by_split={"test": METRICS},
        dataset_type="rotten_tomatoes",
        dataset_name="Rotten Tomatoes",
        calibration={"temperature": 1.4387, "calibrated_on": "rotten_tomatoes/validation", "objective": "nll",
                     "before": {"accuracy": 0.8, "ece": 0.07, "nll": 0.46}, "after": {"accuracy": 0.8, "ece": 0.03,
                                                                                   "nll": 0.43}},
        uncalibrated_metrics={"test": dict(METRICS, ece=0.0718)},
        reliability_diagram="uncertainty/test/reliability_diagram.png",
        tags=["distillation"],
    ) | kwargs
    return generate_model_card("minilm-l3-rt", **arguments)


class TestModelCard:
    def test_metadata_and_body(self):
        text = str(card())
        data = ModelCard(text).data
        assert data.base_model == STUDENT_ID
        assert data.tags == ["hf_kd", "distillation", "calibrated", "temperature-scaling"]
        assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
        assert data["hf_kd"] == {
            "trainer": "DistillTrainer", "method": "Knowledge distillation", "paper": "1503.02531",
            "teacher_model": "sentence-transformers/all-MiniLM-L6-v2",
            "hyperparameters": {"temperature": 2.0, "alpha": 0.5},
            "calibration": {"temperature": 1.4387, "calibrated_on": "rotten_tomatoes/validation", "objective": "nll",
                            "method": "temperature_scaling"},
        }
        assert [r.metric_type for r in data.eval_results] == [
            "accuracy", "ece", "mce", "nll", "brier", "entropy", "sigma"]
        for expected in ("T = 1.4387", "| ECE (15 bins) | 0.0456 | 0.0600 |", "| model (test) | teacher (test) |",
                         "![Reliability diagram](uncertainty/test/reliability_diagram.png)",
                         "| ECE (15 bins) | 0.0718 | 0.0456 |", "@inproceedings{guo2017calibration",
                         "@article{hinton2015distilling", "@article{vengertsev2024confidence",
                         "| alpha | 0.5 |", 'model="minilm-l3-rt"'):
            assert expected in text, expected
        assert "nie2020chaosnli" not in text  # no KL/JS reported, no ChaosNLI citation
        assert validate_card(text) == ([], [])

    def test_local_paths_never_reach_the_metadata(self, tmp_path):
        local = tmp_path / "my-student"
        local.mkdir()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            text = str(card(base_model=str(local), teacher_model=str(tmp_path / "teacher"),
                            teacher_base_model="sentence-transformers/all-MiniLM-L6-v2", datasets=[str(local)]))
        messages = sorted(str(w.message) for w in caught)
        assert messages == [f"base_model {str(local)!r} is a local path, not a Hub id: left out.",
                            f"datasets entry {str(local)!r} is not a Hub id (the Hub rejects local paths): left out."]
        data = ModelCard(text).data
        assert data.base_model is None and data.datasets is None and str(tmp_path) not in text
        assert data["hf_kd"]["teacher_model"] == "local checkpoint"
        assert "a local teacher checkpoint fine-tuned from [sentence-transformers/all-MiniLM-L6-v2]" in text
        assert validate_card(text) == ([], [])

    def test_local_base_model_whose_card_names_a_hub_id_uses_it_without_a_warning(self, tmp_path):
        # make demo printed "base_model '.../student_init' is a local path ..." for the main job's student, whose
        # initial weights (teacher layers 1, 3, 5) are a local folder: its card names the Hub model it derives from.
        init = tmp_path / "student_init"
        init.mkdir()
        (init / "README.md").write_text("---\nbase_model: sentence-transformers/all-MiniLM-L6-v2\n---\nLayers.\n")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            text = str(card(base_model=str(init)))
        assert ModelCard(text).data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
        assert str(tmp_path) not in text

    def test_base_model_is_named_once_when_the_teacher_was_fine_tuned_from_it(self, tmp_path):
        # The main job's card said "fine-tuned from all-MiniLM-L6-v2, derived from all-MiniLM-L6-v2".
        l6 = "sentence-transformers/all-MiniLM-L6-v2"
        text = str(card(base_model=l6, teacher_model=str(tmp_path / "teacher"), teacher_base_model=l6))
        sentence = next(line for line in text.splitlines() if line.startswith("This model was trained with hf_kd"))
        assert sentence.count(l6) == 2  # one Markdown link: [id](https://huggingface.co/id)
        assert "fine-tuned from" not in sentence and f", derived from [{l6}]" in sentence
        assert ModelCard(text).data["hf_kd"]["teacher_base_model"] == l6  # still in the metadata

    def test_card_file_honours_the_umask(self, tmp_path):
        # The card was written through a NamedTemporaryFile, mode 0600 whatever the user's umask.
        import os

        from hf_kd.hub import save_model_card

        old = os.umask(0o022)
        try:
            path = save_model_card(card(), tmp_path / "a")
            assert path.stat().st_mode & 0o777 == 0o644
            os.umask(0o027)
            assert save_model_card(card(), tmp_path / "b").stat().st_mode & 0o777 == 0o640
        finally:
            os.umask(old)

    def test_hub_cache_folders_map_back_to_their_id(self, tmp_path):
        snapshot = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / "abc"
        snapshot.mkdir(parents=True)
        assert resolve_hub_id(snapshot) == "sentence-transformers/all-MiniLM-L6-v2"
        assert resolve_hub_id("org/name") == "org/name"
        assert resolve_hub_id("/abs/path") is None and resolve_hub_id("a/b/c") is None

    def test_missing_template_is_a_clear_error(self):
        available = (
            r"\['base_model_card.md', 'image_classification_model_card.md', 'text_classification_model_card.md', "
            r"'text_generation_model_card.md'\]"
        )
        with pytest.raises(FileNotFoundError, match=r"'self_kd.md' not found .* " + available):
            card(template="self_kd.md")
        with pytest.raises(ValueError, match="file name of a card template"):
            card(template="../README.md")

    def test_the_task_picks_pipeline_tag_task_name_and_template(self):
        text = str(card(pipeline_tag="image-classification", hub_model_id="me/cnn"))
        data = ModelCard(text).data
        assert data.pipeline_tag == "image-classification"
        assert {(r.task_type, r.task_name) for r in data.eval_results} == {("image-classification", "Image Classification")}
        assert "This model was trained with hf_kd's `DistillTrainer`" in text
        assert 'pipeline("image-classification", model="me/cnn"' in text and "text-classification" not in text
        assert "template" not in data["hf_kd"]  # the task's own template is not recorded
        assert validate_card(text) == ([], [])
        text = str(card(method_name=None, trainer_name=None, paper=None, pipeline_tag="image-classification"))
        assert "This is an image classifier fine-tuned from [sentence-transformers/paraphrase-MiniLM-L3-v2]" in text
        with pytest.raises(ValueError, match=r"pipeline_tag must be one of .*'image-classification'.*, got 'text-gen'"):
            card(pipeline_tag="text-gen")

    def test_pipeline_tag_of_the_model(self):
        from torch import nn

        from hf_kd.hub import pipeline_tag_of

        from .testing_utils import tiny_cnn, tiny_eval_multi_exit

        class PixelModule(nn.Module):
            def forward(self, pixel_values, labels=None):
                return pixel_values

        assert pipeline_tag_of(tiny_cnn()) == "image-classification"
        assert pipeline_tag_of(tiny_eval_multi_exit()) == pipeline_tag_of(tiny_bert()) == "text-classification"
        assert pipeline_tag_of({"architectures": ["MultiExitForImageClassification"]}) == "image-classification"
        config = tiny_bert().config
        config.architectures = ["BertForSequenceClassification"]  # as save_pretrained records it
        assert pipeline_tag_of(config) == "text-classification"
        assert pipeline_tag_of(PixelModule()) == "image-classification"  # no known class name: its main input
        with pytest.raises(ValueError, match=r"architectures \['GPT2LMHeadModel'\] and main input None"):
            pipeline_tag_of({"architectures": ["GPT2LMHeadModel"]})

    def test_bad_calibration_temperature(self):
        with pytest.raises(ValueError, match="calibration temperature must be a finite number > 0, got -1.0"):
            card(calibration={"temperature": -1.0})

    def test_server_rules_reject_local_paths(self):
        text = "---\nbase_model: /home/me/student\ndatasets:\n- ./data\n---\n# card\n"
        errors, _ = validate_card(text)
        assert errors == [
            '"base_model[0]" with value "/home/me/student" is not valid. It must be a valid base_model id.',
            '"datasets[0]" with value "./data" is not valid. It must be a valid datasets id.',
        ]


class TestUpdateModelCard:
    def test_card_reflects_the_folder(self, student):
        text = (student["folder"] / "README.md").read_text()
        data = ModelCard(text).data
        assert data.base_model == STUDENT_ID
        assert data["hf_kd"]["calibration"]["temperature"] == pytest.approx(student["temperature"])
        test_results = {r.metric_type: r.metric_value for r in data.eval_results}
        assert test_results["ece"] == round(student["after"].metrics["ece"], 4)
        assert {r.dataset_split for r in data.eval_results} == {"test"}  # uncalibrated numbers stay out of it
        assert "On the test split:" in text and "On the calibration data (tiny/validation" in text
        assert "![Reliability diagram](uncertainty/test/reliability_diagram.png)" in text

    def test_updating_overwrites_numbers(self, student, tmp_path):
        import shutil

        folder = tmp_path / "copy"
        shutil.copytree(student["folder"], folder)
        update_model_card(folder)
        assert (folder / "README.md").read_text() == (student["folder"] / "README.md").read_text()  # idempotent
        report_path = folder / "uncertainty" / "test" / "report.json"
        report = json.loads(report_path.read_text())
        report["metrics"]["ece"] = 0.0123
        report_path.write_text(json.dumps(report))
        update_model_card(folder)
        results = ModelCard.load(folder / "README.md").data.eval_results
        assert len(results) == len(ModelCard.load(student["folder"] / "README.md").data.eval_results)
        assert [r.metric_value for r in results if r.metric_type == "ece"] == [0.0123]

    def test_failed_render_keeps_the_old_card(self, student, tmp_path):
        import shutil

        folder = tmp_path / "copy"
        shutil.copytree(student["folder"], folder)
        before = (folder / "README.md").read_bytes()
        with pytest.raises(FileNotFoundError, match="not found"):
            update_model_card(folder, template="missing.md")
        assert (folder / "README.md").read_bytes() == before

    def test_rerendering_keeps_the_method_paper_without_the_trainer(self, student, tmp_path):
        import shutil

        folder = tmp_path / "copy"
        shutil.copytree(student["folder"], folder)
        (folder / "README.md").write_text(str(card()))  # a card written by DistillTrainer
        update_model_card(folder)
        text = (folder / "README.md").read_text()
        data = ModelCard(text).data
        assert (data["hf_kd"]["trainer"], data["hf_kd"]["method"], data["hf_kd"]["paper"]) == (
            "DistillTrainer", "Knowledge distillation", "1503.02531")
        assert "[Distilling the Knowledge in a Neural Network](https://huggingface.co/papers/1503.02531)" in text
        assert text.count("@article{hinton2015distilling") == 1 and "@inproceedings{guo2017calibration" in text
        assert data.pipeline_tag == "text-classification"  # config.json: BertForSequenceClassification
        update_model_card(folder)
        assert (folder / "README.md").read_text() == text  # idempotent

    def test_needs_a_model_folder(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="has no config.json"):
            update_model_card(tmp_path)


def make_trainer(tmp_path, **kwargs):
    tokenizer = tiny_tokenizer(tmp_path)
    args = DistillConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=1,
                         eval_strategy="epoch", report_to="none", use_cpu=True, seed=0,
                         **({"save_strategy": "no"} | kwargs))
    return DistillTrainer(model=tiny_bert(seed=1), args=args, teacher_model=tiny_bert(seed=2),
                          train_dataset=tiny_dataset(16), eval_dataset=tiny_dataset(8, seed=1),
                          processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer))


class TestTrainerModelCard:
    def test_save_model_writes_the_hf_kd_card(self, tmp_path):
        trainer = make_trainer(tmp_path)
        trainer.train()
        trainer.evaluate(tiny_dataset(8, seed=3), metric_key_prefix="test")
        trainer.save_model()
        text = (tmp_path / "out" / "README.md").read_text()
        data = ModelCard(text).data
        assert data.tags[:2] == ["hf_kd", "distillation"]
        assert data["hf_kd"]["hyperparameters"] == {"temperature": 2.0, "alpha": 0.5}
        assert data["hf_kd"]["trainer"] == "DistillTrainer"
        splits = {(r.dataset_split, r.metric_type) for r in data.eval_results}
        assert {("eval", "accuracy"), ("eval", "ece"), ("test", "ece"), ("test", "nll")} <= splits
        ece = [r for r in data.eval_results if (r.dataset_split, r.metric_type) == ("test", "ece")][0]
        assert ece.metric_value == round(trainer.state.log_history[-1]["test_ece"], 4)
        assert ece.metric_name == "ECE (15 bins)"
        assert "| model (test) | teacher (test) |" in text and "Distilling the Knowledge" in text

    def test_image_classifier_card_has_the_image_task(self, tmp_path):
        # Regression: EarlyExitTrainer's card of a MultiExitForImageClassification said text-classification.
        import datasets

        from hf_kd import EarlyExitConfig, EarlyExitTrainer

        from .testing_utils import images, tiny_cnn

        data = datasets.Dataset.from_dict({"pixel_values": images(batch=8).tolist(), "labels": list(range(8))})
        args = EarlyExitConfig(output_dir=str(tmp_path / "out"), per_device_eval_batch_size=8, report_to="none",
                               use_cpu=True, save_strategy="no")
        trainer = EarlyExitTrainer(model=tiny_cnn(), args=args, train_dataset=data, eval_dataset=data)
        trainer.evaluate()
        trainer.create_model_card()
        text = (tmp_path / "out" / "README.md").read_text()
        data = ModelCard(text).data
        assert data.pipeline_tag == "image-classification"
        assert {(r.task_type, r.task_name) for r in data.eval_results} == {("image-classification", "Image Classification")}
        assert "ece" in {r.metric_type for r in data.eval_results}
        assert 'pipeline("image-classification"' in text and "text-classification" not in text
        assert validate_card(text) == ([], [])

    def test_checkpoints_get_the_card_and_the_token_is_not_pickled(self, tmp_path):
        trainer = make_trainer(tmp_path, save_strategy="epoch", hub_token=TOKEN)
        trainer.train()
        out = tmp_path / "out"
        assert (out / "README.md").is_file()
        checkpoint = next(out.glob("checkpoint-*"))
        assert "model-index" in (checkpoint / "README.md").read_text()
        for path in out.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path
        assert trainer.args.hub_token == TOKEN  # the live arguments are untouched

    def test_push_to_hub_uploads_the_hf_kd_card(self, tmp_path, monkeypatch):
        import transformers.trainer

        uploaded = {}

        class FakeApi:
            def create_repo(self, repo_id, **kwargs):
                return type("RepoUrl", (), {"repo_id": f"hfkd-test/{repo_id}"})()

            def upload_folder(self, folder_path, **kwargs):
                uploaded["readme"] = (Path(folder_path) / "README.md").read_text()
                return "commit"

        monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeApi())
        trainer = make_trainer(tmp_path, hub_model_id="tiny-kd")
        trainer.train()
        trainer.push_to_hub()
        data = ModelCard(uploaded["readme"]).data
        assert data.model_name == "tiny-kd"
        assert "ece" in {r.metric_type for r in data.eval_results}  # the stock card would have dropped it
        assert "hf_kd" in data.tags


class TestPushValidation:
    @pytest.mark.parametrize("repo_id", ["a/b/c", "bad--name", "org/", "x" * 97, "../etc", "name.git"])
    def test_malformed_repo_id(self, student, repo_id):
        with pytest.raises(ValueError, match="is not a valid Hub repo id") as error:
            push_to_hub(student["folder"], repo_id, token=TOKEN)
        assert repr(repo_id) in str(error.value)

    def test_folder_checks(self, student, tmp_path):
        with pytest.raises(ValueError, match="does not exist"):
            push_to_hub(tmp_path / "nope", "org/name", token=TOKEN)
        (tmp_path / "config.json").write_text("{}")
        with pytest.raises(ValueError, match="has no model weights"):
            push_to_hub(tmp_path, "org/name", token=TOKEN)
        (tmp_path / "model.safetensors").write_bytes(b"0")
        with pytest.raises(ValueError, match="has no README.md model card"):
            push_to_hub(tmp_path, "org/name", token=TOKEN)

    def test_a_file_holding_the_token_is_refused(self, student, tmp_path):
        import shutil

        folder = tmp_path / "leaky"
        shutil.copytree(student["folder"], folder)
        (folder / "notes.txt").write_text(f"my token is {TOKEN}")
        with pytest.raises(ValueError, match="notes.txt contains your Hub token") as error:
            push_to_hub(folder, "org/name", token=TOKEN)
        assert TOKEN not in str(error.value)


PUSH = """
import json, sys, tempfile, warnings
from pathlib import Path
from huggingface_hub import upload_file
from hf_kd import push_to_hub

folder, local_base_folder, out = sys.argv[1], sys.argv[2], {}
try:
    push_to_hub(folder, "hfkd-test/tiny-student", token="hf_wrongTokenValue123456789")
except RuntimeError as error:
    out["wrong_token"] = str(error)
try:  # the server answers this commit with a 500, as if the push was interrupted
    push_to_hub(folder, "hfkd-test/tiny-student")
except RuntimeError as error:
    out["interrupted"] = str(error)
out["retry"] = push_to_hub(folder, "hfkd-test/tiny-student").oid
from huggingface_hub import HfApi
api = HfApi()
api.create_branch("hfkd-test/tiny-student", branch="calibrated")
out["branch_commit"] = push_to_hub(folder, "hfkd-test/tiny-student", revision="calibrated",
                                   commit_message="Same files on a branch").oid
api.create_tag("hfkd-test/tiny-student", tag="v1", revision="calibrated")
refs = api.list_repo_refs("hfkd-test/tiny-student")
out["refs"] = [sorted(b.name for b in refs.branches), [t.name for t in refs.tags]]
from hf_kd.cli import main
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out["cli_rc"] = main(["push", local_base_folder, "--repo_id", "hfkd-test/local-base", "--private"])
out["warnings"] = [str(w.message) for w in caught]
bad = Path(tempfile.mkdtemp()) / "README.md"
bad.write_text("---\\nbase_model: /home/me/student\\n---\\n# card\\n")
try:  # without hf_kd's rewrite, the Hub's validate-yaml refuses a local base_model
    upload_file(path_or_fileobj=str(bad), path_in_repo="README.md", repo_id="hfkd-test/local-base")
except ValueError as error:
    out["rejected"] = str(error)
print(json.dumps(out))
"""

PULL = """
import json, sys, torch
from huggingface_hub import ModelCard, metadata_update
from huggingface_hub.constants import HF_HUB_CACHE
from transformers import AutoModelForSequenceClassification, AutoTokenizer

torch.set_num_threads(1)
repo, inputs, new_metadata = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
model = AutoModelForSequenceClassification.from_pretrained(repo).eval()
tokenizer = AutoTokenizer.from_pretrained(repo)
with torch.no_grad():
    probs = torch.softmax(model(input_ids=torch.tensor(inputs)).logits, dim=-1)
card = ModelCard.load(repo)
metadata_update(repo, new_metadata, overwrite=True)  # later numbers for the same metrics: replaced, not appended
updated = ModelCard.load(repo).data
print(json.dumps({
    "probs": probs.tolist(),
    "hf_kd": model.config.hf_kd,
    "vocab_size": tokenizer.vocab_size,
    "model_index": card.data.to_dict()["model-index"],
    "updated": [[r.dataset_split, r.metric_type, r.metric_value] for r in updated.eval_results],
    "cache": HF_HUB_CACHE,
}))
"""


@pytest.fixture(scope="module")
def pushed(hub, student, tmp_path_factory):
    """Push the student through a wrong token, an interrupted commit and a retry, in a fresh process."""
    import shutil

    root = tmp_path_factory.mktemp("push")
    folder = student["folder"]
    (folder / "training_args.bin").write_bytes(b"pickled arguments")  # training state: never uploaded
    (folder / "checkpoint-1").mkdir(exist_ok=True)
    (folder / "checkpoint-1" / "optimizer.pt").write_bytes(b"state")
    (folder / ".hf_kd-save-x").mkdir(exist_ok=True)  # what an interrupted atomic save leaves behind
    (folder / ".hf_kd-save-x" / "model.safetensors").write_bytes(b"partial")
    (folder / "README.md.tmp").write_text("partial")
    # A card written by another tool, with a local base_model: fixed in the upload, not on disk.
    local_base = root / "local-base"
    shutil.copytree(folder, local_base)
    card_text = (local_base / "README.md").read_text()
    (local_base / "README.md").write_text(card_text.replace(f"base_model: {STUDENT_ID}", f"base_model: {root}/init"))
    before = {"folder": folder_digest(folder), "local_base": folder_digest(local_base)}
    hub.state.fail_next_commits = 1
    env = hub_env(hub, root, TOKEN)
    result = run_python(PUSH, env, str(folder), str(local_base))
    assert result.returncode == 0, result.stderr
    return {"out": json.loads(result.stdout.strip().splitlines()[-1]), "result": result, "env": env, "root": root,
            "before": before, "local_base": local_base}


class TestHubRoundTrip:
    def test_failed_pushes_are_clear_and_leave_everything_as_it_was(self, hub, student, pushed):
        out = pushed["out"]
        assert "failed while creating the repo" in out["wrong_token"] and "401" in out["wrong_token"]
        assert "hf_wrongTokenValue123456789" not in out["wrong_token"]
        assert "failed while committing the files" in out["interrupted"] and "push again" in out["interrupted"]
        repo = hub.state.repos["hfkd-test/tiny-student"]
        assert out["retry"] == repo.branches["main"]
        # Pushing unchanged files to a branch is a no-op commit that returns the head, which the tag then names.
        assert out["branch_commit"] == repo.branches["calibrated"] == repo.tags["v1"] == repo.branches["main"]
        assert out["refs"] == [["calibrated", "main"], ["v1"]]
        assert folder_digest(student["folder"]) == pushed["before"]["folder"]  # pushes only read the folder

    def test_uploaded_files(self, hub, student, pushed):
        folder = student["folder"]
        stored = hub.state.repos["hfkd-test/tiny-student"].resolve("main").files
        assert {"config.json", "model.safetensors", "README.md", "calibration.json", "tokenizer_config.json",
                "uncertainty/test/reliability_diagram.png", "uncertainty/test/report.json",
                "uncertainty/test-uncalibrated/confidence_histogram.png"} <= set(stored)
        assert not {"training_args.bin", "README.md.tmp", ".hf_kd-save-x/model.safetensors"} & set(stored)
        assert not any(p.startswith("checkpoint-") for p in stored)
        assert stored["model.safetensors"].lfs_oid is not None  # went through legacy LFS
        assert stored["README.md"].content == (folder / "README.md").read_bytes()

    def test_local_base_model_is_fixed_in_the_upload_only(self, hub, pushed):
        out = pushed["out"]
        assert out["cli_rc"] == 0 and "Pushed" in pushed["result"].stdout  # through `hf-kd push`
        assert hub.state.repos["hfkd-test/local-base"].private
        assert any("holds local paths" in w for w in out["warnings"])
        assert '"base_model[0]" with value "/home/me/student" is not valid' in out["rejected"]
        uploaded = hub.file("hfkd-test/local-base", "README.md").decode()
        assert str(pushed["root"]) not in uploaded and "model-index" in uploaded
        assert folder_digest(pushed["local_base"]) == pushed["before"]["local_base"]

    def test_pull_in_a_fresh_process(self, hub, student, pushed):
        folder, repo = student["folder"], "hfkd-test/tiny-student"
        inputs = [list(ids) for ids in tiny_dataset(5, seed=9, equal_lengths=True)["input_ids"]]
        card_data = ModelCard.load(folder / "README.md").data
        new = build_eval_results({"test": {"accuracy": 0.5, "ece": 0.01, "ece_bins": 15.0}},
                                 "tiny_parity", "Tiny parity data")
        new_metadata = ModelCardData(model_name=card_data.model_name, eval_results=new).to_dict()
        pull = run_python(PULL, pushed["env"], repo, json.dumps(inputs), json.dumps(new_metadata))
        assert pull.returncode == 0, pull.stderr
        pulled = json.loads(pull.stdout.strip().splitlines()[-1])

        with torch.no_grad():
            expected = torch.softmax(student["model"](input_ids=torch.tensor(inputs)).logits, dim=-1)
        torch.testing.assert_close(torch.tensor(pulled["probs"]), expected, rtol=0, atol=1e-7)
        assert pulled["hf_kd"]["temperature"] == student["temperature"]
        assert pulled["model_index"] == card_data.to_dict()["model-index"]
        assert pulled["cache"].startswith(str(pushed["root"]))
        downloaded = next(Path(pulled["cache"]).rglob("model.safetensors"))
        assert downloaded.read_bytes() == (folder / "model.safetensors").read_bytes()
        updated = {(split, metric): value for split, metric, value in pulled["updated"]}
        assert len(updated) == len(pulled["updated"]) == len(pulled["model_index"][0]["results"][0]["metrics"])
        assert updated[("test", "ece")] == 0.01 and updated[("test", "accuracy")] == 0.5  # replaced, not appended

        # The token went in Authorization headers only: no output, no stored or local file holds it.
        for text in (pushed["result"].stdout, pushed["result"].stderr, pull.stdout, pull.stderr):
            assert TOKEN not in text
        for repo_state in hub.state.repos.values():
            for commit in repo_state.commits.values():
                for path, stored_file in commit.files.items():
                    assert TOKEN.encode() not in stored_file.content, path
        for path in folder.rglob("*"):
            assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


REMOTE_PULL = """
import json, sys, torch

class _NoHfKd:  # the user who loads the pushed model has transformers, not hf_kd
    def find_spec(self, name, path=None, target=None):
        if name == "hf_kd" or name.startswith("hf_kd."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, _NoHfKd())
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

torch.set_num_threads(1)
text_repo, image_repo, ids, mask, pixels, thresholds = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:7])
out = {}
for key, auto, inputs in (
    ("text", AutoModelForSequenceClassification, {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}),
    ("image", AutoModelForImageClassification, {"pixel_values": torch.tensor(pixels)}),
):
    model = auto.from_pretrained(text_repo if key == "text" else image_repo, trust_remote_code=True).eval()
    with torch.no_grad():
        exit_logits = [z.tolist() for z in model(**inputs).exit_logits]
    exits = model.predict_with_exits(**inputs, policy="max_prob", threshold=thresholds[key])
    out[key] = {"class": type(model).__module__, "exit_logits": exit_logits, "exit_index": exits.exit_index.tolist(),
                "probs": exits.probs.tolist()}
out["hf_kd_imported"] = any(name.split(".")[0] == "hf_kd" for name in sys.modules)
print(json.dumps(out))
"""


class TestRemoteCode:
    def test_pushed_multi_exit_models_load_with_trust_remote_code_without_hf_kd(self, hub, tmp_path):
        """Both multi-exit models, pushed with hf_kd.push_to_hub, load from the Hub with trust_remote_code=True in a
        process where hf_kd cannot be imported, and predict (exits included) exactly as the originals."""
        from hf_kd import MultiExitForImageClassification, MultiExitImageConfig

        from .testing_utils import padded_text_batch, tiny_eval_multi_exit

        text = tiny_eval_multi_exit(exit_layers=[1], sharpen=4.0)
        torch.manual_seed(0)
        image = MultiExitForImageClassification(
            MultiExitImageConfig(stem_channels=4, stage_channels=[4, 8], num_labels=3)
        ).eval()
        ids, mask = padded_text_batch()
        pixels = torch.randn(5, 1, 28, 28)
        for name, model in (("text", text), ("image", image)):
            model.save_pretrained(tmp_path / name)
            update_model_card(tmp_path / name, base_model=STUDENT_ID, dataset_type="tiny", dataset_name="Tiny data")
        inputs = {"text": {"input_ids": ids, "attention_mask": mask}, "image": {"pixel_values": pixels}}
        thresholds = {}  # the median first-exit confidence: half the rows leave early, half run to the end
        for key, model in (("text", text), ("image", image)):
            with torch.no_grad():
                thresholds[key] = model(**inputs[key]).exit_logits[0].softmax(-1).max(-1).values.median().item()
        env = hub_env(hub, tmp_path, TOKEN)
        push = run_python(
            "import sys\nfrom hf_kd import push_to_hub\n"
            "for name in ('text', 'image'):\n    push_to_hub(f'{sys.argv[1]}/{name}', f'hfkd-test/multi-exit-{name}')",
            env, str(tmp_path),
        )
        assert push.returncode == 0, push.stderr
        pull = run_python(REMOTE_PULL, env, "hfkd-test/multi-exit-text", "hfkd-test/multi-exit-image",
                          json.dumps(ids.tolist()), json.dumps(mask.tolist()), json.dumps(pixels.tolist()),
                          json.dumps(thresholds))
        assert pull.returncode == 0, pull.stderr
        pulled = json.loads(pull.stdout.strip().splitlines()[-1])
        assert not pulled["hf_kd_imported"]
        for key, model in (("text", text), ("image", image)):
            assert pulled[key]["class"].startswith("transformers_modules.")  # the Hub copy, not hf_kd's class
            with torch.no_grad():
                expected = model(**inputs[key]).exit_logits
            for got, want in zip(pulled[key]["exit_logits"], expected):
                torch.testing.assert_close(torch.tensor(got), want, rtol=0, atol=1e-6)
            exits = model.predict_with_exits(**inputs[key], policy="max_prob", threshold=thresholds[key])
            assert 0 < exits.exit_index.sum() < len(exits.exit_index)  # some rows left early, some did not
            assert pulled[key]["exit_index"] == exits.exit_index.tolist()
            torch.testing.assert_close(torch.tensor(pulled[key]["probs"]), exits.probs, rtol=0, atol=1e-6)
