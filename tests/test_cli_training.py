"""The `hf-kd` training commands (`hf-kd distill`, `early-exit`, `self-kd`; hf_kd.recipes) on real data offline:
CSV and JSON-lines files written from a slice of Rotten Tomatoes with label names, a local folder laid out like a Hub
dataset repository, a Hub dataset id served by the local Hub (tests/hub_server.py), hf_kd's built-in loaders; and their
bad input. Tiny models, a few dozen rows.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from transformers import AutoConfig

from hf_kd import MultiExitConfig
from hf_kd.cli import main

from .hub_server import HubServer, hub_env
from .testing_utils import rotten_tomatoes_rows, save_tiny_pair, tiny_tokenizer, write_rows

RUN = ["--max_length", "32", "--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--use_cpu", "true",
       "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def corpus():
    """Real Rotten Tomatoes rows with label names: 64 train, 24 validation, 24 test."""
    return {split: rotten_tomatoes_rows(split, n) for split, n in (("train", 64), ("validation", 24), ("test", 24))}


def files(tmp_path, corpus, suffix, splits=("train", "validation", "test")):
    return [f"{split}={write_rows(tmp_path / f'{split}{suffix}', corpus[split])}" for split in splits]


def run_command(argv, capsys=None):
    status = main(argv)
    err = capsys.readouterr().err if capsys is not None else ""
    assert status == 0, err[-3000:]
    return status


def test_distill_on_csv_files_with_label_names_then_evaluate_jsonl(tmp_path, corpus, capsys):
    """KD from CSV files (columns `review` / `sentiment`, label names): the names become the student's id2label (sorted),
    the run ends with test metrics, card and test_results.json; `hf-kd evaluate` then reads JSON lines with label names
    through the saved model's label2id."""
    teacher, student = save_tiny_pair(tmp_path)
    # The teacher must know the data's labels: same names, same order.
    config = AutoConfig.from_pretrained(teacher)
    config.id2label, config.label2id = {0: "fresh", 1: "rotten"}, {"fresh": 0, "rotten": 1}
    config.save_pretrained(teacher)
    out = tmp_path / "out"
    run_command(["distill", "--method", "kd", "--model_name_or_path", str(student), "--teacher_model_name_or_path",
                 str(teacher), "--data_files", *files(tmp_path, corpus, ".csv"), "--text_column", "review",
                 "--label_column", "sentiment", "--output_dir", str(out), "--cache_teacher_logits", "false", *RUN],
                capsys)
    results = json.loads((out / "test_results.json").read_text())
    assert results["method"] == "kd" and 0 <= results["test_accuracy"] <= 1 and "test_sigma" in results
    assert AutoConfig.from_pretrained(out).id2label == {0: "fresh", 1: "rotten"}
    card = ModelCard.load(out / "README.md")
    assert {r.metric_type for r in card.data.eval_results} >= {"accuracy", "ece"}

    test_file = write_rows(tmp_path / "test.jsonl", corpus["test"])
    assert main(["evaluate", str(out), "--data_files", f"test={test_file}", "--text_column", "review",
                 "--label_column", "sentiment"]) == 0
    report = json.loads((out / "uncertainty" / "test" / "report.json").read_text())
    assert report["num_examples"] == 24


def test_early_exit_from_a_recipe_on_jsonl_cuts_missing_splits(tmp_path, corpus, capsys):
    """`hf-kd early-exit --config recipe.yaml` with flags overriding it; the JSON-lines data has a train split only,
    so validation and test are cut from it by a seeded shuffle (10% and 20% of its rows)."""
    _, student = save_tiny_pair(tmp_path)
    out = tmp_path / "early_exit"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": str(student), "output_dir": str(tmp_path / "elsewhere"),
                                      "text_column": "review", "label_column": "sentiment", "num_train_epochs": 3}))
    train = write_rows(tmp_path / "train.jsonl", corpus["train"] + corpus["validation"] + corpus["test"])
    run_command(["early-exit", "--config", str(recipe), "--data_files", f"train={train}", "--output_dir", str(out),
                 *RUN], capsys)
    results = json.loads((out / "test_results.json").read_text())
    assert results["method"] == "early_exit" and 0 <= results["test_accuracy"] <= 1
    assert not (tmp_path / "elsewhere").exists()  # the flag overrode the recipe
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == MultiExitConfig.model_type and saved["id2label"] == {"0": "fresh", "1": "rotten"}
    assert (out / "README.md").is_file()


def test_load_splits_cut_is_seeded_and_disjoint(tmp_path, corpus):
    from hf_kd.recipes import DataArguments, load_splits

    train = write_rows(tmp_path / "train.csv", corpus["train"] + corpus["validation"] + corpus["test"])
    args = dict(data_files=[f"train={train}"], text_column="review", label_column="sentiment", split_seed=5)
    one, two = (load_splits(DataArguments(**args), tiny_tokenizer(tmp_path)) for _ in range(2))
    assert [len(one[s]) for s in ("train", "validation", "test")] == [77, 12, 23]
    assert all(one[s]["review"] == two[s]["review"] for s in one)
    assert not set(one["train"]["review"]) & set(one["test"]["review"])
    other = load_splits(DataArguments(**{**args, "split_seed": 6}), tiny_tokenizer(tmp_path))
    assert other["test"]["review"] != one["test"]["review"]
    assert one["train"].features["label"].names == ["fresh", "rotten"]


def test_self_kd_on_a_builtin_dataset(tmp_path, capsys):
    """`hf-kd self-kd` on 48 rows of crowdflower_tweets (3 classes), exits after every layer of a 4-layer encoder."""
    student, _ = save_tiny_pair(tmp_path, num_labels=3)  # the 4-layer one: self-KD's default needs 3 exits or more
    out = tmp_path / "self_kd"
    run_command(["self-kd", "--dataset_name", "crowdflower_tweets", "--model_name_or_path", str(student),
                 "--max_train_samples", "48", "--max_eval_samples", "16", "--output_dir", str(out),
                 "--warmup_max_epochs", "1", "--selection_stable_epochs", "1", *RUN[:2], "--num_train_epochs", "3", *RUN[4:]], capsys)
    results = json.loads((out / "test_results.json").read_text())
    assert results["method"] == "self_kd" and 0 <= results["test_accuracy"] <= 1
    assert AutoConfig.from_pretrained(out, trust_remote_code=True).id2label == {0: "negative", 1: "neutral",
                                                                                 2: "positive"}


def test_dataset_folder_laid_out_like_a_hub_repo(tmp_path, corpus):
    """`--dataset_name <folder> --dataset_config <name>`: a folder with the layout of a Hub dataset repository (a
    README whose YAML lists two configs, CSV files per split) is read by datasets.load_dataset as a Hub id would be."""
    from hf_kd.recipes import DataArguments, load_splits

    repo = tmp_path / "repo"
    for config in ("small", "large"):
        (repo / config).mkdir(parents=True)
        for split in ("train", "test"):
            rows = corpus[split][: 20 if config == "small" else 40]
            write_rows(repo / config / f"{split}.csv", rows)
    (repo / "README.md").write_text("---\n" + yaml.safe_dump({"configs": [
        {"config_name": c, "data_files": [{"split": s, "path": f"{c}/{s}.csv"} for s in ("train", "test")]}
        for c in ("small", "large")]}) + "---\n")
    splits = load_splits(DataArguments(dataset_name=str(repo), dataset_config="small", text_column="review",
                                       label_column="sentiment", dataset_eval_split="dev"), tiny_tokenizer(tmp_path))
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [18, 2, 20]
    assert splits["test"]["review"] == [row["review"] for row in corpus["test"][:20]]


HUB_TOKEN = "hf_hfkdTestSecretToken0123456789abcdefXYZ"

# Run in a fresh process: huggingface_hub and datasets read HF_ENDPOINT, HF_HUB_OFFLINE, HF_DATASETS_OFFLINE and the
# cache folders when they are imported, and this suite runs offline. Upload the dataset folder as a dataset repo, then
# `hf-kd distill --dataset_name <repo>` and `hf-kd evaluate --dataset_name <repo>`.
DISTILL_FROM_HUB = """
import json, sys
import datasets, huggingface_hub
from huggingface_hub import HfApi
from hf_kd.cli import main

folder, repo_id, distill, evaluate = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
api = HfApi()
api.create_repo(repo_id, repo_type="dataset")
api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="dataset")
status = main(distill) or main(evaluate)
print(json.dumps({"status": status, "endpoint": huggingface_hub.constants.ENDPOINT,
                  "datasets_cache": str(datasets.config.HF_DATASETS_CACHE)}))
sys.exit(status)
"""


def test_distill_on_a_hub_dataset_id_then_evaluate(tmp_path, corpus):
    """`hf-kd distill --dataset_name hfkd-test/<name>` on a dataset repo of the local Hub: Parquet files of real Rotten
    Tomatoes rows per split (pandas writes their strings as `large_string`), label names in `sentiment`, read by
    datasets.load_dataset through HfFileSystem; then `hf-kd evaluate --dataset_name` on its test split. The Hub id
    becomes the card's `datasets`; the label names the model's id2label. Online only in the subprocess."""
    import pandas as pd
    import pyarrow.parquet as pq

    teacher, student = save_tiny_pair(tmp_path)
    config = AutoConfig.from_pretrained(teacher)
    config.id2label, config.label2id = {0: "fresh", 1: "rotten"}, {"fresh": 0, "rotten": 1}
    config.save_pretrained(teacher)
    folder = tmp_path / "dataset" / "data"
    folder.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        pd.DataFrame(corpus[split]).to_parquet(folder / f"{split}.parquet", index=False)
    assert str(pq.read_schema(folder / "test.parquet").field("sentiment").type) == "large_string"
    repo_id, out = "hfkd-test/rotten-tomatoes-slice", tmp_path / "out"
    columns = ["--dataset_name", repo_id, "--text_column", "review", "--label_column", "sentiment"]
    distill = ["distill", "--method", "kd", "--model_name_or_path", str(student), "--teacher_model_name_or_path",
               str(teacher), *columns, "--output_dir", str(out), "--cache_teacher_logits", "false", *RUN,
               "--max_steps", "2"]
    evaluate = ["evaluate", str(out), *columns, "--split", "test"]

    hub = HubServer(HUB_TOKEN)
    try:
        env = hub_env(hub, tmp_path / "home", HUB_TOKEN)
        env.update(HF_DATASETS_OFFLINE="0", HF_DATASETS_CACHE=str(tmp_path / "home" / "datasets_cache"))
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(DISTILL_FROM_HUB), str(folder.parent), repo_id,
             json.dumps(distill), json.dumps(evaluate)],
            env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-5000:]
        requests = list(hub.state.requests)
    finally:
        hub.shutdown()
    ran = json.loads(result.stdout.strip().splitlines()[-1])
    assert ran == {"status": 0, "endpoint": hub.url, "datasets_cache": str(tmp_path / "home" / "datasets_cache")}
    # What datasets asked the Hub: the repo's info and tree, and the Parquet files under /datasets/<id>/resolve/.
    asked = {(method, path.split("?")[0]) for method, path, status in requests if status == 200}
    assert ("GET", f"/api/datasets/{repo_id}") in asked
    assert any(m == "GET" and p.startswith(f"/api/datasets/{repo_id}/tree/") for m, p in asked)
    for split in ("train", "validation", "test"):
        assert any(m == "GET" and p.startswith(f"/datasets/{repo_id}/resolve/") and p.endswith(f"data/{split}.parquet")
                   for m, p in asked), split
    assert not any(path.startswith("/api/models/") for _, path, _ in requests)  # the student and teacher are local
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"  # this process stays offline

    results = json.loads((out / "test_results.json").read_text())
    assert results["method"] == "kd" and 0 <= results["test_accuracy"] <= 1 and results["epoch"] > 0
    assert AutoConfig.from_pretrained(out).id2label == {0: "fresh", 1: "rotten"}
    assert ModelCard.load(out / "README.md").data.datasets == [repo_id]
    report = json.loads((out / "uncertainty" / "test" / "report.json").read_text())
    assert report["num_examples"] == 24 and 0 <= report["metrics"]["accuracy"] <= 1
    assert report["metrics"]["accuracy"] == pytest.approx(results["test_accuracy"])


# ---- bad input: exit status 1 and one line naming the bad value ------------------------------------------------------


def error_of(argv, capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hf-kd ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_unknown_dataset_id_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _, student = save_tiny_pair(tmp_path)
    message = error_of(["distill", "--method", "erm", "--dataset_name", "someone/no-such-dataset",
                        "--model_name_or_path", str(student), "--output_dir", str(tmp_path / "out"), *RUN], capsys)
    assert "'someone/no-such-dataset'" in message and "Hub is unreachable" in message
    assert "--data_files train=train.csv" in message


@pytest.mark.parametrize(
    "columns, message",
    [
        (["--text_column", "text", "--label_column", "sentiment"],
         r"the train split has no column 'text'; its columns are \['review', 'sentiment'\]"),
        (["--text_column", "review"],
         r"the train split has no column 'label'; its columns are \['review', 'sentiment'\]: .*--label_column"),
    ],
)
def test_missing_column_lists_the_columns(tmp_path, corpus, capsys, columns, message):
    import re

    _, student = save_tiny_pair(tmp_path)
    line = error_of(["distill", "--method", "erm", "--model_name_or_path", str(student), "--data_files",
                     *files(tmp_path, corpus, ".csv"), *columns, "--output_dir", str(tmp_path / "out"), *RUN], capsys)
    assert re.search(message, line), line


def test_eval_labels_never_seen_in_training(tmp_path, corpus, capsys):
    _, student = save_tiny_pair(tmp_path)
    validation = corpus["validation"] + [{"review": "a new kind of film", "sentiment": "meh"}]
    write_rows(tmp_path / "validation.csv", validation)
    data = [f"train={write_rows(tmp_path / 'train.csv', corpus['train'])}", f"validation={tmp_path / 'validation.csv'}",
            f"test={write_rows(tmp_path / 'test.csv', corpus['test'])}"]
    line = error_of(["distill", "--method", "erm", "--model_name_or_path", str(student), "--data_files", *data,
                     "--text_column", "review", "--label_column", "sentiment", "--output_dir", str(tmp_path / "o"),
                     *RUN], capsys)
    assert "labels ['meh'] of the validation split are not among the train split's labels ['fresh', 'rotten']" in line


def test_empty_split(tmp_path, corpus, capsys):
    _, student = save_tiny_pair(tmp_path)
    (tmp_path / "test.csv").write_text("review,sentiment\n")
    data = [f"train={write_rows(tmp_path / 'train.csv', corpus['train'])}", f"test={tmp_path / 'test.csv'}"]
    line = error_of(["distill", "--method", "erm", "--model_name_or_path", str(student), "--data_files", *data,
                     "--text_column", "review", "--label_column", "sentiment", "--output_dir", str(tmp_path / "o"),
                     *RUN], capsys)
    assert "the test split is empty" in line


def test_evaluate_names_labels_the_model_does_not_know(tmp_path, corpus, capsys):
    _, student = save_tiny_pair(tmp_path)  # id2label LABEL_0 / LABEL_1: the data's names are unknown to it
    test = write_rows(tmp_path / "test.jsonl", corpus["test"])
    line = error_of(["evaluate", str(student), "--data_files", f"test={test}", "--text_column", "review",
                     "--label_column", "sentiment"], capsys)
    assert "labels ['fresh', 'rotten'] of the data_files/test split are not among the model's labels" in line
    assert "'LABEL_0': 0" in line


def test_training_command_help_lists_data_and_trainer_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["distill", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--dataset_name", "--data_files", "--label_column", "--teacher_model_name_or_path", "--config"):
        assert flag in out, flag


RECIPES = Path(__file__).resolve().parents[1] / "trainers" / "configs"


@pytest.mark.parametrize("recipe", sorted(path.name for path in RECIPES.glob("*.yaml")))
def test_every_yaml_recipe_parses_as_a_command(recipe):
    """`hf-kd <command> --config trainers/configs/<recipe>` parses every recipe of the repository into its command's
    dataclasses (`distill-lm` and `early-exit-lm` for the causal-LM recipes): the method's config (TinyBERTConfig for
    `method: tinybert`), flags after --config override it."""
    from hf_kd import TinyBERTConfig
    from hf_kd.lm_recipes import COMMANDS as LM_COMMANDS
    from hf_kd.recipes import COMMANDS, parse_args

    if recipe.startswith("distill_lm"):
        command = LM_COMMANDS["distill-lm"]
    elif recipe.startswith("early_exit_lm"):
        command = LM_COMMANDS["early-exit-lm"]
    else:
        command = COMMANDS["early-exit" if recipe.startswith("early_exit") else "distill"]
    argv = ["--config", str(RECIPES / recipe), "--seed", "123"]
    script_args, args, *_lora = parse_args(argv, command.dataclass_types(argv))
    assert args.output_dir.startswith("outputs/") and args.seed == 123 and script_args.model_name_or_path
    method = yaml.safe_load((RECIPES / recipe).read_text()).get("method")
    assert isinstance(args, TinyBERTConfig) == (method == "tinybert")
