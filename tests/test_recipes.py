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


def test_recipe_rejects_unknown_method_and_dataset():
    sys.path.insert(0, str(ROOT / "trainers"))
    from distill import ScriptArguments

    with pytest.raises(ValueError, match="method must be one of .*got 'distil'"):
        ScriptArguments(method="distil")
    with pytest.raises(ValueError, match="dataset_name must be one of .*got 'imdb'"):
        ScriptArguments(dataset_name="imdb")
