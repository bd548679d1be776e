import hashlib
import json
import math
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_kd.cli import main

from .testing_utils import WORDS, expressive_bert, tiny_tokenizer


def folder_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_jsonl(path, n, seed, model_dir, labels=True):
    """Texts of tiny-vocabulary words; labels drawn from softmax(model logits / 2), so the model is over-confident."""
    g = torch.Generator().manual_seed(seed)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(torch.randint(2, 8, (1,), generator=g)),),
                                                      generator=g).tolist()) for _ in range(n)]
    probs = torch.softmax(logits(model_dir, texts) / 2.0, dim=-1)
    drawn = torch.multinomial(probs, 1, generator=g).squeeze(1).tolist()
    with open(path, "w") as f:
        for text, label in zip(texts, drawn):
            f.write(json.dumps({"text": text, "label": label} if labels else {"text": text}) + "\n")
    return path


@pytest.fixture
def data(tmp_path, model_dir):
    return {
        "validation": write_jsonl(tmp_path / "validation.jsonl", 80, 1, model_dir),
        "test": write_jsonl(tmp_path / "test.jsonl", 30, 2, model_dir),
        "unlabelled": write_jsonl(tmp_path / "unlabelled.jsonl", 10, 3, model_dir, labels=False),
    }


def files_args(data, **splits):
    return ["--data_files", *(f"{split}={data[name]}" for split, name in splits.items())]


def probabilities(folder, texts):
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return torch.softmax(model(**tokenizer(texts, return_tensors="pt", padding=True)).logits, dim=-1)


def logits(folder, texts):
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return model(**tokenizer(texts, return_tensors="pt", padding=True)).logits


TEXTS = ["w1 w2 w3", "w40 w7", "w93 w0 w12 w5"]


class TestEvaluate:
    def test_writes_report_and_prints_a_table(self, model_dir, data, capsys):
        assert main(["evaluate", str(model_dir), *files_args(data, test="test"), "--update_card"]) == 0
        out = capsys.readouterr().out
        assert "| ECE (15 bins) |" in out and "| model |" in out
        report = json.loads((model_dir / "uncertainty" / "test" / "report.json").read_text())
        assert report["num_examples"] == 30 and report["split"] == "test"
        assert (model_dir / "uncertainty" / "test" / "reliability_diagram.png").is_file()
        results = ModelCard.load(model_dir / "README.md").data.eval_results
        assert {r.metric_type for r in results} >= {"accuracy", "ece", "nll", "brier", "entropy"}

    def test_output_dir_and_bins(self, model_dir, data, tmp_path):
        out = tmp_path / "reports"
        assert main(["evaluate", str(model_dir), *files_args(data, test="test"), "--output_dir", str(out),
                     "--n_bins", "10", "--max_samples", "12"]) == 0
        report = json.loads((out / "report.json").read_text())
        assert (report["n_bins"], report["num_examples"]) == (10, 12)
        assert not (model_dir / "README.md").exists()  # no card unless asked

    def test_recorded_truncation_length_is_reused(self, model_dir, tmp_path, capsys):
        # The main job truncates at 64 tokens and records it; `hf-kd evaluate` used to truncate at its own 128, so
        # the report it wrote into the model folder disagreed with the card beside it.
        from hf_kd.evaluation import record_max_length

        text = " ".join(WORDS[:40])  # 42 tokens with [CLS] and [SEP]
        path = tmp_path / "long.jsonl"
        path.write_text("".join(json.dumps({"text": text, "label": i % 2}) + "\n" for i in range(6)))
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        record_max_length(model.config, 5)
        model.save_pretrained(model_dir)
        expected = torch.softmax(logits(model_dir, [" ".join(WORDS[:3])]), -1).max().item()  # 5 tokens
        out = tmp_path / "r"
        assert main(["evaluate", str(model_dir), "--data_files", f"test={path}", "--output_dir", str(out)]) == 0
        assert "Truncation: 5 tokens." in capsys.readouterr().out
        report = json.loads((out / "report.json").read_text())
        assert report["metrics"]["entropy"] == pytest.approx(
            -(expected * math.log(expected) + (1 - expected) * math.log(1 - expected)), rel=1e-5)
        # An explicit --max_length wins.
        assert main(["evaluate", str(model_dir), "--data_files", f"test={path}", "--output_dir", str(tmp_path / "s"),
                     "--max_length", "42"]) == 0
        assert "Truncation: 42 tokens." in capsys.readouterr().out

    def test_label_names_in_parquet_large_string(self, model_dir, data, tmp_path):
        """Label names in a Parquet file written by pandas (>= 3: Arrow `large_string` columns, not `string`) map
        through the model's label2id like names in JSON lines: the report equals the one of the integer labels."""
        import pandas as pd
        import pyarrow.parquet as pq
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        config.id2label, config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
        config.save_pretrained(model_dir)
        rows = pd.read_json(data["test"], lines=True)
        rows["label"] = rows["label"].map({0: "neg", 1: "pos"})
        rows.to_parquet(tmp_path / "test.parquet", index=False)
        rows.to_json(tmp_path / "names.jsonl", orient="records", lines=True)
        assert str(pq.read_schema(tmp_path / "test.parquet").field("label").type) == "large_string"
        reports = {}
        for name, path in (("ids", data["test"]), ("parquet", tmp_path / "test.parquet"),
                           ("jsonl", tmp_path / "names.jsonl")):
            out = tmp_path / f"report-{name}"
            assert main(["evaluate", str(model_dir), "--data_files", f"test={path}", "--output_dir", str(out)]) == 0
            reports[name] = json.loads((out / "report.json").read_text())
        assert reports["parquet"]["num_examples"] == 30
        assert reports["parquet"]["metrics"] == reports["jsonl"]["metrics"] == reports["ids"]["metrics"]

    def test_existing_report_is_not_overwritten_silently(self, model_dir, data, capsys):
        folder = model_dir / "uncertainty"
        assert main(["evaluate", str(model_dir), *files_args(data, test="test"), "--update_card"]) == 0
        first = (folder / "test" / "report.json").read_text()
        card = (model_dir / "README.md").read_text()
        # A second run with other settings writes beside the first report, and says so.
        assert main(["evaluate", str(model_dir), *files_args(data, test="test"), "--max_samples", "12"]) == 0
        assert f"The existing report in {folder / 'test'} was kept (pass --overwrite" in capsys.readouterr().out
        assert (folder / "test" / "report.json").read_text() == first
        assert json.loads((folder / "test-2" / "report.json").read_text())["num_examples"] == 12
        # Re-rendering the card from a report that would not be the new one is refused; --overwrite replaces it.
        assert main(["evaluate", str(model_dir), *files_args(data, test="test"), "--max_samples", "12",
                     "--update_card"]) == 1
        assert "pass --overwrite to replace it" in capsys.readouterr().err
        assert (model_dir / "README.md").read_text() == card
        assert main(["evaluate", str(model_dir), *files_args(data, test="test"), "--max_samples", "12",
                     "--update_card", "--overwrite"]) == 0
        assert json.loads((folder / "test" / "report.json").read_text())["num_examples"] == 12
        assert not (folder / "test-3").exists()

    def test_unlabelled_data_is_a_clear_error(self, model_dir, data, capsys):
        assert main(["evaluate", str(model_dir), *files_args(data, test="unlabelled")]) == 1
        assert "data_files/test has no 'label' column (columns: ['text']): hf-kd needs gold labels" in (
            capsys.readouterr().err
        )


class TestCalibrate:
    def test_calibrated_folder_reports_and_card(self, model_dir, data, tmp_path, capsys):
        out = tmp_path / "calibrated"
        args = ["calibrate", str(model_dir), *files_args(data, validation="validation", test="test")]
        assert main(args + ["--output_dir", str(out)]) == 0
        printed = capsys.readouterr().out
        calibration = json.loads((out / "calibration.json").read_text())
        temperature = calibration["temperature"]
        assert f"Temperature T = {temperature:.4f}" in printed and "On test:" in printed
        # Plain transformers gives softmax(original logits / T).
        expected = torch.softmax(logits(model_dir, TEXTS) / temperature, -1)
        torch.testing.assert_close(probabilities(out, TEXTS), expected, rtol=1e-5, atol=1e-6)
        config = json.loads((out / "config.json").read_text())
        assert config["hf_kd"]["calibrated_on"] == "data_files/validation"
        assert config["hf_kd"]["max_length"] == 128  # the truncation T was fitted with, reused by hf-kd evaluate
        assert {p.name for p in (out / "uncertainty").iterdir()} == {"test", "test-uncalibrated"}
        before = json.loads((out / "uncertainty" / "test-uncalibrated" / "report.json").read_text())
        after = json.loads((out / "uncertainty" / "test" / "report.json").read_text())
        assert before["calibration_temperature"] is None and after["calibration_temperature"] == temperature
        assert before["metrics"]["accuracy"] == after["metrics"]["accuracy"]
        card = (out / "README.md").read_text()
        assert f"T = {temperature:.4f}" in card and "On the test split:" in card
        assert [r.dataset_split for r in ModelCard(card).data.eval_results][0] == "test"
        assert not any(p.name.startswith(".hf_kd-save-") for p in out.iterdir())  # staging folder cleaned up

        # Calibrating a calibrated model again is refused, and nothing is touched.
        digest = folder_digest(out)
        assert main(["calibrate", str(out), *files_args(data, validation="validation", test="test")]) == 1
        assert "already calibrated" in capsys.readouterr().err
        assert folder_digest(out) == digest

    def test_in_place_keeps_the_tokenizer(self, model_dir, data):
        original = logits(model_dir, TEXTS)
        assert main(["calibrate", str(model_dir), *files_args(data, validation="validation"),
                     "--eval_split", "none"]) == 0
        temperature = json.loads((model_dir / "config.json").read_text())["hf_kd"]["temperature"]
        torch.testing.assert_close(logits(model_dir, TEXTS), original / temperature, rtol=1e-5, atol=1e-6)
        assert (model_dir / "tokenizer_config.json").is_file() and (model_dir / "README.md").is_file()
        assert not (model_dir / "uncertainty").exists()

    @pytest.mark.parametrize(
        "extra, message",
        [
            (["--data_files", "validation"], "SPLIT=PATH"),
            (["--data_files", "test=x.jsonl"], "--data_files has splits ['test'], not 'validation'"),
            (["--split", "test", "--eval_split", "test", "--data_files", "test=x.jsonl"], "must differ"),
        ],
    )
    def test_bad_arguments_leave_the_model_alone(self, model_dir, extra, message, capsys):
        digest = folder_digest(model_dir)
        assert main(["calibrate", str(model_dir), *extra]) == 1
        assert message in capsys.readouterr().err
        assert folder_digest(model_dir) == digest

    def test_unlabelled_calibration_data(self, model_dir, data, capsys):
        digest = folder_digest(model_dir)
        assert main(["calibrate", str(model_dir), *files_args(data, validation="unlabelled", test="test")]) == 1
        assert "data_files/validation has no 'label' column (columns: ['text']): hf-kd needs gold labels" in (
            capsys.readouterr().err
        )
        assert folder_digest(model_dir) == digest

    def test_csv_files(self, model_dir, tmp_path):
        path = tmp_path / "test.csv"
        path.write_text("text,label\nw1 w2,0\nw3,1\nw8 w9 w10,0\n")
        assert main(["evaluate", str(model_dir), "--data_files", f"test={path}"]) == 0
        assert json.loads((model_dir / "uncertainty" / "test" / "report.json").read_text())["num_examples"] == 3

    def test_class_count_mismatch(self, tmp_path, capsys):
        folder = tmp_path / "three"
        expressive_bert(num_labels=3).save_pretrained(folder)
        tiny_tokenizer(tmp_path).save_pretrained(folder)
        assert main(["calibrate", str(folder), "--dataset", "rotten_tomatoes", "--max_samples", "4"]) == 1
        assert "the data has 2 classes ['rotten', 'fresh'] but the model predicts 3" in capsys.readouterr().err


class TestPush:
    def test_malformed_repo_id(self, model_dir, capsys):
        assert main(["push", str(model_dir), "--repo_id", "not/a/repo"]) == 1
        assert "'not/a/repo' is not a valid Hub repo id" in capsys.readouterr().err

    def test_arguments_reach_push_to_hub(self, model_dir, monkeypatch, capsys):
        import hf_kd.hub

        calls = []

        def fake_push(folder, repo_id, **kwargs):
            calls.append((folder, repo_id, kwargs))
            return type("CommitInfo", (), {"commit_url": "http://hub/commit/1"})()

        monkeypatch.setattr(hf_kd.hub, "push_to_hub", fake_push)
        assert main(["push", str(model_dir), "--repo_id", "me/student", "--private"]) == 0
        assert calls == [(str(model_dir), "me/student",
                          {"private": True, "commit_message": "Upload calibrated student with hf_kd"})]
        assert "Pushed" in capsys.readouterr().out


def test_parser_errors():
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "m", "--dataset", "rotten_tomatoes", "--batch_size", "0"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit):
        main(["evaluate", "m"])  # a data source is required


def test_console_script_is_declared():
    import importlib.metadata

    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("hf-kd") == "hf_kd.cli:main"
    assert shutil.which("hf-kd") is not None


def test_main_job_push_flags(capsys):
    """The main job checks its Hub flags before any training starts."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainers"))
    try:
        import main_job
    finally:
        sys.path.pop(0)
    opts = main_job.parse_args(["--push_to_hub", "--hub_model_id", "me/minilm-rt-calibrated"])
    assert (opts.push_to_hub, opts.hub_model_id) == (True, "me/minilm-rt-calibrated")
    with pytest.raises(SystemExit):
        main_job.parse_args(["--push_to_hub"])
    assert "--push_to_hub needs --hub_model_id" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_job.parse_args(["--push_to_hub", "--hub_model_id", "me/bad--name"])
    assert "'me/bad--name' is not a valid Hub repo id" in capsys.readouterr().err


def test_main_job_dataloaders_do_not_warn_about_pin_memory(tmp_path):
    # `make demo` printed torch's "'pin_memory' argument is set as true but no accelerator is found" as a bare
    # `super().__init__(loader)` line (the warning's source line): the main job pins memory only with an accelerator.
    import warnings

    from transformers import Trainer

    from hf_kd.recipes import main_job_training_args

    args = main_job_training_args(str(tmp_path), seed=0, epochs=1.0)
    assert args.dataloader_pin_memory == torch.accelerator.is_available()
    trainer = Trainer(model=expressive_bert(), args=args, train_dataset=[{"input_ids": [2, 5, 3], "labels": 0}] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        next(iter(trainer.get_train_dataloader()))
