"""Integration tests of the runnable recipes in trainers/: real models, real data, small slices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .testing_utils import tiny_bert, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# PYTHONPATH: the scripts import hf_kd from this checkout, not from wherever it was pip-installed (worktrees, clones).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run(cmd, timeout=600):
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.slow
def test_main_job_on_a_small_slice(tmp_path):
    """The README's main job end to end on the real MiniLMs and Rotten Tomatoes (64 rows)."""
    out = tmp_path / "main_job"
    proc = run([sys.executable, "trainers/main_job.py", "--output_dir", str(out), "--train_samples", "64",
                "--eval_samples", "64", "--epochs", "1", "--student_epochs", "1"])
    results = json.loads((out / "results.json").read_text())
    for who in ("teacher", "student"):
        for metric in ("test_accuracy", "test_ece", "test_nll", "test_brier", "test_entropy"):
            assert 0 <= results[who][metric] < 10, (who, metric)
    assert "test_sigma" in results["student"]
    assert (out / "student" / "model.safetensors").exists() and (out / "student" / "tokenizer.json").exists()
    assert "The student keeps" in proc.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_distill_recipe_under_accelerate_launch(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 trainers/distill.py <yaml>` (2 CPU ranks, gloo), real data."""
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student_init"
    tokenizer = tiny_tokenizer(tmp_path)
    for path, seed in ((teacher_dir, 7), (student_dir, 1)):
        tiny_bert(seed=seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
    config = tmp_path / "recipe.yaml"
    config.write_text(
        f"dataset_name: rotten_tomatoes\nmethod: kd\nmodel_name_or_path: {student_dir}\n"
        f"teacher_model_name_or_path: {teacher_dir}\noutput_dir: {tmp_path / 'out'}\ncache_teacher_logits: true\n"
        f"teacher_logits_cache_dir: {tmp_path / 'cache'}\nmax_train_samples: 64\nmax_eval_samples: 32\n"
        "max_length: 32\nnum_train_epochs: 1\nper_device_train_batch_size: 8\nuse_cpu: true\nreport_to: none\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(port), "trainers/distill.py", str(config)])
    results = json.loads((tmp_path / "out" / "test_results.json").read_text())
    assert results["method"] == "kd" and "test_sigma" in results and 0 <= results["test_accuracy"] <= 1
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3  # train, validation, test


def test_recipe_rejects_unknown_method_and_dataset(tmp_path, monkeypatch):
    """An unknown method fails when parsed. A dataset_name that is not built in is a Hub id (issue 20): offline and
    not cached, loading it fails naming the built-in data sets and --data_files; a name and files together fail."""
    from hf_kd.recipes import DataArguments, ScriptArguments, load_splits

    with pytest.raises(ValueError, match="method must be one of .*got 'distil'"):
        ScriptArguments(method="distil")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"'imdb' is not a local folder and the Hub is unreachable .*--data_files "
                                         r"train=train.csv.* \['rotten_tomatoes', 'crowdflower_tweets', 'bbc_news'\]"):
        load_splits(ScriptArguments(dataset_name="imdb"), tiny_tokenizer(tmp_path))
    with pytest.raises(ValueError, match="pass --dataset_name .* or --data_files .*, not both"):
        DataArguments(dataset_name="imdb", data_files=["train=a.csv"])


def test_load_splits_cuts_shuffled_rows_and_tokenizes(tmp_path):
    """hf_kd.recipes.load_splits: a limit takes the first rows of the split shuffled with split_seed (the rows are
    grouped by movie, a plain head is not representative), no limit keeps every row; text is truncated to max_length."""
    from hf_kd import data
    from hf_kd.recipes import DataArguments, label_kwargs, load_splits

    tokenizer = tiny_tokenizer(tmp_path)
    full = data.load_rotten_tomatoes(seed=3)
    cut = load_splits(DataArguments(max_train_samples=40, max_eval_samples=10, max_length=8, split_seed=3), tokenizer)
    assert [len(cut[s]) for s in ("train", "validation", "test")] == [40, 10, 10]
    assert cut["train"]["text"] == full["train"].shuffle(seed=3)["text"][:40] != full["train"]["text"][:40]
    assert cut["test"]["text"] == full["test"].shuffle(seed=3)["text"][:10]
    assert max(map(len, cut["train"]["input_ids"])) == 8 and min(map(len, cut["train"]["input_ids"])) > 2
    whole = load_splits(DataArguments(max_eval_samples=10, split_seed=3), tokenizer)
    assert whole["train"]["text"] == full["train"]["text"] and len(whole["validation"]) == 10
    assert label_kwargs(cut) == {"num_labels": 2, "id2label": {0: "rotten", 1: "fresh"},
                                 "label2id": {"rotten": 0, "fresh": 1}}


def test_main_job_training_args(tmp_path):
    """The main job's settings, shared by trainers/main_job.py and scripts/studies/calibration_sweep_rt.py."""
    from hf_kd import DistillConfig
    from hf_kd.recipes import main_job_training_args

    args = main_job_training_args(str(tmp_path), 7, 1.5, temperature=4.0, alpha=1.0)
    assert isinstance(args, DistillConfig) and (args.seed, args.num_train_epochs) == (7, 1.5)
    assert (args.learning_rate, args.per_device_train_batch_size, args.temperature, args.alpha) == (1e-4, 32, 4.0, 1.0)


def parse_recipe(recipe: str):
    """`(script_args, training_args, lora_args)` of trainers/configs/<recipe>.yaml, parsed by its trainer script."""
    sys.path.insert(0, str(ROOT / "trainers"))
    import distill
    import early_exit

    path = str(ROOT / "trainers" / "configs" / f"{recipe}.yaml")
    if recipe.startswith("distill_lm"):  # causal-LM recipes: trainers/distill_lm.py (tests/test_lm_recipes.py)
        import distill_lm

        return (*distill_lm.parse_lm([path]), None)  # no LoRA arguments
    if recipe.startswith("early_exit_lm"):  # `hf-kd early-exit-lm` (tests/test_early_exit_lm_recipe.py), no script
        from hf_kd.lm_recipes import COMMANDS
        from hf_kd.recipes import parse_args

        return (*parse_args([path], COMMANDS["early-exit-lm"].dataclass_types([path])), None)  # no LoRA arguments
    if recipe.startswith("early_exit"):
        return distill.parse([path], (early_exit.EarlyExitScriptArguments, early_exit.EarlyExitConfig, distill.LoraArguments))
    return distill.parse([path])


@pytest.mark.parametrize("recipe", sorted(path.stem for path in (ROOT / "trainers" / "configs").glob("*.yaml")))
def test_every_recipe_parses(recipe):
    script_args, args, _lora_args = parse_recipe(recipe)
    assert args.output_dir.startswith("outputs/") and script_args.model_name_or_path


def test_born_again_and_base_teacher_recipes_say_what_they_are():
    """born_again: a student of the teacher's own architecture (Furlanello et al. 2018); lora_base_teacher: a LoRA
    student whose teacher is its own base model. Neither is SelfKDTrainer (self-distillation from lower layers)."""
    script_args, args, lora_args = parse_recipe("born_again_rotten_tomatoes")
    assert script_args.model_name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    assert args.teacher_model_name_or_path == "outputs/teacher-l6-rotten_tomatoes" and not lora_args.use_peft
    script_args, args, lora_args = parse_recipe("lora_base_teacher_rotten_tomatoes")
    assert script_args.model_name_or_path == "outputs/teacher-l6-rotten_tomatoes"
    assert args.teacher_from_base_model and lora_args.use_peft


@pytest.mark.parametrize(
    "recipe, intermediate, cached",
    [("tinybert_stage1_rotten_tomatoes", True, False), ("tinybert_stage2_rotten_tomatoes", False, True),
     ("tinybert_mpnet_stage1_rotten_tomatoes", True, False)],
)
def test_tinybert_recipes_parse(recipe, intermediate, cached):
    sys.path.insert(0, str(ROOT / "trainers"))
    from distill import parse

    from hf_kd import TinyBERTConfig

    script_args, args, _lora_args = parse([str(ROOT / "trainers" / "configs" / f"{recipe}.yaml")])
    assert script_args.method == "tinybert" and isinstance(args, TinyBERTConfig)
    assert args.uses_intermediate_losses is intermediate and args.cache_teacher_logits is cached
    assert (args.prediction_loss_weight == 0.0) is intermediate


@pytest.mark.slow
def test_tinybert_two_stage_recipe(tmp_path):
    """Stage 1 (intermediate layers, wider and deeper teacher) then stage 2 (prediction layer) from the stage-1 folder,
    through trainers/distill.py and the recipes' YAML files, on tiny models and 32 real Rotten Tomatoes rows."""
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student_init"
    tokenizer = tiny_tokenizer(tmp_path)
    for path, model in ((teacher_dir, tiny_bert(seed=7, layers=4, hidden=48)), (student_dir, tiny_bert(seed=1))):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    common = ["--max_train_samples", "32", "--max_eval_samples", "16", "--max_length", "32", "--num_train_epochs", "1",
              "--use_cpu", "true", "--teacher_model_name_or_path", str(teacher_dir), "--save_strategy", "no"]
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    run([sys.executable, "trainers/distill.py", "trainers/configs/tinybert_stage1_rotten_tomatoes.yaml", *common,
         "--model_name_or_path", str(student_dir), "--output_dir", str(stage1)])
    results = json.loads((stage1 / "test_results.json").read_text())
    assert results["test_hidden_loss"] > 0 and results["test_attention_loss"] > 0 and results["test_embedding_loss"] > 0
    assert (stage1 / "intermediate_projection.safetensors").exists() and (stage1 / "model.safetensors").exists()
    run([sys.executable, "trainers/distill.py", "trainers/configs/tinybert_stage2_rotten_tomatoes.yaml", *common,
         "--model_name_or_path", str(stage1), "--output_dir", str(stage2),
         "--teacher_logits_cache_dir", str(tmp_path / "cache")])
    results = json.loads((stage2 / "test_results.json").read_text())
    assert "test_sigma" in results and "test_hidden_loss" not in results
    assert {"train_sigma", "eval_sigma", "train_kd_loss", "eval_accuracy"} <= set(results)  # report_train_sigma
