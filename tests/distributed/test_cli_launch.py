"""`accelerate launch -m hf_kd.cli distill ...`: the packaged training command under 2 real CPU ranks (gloo), on a CSV
slice of Rotten Tomatoes with label names; the main process prepares the data first, the other reads it after."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ..testing_utils import rotten_tomatoes_rows, save_tiny_pair, write_rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.multiprocess
def test_accelerate_launch_of_hf_kd_distill(tmp_path):
    teacher, student = save_tiny_pair(tmp_path)
    data = [f"{split}={write_rows(tmp_path / f'{split}.csv', rotten_tomatoes_rows(split, n))}"
            for split, n in (("train", 64), ("validation", 16), ("test", 16))]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    # PYTHONPATH: `-m hf_kd.cli` imports this checkout's hf_kd, wherever hf_kd was pip-installed.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(port), "-m", "hf_kd.cli", "distill", "--method", "erm",
           "--model_name_or_path", str(student), "--data_files", *data, "--text_column", "review",
           "--label_column", "sentiment", "--output_dir", str(out), "--max_length", "32", "--num_train_epochs", "1",
           "--per_device_train_batch_size", "8", "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads((out / "test_results.json").read_text())
    assert results["num_processes"] == 2 and results["method"] == "erm" and 0 <= results["test_accuracy"] <= 1
    assert proc.stdout.count("Test metrics:") == 1  # printed by the main process only
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "fresh", "1": "rotten"}
    assert (out / "README.md").is_file()  # the stock Trainer's card for erm
