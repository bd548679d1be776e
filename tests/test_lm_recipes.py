"""The causal-LM recipe (hf_kd.lm_recipes, trainers/distill_lm.py, trainers/configs/distill_lm_*.yaml): end to end on
a tiny Llama with SmolLM2's tokenizer and real BBC articles, the YAML recipes, and its errors on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_kd import DistillConfig
from hf_kd.lm_data import lm_text_dataset
from hf_kd.lm_recipes import (
    LMDataArguments,
    LMScriptArguments,
    build_lm_student,
    load_lm_splits,
    run_lm,
)

from .testing_utils import SMOLLM2, causal_lm_tokenizer, tiny_llama, write_rows

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "trainers" / "configs").glob("distill_lm_*.yaml"))


def parse_lm(argv):
    sys.path.insert(0, str(ROOT / "trainers"))
    import distill_lm

    return distill_lm.parse_lm(argv)


@pytest.fixture
def tiny_teacher_dir(tmp_path):
    """A 4-layer tiny Llama over SmolLM2's vocabulary, saved with SmolLM2's tokenizer (the recipe reads the data with
    the real tokenizer, so the ids must fit the model's vocabulary)."""
    tokenizer = causal_lm_tokenizer(SMOLLM2)
    path = tmp_path / "teacher"
    tiny_llama(layers=4, seed=0, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_args(tmp_path, teacher_dir, method, lm_max_length=24, **kwargs):
    script = LMScriptArguments(model_name_or_path=str(teacher_dir), method=method, student_layers=2, dataset="text",
                               max_train_samples=8, max_eval_samples=4)
    args = DistillConfig(
        output_dir=str(tmp_path / method), teacher_model_name_or_path=str(teacher_dir), max_steps=2,
        per_device_train_batch_size=4, per_device_eval_batch_size=2, learning_rate=1e-3, report_to="none",
        save_strategy="no", use_cpu=True, cache_teacher_logits=True,
        teacher_logits_cache_dir=str(tmp_path / "cache"), lm_max_length=lm_max_length, **kwargs,
    )
    return script, args


@pytest.mark.parametrize("method", ["kd", "sft"])
def test_recipe_end_to_end_on_a_tiny_llama(tmp_path, tiny_teacher_dir, method):
    script, args = tiny_args(tmp_path, tiny_teacher_dir, method, alpha=0.7)
    metrics = run_lm(script, args)
    assert set(metrics) >= {"test_perplexity", "test_top1_agreement", "test_token_ece", "test_token_accuracy"}
    assert metrics["test_perplexity"] > 1 and 0 <= metrics["test_top1_agreement"] <= 1
    out = tmp_path / method
    results = json.loads((out / "test_results.json").read_text())
    assert results["method"] == method and results["student_layers"] == 2
    assert results["alpha"] == (0.0 if method == "sft" else 0.7)  # sft is the same trainer with alpha = 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["hf_kd_kept_layers"] == [1, 3]
    card = (out / "README.md").read_text()
    assert "perplexity" in card and "text-generation" in card
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # train only: the test split uses top-1 ids


def test_kd_and_sft_differ_in_the_loss_only(tmp_path, tiny_teacher_dir):
    """Same seed, data and steps: alpha = 0 (sft) and alpha = 1 (kd) give different students, and the same alpha
    the same one (the comparison of scripts/studies/lm_kd_vs_sft.py is not noise)."""
    results = {}
    for name, method, alpha in (("kd", "kd", 1.0), ("kd_again", "kd", 1.0), ("sft", "sft", 1.0)):
        script, args = tiny_args(tmp_path / name, tiny_teacher_dir, method, alpha=alpha)
        args.teacher_logits_cache_dir = str(tmp_path / "cache")
        results[name] = run_lm(script, args)["test_perplexity"]
    assert results["kd"] == pytest.approx(results["kd_again"], rel=1e-5)
    assert results["kd"] != pytest.approx(results["sft"], rel=1e-5)


@pytest.mark.parametrize("recipe", [path.name for path in RECIPES])
def test_every_lm_recipe_parses(recipe):
    script_args, args = parse_lm([str(ROOT / "trainers" / "configs" / recipe)])
    assert args.output_dir.startswith("outputs/") and script_args.model_name_or_path and args.teacher_model_name_or_path
    assert script_args.student_layers == 15 and args.lm_max_length >= 64
    assert script_args.method == ("sft" if "sft" in recipe else "kd")
    if "on_policy" in recipe:
        assert args.lmbda == 0.5


def test_lm_recipes_include_kd_sft_and_on_policy():
    assert {path.stem.split("smollm2_")[1] for path in RECIPES} == {"kd", "sft", "on_policy"}


def test_flags_override_the_yaml():
    script_args, args = parse_lm(
        [str(ROOT / "trainers" / "configs" / "distill_lm_smollm2_kd.yaml"), "--lm_max_length", "48", "--method", "sft",
         "--student_rule", "block_influence"]
    )
    assert (args.lm_max_length, script_args.method, str(script_args.student_rule)) == (48, "sft", "block_influence")


def test_distill_lm_is_an_hf_kd_command(tmp_path, tiny_teacher_dir, capsys):
    """`hf-kd distill-lm <yaml> --flags` runs the same recipe as trainers/distill_lm.py, from the installed package."""
    from hf_kd.cli import main

    code = main(["distill-lm", str(ROOT / "trainers" / "configs" / "distill_lm_smollm2_sft.yaml"),
                 "--model_name_or_path", str(tiny_teacher_dir), "--teacher_model_name_or_path", str(tiny_teacher_dir),
                 "--student_layers", "2", "--lm_max_length", "16", "--max_train_samples", "8", "--max_eval_samples",
                 "4", "--max_steps", "1", "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "out"),
                 "--teacher_logits_cache_dir", str(tmp_path / "cache"), "--use_cpu", "true"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "out" / "test_results.json").read_text())
    assert results["method"] == "sft" and results["lm_max_length"] == 16 and results["student_layers"] == 2
    with pytest.raises(SystemExit):  # argparse's usage error, exit status 2
        main(["distill-lm", "--method", "distil", "--model_name_or_path", "m"])
    assert "--method: invalid choice: 'distil' (choose from 'kd', 'sft')" in capsys.readouterr().err


def test_bad_recipe_inputs_are_named():
    with pytest.raises(ValueError, match="method must be one of \\('kd', 'sft'\\) .*got 'distil'"):
        LMScriptArguments(model_name_or_path="m", method="distil")
    with pytest.raises(ValueError, match="dataset must be one of .*got 'summarize'"):
        LMScriptArguments(model_name_or_path="m", dataset="summarize")
    with pytest.raises(ValueError, match="model_name_or_path is required"):
        LMScriptArguments()
    with pytest.raises(ValueError, match="student_layers must be a positive int or None, got 0"):
        LMScriptArguments(model_name_or_path="m", student_layers=0)
    with pytest.raises(ValueError, match="student_rule"):
        LMScriptArguments(model_name_or_path="m", student_rule="random")


def test_student_deeper_than_its_model_is_refused(tiny_teacher_dir):
    with pytest.raises(ValueError, match="student_layers=5 is more than the 4 layers of .*between 1 and 4"):
        build_lm_student(LMScriptArguments(model_name_or_path=str(tiny_teacher_dir), student_layers=5))


def test_recipe_needs_a_teacher(tmp_path, tiny_teacher_dir):
    script = LMScriptArguments(model_name_or_path=str(tiny_teacher_dir), method="sft")
    with pytest.raises(ValueError, match="teacher_model_name_or_path is required by the LM recipe"):
        run_lm(script, DistillConfig(output_dir=str(tmp_path / "out"), report_to="none", lm_max_length=16))


@pytest.mark.slow
def test_distill_lm_under_accelerate_launch(tmp_path, tiny_teacher_dir):
    """`accelerate launch --num_processes 1 trainers/distill_lm.py <yaml> --flags`: the YAML recipe, flags overriding
    it, block_influence student, real BBC articles."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "trainers/distill_lm.py",
           "trainers/configs/distill_lm_smollm2_kd.yaml", "--model_name_or_path", str(tiny_teacher_dir),
           "--teacher_model_name_or_path", str(tiny_teacher_dir), "--student_layers", "3", "--student_rule",
           "block_influence", "--calibration_samples", "4", "--lm_max_length", "16", "--max_train_samples", "8",
           "--max_eval_samples", "4", "--max_steps", "2", "--per_device_train_batch_size", "4", "--output_dir",
           str(tmp_path / "out"), "--teacher_logits_cache_dir", str(tmp_path / "cache"), "--use_cpu", "true"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads((tmp_path / "out" / "test_results.json").read_text())
    assert results["method"] == "kd" and results["student_rule"] == "block_influence" and results["lm_max_length"] == 16
    assert len(json.loads((tmp_path / "out" / "config.json").read_text())["hf_kd_kept_layers"]) == 3


# ---- the data sources of both LM commands (LMDataArguments): offline corpora, local files, dataset folders ----------


@pytest.fixture(scope="module")
def bbc_rows():
    """30 real BBC News articles (the `text` corpus's first training rows), as TRL's `text` format."""
    return [{"text": text} for text in lm_text_dataset()["train"]["text"][:30]]


def test_data_files_in_text_format_get_missing_splits_cut_from_train(tmp_path, bbc_rows):
    train = write_rows(tmp_path / "train.jsonl", bbc_rows)
    tokenizer = causal_lm_tokenizer(SMOLLM2)
    args = LMDataArguments(data_files=[f"train={train}"], split_seed=3)
    assert args.dataset is None and args.source == "data_files"
    splits = load_lm_splits(args, tokenizer, 32)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [21, 3, 6]  # 10% and 20% of 30 rows
    rows = {s: {tuple(ids) for ids in splits[s]["input_ids"]} for s in splits}
    assert not rows["train"] & rows["test"] and not rows["train"] & rows["validation"]
    assert all(len(ids) == 32 for ids in splits["train"]["input_ids"])  # articles cut to max_length
    assert splits["test"]["labels"] == splits["test"]["input_ids"]  # text: every token counts
    again = load_lm_splits(LMDataArguments(data_files=[f"train={train}"], split_seed=3), tokenizer, 32)
    assert again["test"]["input_ids"] == splits["test"]["input_ids"]  # the cut is seeded


def test_prompt_completion_files_and_a_dataset_folder(tmp_path, bbc_rows):
    """Standard prompt + completion rows (only the completion counts), per split from files; the same rows as a local
    dataset folder (`--dataset_name <folder>`, read by datasets.load_dataset), whose missing validation split is cut."""
    pairs = [{"prompt": " ".join(row["text"].split()[:8]), "completion": " " + " ".join(row["text"].split()[8:20])}
             for row in bbc_rows]
    files = [f"{split}={write_rows(tmp_path / f'{split}.jsonl', pairs[a:b])}"
             for split, a, b in (("train", 0, 20), ("validation", 20, 25), ("test", 25, 30))]
    tokenizer = causal_lm_tokenizer(SMOLLM2)
    splits = load_lm_splits(LMDataArguments(data_files=files, max_eval_samples=4), tokenizer, 64)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [20, 4, 4]
    prompt = tokenizer(pairs[25]["prompt"])["input_ids"]
    row = splits["test"][0]
    assert row["input_ids"][: len(prompt)] == prompt and row["labels"][: len(prompt)] == [-100] * len(prompt)
    assert row["labels"][len(prompt):] == row["input_ids"][len(prompt):] and row["input_ids"][-1] == tokenizer.eos_token_id

    folder = tmp_path / "folder"
    folder.mkdir()
    write_rows(folder / "train.jsonl", pairs[:20])
    write_rows(folder / "test.jsonl", pairs[25:])
    args = LMDataArguments(dataset_name=str(folder))
    assert args.source == str(folder)
    splits = load_lm_splits(args, tokenizer, 64)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [18, 2, 5]  # validation: 10% of train


def test_bad_data_sources_are_named(tmp_path, bbc_rows):
    assert LMDataArguments().dataset == "text"  # the offline BBC articles without another source
    with pytest.raises(ValueError, match=r"pass one data source, got dataset='topic' and data_files=\['train=a.jsonl'\]"):
        LMDataArguments(dataset="topic", data_files=["train=a.jsonl"])
    with pytest.raises(ValueError, match="dataset_config='wikitext-2' is a configuration of a dataset_name"):
        LMDataArguments(dataset_config="wikitext-2")
    tokenizer = causal_lm_tokenizer(SMOLLM2)
    prompts = write_rows(tmp_path / "train.jsonl", [{"prompt": row["text"][:40]} for row in bbc_rows])
    with pytest.raises(ValueError, match="data_files is prompt-only data .*nothing to train on"):
        load_lm_splits(LMDataArguments(data_files=[f"train={prompts}"]), tokenizer, 64)
    other = write_rows(tmp_path / "dev.jsonl", bbc_rows)
    with pytest.raises(ValueError, match=r"the data has no train split; its splits are \['dev'\]"):
        load_lm_splits(LMDataArguments(data_files=[f"dev={other}"]), tokenizer, 64)
